"""Export to and import from NIR, the Neuromorphic Intermediate Representation (DESIGN.md section 10).

NIR defines its neurons in continuous time; the engine steps eq. 1 (and the LIF family, section 9).
The two meet through forward Euler with step `dt`: a layer's leak is `beta = 1 - dt / tau` and its
input gain `r dt / tau`, so a layer maps to `tau = dt / (1 - beta)` and `r = 1 / (1 - beta)` (unit
gain; a readout to `r = 1`, its `(1 - beta)` factor). Recurrent edges and the reset feedback of the
exact subtractive form read the previous step ("the stepped reading of cycles").

The default `dt` is DEFAULT_DT = 1e-4 s. The graph's parameters are right only for a reader that
discretises with the same dt, and the most used reader (snntorch's `import_from_nir`) hard-codes
1e-4, as does spikingjelly's default: at 1e-4 they rebuild the layers' leak and unit gain, while
at 1 ms (our presets' step) snntorch would read beta = 1 - 0.1 (1 - beta) and rescale the
threshold. The cost is a time axis 10x faster than the data's 1-2 ms bins: pass `dt` (e.g. 1e-3)
for a simulator or chip that runs in physical time. `dt` goes into the graph's metadata, and
`from_nir` reads it back from there.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from torch import nn

from .._checks import choice, positive_float
from ..layers import THRESHOLD_FLOOR, LeakyReadout, SparseLIFLinear

#: seconds per step of the exported graphs (module docstring: why 1e-4)
DEFAULT_DT = 1e-4
#: how to_nir writes a layer with reset="subtract", which NIR's LIF cannot express
SUBTRACT_RESETS = ("error", "exact", "as_zero")
#: what the graph's metadata says about its discretisation
DISCRETISATION = ("forward Euler with step dt: beta = 1 - dt/tau, input gain r*dt/tau; an edge that closes a cycle "
                  "(recurrent weights, the reset feedback) carries the previous step's output")
#: relative agreement of tau and r with the beta carried in a node's metadata (or of r*dt/tau with 1)
#: within which the carried beta and a unit gain are taken exactly
SNAP = 1e-6
#: SparseLIFLinear options from_nir passes on to every hidden layer (backend also to the readout)
LAYER_OPTIONS = ("grad", "dist", "delta", "m", "bth", "path", "scheduler", "generator", "backend")


def _nir():
    """The nir package, or an ImportError telling how to install it."""
    try:
        import nir
    except ImportError as err:
        raise ImportError('NIR export and import need the nir package: pip install nir '
                          '(or pip install "ztriton[interop]")') from err
    return nir


def _layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers in order: an nn.Sequential (nested Sequentials / ModuleLists flattened), or
    the training application's network (its `hidden` layers and `readout`)."""
    def flat(modules):
        for module in modules:
            if isinstance(module, (nn.Sequential, nn.ModuleList)):
                yield from flat(module)
            else:
                yield module

    if isinstance(model, nn.Sequential):
        layers = list(flat(model))
    elif isinstance(getattr(model, "hidden", None), nn.ModuleList) and isinstance(getattr(model, "readout", None),
                                                                                   LeakyReadout):
        layers = list(model.hidden) + [model.readout]
    else:
        raise TypeError(f"model must be an nn.Sequential of SparseLIFLinear layers (and a final LeakyReadout) or the "
                        f"training application's SNN, got {type(model).__name__}")
    if not layers:
        raise ValueError("model has no layers to export")
    for i, layer in enumerate(layers):
        if not isinstance(layer, (SparseLIFLinear, LeakyReadout)):
            raise TypeError(f"layer {i} is a {type(layer).__name__}; to_nir exports SparseLIFLinear and LeakyReadout")
        if isinstance(layer, LeakyReadout) and i != len(layers) - 1:
            raise ValueError(f"layer {i} is a LeakyReadout before the last layer: its output is a membrane trace, "
                             f"not spikes, and only the network's output may be one")
        if i and layer.in_features != layers[i - 1].out_features:
            raise ValueError(f"layer {i} takes {layer.in_features} inputs but layer {i - 1} gives "
                             f"{layers[i - 1].out_features}")
    return layers


