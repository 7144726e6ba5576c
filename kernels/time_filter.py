"""First-order time filters on (T, B, N) grids: the input trace and the reverse-time gradient filter.

- forward (appendix B.1): eps[t] = x[t] + beta eps[t-1]        (the input trace of eq. 25-26)
- reverse:                D[t]   = ds[t] + beta D[t+1]          (dL/dx[k] = D[k] W)

One program per BLOCK columns of the flattened (B * N) grid, the time loop inside, the running
value in registers; each column is independent, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def time_filter_kernel(src_ptr, dst_ptr, n_cols, steps, beta, REVERSE: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(steps):
        if REVERSE:
            t = steps - 1 - i
        else:
            t = i
        acc = tl.load(src_ptr + t * n_cols + cols, mask=mask, other=0.0).to(tl.float32) + beta * acc
        tl.store(dst_ptr + t * n_cols + cols, acc, mask=mask)


def time_filter(src: torch.Tensor, beta: float, reverse: bool = False, block: int = 512) -> torch.Tensor:
    """The forward (or reverse) filter of `src` (T, ...) along dim 0, float32."""
    src = src.contiguous()
    dst = torch.empty(src.shape, dtype=torch.float32, device=src.device)
    n_cols = src[0].numel() if src.shape[0] else 0
    if n_cols:
        time_filter_kernel[(triton.cdiv(n_cols, block),)](src, dst, n_cols, src.shape[0], float(beta),
                                                          REVERSE=reverse, BLOCK=block)
    return dst


def time_filter_reference(src: torch.Tensor, beta: float, reverse: bool = False) -> torch.Tensor:
    """Plain torch, float64: the same recurrences step by step."""
    out = src.double().clone()
    order = range(out.shape[0] - 2, -1, -1) if reverse else range(1, out.shape[0])
    for t in order:
        out[t] += beta * out[t + 1 if reverse else t - 1]
    return out
