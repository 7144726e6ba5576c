"""First-order time filters on (T, B, N) grids: the input trace and the reverse-time gradient filter.

- forward (appendix B.1): eps[t] = x[t] + beta eps[t-1]        (the input trace of eq. 25-26)
- reverse:                D[t]   = ds[t] + beta D[t+1]          (dL/dx[k] = D[k] W)
- trace checkpoints:      C[c]   = eps[c K - 1], C[0] = 0       (only every K-th trace row is kept;
  the weight-gradient kernel rebuilds eps[t] from C[t // K] and at most K input rows)

One program per BLOCK columns of the flattened (B * N) grid, the time loop inside, the running
value in registers; each column is independent, so results are deterministic. Flat offsets are
int64 (T * B * N may pass 2^31).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: programs wanted per launch (two waves on a 132-SM H200) when choosing the column block
TARGET_PROGRAMS = 264


def column_block(n_cols: int, device: torch.device, largest: int = 512, smallest: int = 32) -> int:
    """The largest power-of-two block <= `largest` that still gives TARGET_PROGRAMS programs on a GPU;
    `largest` under the interpreter (CPU), which runs programs one after another."""
    block = largest
    if device.type != "cuda":
        return block
    while block > smallest and triton.cdiv(n_cols, block) < TARGET_PROGRAMS:
        block //= 2
    return block


@triton.jit
def _offsets(t, n_cols, cols):
    """int64 flat offsets of row t (any integer scalar) at `cols` (int64)."""
    return (tl.zeros_like(cols) + t) * n_cols + cols


@triton.jit
def time_filter_kernel(src_ptr, dst_ptr, n_cols, steps, beta, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    cols = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = cols < n_cols
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(steps):
        if REVERSE:
            t = steps - 1 - i
        else:
            t = i
        offsets = _offsets(t, n_cols, cols)
        acc = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + beta * acc
        tl.store(dst_ptr + offsets, acc, mask=mask)


@triton.jit
def trace_checkpoints_kernel(src_ptr, dst_ptr, n_cols, steps, beta, K: tl.constexpr, BLOCK: tl.constexpr):
    cols = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = cols < n_cols
    acc = tl.zeros([BLOCK], tl.float32)
    tl.store(dst_ptr + cols, acc, mask=mask)
    for t in range(steps - 1):  # the last step's trace starts no chunk
        offsets = _offsets(t, n_cols, cols)
        acc = tl.load(src_ptr + offsets, mask=mask, other=0.0).to(tl.float32) + beta * acc
        if (t + 1) % K == 0:
            tl.store(dst_ptr + _offsets((t + 1) // K, n_cols, cols), acc, mask=mask)


def time_filter(src: torch.Tensor, beta: float, reverse: bool = False, block: int | None = None) -> torch.Tensor:
    """The forward (or reverse) filter of `src` (T, ...) along dim 0, float32."""
    src = src.contiguous()
    dst = torch.empty(src.shape, dtype=torch.float32, device=src.device)
    n_cols = src[0].numel() if src.shape[0] else 0
    if n_cols:
        block = block or column_block(n_cols, src.device)
        time_filter_kernel[(triton.cdiv(n_cols, block),)](src, dst, n_cols, src.shape[0], float(beta),
                                                          REVERSE=reverse, BLOCK=block)
    return dst


def trace_checkpoints(src: torch.Tensor, beta: float, k: int, block: int | None = None) -> torch.Tensor:
    """C (ceil(T / k), ...) float32: C[c] = eps[c k - 1], the forward trace before step c k (C[0] = 0)."""
    src = src.contiguous()
    steps = src.shape[0]
    dst = torch.empty((triton.cdiv(steps, k),) + src.shape[1:], dtype=torch.float32, device=src.device)
    n_cols = src[0].numel() if steps else 0
    if n_cols:
        block = block or column_block(n_cols, src.device)
        trace_checkpoints_kernel[(triton.cdiv(n_cols, block),)](src, dst, n_cols, steps, float(beta), K=k,
                                                                BLOCK=block)
    return dst


def time_filter_reference(src: torch.Tensor, beta: float, reverse: bool = False) -> torch.Tensor:
    """Plain torch, float64: the same recurrences step by step."""
    out = src.double().clone()
    order = range(out.shape[0] - 2, -1, -1) if reverse else range(1, out.shape[0])
    for t in order:
        out[t] += beta * out[t + 1 if reverse else t - 1]
    return out


def trace_checkpoints_reference(src: torch.Tensor, beta: float, k: int) -> torch.Tensor:
    """Plain torch, float64: every k-th row of the shifted forward trace."""
    trace = time_filter_reference(src, beta)
    shifted = torch.cat([torch.zeros_like(trace[:1]), trace[:-1]])
    return shifted[::k].clone()