def _array(tensor: torch.Tensor) -> np.ndarray:
    """A parameter's values as a numpy array of its own dtype (float32 for half precisions: exact)."""
    tensor = tensor.detach().cpu()
    if tensor.dtype not in (torch.float32, torch.float64):
        tensor = tensor.float()
    return tensor.numpy().copy()


def _leak_metadata(layer) -> dict:
    """What the node carries beyond NIR: the engine's beta (and its logit when learnt, with its dtype)."""
    meta = {"layer": type(layer).__name__, "beta": layer.beta, "learn_beta": int(layer.learn_beta)}
    if layer.learn_beta:
        meta["beta_logit"] = float(layer.beta_logit.detach())
        meta["beta_logit_dtype"] = str(layer.beta_logit.dtype).removeprefix("torch.")
    return meta


def _hidden_nodes(nir, layer: SparseLIFLinear, i: int, dt: float, subtract_reset: str) -> tuple[dict, list, str, str]:
    """(nodes, internal edges, the node the layer's current enters, the node its spikes leave) of a hidden layer."""
    n, beta = layer.out_features, layer.beta
    theta = _array(layer.threshold.detach().clamp(min=THRESHOLD_FLOOR))  # what the forward uses
    meta = {"ztriton": {**_leak_metadata(layer), "reset": layer.reset, "learn_threshold": int(layer.learn_threshold)}}
    tau = np.full(n, dt / (1.0 - beta)) if beta < 1.0 else None
    r = np.full(n, 1.0 / (1.0 - beta) if beta < 1.0 else 1.0 / dt)
    zero = np.zeros(n)
    nodes, edges = {}, []
    if layer.reset == "subtract" and subtract_reset == "exact":
        # v[t] = beta v[t-1] + I[t] - theta s[t-1], s[t] = H(v[t] - theta): an integrator, a Threshold and
        # the spikes fed back through -theta into the integrator's input (read the next step)
        entry, spikes, reset = f"li_{i}", f"threshold_{i}", f"reset_{i}"
        nodes[entry] = (nir.LI(tau=tau, r=r, v_leak=zero, metadata=meta) if tau is not None
                        else nir.I(r=r, metadata=meta))
        nodes[spikes] = nir.Threshold(threshold=theta)
        nodes[reset] = nir.Linear(weight=np.diag(-theta))
        edges += [(entry, spikes), (spikes, reset), (reset, entry)]
    else:
        entry = spikes = f"lif_{i}"
        if layer.reset == "subtract":
            meta["ztriton"]["reset"] = "subtract written as zero"
        nodes[entry] = (nir.LIF(tau=tau, r=r, v_leak=zero, v_threshold=theta, v_reset=zero.copy(), metadata=meta)
                        if tau is not None else nir.IF(r=r, v_threshold=theta, v_reset=zero.copy(), metadata=meta))
    if layer.recurrent:
        nodes[f"recurrent_{i}"] = nir.Linear(weight=_array(layer.recurrent_weight))
        edges += [(spikes, f"recurrent_{i}"), (f"recurrent_{i}", entry)]
    return nodes, edges, entry, spikes


def _synapse(nir, layer):
    if layer.bias is None:
        return nir.Linear(weight=_array(layer.weight))
    return nir.Affine(weight=_array(layer.weight), bias=_array(layer.bias))


