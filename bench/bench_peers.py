"""One training step of a 700-200-200 LIF network: ztriton against snntorch, spikingjelly and the autograd BPTT.

Every framework gets the SAME weights and the same Bernoulli input (rate --input-rate), the same
neuron (eq. 1: u = beta u + W x - u_th s[t-1], soft reset, threshold 1) and the same loss
(a fixed random projection of the last layer's spike counts); forward + backward are timed after
a warm-up, medians of --repeats, in one process. The peers use their surrogate gradient on every
entry, the package's autograd BPTT (`ztriton.bptt`, not a peer: the "x best peer" column leaves
it out) the dense normal surrogate at delta 0.05; ztriton uses LocalZO (normal, delta 0.05, m 1)
with its default backend ("auto": native on CPU, Triton on CUDA), once with the input as events
(a sparse COO tensor, as its data sets deliver it) and once dense. Each framework forms the input
current of a layer with one GEMM over all steps and unbinds it once for its time loop (indexing
it per step would make the backward quadratic in T). A peer that is not installed is skipped with
a message. The spike rate of the last layer and the share of its spikes equal to ztriton's (one
warm-up forward each) show that the dynamics agree: exactly for snntorch and the BPTT (up to
rounding), not for spikingjelly, whose LIFNode resets right after the spike, so the next step
subtracts beta u_th rather than u_th (it fires a little more).

With --recurrent every hidden layer adds V s[t-1] (all-to-all, V (out, out) the same for every
framework, drawn U(-1/sqrt(out), 1/sqrt(out)) times --recurrent-gain): ztriton's
`SparseLIFLinear(recurrent=True)`, snntorch's `RLeaky(all_to_all=True, linear_features=out)` (its
recurrent nn.Linear's bias zeroed and frozen), spikingjelly's `LinearRecurrentContainer` around a
single-step `LIFNode` (it has no fused recurrent layer: its container applies one nn.Linear to
[I[t], s[t-1]] with the weight [identity, V], so its recurrent GEMM is twice as wide and the
identity block gets a gradient too).

    python bench/bench_peers.py                       # T 300, B 128 (about 1 minute on 2 cores)
    python bench/bench_peers.py --recurrent           # 700-200r-200r
    python bench/bench_peers.py --recurrent --hidden 1024 --layers 1   # 700-1024r
    python bench/bench_peers.py --device cuda         # on a GPU (ztriton's Triton backend)
    pip install -e ".[bench]" && pip install --no-deps spikingjelly   # the peers (spikingjelly's
    # declared dependencies pull a torchvision that needs a newer torch; its neurons need loguru,
    # which the bench extra brings)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import statistics
import time

import torch
from torch import nn

from ztriton import SparseLIFLinear
from ztriton.bptt import BPTTLIF, Surrogate


def make_weights(args):
    """[(W, V or None)] per hidden layer, from one generator: W ~ U(+-1/sqrt(in)) * gain, with --recurrent
    V ~ U(+-1/sqrt(out)) * recurrent_gain."""
    gen = torch.Generator().manual_seed(args.seed)
    sizes = [args.inputs] + [args.hidden] * args.layers
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        w = torch.empty(b, a).uniform_(-1 / math.sqrt(a), 1 / math.sqrt(a), generator=gen) * args.gain
        v = None
        if args.recurrent:
            v = torch.empty(b, b).uniform_(-1 / math.sqrt(b), 1 / math.sqrt(b), generator=gen) * args.recurrent_gain
        layers.append((w, v))
    return layers


def _copy(layer, w, v):
    """layer with weight w (and recurrent_weight v); returns layer."""
    with torch.no_grad():
        layer.weight.copy_(w)
        if v is not None:
            layer.recurrent_weight.copy_(v)
    return layer


def ztriton_net(layers, beta, delta=0.05):
    modules = [_copy(SparseLIFLinear(w.shape[1], w.shape[0], beta=beta, recurrent=v is not None, grad="localzo",
                                     delta=delta).to(w.device), w, v) for w, v in layers]
    return nn.Sequential(*modules), modules


def bptt_net(layers, beta, delta=0.05):
    surrogate = Surrogate.dense("normal", delta)
    return nn.Sequential(*[_copy(BPTTLIF(w.shape[1], w.shape[0], beta=beta, recurrent=v is not None,
                                         surrogate=surrogate, device=w.device), w, v) for w, v in layers])


def _linear(w):
    linear = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.device)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def snntorch_net(layers, beta):
    import snntorch as snn

    linears = [_linear(w) for w, _ in layers]
    neurons = []
    for w, v in layers:
        if v is None:
            neurons.append(snn.Leaky(beta=beta, threshold=1.0, reset_mechanism="subtract"))
            continue
        neuron = snn.RLeaky(beta=beta, threshold=1.0, reset_mechanism="subtract", all_to_all=True,
                            linear_features=w.shape[0]).to(w.device)
        with torch.no_grad():  # V s[t-1] through its nn.Linear: weight V, bias zeroed and frozen
            neuron.recurrent.weight.copy_(v)
            neuron.recurrent.bias.zero_()
        neuron.recurrent.bias.requires_grad_(False)
        neurons.append(neuron)
    params = nn.ModuleList(linears + neurons)

    def forward(x):
        h = x
        for linear, neuron in zip(linears, neurons):  # layer by layer: one GEMM, then the time loop
            out = []
            if isinstance(neuron, snn.RLeaky):
                spk, mem = neuron.init_rleaky()
                for current in linear(h).unbind(0):
                    spk, mem = neuron(current, spk, mem)
                    out.append(spk)
            else:
                mem = neuron.init_leaky()
                for current in linear(h).unbind(0):
                    spk, mem = neuron(current, mem)
                    out.append(spk)
            h = torch.stack(out)
        return h

    return forward, params


def spikingjelly_net(layers, beta):
    from spikingjelly.activation_based import functional, layer, neuron

    def lif(step_mode):
        # decay_input=False, v_reset=None: v = (1 - 1/tau) v + x, soft reset; 1 - 1/tau = beta
        return neuron.LIFNode(tau=1.0 / (1.0 - beta), decay_input=False, v_threshold=1.0, v_reset=None,
                              detach_reset=True, step_mode=step_mode)

    if layers[0][1] is None:
        net = nn.Sequential(*[m for w, _ in layers for m in (_linear(w), lif("m"))]).to(layers[0][0].device)

        def forward(x):
            functional.reset_net(net)
            return net(x)

        return forward, net

    linears, containers = [], []
    for w, v in layers:
        n = w.shape[0]
        container = layer.LinearRecurrentContainer(lif("s"), in_features=n, out_features=n, bias=False, step_mode="s")
        with torch.no_grad():  # its nn.Linear over [I[t], s[t-1]]: weight [identity, V], so it passes I[t] + V s[t-1]
            container.rc.weight.copy_(torch.cat([torch.eye(n), v.cpu()], dim=1))
        linears.append(_linear(w))
        containers.append(container.to(w.device))
    net = nn.ModuleList(linears + containers)

    def forward(x):
        functional.reset_net(net)
        h = x
        for linear, container in zip(linears, containers):  # one GEMM, then the single-step container per step
            h = torch.stack([container(current) for current in linear(h).unbind(0)])
        return h

    return forward, net


def timed_step(forward, params, x, projection):
    """Forward + backward on a fresh copy of x (nothing cached on the input from an earlier step);
    returns (forward s, backward s, the last layer's spikes)."""
    x = x.clone()
    for p in params:
        p.grad = None
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    out = forward(x)
    loss = (out.sum(0) * projection).sum()
    sync()
    middle = time.perf_counter()
    loss.backward()
    sync()
    return middle - start, time.perf_counter() - middle, out.detach()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--inputs", type=int, default=700)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--input-rate", type=float, default=0.02)
    parser.add_argument("--gain", type=float, default=4.0, help="scale of the weights (sets the firing rate)")
    parser.add_argument("--recurrent", action="store_true", help="recurrent hidden layers (all-to-all V s[t-1])")
    parser.add_argument("--recurrent-gain", type=float, default=1.0, help="scale of the recurrent weights")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (ztriton then uses its Triton backend)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    beta = math.exp(-0.2)
    weights = [(w.to(args.device), None if v is None else v.to(args.device)) for w, v in make_weights(args)]
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = (torch.rand(args.steps, args.batch, args.inputs, generator=gen) < args.input_rate).float().to(args.device)
    projection = torch.randn(args.batch, args.hidden, generator=gen).to(args.device)
    events = x.to_sparse()

    runs = {}
    net, layers = ztriton_net(weights, beta)
    runs["ztriton (events)"] = (net, list(net.parameters()), events)
    runs["ztriton (dense input)"] = (net, list(net.parameters()), x)
    bptt = bptt_net(weights, beta)
    runs["autograd BPTT"] = (bptt, list(bptt.parameters()), x)
    peers = []
    for name, builder in (("snntorch", snntorch_net), ("spikingjelly", spikingjelly_net)):
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed, skipped (see the docstring for how to install it)")
            continue
        forward, params = builder(weights, beta)
        runs[name] = (forward, list(params.parameters()), x)
        peers.append(name)

    times = {name: [] for name in runs}
    spikes = {}
    for name, (forward, params, inputs) in runs.items():  # warm-up
        spikes[name] = timed_step(forward, params, inputs, projection)[2]
    for _ in range(args.repeats):  # interleaved: drifts in machine speed hit every framework alike
        for name, (forward, params, inputs) in runs.items():
            times[name].append(timed_step(forward, params, inputs, projection)[:2])

    sizes = "-".join([f"{args.hidden}{'r' if args.recurrent else ''}"] * args.layers)
    print(f"T={args.steps} B={args.batch} {args.inputs}-{sizes} LIF"
          f"{f' (recurrent gain {args.recurrent_gain:g})' if args.recurrent else ''}, "
          f"input rate {args.input_rate}, {torch.get_num_threads()} threads, medians of {args.repeats}; "
          f"ztriton backend {layers[0].stats['backend']}, active "
          + ", ".join(f"{100 * layer.stats['active_fraction']:.2f} %" for layer in layers)
          + "; ztriton's ops ran on: " + ", ".join(f"{op} {impl}" for op, impl in layers[0].stats["ops"].items()))
    best = min((statistics.median(sum(t) for t in times[name]) for name in peers), default=None)
    bptt_step = statistics.median(sum(t) for t in times["autograd BPTT"])
    print(f"{'framework':<24}{'forward ms':>12}{'backward ms':>13}{'step ms':>10}{'spike rate':>12}"
          f"{'= ztriton %':>13}{'x best peer':>13}{'x BPTT':>9}")
    rows = {}
    for name in runs:
        fwd = statistics.median(t[0] for t in times[name])
        bwd = statistics.median(t[1] for t in times[name])
        step = statistics.median(sum(t) for t in times[name])
        rate = float(spikes[name].float().mean())
        same = float((spikes[name] == spikes["ztriton (events)"]).float().mean())
        rows[name] = {"forward_ms": 1e3 * fwd, "backward_ms": 1e3 * bwd, "step_ms": 1e3 * step, "spike_rate": rate,
                      "spikes_equal_ztriton": same, "speedup_vs_best_peer": None if best is None else best / step,
                      "speedup_vs_bptt": bptt_step / step}
        ratio = "-" if best is None else f"{best / step:.2f}"
        print(f"{name:<24}{1e3 * fwd:12.1f}{1e3 * bwd:13.1f}{1e3 * step:10.1f}{rate:12.4f}{100 * same:13.2f}"
              f"{ratio:>13}{bptt_step / step:9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "backend": layers[0].stats["backend"], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
