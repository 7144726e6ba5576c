"""Backends of the layers' operations, behind one protocol (`base.Backend`).

A new backend is one module implementing the protocol and one line in REGISTRY.
"""

from __future__ import annotations

import torch

from .base import Backend, LIFConfig, LIFForward, SpikeRule, Workspace, compute_dtype
from .native_backend import NativeBackend
from .torch_backend import TorchBackend
from .triton_backend import TritonBackend

REGISTRY: dict[str, Backend] = {
    "torch": TorchBackend(),
    "triton": TritonBackend(),
    "native": NativeBackend(),
}
#: backend="auto": the first available of these for the device type
PREFERENCE = {"cuda": ("triton", "torch"), "cpu": ("native", "torch")}


REQUIREMENTS = {
    "torch": "",
    "triton": " (it needs a CUDA device, or TRITON_INTERPRET=1 on CPU, and a float32/16 layer)",
    "native": " (it needs numba, the CPU and a float32/64 layer)",
}


def select(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend called `name` ("auto": the preferred one available for `device`)."""
    if name == "auto":
        for candidate in PREFERENCE.get(device.type, ()):
            if REGISTRY[candidate].available(device, dtype):
                return REGISTRY[candidate]
        return REGISTRY["torch"]
    backend = REGISTRY[name]
    if not backend.available(device, dtype):
        raise ValueError(
            f"backend={name!r} is not available for a {dtype} layer on {device}"
            + REQUIREMENTS[name]
        )
    return backend


__all__ = ["Backend", "LIFConfig", "LIFForward", "REGISTRY", "SpikeRule", "Workspace", "compute_dtype", "select"]