def to_nir(model: nn.Module, dt: float = DEFAULT_DT, subtract_reset: str = "error"):
    """The model as one flat `nir.NIRGraph`: Input -> Linear/Affine -> LIF -> ... [-> Linear/Affine -> LI] -> Output.

    `model`: an nn.Sequential of SparseLIFLinear layers, optionally ending in a LeakyReadout, or the
    training application's SNN (its max / sum of the readout over time stays outside the graph; the
    graph's metadata names it). Every layer exports its current values (learnt leaks and thresholds
    included; the threshold floored as the forward uses it), as arrays of the layer's shape.

    - SparseLIFLinear, reset "zero": LIF(tau = dt/(1-beta), r = 1/(1-beta), v_leak = 0,
      v_threshold = theta, v_reset = 0) (IF with r = 1/dt where beta = 1), exactly the layer under
      forward Euler; recurrent: a Linear edge from the LIF back into it.
    - reset "subtract" (eq. 1), which NIR's LIF cannot express, by `subtract_reset`: "error" (the
      default) refuses; "exact" writes LI(r = 1/(1-beta)) -> Threshold(theta) -> Linear(-theta I)
      back into the LI, eq. 1 exactly under the stepped reading of cycles; "as_zero" writes LIF
      nodes (a different network: see the warning).
    - LeakyReadout: Linear/Affine -> LI(tau = dt/(1-beta), r = 1, v_leak = 0).

    `dt` (seconds per step, default DEFAULT_DT = 1e-4: the module docstring says why) and the
    discretisation go into the graph's metadata; each neuron node carries the engine's beta (and
    its logit when learnt), with which `from_nir` rebuilds the layer exactly.
    """
    nir = _nir()
    dt = positive_float("dt", dt)
    subtract_reset = choice("subtract_reset", subtract_reset, SUBTRACT_RESETS)
    layers = _layers(model)
    subtractive = [i for i, layer in enumerate(layers)
                   if isinstance(layer, SparseLIFLinear) and layer.reset == "subtract"]
    if subtractive and subtract_reset == "error":
        raise ValueError(
            f"layer {subtractive[0]} has reset='subtract' (eq. 1), which NIR's LIF cannot express (it resets to "
            f"v_reset); pass subtract_reset='exact' (an LI -> Threshold pair with a -threshold feedback edge, exact "
            f"under the stepped reading of cycles) or subtract_reset='as_zero' (LIF nodes that reset to zero: "
            f"another network), or train with reset='zero'")
    if subtractive and subtract_reset == "as_zero":
        warnings.warn(
            f"layers {subtractive} subtract the threshold at a spike (reset='subtract'), but subtract_reset='as_zero' "
            f"writes NIR LIF nodes that reset to 0: after a spike the graph's membrane restarts from 0 where the "
            f"layer's keeps u - threshold, so the graph's spikes differ from the model's wherever a neuron fires "
            f"above threshold and keeps integrating (use subtract_reset='exact' for the same network)", UserWarning,
            stacklevel=2)
    for i, layer in enumerate(layers):
        if isinstance(layer, LeakyReadout) and layer.beta == 1.0:
            raise ValueError(f"layer {i} is a LeakyReadout with beta=1, whose output is 0 at every step "
                             f"((1 - beta) W s); NIR's LI cannot hold tau = inf")
    nodes = {"input": nir.Input(input_type={"input": np.array([layers[0].in_features])})}
    edges, previous = [], "input"
    for i, layer in enumerate(layers):  # node names carry the layer's index in the model
        nodes[f"linear_{i}"] = _synapse(nir, layer)
        if isinstance(layer, SparseLIFLinear):
            layer_nodes, layer_edges, entry, previous_next = _hidden_nodes(nir, layer, i, dt, subtract_reset)
        else:
            n, beta = layer.out_features, layer.beta
            entry = previous_next = "readout"
            layer_nodes = {entry: nir.LI(tau=np.full(n, dt / (1.0 - beta)), r=np.ones(n), v_leak=np.zeros(n),
                                         metadata={"ztriton": _leak_metadata(layer)})}
            layer_edges = []
        nodes.update(layer_nodes)
        edges += [(previous, f"linear_{i}"), (f"linear_{i}", entry)] + layer_edges
        previous = previous_next
    nodes["output"] = nir.Output(output_type={"output": np.array([layers[-1].out_features])})
    edges.append((previous, "output"))
    metadata = {"source": "ztriton", "dt": dt, "discretisation": DISCRETISATION, "subtract_reset": subtract_reset}
    if isinstance(getattr(model, "reduce", None), str):
        metadata["readout_over_time"] = f"{model.reduce} of the output over time gives the logits (not in the graph)"
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=metadata)


