"""Sampling distributions of the LocalZO perturbation z (paper sections 4.3-4.5, appendix A).

LocalZO draws z ~ lambda per neuron and time step and forms (eq. 6/7)

    g = c/m * sum_k 1[|v| < delta |z_k|] |z_k|^alpha / (2 delta),

so a distribution supplies: how to draw |z| (every law here is even), the exponent `alpha`, the
scale `c` of Theorem 3, the surrogate the estimate equals in expectation (Theorem 2, eq. 8) and the
expected back-propagation threshold B_th = delta * E[max_k |z_k|] (eq. 21).

Built-in laws (unit variance where the variance exists, so that delta is comparable):
normal N(0, 1), uniform U(-sqrt3, sqrt3), laplace Laplace(0, 1/sqrt2), sigmoid (Theorem 3 for the
sigmoid surrogate, eq. 10/14) and fast_sigmoid (Theorem 3 with alpha = -1, eq. 16). Any other
surrogate g becomes a law through `distribution_from_surrogate` (Theorem 3, appendix A.2.3).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from . import rng
from ._checks import positive_float, positive_int

__all__ = [
    "Distribution",
    "Normal",
    "Uniform",
    "Laplace",
    "Sigmoid",
    "FastSigmoid",
    "SurrogateDistribution",
    "get_distribution",
    "distribution_from_surrogate",
    "kernel_law",
    "kernel_law_refusal",
    "SIGMOID_A",
    "DISTRIBUTIONS",
]

_ZETA3 = 1.2020569031595942
#: The constant `a` of the sigmoid law (appendix A.2.1): 1/a^2 = 2 int_0^inf e^-x (1 - e^-x) /
#: (x (1 + e^-x)^3) dx = 7 zeta(3) / (2 pi^2) = 0.42628 (the paper rounds it to 0.4262).
SIGMOID_A = math.pi * math.sqrt(2.0 / (7.0 * _ZETA3))

def _device_of(generator: torch.Generator | None, device) -> torch.device:
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def _shape_index(shape, device) -> torch.Tensor:
    return torch.arange(math.prod(shape), dtype=torch.int64, device=device)


class Distribution:
    """An even law of z. Subclasses implement `abs_z_from_uniforms`, `expected_grad` and `_expected_max_abs`."""

    name: str = "distribution"
    #: exponent of |z| in eq. 7
    alpha: float = 1.0
    #: scale constant of Theorem 3 (1 for the unit-variance families)
    c: float = 1.0
    #: the delta a surrogate-derived law was built for (its pdf depends on delta); None: any delta
    delta: float | None = None

    def abs_z_from_uniforms(self, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
        """|z| from the two float32 uniforms of the RNG contract (`ztriton.rng`), in float32.

        The expression is the one every backend's kernel evaluates, operation for operation.
        """
        raise NotImplementedError

    def sample_abs(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """|z| for `shape` independent draws, float32, through the RNG contract (one key from `generator`)."""
        device = _device_of(generator, device)
        key = rng.next_key(generator, device)
        return rng.abs_z(self, key, _shape_index(shape, device), 0).view(shape)

    @functools.cached_property
    def abs_z_bound(self) -> float:
        """The largest |z| a draw can return (at the extreme uniforms of the contract); inf if none."""
        u1 = torch.tensor([0.0, rng.UNIFORM_MAX])
        return float(self.abs_z_from_uniforms(u1, torch.zeros(2)).max())

    def sample(self, shape, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """z for `shape` independent draws, float32: |z| with a sign from the contract's third output."""
        device = _device_of(generator, device)
        key = rng.next_key(generator, device)
        index = _shape_index(shape, device)
        u1, u2 = rng.uniforms(key, index, 0)
        sign = rng.philox(key.seed, index & rng.MASK32, index >> 32, key.offset & rng.MASK32, 0)[2] & 1
        magnitude = self.abs_z_from_uniforms(u1, u2)
        return torch.where(sign.bool(), magnitude, -magnitude).view(shape)

    def expected_grad(self, v: torch.Tensor, delta: float) -> torch.Tensor:
        """c * E_z[G(v; z, delta)] (Theorem 2 / 3): the surrogate LocalZO equals in expectation."""
        raise NotImplementedError

    def backprop_threshold(self, delta: float, m: int = 1) -> float:
        """Expected back-propagation threshold B_th = delta * E[max_k |z_k|], k = 1..m (eq. 21)."""
        delta = self.check_delta(delta)
        m = positive_int("m", m)
        return delta * self._expected_max_abs(m)

    def _expected_max_abs(self, m: int) -> float:
        raise NotImplementedError

    def check_delta(self, delta) -> float:
        """`delta` as a float; for a law built for one delta, it must be that delta."""
        delta = positive_float("delta", delta)
        if self.delta is not None and not math.isclose(delta, self.delta, rel_tol=1e-12):
            raise ValueError(
                f"delta={delta} does not match the delta={self.delta} the {self.name!r} "
                f"distribution was built for"
            )
        return delta

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha}, c={self.c:.6g}, delta={self.delta})"


