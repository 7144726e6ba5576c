"""LocalZO as the surrogate of snntorch and spikingjelly neurons (paper eqs. 5-7, Algorithm 1).

Both adapters have a Heaviside forward and the LocalZO backward of eq. 7: in the forward call each
entry of `x = u - u_th` draws z_1..z_m from the law and gets

    g = c/m sum_k 1[|x| < delta |z_k|] |z_k|^alpha / (2 delta),

and the backward returns `grad_out * g`. The draws are `ztriton.functional.localzo_active`'s (the
RNG contract of `ztriton.rng`: one Philox key per call from the generator in use), so any law of
`ztriton.distributions` works, a user surrogate included (`distribution_from_surrogate`), and a
seed reproduces every gradient.

g is kept only at its active entries: each forward call saves two 1-D tensors, the flat row-major
positions of the entries with g != 0 (int64) and g there (float32), 12 bytes per active entry
instead of a dense tensor of x's size; the backward scatters `grad_out * g` into a zero gradient
at those positions. The gradient the framework receives is dense (its own ops expect one): the
adapters bring the estimator, not the sparse layer backward of `SparseLIFLinear`.

- `snntorch_spike_grad` returns a callable for snntorch's `spike_grad=` (`snn.Leaky`,
  `snn.Synaptic`, `snn.RLeaky`, ...): snntorch applies it to `mem - threshold` and expects 0/1
  spikes where x > 0. snntorch also calls it on its detached reset branch; that call draws z
  too (one key, its gradient never used).
- `spikingjelly_surrogate` returns a `spikingjelly.activation_based.surrogate.SurrogateFunctionBase`
  subclass instance (class `LocalZO`, built when first asked for, since it needs spikingjelly) for
  the neurons' `surrogate_function=`; spikingjelly fires where x >= 0. spikingjelly 2.0 has no
  kernel for a custom surrogate: its neurons run the plain-PyTorch step loop on any device, and
  its CUDA Triton precision path raises NotImplementedError for such a surrogate.
"""

from __future__ import annotations

import functools
from numbers import Integral

import torch

from .._checks import float_tensor, positive_float, positive_int, value_checks
from ..distributions import Distribution, resolve
from ..functional import _check_generator, heaviside, localzo_active
from ..rng import next_key

__all__ = ["LocalZOSpikeGrad", "snntorch_spike_grad", "spikingjelly_surrogate"]

SPIKINGJELLY_INSTALL = "pip install --no-deps spikingjelly && pip install loguru"


def _fire(x: torch.Tensor, fire_at_zero: bool) -> torch.Tensor:
    """Spikes 0/1 in x's dtype: where x >= 0 with `fire_at_zero` (spikingjelly), else where x > 0."""
    return (x >= 0).to(x.dtype) if fire_at_zero else heaviside(x)


class _SparseGradSpike(torch.autograd.Function):
    """Heaviside forward (x > 0, or x >= 0 with `fire_at_zero`); backward grad_out * g, g held as
    (flat positions of the active entries, g there)."""

    @staticmethod
    def forward(ctx, x, positions, values, fire_at_zero):
        ctx.save_for_backward(positions, values)
        return _fire(x, fire_at_zero)

    @staticmethod
    def backward(ctx, grad_out):
        positions, values = ctx.saved_tensors
        flat = grad_out.reshape(-1)
        grad = torch.zeros_like(flat)
        grad.index_copy_(0, positions, flat.index_select(0, positions) * values.to(flat.dtype))
        return grad.view(grad_out.shape), None, None, None


def _check_seed(seed, generator) -> int | None:
    if seed is None:
        return None
    if generator is not None:
        raise ValueError("give seed or generator, not both")
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def _check_law(dist, delta: float) -> Distribution:
    if callable(dist) and not isinstance(dist, Distribution):
        raise TypeError("dist must be a name or a Distribution; for a surrogate function g use "
                        "dist=distribution_from_surrogate(g, delta=delta)")
    return resolve(dist, delta)


