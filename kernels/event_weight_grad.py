"""Event-driven weight gradient: dW[:, j] = sum over the input events (k, b, j, v) of v * D[k, b, :].

The same dW as eq. 25-26's sum over active entries of ds * eps[t, b, :], regrouped by input event
(appendix B.1: dW = sum_k D[k]^T x[k], D the reverse-time filter of ds): for a sparse input such as
a batch of events, the work is events x N_out and no dense (T, B, N_in) input or trace exists.
Format: the events grouped by input column j (a stable sort of the row-major events), so one
program owns one column j of dW and BLOCK_O output neurons and walks that column's events
BLOCK_E at a time, gathering their rows of D. Each output is written by one program in a fixed
order: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sparse_weight_grad import group_by


@triton.jit
def event_weight_grad_kernel(filtered_ptr, rows_ptr, values_ptr, col_ptr_ptr, out_ptr, n_out, n_in,
                             BLOCK_E: tl.constexpr, BLOCK_O: tl.constexpr):
    column = tl.program_id(0).to(tl.int64)
    outs = (tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)).to(tl.int64)
    out_mask = outs < n_out
    start = tl.load(col_ptr_ptr + column)
    end = tl.load(col_ptr_ptr + column + 1)
    acc = tl.zeros([BLOCK_O], tl.float32)
    for first in range(start, end, BLOCK_E):
        entries = first + tl.arange(0, BLOCK_E)
        entry_mask = entries < end
        rows = tl.load(rows_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
        values = tl.load(values_ptr + entries, mask=entry_mask, other=0.0).to(tl.float32)
        tile = tl.load(filtered_ptr + rows[:, None] * n_out + outs[None, :],
                       mask=entry_mask[:, None] & out_mask[None, :], other=0.0)
        acc += tl.sum(tile * values[:, None], axis=0)
    tl.store(out_ptr + outs * n_in + column, acc, mask=out_mask)


def event_weight_grad(filtered: torch.Tensor, row_ptr: torch.Tensor, cols: torch.Tensor, values: torch.Tensor,
                      n_in: int, block_e: int = 32, block_o: int = 128) -> torch.Tensor:
    """dW (N_out, n_in) float32 from D (T, B, N_out) and the input's events (CSR over the T * B rows)."""
    filtered = filtered.reshape(-1, filtered.shape[-1]).contiguous().float()
    n_out = filtered.shape[1]
    out = torch.empty(n_out, n_in, dtype=torch.float32, device=filtered.device)
    count = cols.numel()
    # each event's row, then the events grouped by column: binary searches and one stable sort, no sync
    rows = torch.searchsorted(row_ptr, torch.arange(count, device=cols.device), right=True) - 1
    col_ptr, order = group_by(cols, n_in)
    if n_out and n_in:
        event_weight_grad_kernel[(n_in, triton.cdiv(n_out, block_o))](
            filtered, rows[order].contiguous(), values[order].contiguous(), col_ptr, out, n_out, n_in,
            BLOCK_E=block_e, BLOCK_O=block_o,
        )
    return out


def event_weight_grad_reference(filtered, row_ptr, cols, values, n_in):
    """Plain torch, float64: the dense input rebuilt from the events, then D^T x."""
    flat = filtered.reshape(-1, filtered.shape[-1]).double()
    rows = torch.repeat_interleave(torch.arange(flat.shape[0]), row_ptr[1:] - row_ptr[:-1])
    x = torch.zeros(flat.shape[0], n_in, dtype=torch.float64)
    x.index_put_((rows, cols), values.double(), accumulate=True)
    return flat.t() @ x
