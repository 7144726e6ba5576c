"""LocalZO inside snntorch and spikingjelly neurons (ztriton.interop.surrogates), against the real
packages where they are installed (`pip install -e ".[interop]"`, spikingjelly with --no-deps).

The statistics are checked at 5 sigma of the sample mean (sigma from the sample itself), so a
correct estimator fails one of them with probability below 1e-5."""

import math
import sys

import pytest
import torch

from ztriton import rng
from ztriton.distributions import distribution_from_surrogate, resolve
from ztriton.interop import surrogates
from ztriton.interop import snntorch_spike_grad, spikingjelly_surrogate

SIGMAS = 5.0


def make_adapter(framework, **kwargs):
    if framework == "spikingjelly":
        pytest.importorskip("spikingjelly.activation_based.surrogate")
        return spikingjelly_surrogate(**kwargs)
    return snntorch_spike_grad(**kwargs)


def user_law(delta):
    """A user surrogate through Theorem 3: g(v) = 1 / (1 + (v / delta)^2)^2 / delta."""
    return distribution_from_surrogate(lambda v: 1.0 / (1.0 + (v / delta) ** 2) ** 2 / delta, delta=delta)


def eq7_reference(x, delta, m, law, key):
    """g of eq. 7 at every entry of x, from the z the RNG contract draws for `key` (dense, float32)."""
    positions = torch.arange(x.numel())
    near = x.detach().abs().reshape(-1).float()
    total = torch.zeros_like(near)
    for k in range(m):
        abs_z = rng.abs_z(law, key, positions, k)
        total += torch.where(near < delta * abs_z, abs_z if law.alpha == 1 else 1.0 / abs_z, 0.0)
    return (total * (law.c / (2.0 * delta * m))).view(x.shape)


def within_sigmas(count, probabilities):
    """The number of active entries agrees with independent draws of these probabilities."""
    mean = float(probabilities.sum())
    sigma = math.sqrt(float((probabilities * (1 - probabilities)).sum()))
    return abs(count - mean) <= SIGMAS * sigma, (count, mean, sigma)


def normal_active_probability(x, delta):
    """P(|x| < delta |z|) for one normal draw (m = 1)."""
    return torch.special.erfc(x.double().abs() / (delta * math.sqrt(2.0)))


@pytest.fixture
def fresh_spikingjelly_class():
    surrogates._spikingjelly_class.cache_clear()
    yield
    surrogates._spikingjelly_class.cache_clear()


# --- forward: Heaviside with each package's convention ---------------------------------------------

def test_the_forward_is_heaviside_with_each_packages_convention():
    x = torch.tensor([-1.0, -1e-30, -0.0, 0.0, 1e-30, 0.04, 2.0], requires_grad=True)
    expected_strict = torch.tensor([0.0, 0, 0, 0, 1, 1, 1])
    assert torch.equal(snntorch_spike_grad()(x), expected_strict)
    with torch.no_grad():
        assert torch.equal(snntorch_spike_grad()(x), expected_strict)
    pytest.importorskip("spikingjelly.activation_based.surrogate")
    expected_at_zero = torch.tensor([0.0, 0, 1, 1, 1, 1, 1])
    assert torch.equal(spikingjelly_surrogate()(x), expected_at_zero)
    with torch.no_grad():
        assert torch.equal(spikingjelly_surrogate()(x), expected_at_zero)


def test_snntorch_leaky_spikes_as_with_its_own_surrogate_at_exact_ties():
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(0)
    current = torch.randint(0, 5, (30, 4, 50)).float() * 0.25  # dyadic: membranes hit 1.0 exactly
    runs = {}
    for name, spike_grad in (("ours", snntorch_spike_grad(seed=0)), ("atan", None)):
        leaky = snn.Leaky(beta=0.5, threshold=1.0, spike_grad=spike_grad)
        mem = leaky.init_leaky()
        spikes, mems = [], []
        for t in range(30):
            spk, mem = leaky(current[t].requires_grad_(), mem)
            spikes.append(spk)
            mems.append(mem.detach())
        runs[name] = (torch.stack(spikes), torch.stack(mems))
    assert torch.equal(runs["ours"][0], runs["atan"][0])
    assert torch.equal(runs["ours"][1], runs["atan"][1])
    assert 0 < runs["ours"][0].mean() < 0.5
    # ties happen: the returned mem is the one fire() compared (reset_delay: reset at the next step)
    assert int((runs["ours"][1] == 1.0).sum()) > 0


