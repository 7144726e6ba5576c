"""Sampling laws of z: moments, symmetry, Table 1, Theorem 3 tables and input checks."""

import math

import pytest
import torch

from ztriton import distribution_from_surrogate, get_distribution
from ztriton.distributions import SIGMOID_A, FastSigmoid, Sigmoid

# Every statistical assertion allows Z standard errors: a false failure has probability < 6e-7 per
# assertion (and the seeds are fixed, so a run is deterministic).
Z = 5.0
N = 1_000_000
FINITE_VARIANCE = ["normal", "uniform", "laplace", "sigmoid"]


def _sigmoid_g(k):
    def g(v):
        e = torch.exp(-k * v.abs())
        return k * e / (1.0 + e) ** 2

    return g


@pytest.mark.parametrize("name", FINITE_VARIANCE)
def test_samples_have_mean_zero_and_unit_variance(name):
    z = get_distribution(name).sample((N,), torch.Generator().manual_seed(1)).double()
    assert z.dtype == torch.float64 and z.shape == (N,)
    assert abs(z.mean()) < Z * z.std() / math.sqrt(N)
    square = z * z
    assert abs(square.mean() - 1.0) < Z * square.std() / math.sqrt(N)


@pytest.mark.parametrize("name", FINITE_VARIANCE + ["fast_sigmoid"])
def test_samples_are_symmetric(name):
    z = get_distribution(name).sample((N,), torch.Generator().manual_seed(2))
    positive = (z > 0).double().mean()
    assert abs(positive - 0.5) < Z * 0.5 / math.sqrt(N)
    # the law of z equals the law of -z: compare quantiles of the two halves
    probs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    upper = torch.quantile(z[z > 0][:200_000], probs)
    lower = torch.quantile(-z[z < 0][:200_000], probs)
    torch.testing.assert_close(upper, lower, rtol=0.02, atol=0.0)


def test_fast_sigmoid_matches_its_closed_form_cdf():
    law = FastSigmoid(k=100.0, delta=0.05)
    abs_z = law.sample_abs((200_000,), torch.Generator().manual_seed(3)).double().sort().values
    y = 100.0 * 0.05 * abs_z
    cdf = (y / (1.0 + y)) ** 2
    empirical = torch.arange(1, abs_z.numel() + 1, dtype=torch.float64) / abs_z.numel()
    ks = (cdf - empirical).abs().max()
    assert ks < 1.95 / math.sqrt(abs_z.numel())  # Kolmogorov-Smirnov, 99.9 % level


TABLE_1 = [  # Table 1 of the paper: E[max_k |z_k|] for m = 1 and m = 5
    ("normal", 1, 0.7979),
    ("normal", 5, 1.5698),
    ("uniform", 1, 0.8660),
    ("uniform", 5, 1.4434),
    ("laplace", 1, 0.7071),
    ("laplace", 5, 1.6146),
    ("sigmoid", 1, 0.7659),
]


@pytest.mark.parametrize("name,m,expected", TABLE_1)
def test_backprop_threshold_reproduces_table_1(name, m, expected):
    law = get_distribution(name)
    assert law.backprop_threshold(0.05, m) / 0.05 == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("m", [1, 2, 3, 5, 10])
def test_uniform_threshold_has_closed_form(m):
    assert get_distribution("uniform").backprop_threshold(0.1, m) == pytest.approx(0.1 * math.sqrt(3) * m / (m + 1))


@pytest.mark.parametrize("name,m", [("normal", 3), ("laplace", 5), ("sigmoid", 5), ("uniform", 4)])
def test_backprop_threshold_matches_monte_carlo_max(name, m):
    law = get_distribution(name)
    gen = torch.Generator().manual_seed(4)
    largest = torch.stack([law.sample_abs((200_000,), gen) for _ in range(m)]).amax(0).double()
    mc = largest.mean()
    assert abs(law.backprop_threshold(0.05, m) / 0.05 - mc) < Z * largest.std() / math.sqrt(largest.numel())


def test_fast_sigmoid_threshold_is_infinite():
    assert get_distribution("fast_sigmoid").backprop_threshold(0.05) == math.inf


def test_sigmoid_constants():
    law = get_distribution("sigmoid")
    assert 1.0 / SIGMOID_A**2 == pytest.approx(0.4262, abs=1e-4)
    assert law.c == pytest.approx(1.0)
    assert law.k == pytest.approx(SIGMOID_A / 0.05)
    custom = Sigmoid(k=10.0, delta=0.05)
    assert custom.c == pytest.approx((0.05 * 10.0 / SIGMOID_A) ** 2)


