"""NIR export and import (ztriton.interop.nir): the round trip is exact, the exported graph run by an
independent forward-Euler simulation of NIR's continuous definitions equals the engine, refusals name
the node, and snntorch's / spikingjelly's importers read our graphs (where installed)."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

nir = pytest.importorskip("nir")

from ztriton import LeakyReadout, SparseLIFLinear, from_nir, to_nir  # noqa: E402
from ztriton.cli import main  # noqa: E402
from ztriton.data import SpikeTimeDataset  # noqa: E402
from ztriton.train import Config, load_model, train  # noqa: E402

STEPS = 120
BATCH = 6
#: |v - threshold| below which an entry counts as near threshold, and below which a spike of the
#: simulation may differ from the engine's (rounding: both are float64 sums of ~100 terms of size ~1)
NEAR = 0.05
BOUNDARY = 1e-10


# --- the independent reference: NIR's equations stepped with forward Euler ----------------------------


def _order(graph):
    """Nodes in evaluation order and the edges that close a cycle (found by depth-first search from
    the Input): those read the previous step's output."""
    succ = {name: [] for name in graph.nodes}
    for a, b in graph.edges:
        succ[a].append(b)
    back, state = set(), {}

    def visit(name):
        state[name] = "open"
        for nxt in succ[name]:
            if state.get(nxt) == "open":
                back.add((name, nxt))
            elif nxt not in state:
                visit(nxt)
        state[name] = "done"

    (start,) = [k for k, v in graph.nodes.items() if isinstance(v, nir.Input)]
    visit(start)
    forward = [(a, b) for a, b in graph.edges if (a, b) not in back]
    indegree = {name: 0 for name in graph.nodes}
    for _, b in forward:
        indegree[b] += 1
    order, ready = [], [start]
    while ready:
        name = ready.pop()
        order.append(name)
        for a, b in forward:
            if a == name:
                indegree[b] -= 1
                if indegree[b] == 0:
                    ready.append(b)
    assert len(order) == len(graph.nodes)
    return order, back


def simulate(graph, x, dt):
    """Every node's output at every step, and each spiking node's potential before its reset.

    LIF: tau dv/dt = (v_leak - v) + r I, z = [v > v_threshold], then v := v_reset; IF: dv/dt = r I;
    LI / I likewise without spikes (output v); Threshold: z = [I > threshold]; Affine / Linear:
    W I (+ b); several edges into a node sum. Euler step: v += dt * dv/dt, with this step's input."""
    order, back = _order(graph)
    x = x.numpy()
    preds = {name: [a for a, b in graph.edges if b == name] for name in graph.nodes}
    prev = {name: 0.0 for name in graph.nodes}
    state = {name: 0.0 for name in graph.nodes}
    outputs = {name: [] for name in graph.nodes}
    potentials = {name: [] for name in graph.nodes}
    for t in range(x.shape[0]):
        out = {}
        for name in order:
            node = graph.nodes[name]
            if isinstance(node, nir.Input):
                out[name] = x[t]
                continue
            i = sum((prev[a] if (a, name) in back else out[a]) for a in preds[name])
            if isinstance(node, nir.Affine):
                out[name] = i @ node.weight.T + node.bias
            elif isinstance(node, nir.Linear):
                out[name] = i @ node.weight.T
            elif isinstance(node, (nir.LIF, nir.LI, nir.IF, nir.I)):
                v = state[name]
                if isinstance(node, (nir.LIF, nir.LI)):
                    v = v + dt / node.tau * ((node.v_leak - v) + node.r * i)
                else:
                    v = v + dt * node.r * i
                if isinstance(node, (nir.LIF, nir.IF)):  # spike where v > v_threshold, then v := v_reset
                    potentials[name].append(v - node.v_threshold)
                    z = (v > node.v_threshold).astype(np.float64)
                    v = np.where(z > 0, node.v_reset, v)
                    out[name] = z
                else:
                    out[name] = v
                state[name] = v
            elif isinstance(node, nir.Threshold):
                potentials[name].append(i - node.threshold)
                out[name] = (i > node.threshold).astype(np.float64)
            elif isinstance(node, nir.Output):
                out[name] = i
            else:
                raise AssertionError(f"the reference does not simulate {type(node).__name__}")
            outputs[name].append(np.broadcast_to(out[name], (x.shape[1],) + np.shape(out[name])[-1:]).copy())
        prev = out
    stack = lambda d: {k: np.stack(v) for k, v in d.items() if v}  # noqa: E731
    return stack(outputs), stack(potentials)


