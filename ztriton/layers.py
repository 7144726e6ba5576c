"""Drop-in modules: `SparseLIFLinear` (LIF neurons with LocalZO / SparseGrad / surrogate backward)
and `LeakyReadout` (the non-spiking readout of the paper's networks)."""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from . import backends, native, rng
from ._checks import choice, float_tensor, positive_float, positive_int, unit_interval, value_checks
from .boundary import eager_under_compile
from .distributions import Distribution, resolve
from .events import cached_events
from .ops import LeakyReadoutFunction, LIFFamilyFunction, LIFFunction, PathPolicy
from .scheduler import DEFAULT_SCHEDULER, Scheduler
from .sparse import mark_producer

GRAD_MODES = ("localzo", "sparsegrad", "surrogate")
PATHS = ("auto", "dense", "sparse")
RESETS = ("subtract", "zero")
#: the forward uses max(threshold, THRESHOLD_FLOOR): a learnable threshold cannot reach zero or below
#: (its gradient passes where it is at or above the floor)
THRESHOLD_FLOOR = 1e-3
BACKEND_NAMES = ("auto",) + tuple(backends.REGISTRY)


class SilentLayerWarning(UserWarning):
    """A SparseLIFLinear neither fired nor had an active entry in a training forward."""


class BackendFallbackWarning(UserWarning):
    """backend="auto" runs a layer on the torch backend where a faster one was expected."""


_warned_no_native = False


def _resolve(module: nn.Module, rule: backends.SpikeRule | None) -> backends.Backend:
    """`module.backend` resolved for its parameters' device and dtype (and spike rule); a fallback of
    "auto" to the torch backend warns: once per process when numba is missing on CPU, else once per
    layer, naming the layer and the reason."""
    global _warned_no_native
    backend, note = backends.select(module.backend, module.weight.device, module.weight.dtype, rule)
    module.stats["fallback"] = note
    if note is None:
        return backend
    if module.weight.device.type == "cpu" and not native.AVAILABLE:
        if not _warned_no_native:
            _warned_no_native = True
            warnings.warn(f"ztriton's layers run on the torch backend, several times slower on CPU than the native "
                          f"kernels: {note}. Install numba for them.", BackendFallbackWarning, stacklevel=3)
    elif not module._warned_fallback:
        module._warned_fallback = True
        warnings.warn(f"{module!r} (backend='auto') runs on the torch backend: {note}", BackendFallbackWarning,
                      stacklevel=3)
    return backend


def _check_backend(name) -> str:
    return choice("backend", name, BACKEND_NAMES)


