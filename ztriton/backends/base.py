"""The types every backend shares: the backend protocol, the layer configuration, the workspace.

A backend says where it runs and which spike rules it evaluates (`Backend`); its ops are in the op
registry (`registry`), with the same signature on every backend. Shapes: x (T, B, N_in), dense
or sparse COO, weight (N_out, N_in), grids (T, B, N).
Gradient arithmetic is float32 (float64 for a float64 layer): `compute_dtype`.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from ..distributions import Distribution
from ..sparse import ActiveSet


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Membrane and gradient precision for a layer of `dtype`: float64 for float64, else float32."""
    return torch.promote_types(dtype, torch.float32)


@dataclass(frozen=True)
class SpikeRule:
    """How g is formed in forward: `grad` is "localzo", "sparsegrad" or "surrogate" (paper section 4)."""

    grad: str
    law: Distribution
    delta: float
    m: int
    bth: float


@dataclass(frozen=True)
class LIFConfig:
    """Hyper-parameters of one LIF layer (eq. 1): leak `beta`, threshold, spike rule; for the LIF
    family (DESIGN.md section 9) the reset ("subtract" or "zero") and which forward traces the
    parameter gradients need (`trace_leak`: a learnable beta, `trace_reset`: a learnable theta
    under the subtractive reset). The family's per-neuron threshold travels as a tensor."""

    beta: float
    threshold: float
    rule: SpikeRule
    reset: str = "subtract"
    trace_leak: bool = False
    trace_reset: bool = False


class LIFForward(NamedTuple):
    """A forward's result: spikes (layer dtype), dense g (surrogate rule) or the active set."""

    spikes: torch.Tensor
    g: torch.Tensor | None
    active: ActiveSet | None


class _Scratch:
    """One thread's buffers and hints (weak-referenceable, so a Workspace can list the live ones)."""

    __slots__ = ("buffers", "hints", "__weakref__")

    def __init__(self):
        self.buffers: dict[str, torch.Tensor] = {}
        self.hints: dict[str, int] = {}


class Workspace:
    """Named scratch buffers reused across calls (on CPU every fresh large tensor costs page faults).

    Only used within one forward or backward call; nothing in them outlives the call. Each thread
    has its own buffers and hints, so one layer may run in several threads at once; a thread's
    buffers are freed when it ends. A copy or an unpickled Workspace starts empty.
    """

    def __init__(self):
        self._local = threading.local()
        self._live: weakref.WeakSet[_Scratch] = weakref.WeakSet()
        self._lock = threading.Lock()

    def __reduce__(self):
        return Workspace, ()

    def _scratch(self) -> _Scratch:
        try:
            return self._local.scratch
        except AttributeError:
            scratch = self._local.scratch = _Scratch()
            with self._lock:
                self._live.add(scratch)
            return scratch

    @property
    def hints(self) -> dict[str, int]:
        """Sizes learnt from this thread's earlier calls (e.g. a candidate buffer's capacity)."""
        return self._scratch().hints

    def get(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """This thread's buffer `name`, (re)allocated uninitialised unless it has this shape, dtype and device."""
        shape = torch.Size(shape)
        buffers = self._scratch().buffers
        buffer = buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            buffer = buffers[name] = torch.empty(shape, dtype=dtype, device=device)
        return buffer

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers of every live thread."""
        with self._lock:
            scratches = list(self._live)
        return sum(b.numel() * b.element_size() for s in scratches for b in tuple(s.buffers.values()))


class Backend(Protocol):
    """Where a backend runs and what it evaluates; its ops are registered under `name` (`registry`)."""

    name: str

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend runs layers of `dtype` on `device`."""

    def unsupported(self, rule: SpikeRule) -> str | None:
        """None if this backend evaluates `rule` (its law's draws), else why not and the fix."""