def test_spikingjelly_lif_spikes_as_with_its_own_surrogate_at_exact_ties():
    pytest.importorskip("spikingjelly.activation_based.surrogate")
    from spikingjelly.activation_based import functional, neuron, surrogate

    torch.manual_seed(0)
    x = torch.randint(0, 5, (30, 4, 50)).float() * 0.5  # tau 2: charge h = v + (x - v) / 2, dyadic
    spikes = {}
    for name, function in (("ours", spikingjelly_surrogate(seed=0)), ("sigmoid", surrogate.Sigmoid())):
        node = neuron.LIFNode(tau=2.0, surrogate_function=function, step_mode="m")
        spikes[name] = node(x.clone().requires_grad_())
        functional.reset_net(node)
    assert torch.equal(spikes["ours"], spikes["sigmoid"])
    # ties happen: the charged potential h is exactly the threshold 1.0 (recomputed here from x)
    v, at_threshold = torch.zeros(4, 50), 0
    for t in range(30):
        h = v + (x[t] - v) / 2.0
        at_threshold += int((h == 1.0).sum())
        v = torch.where(h >= 1.0, torch.zeros_like(h), h)
    assert at_threshold > 0
    assert torch.equal(spikes["ours"][0], (x[0] / 2.0 >= 1.0).float())


# --- backward: eq. 7, in expectation and draw by draw ----------------------------------------------

LAWS = [("normal", 1), ("uniform", 3), ("laplace", 1), ("sigmoid", 1), ("fast_sigmoid", 1), ("user", 2)]


@pytest.mark.parametrize("name, m", LAWS)
def test_the_mean_gradient_is_the_expected_surrogate(name, m):
    delta, draws = 0.05, 20_000
    law = user_law(delta) if name == "user" else resolve(name, delta)
    grid = torch.linspace(-3 * delta, 3 * delta, 24, dtype=torch.float64)  # even count: no v = 0
    x = grid.expand(draws, -1).clone().requires_grad_()
    snntorch_spike_grad(delta, m, law, seed=11)(x).sum().backward()
    mean, spread = x.grad.mean(0), x.grad.std(0)
    expected = law.expected_grad(grid, delta)
    assert bool((mean - expected).abs().le(SIGMAS * spread / math.sqrt(draws) + 1e-12).all()), (mean, expected)
    assert float(expected.max()) > 5 * float(expected.min())  # the grid spans the surrogate's peak and tails


@pytest.mark.parametrize("framework", ["snntorch", "spikingjelly"])
def test_each_adapter_averages_to_the_normal_surrogate(framework):
    delta, draws = 0.1, 20_000
    grid = torch.linspace(-0.35, 0.35, 16)
    x = grid.expand(draws, -1).clone().requires_grad_()
    make_adapter(framework, delta=delta, m=2, dist="normal", seed=3)(x).sum().backward()
    mean, spread = x.grad.mean(0), x.grad.std(0)
    expected = torch.exp(-0.5 * (grid / delta) ** 2) / (delta * math.sqrt(2 * math.pi))  # eq. 9
    assert bool((mean - expected).abs().le(SIGMAS * spread / math.sqrt(draws)).all()), (mean, expected)