def _as_float(v: torch.Tensor) -> torch.Tensor:
    return v if v.dtype == torch.float64 else v.float()


class Normal(Distribution):
    """N(0, 1); expected surrogate exp(-v^2 / 2 delta^2) / (delta sqrt(2 pi)) (eq. 9/11)."""

    name = "normal"

    def abs_z_from_uniforms(self, u1, u2):
        # Box-Muller as Triton's tl.randn: |z| = sqrt(-2 ln u1) |cos(2 pi u2)|, u1 clamped to 1e-7;
        # log, sqrt and cos in float64, rounded once (the correctly rounded float32 value)
        radius = torch.sqrt(-2.0 * torch.log(u1.clamp_min(1e-7).double()))
        return (radius * torch.cos((u2 * 6.283185307179586).double())).abs().float()

    def expected_grad(self, v, delta):
        delta = self.check_delta(delta)
        x = _as_float(v) / delta
        return (torch.exp(-0.5 * x * x) / (delta * math.sqrt(2.0 * math.pi))).to(v.dtype)

    def _expected_max_abs(self, m):
        if m == 1:
            return math.sqrt(2.0 / math.pi)
        # E[max] = int_0^inf 1 - P(|z| < x)^m dx with P(|z| < x) = erf(x / sqrt 2)  (eq. 22)
        x = torch.linspace(0.0, 40.0, 400_001, dtype=torch.float64)
        return float(torch.trapezoid(1.0 - torch.special.erf(x / math.sqrt(2.0)) ** m, x))


class Uniform(Distribution):
    """U(-sqrt3, sqrt3); expected surrogate (3 - v^2/delta^2) / (4 sqrt3 delta) on |v| < sqrt3 delta (eq. 12)."""

    name = "uniform"

    def abs_z_from_uniforms(self, u1, u2):
        return u1 * 1.7320508075688772

    def expected_grad(self, v, delta):
        delta = self.check_delta(delta)
        x = _as_float(v) / delta
        inside = (3.0 - x * x) / (4.0 * math.sqrt(3.0) * delta)
        return torch.where(x.abs() < math.sqrt(3.0), inside, torch.zeros_like(inside)).to(v.dtype)

    def _expected_max_abs(self, m):
        return math.sqrt(3.0) * m / (m + 1)  # eq. 23


