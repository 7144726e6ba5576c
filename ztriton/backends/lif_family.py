"""Ops of the LIF family (DESIGN.md section 9) and their torch implementations, the reference.

    I[t] = W x[t] (+ b) (+ V s[t-1], recurrent)
    subtract: u[t] = beta u[t-1] + I[t] - theta s[t-1]     leak factor a[t] = beta
    zero:     u[t] = beta (1 - s[t-1]) u[t-1] + I[t]       leak factor a[t] = beta (1 - s[t-1])
    s[t] = H(u[t] - theta), theta per neuron, u[-1] = s[-1] = 0; the reset factor is held constant in backward.

- `lif_family_forward`: spikes, g (dense or as the active set) and, at the entries with g != 0,
  the forward traces the parameter gradients need: M (d u / d beta, filtered by a), S (the
  filtered own spikes, for theta under the subtractive reset) and the neuron's last spike
  before the entry (the restart of the filters under reset to zero).
- `lif_adjoint`: the reverse walk delta[t] = ds[t] + a[t+1] delta[t+1] per batch row with the
  recurrent term e[t] = dL/ds[t] + V^T delta[t+1] evaluated at the active entries only; gives ds
  there and dL/dx = delta W at the upstream targets (or the delta grid).
- `lif_adjoint_grid`: the same walk on the full grid (the dense path).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..events import dense
from ..rng import PhiloxKey
from ..sparse import ActiveSet
from .base import LIFConfig, Workspace, compute_dtype
from .lif_forward import FORWARD_CHUNK, active_set, chunk_current
from .registry import register


class FamilyTraces(NamedTuple):
    """Forward traces aligned with the active set (vectors) or with a dense g (grids); None when not
    needed: `leak` M for a learnable beta, `reset` S for a learnable theta with the subtractive
    reset, `last_spike` (int64, -1: none; sparse only) for reset to zero."""

    leak: torch.Tensor | None
    reset: torch.Tensor | None
    last_spike: torch.Tensor | None


class FamilyForward(NamedTuple):
    """A family forward's result: spikes (layer dtype), dense g (surrogate rule) or the active set, traces."""

    spikes: torch.Tensor
    g: torch.Tensor | None
    active: ActiveSet | None
    traces: FamilyTraces


