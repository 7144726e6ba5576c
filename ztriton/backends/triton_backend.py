"""The Triton backend: a GPU, or the CPU under TRITON_INTERPRET=1 (tests).

The LocalZO forward is the fused kernel of `kernels/lif_forward.py`; SparseGrad, surrogate and
no-grad forwards use the torch backend's streamed forward for now. The backward runs the time
filters, the CSR-by-neuron weight gradient and the input gradient at the upstream active entries
as kernels. Kernels are imported on first use, so this module imports without Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ..events import dense
from ..distributions import FastSigmoid, Laplace, Normal, SurrogateDistribution, Uniform
from ..rng import PhiloxKey
from ..sparse import ActiveSet
from . import torch_backend
from .base import LIFConfig, LIFForward, Workspace

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def sampler_args(law, device: torch.device) -> dict:
    """The fused kernel's description of a law: `dist` code, its parameter, its tables."""
    from ..kernels import lif_forward as kernel

    if isinstance(law, Normal):
        return dict(dist=kernel.NORMAL)
    if isinstance(law, Uniform):
        return dict(dist=kernel.UNIFORM)
    if isinstance(law, Laplace):
        return dict(dist=kernel.LAPLACE)
    if isinstance(law, FastSigmoid):
        return dict(dist=kernel.FAST_SIGMOID, dist_param=law.k * law.delta)
    if isinstance(law, SurrogateDistribution):
        cdf, abs_z = law.sampling_tables(device)
        return dict(dist=kernel.TABLE, cdf=cdf, abs_z=abs_z)
    raise ValueError(f"no Triton sampler for the distribution {law!r}")


class TritonBackend:
    name = "triton"

    @staticmethod
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        """A CUDA device or the interpreter, Triton installed, and a float32/16 layer."""
        if dtype not in DTYPES or importlib.util.find_spec("triton") is None:
            return False
        return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"

    @staticmethod
    def lif_forward(x, weight, bias, cfg: LIFConfig, needs_grad: bool, key: PhiloxKey | None,
                    workspace: Workspace) -> LIFForward:
        rule = cfg.rule
        if not (needs_grad and rule.grad == "localzo"):
            return torch_backend.lif_forward(x, weight, bias, cfg, needs_grad, key, workspace)
        from ..kernels.lif_forward import lif_localzo_forward

        current = torch.matmul(dense(x).to(weight.dtype), weight.t())
        if bias is not None:
            current += bias
        spikes, grad = lif_localzo_forward(
            current, cfg.beta, cfg.threshold, rule.delta, rule.m, key.seed, key.offset,
            alpha=rule.law.alpha, c=rule.law.c, **sampler_args(rule.law, current.device),
        )
        index = torch.nonzero(grad.view(-1)).squeeze(1)
        return LIFForward(spikes.to(weight.dtype), None, ActiveSet(index, grad.view(-1)[index], grad.shape))

    @staticmethod
    def weight_grad(ds, active: ActiveSet, x, beta: float, weight_shape, workspace: Workspace):
        from ..kernels.sparse_weight_grad import sparse_weight_grad
        from ..kernels.time_filter import time_filter

        trace = time_filter(dense(x), beta)
        return sparse_weight_grad(trace, ds, active.rows, active.neurons, weight_shape[0]).to(ds.dtype)

    @staticmethod
    def filtered_grad(ds, active: ActiveSet, beta: float):
        dense = torch.zeros(active.shape, dtype=torch.float32, device=ds.device)
        dense.view(-1).index_copy_(0, active.index, ds.float())
        return TritonBackend.time_filter(dense, beta, reverse=True).to(ds.dtype)

    @staticmethod
    def input_grad_at(filtered, weight, targets: ActiveSet, workspace: Workspace):
        from ..kernels.sparse_input_grad import sparse_input_grad

        return sparse_input_grad(filtered, weight, targets.rows, targets.neurons).to(filtered.dtype)

    @staticmethod
    def input_grad(ds, active: ActiveSet, beta: float, weight, targets: ActiveSet, workspace: Workspace):
        filtered = TritonBackend.filtered_grad(ds, active, beta)
        return TritonBackend.input_grad_at(filtered, weight, targets, workspace)

    @staticmethod
    def time_filter(grid, beta: float, reverse: bool):
        from ..kernels.time_filter import time_filter

        return time_filter(grid, beta, reverse=reverse).to(grid.dtype)
