"""Spike functions: Heaviside forward, LocalZO estimate vs Theorem 2/3 surrogate, reproducibility, errors."""

import math

import pytest
import torch

from ztriton import get_distribution, localzo_spike, sparsegrad_spike, surrogate_spike
from ztriton.distributions import FastSigmoid, Sigmoid
from ztriton.functional import heaviside, localzo_grad, sparsegrad_grad, surrogate_grad

Z = 5.0  # standard errors allowed in Monte Carlo comparisons (false-failure rate < 6e-7 each)
SPIKES = {
    "localzo": lambda v: localzo_spike(v, 0.05),
    "surrogate": lambda v: surrogate_spike(v, "normal", 0.05),
    "sparsegrad": lambda v: sparsegrad_spike(v, "normal", 0.05),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", sorted(SPIKES))
def test_forward_is_heaviside(kind, dtype):
    v = torch.tensor([-1.0, -1e-3, 0.0, 1e-3, 2.0, -0.0], dtype=dtype, requires_grad=True)
    out = SPIKES[kind](v)
    assert out.dtype == dtype
    assert out.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    torch.testing.assert_close(heaviside(v.detach()), out.detach())


def _law(name, delta):
    if name == "sigmoid":
        return Sigmoid(delta=delta)
    if name == "fast_sigmoid":
        return FastSigmoid(k=100.0, delta=delta)
    return get_distribution(name)


@pytest.mark.parametrize("name", ["normal", "uniform", "laplace", "sigmoid", "fast_sigmoid"])
@pytest.mark.parametrize("delta", [0.05, 0.5])
@pytest.mark.parametrize("m", [1, 5])
def test_localzo_gradient_is_unbiased_for_the_expected_surrogate(name, delta, m):
    law = _law(name, delta)
    # 40 points in [-3 delta, 3 delta] (v = 0 excluded: the fast-sigmoid estimate has infinite variance there)
    v = delta * torch.linspace(-3.0, 3.0, 41)
    v = v[v != 0]
    draws = 40_000
    g = localzo_grad(v.expand(draws, -1).contiguous(), delta, m, law, torch.Generator().manual_seed(11)).double()
    mean, stderr = g.mean(0), g.std(0) / math.sqrt(draws)
    expected = law.expected_grad(v.double(), delta)
    # a tiny absolute slack covers points where the estimate is exactly zero in every draw
    assert torch.all((mean - expected).abs() <= Z * stderr + 1e-3 * expected.max())


@pytest.mark.parametrize("kind", ["localzo", "surrogate", "sparsegrad"])
def test_backward_multiplies_by_g(kind):
    v = torch.randn(7, 13, generator=torch.Generator().manual_seed(0)) * 0.1
    grad_out = torch.randn(7, 13, generator=torch.Generator().manual_seed(1))
    x = v.clone().requires_grad_(True)
    if kind == "localzo":
        out = localzo_spike(x, 0.05, 2, "laplace", generator=torch.Generator().manual_seed(5))
        g = localzo_grad(v, 0.05, 2, "laplace", generator=torch.Generator().manual_seed(5))
    elif kind == "surrogate":
        out, g = surrogate_spike(x, "uniform", 0.05), surrogate_grad(v, "uniform", 0.05)
    else:
        out, g = sparsegrad_spike(x, "normal", 0.05), sparsegrad_grad(v, "normal", 0.05)
    out.backward(grad_out)
    torch.testing.assert_close(x.grad, grad_out * g, rtol=0, atol=0)


def test_sparsegrad_is_the_truncated_surrogate():
    v = torch.linspace(-0.2, 0.2, 401)
    bth = get_distribution("normal").backprop_threshold(0.05, 1)
    dense = surrogate_grad(v, "normal", 0.05)
    sparse = sparsegrad_grad(v, "normal", 0.05)
    inside = v.abs() < bth
    assert torch.equal(sparse[inside], dense[inside])
    assert torch.all(sparse[~inside] == 0)
    assert 0 < inside.sum() < v.numel()
    explicit = sparsegrad_grad(v, "normal", 0.05, bth=0.01)
    assert torch.equal(explicit != 0, v.abs() < 0.01)


def test_fast_sigmoid_sparsegrad_keeps_the_whole_surrogate():
    """B_th is infinite for the fast-sigmoid law (its E|z| diverges), so nothing is truncated."""
    v = torch.linspace(-1.0, 1.0, 101)
    torch.testing.assert_close(sparsegrad_grad(v, "fast_sigmoid", 0.1), 1.0 / (1.0 + 100.0 * v.abs()) ** 2)


def test_surrogate_closed_forms():
    v = torch.tensor([0.0, 0.03, -0.07], dtype=torch.float64)
    d = 0.05
    torch.testing.assert_close(surrogate_grad(v, "normal", d), torch.exp(-v**2 / (2 * d * d)) / (d * math.sqrt(2 * math.pi)))
    torch.testing.assert_close(
        surrogate_grad(v, "uniform", d), torch.where(v.abs() < math.sqrt(3) * d, (3 - v**2 / d**2) / (4 * math.sqrt(3) * d), 0.0)
    )
    torch.testing.assert_close(
        surrogate_grad(v, "laplace", d), (v.abs() / d + 1 / math.sqrt(2)) * torch.exp(-math.sqrt(2) * v.abs() / d) / (2 * d)
    )


def test_same_seed_same_spikes_and_gradients():
    v = torch.randn(50, 60) * 0.1

    def run():
        torch.manual_seed(123)
        x = v.clone().requires_grad_(True)
        out = localzo_spike(x, 0.05, 3, "normal")
        out.sum().backward()
        return out.detach(), x.grad

    (s1, g1), (s2, g2) = run(), run()
    assert torch.equal(s1, s2) and torch.equal(g1, g2)
    assert (g1 != 0).any()
    torch.manual_seed(124)
    x = v.clone().requires_grad_(True)
    localzo_spike(x, 0.05, 3, "normal").sum().backward()
    assert not torch.equal(x.grad, g1)


def test_no_draw_without_grad():
    v = torch.randn(10)
    torch.manual_seed(0)
    localzo_spike(v)  # v does not require grad: nothing is sampled
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))


