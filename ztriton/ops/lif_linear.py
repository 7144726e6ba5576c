"""The SparseLIFLinear op: LIF forward (eq. 1) with g, and its dense or sparse layerwise backward.

Each op runs on the layer's backend by the op registry (`ztriton.backends.registry`, torch where
the backend has none). Forward: op `lif_forward` gives the spikes and g (dense, or as the active
set); the path policy picks "dense" or "sparse" from the measured active fraction. Backward
(appendix B.1, eq. 25-26), ds = grad_s * g:

- dense path: D = reverse-time filter of ds on the whole grid, dW = D^T x, dx = D W (GEMMs);
- sparse path: ds only at the active entries, dW and db by op `weight_grad` (nnz x N_in work).

The input gradient is a sparse COO tensor at the producing layer's active entries when x is the
unmodified output of a sparse-path SparseLIFLinear (`ztriton.sparse`), else dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import Backend, LIFConfig, Workspace, compute_dtype
from ..boundary import eager_under_compile
from ..events import call_input, dense, kept_for_backward
from ..rng import PhiloxKey
from ..sparse import ActiveSet, producer_of, sparse_grad, values_at
from .common import input_grad_from_filtered, refuse_double_backward, run_op, without_autocast


@dataclass(frozen=True)
class PathPolicy:
    """Dense or sparse path from the active fraction: `forced` if set, else sparse below `crossover`."""

    crossover: float
    forced: str | None = None

    def __call__(self, active_fraction: float) -> str:
        if self.forced is not None:
            return self.forced
        return "sparse" if active_fraction < self.crossover else "dense"


@dataclass(frozen=True)
class LIFStats:
    """What one forward measured. `ops` names the implementation of each op this call ran, filled
    in by its backward too; `active` is the active set kept for a sparse-path backward."""

    path: str
    active_fraction: float | None
    nnz: int
    saved_bytes: int
    backend: str
    grid: int
    ops: dict
    active: ActiveSet | None = None


def measured_path(policy: PathPolicy, spikes: torch.Tensor, g: torch.Tensor | None, active: ActiveSet | None
                  ) -> tuple[int, float, str]:
    """(active entries, active fraction, path) of a training forward: the policy's choice from the activity."""
    nnz = active.nnz if active is not None else int(torch.count_nonzero(g))
    fraction = nnz / max(1, spikes.numel())
    return nnz, fraction, policy(fraction)


class LIFFunction(torch.autograd.Function):
    """apply(x, weight, bias, cfg, policy, needs_grad, key, backend, workspace) -> (spikes, LIFStats).

    `key` is the RNG contract's (seed, offset) for LocalZO (None otherwise); with `needs_grad`
    False (inference) no g is formed and nothing is kept.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, x, weight, bias, cfg: LIFConfig, policy: PathPolicy, needs_grad: bool,
                key: PhiloxKey | None, backend: Backend, workspace: Workspace):
        producer = producer_of(x) if ctx.needs_input_grad[0] else None
        x = call_input(x)  # a user's tensor is scanned for events once per call, never across calls
        ops = {}
        spikes, g, active = run_op(ops, "forward", "lif_forward", backend, x, weight, bias, cfg, needs_grad, key,
                                   workspace)
        if not needs_grad:
            return spikes, LIFStats("none", None, 0, 0, backend.name, spikes.numel(), ops)
        nnz, fraction, path = measured_path(policy, spikes, g, active)
        if path == "dense" and g is None:
            g = active.dense().to(compute_dtype(weight.dtype))
        if path == "sparse" and active is None:
            index = torch.nonzero(g.view(-1)).squeeze(1)
            active, g = ActiveSet(index, g.view(-1)[index], g.shape), None
        if path == "dense":
            active = None
        ctx.cfg, ctx.path, ctx.has_bias = cfg, path, bias is not None
        ctx.backend, ctx.workspace, ctx.active = backend, workspace, active
        ctx.producer, ctx.ops = producer, ops
        # the events a native forward read x through: x itself may be freed (`events.KeptEvents`)
        kept = kept_for_backward(x) if path == "sparse" and ops["forward"] == "native" else x
        ctx.kept_input = None if kept is x else kept
        ctx.save_for_backward(x if kept is x else None, weight, g)
        saved = active.nbytes if active is not None else g.numel() * g.element_size()
        return spikes, LIFStats(path, fraction, nnz, saved, backend.name, spikes.numel(), ops, active)

    @staticmethod
    @eager_under_compile
    @without_autocast
    def backward(ctx, grad_spikes, _stats):
        refuse_double_backward("SparseLIFLinear")
        x, weight, g = ctx.saved_tensors
        x = ctx.kept_input if x is None else x
        dtype = compute_dtype(weight.dtype)
        step = _dense_backward if ctx.path == "dense" else _sparse_backward
        grad_x, grad_w, grad_b = step(ctx, grad_spikes, x, weight, g, dtype)
        grad_b = None if grad_b is None else grad_b.to(weight.dtype)
        return grad_x, grad_w.to(weight.dtype), grad_b, None, None, None, None, None, None


def _dense_backward(ctx, grad_spikes, x, weight, g, dtype):
    """GEMMs over the whole grid: D = reverse filter of grad_s * g, dW = D^T x, dx = D W."""
    ds = dense(grad_spikes).to(dtype) * g
    filtered = run_op(ctx.ops, "time_filter", "time_filter", ctx.backend, ds, ctx.cfg.beta, True)
    flat = filtered.view(-1, filtered.shape[2])
    grad_w = flat.t().matmul(dense(x).reshape(-1, x.shape[2]).to(dtype))
    ctx.ops["weight_grad"] = "torch"
    grad_b = flat.sum(0) if ctx.has_bias else None
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = input_grad_from_filtered(filtered, weight, x, ctx.producer, ctx.backend, ctx.workspace, ctx.ops)
    return grad_x, grad_w, grad_b


def _sparse_backward(ctx, grad_spikes, x, weight, g, dtype):
    """Work at the active entries only (and at the producing layer's active entries for dx)."""
    active, backend, workspace, beta, ops = ctx.active, ctx.backend, ctx.workspace, ctx.cfg.beta, ctx.ops
    ds = values_at(grad_spikes, active, dtype) * active.grad.to(dtype)
    grad_w, grad_b = run_op(ops, "weight_grad", "weight_grad", backend, ds, active, x, beta, weight.shape,
                            ctx.has_bias, workspace)
    if not ctx.needs_input_grad[0]:
        grad_x = None
    elif ctx.producer is not None:
        values = run_op(ops, "input_grad", "input_grad", backend, ds, active, beta, weight, ctx.producer, workspace)
        grad_x = sparse_grad(ctx.producer, values, x.dtype)
    else:
        filtered = run_op(ops, "time_filter", "filtered_grad", backend, ds, active, beta)
        grad_x = input_grad_from_filtered(filtered, weight, x, None, backend, workspace, ops)
    return grad_x, grad_w, grad_b
