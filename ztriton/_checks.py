"""Argument checks shared by the public API: each raises a ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import os
from numbers import Integral, Real

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

#: NaN / inf checks of layer inputs: None = the default (on for CPU tensors; off on CUDA, where each
#: check is a host sync), or forced on / off by `set_value_checks` or ZTRITON_CHECK_VALUES=1 / 0
_value_checks: bool | None = {"1": True, "0": False}.get(os.environ.get("ZTRITON_CHECK_VALUES", ""))


def set_value_checks(enabled: bool | None) -> None:
    """Turn the layers' NaN/inf checks of their input on (True), off (False), or back to the default
    (None: checked on CPU; not on CUDA, where a check makes the host wait for the device)."""
    global _value_checks
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    _value_checks = enabled


def value_checks(device: torch.device) -> bool:
    """Whether layer inputs on `device` are checked for NaN/inf (see `set_value_checks`)."""
    return device.type != "cuda" if _value_checks is None else _value_checks


def positive_float(name: str, value) -> float:
    """`value` as a float; it must be a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return value


def positive_int(name: str, value) -> int:
    """`value` as an int; it must be an integer >= 1 (bool is refused)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def unit_interval(name: str, value) -> float:
    """`value` as a float in (0, 1] (a leak factor such as beta)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def choice(name: str, value, options) -> str:
    """`value` must be one of the strings in `options`."""
    if value not in options:
        raise ValueError(f"{name} must be one of {sorted(options)}, got {value!r}")
    return value


def float_tensor(name: str, value, *, finite: bool = True) -> torch.Tensor:
    """`value` must be a floating-point tensor; with `finite`, without NaN or inf."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    if finite and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return value
