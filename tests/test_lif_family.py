"""The LIF family (DESIGN.md section 9) against an independent autograd BPTT written here.

Every combination of {recurrent, reset, learn_beta, learn_threshold} x {surrogate, sparsegrad}
x {dense, sparse path}, float64, on the torch backend and (where numba is installed) the native
one: the same spikes and the same gradients of x, W, b, V, beta_logit and theta as autograd
through the two update rules with the same g (the expected surrogate, truncated at B_th for
SparseGrad). Odd shapes, T = 1, bias, dense and sparse COO input, per-neuron thresholds.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from ztriton import LeakyReadout, SparseLIFLinear, native
from ztriton.layers import THRESHOLD_FLOOR
from ztriton.sparse import producer_of

BACKENDS = ["torch"] + (["native"] if native.AVAILABLE else [])
VARIANTS = list(itertools.product([False, True], ["subtract", "zero"], [False, True], [False, True]))


class _Spike(torch.autograd.Function):
    """H(v) forward, grad * g backward (g given)."""

    @staticmethod
    def forward(ctx, v, g):
        ctx.save_for_backward(g)
        return (v > 0).to(v.dtype)

    @staticmethod
    def backward(ctx, grad):
        (g,) = ctx.saved_tensors
        return grad * g, None


def oracle(layer: SparseLIFLinear, x: torch.Tensor, given_g: torch.Tensor | None = None):
    """(spikes, parameters) of the layer's dynamics by plain autograd, with its g law on its own v
    (or `given_g`, a (T, B, N) grid); the parameters are copies (leaves) of the layer's, x is used as given."""
    weight = layer.weight.detach().clone().requires_grad_()
    bias = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    rec = None if layer.recurrent_weight is None else layer.recurrent_weight.detach().clone().requires_grad_()
    logit = None if layer.beta_logit is None else layer.beta_logit.detach().clone().requires_grad_()
    theta_leaf = layer.threshold.detach().clone().requires_grad_()
    beta = torch.sigmoid(logit) if logit is not None else layer.beta
    theta = theta_leaf.clamp(min=THRESHOLD_FLOOR)
    rule = layer.rule
    u = s = torch.zeros(x.shape[1], layer.out_features, dtype=x.dtype)
    out = []
    for t in range(x.shape[0]):
        current = x[t] @ weight.t()
        if bias is not None:
            current = current + bias
        if rec is not None:
            current = current + s @ rec.t()
        if layer.reset == "zero":
            u = beta * (1 - s.detach()) * u + current
        else:
            u = beta * u + current - theta * s.detach()
        v = u - theta
        g = rule.law.expected_grad(v.detach(), rule.delta) if given_g is None else given_g[t]
        if rule.grad == "sparsegrad":
            g = g * (v.detach().abs() < rule.bth)
        s = _Spike.apply(v, g)
        out.append(s)
    params = {"weight": weight, "bias": bias, "recurrent_weight": rec, "beta_logit": logit, "threshold": theta_leaf if layer.learn_threshold else None}
    return torch.stack(out), {k: p for k, p in params.items() if p is not None}


def make_layer(recurrent, reset, learn_beta, learn_threshold, *, n_in=7, n_out=5, grad="surrogate", path="dense",
               backend="torch", bias=False, threshold=None, seed=0):
    torch.manual_seed(seed)
    if threshold is None:
        threshold = torch.linspace(0.8, 1.2, n_out) if learn_threshold or learn_beta else 1.0
    layer = SparseLIFLinear(n_in, n_out, beta=0.85, threshold=threshold, recurrent=recurrent, reset=reset,
                            learn_beta=learn_beta, learn_threshold=learn_threshold, grad=grad, delta=0.3,
                            path=path, bias=bias, backend=backend).double()
    with torch.no_grad():
        layer.weight.mul_(4.0)
        if bias:
            layer.bias.uniform_(-0.2, 0.3)
        if recurrent:
            layer.recurrent_weight.mul_(2.0)
    return layer


def inputs(steps, batch, n_in, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return ((torch.rand(steps, batch, n_in, generator=gen) < 0.35).double()
            * torch.rand(steps, batch, n_in, generator=gen).add(0.5).double())


def check_against_oracle(layer, x_dense, sparse_input=False, atol=1e-10):
    gen = torch.Generator().manual_seed(7)
    loss_weights = torch.randn(x_dense.shape[0], x_dense.shape[1], layer.out_features, generator=gen, dtype=torch.float64)
    x_ref = x_dense.clone().requires_grad_()
    spikes_ref, params = oracle(layer, x_ref)
    (spikes_ref * loss_weights).sum().backward()
    x = x_dense.to_sparse() if sparse_input else x_dense.clone().requires_grad_()
    spikes = layer(x)
    (spikes * loss_weights).sum().backward()
    assert torch.equal(spikes, spikes_ref)
    assert 0 < spikes.mean() < 0.6, "the test needs spikes (and resets) to mean anything"
    for name, ref in params.items():
        got = getattr(layer, name).grad
        assert got is not None, name
        torch.testing.assert_close(got, ref.grad, rtol=1e-9, atol=atol, msg=lambda m: f"{name}: {m}")
    if not sparse_input:
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad,path", [("surrogate", "dense"), ("surrogate", "sparse"), ("sparsegrad", "dense"),
                                       ("sparsegrad", "sparse")])
