"""The Triton implementation of the layer's kernels (used on a GPU, or on CPU under TRITON_INTERPRET=1).

Same interface as `lif.TorchBackend`; `SparseLIFLinear(backend=...)` picks one per forward.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from .lif import ActiveSet, SpikeRule, Workspace


def available(device: torch.device) -> bool:
    """Triton can run on `device`: a CUDA device, or the interpreter (TRITON_INTERPRET=1) on CPU."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend:
    name = "triton"

    @staticmethod
    def localzo_forward(current: torch.Tensor, beta: float, threshold: float, rule: SpikeRule,
                        generator: torch.Generator | None) -> tuple[torch.Tensor, ActiveSet]:
        """Fused recurrence + LocalZO draw; the Philox seed comes from torch's generator."""
        from .kernels.lif_forward import lif_localzo_forward

        seed = int(torch.randint(0, 2**31 - 1, (), generator=generator, device=current.device))
        spikes, grad = lif_localzo_forward(current, beta, threshold, rule.law, rule.delta, rule.m, seed)
        index = torch.nonzero(grad.view(-1)).squeeze(1)
        return spikes, ActiveSet(index, grad.view(-1)[index], grad.shape)

    @staticmethod
    def weight_grad(ds, active: ActiveSet, x, beta: float, weight_shape, workspace: Workspace | None = None):
        from .kernels.sparse_weight_grad import sparse_weight_grad
        from .kernels.time_filter import time_filter

        trace = time_filter(x, beta)
        return sparse_weight_grad(trace, ds, active.rows, active.neurons, weight_shape[0]).to(ds.dtype)

    @staticmethod
    def filtered_grad(ds, active: ActiveSet, beta: float):
        from .kernels.time_filter import time_filter

        dense = torch.zeros(active.shape, dtype=torch.float32, device=ds.device)
        dense.view(-1).index_copy_(0, active.index, ds.float())
        return time_filter(dense, beta, reverse=True).to(ds.dtype)

    @staticmethod
    def sparse_input_grad(ds, active: ActiveSet, beta: float, weight, targets: ActiveSet,
                          workspace: Workspace | None = None):
        from .kernels.sparse_input_grad import sparse_input_grad

        filtered = TritonBackend.filtered_grad(ds, active, beta)
        return sparse_input_grad(filtered, weight, targets.rows, targets.neurons).to(ds.dtype)
