"""Pieces shared by the Functions of `ztriton.ops`."""

from __future__ import annotations

import functools

import torch

from ..backends import Backend, Workspace, compute_dtype, dispatch
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


def run_op(ops: dict, key: str, op: str, backend: Backend, *args):
    """Op `op` on `backend` by the op registry (torch where it has none); records which ran in ops[key]."""
    result, ops[key] = dispatch(op, backend.name, *args)
    return result


def input_grad_from_filtered(filtered: torch.Tensor, weight: torch.Tensor, x: torch.Tensor,
                             producer: ActiveSet | None, backend: Backend, workspace: Workspace,
                             ops: dict) -> torch.Tensor:
    """dL/dx = D W from the full D grid: sparse COO at the producing layer's active entries when x is
    a SparseLIFLinear's unmodified output, else dense (a torch GEMM)."""
    if producer is not None:
        values = run_op(ops, "input_grad", "input_grad_at", backend, filtered, weight, producer, workspace)
        return sparse_grad(producer, values, x.dtype)
    ops["input_grad"] = "torch"
    flat = filtered.reshape(-1, filtered.shape[2])
    return flat.matmul(weight.to(compute_dtype(weight.dtype))).view(x.shape).to(x.dtype)
