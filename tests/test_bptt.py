"""ztriton.bptt, the autograd BPTT reference: eq. 1 and the readout step by step, its surrogate
backward, copies of the engine's modules, the training application's network, linear work in T."""

import itertools
import math

import pytest
import torch

from ztriton import LeakyReadout, SparseLIFLinear
from ztriton.bptt import BPTTLIF, BPTTNet, BPTTReadout, Surrogate
from ztriton.counting import count_device_work
from ztriton.train import SNN, Config, snn_reference

X = (torch.rand(17, 3, 11, generator=torch.Generator().manual_seed(0)) < 0.4).double()


def layer(**kw):
    torch.manual_seed(0)
    lif = SparseLIFLinear(11, 7, beta=0.9, threshold=0.8, bias=True, delta=0.3, **kw).double()
    with torch.no_grad():
        lif.weight.mul_(3)
        lif.bias.uniform_(-0.2, 0.2)
    return lif


def test_forward_is_eq1_written_out():
    """u[t] = beta u[t-1] + W x[t] + b - theta s[t-1], s[t] = H(u[t] - theta), o[t] = beta o[t-1] + (1 - beta)(W s[t] + b)."""
    lif, readout = layer(), LeakyReadout(7, 4, beta=0.8, bias=True).double()
    with torch.no_grad():
        readout.bias.uniform_(-0.5, 0.5)
        spikes = BPTTLIF.from_layer(lif)(X)
        out = BPTTReadout.from_layer(readout)(spikes)
    w, b = lif.weight.detach(), lif.bias.detach()
    u, s, o = torch.zeros(3, 7, dtype=torch.float64), torch.zeros(3, 7, dtype=torch.float64), 0
    for t in range(17):
        u = 0.9 * u + (X[t] @ w.t() + b) - 0.8 * s
        s = (u > 0.8).double()
        o = 0.8 * o + (1 - 0.8) * (s @ readout.weight.detach().t() + readout.bias.detach())
        assert torch.equal(spikes[t], s)
        torch.testing.assert_close(out[t], o, rtol=1e-14, atol=1e-14)
    assert 0.05 < spikes.mean() < 0.9


