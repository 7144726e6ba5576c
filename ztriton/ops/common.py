"""Pieces shared by the Functions of `ztriton.ops`."""

from __future__ import annotations

import functools

import torch

from ..backends import Backend, Workspace, compute_dtype
from ..sparse import ActiveSet, sparse_grad


def without_autocast(method):
    """Run a Function's forward or backward with autocast off on its tensors' device type.

    The ops compute in their parameters' dtype (float32 layers: float32 GEMMs, half layers: half
    currents with float32 membranes), the same on every backend, under `torch.autocast` as outside;
    half-precision training converts the layers (`.half()`, `.bfloat16()`) instead.
    """
    @functools.wraps(method)
    def run(ctx, *args):
        device_type = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        with torch.autocast(device_type, enabled=False):
            return method(ctx, *args)
    return run


def refuse_double_backward(op: str) -> None:
    """Raise if a backward runs with create_graph=True: these backwards are first-order only."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{op} does not support double backward: its sparse backward is first-order only "
            f"(backward was called with create_graph=True)"
        )


def input_grad_from_filtered(filtered: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
                             producer: ActiveSet | None, backend: Backend, workspace: Workspace) -> torch.Tensor:
    """dL/dx = D W from the full D grid: sparse COO at the producing layer's active entries when x is
    a SparseLIFLinear's unmodified output, else dense."""
    if producer is not None:
        return sparse_grad(producer, backend.input_grad_at(filtered, weight, producer, workspace), x.dtype)
    flat = filtered.reshape(-1, filtered.shape[2])
    return flat.matmul(weight.to(compute_dtype(weight.dtype))).view(x.shape).to(x.dtype)
