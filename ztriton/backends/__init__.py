"""Backends of the layers' operations: `REGISTRY` of backends (`base.Backend`: where each runs),
the op registry (`registry`: each op's implementation per backend) and `select`.

A new backend is one module implementing the protocol, registering its ops, and one line in REGISTRY.
"""

from __future__ import annotations

import torch

from .. import native
from .base import Backend, LIFConfig, LIFForward, SpikeRule, Workspace, compute_dtype
from .registry import dispatch
from .native_backend import DTYPES as NATIVE_DTYPES, NativeBackend
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
    "triton": "it needs Triton, a CUDA device (or TRITON_INTERPRET=1 on CPU) and a float32/16 layer",
    "native": "it needs numba, the CPU and a float32/64 layer",
}


def unavailable(name: str, device: torch.device, dtype: torch.dtype, rule: SpikeRule | None = None) -> str | None:
    """Why backend `name` cannot run a `dtype` layer with `rule` on `device`, or None if it can."""
    backend = REGISTRY[name]
    if not backend.available(device, dtype):
        if name == "native" and not native.AVAILABLE:
            return f"{REQUIREMENTS[name]} ({native.UNAVAILABLE_REASON})"
        return f"{REQUIREMENTS[name]}; the layer is {dtype} on {device}"
    return backend.unsupported(rule) if rule is not None else None


def select(name: str, device: torch.device, dtype: torch.dtype,
           rule: SpikeRule | None = None) -> tuple[Backend, str | None]:
    """The backend called `name` and, for "auto", why it is not the preferred one for `device`.

    "auto" takes the first backend of PREFERENCE that runs the layer (the torch backend if none);
    the note is None when that is the first choice or an expected one (a half-precision layer on
    CPU), else it names what the preferred backend lacks. A named backend that cannot run the
    layer raises a ValueError saying why.
    """
    if name != "auto":
        reason = unavailable(name, device, dtype, rule)
        if reason is not None:
            raise ValueError(f"backend={name!r} cannot run this layer: {reason}")
        return REGISTRY[name], None
    preferred = PREFERENCE.get(device.type, ("torch",))
    reasons = []
    for candidate in preferred:
        reason = unavailable(candidate, device, dtype, rule)
        if reason is None:
            return REGISTRY[candidate], ("; ".join(reasons) or None)
        half_on_cpu = candidate == "native" and native.AVAILABLE and dtype not in NATIVE_DTYPES  # documented
        if not half_on_cpu:
            reasons.append(f"{candidate}: {reason}")
    return REGISTRY["torch"], ("; ".join(reasons) or None)


__all__ = ["Backend", "LIFConfig", "LIFForward", "REGISTRY", "SpikeRule", "Workspace", "compute_dtype", "dispatch",
           "select", "unavailable"]