@register("lif_family_forward", "torch")
def lif_family_forward(x, weight, bias, recurrent_weight, threshold, cfg: LIFConfig, needs_grad: bool,
                       key: PhiloxKey | None, workspace: Workspace) -> FamilyForward:
    """(spikes, g, active, traces) of the family's dynamics (module docstring) with per-neuron
    `threshold` (compute dtype, already floored). The feed-forward current is formed FORWARD_CHUNK
    steps at a time in the layer's dtype (events while sparse), the recurrent one step by step from
    the layer's own spikes; membrane, traces and g in compute_dtype. LocalZO draws by the RNG
    contract at each entry's flat position, as `lif_forward`."""
    x = dense(x)
    steps, batch, _ = x.shape
    n_out, device = weight.shape[0], weight.device
    rule, dtype, beta, zero_reset = cfg.rule, compute_dtype(weight.dtype), cfg.beta, cfg.reset == "zero"
    spikes = torch.empty(steps, batch, n_out, dtype=weight.dtype, device=device)
    dense_g = needs_grad and rule.grad == "surrogate"
    want_leak, want_reset = needs_grad and cfg.trace_leak, needs_grad and cfg.trace_reset
    want_last = needs_grad and zero_reset and not dense_g
    g = torch.empty(spikes.shape, dtype=dtype, device=device) if dense_g else None
    leak_grid = torch.empty(spikes.shape, dtype=dtype, device=device) if dense_g and want_leak else None
    reset_grid = torch.empty(spikes.shape, dtype=dtype, device=device) if dense_g and want_reset else None
    chunk = min(steps, FORWARD_CHUNK)
    current = workspace.get("family_current", (chunk, batch, n_out), weight.dtype, device)
    v_chunk = workspace.get("family_v", (chunk, batch, n_out), dtype, device)
    m_chunk = workspace.get("family_m", (chunk, batch, n_out), dtype, device) if want_leak else None
    s_chunk = workspace.get("family_s", (chunk, batch, n_out), dtype, device) if want_reset else None
    r_chunk = workspace.get("family_r", (chunk, batch, n_out), torch.int64, device) if want_last else None
    u = torch.zeros(batch, n_out, dtype=dtype, device=device)
    s_prev = torch.zeros(batch, n_out, dtype=dtype, device=device)
    leak_trace = torch.zeros_like(u) if want_leak else None
    reset_trace = torch.zeros_like(u) if want_reset else None
    last = torch.full((batch, n_out), -1, dtype=torch.int64, device=device) if want_last else None
    recurrent_t = recurrent_weight.t().to(dtype) if recurrent_weight is not None else None
    bias_c = bias.to(dtype) if bias is not None else None
    indices, grads, leaks, resets, lasts = [], [], [], [], []
    sparse_input, table = True, weight.t().contiguous()
    for start in range(0, steps, FORWARD_CHUNK):
        stop = min(steps, start + FORWARD_CHUNK)
        sparse_input = chunk_current(x, weight, start, stop, sparse_input, table, current[: stop - start])
        for t in range(start, stop):
            i_t = current[t - start].to(dtype)
            if bias_c is not None:
                i_t = i_t + bias_c
            if recurrent_t is not None:
                i_t = i_t + s_prev.matmul(recurrent_t)
            keep = 1.0 - s_prev if zero_reset else None
            if want_leak:  # M[t] = a[t] M[t-1] + p[t], p = du/dbeta
                p = u * keep if zero_reset else u
                leak_trace = beta * (leak_trace * keep if zero_reset else leak_trace) + p
                m_chunk[t - start] = leak_trace
            if want_reset:  # S[t] = beta S[t-1] + s[t-1]
                reset_trace = beta * reset_trace + s_prev
                s_chunk[t - start] = reset_trace
            if want_last:
                last = torch.where(s_prev > 0, t - 1, last)
                r_chunk[t - start] = last
            u = beta * (u * keep) + i_t if zero_reset else beta * u + i_t - threshold * s_prev
            v = v_chunk[t - start]
            torch.sub(u, threshold, out=v)
            s_prev = (v > 0).to(dtype)
            spikes[t] = s_prev
        v = v_chunk[: stop - start]
        if dense_g:
            g[start:stop] = rule.law.expected_grad(v, rule.delta)
            if want_leak:
                leak_grid[start:stop] = m_chunk[: stop - start]
            if want_reset:
                reset_grid[start:stop] = s_chunk[: stop - start]
        elif needs_grad:
            base = start * batch * n_out
            found = active_set(v, rule, key, base)
            indices.append(found.index + base)
            grads.append(found.grad)
            if want_leak:
                leaks.append(m_chunk[: stop - start].reshape(-1)[found.index])
            if want_reset:
                resets.append(s_chunk[: stop - start].reshape(-1)[found.index])
            if want_last:
                lasts.append(r_chunk[: stop - start].reshape(-1)[found.index])
    if not needs_grad:
        return FamilyForward(spikes, None, None, FamilyTraces(None, None, None))
    if dense_g:
        return FamilyForward(spikes, g, None, FamilyTraces(leak_grid, reset_grid, None))
    active = ActiveSet(torch.cat(indices), torch.cat(grads), spikes.shape) if indices else ActiveSet.empty(spikes.shape, device)
    return FamilyForward(spikes, None, active, FamilyTraces(_joined(leaks, want_leak, dtype, device),
                                                            _joined(resets, want_reset, dtype, device),
                                                            _joined(lasts, want_last, torch.int64, device)))


