"""The SparseLIFLinear op: LIF forward (eq. 1) with g, and its dense or sparse layerwise backward.

Forward: `backend.lif_forward` gives the spikes and g (dense, or as the active set); the path
policy picks "dense" or "sparse" from the measured active fraction. Backward (appendix B.1,
eq. 25-26), ds = grad_s * g:

- dense path: D = reverse-time filter of ds on the whole grid, dW = D^T x, dx = D W (GEMMs);
- sparse path: ds only at the active entries, dW and db by `backend.weight_grad` (nnz x N_in work).

The input gradient is a sparse COO tensor at the producing layer's active entries when x is the
unmodified output of a sparse-path SparseLIFLinear (`ztriton.sparse`), else dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backends import Backend, LIFConfig, Workspace, compute_dtype
from ..events import call_input, dense
from ..rng import PhiloxKey
from ..sparse import ActiveSet, producer_of, sparse_grad, values_at
from .common import input_grad_from_filtered, refuse_double_backward, without_autocast


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
    """What one forward measured. `ops` names the implementation of each op this call runs (its
    backward's too); `active` is the active set kept for a sparse-path backward."""

    path: str
    active_fraction: float | None
    nnz: int
    saved_bytes: int
    backend: str
    grid: int
    ops: dict
    active: ActiveSet | None = None


def planned_ops(backend: Backend, cfg: LIFConfig, path: str, needs_grad: bool, input_grad: bool,
                from_producer: bool) -> dict:
    """{op: implementation} of one call: the forward and, for a training call, the backward's ops.

    The input gradient at a producing layer's active entries is the backend's; a dense input
    gradient (and the dense path's weight gradient) is a torch GEMM after a time filter.
    """
    def impl(op: str) -> str:
        return backend.implementation(op, cfg.rule, needs_grad)

    ops = {"forward": impl("lif_forward")}
    if not needs_grad:
        return ops
    if path == "dense":
        ops.update(time_filter=impl("time_filter"), weight_grad="torch")
    else:
        ops["weight_grad"] = impl("weight_grad")
    if input_grad and from_producer:
        ops["input_grad"] = impl("input_grad_at" if path == "dense" else "input_grad")
    elif input_grad:
        ops.setdefault("time_filter", impl("filtered_grad"))
        ops["input_grad"] = "torch"
    return ops


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
        spikes, g, active = backend.lif_forward(x, weight, bias, cfg, needs_grad, key, workspace)
        if not needs_grad:
            ops = planned_ops(backend, cfg, "none", False, False, False)
            return spikes, LIFStats("none", None, 0, 0, backend.name, spikes.numel(), ops)
        nnz = active.nnz if active is not None else int(torch.count_nonzero(g))
        fraction = nnz / max(1, spikes.numel())
        path = policy(fraction)
        if path == "dense" and g is None:
            g = active.dense().to(compute_dtype(weight.dtype))
        if path == "sparse" and active is None:
            index = torch.nonzero(g.view(-1)).squeeze(1)
            active, g = ActiveSet(index, g.view(-1)[index], g.shape), None
        if path == "dense":
            active = None
        ctx.cfg, ctx.path, ctx.has_bias = cfg, path, bias is not None
        ctx.backend, ctx.workspace, ctx.active = backend, workspace, active
        ctx.producer = producer
        ctx.save_for_backward(x, weight, g)
        saved = active.nbytes if active is not None else g.numel() * g.element_size()
        ops = planned_ops(backend, cfg, path, True, ctx.needs_input_grad[0], producer is not None)
        return spikes, LIFStats(path, fraction, nnz, saved, backend.name, spikes.numel(), ops, active)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_spikes, _stats):
        refuse_double_backward("SparseLIFLinear")
        x, weight, g = ctx.saved_tensors
        dtype = compute_dtype(weight.dtype)
        step = _dense_backward if ctx.path == "dense" else _sparse_backward
        grad_x, grad_w, grad_b = step(ctx, grad_spikes, x, weight, g, dtype)
        grad_b = None if grad_b is None else grad_b.to(weight.dtype)
        return grad_x, grad_w.to(weight.dtype), grad_b, None, None, None, None, None, None


def _dense_backward(ctx, grad_spikes, x, weight, g, dtype):
    """GEMMs over the whole grid: D = reverse filter of grad_s * g, dW = D^T x, dx = D W."""
    ds = dense(grad_spikes).to(dtype) * g
    filtered = ctx.backend.time_filter(ds, ctx.cfg.beta, reverse=True)
    flat = filtered.view(-1, filtered.shape[2])
    grad_w = flat.t().matmul(dense(x).reshape(-1, x.shape[2]).to(dtype))
    grad_b = flat.sum(0) if ctx.has_bias else None
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = input_grad_from_filtered(filtered, weight, x, ctx.producer, ctx.backend, ctx.workspace)
    return grad_x, grad_w, grad_b


def _sparse_backward(ctx, grad_spikes, x, weight, g, dtype):
    """Work at the active entries only (and at the producing layer's active entries for dx)."""
    active, backend, workspace, beta = ctx.active, ctx.backend, ctx.workspace, ctx.cfg.beta
    ds = values_at(grad_spikes, active, dtype) * active.grad.to(dtype)
    grad_w, grad_b = backend.weight_grad(ds, active, x, beta, weight.shape, ctx.has_bias, workspace)
    if not ctx.needs_input_grad[0]:
        grad_x = None
    elif ctx.producer is not None:
        values = backend.input_grad(ds, active, beta, weight, ctx.producer, workspace)
        grad_x = sparse_grad(ctx.producer, values, x.dtype)
    else:
        filtered = backend.filtered_grad(ds, active, beta)
        grad_x = input_grad_from_filtered(filtered, weight, x, None, backend, workspace)
    return grad_x, grad_w, grad_b