def _spike_node(graph, i):
    return f"lif_{i}" if f"lif_{i}" in graph.nodes else f"threshold_{i}"


def _engine(model, x):
    """The output of every layer of the Sequential."""
    outs, h = [], x
    with torch.no_grad():
        for layer in model:
            h = layer(h)
            outs.append(h.numpy())
    return outs


def assert_engine_equals_simulation(model, graph, x, dt, spike_nodes=None):
    """Spikes equal, except boundary flips: at the first step where any layer's spikes differ, every
    differing entry has |v - threshold| < BOUNDARY (after it the two trajectories may part); the
    readout agrees to 1e-12 up to there. Returns the number of near-threshold entries and the first
    differing step (STEPS: none). `spike_nodes`: the graph's node of each hidden layer (default: to_nir's names)."""
    sim, potentials = simulate(graph, x, dt)
    engine = _engine(model, x)
    hidden = [i for i, layer in enumerate(model) if isinstance(layer, SparseLIFLinear)]
    names = dict(zip(hidden, spike_nodes or [_spike_node(graph, i) for i in hidden]))
    first = x.shape[0]
    for i in hidden:
        differ = np.argwhere(sim[names[i]] != engine[i])
        if differ.size:
            first = min(first, int(differ[:, 0].min()))
    for i in hidden:
        node = names[i]
        at_first = np.argwhere(sim[node][first:first + 1] != engine[i][first:first + 1])
        for _, b, j in at_first:
            assert abs(potentials[node][first, b, j]) < BOUNDARY, (i, first, b, j, potentials[node][first, b, j])
    if not hidden or len(hidden) < len(model):
        np.testing.assert_allclose(sim["output"][:first], engine[-1][:first], rtol=0, atol=1e-12)
    near = sum(int((np.abs(potentials[names[i]]) < NEAR).sum()) for i in hidden)
    return near, first


# --- the networks --------------------------------------------------------------------------------------


CASES = {
    "plain": dict(reset="subtract"),
    "zero": dict(reset="zero"),
    "recurrent-zero": dict(reset="zero", recurrent=True),
    "recurrent-subtract": dict(reset="subtract", recurrent=True),
    "learnt-zero": dict(reset="zero", learn_beta=True, learn_threshold=True),
    "learnt-subtract": dict(reset="subtract", learn_beta=True, learn_threshold=True, recurrent=True),
    "per-neuron-threshold": dict(reset="subtract", threshold="per-neuron"),
    "bias-zero": dict(reset="zero", bias=True),
    "if-zero": dict(reset="zero", beta=1.0),
    "if-subtract": dict(reset="subtract", beta=1.0),
}


def _network(case, readout=True, seed=0, dtype=torch.float64):
    """A 12-24-16 network (and a 5-unit readout) whose membranes stay near threshold: real-valued
    inputs, weights scaled so the current per step is a fraction of the threshold."""
    options = dict(CASES[case])
    gen = torch.Generator().manual_seed(seed)
    beta = options.pop("beta", None)
    per_neuron = options.pop("threshold", None) == "per-neuron"
    layers = []
    for i, (n_in, n_out) in enumerate([(12, 24), (24, 16)]):
        threshold = 0.6 + torch.rand(n_out, generator=gen, dtype=torch.float64) if per_neuron else 0.8
        layer = SparseLIFLinear(n_in, n_out, beta=beta or (0.9 if i == 0 else 0.8), threshold=threshold, **options)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n_out, n_in, generator=gen) * (0.5 if beta else 1.2) / n_in ** 0.5)
            if layer.bias is not None:
                layer.bias.copy_(0.05 * torch.randn(n_out, generator=gen))
            if layer.recurrent_weight is not None:
                layer.recurrent_weight.copy_(torch.randn(n_out, n_out, generator=gen) * 0.3 / n_out ** 0.5)
            if layer.learn_beta:
                layer.beta_logit.add_(0.1 * (i + 1))  # a "trained" leak, away from its initial value
            if layer.learn_threshold:
                layer.threshold.add_(0.05 * torch.randn(n_out, generator=gen))
        layers.append(layer)
    if readout:
        layers.append(LeakyReadout(16, 5, beta=0.85, learn_beta=options.get("learn_beta", False)))
        with torch.no_grad():
            layers[-1].weight.copy_(torch.randn(5, 16, generator=gen) / 4)
    x = torch.randn(STEPS, BATCH, 12, generator=gen, dtype=torch.float64) * 0.5 + 0.3
    return nn.Sequential(*layers).to(dtype), x.to(dtype)