def _joined(parts: list, wanted: bool, dtype: torch.dtype, device) -> torch.Tensor | None:
    """A wanted trace's per-chunk pieces as one tensor (empty when T = 0), else None."""
    if not wanted:
        return None
    return torch.cat(parts) if parts else torch.zeros(0, dtype=dtype, device=device)


@register("lif_adjoint", "torch")
def lif_adjoint(ext, active: ActiveSet, beta: float, reset_spikes, recurrent_weight, weight, targets: ActiveSet | None,
                full_grid: bool, workspace: Workspace):
    """(ds at the active entries, dL/dx at `targets` or None, the delta grid or None).

    `ext` is dL/ds from downstream at the active entries, `reset_spikes` the layer's spikes under
    reset to zero (else None), `recurrent_weight` V or None. Per step from the end:
    e = ext + V^T delta[t+1] at the step's active entries, ds = g e, delta[t] = ds[t] + a[t+1] delta[t+1];
    then dL/dx[t] = delta[t] W at the targets of step t (or delta[t] into the grid with `full_grid`).
    """
    steps, batch, width = active.shape
    dtype = ext.dtype
    delta = torch.zeros(batch, width, dtype=dtype, device=ext.device)
    ds = torch.empty_like(ext)
    per_step = torch.arange(steps + 1, device=ext.device) * batch
    bounds = torch.searchsorted(active.index, per_step * width).tolist()
    rows, neurons, g = active.rows, active.neurons, active.grad.to(dtype)
    recurrent_t = recurrent_weight.t().to(dtype).contiguous() if recurrent_weight is not None else None
    grid = torch.empty(active.shape, dtype=dtype, device=ext.device) if full_grid else None
    out = target_bounds = weight_t = None
    if targets is not None:
        out = torch.empty(targets.nnz, dtype=dtype, device=ext.device)
        target_bounds = torch.searchsorted(targets.rows, per_step).tolist()
        weight_t = weight.t().to(dtype).contiguous()
    for t in range(steps - 1, -1, -1):
        lo, hi = bounds[t], bounds[t + 1]
        b, j = rows[lo:hi] - t * batch, neurons[lo:hi]
        e = ext[lo:hi]
        if recurrent_t is not None:  # delta holds delta[t+1]: (V^T delta[t+1])[j] = V[:, j] . delta[t+1]
            e = e + (delta[b] * recurrent_t[j]).sum(1)
        ds[lo:hi] = g[lo:hi] * e
        delta.mul_(beta)
        if reset_spikes is not None:
            delta.mul_(1.0 - reset_spikes[t].to(dtype))
        delta.index_put_((b, j), ds[lo:hi], accumulate=True)
        if grid is not None:
            grid[t] = delta
        if targets is not None:
            first, last = target_bounds[t], target_bounds[t + 1]
            tb = targets.rows[first:last] - t * batch
            out[first:last] = (delta[tb] * weight_t[targets.neurons[first:last]]).sum(1)
    return ds, out, grid


@register("lif_adjoint_grid", "torch")
def lif_adjoint_grid(ext, g, beta: float, reset_spikes, recurrent_weight):
    """(delta, ds) on the full grid from dL/ds `ext` and g, as `lif_adjoint` (the dense path)."""
    steps = ext.shape[0]
    delta = torch.empty_like(ext)
    ds = torch.empty_like(ext)
    recurrent = recurrent_weight.to(ext.dtype) if recurrent_weight is not None else None
    after = torch.zeros_like(ext[0])  # delta[t+1]
    for t in range(steps - 1, -1, -1):
        e = ext[t] if recurrent is None else ext[t] + after.matmul(recurrent)
        torch.mul(g[t], e, out=ds[t])
        leak = after * beta
        if reset_spikes is not None:
            leak = leak * (1.0 - reset_spikes[t].to(ext.dtype))
        torch.add(ds[t], leak, out=delta[t])
        after = delta[t]
    return delta, ds