@pytest.mark.parametrize("framework", ["snntorch", "spikingjelly"])
@pytest.mark.parametrize("name, m", [("normal", 3), ("laplace", 1), ("fast_sigmoid", 2), ("user", 1)])
def test_g_is_eq7_at_the_drawn_z_and_nonzero_only_at_active_entries(framework, name, m):
    delta = 0.05
    law = user_law(delta) if name == "user" else resolve(name, delta)
    torch.manual_seed(2024)
    x = (torch.randn(6, 8, 40) * 0.1).requires_grad_()
    grad_out = torch.rand(6, 8, 40) + 0.5
    generator = torch.Generator().manual_seed(2024)
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    adapter = make_adapter(framework, delta=delta, m=m, dist=law, generator=generator)
    spikes = adapter(x)
    positions, values = spikes.grad_fn.saved_tensors
    spikes.backward(grad_out)
    g = eq7_reference(x, delta, m, law, rng.next_key(replay, x.device))
    torch.testing.assert_close(x.grad, grad_out * g, rtol=1e-6, atol=0)
    active = g != 0
    assert torch.equal(x.grad != 0, active)
    assert 0 < int(active.sum()) < x.numel() // 2
    # stored sparse: the positions of the active entries and g there, nothing of x's size
    assert positions.shape == values.shape == (int(active.sum()),)
    assert torch.equal(positions, torch.nonzero(active.reshape(-1)).squeeze(1))
    counts = adapter.estimator if framework == "spikingjelly" else adapter
    assert (counts.drawn_entries, counts.active_entries) == (x.numel(), int(active.sum()))
    assert counts.active_fraction == int(active.sum()) / x.numel()
    counts.reset_counts()
    assert (counts.drawn_entries, counts.active_entries, counts.active_fraction) == (0, 0, 0.0)


def test_no_draw_is_made_without_a_gradient():
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    sg = snntorch_spike_grad(generator=generator)
    x = torch.randn(100) * 0.1
    sg(x)
    with torch.no_grad():
        sg(x.requires_grad_())
    assert torch.equal(generator.get_state(), state) and sg.drawn_entries == 0
    sg(x)
    assert not torch.equal(generator.get_state(), state) and sg.drawn_entries == 100


# --- reproducible by seed ------------------------------------------------------------------------

def run_snntorch_network(spike_grad_factory, seed=0):
    snn = pytest.importorskip("snntorch")
    torch.manual_seed(seed)
    fc1, fc2 = torch.nn.Linear(20, 40), torch.nn.Linear(40, 5)
    with torch.no_grad():
        fc1.weight.mul_(3)
    lif1 = snn.Leaky(beta=0.9, spike_grad=spike_grad_factory())
    lif2 = snn.Leaky(beta=0.9, spike_grad=spike_grad_factory(), output=True)
    x = (torch.rand(25, 16, 20) < 0.3).float()
    mem1, mem2, out = lif1.init_leaky(), lif2.init_leaky(), []
    for t in range(25):
        spk1, mem1 = lif1(fc1(x[t]), mem1)
        _, mem2 = lif2(fc2(spk1), mem2)
        out.append(mem2)
    loss = torch.nn.functional.cross_entropy(torch.stack(out).sum(0), torch.arange(16) % 5)
    loss.backward()
    return [p.grad.clone() for p in (fc1.weight, fc1.bias, fc2.weight, fc2.bias)]


def test_the_same_seed_gives_the_same_gradients():
    first = run_snntorch_network(lambda: snntorch_spike_grad(0.1, 2, "laplace", seed=42))
    again = run_snntorch_network(lambda: snntorch_spike_grad(0.1, 2, "laplace", seed=42))
    other = run_snntorch_network(lambda: snntorch_spike_grad(0.1, 2, "laplace", seed=43))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other[0])
    assert float(first[0].abs().sum()) > 0


def test_the_global_generator_reproduces_under_manual_seed():
    first = run_snntorch_network(lambda: snntorch_spike_grad(0.1), seed=9)
    again = run_snntorch_network(lambda: snntorch_spike_grad(0.1), seed=9)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


# --- a training step inside each framework -------------------------------------------------------