def _subtract_option(model):
    return "exact" if any(getattr(layer, "reset", "") == "subtract" for layer in model) else "error"


# --- round trip and reference ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_round_trip_through_a_file_is_exact(case, tmp_path):
    """to_nir -> nir.write -> nir.read -> from_nir: the same parameters bit for bit, the same outputs
    over 120 steps (float64, hundreds of entries near threshold)."""
    model, x = _network(case)
    graph = to_nir(model, subtract_reset=_subtract_option(model))
    nir.write(tmp_path / "net.nir", graph)
    back = from_nir(tmp_path / "net.nir")
    assert [type(m) for m in back] == [type(m) for m in model]
    for ours, theirs in zip(model, back):
        assert ours.beta == theirs.beta
        assert ours.learn_beta == theirs.learn_beta
        mine, yours = ours.state_dict(), theirs.state_dict()
        assert sorted(mine) == sorted(yours)
        for key in mine:
            assert mine[key].dtype == yours[key].dtype and torch.equal(mine[key], yours[key]), key
        if isinstance(ours, SparseLIFLinear):
            assert (ours.reset, ours.recurrent, ours.learn_threshold) == (theirs.reset, theirs.recurrent,
                                                                           theirs.learn_threshold)
    for ours, theirs in zip(_engine(model, x), _engine(back, x)):
        assert np.array_equal(ours, theirs)
    near, _ = assert_engine_equals_simulation(model, graph, x, 1e-4)
    assert near >= 300