# --- import ---------------------------------------------------------------------------------------


def _refuse(name: str, node, why: str):
    raise ValueError(f"cannot import NIR node {name!r} ({type(node).__name__}): {why}")


def _flatten(nir, graph, prefix: str = "") -> tuple[dict, list]:
    """(nodes, edges) with every nested NIRGraph of one Input and one Output replaced by its contents
    (names joined with '.'), an edge into it going to its Input's successors and an edge out of it
    leaving from its Output's predecessors."""
    nodes, edges, inner = {}, [], {}
    for name, node in graph.nodes.items():
        if isinstance(node, nir.NIRGraph):
            sub_nodes, sub_edges = _flatten(nir, node, f"{prefix}{name}.")
            ins = [k for k, v in sub_nodes.items() if isinstance(v, nir.Input)]
            outs = [k for k, v in sub_nodes.items() if isinstance(v, nir.Output)]
            if len(ins) != 1 or len(outs) != 1:
                _refuse(prefix + name, node, f"a nested graph with {len(ins)} inputs and {len(outs)} outputs cannot be "
                                             f"flattened into a chain (one of each needed)")
            starts = [b for a, b in sub_edges if a == ins[0]]
            ends = [a for a, b in sub_edges if b == outs[0]]
            if outs[0] in starts:
                _refuse(prefix + name, node, "a nested graph whose Input feeds its Output directly cannot be flattened")
            inner[prefix + name] = (starts, ends)
            nodes.update({k: v for k, v in sub_nodes.items() if k not in (ins[0], outs[0])})
            edges += [(a, b) for a, b in sub_edges if a != ins[0] and b != outs[0]]
        else:
            nodes[prefix + name] = node
    for a, b in graph.edges:
        sources = inner[prefix + a][1] if prefix + a in inner else [prefix + a]
        targets = inner[prefix + b][0] if prefix + b in inner else [prefix + b]
        edges += [(s, t) for s in sources for t in targets]
    return nodes, edges


def _uniform(name: str, node, field: str) -> float:
    values = np.asarray(getattr(node, field), dtype=np.float64).reshape(-1)
    if values.size == 0 or not bool((values == values[0]).all()):
        _refuse(name, node, f"its {field} differs between neurons ({np.unique(values).size} values): a ztriton layer "
                            f"holds one leak per layer")
    return float(values[0])


def _vector(node, field: str, n: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(getattr(node, field), dtype=np.float64).reshape(-1), (n,)).copy()


def _leak_and_gain(nir, name: str, node, n: int, dt: float) -> tuple[float, np.ndarray, dict]:
    """(beta, per-neuron input gain, the node's ztriton metadata) of a LIF / IF / LI / I node. The beta
    the node carries is taken where tau agrees with it (within SNAP), and a gain within SNAP of 1 is 1."""
    meta = dict(node.metadata.get("ztriton", {})) if isinstance(node.metadata, dict) else {}
    r = _vector(node, "r", n)
    if not np.isfinite(r).all() or (r == 0).any():
        _refuse(name, node, "r must be finite and non-zero for every neuron")
    if isinstance(node, (nir.IF, nir.I)):
        beta, gain = 1.0, r * dt
    else:
        tau = _uniform(name, node, "tau")
        if math.isnan(tau) or tau <= dt:
            _refuse(name, node, f"tau = {tau:g} s at dt = {dt:g} s gives beta = 1 - dt/tau <= 0 (tau must exceed dt)")
        beta = 1.0 - dt / tau
        if np.asarray(node.tau).dtype == np.float32:
            beta = float(np.float32(beta))  # the leak a float32 tau was written from
        gain = r * dt / tau
        carried = meta.get("beta")
        if carried is not None and abs((1.0 - float(carried)) - dt / tau) <= SNAP * (1.0 - float(carried)):
            beta = float(carried)
    return beta, _unit_snapped(gain), meta


