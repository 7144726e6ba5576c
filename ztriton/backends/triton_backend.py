"""The Triton backend: a GPU, or the CPU under TRITON_INTERPRET=1 (tests).

Every forward (LocalZO, SparseGrad, surrogate, inference) is one launch of the fused kernel of
`kernels/lif_forward.py` after the input current (a GEMM, or for a sparse COO batch of events the
event-driven kernel of `kernels/event_current.py`); it emits the compact active set itself
(the count is the one host sync of a layer). The backward runs the time filters, the weight
and bias gradient (for a batch of events over its events, D^T x; else CSR by neuron with the input
trace rebuilt in-kernel from checkpoints) and the input gradient at the upstream active entries
as kernels. Launches per layer do not depend on T or on the active
count. Kernels are imported on first use, so this module imports without Triton.

The LIF family (DESIGN.md section 9): `lif_family_forward` (kernels/lif_family_forward.py) and
`lif_adjoint` (kernels/lif_adjoint.py) hold a whole batch row per program, since a recurrent row
exchanges its spikes (forward) and its delta (backward) every step. Up to MAX_WIDTH = 2048 neurons
(the widest block that compiles without register spills for sm_80/sm_90); a recurrent layer wider
than that is declined (`accepts=`) and runs on the torch ops, which `stats["ops"]` then names. A
feed-forward family layer of any width runs the forward kernel in several column blocks per row.
`lif_adjoint_grid` (the dense path) stays on torch.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..events import dense, events_of
from ..distributions import KERNEL_LAWS, kernel_law, kernel_law_refusal
from ..rng import PhiloxKey
from ..sparse import ActiveSet
from .base import LIFConfig, LIFForward, Workspace
from .lif_family import FamilyForward, FamilyTraces
from .registry import register

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: input density up to which a sparse COO input's current is summed over its events, not a GEMM
EVENT_DENSITY = 0.05


def sampler_args(law, device: torch.device) -> dict:
    """The fused kernel's description of a law (`kernel_law`): `dist` code, its parameter, its tables."""
    name = kernel_law(law)
    if name is None:
        raise ValueError(kernel_law_refusal(law, "triton"))
    args = dict(dist=KERNEL_LAWS.index(name))
    if name == "fast_sigmoid":
        args.update(dist_param=law.k * law.delta)
    if name == "table":
        cdf, abs_z = law.sampling_tables(device)
        args.update(cdf=cdf, abs_z=abs_z)
    return args


def _event_input(x: torch.Tensor) -> bool:
    """A sparse COO batch of at most EVENT_DENSITY (its _nnz is known on the host: no sync)."""
    return x.is_sparse and x._nnz() <= EVENT_DENSITY * x.numel()