class Laplace(Distribution):
    """Laplace(0, 1/sqrt2); expected surrogate (|v|/delta + 1/sqrt2) exp(-sqrt2 |v|/delta) / (2 delta) (eq. 13)."""

    name = "laplace"

    def abs_z_from_uniforms(self, u1, u2):
        # |z| ~ Exp(sqrt2); 1 - u1 in float32 (as every kernel), the log in float64, rounded once
        return (-torch.log((1.0 - u1).double()) * 0.7071067811865476).float()

    def expected_grad(self, v, delta):
        delta = self.check_delta(delta)
        x = _as_float(v).abs() / delta
        return ((x + 1.0 / math.sqrt(2.0)) * torch.exp(-math.sqrt(2.0) * x) / (2.0 * delta)).to(v.dtype)

    def _expected_max_abs(self, m):
        # |z| ~ Exp(sqrt2); the max of m such draws has mean H_m / sqrt2 (eq. 24 in closed form)
        return sum(1.0 / k for k in range(1, m + 1)) / math.sqrt(2.0)


class FastSigmoid(Distribution):
    """Theorem 3 for g(v) = 1 / (1 + k|v|)^2 with alpha = -1, c = 2/k (appendix A.2.2, eq. 16).

    With y = k delta |z|, the law of |z| has pdf 2y / (1+y)^3 and CDF (y / (1+y))^2, inverted in
    closed form. Its tail decays like 1/|z|^2: E|z| and the variance are infinite, and so is the
    back-propagation threshold of eq. 21 (`backprop_threshold` returns inf).
    """

    name = "fast_sigmoid"
    alpha = -1.0

    def __init__(self, k: float = 100.0, delta: float = 0.05):
        self.k = positive_float("k", k)
        self.delta = positive_float("delta", delta)
        self.c = 2.0 / self.k

    def abs_z_from_uniforms(self, u1, u2):
        root = u1.double().sqrt().float()  # the correctly rounded float32 sqrt, as the kernels' sqrt
        return root / ((1.0 - root) * (self.k * self.delta))

    def expected_grad(self, v, delta):
        self.check_delta(delta)
        return (1.0 / (1.0 + self.k * _as_float(v).abs()) ** 2).to(v.dtype)

    def _expected_max_abs(self, m):
        return math.inf