def _unit_snapped(gain: np.ndarray) -> np.ndarray:
    """The gain with every value within SNAP of 1 taken as exactly 1."""
    return np.where(np.abs(gain - 1.0) <= SNAP, 1.0, gain)


def _leak_folded(bias: np.ndarray | None, v_leak: np.ndarray, r: np.ndarray) -> np.ndarray | None:
    """The synapse's bias with the neuron's v_leak folded in: tau v' = (v_leak - v) + r I = -v + r (I + v_leak / r)."""
    if not (v_leak != 0).any():
        return bias
    return (np.zeros(v_leak.size) if bias is None else bias.astype(np.float64)) + v_leak / r


def _synapse_arrays(name: str, node, nir) -> tuple[np.ndarray, np.ndarray | None]:
    if not isinstance(node, (nir.Linear, nir.Affine)) or np.asarray(node.weight).ndim != 2:
        _refuse(name, node, "a layer's input must be a Linear or Affine node with an (out, in) weight")
    return np.asarray(node.weight), (np.asarray(node.bias) if isinstance(node, nir.Affine) else None)


class _Chain:
    """The graph's nodes and edges, walked from its Input to its Output one layer at a time."""

    def __init__(self, nir, graph):
        self.nir = nir
        self.nodes, edges = _flatten(nir, graph)
        self.succ = {k: [] for k in self.nodes}
        self.pred = {k: [] for k in self.nodes}
        for a, b in edges:
            self.succ[a].append(b)
            self.pred[b].append(a)
        for name, node in self.nodes.items():
            if isinstance(node, (nir.CubaLIF, nir.CubaLI)):
                _refuse(name, node, "a current-based synapse (tau_syn) has no ztriton layer")
            if isinstance(node, nir.Delay):
                _refuse(name, node, "ztriton layers have no axonal delay")

    def only(self, names: list[str], of: str, what: str) -> str:
        if len(names) != 1:
            _refuse(of, self.nodes[of], f"it has {len(names)} {what} where a chain of layers has one")
        return names[0]


def _feedback(chain: _Chain, source: str, target: str) -> list[str]:
    """The Linear / Affine nodes that take `source`'s output only and feed only `target` (a cycle's edge)."""
    return [k for k in chain.succ[source] if isinstance(chain.nodes[k], (chain.nir.Linear, chain.nir.Affine))
            and chain.pred[k] == [source] and chain.succ[k] == [target]]