@pytest.mark.parametrize("recurrent,reset,learn_beta,learn_threshold", VARIANTS)
def test_family_equals_autograd_bptt(recurrent, reset, learn_beta, learn_threshold, grad, path, backend):
    bias = recurrent != learn_beta
    layer = make_layer(recurrent, reset, learn_beta, learn_threshold, grad=grad, path=path, backend=backend, bias=bias)
    check_against_oracle(layer, inputs(13, 3, 7), sparse_input=(reset == "zero" and learn_threshold))
    assert layer.stats["path"] == path
    if backend == "native":  # the native family ops ran (its forward declines the surrogate rule's dense g)
        ops = layer.stats["ops"]
        assert ops["forward"] == ("torch" if grad == "surrogate" else "native")
        assert ops.get("adjoint", "native") == "native"  # the walk, sparse or on the whole grid (dense path)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", [1, 2])
def test_family_short_sequences(steps, backend):
    layer = make_layer(True, "zero", True, True, grad="sparsegrad", path="sparse", backend=backend, bias=True)
    with torch.no_grad():
        layer.weight.mul_(3.0)  # a spike at t = 0 for some neurons
    x = inputs(steps, 4, 7)
    check_against_oracle(layer, x)


def readout_oracle(readout, s, logit):
    beta = torch.sigmoid(logit)
    current = s @ readout.weight.detach().t()
    o, out = torch.zeros_like(current[0]), []
    for c in current:
        o = beta * o + (1 - beta) * c
        out.append(o)
    return torch.stack(out)


