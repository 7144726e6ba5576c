"""The LIF family op (DESIGN.md section 9): recurrent layers, reset to zero, learnable leak and
threshold, with an exact dense or sparse layerwise backward.

Forward: op `lif_family_forward` (spikes, g or the active set, and the forward traces at the
active entries). Backward, ds = g e with e = dL/ds (+ V^T delta[t+1], recurrent):

- dense path: the adjoint walk on the whole grid (op `lif_adjoint_grid`), then GEMMs: dW = delta^T x,
  dV = delta[t]^T s[t-1], dx = delta W;
- sparse path: ds at the active entries only (op `lif_adjoint` where the recurrence or the restart
  of the filter needs the walk, else ds = g e directly); dW, db and dV by op `weight_grad` over
  the active entries, under reset to zero with the restart at the neuron's last spike r before
  each entry t' written as one more entry (r, b, j) of weight -ds beta^(t'-r) (the trace
  eps[t'] - beta^(t'-r) eps[r]); dV is the same sum over the layer's own spikes, one step later.

Leak and threshold, at the active entries (dense path: everywhere g != 0):
dL/dbeta = sum ds M, dL/dtheta_j = -sum_j ds (1 + S) (subtract) or -sum_j ds (zero).
"""

from __future__ import annotations

import torch

from ..backends import Backend, LIFConfig, Workspace, compute_dtype
from ..backends.lif_family import FamilyTraces
from ..boundary import eager_under_compile
from ..events import call_input, dense, kept_for_backward
from ..rng import PhiloxKey
from ..sparse import ActiveSet, producer_of, sparse_grad, values_at
from .common import input_grad_from_filtered, refuse_double_backward, run_op, without_autocast
from .lif_linear import LIFStats, PathPolicy, measured_path


def _last_spikes_at(spikes: torch.Tensor, active: ActiveSet) -> torch.Tensor:
    """The last step before each active entry at which its neuron spiked (-1: none), from the spike grid."""
    steps = torch.arange(spikes.shape[0], device=spikes.device).view(-1, 1, 1)
    fired = torch.where(spikes > 0, steps, -1)
    last = torch.cummax(fired, 0).values  # last spike at or before t
    before = torch.cat([torch.full_like(last[:1], -1), last[:-1]])
    return before.view(-1)[active.index]


def _sparse_traces(traces: FamilyTraces, active: ActiveSet, spikes: torch.Tensor, zero_reset: bool) -> FamilyTraces:
    """Grids of a dense-g forward gathered at `active` (the sparse path of the surrogate rule)."""
    pick = lambda grid: None if grid is None else grid.view(-1)[active.index]  # noqa: E731
    last = _last_spikes_at(spikes, active) if zero_reset else None
    return FamilyTraces(pick(traces.leak), pick(traces.reset), last)


def _dense_traces(traces: FamilyTraces, active: ActiveSet) -> FamilyTraces:
    """Vectors at `active` scattered on the grid (the dense path of a sparse forward; zero elsewhere, where g is)."""
    def grid(values):
        if values is None:
            return None
        out = torch.zeros(active.shape, dtype=values.dtype, device=values.device)
        return out.view(-1).index_copy_(0, active.index, values).view(active.shape)
    return FamilyTraces(grid(traces.leak), grid(traces.reset), None)


