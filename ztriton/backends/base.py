"""The backend protocol: what every implementation of the layers' operations provides.

The autograd Functions (`ztriton.ops`) call these methods and nothing else, with the same
signature on every backend; a backend is one module implementing `Backend`, plus one line in
`ztriton.backends.REGISTRY`. Shapes: x (T, B, N_in), dense or sparse COO, weight (N_out, N_in),
grids (T, B, N).
Gradient arithmetic is float32 (float64 for a float64 layer): `compute_dtype`.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch

from ..distributions import Distribution
from ..rng import PhiloxKey
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
    """Hyper-parameters of one LIF layer (eq. 1): leak `beta`, threshold, spike rule."""

    beta: float
    threshold: float
    rule: SpikeRule


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
    """Operations of SparseLIFLinear and LeakyReadout. `ds` holds grad_s * g at the active entries."""

    name: str

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend runs layers of `dtype` on `device`."""

    def unsupported(self, rule: SpikeRule) -> str | None:
        """None if this backend evaluates `rule` (its law's draws), else why not and the fix."""

    def implementation(self, op: str, rule: SpikeRule, needs_grad: bool) -> str:
        """The name of the implementation that runs method `op` (e.g. "torch" where a backend
        reuses the torch backend's), reported per op in the layers' `stats["ops"]`."""

    def lif_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: LIFConfig,
                    needs_grad: bool, key: PhiloxKey | None, workspace: Workspace) -> LIFForward:
        """Eq. 1 with input current W x (+ b) formed in the layer's dtype and the membrane in
        compute_dtype. With `needs_grad`: dense g for the surrogate rule, else the active set (LocalZO
        draws by the RNG contract with `key`); without: spikes only, no draw."""

    def weight_grad(self, ds: torch.Tensor, active: ActiveSet, x: torch.Tensor, beta: float,
                    weight_shape: torch.Size, bias: bool, workspace: Workspace) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(dW, db): dW = sum over active (t, b, i) of ds * eps[t, b, :] (eq. 25-26) and, with `bias`,
        db = sum of ds * gain(t), gain(t) = sum_{k<=t} beta^(t-k); compute dtype, deterministic."""

    def input_grad(self, ds: torch.Tensor, active: ActiveSet, beta: float, weight: torch.Tensor,
                   targets: ActiveSet, workspace: Workspace) -> torch.Tensor:
        """dL/dx at `targets` only: D[t, b, :] . W[:, j] with D the reverse-time filter of ds."""

    def filtered_grad(self, ds: torch.Tensor, active: ActiveSet, beta: float) -> torch.Tensor:
        """D = reverse-time filter of ds on the full (T, B, N) grid."""

    def input_grad_at(self, filtered: torch.Tensor, weight: torch.Tensor, targets: ActiveSet,
                      workspace: Workspace) -> torch.Tensor:
        """D[t, b, :] . W[:, j] at `targets`, from a full D grid."""

    def time_filter(self, grid: torch.Tensor, beta: float, reverse: bool) -> torch.Tensor:
        """grid[t] + beta * out[t -+ 1] along dim 0 (forward or reverse); may work in place."""
