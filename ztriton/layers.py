"""Drop-in modules: `SparseLIFLinear` (LIF neurons with LocalZO / SparseGrad / surrogate backward)
and `LeakyReadout` (the non-spiking readout of the paper's networks)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import choice, float_tensor, positive_float, positive_int, unit_interval
from .distributions import Distribution, resolve
from . import triton_backend
from .lif import LeakyReadoutFunction, LIFFunction, SpikeRule, TorchBackend, Workspace
from .scheduler import DEFAULT_SCHEDULER, Scheduler

GRAD_MODES = ("localzo", "sparsegrad", "surrogate")
PATHS = ("auto", "dense", "sparse")
BACKENDS = ("auto", "torch", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_input(x, in_features: int) -> torch.Tensor:
    """x must be a finite floating (T, B, in_features) tensor."""
    float_tensor("x", x, finite=False)
    if x.dim() != 3:
        raise ValueError(f"x must have shape (T, B, in_features), got {x.dim()} dimensions {tuple(x.shape)}")
    if x.shape[2] != in_features:
        raise ValueError(f"x has {x.shape[2]} features, the layer expects in_features={in_features}")
    # one cheap reduction; the exact elementwise check runs only if the sum is not finite
    if x.numel() and not bool(torch.isfinite(x.sum())) and not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")
    return x


class SparseLIFLinear(nn.Module):
    """Linear synapses into LIF neurons (paper eq. 1) with a layerwise sparse backward.

    Input `(T, B, in_features)` spikes or real values; output `(T, B, out_features)` spikes.

    - `grad`: "localzo" (eq. 7, z drawn in forward), "sparsegrad" (surrogate truncated at B_th,
      default `backprop_threshold(delta, m)`), "surrogate" (dense expected surrogate).
    - `path`: "dense" (GEMMs over all entries), "sparse" (active entries only), "auto" (the
      scheduler decides from the measured activity). Both give the same gradients.
    - `generator`: the torch.Generator for LocalZO draws (default: torch's global generator).
    - `backend`: "torch", "triton" (fused LIF + LocalZO forward and sparse backward kernels; on a
      GPU, or on CPU under TRITON_INTERPRET=1) or "auto" (Triton on a GPU, torch elsewhere).

    `stats` holds, for the last forward: `active_fraction`, `path`, `saved_bytes` (kept for
    backward), `crossover` and where it came from. Working buffers are cached on the layer between
    calls (`workspace_bytes`), which keeps large allocations out of every step.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        beta: float,
        threshold: float = 1.0,
        grad: str = "localzo",
        dist: str | Distribution = "normal",
        delta: float = 0.05,
        m: int = 1,
        bth: float | None = None,
        path: str = "auto",
        bias: bool = False,
        scheduler: Scheduler | None = None,
        generator: torch.Generator | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.beta = unit_interval("beta", beta)
        self.threshold = positive_float("threshold", threshold)
        grad = choice("grad", grad, GRAD_MODES)
        self.path = choice("path", path, PATHS)
        self.backend = choice("backend", backend, BACKENDS)
        delta = positive_float("delta", delta)
        m = positive_int("m", m)
        law = resolve(dist, delta)
        if bth is None:
            bth = law.backprop_threshold(delta, m)
        else:
            bth = positive_float("bth", bth)
            if grad != "sparsegrad":
                raise ValueError(f"bth applies to grad='sparsegrad' only, got grad={grad!r}")
        self.rule = SpikeRule(grad=grad, law=law, delta=delta, m=m, bth=bth)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        self.scheduler = scheduler or DEFAULT_SCHEDULER
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.stats: dict = {}
        self.workspace = Workspace()

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the working buffers cached on the layer between calls."""
        return self.workspace.nbytes

    def choose_path(self, active_fraction: float) -> str:
        """The forced path, or the scheduler's choice for `active_fraction` on this device."""
        crossover, source = self.scheduler.crossover(self.weight.device)
        self.stats.update(crossover=crossover, crossover_source=source)
        if self.path != "auto":
            return self.path
        return self.scheduler.choose(active_fraction, self.weight.device)

    def record(self, *, path: str, active_fraction: float | None, saved_bytes: int, backend: str, grid: int) -> None:
        """Stats of the last forward; `grid` is the number of (t, b, neuron) entries."""
        self.stats.update(
            path=path, active_fraction=active_fraction, saved_bytes=saved_bytes, backend=backend, grid=grid
        )

    def resolve_backend(self):
        """The implementation for this forward: TritonBackend or TorchBackend."""
        device, dtype = self.weight.device, self.weight.dtype
        if self.backend == "torch":
            return TorchBackend
        usable = triton_backend.available(device) and dtype in TRITON_DTYPES
        if self.backend == "triton" and not usable:
            raise ValueError(
                f"backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU) and a float32/16 layer; "
                f"this layer is {dtype} on {device}"
            )
        return triton_backend.TritonBackend if usable and (self.backend == "triton" or device.type == "cuda") else TorchBackend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        backend = self.resolve_backend()
        return LIFFunction.apply(x, self.weight, self.bias, self, self.generator, needs_grad, backend)

    def extra_repr(self) -> str:
        r = self.rule
        return (
            f"{self.in_features}, {self.out_features}, beta={self.beta:.4g}, threshold={self.threshold:g}, "
            f"grad={r.grad}, dist={r.law.name}, delta={r.delta:g}, m={r.m}, path={self.path}"
        )


class LeakyReadout(nn.Module):
    """Non-spiking leaky integrator: o[t] = beta o[t-1] + (1 - beta) (W s)[t], o[-1] = 0.

    Input `(T, B, in_features)`, output membrane traces `(T, B, out_features)`; the paper's
    networks take their max (or sum) over time as logits. Fed by a SparseLIFLinear, it computes
    the gradient of its input only at that layer's active entries.
    """

    def __init__(self, in_features: int, out_features: int, *, beta: float, bias: bool = False):
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.beta = unit_interval("beta", beta)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features)
        return LeakyReadoutFunction.apply(x, self.weight, self.bias, self.beta)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, beta={self.beta:.4g}"