class LIFFamilyFunction(torch.autograd.Function):
    """apply(x, weight, bias, recurrent_weight, beta, threshold, cfg, policy, needs_grad, key, backend,
    workspace) -> (spikes, LIFStats).

    `beta` is None or the 0-dim tensor of a learnable leak (cfg.beta is its value), `threshold` the
    per-neuron (N,) threshold (already floored); the others as in `LIFFunction`.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, x, weight, bias, recurrent_weight, beta, threshold, cfg: LIFConfig, policy: PathPolicy,
                needs_grad: bool, key: PhiloxKey | None, backend: Backend, workspace: Workspace):
        producer = producer_of(x) if ctx.needs_input_grad[0] else None
        x = call_input(x)
        dtype = compute_dtype(weight.dtype)
        ops = {}
        spikes, g, active, traces = run_op(ops, "forward", "lif_family_forward", backend, x, weight, bias,
                                           recurrent_weight, threshold.detach().to(dtype), cfg, needs_grad, key,
                                           workspace)
        if not needs_grad:
            return spikes, LIFStats("none", None, 0, 0, backend.name, spikes.numel(), ops)
        nnz, fraction, path = measured_path(policy, spikes, g, active)
        zero_reset = cfg.reset == "zero"
        if path == "dense" and g is None:
            g, traces = active.dense().to(dtype), _dense_traces(traces, active)
        if path == "sparse" and active is None:
            index = torch.nonzero(g.view(-1)).squeeze(1)
            active = ActiveSet(index, g.view(-1)[index], g.shape)
            traces, g = _sparse_traces(traces, active, spikes, zero_reset), None
        if path == "dense":
            active = None
        ctx.cfg, ctx.path, ctx.has_bias = cfg, path, bias is not None
        ctx.backend, ctx.workspace, ctx.active, ctx.traces = backend, workspace, active, traces
        ctx.producer, ctx.ops = producer, ops
        # the sparse path reads x, and its own spikes but for the reset to zero, through their events:
        # the dense tensors may be freed (x's only where a native forward read it through them)
        sparse = path == "sparse"
        kept_x = kept_for_backward(x) if sparse and ops["forward"] == "native" else x
        kept_spikes = kept_for_backward(spikes) if sparse and not zero_reset else spikes
        ctx.kept = (None if kept_x is x else kept_x, None if kept_spikes is spikes else kept_spikes)
        ctx.save_for_backward(x if kept_x is x else None, weight, recurrent_weight,
                              spikes if kept_spikes is spikes else None, g)
        kept = [t for t in (g, *traces) if t is not None]
        saved = (active.nbytes if active is not None else 0) + sum(t.numel() * t.element_size() for t in kept)
        return spikes, LIFStats(path, fraction, nnz, saved, backend.name, spikes.numel(), ops, active)

    @staticmethod
    @eager_under_compile
    @without_autocast
    def backward(ctx, grad_spikes, _stats):
        refuse_double_backward("SparseLIFLinear")
        x, weight, recurrent_weight, spikes, g = ctx.saved_tensors
        x = ctx.kept[0] if x is None else x
        spikes = ctx.kept[1] if spikes is None else spikes
        dtype = compute_dtype(weight.dtype)
        step = _dense_backward if ctx.path == "dense" else _sparse_backward
        grad_x, grad_w, grad_b, grad_v, ds = step(ctx, grad_spikes, x, weight, recurrent_weight, spikes, g, dtype)
        grad_beta, grad_theta = _leak_and_threshold(ctx, ds)
        grad_b = grad_b.to(weight.dtype) if grad_b is not None and ctx.needs_input_grad[2] else None
        grad_v = grad_v.to(recurrent_weight.dtype) if grad_v is not None else None
        return grad_x, grad_w.to(weight.dtype), grad_b, grad_v, grad_beta, grad_theta, *(None,) * 6


def _leak_and_threshold(ctx, ds):
    """(dL/dbeta as a 0-dim tensor, dL/dtheta (N,)) from ds and the forward traces (module docstring)."""
    traces, zero_reset = ctx.traces, ctx.cfg.reset == "zero"
    grad_beta = grad_theta = None
    if ctx.needs_input_grad[4]:
        grad_beta = (ds * traces.leak).sum()
    if ctx.needs_input_grad[5]:
        weight_of = ds if zero_reset else ds * (1.0 + traces.reset)
        if ctx.path == "dense":
            grad_theta = -weight_of.sum((0, 1))
        else:
            n_out = ctx.active.shape[2]
            grad_theta = -torch.zeros(n_out, dtype=ds.dtype, device=ds.device).index_add_(0, ctx.active.neurons,
                                                                                            weight_of)
    return grad_beta, grad_theta


def _dense_backward(ctx, grad_spikes, x, weight, recurrent_weight, spikes, g, dtype):
    """The adjoint walk on the whole grid, then GEMMs."""
    cfg = ctx.cfg
    ext = dense(grad_spikes).to(dtype, copy=True)
    reset_spikes = spikes if cfg.reset == "zero" else None
    delta, ds = run_op(ctx.ops, "adjoint", "lif_adjoint_grid", ctx.backend, ext, g, cfg.beta, reset_spikes,
                       recurrent_weight)
    flat = delta.view(-1, delta.shape[2])
    grad_w = flat.t().matmul(dense(x).reshape(-1, x.shape[2]).to(dtype))
    ctx.ops["weight_grad"] = "torch"
    grad_v = None
    if recurrent_weight is not None:
        width = spikes.shape[2]
        grad_v = delta[1:].reshape(-1, width).t().matmul(spikes[:-1].reshape(-1, width).to(dtype))
        ctx.ops["recurrent_weight_grad"] = "torch"
    grad_b = flat.sum(0) if ctx.has_bias else None
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = input_grad_from_filtered(delta, weight, x, ctx.producer, ctx.backend, ctx.workspace, ctx.ops)
    return grad_x, grad_w, grad_b, grad_v, ds


def restarted_entries(active: ActiveSet, ds: torch.Tensor, last_spike: torch.Tensor, beta: float
                      ) -> tuple[ActiveSet, torch.Tensor]:
    """The active entries with ds plus, for each entry (t', b, j) whose neuron spiked at r < t',
    an entry (r, b, j) with -ds beta^(t'-r): summed over the input trace, these give the restarted
    trace eps[t'] - beta^(t'-r) eps[r] of reset to zero. Sorted, duplicates summed."""
    _, batch, width = active.shape
    has = last_spike >= 0
    lag = active.coo_indices[0][has] - last_spike[has]
    decay = torch.pow(torch.tensor(beta, dtype=torch.float64, device=ds.device), lag.double()).to(ds.dtype)
    index = torch.cat([active.index, active.index[has] - lag * (batch * width)])
    values = torch.cat([ds, -ds[has] * decay])
    merged = torch.sparse_coo_tensor(index.unsqueeze(0), values, (active.shape.numel(),), check_invariants=False).coalesce()
    values = merged.values()
    return ActiveSet(merged.indices()[0], values, active.shape), values


def delayed_entries(entries: ActiveSet, values: torch.Tensor) -> tuple[ActiveSet, torch.Tensor]:
    """The entries one step earlier (those at t = 0 dropped): the trace of s[t-1] at t is that of s at t - 1."""
    _, batch, width = entries.shape
    keep = entries.index >= batch * width
    return ActiveSet(entries.index[keep] - batch * width, values[keep], entries.shape), values[keep]


def _sparse_backward(ctx, grad_spikes, x, weight, recurrent_weight, spikes, g, dtype):
    """Work at the active entries only (and at the producing layer's active entries for dx)."""
    cfg, active, backend, workspace, ops = ctx.cfg, ctx.active, ctx.backend, ctx.workspace, ctx.ops
    zero_reset = cfg.reset == "zero"
    ext = values_at(grad_spikes, active, dtype)
    wants_dx = ctx.needs_input_grad[0]
    walk = recurrent_weight is not None or (zero_reset and wants_dx)
    at_targets = grid = None
    if walk:
        ds, at_targets, grid = run_op(ops, "adjoint", "lif_adjoint", backend, ext, active, cfg.beta,
                                      spikes if zero_reset else None, recurrent_weight, weight,
                                      ctx.producer if wants_dx else None, wants_dx and ctx.producer is None, workspace)
    else:
        ds = ext * active.grad.to(dtype)
    entries, values = restarted_entries(active, ds, ctx.traces.last_spike, cfg.beta) if zero_reset else (active, ds)
    grad_w, grad_b = run_op(ops, "weight_grad", "weight_grad", backend, values, entries, x, cfg.beta, weight.shape,
                            ctx.has_bias, workspace)
    grad_v = None
    if recurrent_weight is not None:
        earlier, shifted = delayed_entries(entries, values)
        grad_v, _ = run_op(ops, "recurrent_weight_grad", "weight_grad", backend, shifted, earlier, spikes, cfg.beta,
                           recurrent_weight.shape, False, workspace)
    grad_x = _input_grad(ctx, x, weight, ds, walk, at_targets, grid) if wants_dx else None
    return grad_x, grad_w, grad_b, grad_v, ds


def _input_grad(ctx, x, weight, ds, walk: bool, at_targets, grid):
    """dL/dx = delta W: from the walk's values at the upstream targets or its delta grid, else (no walk:
    the plain model's filter) by the plain model's ops."""
    backend, workspace, ops, active, beta = ctx.backend, ctx.workspace, ctx.ops, ctx.active, ctx.cfg.beta
    if walk and ctx.producer is not None:
        return sparse_grad(ctx.producer, at_targets, x.dtype)
    if walk:
        return input_grad_from_filtered(grid, weight, x, None, backend, workspace, ops)
    if ctx.producer is not None:
        values = run_op(ops, "input_grad", "input_grad", backend, ds, active, beta, weight, ctx.producer, workspace)
        return sparse_grad(ctx.producer, values, x.dtype)
    filtered = run_op(ops, "time_filter", "filtered_grad", backend, ds, active, beta)
    return input_grad_from_filtered(filtered, weight, x, None, backend, workspace, ops)
