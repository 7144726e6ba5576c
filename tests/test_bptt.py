"""ztriton.bptt, the autograd BPTT reference: eq. 1 and the readout step by step, its surrogate
backward, copies of the engine's modules, the training application's network, linear work in T."""

import math

import pytest
import torch

from ztriton import LeakyReadout, SparseLIFLinear
from ztriton.bptt import BPTTLIF, BPTTNet, BPTTReadout, Surrogate, snn_reference
from ztriton.counting import count_device_work
from ztriton.train import SNN, Config

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
    assert (ref.hidden[0].beta, ref.hidden[0].threshold, ref.readout.beta) == (0.9, 0.8, 0.8)
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


def test_work_per_step_is_constant():
    """The time axis is unbound once: every step adds the same ops, forward and backward (indexing a
    graph tensor per step would add a full-size gradient per step, quadratic work)."""
    counts = []
    for steps in (4, 8, 12):
        torch.manual_seed(0)
        net = BPTTNet([BPTTLIF(6, 5, beta=0.9), BPTTLIF(5, 4, beta=0.9)], BPTTReadout(4, 3, beta=0.8))
        x = torch.rand(steps, 2, 6)
        with count_device_work() as forward:
            loss = net(x)[0].sum()
        with count_device_work() as backward:
            loss.backward()
        counts.append((forward.device_ops, backward.device_ops))
        assert "select_backward" not in backward.op_names and forward.syncs == backward.syncs == 0
    assert counts[2][0] - counts[1][0] == counts[1][0] - counts[0][0] > 0
    assert counts[2][1] - counts[1][1] == counts[1][1] - counts[0][1] > 0