def _hidden_layer(chain: _Chain, synapse: str, neuron: str, dt: float) -> tuple[dict, str]:
    """(the arrays and options of one hidden layer, the node its spikes leave) from its synapse and neuron nodes."""
    nir, node = chain.nir, chain.nodes[neuron]
    weight, bias = _synapse_arrays(synapse, chain.nodes[synapse], nir)
    n = weight.shape[0]
    beta, gain, meta = _leak_and_gain(nir, neuron, node, n, dt)
    v_leak = _vector(node, "v_leak", n) if hasattr(node, "v_leak") else np.zeros(n)
    if isinstance(node, (nir.LIF, nir.IF)):
        reset, spikes = "zero", neuron
        theta = np.asarray(node.v_threshold)
        if not bool((np.asarray(node.v_reset) == 0).all()):
            _refuse(neuron, node, "v_reset != 0: ztriton's reset='zero' resets to 0, and a shifted membrane would "
                                  "start away from its rest")
        loops = _feedback(chain, neuron, neuron)
    else:  # an integrator whose spikes come from a Threshold node: the subtractive reset when fed back -theta
        spikes = [k for k in chain.succ[neuron] if isinstance(chain.nodes[k], nir.Threshold)]
        if len(spikes) != 1 or chain.pred[spikes[0]] != [neuron] or len(chain.succ[neuron]) != 1:
            _refuse(neuron, node, "an LI / I node inside the network must feed exactly one Threshold node")
        spikes, reset = spikes[0], "subtract"
        theta = np.asarray(chain.nodes[spikes].threshold)
        loops = _feedback(chain, spikes, neuron)
        theta64 = np.broadcast_to(theta.astype(np.float64).reshape(-1), (n,))
        resets = [k for k in loops if _is_reset(chain.nodes[k], theta64, gain, nir)]
        if not resets:
            _refuse(neuron, node, f"its Threshold {spikes!r} has no Linear of -diag(threshold) back into it: without "
                                  f"that reset ztriton has no layer for it")
        loops.remove(resets[0])
    theta = np.broadcast_to(theta.reshape(-1), (n,)).copy()
    if not (np.isfinite(theta).all() and (theta > 0).all()):
        _refuse(neuron, node, "the threshold must be finite and > 0 for every neuron")
    if len(loops) > 1:
        _refuse(neuron, node, f"{len(loops)} recurrent Linear nodes feed it back; ztriton's layer holds one")
    extra_in = [k for k in chain.pred[neuron] if k != synapse and k not in _feedback(chain, spikes, neuron)]
    if extra_in:
        _refuse(neuron, node, f"it takes input from {extra_in} besides its synapse {synapse!r} and its recurrence")
    recurrent = None
    if loops:
        recurrent, recurrent_bias = _synapse_arrays(loops[0], chain.nodes[loops[0]], nir)
        if recurrent.shape != (n, n):
            _refuse(loops[0], chain.nodes[loops[0]], f"a recurrent weight must be ({n}, {n}), got {recurrent.shape}")
        if recurrent_bias is not None:
            bias = recurrent_bias if bias is None else bias.astype(np.float64) + recurrent_bias
    bias = _leak_folded(bias, v_leak, _vector(node, "r", n))
    weight, bias, recurrent = _scaled(gain, weight, bias, recurrent)
    return dict(kind="hidden", weight=weight, bias=bias, recurrent=recurrent, beta=beta, theta=theta, reset=reset,
                meta=meta), spikes


def _is_reset(node, theta: np.ndarray, gain: np.ndarray, nir) -> bool:
    """Whether a feedback node is the subtractive reset: a Linear of -diag(threshold) (times the gain)."""
    weight = np.asarray(getattr(node, "weight", np.zeros(0)))
    if not isinstance(node, nir.Linear) or weight.shape != (theta.size, theta.size):
        return False
    if np.count_nonzero(weight - np.diag(np.diag(weight))):
        return False
    effective = -np.diag(weight).astype(np.float64) * gain
    return bool(np.all(np.abs(effective - theta) <= SNAP * theta))


def _scaled(gain: np.ndarray, *arrays):
    """The arrays with the input gain folded into their rows (untouched, dtype kept, where the gain is 1)."""
    if (gain == 1.0).all():
        return arrays
    return tuple(None if a is None else a.astype(np.float64) * (gain[:, None] if a.ndim == 2 else gain) for a in arrays)