@pytest.mark.parametrize("dt", [1e-4, 1e-3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_the_nir_equations_run_step_by_step_equal_the_engine(case, dt):
    """The exported graph simulated from NIR's definitions (forward Euler, its own code) gives the
    engine's spikes: in these draws no boundary flip occurs at all (first differing step: none)."""
    model, x = _network(case, seed=1)
    graph = to_nir(model, dt=dt, subtract_reset=_subtract_option(model))
    assert graph.metadata["dt"] == dt
    near, first = assert_engine_equals_simulation(model, graph, x, dt)
    assert near >= 300 and first == STEPS


def test_the_graph_is_flat_and_its_parameters_are_arrays_of_the_layer_shape():
    model, _ = _network("learnt-subtract")
    graph = to_nir(model, subtract_reset="exact")
    assert not any(isinstance(node, nir.NIRGraph) for node in graph.nodes.values())
    assert set(graph.edges) == {
        ("input", "linear_0"), ("linear_0", "li_0"), ("li_0", "threshold_0"), ("threshold_0", "reset_0"),
        ("reset_0", "li_0"), ("threshold_0", "recurrent_0"), ("recurrent_0", "li_0"), ("threshold_0", "linear_1"),
        ("linear_1", "li_1"), ("li_1", "threshold_1"), ("threshold_1", "reset_1"), ("reset_1", "li_1"),
        ("threshold_1", "recurrent_1"), ("recurrent_1", "li_1"), ("threshold_1", "linear_2"), ("linear_2", "readout"),
        ("readout", "output")}
    li, readout = graph.nodes["li_1"], graph.nodes["readout"]
    beta = model[1].beta  # the learnt value now
    assert li.tau.shape == li.r.shape == li.v_leak.shape == (16,)
    np.testing.assert_allclose(li.tau, 1e-4 / (1 - beta), rtol=1e-15)
    np.testing.assert_allclose(li.r, 1 / (1 - beta), rtol=1e-15)
    assert li.metadata["ztriton"]["beta"] == beta
    assert np.array_equal(graph.nodes["threshold_1"].threshold, model[1].threshold.detach().numpy())
    assert np.array_equal(graph.nodes["reset_1"].weight, -np.diag(model[1].threshold.detach().numpy()))
    np.testing.assert_array_equal(readout.r, np.ones(5))
    assert graph.metadata["dt"] == 1e-4 and "forward Euler" in graph.metadata["discretisation"]


def test_as_zero_writes_the_reset_to_zero_network_and_warns_what_differs():
    model, x = _network("plain")
    with pytest.warns(UserWarning, match=r"layers \[0, 1\] subtract the threshold.*restarts from 0 where the layer's "
                                         r"keeps u - threshold"):
        graph = to_nir(model, subtract_reset="as_zero")
    as_zero = copy.deepcopy(model)
    for layer in as_zero[:2]:
        layer.reset = "zero"
    assert_engine_equals_simulation(as_zero, graph, x, 1e-4)  # the graph is the zero-reset network...
    sim, _ = simulate(graph, x, 1e-4)
    assert (sim["lif_0"] != _engine(model, x)[0]).sum() > 50  # ...not the model's
    assert from_nir(graph)[0].reset == "zero"


def test_another_dt_on_import_changes_leak_and_gain_as_the_equations_say():
    """Read at dt 2e-5 a graph written at 1e-4: beta' = 1 - 0.2 (1 - beta) and the gain r dt / tau is 0.2,
    folded into the weights; the engine still equals the simulation at the new dt."""
    model, x = _network("zero")
    graph = to_nir(model)
    back = from_nir(graph, dt=2e-5)
    assert back[0].beta == pytest.approx(1 - 0.2 * 0.1, rel=1e-12) and not back[0].learn_beta
    torch.testing.assert_close(back[0].weight, 0.2 * model[0].weight, rtol=1e-15, atol=0)
    assert_engine_equals_simulation(back, graph, x * 5, 2e-5)


def test_the_training_application_model_and_the_cli_export(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("ztriton.train.load_data", _tiny_data)
    train(Config(epochs=1, hidden=[16], steps=20, batch_size=64, compare_every=0, reset="zero"), tmp_path / "z",
          progress=False)
    train(Config(epochs=1, hidden=[16], steps=20, batch_size=64, compare_every=0, recurrent=True), tmp_path / "s",
          progress=False)
    assert main(["export", str(tmp_path / "z"), "--nir", str(tmp_path / "z.nir")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert main(["export", str(tmp_path / "s"), "--nir", str(tmp_path / "s.nir")]) == 2
    assert "reset='subtract'" in capsys.readouterr().err and not (tmp_path / "s.nir").exists()
    assert main(["export", str(tmp_path / "s"), "--nir", str(tmp_path / "s.nir"), "--subtract-reset", "exact",
                 "--dt", "1e-3"]) == 0
    assert main(["export", str(tmp_path / "s"), "--nir", str(tmp_path / "s.nir")]) == 2
    assert "exists already" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "s"), "--nir", str(tmp_path / "t.nir"), "--dt", "0"]) == 2
    assert "--dt: dt must be finite and > 0" in capsys.readouterr().err
    x = _tiny_data(Config(steps=20))[1].batch(torch.arange(20))[0]
    for run, file in (("z", "z.nir"), ("s", "s.nir")):
        model = load_model(tmp_path / run)
        graph = nir.read(tmp_path / file)
        assert graph.metadata["readout_over_time"].startswith("max")
        back = from_nir(graph)
        with torch.no_grad():
            assert torch.equal(back(x).amax(0), model(x)[0])


def _tiny_data(cfg):
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(120) % 3
    times = torch.full((120, 20), -1, dtype=torch.int64)
    for cls in range(3):  # each class fires its own inputs early
        rows = labels == cls
        times[rows, cls * 6:cls * 6 + 6] = torch.randint(0, 10, (int(rows.sum()), 6), generator=gen)
    return SpikeTimeDataset(times[:100], labels[:100], cfg.steps, 3), SpikeTimeDataset(times[100:], labels[100:],
                                                                                       cfg.steps, 3)


# --- graphs of other tools, and refusals -----------------------------------------------------------------


def _lif_graph(neuron, n_in=6, seed=0):
    gen = np.random.default_rng(seed)
    n = neuron.v_threshold.size if hasattr(neuron, "v_threshold") else neuron.r.size
    nodes = {"input": nir.Input(input_type={"input": np.array([n_in])}),
             "fc": nir.Affine(weight=gen.normal(size=(n, n_in)) * 0.4, bias=gen.normal(size=n) * 0.05),
             "neuron": neuron, "output": nir.Output(output_type={"output": np.array([n])})}
    return nir.NIRGraph(nodes=nodes, edges=[("input", "fc"), ("fc", "neuron"), ("neuron", "output")])


def test_a_foreign_float32_lif_graph_recovers_its_leak_and_unit_gain():
    """snntorch writes tau = dt / (1 - beta) and r = tau / dt in float32: beta comes back as the float32
    it was written from, the gain r dt / tau snaps to exactly 1."""
    beta = np.float32(0.93)
    tau = (np.float32(1e-4) / (1 - np.full(8, beta))).astype(np.float32)
    neuron = nir.LIF(tau=tau, r=(tau / np.float32(1e-4)).astype(np.float32), v_leak=np.zeros(8, np.float32),
                     v_threshold=np.full(8, 0.5, np.float32), v_reset=np.zeros(8, np.float32))
    graph = _lif_graph(neuron)
    (layer,) = from_nir(graph, dtype=torch.float64)
    assert layer.beta == float(beta) and layer.reset == "zero"
    assert torch.equal(layer.weight, torch.from_numpy(graph.nodes["fc"].weight))


def test_v_leak_is_folded_into_the_bias_and_r_into_the_weights():
    gen = np.random.default_rng(3)
    neuron = nir.LIF(tau=np.full(8, 1e-3), r=gen.uniform(5, 15, 8), v_leak=gen.normal(size=8) * 0.1,
                     v_threshold=np.full(8, 0.3), v_reset=np.zeros(8))
    graph = _lif_graph(neuron)
    model = from_nir(graph, dt=1e-4)
    x = torch.randn(STEPS, BATCH, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 0.5
    near, first = assert_engine_equals_simulation(model, graph, x, 1e-4, ["neuron"])
    assert near > 50 and first == STEPS


def _refused(graph, match):
    with pytest.raises(ValueError, match=match):
        from_nir(graph)


def test_graphs_without_a_ztriton_layer_are_refused_naming_the_node():
    n = 4
    lif = dict(tau=np.full(n, 1e-3), r=np.full(n, 10.0), v_leak=np.zeros(n), v_threshold=np.ones(n))
    _refused(_lif_graph(nir.LIF(**lif, v_reset=np.full(n, 0.1))),
             r"cannot import NIR node 'neuron' \(LIF\): v_reset != 0")
    _refused(_lif_graph(nir.LIF(**{**lif, "tau": np.array([1e-3, 1e-3, 2e-3, 1e-3])})),
             r"'neuron' \(LIF\): its tau differs between neurons \(2 values\)")
    _refused(_lif_graph(nir.LIF(**{**lif, "tau": np.full(n, 5e-5)})), r"'neuron' \(LIF\): tau = 5e-05 s .* <= 0")
    _refused(_lif_graph(nir.LIF(**{**lif, "v_threshold": -np.ones(n)})), r"'neuron' \(LIF\): the threshold must be")
    cuba = nir.CubaLIF(tau_syn=np.full(n, 1e-3), tau_mem=np.full(n, 1e-3), r=np.ones(n), v_leak=np.zeros(n),
                       v_threshold=np.ones(n))
    _refused(_lif_graph(cuba), r"'neuron' \(CubaLIF\): a current-based synapse")
    _refused(_with_threshold_but_no_reset(n), r"'li' \(LI\): its Threshold 'spikes' has no Linear of -diag")
    delay = _lif_graph(nir.LIF(**lif))
    delay.nodes["wait"] = nir.Delay(delay=np.ones(n))
    delay.edges = [("input", "fc"), ("fc", "neuron"), ("neuron", "wait"), ("wait", "output")]
    _refused(delay, r"'wait' \(Delay\): ztriton layers have no axonal delay")
    branch = _lif_graph(nir.LIF(**lif))
    branch.nodes["other"] = nir.Linear(weight=np.ones((n, 6)))
    branch.edges.append(("input", "other"))
    _refused(branch, r"'input' \(Input\): it has 2 successors")
    bare = nir.NIRGraph(nodes={"input": nir.Input(input_type={"input": np.array([n])}), "neuron": nir.LIF(**lif),
                               "output": nir.Output(output_type={"output": np.array([n])})},
                        edges=[("input", "neuron"), ("neuron", "output")])
    _refused(bare, r"'neuron' \(LIF\): from_nir expects a Linear or Affine node \(a layer's synapses\) after 'input'")
    with pytest.raises(TypeError, match="graph_or_path must be a nir.NIRGraph or a file path"):
        from_nir(42)
    with pytest.raises(TypeError, match=r"unknown options \['beta'\]"):
        from_nir(_lif_graph(nir.LIF(**lif)), beta=0.5)


def _with_threshold_but_no_reset(n):
    nodes = {"input": nir.Input(input_type={"input": np.array([3])}), "fc": nir.Linear(weight=np.ones((n, 3))),
             "li": nir.LI(tau=np.full(n, 1e-3), r=np.full(n, 10.0), v_leak=np.zeros(n)),
             "spikes": nir.Threshold(threshold=np.ones(n)), "output": nir.Output(output_type={"output": np.array([n])})}
    return nir.NIRGraph(nodes=nodes, edges=[("input", "fc"), ("fc", "li"), ("li", "spikes"), ("spikes", "output")])


def test_nested_graphs_are_flattened_or_refused():
    model, x = _network("recurrent-zero", readout=False)
    flat = to_nir(model)
    inner = {"in": nir.Input(input_type={"input": np.array([24])}), "lif": flat.nodes["lif_0"],
             "rec": flat.nodes["recurrent_0"], "out": nir.Output(output_type={"output": np.array([24])})}
    nested = {k: v for k, v in flat.nodes.items() if k not in ("lif_0", "recurrent_0")}
    nested["layer"] = nir.NIRGraph(nodes=inner, edges=[("in", "lif"), ("lif", "rec"), ("rec", "lif"), ("lif", "out")])
    edges = [("input", "linear_0"), ("linear_0", "layer"), ("layer", "linear_1"), ("linear_1", "lif_1"),
             ("lif_1", "recurrent_1"), ("recurrent_1", "lif_1"), ("lif_1", "output")]
    back = from_nir(nir.NIRGraph(nodes=nested, edges=edges, metadata=dict(flat.metadata)))
    for ours, theirs in zip(_engine(model, x), _engine(back, x)):
        assert np.array_equal(ours, theirs)
    inner["in2"] = nir.Input(input_type={"input": np.array([24])})
    two = nir.NIRGraph(nodes=dict(nested, layer=nir.NIRGraph(nodes=inner, edges=[
        ("in", "lif"), ("in2", "lif"), ("lif", "rec"), ("rec", "lif"), ("lif", "out")], type_check=False)),
        edges=edges, type_check=False)
    _refused(two, r"'layer' \(NIRGraph\): a nested graph with 2 inputs and 1 outputs cannot be flattened")


def test_export_errors_are_clear():
    model, _ = _network("plain")
    with pytest.raises(ValueError, match=r"layer 0 has reset='subtract' \(eq. 1\), which NIR's LIF cannot express.*"
                                         r"subtract_reset='exact'.*subtract_reset='as_zero'"):
        to_nir(model)
    with pytest.raises(ValueError, match=r"subtract_reset must be one of \['as_zero', 'error', 'exact'\]"):
        to_nir(model, subtract_reset="soft")
    with pytest.raises(ValueError, match="dt must be finite and > 0"):
        to_nir(model, dt=-1e-3, subtract_reset="exact")
    with pytest.raises(TypeError, match="model must be an nn.Sequential of SparseLIFLinear"):
        to_nir(model[0])
    with pytest.raises(TypeError, match="layer 1 is a ReLU"):
        to_nir(nn.Sequential(model[0], nn.ReLU()), subtract_reset="exact")
    with pytest.raises(ValueError, match="layer 0 is a LeakyReadout before the last layer"):
        to_nir(nn.Sequential(LeakyReadout(12, 12, beta=0.9), model[0]), subtract_reset="exact")
    with pytest.raises(ValueError, match="layer 1 takes 24 inputs but layer 0 gives 16"):
        to_nir(nn.Sequential(model[1], model[1]), subtract_reset="exact")
    with pytest.raises(ValueError, match="layer 1 is a LeakyReadout with beta=1"):
        to_nir(nn.Sequential(model[0], LeakyReadout(24, 3, beta=1.0)), subtract_reset="exact")


# --- other tools' importers --------------------------------------------------------------------------------


def _peer_spikes(net, x, kinds):
    """Each neuron module's spikes over the steps of `x`, run step by step as nirtorch's modules are."""
    spikes = {}
    for name, module in net.named_modules():
        if type(module).__name__ in kinds:
            module.register_forward_hook(lambda m, i, o, name=name: spikes.setdefault(name, []).append(
                (o[0] if isinstance(o, tuple) else o).detach().double().clone()))
    state = None
    with torch.no_grad():
        for t in range(x.shape[0]):
            _, state = net(x[t], state)
    return [torch.stack(spikes[name]).numpy() for name in sorted(spikes)]


def _peer_graph(tmp_path, case, dtype):
    """A graph they can read (uniform thresholds, reset to zero, dt 1e-4, no LI), through a file."""
    model, x = _network(case, readout=False, dtype=dtype)
    nir.write(tmp_path / "net.nir", to_nir(model))
    return model, x, tmp_path / "net.nir"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_snntorch_reads_our_feed_forward_graphs_spike_for_spike(tmp_path, dtype, capsys):
    pytest.importorskip("nirtorch")
    import_nir = pytest.importorskip("snntorch.import_nir")
    model, x, path = _peer_graph(tmp_path, "zero", dtype)
    net = import_nir.import_from_nir(nir.read(path))  # float32 modules (torch.Tensor of the arrays)
    theirs = _peer_spikes(net, x.float(), ("Leaky",))
    ours = _engine(model, x)
    assert len(theirs) == 2 and all(s.sum() > 200 for s in ours)
    for mine, yours in zip(ours, theirs):
        assert np.array_equal(mine, yours)


@pytest.mark.parametrize("case", ["zero", "recurrent-zero", "if-zero"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spikingjelly_reads_our_graphs_spike_for_spike(tmp_path, case, dtype):
    pytest.importorskip("nirtorch")
    pytest.importorskip("loguru")
    sj = pytest.importorskip("spikingjelly.activation_based.nir_exchange.from_nir")
    model, x, path = _peer_graph(tmp_path, case, dtype)
    net = sj.import_from_nir(path, dt=1e-4, dtype=dtype, step_mode="s")  # single step: the graph has cycles
    theirs = _peer_spikes(net, x, ("_NIRStatefulModule",))
    ours = _engine(model, x)
    assert len(theirs) == 2 and all(s.sum() > 200 for s in ours)
    for mine, yours in zip(ours, theirs):
        assert np.array_equal(mine, yours)


def test_the_carried_beta_undoes_the_ulp_that_tau_loses():
    """For beta = 0.654763637090347, 1 - dt / (dt / (1 - beta)) is one ulp off (about 2 % of betas are):
    the beta in the node's metadata gives it back exactly; a graph without that metadata gets the ulp."""
    beta = 0.654763637090347
    layer = SparseLIFLinear(3, 2, beta=beta, reset="zero")
    graph = to_nir(nn.Sequential(layer))
    tau = graph.nodes["lif_0"].tau[0]
    assert 1 - 1e-4 / tau != beta
    assert from_nir(graph)[0].beta == beta
    graph.nodes["lif_0"].metadata = {}
    assert from_nir(graph)[0].beta == 1 - 1e-4 / tau


@pytest.mark.parametrize("case", ["plain", "learnt-subtract", "per-neuron-threshold"])
def test_the_round_trip_of_a_float32_network_is_exact(case, tmp_path):
    """As built in the default dtype: float32 weights and logits, the fixed threshold a float64 buffer
    (0.8 stays 0.8): each comes back in its own dtype with its own bits."""
    model, x = _network(case)
    model = nn.Sequential(*[_as_built_in_float32(layer) for layer in model])
    nir.write(tmp_path / "net.nir", to_nir(model, subtract_reset="exact"))
    back = from_nir(tmp_path / "net.nir")
    for ours, theirs in zip(model, back):
        mine, yours = ours.state_dict(), theirs.state_dict()
        for key in mine:
            assert mine[key].dtype == yours[key].dtype and torch.equal(mine[key], yours[key]), key
    for ours, theirs in zip(_engine(model, x.float()), _engine(back, x.float())):
        assert np.array_equal(ours, theirs)


def _as_built_in_float32(layer):
    threshold = getattr(layer, "threshold", None)
    layer.float()
    if threshold is not None and not isinstance(threshold, nn.Parameter):
        layer.threshold = threshold  # the float64 buffer a new float32 layer holds
    return layer


def _stepped(modules, x):
    """A peer network run one step at a time: each module's output over the steps."""
    outs = [[] for _ in modules]
    with torch.no_grad():
        for t in range(x.shape[0]):
            h = x[t]
            for k, module in enumerate(modules):
                h = module(h)
                outs[k].append(h)
    return [torch.stack(o) for o in outs]


@pytest.mark.filterwarnings("ignore:nirtorch.extract_nir_graph is being deprecated:DeprecationWarning")
def test_a_graph_snntorch_wrote_imports_spike_for_spike(tmp_path):
    """snntorch's export of Linear -> Leaky(reset "zero", no reset delay) -> Linear -> Leaky (per-neuron
    parameter tensors: scalars break NIR's type inference) reads back as two reset-to-zero layers
    with snntorch's float32 leaks, and their spikes are snntorch's."""
    pytest.importorskip("nirtorch")
    snn = pytest.importorskip("snntorch")
    from snntorch.export_nir import export_to_nir

    torch.manual_seed(0)
    leaky = lambda beta, theta, n: snn.Leaky(beta=torch.full((n,), beta), threshold=torch.full((n,), theta),  # noqa: E731
                                             reset_mechanism="zero", reset_delay=False, init_hidden=True)
    net = nn.Sequential(nn.Linear(6, 8), leaky(0.93, 0.5, 8), nn.Linear(8, 4, bias=False), leaky(0.8, 0.7, 4))
    nir.write(tmp_path / "snn.nir", export_to_nir(net, torch.zeros(6)))
    ours = from_nir(tmp_path / "snn.nir")
    assert [layer.beta for layer in ours] == [float(net[1].beta[0]), float(net[3].beta[0])]
    x = torch.randn(STEPS, BATCH, 6) * 0.5 + 0.3
    theirs = _stepped(net, x)
    mine = _engine(ours, x)
    assert theirs[1].sum() > 100 and theirs[3].sum() > 20
    assert np.array_equal(mine[0], theirs[1].numpy()) and np.array_equal(mine[1], theirs[3].numpy())


@pytest.mark.parametrize("decay_input", [False, True])
def test_a_graph_spikingjelly_wrote_imports_spike_for_spike(decay_input):
    """spikingjelly's export of LIFNode(v_reset=0): r = tau/dt (decay_input=False) is a unit gain,
    r = 1 (decay_input=True) a gain 1/tau folded into the weights."""
    pytest.importorskip("nirtorch")
    pytest.importorskip("loguru")
    sj = pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based.nir_exchange.to_nir import export_to_nir

    torch.manual_seed(0)
    lif = lambda tau, theta: sj.neuron.LIFNode(tau=tau, decay_input=decay_input, v_reset=0.0, v_threshold=theta)  # noqa: E731
    net = nn.Sequential(sj.layer.Linear(6, 8), lif(1 / 0.07, 0.5), sj.layer.Linear(8, 4, bias=False), lif(5.0, 0.7))
    net = net.double()
    if decay_input:  # its input current is divided by tau: stronger synapses keep both layers firing
        with torch.no_grad():
            net[0].weight.mul_(10)
            net[2].weight.mul_(8)
    ours = from_nir(export_to_nir(net, torch.zeros(1, 6, dtype=torch.float64), dt=1e-4))
    assert [layer.beta for layer in ours] == pytest.approx([0.93, 0.8], rel=1e-15)
    x = torch.randn(STEPS, BATCH, 6, dtype=torch.float64) * 0.5 + 0.3
    theirs = _stepped(net, x)
    mine = _engine(ours, x)
    assert theirs[1].sum() > 100 and theirs[3].sum() > 20
    assert np.array_equal(mine[0], theirs[1].numpy()) and np.array_equal(mine[1], theirs[3].numpy())


def test_an_imported_network_takes_training_options_and_trains():
    """from_nir's options reach the layers; the restored learnt leak and threshold get gradients."""
    model, x = _network("learnt-subtract")
    back = from_nir(to_nir(model, subtract_reset="exact"), grad="surrogate", delta=0.3, backend="torch")
    assert [layer.rule.grad for layer in back[:2]] == ["surrogate", "surrogate"] and back[0].rule.delta == 0.3
    assert [layer.backend for layer in back] == ["torch"] * 3
    back(x).amax(0).sum().backward()
    for name, parameter in back.named_parameters():
        assert parameter.grad is not None and bool(torch.isfinite(parameter.grad).all()), name
    assert float(back[1].beta_logit.grad) != 0 and float(back[1].threshold.grad.abs().sum()) > 0