def flag(name: str, value) -> bool:
    """`value` must be a bool."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def _leak(name: str, beta, learn: bool) -> tuple[float, nn.Parameter | None]:
    """(beta, None) for a fixed leak; (beta, logit parameter) for a learnable one, beta = sigmoid(logit),
    which cannot reach 1."""
    if isinstance(beta, torch.Tensor):
        if beta.numel() != 1:
            raise ValueError(f"{name} must be one number per layer, got a tensor of shape {tuple(beta.shape)}: a "
                             f"per-neuron leak is not supported (the layerwise backward shares one input trace per layer)")
        beta = float(beta)
    beta = unit_interval(name, beta)
    if not learn:
        return beta, None
    if beta == 1.0:
        raise ValueError(f"{name}=1 cannot be learnt (learn_beta=True): sigmoid(beta_logit) < 1; pass a value below 1")
    return beta, nn.Parameter(torch.tensor(math.log(beta / (1.0 - beta))))


def _leak_now(logit: nn.Parameter | None, fixed: float) -> tuple[torch.Tensor | None, float]:
    """(sigmoid(logit), its value) of a learnable leak (the tensor in autograd's graph while grad is
    enabled), or (None, fixed)."""
    if logit is None:
        return None, fixed
    beta = torch.sigmoid(logit)
    return beta, float(beta.detach())


def _threshold(module: nn.Module, threshold, n_out: int, learn: bool) -> None:
    """module.threshold: an (n_out,) buffer, or the parameter with `learn`, from a number or a tensor.
    The buffer starts in float64, so a float64 layer keeps the value given (0.8 stays 0.8); the
    module's `.float()` / `.to(dtype)` converts it like any buffer. The parameter starts in the
    default dtype, like the weights."""
    if isinstance(threshold, torch.Tensor):
        float_tensor("threshold", threshold)
        if threshold.dim() > 1 or threshold.numel() not in (1, n_out):
            raise ValueError(f"threshold must be a number, a 0-dim or an ({n_out},) tensor, got shape {tuple(threshold.shape)}")
        values = threshold.detach().to(torch.float64).reshape(-1).expand(n_out).clone()
        if not bool((values > 0).all()):
            raise ValueError("threshold must be > 0 for every neuron")
    else:
        values = torch.full((n_out,), positive_float("threshold", threshold), dtype=torch.float64)
    if learn:
        module.threshold = nn.Parameter(values.to(torch.get_default_dtype()))
    else:
        module.register_buffer("threshold", values)


def _check_input(x, in_features: int) -> torch.Tensor:
    """x must be a floating (T, B, in_features) tensor, strided or sparse COO (events), and finite
    where values are checked (`ztriton.set_value_checks`: on CPU by default, not on CUDA)."""
    float_tensor("x", x, finite=False)
    if x.layout not in (torch.strided, torch.sparse_coo):
        raise TypeError(f"x must be a strided or sparse COO tensor, got layout {x.layout}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (T, B, in_features), got {x.dim()} dimensions {tuple(x.shape)}")
    if x.shape[2] != in_features:
        raise ValueError(f"x has {x.shape[2]} features, the layer expects in_features={in_features}")
    if x.is_sparse:
        if x.sparse_dim() != 3:
            raise ValueError(f"a sparse x must have 3 sparse dimensions (T, B, in_features), got {x.sparse_dim()}")
        if x.requires_grad:
            raise ValueError("a sparse x (events) cannot require grad; pass a dense tensor to get its gradient")
    if cached_events(x) is not None or not value_checks(x.device):
        return x  # a layer's output, a tensor checked before and unchanged since, or checks off (CUDA)
    values = (x._values() if x.is_sparse else x).detach()
    # one cheap reduction; the exact elementwise check runs only if the sum is not finite
    if values.numel() and not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        raise ValueError("x contains NaN or inf")
    return x


class SparseLIFLinear(nn.Module):
    """Linear synapses into LIF neurons (paper eq. 1) with a layerwise sparse backward.

    Input `(T, B, in_features)` spikes or real values, a dense tensor or a sparse COO tensor of
    events (as the data sets produce); output `(T, B, out_features)` spikes.

    - `grad`: "localzo" (eq. 7, z drawn in forward), "sparsegrad" (surrogate truncated at B_th,
      default `backprop_threshold(delta, m)`), "surrogate" (dense expected surrogate).
    - `path`: "dense" (GEMMs over all entries), "sparse" (active entries only), "auto" (the
      scheduler decides from the measured activity). Both give the same gradients.
    - `generator`: the torch.Generator LocalZO takes its (seed, offset) from, once per forward
      (default: the global generator of the layer's device); see `ztriton.rng`.
    - `backend`: "torch" (plain torch, any device), "native" (numba kernels on CPU, float32/64),
      "triton" (fused LIF + LocalZO forward and sparse backward kernels; on a GPU, or on CPU under
      TRITON_INTERPRET=1) or "auto" (Triton on a GPU, native on CPU, torch where neither runs).

    The LIF family (DESIGN.md section 9), every combination with every rule, path and input layout:

    - `recurrent`: the current adds `recurrent_weight @ s[t-1]` (an (out, out) parameter, no bias,
      initialised U(-1/sqrt(out), 1/sqrt(out)) as `nn.Linear(out, out)`);
    - `reset`: "subtract" (eq. 1) or "zero", `u[t] = beta (1 - s[t-1]) u[t-1] + I[t]`; the reset
      factor is held constant in backward either way;
    - `learn_beta`: one leak per layer, `beta = sigmoid(beta_logit)` (a 0-dim parameter initialised
      from `beta`, which must then be < 1); `beta` reads the current value either way;
    - `threshold`: a number or an (out,) tensor, kept as the (out,) tensor `layer.threshold`, a
      buffer, or the parameter with `learn_threshold`; the forward uses it floored at
      THRESHOLD_FLOOR (1e-3), so training cannot drive it to zero (its gradient passes above the floor).

    The input current is formed in the layer's dtype (as an `nn.Linear` of that dtype would); the
    membrane, g and every gradient accumulate in float32 (float64 for a float64 layer).

    On the sparse path the output carries the layer's active set: a SparseLIFLinear, LeakyReadout
    or `functional.spike_count` fed directly with it returns its gradient as a sparse COO tensor
    at those entries (hooks and `retain_grad` on the spikes see that layout; see `ztriton.sparse`).

    `stats` holds, for the last forward: `active_fraction`, `path`, `saved_bytes` (kept for
    backward), `backend`, `ops` (the implementation that ran each op of the call: forward and,
    once its backward has run, weight_grad, input_grad, time_filter; for the LIF family also adjoint
    and recurrent_weight_grad), `fallback` (why
    backend="auto" took the torch backend, else None), `grid`, `crossover` and where it came from.
    Working buffers are cached on the layer between calls (`workspace_bytes`). A training forward in
    which the layer neither fires nor has an active entry warns once (`SilentLayerWarning`): such a
    layer gets no gradient.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        beta: float,
        threshold: float | torch.Tensor = 1.0,
        recurrent: bool = False,
        reset: str = "subtract",
        learn_beta: bool = False,
        learn_threshold: bool = False,
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
        self.recurrent = flag("recurrent", recurrent)
        self.reset = choice("reset", reset, RESETS)
        self.learn_beta = flag("learn_beta", learn_beta)
        self.learn_threshold = flag("learn_threshold", learn_threshold)
        self._beta, self.beta_logit = _leak("beta", beta, self.learn_beta)
        _threshold(self, threshold, out_features, self.learn_threshold)
        grad = choice("grad", grad, GRAD_MODES)
        self.path = choice("path", path, PATHS)
        self.backend = _check_backend(backend)
        delta = positive_float("delta", delta)
        m = positive_int("m", m)
        law = resolve(dist, delta)
        if bth is None:
            bth = law.backprop_threshold(delta, m)
        else:
            bth = positive_float("bth", bth)
            if grad != "sparsegrad":
                raise ValueError(f"bth applies to grad='sparsegrad' only, got grad={grad!r}")
        self.rule = backends.SpikeRule(grad=grad, law=law, delta=delta, m=m, bth=bth)
        if self.backend != "auto" and (reason := backends.REGISTRY[self.backend].unsupported(self.rule)):
            raise ValueError(f"backend={self.backend!r} cannot run this layer: {reason}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        self.scheduler = scheduler or DEFAULT_SCHEDULER
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.recurrent_weight = None
        if self.recurrent:  # as nn.Linear(out, out) would: U(-1/sqrt(out), 1/sqrt(out)), no bias
            bound = 1.0 / math.sqrt(out_features)
            self.recurrent_weight = nn.Parameter(torch.empty(out_features, out_features).uniform_(-bound, bound))
        self.stats: dict = {}
        self.workspace = backends.Workspace()
        self._warned_silent = self._warned_fallback = False
        self._threshold_seen = None  # (tensor identity, version) of the last threshold checked

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint from before per-neuron thresholds (no `threshold` entry) keeps the layer's own."""
        if prefix + "threshold" not in state_dict and not self.learn_threshold:
            state_dict = {**state_dict, prefix + "threshold": self.threshold}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def beta(self) -> float:
        """The leak factor now: `sigmoid(beta_logit)` with `learn_beta`, else the fixed value."""
        return _leak_now(self.beta_logit, self._beta)[1]

    @property
    def family(self) -> bool:
        """Whether the layer leaves eq. 1's plain model (recurrent, reset to zero, learnable leak or
        threshold, or thresholds that differ between neurons): then it runs the LIF family's ops."""
        return (self.recurrent or self.reset == "zero" or self.learn_beta or self.learn_threshold
                or self._uniform_threshold() is None)

    def _uniform_threshold(self) -> float | None:
        """The threshold (floored) if all neurons share it, else None; re-checked after each change of the
        tensor (finite, and > 0 unless learnable, whose values the floor bounds)."""
        theta = self.threshold
        seen = (id(theta), theta.data_ptr(), theta._version)
        if self._threshold_seen is None or self._threshold_seen[0] != seen:
            values = theta.detach()
            if value_checks(values.device) and not bool(torch.isfinite(values).all()):
                raise ValueError("threshold contains NaN or inf")
            if not self.learn_threshold and value_checks(values.device) and not bool((values > 0).all()):
                raise ValueError("threshold must be > 0 for every neuron")
            first = float(values[0])
            uniform = bool((values == values[0]).all())
            self._threshold_seen = (seen, max(first, THRESHOLD_FLOOR) if uniform else None)
        return self._threshold_seen[1]

    @property
    def workspace_bytes(self) -> int:
        """Bytes of the working buffers cached on the layer between calls."""
        return self.workspace.nbytes

    def path_policy(self, backend: backends.Backend) -> PathPolicy:
        """The forced path, or the scheduler's crossover for this device and backend (recorded in `stats`)."""
        crossover, source = self.scheduler.crossover(self.weight.device, backend.name)
        self.stats.update(crossover=crossover, crossover_source=source)
        return PathPolicy(crossover, None if self.path == "auto" else self.path)

    def resolve_backend(self) -> backends.Backend:
        """The implementation for this forward (`backend`, "auto" resolved for the layer's device,
        dtype and spike rule; a fallback to the torch backend warns, see `BackendFallbackWarning`)."""
        return _resolve(self, self.rule)

    @eager_under_compile
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.generator is not None and self.generator.device.type != self.weight.device.type:
            raise ValueError(f"generator is on {self.generator.device} but the layer's weights are on {self.weight.device}")
        _check_input(x, self.in_features)
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters())
        )
        key = rng.next_key(self.generator, self.weight.device) if needs_grad and self.rule.grad == "localzo" else None
        backend = self.resolve_backend()
        policy = self.path_policy(backend)
        if self.family:
            beta, beta_value = _leak_now(self.beta_logit, self._beta)
            cfg = backends.LIFConfig(beta_value, THRESHOLD_FLOOR, self.rule, self.reset, trace_leak=self.learn_beta,
                                     trace_reset=self.learn_threshold and self.reset == "subtract")
            spikes, stats = LIFFamilyFunction.apply(x, self.weight, self.bias, self.recurrent_weight, beta,
                                                    self.threshold.clamp(min=THRESHOLD_FLOOR), cfg, policy, needs_grad,
                                                    key, backend, self.workspace)
        else:
            cfg = backends.LIFConfig(self._beta, self._uniform_threshold(), self.rule)
            spikes, stats = LIFFunction.apply(x, self.weight, self.bias, cfg, policy, needs_grad, key, backend,
                                              self.workspace)
        self.stats.update(path=stats.path, active_fraction=stats.active_fraction, saved_bytes=stats.saved_bytes,
                          backend=stats.backend, ops=stats.ops, grid=stats.grid)
        if stats.active is not None:
            mark_producer(spikes, stats.active)
        if needs_grad and stats.nnz == 0 and not self._warned_silent and not bool(spikes.any()):
            self._warned_silent = True
            warnings.warn(
                f"{self!r} neither fired nor had an active entry (|u - u_th| < delta |z|) in this training "
                f"forward, so its weights get no gradient and it cannot learn. Its input current is too weak: "
                f"scale up its initial weights (e.g. layer.weight.data.mul_(4)), raise delta or lower the threshold.",
                SilentLayerWarning,
            )
        return spikes

    def extra_repr(self) -> str:
        r = self.rule
        uniform = self._uniform_threshold()
        theta = f"{uniform:g}" if uniform is not None else "per neuron"
        family = "".join(f", {name}=True" for name in ("recurrent", "learn_beta", "learn_threshold") if getattr(self, name))
        return (
            f"{self.in_features}, {self.out_features}, beta={self.beta:.4g}, threshold={theta}, reset={self.reset}"
            f"{family}, grad={r.grad}, dist={r.law.name}, delta={r.delta:g}, m={r.m}, path={self.path}"
        )


