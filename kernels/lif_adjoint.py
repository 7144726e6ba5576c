"""The LIF family's reverse walk at the active entries (DESIGN.md section 9), one program per batch row.

    delta[t] = ds[t] + a[t+1] delta[t+1],  delta[T] = 0,  a[t+1] = beta (subtract), beta (1 - s[t]) (zero)
    e = ext + V^T delta[t+1] at the step's active entries (recurrent),  ds = g e

Program b keeps delta of its whole row in registers (BLOCK_N = next power of two >= N, at most
`lif_family_forward.MAX_WIDTH`) and walks t = T-1 .. 0. The active entries of (t, b) are one
contiguous run of the sorted active set (bounds from the host); BLOCK_E of them at a time it
gathers their columns of V (rows j of V^T, contiguous) as a (BLOCK_E, BLOCK_N) tile, reduces them
against delta[t+1] (the recurrent term: one length-N dot per active entry, nothing dense), forms
ds = g e, and adds ds into the row vector by matching the entries' neurons against the block's
columns. The delta grid is written when asked (the caller's input gradient at the upstream
targets reads it, as the plain model's filtered grid). No atomics: deterministic.

The plain-torch reference is the torch op `lif_adjoint` in `ztriton/backends/lif_family.py`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lif_family_forward import MAX_WIDTH, block_width, num_warps

#: values of V^T per gathered tile (BLOCK_E active entries x BLOCK_N)
TILE_ELEMENTS = 8192


@triton.jit
def lif_adjoint_kernel(ext_ptr, grad_ptr, index_ptr, bounds_ptr, rec_t_ptr, spikes_ptr, ds_ptr, grid_ptr,
                       batch, n_out, steps, beta,
                       RECURRENT: tl.constexpr, ZERO_RESET: tl.constexpr, STORE_GRID: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N).to(tl.int64)
    mask = cols < n_out
    n_cols = batch * n_out
    delta = tl.zeros([BLOCK_N], tl.float32)  # delta[t+1]
    for r in range(steps):
        t = steps - 1 - r
        segment = row + t * batch  # row t * B + b of the (T * B, N) grid: int64
        step_base = segment * n_out
        lo = tl.load(bounds_ptr + segment)
        hi = tl.load(bounds_ptr + segment + 1)
        added = tl.zeros([BLOCK_N], tl.float32)
        for first in range(lo, hi, BLOCK_E):
            entries = first + tl.arange(0, BLOCK_E).to(tl.int64)
            emask = entries < hi
            neuron = tl.load(index_ptr + entries, mask=emask, other=0) - step_base
            e = tl.load(ext_ptr + entries, mask=emask, other=0.0).to(tl.float32)
            if RECURRENT:  # (V^T delta[t+1])[j] = V[:, j] . delta[t+1]
                tile = tl.load(rec_t_ptr + neuron[:, None] * n_out + cols[None, :],
                               mask=emask[:, None] & mask[None, :], other=0.0).to(tl.float32)
                e += tl.sum(tile * delta[None, :], axis=1)
            ds = tl.load(grad_ptr + entries, mask=emask, other=0.0).to(tl.float32) * e
            tl.store(ds_ptr + entries, ds, mask=emask)
            hit = (neuron[:, None] == cols[None, :]) & emask[:, None]
            added += tl.sum(tl.where(hit, ds[:, None], 0.0), axis=0)
        if ZERO_RESET:
            s = tl.load(spikes_ptr + step_base + cols, mask=mask, other=0.0).to(tl.float32)
            delta = beta * (delta * (1.0 - s)) + added
        else:
            delta = beta * delta + added
        if STORE_GRID:
            tl.store(grid_ptr + step_base + cols, delta, mask=mask)


def block_entries(block_n: int) -> int:
    """BLOCK_E: active entries per gathered tile, TILE_ELEMENTS values per tile (at least 1, at most 64)."""
    return max(1, min(64, TILE_ELEMENTS // block_n))


def lif_adjoint(ext, grad, index, shape, beta, *, reset_spikes=None, recurrent_weight=None, store_grid=False):
    """(ds at the active entries, the delta grid (T, B, N) float32 or None) from dL/ds `ext` and g
    `grad` at the active entries (flat `index`, sorted) of a grid of `shape`; `reset_spikes` the
    layer's spikes under reset to zero (else None), `recurrent_weight` V (N, N) or None."""
    steps, batch, n_out = shape
    device = ext.device
    if n_out > MAX_WIDTH:
        raise ValueError(f"width {n_out} exceeds the kernel's MAX_WIDTH {MAX_WIDTH}")
    block = block_width(n_out, True)
    index = index.contiguous()
    bounds = torch.searchsorted(index, torch.arange(steps * batch + 1, device=device, dtype=torch.int64) * n_out)
    ds = torch.empty(index.numel(), dtype=torch.float32, device=device)
    grid = torch.empty(shape, dtype=torch.float32, device=device) if store_grid else None
    rec_t = recurrent_weight.t().contiguous() if recurrent_weight is not None else ds
    spikes = reset_spikes.contiguous() if reset_spikes is not None else ds
    if steps * batch and n_out:
        lif_adjoint_kernel[(batch,)](
            ext.float().contiguous(), grad.float().contiguous(), index, bounds, rec_t, spikes, ds,
            grid if grid is not None else ds, batch, n_out, steps, float(beta),
            RECURRENT=recurrent_weight is not None, ZERO_RESET=reset_spikes is not None, STORE_GRID=store_grid,
            BLOCK_N=block, BLOCK_E=block_entries(block), num_warps=num_warps(block),
        )
    elif grid is not None:
        grid.zero_()
    return ds, grid