def test_surrogate_backward_is_the_derivative_of_the_normal_cdf():
    """The normal law's dense surrogate is the N(0, delta^2) pdf: the gradient of H(v) + Phi(v / delta)
    - stop_grad(Phi(v / delta)); truncated, zero where |v| >= B_th = delta sqrt(2 / pi)."""
    lif = layer()
    grad_out = torch.randn(17, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for truncated in (False, True):
        ref = BPTTLIF.from_layer(lif, Surrogate.of_layer(lif, truncated))
        assert ref.surrogate.bth == (0.3 * math.sqrt(2 / math.pi) if truncated else None)
        ref(X).backward(grad_out)
        w = lif.weight.detach().clone().requires_grad_(True)
        current = X @ w.t() + lif.bias.detach()
        u, s, out = 0, torch.zeros(3, 7, dtype=torch.float64), []
        for i_t in current.unbind(0):
            u = 0.9 * u + i_t - 0.8 * s.detach()
            v = u - 0.8
            smooth = torch.special.ndtr(v / 0.3)
            if truncated:
                smooth = torch.where(v.abs() < 0.3 * math.sqrt(2 / math.pi), smooth, smooth.detach())
            s = (v > 0).double() + smooth - smooth.detach()
            out.append(s)
        torch.stack(out).backward(grad_out)
        torch.testing.assert_close(ref.weight.grad, w.grad, rtol=1e-12, atol=1e-12)
        assert ref.bias.grad is not None and ref.bias.grad.abs().sum() > 0


def test_a_given_g_replaces_the_surrogate_for_that_call():
    lif = layer()
    ref = BPTTLIF.from_layer(lif)
    x = X.clone().requires_grad_(True)
    current = ref.current(x)
    spikes = ref.dynamics(current)
    u, s, vs = 0, 0, []  # v step by step, to form g
    with torch.no_grad():
        for i_t in current.unbind(0):
            u = 0.9 * u + i_t - 0.8 * s
            vs.append(u - 0.8)
            s = (vs[-1] > 0).double()
    v = torch.stack(vs)
    (grad_surrogate,) = torch.autograd.grad(spikes.sum(), [x])
    (grad_given,) = torch.autograd.grad(ref(x, g=ref.surrogate.grad(v)).sum(), [x])
    torch.testing.assert_close(grad_given, grad_surrogate, rtol=1e-13, atol=1e-13)
    (grad_zero,) = torch.autograd.grad(ref(x, g=torch.zeros_like(v)).sum(), [x])
    assert not grad_zero.any()


def test_copies_share_nothing_and_draw_nothing():
    lif, readout = layer(), LeakyReadout(7, 4, beta=0.8)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    ref = BPTTNet.from_layers([lif], readout, dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    assert ref.hidden[0].weight.dtype == torch.float32 and ref.readout.bias is None
    assert (ref.hidden[0].beta, ref.readout.beta) == (0.9, 0.8)
    assert torch.equal(ref.hidden[0].threshold, torch.full((7,), 0.8))
    assert "threshold" in dict(ref.hidden[0].named_buffers())
    assert ref.hidden[0].surrogate == Surrogate(lif.rule.law, 0.3)
    with torch.no_grad():
        ref.hidden[0].weight.zero_()
    assert lif.weight.abs().sum() > 0
    with pytest.raises(ValueError, match=r"g must have one entry per hidden layer \(1\), got 2"):
        ref(X.float(), g=[None, None])


def test_snn_reference_is_the_training_network():
    """Same sizes, leaks, law, reduction and initial weights as ztriton.train.SNN; with the surrogate
    rule the engine's gradients equal the reference's."""
    cfg = Config(dataset="mnist5k", grad="surrogate", hidden=(13, 9), init="paper").resolved()
    torch.manual_seed(3)
    ref = snn_reference(20, 4, cfg, dtype=torch.float64)
    torch.manual_seed(3)
    snn = SNN(20, 4, cfg).double()
    assert [(m.in_features, m.out_features) for m in ref.layers()] == [(20, 13), (13, 9), (9, 4)]
    assert ref.reduce == snn.reduce == "max"
    for a, b in zip(ref.layers(), [*snn.hidden, snn.readout]):
        assert torch.equal(a.weight, b.weight) and a.beta == b.beta
    assert ref.hidden[0].surrogate == Surrogate.dense("normal", cfg.delta)
    x = (torch.rand(30, 5, 20, generator=torch.Generator().manual_seed(4)) < 0.3).double()
    logits, spikes = snn(x)
    ref_logits, ref_spikes = ref(x)
    assert all(torch.equal(a, b) for a, b in zip(spikes, ref_spikes)) and spikes[1].sum() > 0
    logits.pow(2).sum().backward()
    ref_logits.pow(2).sum().backward()
    for a, b in zip([*snn.hidden, snn.readout], ref.layers()):
        assert b.weight.grad.abs().sum() > 0
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("family", [{}, dict(recurrent=True, reset="zero", learn_beta=True, learn_threshold=True)],
                         ids=["eq1", "family"])
def test_work_per_step_is_constant(family):
    """The time axis is unbound once: every step adds the same ops, forward and backward (indexing a
    graph tensor per step would add a full-size gradient per step, quadratic work)."""
    counts = []
    for steps in (4, 8, 12):
        torch.manual_seed(0)
        net = BPTTNet([BPTTLIF(6, 5, beta=0.9, **family), BPTTLIF(5, 4, beta=0.9, **family)],
                      BPTTReadout(4, 3, beta=0.8, learn_beta=bool(family)))
        x = torch.rand(steps, 2, 6)
        with count_device_work() as forward:
            loss = net(x)[0].sum()
        with count_device_work() as backward:
            loss.backward()
        counts.append((forward.device_ops, backward.device_ops))
        assert "select_backward" not in backward.op_names and forward.syncs == backward.syncs == 0
    assert counts[2][0] - counts[1][0] == counts[1][0] - counts[0][0] > 0
    assert counts[2][1] - counts[1][1] == counts[1][1] - counts[0][1] > 0


FAMILY = list(itertools.product((False, True), ("subtract", "zero"), (False, True), (False, True)))
FAMILY_IDS = [f"{'rec' if r else 'ff'}-{reset}{'-lb' if lb else ''}{'-lt' if lt else ''}"
              for r, reset, lb, lt in FAMILY]


def family_reference(recurrent, reset, learn_beta, learn_threshold):
    """A float64 BPTTLIF of the family with a per-neuron threshold, a bias and a strong enough drive to fire."""
    torch.manual_seed(0)
    ref = BPTTLIF(11, 7, beta=0.85, threshold=torch.linspace(0.6, 1.1, 7), recurrent=recurrent, reset=reset,
                  learn_beta=learn_beta, learn_threshold=learn_threshold, bias=True,
                  surrogate=Surrogate.dense("normal", 0.3), dtype=torch.float64)
    with torch.no_grad():
        ref.weight.mul_(3)
        ref.bias.uniform_(-0.2, 0.2)
        if recurrent:
            ref.recurrent_weight.mul_(2)
    return ref


def written_out(x, w, b, v, beta, threshold, reset, delta):
    """The family step by step (DESIGN.md section 9), every current formed at its step; the spike is
    H(v) with the N(0, delta^2) pdf as its derivative (H + Phi(v / delta) - stop_grad(Phi(v / delta)))."""
    theta = threshold.clamp(min=1e-3)
    u = s = torch.zeros(x.shape[1], w.shape[0], dtype=x.dtype)
    out = []
    for t in range(x.shape[0]):
        current = x[t] @ w.t() + b + (0 if v is None else s @ v.t())
        held = s.detach()
        u = beta * (1 - held) * u + current if reset == "zero" else beta * u + current - theta * held
        smooth = torch.special.ndtr((u - theta) / delta)
        s = (u > theta).double() + smooth - smooth.detach()
        out.append(s)
    return torch.stack(out)


@pytest.mark.parametrize("steps", [1, 17])
@pytest.mark.parametrize("recurrent,reset,learn_beta,learn_threshold", FAMILY, ids=FAMILY_IDS)
def test_family_is_its_update_rule_written_out(recurrent, reset, learn_beta, learn_threshold, steps):
    """Spikes and every gradient (input, W, b, V, beta_logit, threshold) of the reference equal autograd
    through the update rules written out in the test."""
    ref = family_reference(recurrent, reset, learn_beta, learn_threshold)
    x = (torch.rand(steps, 3, 11, generator=torch.Generator().manual_seed(2)) < 0.4).double().requires_grad_(True)
    grad_out = torch.randn(steps, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    spikes = ref(x)
    spikes.backward(grad_out)
    names = [name for name, _ in ref.named_parameters()]
    assert names == ["weight", "bias"] + ["recurrent_weight"] * recurrent + ["beta_logit"] * learn_beta \
        + ["threshold"] * learn_threshold
    leaves = {name: p.detach().clone().requires_grad_(True) for name, p in ref.named_parameters()}
    x_copy = x.detach().clone().requires_grad_(True)
    beta = torch.sigmoid(leaves["beta_logit"]) if learn_beta else 0.85
    expected = written_out(x_copy, leaves["weight"], leaves["bias"], leaves.get("recurrent_weight"), beta,
                           leaves.get("threshold", ref.threshold), reset, 0.3)
    torch.testing.assert_close(spikes, expected, rtol=0, atol=1e-12)  # H + Phi - Phi: 1 up to rounding
    if steps > 1:
        assert 0.05 < spikes.mean() < 0.8
    expected.backward(grad_out)
    torch.testing.assert_close(x.grad, x_copy.grad, rtol=1e-12, atol=1e-12)
    for name, p in ref.named_parameters():
        # at T = 1 neither s[t-1] nor u[t-1] is non-zero: V and beta get a zero gradient
        assert leaves[name].grad.abs().sum() > 0 or steps == 1 and name in ("recurrent_weight", "beta_logit"), name
        torch.testing.assert_close(p.grad, leaves[name].grad, rtol=1e-12, atol=1e-12, msg=name)


def test_threshold_is_floored_and_its_gradient_stops_below_the_floor():
    ref = family_reference(False, "subtract", False, True)
    floored = family_reference(False, "subtract", False, False)
    with torch.no_grad():
        ref.threshold[0] = -0.5
        floored.threshold[0] = 1e-3
    spikes = ref(X)
    assert torch.equal(spikes, floored(X)) and spikes[:, :, 0].sum() > 0
    spikes.sum().backward()
    assert ref.threshold.grad[0] == 0 and ref.threshold.grad[1:].abs().min() > 0


def test_learnt_leak_of_the_readout_is_the_adjoint_sum():
    """dL/dbeta = sum_t lambda[t] (o[t-1] - c[t]) with lambda[t] = dL/do[t] + beta lambda[t+1] (DESIGN.md
    section 9), and dL/dbeta_logit = dL/dbeta beta (1 - beta)."""
    torch.manual_seed(0)
    readout = BPTTReadout(11, 4, beta=0.7, bias=True, learn_beta=True, dtype=torch.float64)
    with torch.no_grad():
        readout.bias.uniform_(-0.5, 0.5)
    assert readout.beta == pytest.approx(0.7, rel=1e-15) and readout.beta_logit.dim() == 0
    grad_out = torch.randn(17, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    o = readout(X)
    o.backward(grad_out)
    with torch.no_grad():
        c = X @ readout.weight.t() + readout.bias
        previous = torch.cat([torch.zeros_like(o[:1]), o[:-1]])
        lam, dbeta = torch.zeros_like(o[0]), 0.0
        for t in reversed(range(17)):
            lam = grad_out[t] + 0.7 * lam
            dbeta = dbeta + (lam * (previous[t] - c[t])).sum()
    torch.testing.assert_close(readout.beta_logit.grad, dbeta * 0.7 * 0.3, rtol=1e-12, atol=1e-12)


def test_family_arguments_are_checked():
    with pytest.raises(ValueError, match=r"beta must be < 1 with learn_beta=True"):
        BPTTLIF(3, 2, beta=1.0, learn_beta=True)
    with pytest.raises(ValueError, match=r"beta must be < 1 with learn_beta=True"):
        BPTTReadout(3, 2, beta=1.0, learn_beta=True)
    with pytest.raises(ValueError, match=r"reset must be one of \['subtract', 'zero'\], got 'hard'"):
        BPTTLIF(3, 2, beta=0.9, reset="hard")
    with pytest.raises(ValueError, match=r"threshold must be a number or an \(2,\) tensor, got shape \(3,\)"):
        BPTTLIF(3, 2, beta=0.9, threshold=torch.ones(3))
    with pytest.raises(ValueError, match=r"threshold must be > 0 for every neuron"):
        BPTTLIF(3, 2, beta=0.9, threshold=torch.tensor([1.0, 0.0]))
    lif = BPTTLIF(3, 2, beta=0.9, learn_beta=True)
    with pytest.raises(AttributeError):
        lif.beta = 0.5
    assert "threshold" in dict(lif.named_buffers()) and lif.recurrent_weight is None


@pytest.mark.parametrize("recurrent,reset,learn_beta,learn_threshold", FAMILY, ids=FAMILY_IDS)
def test_from_layer_of_a_family_layer_computes_what_the_layer_does(recurrent, reset, learn_beta, learn_threshold):
    """A copy of a family SparseLIFLinear (float64, surrogate rule) gives its spikes and its gradients of
    x, W, b, V, beta_logit and theta; the copy's tensors are its own."""
    torch.manual_seed(0)
    lif = SparseLIFLinear(11, 7, beta=0.85, threshold=torch.linspace(0.6, 1.1, 7), recurrent=recurrent, reset=reset,
                          learn_beta=learn_beta, learn_threshold=learn_threshold, bias=True, grad="surrogate",
                          delta=0.3, backend="torch").double()
    with torch.no_grad():
        lif.weight.mul_(3)
        lif.bias.uniform_(-0.2, 0.2)
        if recurrent:
            lif.recurrent_weight.mul_(2)
    ref = BPTTLIF.from_layer(lif)
    assert (ref.recurrent, ref.reset, ref.learn_beta, ref.learn_threshold) == (recurrent, reset, learn_beta,
                                                                               learn_threshold)
    params = dict(lif.named_parameters())
    assert sorted(name for name, _ in ref.named_parameters()) == sorted(params)
    assert torch.equal(ref.threshold, lif.threshold) and ref.beta == lif.beta
    assert all(p.data_ptr() != params[name].data_ptr() for name, p in ref.named_parameters())
    x = (torch.rand(17, 3, 11, generator=torch.Generator().manual_seed(2)) < 0.4).double()
    grad_out = torch.randn(17, 3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    x_lif, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    spikes = lif(x_lif)
    assert torch.equal(spikes, ref(x_ref)) and 0.05 < spikes.mean() < 0.8
    spikes.backward(grad_out)
    ref(x_ref).backward(grad_out)
    torch.testing.assert_close(x_ref.grad, x_lif.grad, rtol=1e-10, atol=1e-10)
    for name, p in ref.named_parameters():
        assert params[name].grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-10, atol=1e-10, msg=name)


def test_from_layer_of_a_readout_with_a_learnt_leak():
    torch.manual_seed(0)
    readout = LeakyReadout(11, 4, beta=0.7, bias=True, learn_beta=True, backend="torch").double()
    with torch.no_grad():
        readout.beta_logit.fill_(0.4)
        readout.bias.uniform_(-0.5, 0.5)
    ref = BPTTReadout.from_layer(readout)
    assert ref.learn_beta and ref.beta == readout.beta and ref.bias is not None
    grad_out = torch.randn(17, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = readout(X)
    torch.testing.assert_close(ref(X), out, rtol=1e-13, atol=1e-13)
    out.backward(grad_out)
    ref(X).backward(grad_out)
    params = dict(readout.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-10, atol=1e-10, msg=name)