class LeakyReadout(nn.Module):
    """Non-spiking leaky integrator: o[t] = beta o[t-1] + (1 - beta) (W s)[t], o[-1] = 0.

    Input `(T, B, in_features)`, output membrane traces `(T, B, out_features)`; the paper's
    networks take their max (or sum) over time as logits. Fed by a SparseLIFLinear, it computes
    the gradient of its input only at that layer's active entries. `backend` as in SparseLIFLinear.
    `learn_beta`: the leak is `sigmoid(beta_logit)`, a 0-dim parameter initialised from `beta` (< 1);
    `beta` reads its current value either way.
    """

    def __init__(self, in_features: int, out_features: int, *, beta: float, bias: bool = False,
                 learn_beta: bool = False, backend: str = "auto"):
        super().__init__()
        self.in_features = positive_int("in_features", in_features)
        self.out_features = positive_int("out_features", out_features)
        self.learn_beta = flag("learn_beta", learn_beta)
        self._beta, self.beta_logit = _leak("beta", beta, self.learn_beta)
        self.backend = _check_backend(backend)
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.workspace = backends.Workspace()
        #: for the last forward: `backend`, `ops` (current: a torch GEMM; time_filter; after backward,
        #: input_grad when the input needs a gradient) and `fallback`
        self.stats: dict = {}
        self._warned_fallback = False

    @eager_under_compile
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.in_features)
        backend = _resolve(self, None)
        ops = {"current": "torch"}  # the Function adds the ops it runs
        self.stats.update(backend=backend.name, ops=ops)
        beta, beta_value = _leak_now(self.beta_logit, self._beta)
        return LeakyReadoutFunction.apply(x, self.weight, self.bias, beta, beta_value, backend, self.workspace, ops)

    @property
    def beta(self) -> float:
        """The leak factor now: `sigmoid(beta_logit)` with `learn_beta`, else the fixed value."""
        return _leak_now(self.beta_logit, self._beta)[1]

    def extra_repr(self) -> str:
        learn = ", learn_beta=True" if self.learn_beta else ""
        return f"{self.in_features}, {self.out_features}, beta={self.beta:.4g}{learn}"