class SurrogateDistribution(Distribution):
    """The law of Theorem 3 for a surrogate g, sampled by inverse transform from a table (A.2.3).

    With y = delta |z|, the pdf of |z| is proportional to y^-alpha (-g'(y)) and
    c = 2 delta^(1+alpha) int_0^inf y^-alpha (-g'(y)) dy. The table is the CDF of |z| on
    `num_points` log-spaced points covering 12 decades around the half-width of g (relative
    spacing 1.4e-3 for the default 20,001 points); a draw takes a uniform r, finds |z| by binary
    search and linear interpolation in that CDF, and gets an independent random sign, so the law is
    symmetric and unbiased by construction. `support` is the covered |z| range, `truncated_mass`
    an estimate of the probability the table leaves out (below 1e-3 by construction).
    """

    name = "surrogate"

    def __init__(
        self,
        surrogate: Callable[[torch.Tensor], torch.Tensor],
        neg_derivative: Callable[[torch.Tensor], torch.Tensor] | None,
        *,
        delta: float,
        alpha: float = 1.0,
        num_points: int = 20_001,
    ):
        self.delta = positive_float("delta", delta)
        if alpha not in (1, -1):
            raise ValueError(f"alpha must be 1 or -1, got {alpha!r}")
        self.alpha = float(alpha)
        num_points = positive_int("num_points", num_points)
        if num_points < 1001:
            raise ValueError(f"num_points must be >= 1001, got {num_points}")
        if not callable(surrogate):
            raise TypeError(f"g must be callable, got {type(surrogate).__name__}")
        self.surrogate = surrogate
        half_width = _check_surrogate(surrogate)
        y = torch.logspace(-6, 6, num_points, dtype=torch.float64) * half_width
        neg_dg = (neg_derivative or _negative_derivative(surrogate))(y).clamp_min(0.0)
        density = y.pow(-self.alpha) * neg_dg  # unnormalised pdf of y = delta |z|
        integral = float(torch.trapezoid(density, y))
        if not math.isfinite(integral) or integral <= 0.0:
            raise ValueError("g gives no valid distribution: the integral c of Theorem 3 is not finite and > 0")
        # mass per unit of log(y) at the two ends of the grid, relative to the whole: large when
        # the Theorem-3 integral diverges there (e.g. alpha = 1 for a g with a kink at 0)
        end_mass = (density[[0, -1]] * y[[0, -1]] / integral).max().item()
        if end_mass > 1e-3:
            raise ValueError(
                f"the integral c of Theorem 3 diverges for this g with alpha={alpha:g} "
                f"(relative mass per log-unit at the ends of the grid: {end_mass:.2g})"
            )
        self.truncated_mass = end_mass
        self.c = 2.0 * self.delta ** (1.0 + self.alpha) * integral
        cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(density, y)])
        self._abs_z = (y / self.delta).float()
        self._cdf64 = cdf / cdf[-1]
        self._cdf = self._cdf64.float()
        self.support = (float(self._abs_z[0]), float(self._abs_z[-1]))
        # tail[i] = int_{y_i}^inf y^alpha pdf(y) dy, for the numerical expected surrogate (eq. 8)
        weighted = y.pow(self.alpha) * density / integral
        tail = torch.trapezoid(weighted, y) - torch.cat(
            [torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(weighted, y)]
        )
        self._log_y = y.log()
        self._tail = tail.clamp_min(0.0)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def sampling_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(CDF, |z|) float32 tables on `device` that sampling interpolates in (cached per device)."""
        device = torch.device(device)
        if device not in self._cache:
            self._cache[device] = (self._cdf.to(device), self._abs_z.to(device))
        return self._cache[device]

    def abs_z_from_uniforms(self, u1, u2):
        return self.quantile_abs(u1)

    def quantile_abs(self, r: torch.Tensor) -> torch.Tensor:
        """Inverse CDF of |z| at probabilities `r` (float32 in [0, 1]): the smallest table index with
        CDF >= r, then linear interpolation (as the kernels' binary search)."""
        cdf, abs_z = self.sampling_tables(r.device)
        upper = torch.searchsorted(cdf, r).clamp_(1, cdf.numel() - 1)
        lower = upper - 1
        c_lo, c_hi = cdf[lower], cdf[upper]
        frac = ((r - c_lo) / (c_hi - c_lo).clamp_min(1e-30)).clamp_(0.0, 1.0)
        z_lo = abs_z[lower]
        return z_lo + frac * (abs_z[upper] - z_lo)

    def expected_grad(self, v, delta):
        """c E[G] computed from the table (eq. 8); equals g(v) up to the table's resolution."""
        delta = self.check_delta(delta)
        log_y = torch.log(v.detach().abs().double().clamp_min(1e-300)).flatten()
        log_grid = self._log_y.to(v.device)
        idx = torch.searchsorted(log_grid, log_y).clamp_(1, log_grid.numel() - 1)
        lo, hi = log_grid[idx - 1], log_grid[idx]
        frac = ((log_y - lo) / (hi - lo)).clamp_(0.0, 1.0)
        tail = self._tail.to(v.device)
        value = tail[idx - 1] + frac * (tail[idx] - tail[idx - 1])
        # eq. 8 in y = delta|z|: c/(2 delta) * E_|z|[|z|^alpha ; delta|z| > |v|]
        scale = self.c / (2.0 * delta) / delta**self.alpha
        return (scale * value).reshape(v.shape).to(v.dtype)

    def _expected_max_abs(self, m):
        abs_z = self._abs_z.double()
        return float(abs_z[0]) + float(torch.trapezoid(1.0 - self._cdf64**m, abs_z))


class Sigmoid(SurrogateDistribution):
    """Theorem 3 for the sigmoid surrogate g(v) = k e^{-kv} / (1 + e^{-kv})^2 (eq. 10/14).

    `k` defaults to a/delta (a = SIGMOID_A), which makes c = delta^2 k^2 / a^2 = 1 and E|z| = a/2.
    """

    name = "sigmoid"

    def __init__(self, k: float | None = None, delta: float = 0.05):
        delta = positive_float("delta", delta)
        self.k = SIGMOID_A / delta if k is None else positive_float("k", k)
        k_ = self.k

        def neg_derivative(y):
            e = torch.exp(-k_ * y)
            return k_ * k_ * e * (1.0 - e) / (1.0 + e) ** 3

        super().__init__(self._surrogate, neg_derivative, delta=delta, alpha=1.0)
        self.c = (delta * self.k / SIGMOID_A) ** 2  # closed form of Theorem 3's integral

    def _surrogate(self, v):
        e = torch.exp(-self.k * v.abs())
        return self.k * e / (1.0 + e) ** 2

    def expected_grad(self, v, delta):
        self.check_delta(delta)
        return self._surrogate(_as_float(v)).to(v.dtype)


def _negative_derivative(g: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    """-g'(y) by autograd (exact almost everywhere), or by central differences if g is not traceable."""

    def neg_dg(y: torch.Tensor) -> torch.Tensor:
        x = y.clone().requires_grad_(True)
        try:
            with torch.enable_grad():
                out = g(x)
                (grad,) = torch.autograd.grad(out.sum(), x)
            return -grad.detach()
        except (RuntimeError, TypeError):
            h = 1e-6 * y
            with torch.no_grad():
                return -(g(y + h) - g(y - h)) / (2.0 * h)

    return neg_dg


def _eval(g: Callable, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = g(y)
    if not isinstance(out, torch.Tensor) or out.shape != y.shape:
        raise ValueError("g must map a float64 tensor to a tensor of the same shape")
    return out.double()


def _check_surrogate(g: Callable) -> float:
    """Check Definition 4.1 (even, non-negative, non-increasing on [0, inf), finite integral) on a grid.

    Returns the half-width y with g(y) = g(0)/2, the scale of the table.
    """
    g0 = float(_eval(g, torch.zeros(1, dtype=torch.float64))[0])
    if not math.isfinite(g0) or g0 <= 0.0:
        raise ValueError(f"g(0) must be finite and > 0, got {g0}")
    low, high = 0.0, 1.0
    for _ in range(200):
        if float(_eval(g, torch.tensor([high], dtype=torch.float64))[0]) <= g0 / 2:
            break
        low, high = high, high * 2.0
    else:
        raise ValueError("g must have a finite integral: it does not decay to g(0)/2")
    for _ in range(60):
        mid = 0.5 * (low + high)
        if float(_eval(g, torch.tensor([mid], dtype=torch.float64))[0]) > g0 / 2:
            low = mid
        else:
            high = mid
    half_width = high
    y = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-6, 6, 4001, dtype=torch.float64) * half_width])
    values = _eval(g, y)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("g must be finite everywhere")
    if bool((values < 0).any()):
        raise ValueError("g must be non-negative")
    if not torch.allclose(_eval(g, -y), values, rtol=1e-6, atol=1e-9 * g0):
        raise ValueError("g must be even: g(-v) differs from g(v)")
    if bool((values[1:] > values[:-1] * (1 + 1e-9) + 1e-12 * g0).any()):
        raise ValueError("g must be non-increasing on [0, inf)")
    # for a monotone g with a finite integral, y g(y) -> 0; a slow tail means the integral diverges
    integral = float(torch.trapezoid(values, y))
    if float(y[-1] * values[-1]) > 1e-3 * integral:
        raise ValueError("g must have a finite integral: its tail decays too slowly")
    return half_width