def test_readout_learnable_leak_equals_autograd():
    torch.manual_seed(0)
    readout = LeakyReadout(6, 3, beta=0.7, learn_beta=True, backend="torch").double()
    s = (torch.rand(11, 4, 6) < 0.3).double()
    weights = torch.randn(11, 4, 3, dtype=torch.float64)
    logit = readout.beta_logit.detach().clone().requires_grad_()
    (readout_oracle(readout, s, logit) * weights).sum().backward()
    out = readout(s)
    (out * weights).sum().backward()
    torch.testing.assert_close(out, readout_oracle(readout, s, logit).detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(readout.beta_logit.grad, logit.grad, rtol=1e-10, atol=1e-12)
    assert readout.beta == pytest.approx(0.7)


def test_beta_is_read_only_and_follows_the_logit():
    layer = SparseLIFLinear(3, 2, beta=0.9, learn_beta=True)
    assert layer.beta == pytest.approx(0.9) and layer.beta_logit.dim() == 0
    with torch.no_grad():
        layer.beta_logit.fill_(0.0)
    assert layer.beta == 0.5
    with pytest.raises(AttributeError):
        layer.beta = 0.3
    assert SparseLIFLinear(3, 2, beta=0.9).beta_logit is None


def test_threshold_is_a_buffer_or_a_parameter():
    fixed = SparseLIFLinear(3, 4, beta=0.9, threshold=0.5)
    assert "threshold" in dict(fixed.named_buffers()) and torch.equal(fixed.threshold, torch.full((4,), 0.5, dtype=torch.float64))
    learnt = SparseLIFLinear(3, 4, beta=0.9, threshold=torch.tensor([1.0, 2.0, 3.0, 4.0]), learn_threshold=True)
    assert "threshold" in dict(learnt.named_parameters())
    recurrent = SparseLIFLinear(3, 4, beta=0.9, recurrent=True)
    assert recurrent.recurrent_weight.shape == (4, 4) and recurrent.recurrent_weight.abs().max() <= 0.5


def test_old_checkpoints_without_threshold_load():
    layer = SparseLIFLinear(3, 4, beta=0.9, threshold=0.7)
    layer.load_state_dict({"weight": torch.zeros(4, 3)})
    assert torch.equal(layer.threshold, torch.full((4,), 0.7, dtype=torch.float64)) and not layer.weight.any()


@pytest.mark.parametrize("kwargs,error,message", [
    ({"beta": 1.0, "learn_beta": True}, ValueError, "beta=1 cannot be learnt"),
    ({"beta": torch.full((4,), 0.9), "learn_beta": True}, ValueError, "a per-neuron leak is not supported"),
    ({"beta": 0.9, "reset": "hard"}, ValueError, "reset must be one of ['subtract', 'zero'], got 'hard'"),
    ({"beta": 0.9, "recurrent": 1}, TypeError, "recurrent must be True or False, got 1"),
    ({"beta": 0.9, "threshold": torch.ones(3)}, ValueError, "threshold must be a number, a 0-dim or an (4,) tensor"),
    ({"beta": 0.9, "threshold": torch.tensor([1.0, 0.0, 1.0, 1.0])}, ValueError, "threshold must be > 0"),
    ({"beta": 0.9, "threshold": torch.tensor([1.0, math.nan, 1.0, 1.0])}, ValueError, "threshold contains NaN"),
])
def test_family_arguments_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        SparseLIFLinear(3, 4, **kwargs)


def test_learnable_threshold_is_floored_in_forward():
    layer = make_layer(False, "subtract", False, True, grad="sparsegrad", path="sparse")
    with torch.no_grad():
        layer.threshold[0] = -2.0  # as if training had pushed it below zero
    x = inputs(13, 3, 7)
    check_against_oracle(layer, x)  # the oracle floors it too: no gradient below the floor
    assert layer.threshold.grad[0] == 0


def test_refilled_threshold_buffer_is_seen():
    layer = make_layer(False, "subtract", False, False)
    x = inputs(13, 3, 7)
    before = layer(x)
    with torch.no_grad():
        layer.threshold[1:] = 0.5  # per neuron now: the family's path
    after = layer(x)
    assert not torch.equal(before, after)
    check_against_oracle(layer, x)


def stacked_oracle_loss(first, second, x, loss_weights):
    h, p1 = oracle(first, x)
    out, p2 = oracle(second, h)
    (out * loss_weights).sum().backward()
    return h, out, p1, p2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reset", ["subtract", "zero"])
def test_stacked_family_layers_pass_sparse_gradients(reset, backend):
    """Layer 2's input gradient reaches layer 1 as a sparse COO at layer 1's active entries (the
    producer route), through the recurrent walk of layer 2: the same gradients as autograd."""
    first = make_layer(True, reset, True, False, grad="sparsegrad", path="sparse", backend=backend, bias=True)
    second = make_layer(True, reset, False, True, n_in=5, n_out=4, grad="sparsegrad", path="sparse", backend=backend,
                        seed=3)
    x = inputs(17, 3, 7)
    loss_weights = torch.randn(17, 3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h_ref, out_ref, p1, p2 = stacked_oracle_loss(first, second, x, loss_weights)
    h = first(x)
    grads = []
    h.register_hook(grads.append)
    out = second(h)
    (out * loss_weights).sum().backward()
    assert torch.equal(out, out_ref) and grads[0].is_sparse
    for layer, params in ((first, p1), (second, p2)):
        for name, ref in params.items():
            torch.testing.assert_close(getattr(layer, name).grad, ref.grad, rtol=1e-9, atol=1e-10,
                                       msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("recurrent,reset", [(True, "zero"), (True, "subtract"), (False, "zero")])
def test_localzo_family_equals_autograd_through_its_g(recurrent, reset, backend):
    """LocalZO on the sparse path: autograd through the g the layer drew (its active set) gives its gradients."""
    layer = make_layer(recurrent, reset, True, True, grad="localzo", path="sparse", backend=backend, bias=True)
    x = inputs(23, 3, 7).requires_grad_()
    loss_weights = torch.randn(23, 3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    spikes = layer(x)
    (spikes * loss_weights).sum().backward()
    g = producer_of(spikes).dense().double()
    assert g.count_nonzero() >= 10
    x_ref = x.detach().clone().requires_grad_()
    ref, params = oracle(layer, x_ref, given_g=g)
    (ref * loss_weights).sum().backward()
    assert torch.equal(spikes, ref)
    for name, p in params.items():
        torch.testing.assert_close(getattr(layer, name).grad, p.grad, rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_localzo_family_agrees_across_paths_and_is_reproducible(backend):
    """LocalZO: one seed gives the same spikes and gradients on the dense and the sparse path, and again."""
    grads = {}
    for path in ("dense", "sparse", "sparse"):
        layer = make_layer(True, "zero", True, True, grad="localzo", path=path, backend=backend, bias=True)
        layer.generator = torch.Generator().manual_seed(11)
        x = inputs(19, 4, 7).requires_grad_()
        spikes = layer(x)
        (spikes * torch.linspace(-1, 1, 5, dtype=torch.float64)).sum().backward()
        got = [spikes, x.grad] + [p.grad for p in layer.parameters()]
        assert layer.stats["active_fraction"] > 0
        if path in grads:
            assert all(torch.equal(a, b) for a, b in zip(got, grads[path]))
        grads[path] = got
    for a, b in zip(grads["dense"], grads["sparse"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