def input_current(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """W x in the layer's dtype: event-driven from a sparse COO batch up to EVENT_DENSITY, else a GEMM."""
    if _event_input(x):
        from ..kernels.event_current import event_current

        events = events_of(x)
        return event_current(events.row_ptr, events.cols, events.values, weight, x.shape[:2])
    return torch.matmul(dense(x).to(weight.dtype), weight.t())


class TritonBackend:
    """Triton kernels on a CUDA device (or the interpreter) for float32/16 layers: runs every op."""

    name = "triton"

    @staticmethod
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        """A CUDA device or the interpreter, Triton installed, and a float32/16 layer."""
        if dtype not in DTYPES or importlib.util.find_spec("triton") is None:
            return False
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

    @staticmethod
    def unsupported(rule) -> str | None:
        return kernel_law_refusal(rule.law, "triton") if rule.grad == "localzo" else None


@register("lif_forward", "triton")
def lif_forward(x, weight, bias, cfg: LIFConfig, needs_grad: bool, key: PhiloxKey | None,
                workspace: Workspace) -> LIFForward:
    from ..kernels import lif_forward as kernel

    rule = cfg.rule
    current = input_current(x, weight)
    run = dict(bias=bias, spike_dtype=weight.dtype, capacity=workspace.hints.get("active"))
    if not needs_grad:
        out = kernel.lif_forward(current, cfg.beta, cfg.threshold, mode=kernel.SPIKES, **run)
        return LIFForward(out.spikes, None, None)
    if rule.grad == "surrogate":
        out = kernel.lif_forward(current, cfg.beta, cfg.threshold, mode=kernel.MEMBRANE, **run)
        return LIFForward(out.spikes, rule.law.expected_grad(out.membrane, rule.delta), None)
    if rule.grad == "sparsegrad":
        out = kernel.lif_forward(current, cfg.beta, cfg.threshold, mode=kernel.SPARSEGRAD, bth=rule.bth, **run)
        grad = rule.law.expected_grad(out.values, rule.delta)
    else:
        out = kernel.lif_forward(
            current, cfg.beta, cfg.threshold, mode=kernel.LOCALZO, delta=rule.delta, m=rule.m, seed=key.seed,
            offset=key.offset, alpha=rule.law.alpha, c=rule.law.c, **sampler_args(rule.law, current.device), **run,
        )
        grad = out.values
    workspace.hints["active"] = out.index.numel() * 5 // 4 + 1024  # next call's buffer: this one + 25 %
    return LIFForward(out.spikes, None, ActiveSet(out.index, grad, out.spikes.shape))


def _family_fits(x, weight, bias, recurrent_weight, *_) -> bool:
    """The family kernel holds a recurrent row in one program: width up to its MAX_WIDTH (else torch)."""
    from ..kernels.lif_family_forward import MAX_WIDTH

    return recurrent_weight is None or weight.shape[0] <= MAX_WIDTH


@register("lif_family_forward", "triton", accepts=_family_fits)
def lif_family_forward(x, weight, bias, recurrent_weight, threshold, cfg: LIFConfig, needs_grad: bool,
                       key: PhiloxKey | None, workspace: Workspace) -> FamilyForward:
    """The torch op's result (`backends/lif_family.py`) from one launch of the family kernel
    (`kernels/lif_family_forward.py`) after the feed-forward current (a GEMM or the event current)."""
    from ..kernels import lif_family_forward as kernel

    rule, zero_reset = cfg.rule, cfg.reset == "zero"
    current = input_current(x, weight)
    run = dict(recurrent_weight=recurrent_weight, zero_reset=zero_reset, bias=bias, spike_dtype=weight.dtype)
    if not needs_grad:
        out = kernel.lif_family_forward(current, threshold, cfg.beta, mode=kernel.SPIKES, **run)
        return FamilyForward(out.spikes, None, None, FamilyTraces(None, None, None))
    run.update(trace_leak=cfg.trace_leak, trace_reset=cfg.trace_reset)
    if rule.grad == "surrogate":
        out = kernel.lif_family_forward(current, threshold, cfg.beta, mode=kernel.MEMBRANE, **run)
        g = rule.law.expected_grad(out.membrane, rule.delta)
        return FamilyForward(out.spikes, g, None, FamilyTraces(out.leak, out.reset, None))
    run.update(trace_last=zero_reset, capacity=workspace.hints.get("family_active"))
    if rule.grad == "sparsegrad":
        out = kernel.lif_family_forward(current, threshold, cfg.beta, mode=kernel.SPARSEGRAD, bth=rule.bth, **run)
        grad = rule.law.expected_grad(out.values, rule.delta)
    else:
        out = kernel.lif_family_forward(
            current, threshold, cfg.beta, mode=kernel.LOCALZO, delta=rule.delta, m=rule.m, seed=key.seed,
            offset=key.offset, alpha=rule.law.alpha, c=rule.law.c, **sampler_args(rule.law, current.device), **run,
        )
        grad = out.values
    workspace.hints["family_active"] = out.index.numel() * 5 // 4 + 1024  # next call's buffer: this one + 25 %
    return FamilyForward(out.spikes, None, ActiveSet(out.index, grad, out.spikes.shape),
                         FamilyTraces(out.leak, out.reset, out.last))


def _adjoint_fits(ext, active: ActiveSet, *_) -> bool:
    """The adjoint kernel holds a row's delta in one program: width up to MAX_WIDTH (else torch)."""
    from ..kernels.lif_family_forward import MAX_WIDTH

    return active.shape[2] <= MAX_WIDTH


@register("lif_adjoint", "triton", accepts=_adjoint_fits)
def lif_adjoint(ext, active: ActiveSet, beta: float, reset_spikes, recurrent_weight, weight, targets: ActiveSet | None,
                full_grid: bool, workspace: Workspace):
    """The torch op's (ds, dL/dx at the targets, delta grid) from the adjoint kernel (`kernels/lif_adjoint.py`);
    dL/dx at the targets from its delta grid by the sparse input-gradient kernel, as `input_grad_at`."""
    from ..kernels.lif_adjoint import lif_adjoint as walk

    ds, grid = walk(ext, active.grad, active.index, active.shape, beta, reset_spikes=reset_spikes,
                    recurrent_weight=recurrent_weight, store_grid=full_grid or targets is not None)
    out = input_grad_at(grid, weight, targets, workspace) if targets is not None else None
    dtype = ext.dtype
    return ds.to(dtype), None if out is None else out.to(dtype), grid.to(dtype) if full_grid else None


@register("weight_grad", "triton")
def weight_grad(ds, active: ActiveSet, x, beta: float, weight_shape, bias: bool, workspace: Workspace):
    """Sparse events up to EVENT_DENSITY: dW = D^T x over the input events (D the reverse filter of
    ds, db its sum); otherwise by active entry, the trace rebuilt from checkpoints."""
    if _event_input(x):
        from ..kernels.event_weight_grad import event_weight_grad

        filtered = filtered_grad(ds.float(), active, beta)
        events = events_of(x)
        grad_w = event_weight_grad(filtered, events.row_ptr, events.cols, events.values, weight_shape[1])
        grad_b = filtered.sum((0, 1)) if bias else None
    else:
        from ..kernels.sparse_weight_grad import sparse_weight_grad

        grad_w, grad_b = sparse_weight_grad(dense(x), ds, active.rows, active.neurons, weight_shape[0], beta, bias)
    return grad_w.to(ds.dtype), None if grad_b is None else grad_b.to(ds.dtype)


@register("filtered_grad", "triton")
def filtered_grad(ds, active: ActiveSet, beta: float):
    grid = torch.zeros(active.shape, dtype=torch.float32, device=ds.device)
    grid.view(-1).index_copy_(0, active.index, ds.float())
    return time_filter(grid, beta, reverse=True).to(ds.dtype)


@register("input_grad_at", "triton")
def input_grad_at(filtered, weight, targets: ActiveSet, workspace: Workspace):
    from ..kernels.sparse_input_grad import sparse_input_grad

    return sparse_input_grad(filtered, weight, targets.rows, targets.neurons).to(filtered.dtype)


@register("input_grad", "triton")
def input_grad(ds, active: ActiveSet, beta: float, weight, targets: ActiveSet, workspace: Workspace):
    filtered = filtered_grad(ds, active, beta)
    return input_grad_at(filtered, weight, targets, workspace)


@register("time_filter", "triton")
def time_filter(grid, beta: float, reverse: bool):
    from ..kernels.time_filter import time_filter

    return time_filter(grid, beta, reverse=reverse).to(grid.dtype)
