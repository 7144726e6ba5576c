"""Sparse weight gradient dW = sum over active (t, b, i) of ds * eps[t, b, :] (eq. 25-26).

Format: CSR by output neuron. The active entries are sorted by neuron (a stable sort of the
time-ordered set), so one program owns one output neuron i and BLOCK_IN input columns and walks
that neuron's entries BLOCK_E at a time: it gathers their trace rows, scales them by ds and sums.
Why this format: LocalZO activity is scattered (measured: 16 x 16 blocks are ~72 % non-empty at
0.5 % density, so block formats save little), while the entries of one neuron are
independent rows of the trace; grouping by neuron gives each program a private output row, so
the sum is deterministic without float atomics, and the work is nnz x N_in instead of T B N_out N_in.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def sparse_weight_grad_kernel(trace_ptr, ds_ptr, rows_ptr, crow_ptr, out_ptr, n_in,
                              BLOCK_E: tl.constexpr, BLOCK_IN: tl.constexpr):
    neuron = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_IN + tl.arange(0, BLOCK_IN)
    col_mask = cols < n_in
    start = tl.load(crow_ptr + neuron)
    end = tl.load(crow_ptr + neuron + 1)
    acc = tl.zeros([BLOCK_IN], tl.float32)
    for first in range(start, end, BLOCK_E):
        entries = first + tl.arange(0, BLOCK_E)
        entry_mask = entries < end
        rows = tl.load(rows_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
        ds = tl.load(ds_ptr + entries, mask=entry_mask, other=0.0)
        tile = tl.load(trace_ptr + rows[:, None] * n_in + cols[None, :],
                       mask=entry_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.sum(tile * ds[:, None], axis=0)
    tl.store(out_ptr + neuron * n_in + cols, acc, mask=col_mask)


def csr_by_neuron(rows: torch.Tensor, neurons: torch.Tensor, values: torch.Tensor, n_out: int):
    """(crow, rows, values) with the entries grouped by output neuron (stable, deterministic)."""
    order = torch.sort(neurons, stable=True).indices
    counts = torch.bincount(neurons, minlength=n_out)
    crow = torch.zeros(n_out + 1, dtype=torch.int64, device=rows.device)
    crow[1:] = torch.cumsum(counts, 0)
    return crow, rows[order].contiguous(), values[order].contiguous()


def sparse_weight_grad(trace: torch.Tensor, ds: torch.Tensor, rows: torch.Tensor, neurons: torch.Tensor,
                       n_out: int, block_e: int = 32, block_in: int = 128) -> torch.Tensor:
    """dW (n_out, N_in) from the trace rows (T*B, N_in) at the active entries (rows, neurons, ds)."""
    trace = trace.reshape(-1, trace.shape[-1]).contiguous()
    n_in = trace.shape[1]
    out = torch.empty(n_out, n_in, dtype=torch.float32, device=trace.device)
    crow, rows_sorted, ds_sorted = csr_by_neuron(rows, neurons, ds.float(), n_out)
    sparse_weight_grad_kernel[(n_out, triton.cdiv(n_in, block_in))](
        trace, ds_sorted, rows_sorted, crow, out, n_in, BLOCK_E=block_e, BLOCK_IN=block_in,
    )
    return out


def sparse_weight_grad_reference(trace, ds, rows, neurons, n_out):
    """Plain torch, float64: index_add of ds-scaled trace rows."""
    trace = trace.reshape(-1, trace.shape[-1]).double()
    out = torch.zeros(n_out, trace.shape[1], dtype=torch.float64, device=trace.device)
    return out.index_add_(0, neurons, trace[rows] * ds.double()[:, None])