def distribution_from_surrogate(
    g: Callable[[torch.Tensor], torch.Tensor], *, delta: float, alpha: float = 1.0, num_points: int = 20_001
) -> SurrogateDistribution:
    """The sampling law of Theorem 3 for any surrogate `g` (a callable on tensors).

    `g` must be even, non-negative, non-increasing on [0, inf) with a finite integral
    (Definition 4.1), and Theorem 3's constant c must be finite for the chosen `alpha`
    (1, or -1 for surrogates with a kink at 0 such as the fast sigmoid). The returned law is bound to
    `delta` (its pdf depends on it) and satisfies c E[G(v; z, delta)] = g(v).
    """
    return SurrogateDistribution(g, None, delta=delta, alpha=alpha, num_points=num_points)


#: the |z| expressions of the native and Triton kernels; a kernel's law code is the index here
KERNEL_LAWS = ("normal", "uniform", "laplace", "fast_sigmoid", "table")


def kernel_law(law: Distribution) -> str | None:
    """Which |z| expression the native and Triton kernels evaluate for `law`: "normal", "uniform",
    "laplace", "fast_sigmoid" (closed forms) or "table" (inverse transform through
    `sampling_tables`), the one its `abs_z_from_uniforms` is; None for a law whose draws only its
    own torch code gives (a custom `Distribution` subclass), which runs on the torch backend."""
    method = type(law).abs_z_from_uniforms
    for cls, name in ((Normal, "normal"), (Uniform, "uniform"), (Laplace, "laplace"),
                      (FastSigmoid, "fast_sigmoid")):
        if method is cls.abs_z_from_uniforms:
            return name
    if method is SurrogateDistribution.abs_z_from_uniforms and type(law).quantile_abs is SurrogateDistribution.quantile_abs:
        return "table"
    return None