def test_no_m_by_shape_allocation(monkeypatch):
    """The m samples are drawn one candidate-sized tensor at a time, only where |v| < delta * abs_z_bound."""
    from ztriton import rng

    law = get_distribution("normal")
    drawn = []
    original = rng.abs_z

    def spy(law, key, index, k):
        drawn.append((index.tolist(), k))
        return original(law, key, index, k)

    monkeypatch.setattr(rng, "abs_z", spy)
    v = torch.zeros(4, 5)
    assert 5.6 < law.abs_z_bound < 5.7  # Box-Muller with u1 >= 1e-7: sqrt(-2 ln 1e-7) = 5.678
    v[:2] = 5.7 * 0.05  # beyond delta * abs_z_bound: never active, so never sampled
    g = localzo_grad(v, 0.05, 7, law)
    assert drawn == [(list(range(10, 20)), k) for k in range(7)]
    assert torch.all(g[:2] == 0)


@pytest.mark.parametrize(
    "call,error,message",
    [
        (lambda: localzo_spike(torch.zeros(3), delta=0.0), ValueError, "delta must be finite and > 0, got 0.0"),
        (lambda: localzo_spike(torch.zeros(3), delta=float("inf")), ValueError, "delta must be finite and > 0, got inf"),
        (lambda: localzo_spike(torch.zeros(3), m=0), ValueError, "m must be >= 1, got 0"),
        (lambda: localzo_spike(torch.zeros(3), m=2.0), TypeError, "m must be an int, got float"),
        (lambda: localzo_spike(torch.zeros(3), dist="cauchy"), ValueError, "dist must be one of"),
        (lambda: localzo_spike(torch.zeros(3, dtype=torch.int64)), TypeError, "v must be a floating-point tensor, got dtype torch.int64"),
        (lambda: localzo_spike([0.0, 1.0]), TypeError, "v must be a torch.Tensor, got list"),
        (lambda: localzo_spike(torch.tensor([0.0, float("nan")])), ValueError, "v contains NaN or inf"),
        (lambda: surrogate_spike(torch.tensor([float("inf")])), ValueError, "v contains NaN or inf"),
        (lambda: sparsegrad_spike(torch.zeros(3), bth=-1.0), ValueError, "bth must be finite and > 0, got -1.0"),
        (lambda: localzo_spike(torch.zeros(3), generator="seed"), TypeError, "generator must be a torch.Generator, got str"),
        (
            lambda: localzo_spike(torch.zeros(3), 0.1, dist=FastSigmoid(delta=0.05)),
            ValueError,
            "delta=0.1 does not match the delta=0.05",
        ),
    ],
)
def test_bad_input_is_refused(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_non_contiguous_input():
    v = (torch.randn(6, 5, generator=torch.Generator().manual_seed(0)) * 0.1).t()
    assert not v.is_contiguous()
    g = localzo_grad(v, 0.05, 1, "normal", torch.Generator().manual_seed(3))
    torch.testing.assert_close(g, localzo_grad(v.contiguous(), 0.05, 1, "normal", torch.Generator().manual_seed(3)))
