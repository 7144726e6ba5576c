"""The plain-torch backend: every device, and the float64 reference of the tests.

Its implementations are the ops' own (one module per op, each registering its torch
implementation): `lif_forward`, `weight_grad`, `input_grad` (input_grad, input_grad_at) and
`time_filter` (time_filter, filtered_grad), `lif_family` (lif_family_forward, lif_adjoint,
lif_adjoint_grid).
"""

from __future__ import annotations

import torch

from . import input_grad, lif_family, lif_forward, time_filter, weight_grad  # noqa: F401 (registers the torch ops)


class TorchBackend:
    """Plain torch on any device: runs every op and every law."""

    name = "torch"

    @staticmethod
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        return True

    @staticmethod
    def unsupported(rule) -> str | None:
        return None  # evaluates every law's own torch code