def _readout_layer(chain: _Chain, synapse: str, neuron: str, dt: float) -> dict:
    """The arrays of a LeakyReadout, o[t] = beta o[t-1] + (1 - beta) c[t], from an LI node: its
    v += (dt/tau)(v_leak - v + r c) has (1 - beta) = dt/tau, so r (snapped to 1 within SNAP) and
    v_leak / r (a bias) are folded into the synapse."""
    nir, node = chain.nir, chain.nodes[neuron]
    weight, bias = _synapse_arrays(synapse, chain.nodes[synapse], nir)
    n = weight.shape[0]
    beta, _, meta = _leak_and_gain(nir, neuron, node, n, dt)
    r = _vector(node, "r", n)
    bias = _leak_folded(bias, _vector(node, "v_leak", n), r)
    weight, bias = _scaled(_unit_snapped(r), weight, bias)
    return dict(kind="readout", weight=weight, bias=bias, beta=beta, meta=meta)


def _read_chain(chain: _Chain, dt: float) -> list[dict]:
    nir = chain.nir
    inputs = [k for k, v in chain.nodes.items() if isinstance(v, nir.Input)]
    outputs = [k for k, v in chain.nodes.items() if isinstance(v, nir.Output)]
    if len(inputs) != 1 or len(outputs) != 1:
        raise ValueError(f"from_nir reads a graph with one Input and one Output, got {len(inputs)} and {len(outputs)}")
    layers, previous, seen = [], inputs[0], set()
    while True:
        following = chain.only(chain.succ[previous], previous, "successors")
        if following == outputs[0]:
            break
        synapse = following
        if not isinstance(chain.nodes[synapse], (nir.Linear, nir.Affine)):
            _refuse(synapse, chain.nodes[synapse], f"from_nir expects a Linear or Affine node (a layer's synapses) "
                                                   f"after {previous!r}")
        if synapse in seen or chain.pred[synapse] != [previous]:
            _refuse(synapse, chain.nodes[synapse], f"a layer's synapse must take only {previous!r}'s output")
        seen.add(synapse)
        neuron = chain.only(chain.succ[synapse], synapse, "successors")
        node = chain.nodes[neuron]
        if not isinstance(node, (nir.LIF, nir.IF, nir.LI, nir.I)):
            _refuse(neuron, node, "no ztriton layer computes it (from_nir maps LIF, IF, LI and I with a Threshold, and "
                                  "an LI readout)")
        if isinstance(node, nir.LI) and chain.succ[neuron] == [outputs[0]]:
            layers.append(_readout_layer(chain, synapse, neuron, dt))
            break
        layer, spikes = _hidden_layer(chain, synapse, neuron, dt)
        layers.append(layer)
        consumers = [k for k in chain.succ[spikes] if k not in _feedback(chain, spikes, neuron)]
        previous = spikes
        chain.succ[spikes] = consumers
    if not layers:
        raise ValueError("the graph has no layer between its Input and its Output")
    return layers


def _tensor(array: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array).copy())
    return tensor if dtype is None else tensor.to(dtype)


def _build(spec: dict, n_in: int, dtype: torch.dtype, options: dict) -> nn.Module:
    meta = spec["meta"]
    logit = meta.get("beta_logit")
    learn_beta = bool(int(meta.get("learn_beta", 0))) and spec["beta"] < 1.0
    carried = logit is not None and spec["beta"] == float(meta.get("beta", -1.0))
    with torch.random.fork_rng(devices=[]):  # the layers' random init is overwritten below
        if spec["kind"] == "readout":
            layer = LeakyReadout(n_in, spec["weight"].shape[0], beta=spec["beta"], bias=spec["bias"] is not None,
                                 learn_beta=learn_beta, **{k: v for k, v in options.items() if k == "backend"})
        else:
            learn_threshold = bool(int(meta.get("learn_threshold", 0)))
            layer = SparseLIFLinear(n_in, spec["weight"].shape[0], beta=spec["beta"], threshold=_tensor(spec["theta"]),
                                    recurrent=spec["recurrent"] is not None, reset=spec["reset"], learn_beta=learn_beta,
                                    learn_threshold=learn_threshold, bias=spec["bias"] is not None, **options)
    layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(_tensor(spec["weight"]))
        if spec["bias"] is not None:
            layer.bias.copy_(_tensor(spec["bias"]))
        if spec.get("recurrent") is not None:
            layer.recurrent_weight.copy_(_tensor(spec["recurrent"]))
    if learn_beta and carried:  # the exported logit in its dtype: its sigmoid is the exported beta bit for bit
        dtype_name = str(meta.get("beta_logit_dtype", "float64"))
        layer.beta_logit = nn.Parameter(torch.tensor(float(logit), dtype=getattr(torch, dtype_name)))
    if spec["kind"] == "hidden":  # the exported values in their own dtype (float64 for a buffer, as a new layer's)
        theta = _tensor(spec["theta"])
        if layer.learn_threshold:
            layer.threshold = nn.Parameter(theta)
        else:
            layer.threshold = theta.to(torch.float64)
    return layer