def test_a_training_step_in_snntorch_gives_finite_sparse_gradients():
    snn = pytest.importorskip("snntorch")
    delta = 0.05
    torch.manual_seed(1)
    seen = []
    sg = snntorch_spike_grad(delta, 1, "normal", seed=1)

    def watched(x):  # the hidden layer's spike_grad, its input's gradient recorded
        if x.requires_grad:
            x.register_hook(lambda grad, x=x.detach(): seen.append((x, grad)))
        return sg(x)

    net = torch.nn.ModuleList([torch.nn.Linear(30, 64), snn.Leaky(beta=0.9, spike_grad=watched),
                               torch.nn.Linear(64, 4), snn.Leaky(beta=0.9, spike_grad=snntorch_spike_grad(delta),
                                                                 output=True)])
    with torch.no_grad():
        net[0].weight.mul_(4)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    x = (torch.rand(40, 32, 30) < 0.2).float()
    mem1, mem2, out = net[1].init_leaky(), net[3].init_leaky(), []
    for t in range(40):
        spk1, mem1 = net[1](net[0](x[t]), mem1)
        _, mem2 = net[3](net[2](spk1), mem2)
        out.append(mem2)
    loss = torch.nn.functional.cross_entropy(torch.stack(out).sum(0), torch.arange(32) % 4)
    loss.backward()
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    assert float(net[0].weight.grad.abs().sum()) > 0
    optimizer.step()
    assert len(seen) == 40  # one per step: the detached reset calls receive no gradient
    assert sg.drawn_entries == (40 + 39) * 32 * 64  # ... but draw (not at t = 0: init_leaky's mem has no grad)
    xs, grads = torch.cat([x for x, _ in seen]), torch.cat([g for _, g in seen])
    active = grads != 0
    assert not bool(active[xs.abs() >= delta * sg.law.abs_z_bound].any())
    ok, figures = within_sigmas(int(active.sum()), normal_active_probability(xs, delta))
    assert ok, figures
    assert 0 < active.float().mean() < 0.2


def test_a_training_step_in_spikingjelly_multi_step_gives_finite_sparse_gradients():
    pytest.importorskip("spikingjelly.activation_based.surrogate")
    from spikingjelly.activation_based import functional, layer, neuron

    delta = 0.05
    torch.manual_seed(2)
    sg = spikingjelly_surrogate(delta, 1, "normal", seed=2)
    seen = []

    def watch(module, inputs, output):  # records the surrogate's input and its gradient
        inputs[0].register_hook(lambda grad, x=inputs[0].detach(): seen.append((x, grad)))

    sg.register_forward_hook(watch)
    net = torch.nn.Sequential(
        layer.Conv2d(1, 6, 3, padding=1, step_mode="m"),
        neuron.LIFNode(tau=2.0, surrogate_function=sg, detach_reset=True, step_mode="m"),
        layer.Flatten(step_mode="m"),
        layer.Linear(6 * 8 * 8, 3, step_mode="m"),
    )
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    x = torch.rand(5, 16, 1, 8, 8) * 2  # (T, B, C, H, W)
    loss = torch.nn.functional.cross_entropy(net(x).mean(0), torch.arange(16) % 3)
    loss.backward()
    functional.reset_net(net)
    assert all(bool(torch.isfinite(p.grad).all()) for p in net.parameters())
    assert float(net[0].weight.grad.abs().sum()) > 0
    optimizer.step()
    assert len(seen) == 5  # the plain-PyTorch step loop: one call per time step
    xs, grads = torch.cat([x for x, _ in seen]), torch.cat([g for _, g in seen])
    active = grads != 0
    ok, figures = within_sigmas(int(active.sum()), normal_active_probability(xs, delta))
    assert ok, figures
    assert 0 < active.float().mean() < 0.2


def test_spikingjelly_has_no_kernel_for_it_and_its_triton_path_refuses_it():
    """spikingjelly 2.0 picks its kernels by the surrogate's class name: ours has none, so its neurons
    take the automatic plain-PyTorch path, and the Triton precision path raises."""
    pytest.importorskip("spikingjelly.activation_based.surrogate")
    from spikingjelly._ops.surrogate import _surrogate_spec
    from spikingjelly._ops.surrogate_dispatch import resolve_sg_triton_id_and_alpha

    sg = spikingjelly_surrogate()
    assert _surrogate_spec(sg) is None
    with pytest.raises(NotImplementedError, match="got LocalZO"):
        resolve_sg_triton_id_and_alpha(sg)


