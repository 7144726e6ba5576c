"""Sparse weight (and bias) gradient: dW = sum over active (t, b, i) of ds * eps[t, b, :] (eq. 25-26).

Format: CSR by output neuron. The active entries are sorted by neuron (a stable sort of the
time-ordered set), so one program owns one output neuron i and BLOCK_IN input columns and walks
that neuron's entries BLOCK_E at a time. Why this format: LocalZO activity is scattered (measured:
16 x 16 blocks are ~72 % non-empty at 0.5 % density, so block formats save little), while the
entries of one neuron are independent rows of the trace; grouping by neuron gives each program a
private output row, so the sum is deterministic without float atomics, and the work is
nnz x N_in instead of T B N_out N_in.

The input trace eps is never materialised: only its checkpoints C[c] = eps[c K - 1] are
(`time_filter.trace_checkpoints`, T / K rows), and the kernel rebuilds each entry's trace row from
C[t // K] and at most K input rows: eps[t] = x[t] + beta (... (x[cK] + beta C[c])).
With `bias`, the program of the first column block also sums ds * gain(t) into db[i]
(gain(t) = sum_{k<=t} beta^(t-k), the trace of a constant input 1), in the same fixed order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .time_filter import trace_checkpoints

#: time steps per trace checkpoint: memory T B N_in / K, on average (K - 1) / 2 + 2 rows read per active
#: entry (8: an eighth of the trace's memory; 16 would halve that but read 1.7x the rows)
CHECKPOINT_STEPS = 8


@triton.jit
def sparse_weight_grad_kernel(x_ptr, ckpt_ptr, ds_ptr, gain_ptr, rows_ptr, crow_ptr, out_ptr, bias_ptr,
                              n_in, batch, beta, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                              BLOCK_E: tl.constexpr, BLOCK_IN: tl.constexpr):
    neuron = tl.program_id(0).to(tl.int64)
    col_block = tl.program_id(1)
    cols = (col_block * BLOCK_IN + tl.arange(0, BLOCK_IN)).to(tl.int64)
    col_mask = cols < n_in
    start = tl.load(crow_ptr + neuron)
    end = tl.load(crow_ptr + neuron + 1)
    acc = tl.zeros([BLOCK_IN], tl.float32)
    bias_acc = tl.zeros([BLOCK_E], tl.float32)
    for first in range(start, end, BLOCK_E):
        entries = first + tl.arange(0, BLOCK_E)
        entry_mask = entries < end
        rows = tl.load(rows_ptr + entries, mask=entry_mask, other=0).to(tl.int64)
        ds = tl.load(ds_ptr + entries, mask=entry_mask, other=0.0)
        t = rows // batch
        b = rows - t * batch
        chunk = t // K
        tile_mask = entry_mask[:, None] & col_mask[None, :]
        trace = tl.load(ckpt_ptr + ((chunk * batch + b) * n_in)[:, None] + cols[None, :], mask=tile_mask, other=0.0)
        for j in tl.static_range(K):
            k = chunk * K + j
            live = entry_mask & (k <= t)
            x = tl.load(x_ptr + ((k * batch + b) * n_in)[:, None] + cols[None, :],
                        mask=live[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
            trace = tl.where(live[:, None], beta * trace + x, trace)
        acc += tl.sum(trace * ds[:, None], axis=0)
        if HAS_BIAS:
            bias_acc += ds * tl.load(gain_ptr + entries, mask=entry_mask, other=0.0)
    tl.store(out_ptr + neuron * n_in + cols, acc, mask=col_mask)
    if HAS_BIAS:
        if col_block == 0:
            tl.store(bias_ptr + neuron, tl.sum(bias_acc, axis=0))


def group_by(keys: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pointer, order): entries grouped by key in 0..count-1 by a stable sort; group g is
    order[pointer[g]:pointer[g + 1]] (deterministic, no host sync)."""
    sorted_keys, order = torch.sort(keys, stable=True)
    bounds = torch.arange(count + 1, dtype=sorted_keys.dtype, device=keys.device)
    return torch.searchsorted(sorted_keys, bounds), order


def trace_gain(rows: torch.Tensor, batch: int, beta: float) -> torch.Tensor:
    """gain(t) = sum_{k<=t} beta^(t-k) at each entry's row (t = row // batch), float64 then float32."""
    steps = torch.div(rows, batch, rounding_mode="floor").double() + 1.0
    if beta == 1.0:
        return steps.float()
    return ((1.0 - torch.pow(torch.full_like(steps, beta), steps)) / (1.0 - beta)).float()


def sparse_weight_grad(x: torch.Tensor, ds: torch.Tensor, rows: torch.Tensor, neurons: torch.Tensor, n_out: int,
                       beta: float, bias: bool = False, block_e: int = 32, block_in: int = 128):
    """(dW (n_out, N_in), db (n_out,) or None), float32, from the input x (T, B, N_in) and the active
    entries (rows of the (T * B) grid, output neurons, ds)."""
    x = x.contiguous()
    steps, batch, n_in = x.shape
    out = torch.empty(n_out, n_in, dtype=torch.float32, device=x.device)
    db = torch.empty(n_out, dtype=torch.float32, device=x.device) if bias else out
    crow, order = group_by(neurons, n_out)
    rows_sorted = rows[order].contiguous()
    ds_sorted = ds.float()[order].contiguous()
    gain = trace_gain(rows_sorted, batch, beta) if bias else ds_sorted
    checkpoints = trace_checkpoints(x, beta, CHECKPOINT_STEPS)
    if n_out and n_in:
        sparse_weight_grad_kernel[(n_out, triton.cdiv(n_in, block_in))](
            x, checkpoints, ds_sorted, gain, rows_sorted, crow, out, db, n_in, batch, float(beta),
            K=CHECKPOINT_STEPS, HAS_BIAS=bias, BLOCK_E=block_e, BLOCK_IN=block_in,
        )
    return out, (db if bias else None)


def sparse_weight_grad_reference(x, ds, rows, neurons, n_out, beta):
    """Plain torch, float64: (dW, db) by index_add of ds-scaled trace rows and gains."""
    from .time_filter import time_filter_reference

    trace = time_filter_reference(x, beta).reshape(-1, x.shape[-1])
    ds = ds.double()
    grad_w = torch.zeros(n_out, trace.shape[1], dtype=torch.float64, device=x.device)
    grad_w.index_add_(0, neurons, trace[rows] * ds[:, None])
    ones = torch.ones(x.shape[0], x.shape[1], 1, dtype=torch.float64, device=x.device)
    gain = time_filter_reference(ones, beta).reshape(-1)[rows]
    grad_b = torch.zeros(n_out, dtype=torch.float64, device=x.device).index_add_(0, neurons, gain * ds)
    return grad_w, grad_b
