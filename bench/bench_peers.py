"""One training step of a 700-200-200 LIF network: ztriton against snntorch and spikingjelly.

Every framework gets the SAME weights and the same Bernoulli input (rate --input-rate), the same
neuron (eq. 1: u = beta u + W x - u_th s[t-1], soft reset, threshold 1) and the same loss
(a fixed random projection of the last layer's spike counts); forward + backward are timed after
a warm-up, medians of --repeats, in one process. The peers use their surrogate gradient on every
entry; ztriton uses LocalZO (normal, delta 0.05, m 1) with its default backend ("auto": native
on CPU, Triton on CUDA), once with the input as events (a sparse COO tensor, as its data sets deliver it) and
once dense. A peer that is not installed is skipped with a message.

    python bench/bench_peers.py                       # T 300, B 128 (about 1 minute on 2 cores)
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


def make_weights(args):
    gen = torch.Generator().manual_seed(args.seed)
    sizes = [args.inputs] + [args.hidden] * args.layers
    weights = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / math.sqrt(a)
        weights.append(torch.empty(b, a).uniform_(-bound, bound, generator=gen) * args.gain)
    return weights


def ztriton_net(weights, beta):
    layers = [SparseLIFLinear(w.shape[1], w.shape[0], beta=beta, grad="localzo", delta=0.05).to(w.device)
              for w in weights]
    with torch.no_grad():
        for layer, w in zip(layers, weights):
            layer.weight.copy_(w)
    return nn.Sequential(*layers), layers


def snntorch_net(weights, beta):
    import snntorch as snn

    linears = [nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.device) for w in weights]
    neurons = [snn.Leaky(beta=beta, threshold=1.0, reset_mechanism="subtract") for _ in weights]
    with torch.no_grad():
        for linear, w in zip(linears, weights):
            linear.weight.copy_(w)
    params = nn.ModuleList(linears + neurons)

    def forward(x):
        h = x
        for linear, neuron in zip(linears, neurons):  # layer by layer: one GEMM, then the time loop
            current = linear(h)
            mem = neuron.init_leaky()
            out = []
            for t in range(current.shape[0]):
                spk, mem = neuron(current[t], mem)
                out.append(spk)
            h = torch.stack(out)
        return h

    return forward, params


def spikingjelly_net(weights, beta):
    from spikingjelly.activation_based import functional, neuron

    modules = []
    for w in weights:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False).to(w.device)
        with torch.no_grad():
            linear.weight.copy_(w)
        # decay_input=False, v_reset=None: v = (1 - 1/tau) v + x, soft reset; 1 - 1/tau = beta
        modules += [linear, neuron.LIFNode(tau=1.0 / (1.0 - beta), decay_input=False, v_threshold=1.0, v_reset=None,
                                           detach_reset=True, step_mode="m")]
    net = nn.Sequential(*modules).to(weights[0].device)

    def forward(x):
        functional.reset_net(net)
        return net(x)

    return forward, net


def timed_step(forward, params, x, projection):
    """Forward + backward on a fresh copy of x (nothing cached on the input from an earlier step)."""
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
    return middle - start, time.perf_counter() - middle, float(out.detach().float().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--inputs", type=int, default=700)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--input-rate", type=float, default=0.02)
    parser.add_argument("--gain", type=float, default=4.0, help="scale of the weights (sets the firing rate)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (ztriton then uses its Triton backend)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    beta = math.exp(-0.2)
    weights = [w.to(args.device) for w in make_weights(args)]
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = (torch.rand(args.steps, args.batch, args.inputs, generator=gen) < args.input_rate).float().to(args.device)
    projection = torch.randn(args.batch, args.hidden, generator=gen).to(args.device)
    events = x.to_sparse()

    runs = {}
    net, layers = ztriton_net(weights, beta)
    runs["ztriton (events)"] = (net, list(net.parameters()), events)
    runs["ztriton (dense input)"] = (net, list(net.parameters()), x)
    for name, builder in (("snntorch", snntorch_net), ("spikingjelly", spikingjelly_net)):
        if importlib.util.find_spec(name) is None:
            print(f"{name}: not installed, skipped (see the docstring for how to install it)")
            continue
        forward, params = builder(weights, beta)
        runs[name] = (forward, list(params.parameters()), x)

    times = {name: [] for name in runs}
    rates = {}
    for name, (forward, params, inputs) in runs.items():  # warm-up
        rates[name] = timed_step(forward, params, inputs, projection)[2]
    for _ in range(args.repeats):  # interleaved: drifts in machine speed hit every framework alike
        for name, (forward, params, inputs) in runs.items():
            times[name].append(timed_step(forward, params, inputs, projection)[:2])

    print(f"T={args.steps} B={args.batch} {args.inputs}-{'-'.join([str(args.hidden)] * args.layers)} LIF, "
          f"input rate {args.input_rate}, {torch.get_num_threads()} threads, medians of {args.repeats}; "
          f"ztriton backend {layers[0].stats['backend']}, active "
          + ", ".join(f"{100 * layer.stats['active_fraction']:.2f} %" for layer in layers))
    peers = [name for name in runs if not name.startswith("ztriton")]
    best = min((statistics.median(sum(t) for t in times[name]) for name in peers), default=None)
    print(f"{'framework':<24}{'forward ms':>12}{'backward ms':>13}{'step ms':>10}{'spike rate':>12}{'x best peer':>13}")
    rows = {}
    for name in runs:
        fwd = statistics.median(t[0] for t in times[name]) * 1e3
        bwd = statistics.median(t[1] for t in times[name]) * 1e3
        step = statistics.median(sum(t) for t in times[name]) * 1e3
        ratio = "-" if best is None else f"{1e3 * best / step:.2f}"
        rows[name] = {"forward_ms": fwd, "backward_ms": bwd, "step_ms": step, "spike_rate": rates[name],
                      "speedup_vs_best_peer": None if best is None else 1e3 * best / step}
        print(f"{name:<24}{fwd:12.1f}{bwd:13.1f}{step:10.1f}{rates[name]:12.4f}{ratio:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "backend": layers[0].stats["backend"], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