def test_surrogate_table_of_the_sigmoid_matches_the_builtin_law():
    builtin = get_distribution("sigmoid", delta=0.05)
    derived = distribution_from_surrogate(_sigmoid_g(SIGMOID_A / 0.05), delta=0.05)
    assert derived.c == pytest.approx(builtin.c, rel=1e-5)
    probs = torch.linspace(0.01, 0.99, 99)
    torch.testing.assert_close(derived.quantile_abs(probs), builtin.quantile_abs(probs), rtol=1e-4, atol=0.0)
    for m in (1, 5):
        assert derived.backprop_threshold(0.05, m) == pytest.approx(builtin.backprop_threshold(0.05, m), rel=1e-4)
    # the table's law has the analytic mean a/2 of eq. 15
    z = derived.sample((N,), torch.Generator().manual_seed(5)).double()
    assert abs(z.abs().mean() - SIGMOID_A / 2) < Z * z.abs().std() / math.sqrt(N)
    assert abs(z.mean()) < Z * z.std() / math.sqrt(N)


def test_surrogate_table_of_fast_sigmoid_matches_closed_form():
    derived = distribution_from_surrogate(lambda v: 1.0 / (1.0 + 100.0 * v.abs()) ** 2, delta=0.05, alpha=-1)
    assert derived.c == pytest.approx(2.0 / 100.0, rel=1e-4)
    probs = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    root = probs.sqrt()
    exact = root / (1.0 - root) / (100.0 * 0.05)
    torch.testing.assert_close(derived.quantile_abs(probs.float()).double(), exact, rtol=1e-3, atol=0.0)


def test_surrogate_expected_grad_equals_g():
    g = lambda v: torch.exp(-0.5 * (v / 0.1) ** 2)  # noqa: E731  (a Gaussian bump of width 0.1)
    law = distribution_from_surrogate(g, delta=0.05)
    v = torch.linspace(-0.4, 0.4, 81, dtype=torch.float64)
    torch.testing.assert_close(law.expected_grad(v, 0.05), g(v), rtol=1e-3, atol=1e-6)
    assert law.support[0] < 1e-4 and law.support[1] > 1e3
    assert law.truncated_mass < 1e-3


@pytest.mark.parametrize(
    "g,alpha,message",
    [
        (lambda v: 1.0 / (1.0 + v.abs()), 1, "g must have a finite integral: its tail decays too slowly"),
        (lambda v: torch.clamp(1.0 - v.abs(), min=0.0), 1, "the integral c of Theorem 3 diverges"),
        (lambda v: torch.exp(-v * v) * (v > -1), 1, r"g must be even: g\(-v\) differs from g\(v\)"),
        (lambda v: torch.exp(-v * v) - 0.1, 1, "g must be non-negative"),
        (lambda v: torch.exp(-((v.abs() - 1) ** 2)), 1, r"g must be non-increasing on \[0, inf\)"),
        (lambda v: torch.zeros_like(v), 1, r"g\(0\) must be finite and > 0"),
        (lambda v: torch.ones_like(v), 1, "g must have a finite integral: it does not decay"),
        (lambda v: torch.exp(-v * v), 2, "alpha must be 1 or -1, got 2"),
    ],
)
def test_invalid_surrogates_are_refused(g, alpha, message):
    with pytest.raises(ValueError, match=message):
        distribution_from_surrogate(g, delta=0.05, alpha=alpha)


def test_triangle_surrogate_works_with_alpha_minus_one():
    law = distribution_from_surrogate(lambda v: torch.clamp(1.0 - 10.0 * v.abs(), min=0.0), delta=0.05, alpha=-1)
    v = torch.linspace(-0.12, 0.12, 25, dtype=torch.float64)
    torch.testing.assert_close(law.expected_grad(v, 0.05), torch.clamp(1.0 - 10.0 * v.abs(), min=0.0), rtol=0, atol=2e-3)


def test_bad_names_and_parameters():
    with pytest.raises(ValueError, match=r"dist must be one of \['fast_sigmoid', 'laplace', 'normal', 'sigmoid', 'uniform'\], got 'gauss'"):
        get_distribution("gauss")
    with pytest.raises(TypeError, match="dist must be a name or a Distribution, got int"):
        get_distribution(3)
    with pytest.raises(TypeError, match="bad parameters for the 'normal' distribution"):
        get_distribution("normal", k=3)
    with pytest.raises(ValueError, match="k must be finite and > 0, got -1.0"):
        get_distribution("fast_sigmoid", k=-1)
    with pytest.raises(ValueError, match="delta must be finite and > 0, got nan"):
        get_distribution("normal").backprop_threshold(float("nan"))
    with pytest.raises(ValueError, match="m must be >= 1, got 0"):
        get_distribution("normal").backprop_threshold(0.05, 0)
    with pytest.raises(TypeError, match="m must be an int, got float"):
        get_distribution("normal").backprop_threshold(0.05, 1.5)
    with pytest.raises(ValueError, match="delta=0.1 does not match the delta=0.05 the 'fast_sigmoid' distribution"):
        get_distribution("fast_sigmoid").expected_grad(torch.zeros(3), 0.1)
