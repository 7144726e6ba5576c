"""torch.compile on ztriton networks gives the eager results: the same spikes, the same gradients.

The layers' forwards and their autograd Functions' backwards sit behind `torch.compiler.disable`
(`ztriton.boundary.eager_under_compile`): torch.compile runs them eagerly, so the LocalZO key is
drawn from torch's generator as in eager mode, and compiles the code around them (here the loss).
Networks in float64; a compiled `loss.backward()` takes the loss's gradient from inductor's
backward graph, which may differ from eager in the last bits, hence rtol 1e-10 there; where the
backward runs outside the compiled code the gradients are bit-identical. No custom op is
registered, so there is nothing for `torch.library.opcheck`. About 1.5 min on the shared 2-core
machine (most of it the first inductor compile; later cases hit the FX graph cache).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from ztriton import LeakyReadout, SparseLIFLinear, native
from ztriton.boundary import EAGER_UNDER_COMPILE

BACKENDS = ["torch"] + (["native"] if native.AVAILABLE else [])
#: the LIF family's options, one set per case in turn (the plain model first)
OPTIONS = [{}, {"recurrent": True, "reset": "zero"}, {"learn_beta": True, "learn_threshold": True},
           {"recurrent": True, "learn_threshold": True}, {"reset": "zero", "learn_beta": True}]
CASES = [(backend, grad, path, OPTIONS[i % len(OPTIONS)])
         for i, (backend, grad, path) in enumerate(itertools.product(BACKENDS, ["localzo", "sparsegrad", "surrogate"],
                                                                     ["dense", "sparse", "auto"]))]
T, B, N_IN = 12, 3, 20


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (no recompile limit reached across cases, no graphs shared)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def network(backend="torch", grad="localzo", path="auto", options=None, seed=0) -> nn.Sequential:
    """20 -> 16 (plain, bias) -> 12 (`options`) -> 4 readout (leak learnt with any option), float64."""
    options = options or {}
    torch.manual_seed(seed)
    common = dict(grad=grad, path=path, delta=0.2, backend=backend)
    net = nn.Sequential(SparseLIFLinear(N_IN, 16, beta=0.9, bias=True, **common),
                        SparseLIFLinear(16, 12, beta=0.85, **common, **options),
                        LeakyReadout(12, 4, beta=0.8, learn_beta=bool(options), backend=backend)).double()
    with torch.no_grad():
        net[0].weight.mul_(3.0)
        net[1].weight.mul_(3.0)
    return net


def batch(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(T, B, N_IN, generator=gen) < 0.3).double()
    return x, torch.randint(0, 4, (B,), generator=gen)


def train_step(net, x, target):
    """Forward of every layer, a loss that uses the hidden spikes too, backward; returns the spikes."""
    h1 = net[0](x)
    h2 = net[1](h1)
    out = net[2](h2)
    loss = nn.functional.cross_entropy(out.amax(0), target) + 0.01 * h2.mean()
    loss.backward()
    return h1, h2, out.detach(), loss.detach()


def run(step, net, x, target, seed):
    torch.manual_seed(seed)
    net.zero_grad(set_to_none=True)
    results = step(net, x, target)
    grads = {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}
    stats = [{k: layer.stats[k] for k in ("path", "active_fraction", "ops")} for layer in net[:2]]
    return results, grads, stats


@pytest.mark.parametrize("backend, grad, path, options", CASES,
                         ids=[f"{b}-{g}-{p}-{'+'.join(o) or 'plain'}" for b, g, p, o in CASES])
def test_compiled_step_gives_the_eager_spikes_and_gradients(backend, grad, path, options):
    net = network(backend, grad, path, options)
    x, target = batch()
    eager, eager_grads, eager_stats = run(train_step, net, x, target, seed=5)
    compiled, compiled_grads, compiled_stats = run(torch.compile(train_step), net, x, target, seed=5)
    for e, c in zip(eager[:3], compiled[:3]):  # spikes of both layers and the readout's traces
        assert torch.equal(e, c)
    assert eager[1].any() and eager_stats[1]["active_fraction"] > 0  # the layers fire and learn
    torch.testing.assert_close(compiled[3], eager[3], rtol=1e-12, atol=1e-14)
    assert compiled_stats == eager_stats
    assert set(compiled_grads) == set(eager_grads) == {name for name, p in net.named_parameters()}
    for name, grad_value in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad_value, rtol=1e-10, atol=1e-14, msg=name)


def test_triton_backend_under_compile_gives_the_eager_spikes_and_gradients():
    """One case on the Triton backend (the interpreter here, TRITON_INTERPRET=1; 15-35 s): a
    recurrent, reset-to-zero, learnt-leak layer on the sparse path, float32, every op on Triton."""
    pytest.importorskip("triton")
    net = network("triton", "localzo", "sparse", {"recurrent": True, "reset": "zero", "learn_beta": True}).float()
    x, target = batch()
    x = x.float()
    eager, eager_grads, eager_stats = run(train_step, net, x, target, seed=5)
    compiled, compiled_grads, compiled_stats = run(torch.compile(train_step), net, x, target, seed=5)
    assert set(eager_stats[1]["ops"].values()) == {"triton"}
    assert compiled_stats == eager_stats
    for e, c in zip(eager[:3], compiled[:3]):
        assert torch.equal(e, c)
    for name, grad_value in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad_value, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_steps_draw_a_fresh_localzo_key_each_call(backend):
    """Two compiled steps in a row = two eager steps in a row (the key is drawn per call from the
    generator, not frozen into the graph), and the two steps' gradients differ."""
    net = network(backend, "localzo", "sparse", {"recurrent": True})
    x, target = batch()

    def two_steps(step):
        torch.manual_seed(7)
        grads = []
        for _ in range(2):
            net.zero_grad(set_to_none=True)
            step(net, x, target)
            grads.append(net[1].weight.grad.clone())
        return grads

    eager = two_steps(train_step)
    compiled = two_steps(torch.compile(train_step))
    assert not torch.equal(eager[0], eager[1])
    for e, c in zip(eager, compiled):
        torch.testing.assert_close(c, e, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("events", [False, True], ids=["dense-input", "event-input"])
def test_compiled_module_with_eager_backward_is_bit_identical(events):
    """torch.compile(net) with the loss and backward outside: every gradient bit for bit, also for
    a sparse COO input (whose frame torch.compile cannot wrap and runs eagerly)."""
    net = network("native" if native.AVAILABLE else "torch", "localzo", "auto", {"learn_beta": True})
    x, target = batch()
    x = x.to_sparse() if events else x

    def step(model, x, target):
        out = model(x)
        nn.functional.cross_entropy(out.amax(0), target).backward()
        return (out.detach(),)

    eager, eager_grads, _ = run(step, net, x, target, seed=3)
    compiled, compiled_grads, _ = run(lambda _, x, target: step(torch.compile(net), x, target), net, x, target, seed=3)
    assert torch.equal(eager[0], compiled[0])
    assert eager_grads.keys() == compiled_grads.keys()
    for name, grad_value in eager_grads.items():
        assert torch.equal(compiled_grads[name], grad_value), name


def test_every_graph_break_is_a_layer_boundary():
    """With code between the layers, dynamo compiles that code and breaks the graph only at the layers,
    each time for the stated reason: graphs before the first layer, between the layers, after the readout."""
    net = network(options={"recurrent": True})
    x, _ = batch()

    def forward(net, x):
        h = net[0](x * 1.5)
        h = net[1](h + 0.0)
        return net[2](h * 1.0).amax(0).logsumexp(1).sum()

    explanation = torch._dynamo.explain(forward)(net, x)
    assert explanation.graph_count == 4
    assert explanation.graph_break_count == len(explanation.break_reasons) == 3
    assert all(EAGER_UNDER_COMPILE in str(reason.reason) for reason in explanation.break_reasons)


def test_a_spike_count_regulariser_compiles_with_one_break_per_count():
    """spike_count reads the producing layer's cached events: it runs eagerly (one break per call, the
    stated reason) and its sparse gradient equals eager's."""
    from ztriton import spike_count

    x, _ = batch()

    def step(net, x):
        h1 = net[0](x)
        h2 = net[1](h1)
        loss = net[2](h2).amax(0).logsumexp(1).sum() + 0.1 * sum(spike_count(h).pow(2).mean() for h in (h1, h2))
        loss.backward()
        return loss

    grads = []
    for run in (step, torch.compile(step)):
        net = network(path="sparse", seed=3)
        torch.manual_seed(5)
        run(net, x)
        grads.append([p.grad for p in net.parameters()])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-12)

    def count(net, x):
        h = net[0](x * 1.5)
        return spike_count(h + 0.0).sum() * 2.0

    explanation = torch._dynamo.explain(count)(network(), x)
    assert explanation.graph_count == 3 and explanation.graph_break_count == 2
    assert all(EAGER_UNDER_COMPILE in str(reason.reason) for reason in explanation.break_reasons)


def test_fullgraph_raises_with_the_reason():
    net = network()
    x, _ = batch()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="run eagerly under torch.compile"):
        torch.compile(net, fullgraph=True)(x)