def kernel_law_refusal(law: Distribution, backend: str) -> str | None:
    """None if the `backend` kernels draw `law`'s z, else why not and what to do instead."""
    if kernel_law(law) is not None:
        return None
    return (f"the {backend} kernels cannot draw z for {law!r}, whose |z| only its own torch code "
            f"(abs_z_from_uniforms) gives: build the law with distribution_from_surrogate (the kernels sample "
            f"its CDF table) or use backend='torch'")


DISTRIBUTIONS = {
    "normal": Normal,
    "uniform": Uniform,
    "laplace": Laplace,
    "sigmoid": Sigmoid,
    "fast_sigmoid": FastSigmoid,
}


def get_distribution(name: str, **params) -> Distribution:
    """The distribution called `name` ("normal", "uniform", "laplace", "sigmoid", "fast_sigmoid").

    `sigmoid` takes `k` (default a/delta) and `delta` (default 0.05); `fast_sigmoid` takes `k`
    (default 100) and `delta` (default 0.05); the unit-variance families take no parameters.
    """
    if not isinstance(name, str):
        raise TypeError(f"dist must be a name or a Distribution, got {type(name).__name__}")
    if name not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {sorted(DISTRIBUTIONS)}, got {name!r}")
    try:
        return DISTRIBUTIONS[name](**params)
    except TypeError as err:
        raise TypeError(f"bad parameters for the {name!r} distribution: {err}") from None


_DELTA_FREE = ("normal", "uniform", "laplace")


@functools.lru_cache(maxsize=64)
def _named(name: str, delta: float) -> Distribution:
    return get_distribution(name) if name in _DELTA_FREE else get_distribution(name, delta=delta)


def resolve(dist, delta: float) -> Distribution:
    """A Distribution for `dist` (a name or an object) used with `delta`.

    A name is built (once, then cached) for `delta` where its law depends on it; an object must
    have been built for `delta`.
    """
    delta = positive_float("delta", delta)
    if isinstance(dist, Distribution):
        dist.check_delta(delta)
        return dist
    if not isinstance(dist, str):
        raise TypeError(f"dist must be a name or a Distribution, got {type(dist).__name__}")
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"dist must be one of {sorted(DISTRIBUTIONS)}, got {dist!r}")
    return _named(dist, delta)
