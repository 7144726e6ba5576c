"""Event-driven input current: I[r, :] = sum over the events (j, v) of row r of v * W[:, j] (eq. 1's W x).

The input is a CSR of events over the rows r = t * B + b of a (T, B, N_in) batch (`ztriton.events`).
One program owns one row and BLOCK_N output neurons and walks the row's events, adding the
contiguous row j of W^T scaled by v: the work is events x N_out instead of T B N_in N_out, and no
dense (T, B, N_in) input exists. Each output is written by one program in event order: deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def event_current_kernel(row_ptr_ptr, cols_ptr, values_ptr, weight_t_ptr, out_ptr, n_out, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = outs < n_out
    start = tl.load(row_ptr_ptr + row)
    end = tl.load(row_ptr_ptr + row + 1)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for e in range(start, end):
        col = tl.load(cols_ptr + e).to(tl.int64)
        value = tl.load(values_ptr + e).to(tl.float32)
        acc += value * tl.load(weight_t_ptr + col * n_out + outs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_out + outs, acc, mask=mask)


def event_current(row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, weight: torch.Tensor,
                  shape: tuple[int, int], block_n: int = 128) -> torch.Tensor:
    """I (T, B, N_out) in the weight's dtype from the events (row_ptr over T * B rows, cols, values)."""
    steps, batch = shape
    n_out = weight.shape[0]
    out = torch.empty(steps, batch, n_out, dtype=weight.dtype, device=weight.device)
    if steps * batch and n_out:
        weight_t = weight.t().contiguous()
        event_current_kernel[(steps * batch, triton.cdiv(n_out, block_n))](
            row_ptr, cols, values, weight_t, out, n_out, BLOCK_N=block_n,
        )
    return out


def event_current_reference(row_ptr, cols, values, weight, shape):
    """Plain torch, float64: the dense input rebuilt from the events, times W^T."""
    steps, batch = shape
    rows = torch.repeat_interleave(torch.arange(steps * batch), row_ptr[1:] - row_ptr[:-1])
    x = torch.zeros(steps * batch, weight.shape[1], dtype=torch.float64)
    x.index_put_((rows, cols), values.double(), accumulate=True)
    return (x @ weight.double().t()).view(steps, batch, -1)