def from_nir(graph_or_path, *, dt: float | None = None, dtype: torch.dtype | None = None, **options) -> nn.Sequential:
    """The ztriton network (nn.Sequential of SparseLIFLinear layers, optionally a final LeakyReadout)
    of a NIR graph: a `nir.NIRGraph` or the path of a file `nir.write` wrote.

    Reads a chain Input -> Linear/Affine -> neurons -> ... -> Output: LIF (v_reset = 0) and IF as
    reset="zero" layers, an LI / I node feeding a Threshold whose spikes return through a Linear of
    -diag(threshold) (to_nir's exact subtractive form) as reset="subtract" layers, a Linear edge
    from a layer's spikes back into it as its recurrent weight, and an LI before the Output as a
    LeakyReadout; nested graphs with one input and one output (snntorch's recurrent layers) are
    flattened. v_leak becomes a bias, an input gain r dt/tau other than 1 is folded into the
    layer's weights. Refused, naming the node: CubaLIF / CubaLI, Delay, any other node type,
    v_reset != 0, a tau that differs between neurons, tau <= dt, branches.

    `dt`: the step the graph is read with (default: the graph's metadata, else DEFAULT_DT = 1e-4,
    snntorch's). A node's carried beta (graphs of `to_nir`) is taken where tau agrees with it, and
    a learnt leak gets its exported logit back, so a graph of `to_nir` imports bit for bit.
    `dtype`: of the weights (default: the first weight array's, float32 or float64). `options`:
    SparseLIFLinear's training options for every hidden layer (LAYER_OPTIONS; `backend` also for
    the readout).
    """
    nir = _nir()
    if isinstance(graph_or_path, (str, os.PathLike)):
        graph_or_path = nir.read(graph_or_path)
    if not isinstance(graph_or_path, nir.NIRGraph):
        raise TypeError(f"graph_or_path must be a nir.NIRGraph or a file path, got {type(graph_or_path).__name__}")
    unknown = sorted(set(options) - set(LAYER_OPTIONS))
    if unknown:
        raise TypeError(f"from_nir got unknown options {unknown}; it passes on {list(LAYER_OPTIONS)}")
    metadata = graph_or_path.metadata if isinstance(graph_or_path.metadata, dict) else {}
    if dt is None:
        dt = metadata.get("dt", DEFAULT_DT)
    dt = positive_float("dt", dt.item() if isinstance(dt, np.generic) else dt)
    specs = _read_chain(_Chain(nir, graph_or_path), dt)
    if dtype is None:
        first = np.asarray(specs[0]["weight"]).dtype
        dtype = torch.float64 if first == np.float64 else torch.float32
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    layers, n_in = [], specs[0]["weight"].shape[1]
    for spec in specs:
        if spec["weight"].shape[1] != n_in:
            raise ValueError(f"a layer takes {spec['weight'].shape[1]} inputs after a layer of {n_in} outputs")
        layers.append(_build(spec, n_in, dtype, options))
        n_in = spec["weight"].shape[0]
    return nn.Sequential(*layers)


__all__ = ["DEFAULT_DT", "SUBTRACT_RESETS", "from_nir", "to_nir"]