def test_the_spikingjelly_surrogate_keeps_its_base_and_pickles():
    pytest.importorskip("spikingjelly.activation_based.surrogate")
    import io
    from spikingjelly.activation_based import neuron, surrogate

    sg = spikingjelly_surrogate(0.1, 2, "uniform", seed=4)
    assert isinstance(sg, surrogate.SurrogateFunctionBase) and sg.spiking is True
    assert repr(sg).startswith("LocalZO(delta=0.1, m=2, dist=Uniform(")
    buffer = io.BytesIO()
    torch.save(neuron.LIFNode(surrogate_function=sg), buffer)
    buffer.seek(0)
    node = torch.load(buffer, weights_only=False)
    assert type(node.surrogate_function) is type(sg) and node.surrogate_function.estimator.m == 2
    sg.set_spiking_mode(False)
    with pytest.raises(NotImplementedError, match="spiking=False"):
        sg(torch.zeros(3, requires_grad=True))


@pytest.mark.gpu
def test_spikingjelly_on_cuda_takes_the_automatic_path():
    pytest.importorskip("spikingjelly.activation_based.surrogate")
    from spikingjelly.activation_based import functional, neuron

    sg = spikingjelly_surrogate(0.05, 1, "normal", seed=0)
    node = neuron.LIFNode(tau=2.0, surrogate_function=sg, detach_reset=True, step_mode="m")
    x = (torch.rand(8, 64, 100, device="cuda") * 2).requires_grad_()
    node(x).sum().backward()
    functional.reset_net(node)
    assert bool(torch.isfinite(x.grad).all())
    assert 0 < float((x.grad != 0).float().mean()) < 0.2


# --- argument checks and the optional dependency -------------------------------------------------

@pytest.mark.parametrize("kwargs, error, message", [
    ({"delta": 0.0}, ValueError, "delta must be finite and > 0"),
    ({"delta": float("nan")}, ValueError, "delta must be finite and > 0"),
    ({"m": 0}, ValueError, "m must be >= 1"),
    ({"m": 1.5}, TypeError, "m must be an int"),
    ({"m": True}, TypeError, "m must be an int"),
    ({"dist": "cauchy"}, ValueError, "dist must be one of"),
    ({"dist": 3}, TypeError, "dist must be a name or a Distribution"),
    ({"dist": lambda v: v}, TypeError, "distribution_from_surrogate"),
    ({"dist": user_law(0.1)}, ValueError, "does not match the delta=0.1"),
    ({"seed": -1}, ValueError, r"seed must be in \[0, 2\*\*64\)"),
    ({"seed": 1.0}, TypeError, "seed must be an int"),
    ({"seed": 1, "generator": torch.Generator()}, ValueError, "seed or generator, not both"),
    ({"generator": 7}, TypeError, "generator must be a torch.Generator"),
])
@pytest.mark.parametrize("framework", ["snntorch", "spikingjelly"])
def test_bad_arguments_are_refused(framework, kwargs, error, message):
    if framework == "spikingjelly":
        pytest.importorskip("spikingjelly.activation_based.surrogate")
    factory = snntorch_spike_grad if framework == "snntorch" else spikingjelly_surrogate
    with pytest.raises(error, match=message):
        factory(**kwargs)


def test_bad_inputs_are_refused():
    sg = snntorch_spike_grad()
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        sg(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        sg([0.1, 0.2])
    with pytest.raises(ValueError, match="x contains NaN or inf"):
        sg(torch.tensor([0.1, float("nan")], requires_grad=True))


def test_without_spikingjelly_the_adapter_says_what_to_install(monkeypatch, fresh_spikingjelly_class):
    monkeypatch.setitem(sys.modules, "spikingjelly", None)
    monkeypatch.setitem(sys.modules, "spikingjelly.activation_based", None)
    with pytest.raises(ImportError, match="pip install --no-deps spikingjelly"):
        spikingjelly_surrogate()
    with pytest.raises(ImportError, match="pip install --no-deps spikingjelly"):
        surrogates.LocalZO
    assert callable(snntorch_spike_grad())  # the snntorch adapter needs no snntorch