class LocalZOSpikeGrad:
    """Heaviside spikes of `x = u - u_th` with the LocalZO backward of eq. 7 (see the module docstring).

    `fire_at_zero` chooses the forward convention at x == 0 (snntorch: no spike, spikingjelly:
    spike). z comes from `generator`, or from a private generator seeded with `seed` (one per
    device, made on first use), or else from the global generator of x's device. No draw is made
    when no gradient is needed (x does not require grad, or inside no_grad).

    `drawn_entries` and `active_entries` count the entries of the calls that drew z and those of
    them with g != 0 (`active_fraction` their ratio; `reset_counts()` sets both to 0).
    """

    def __init__(self, delta: float = 0.05, m: int = 1, dist: str | Distribution = "normal", *,
                 seed: int | None = None, generator: torch.Generator | None = None, fire_at_zero: bool = False):
        self.delta = positive_float("delta", delta)
        self.m = positive_int("m", m)
        self.law = _check_law(dist, self.delta)
        self.seed = _check_seed(seed, generator)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if not isinstance(fire_at_zero, bool):
            raise TypeError(f"fire_at_zero must be True or False, got {fire_at_zero!r}")
        self.generator = generator
        self.fire_at_zero = fire_at_zero
        self._seeded: dict[torch.device, torch.Generator] = {}
        self.reset_counts()

    def reset_counts(self) -> None:
        """Set `drawn_entries` and `active_entries` to 0."""
        self.drawn_entries = self.active_entries = 0

    @property
    def active_fraction(self) -> float:
        """Fraction of the drawn entries with g != 0 (0.0 before any draw)."""
        return self.active_entries / self.drawn_entries if self.drawn_entries else 0.0

    def _generator_for(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return self.generator
        if device not in self._seeded:
            self._seeded[device] = torch.Generator(device).manual_seed(self.seed)
        return self._seeded[device]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        float_tensor("x", x, finite=isinstance(x, torch.Tensor) and value_checks(x.device))
        if not (torch.is_grad_enabled() and x.requires_grad):
            return _fire(x, self.fire_at_zero)
        generator = self._generator_for(x.device)
        _check_generator(generator, x)
        key = next_key(generator, x.device)
        positions, values = localzo_active(x.detach().abs().reshape(-1), self.delta, self.m, self.law, key)
        self.drawn_entries += x.numel()
        self.active_entries += positions.numel()
        return _SparseGradSpike.apply(x, positions, values, self.fire_at_zero)

    def __repr__(self) -> str:
        source = f"seed={self.seed}" if self.seed is not None else (
            "generator" if self.generator is not None else "global generator")
        return f"LocalZOSpikeGrad(delta={self.delta}, m={self.m}, dist={self.law!r}, {source})"


def snntorch_spike_grad(delta: float = 0.05, m: int = 1, dist: str | Distribution = "normal", *,
                        seed: int | None = None, generator: torch.Generator | None = None) -> LocalZOSpikeGrad:
    """A `spike_grad` for snntorch neurons (`snn.Leaky(beta, spike_grad=...)` and relatives):
    spikes where x = mem - threshold > 0, LocalZO backward (eq. 7) with m samples of `dist`.

    Needs no snntorch to build (it is a plain callable on tensors).
    """
    return LocalZOSpikeGrad(delta, m, dist, seed=seed, generator=generator, fire_at_zero=False)


def _import_spikingjelly_surrogate():
    try:
        from spikingjelly.activation_based import surrogate
    except ImportError as err:
        raise ImportError(f"spikingjelly_surrogate needs spikingjelly ({err}): {SPIKINGJELLY_INSTALL}") from err
    return surrogate


@functools.cache
def _spikingjelly_class() -> type:
    """The `LocalZO` subclass of spikingjelly's SurrogateFunctionBase (spikingjelly imported here)."""
    surrogate = _import_spikingjelly_surrogate()

    class LocalZO(surrogate.SurrogateFunctionBase):
        """spikingjelly surrogate: spikes where x >= 0, LocalZO backward (eq. 7).

        `spiking=False` (spikingjelly's smooth-primitive mode) is refused: LocalZO's surrogate is
        only known in expectation, it has no primitive function to evaluate.
        """

        def __init__(self, estimator: LocalZOSpikeGrad, spiking: bool = True):
            super().__init__(spiking=spiking)
            self.estimator = estimator

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not self.spiking:
                raise NotImplementedError("LocalZO has no primitive function: spiking=False is not supported")
            return self.estimator(x)

        def extra_repr(self) -> str:
            est = self.estimator
            return f"delta={est.delta}, m={est.m}, dist={est.law!r}, spiking={self.spiking}"

    # pickled by name: this module's __getattr__ gives the class back
    LocalZO.__module__, LocalZO.__qualname__ = __name__, "LocalZO"
    return LocalZO


def __getattr__(name: str):
    if name == "LocalZO":
        return _spikingjelly_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def spikingjelly_surrogate(delta: float = 0.05, m: int = 1, dist: str | Distribution = "normal", *,
                           seed: int | None = None, generator: torch.Generator | None = None):
    """A `surrogate_function` for spikingjelly neurons (`neuron.LIFNode(surrogate_function=...)`):
    spikes where x = v - v_threshold >= 0, LocalZO backward (eq. 7) with m samples of `dist`.

    An instance of `LocalZO`, a subclass of `spikingjelly.activation_based.surrogate.
    SurrogateFunctionBase` (with its `spiking` attribute). Raises ImportError without spikingjelly.
    """
    estimator = LocalZOSpikeGrad(delta, m, dist, seed=seed, generator=generator, fire_at_zero=True)
    return _spikingjelly_class()(estimator)
