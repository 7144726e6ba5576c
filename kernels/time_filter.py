"""First-order time filters on (T, B, N) grids: the input trace and the reverse-time gradient filter.

- forward (appendix B.1): eps[t] = x[t] + beta eps[t-1]        (the input trace of eq. 25-26)
- reverse:                D[t]   = ds[t] + beta D[t+1]          (dL/dx[k] = D[k] W)
- trace checkpoints:      C[c]   = eps[c K - 1], C[0] = 0       (only every K-th trace row is kept;
  the weight-gradient kernel rebuilds eps[t] from C[t // K] and at most K input rows)

Time tiled: one program owns BLOCK columns of the flattened (B * N) grid and walks the time axis
TILE steps at a time. It loads a whole [TILE, BLOCK] tile (TILE rows in flight instead of one
dependent load per step), solves the recurrence inside the tile as one product with the
lower-triangular matrix L[k, j] = beta^(k-j) (fp32, IEEE: no TF32), adds the carry from the tile
before times beta^(k+1), and stores. The order of every sum is fixed: results are deterministic.
Flat offsets are int64 (T * B * N may pass 2^31).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

#: programs wanted per launch (two waves on a 132-SM H200) when choosing the column block
TARGET_PROGRAMS = 264


def column_block(n_cols: int, device: torch.device, largest: int = 512, smallest: int = 32) -> int:
    """The largest power-of-two block <= `largest` that still gives TARGET_PROGRAMS programs on a GPU;
    INTERPRETER_BLOCK on CPU, where the interpreter runs programs one after another."""
    if device.type != "cuda":
        return INTERPRETER_BLOCK
    block = largest
    while block > smallest and triton.cdiv(n_cols, block) < TARGET_PROGRAMS:
        block //= 2
    return block


#: column block under the interpreter (few, large programs run fastest there)
INTERPRETER_BLOCK = 512
#: the filters' largest column block on a GPU: a [TILE, 128] tile is 16 values per thread of 4 warps
FILTER_BLOCK = 128


@triton.jit
def time_filter_kernel(src_ptr, dst_ptr, n_cols, steps, log2_beta, REVERSE: tl.constexpr,
                       CHECKPOINTS: tl.constexpr, K: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    """The filter on every row (CHECKPOINTS False), or only the trace rows eps[c K - 1] as C[c]
    (CHECKPOINTS True, forward only)."""
    cols = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = cols < n_cols
    rows = tl.arange(0, TILE).to(tl.int64)
    lag = (rows[:, None] - rows[None, :]).to(tl.float32)
    # inside a tile y = L x + beta^(k+1) carry, with L[k, j] = beta^(k-j) for j <= k
    within = tl.where(lag > 0, tl.exp2(tl.maximum(lag, 1.0) * log2_beta), tl.where(lag == 0, 1.0, 0.0))
    power = tl.exp2((rows + 1).to(tl.float32) * log2_beta)
    carry = tl.zeros([BLOCK], tl.float32)
    if CHECKPOINTS:
        tl.store(dst_ptr + cols, carry, mask=mask)  # C[0] = 0
    for start in range(0, steps, TILE):
        step = rows + start  # position along the direction of the filter
        if REVERSE:
            t = steps - 1 - step
        else:
            t = step
        tile_mask = (step < steps)[:, None] & mask[None, :]
        x = tl.load(src_ptr + t[:, None] * n_cols + cols[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        y = tl.dot(within, x, input_precision="ieee") + power[:, None] * carry[None, :]
        if CHECKPOINTS:  # eps[t] is C[(t + 1) / K] where t + 1 is a multiple of K below T
            done = step + 1
            keep = (done % K == 0) & (done < steps)
            tl.store(dst_ptr + (done // K)[:, None] * n_cols + cols[None, :], y, mask=keep[:, None] & mask[None, :])
        else:
            tl.store(dst_ptr + t[:, None] * n_cols + cols[None, :], y, mask=tile_mask)
        carry = tl.sum(tl.where((rows == TILE - 1)[:, None], y, 0.0), axis=0)


def _log2(beta: float) -> float:
    return -math.inf if beta == 0 else math.log2(beta)


#: time steps per tile of the filters
FILTER_TILE = 16


def _filter(src: torch.Tensor, dst: torch.Tensor, beta: float, reverse: bool, checkpoints: bool, k: int,
            block: int | None) -> torch.Tensor:
    """Launch time_filter_kernel on `src` (T, ...) contiguous into `dst`; returns `dst`."""
    n_cols = src[0].numel() if src.shape[0] else 0
    if n_cols:
        block = block or column_block(n_cols, src.device, largest=FILTER_BLOCK)
        time_filter_kernel[(triton.cdiv(n_cols, block),)](src, dst, n_cols, src.shape[0], _log2(beta),
                                                          REVERSE=reverse, CHECKPOINTS=checkpoints, K=k,
                                                          TILE=FILTER_TILE, BLOCK=block)
    return dst


def time_filter(src: torch.Tensor, beta: float, reverse: bool = False, block: int | None = None) -> torch.Tensor:
    """The forward (or reverse) filter of `src` (T, ...) along dim 0, float32."""
    src = src.contiguous()
    dst = torch.empty(src.shape, dtype=torch.float32, device=src.device)
    return _filter(src, dst, beta, reverse, False, 1, block)


def trace_checkpoints(src: torch.Tensor, beta: float, k: int, block: int | None = None) -> torch.Tensor:
    """C (ceil(T / k), ...) float32: C[c] = eps[c k - 1], the forward trace before step c k (C[0] = 0)."""
    src = src.contiguous()
    dst = torch.empty((triton.cdiv(src.shape[0], k),) + src.shape[1:], dtype=torch.float32, device=src.device)
    return _filter(src, dst, beta, False, True, k, block)


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
