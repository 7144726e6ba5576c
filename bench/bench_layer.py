"""SHD-shaped training-step benchmark: standard autograd BPTT vs the engine's dense, sparse and auto paths.

Network 700 -> 200 -> 200 -> 20 (LIF, LIF, leaky readout), T = 500, B = 256, beta = e^-0.2,
LocalZO delta 0.05, m 1, normal; input Bernoulli spikes (rate --input-rate, SHD-like). The BPTT is
the package's autograd reference (`ztriton.bptt`: time axis unbound once, the dense normal
surrogate at the same delta). All methods run on the SAME weights and batch, timed in one process
after a warm-up (medians of --repeats); peak memory is the growth of the peak resident set of a
fresh process that runs two steps of one method, measured from after a tiny warm-up step that
loads the libraries (so each number is that method's working memory alone); on a GPU, the
allocator's peak during one step above what was allocated before it, after a warm-up step. Both
take the input (--events) and loss (--regulariser) of the timed steps.

    python bench/bench_layer.py                # full size (about 1-2 minutes on 2 cores)
    python bench/bench_layer.py --steps 100    # quicker
    python bench/bench_layer.py --device cuda  # on a GPU (Triton backend)
    python bench/bench_layer.py --regulariser  # loss = cross-entropy + the training's spike-count regulariser
    python bench/bench_layer.py --events       # the engine takes the input as events (sparse COO), as the
                                               # data sets deliver it; the BPTT takes it dense
    python bench/bench_layer.py --recurrent --steps 300 --batch 128 --events   # 700-200r-200r-20
    python bench/bench_layer.py --recurrent --hidden 1024 --layers 1 --steps 300 --batch 128 --events

With --recurrent every hidden layer adds V s[t-1] (`SparseLIFLinear(recurrent=True)`, the BPTT's
`BPTTLIF(recurrent=True)`), V (out, out) drawn U(-1/sqrt(out), 1/sqrt(out)) times --recurrent-gain,
the same for every method.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import resource
import statistics
import time
import warnings

import torch
from torch import nn

from ztriton import LeakyReadout, SilentLayerWarning, SparseLIFLinear, get_distribution
from ztriton.bptt import BPTTLIF, BPTTReadout, Surrogate
from ztriton.train import Config, spike_regulariser

METHODS = ("bptt", "dense", "sparse", "auto")


def build(method: str, args) -> nn.Sequential:
    beta, beta_out = math.exp(-0.2), math.exp(-0.1)
    sizes = [args.inputs] + [args.hidden] * args.layers
    if method == "bptt":  # the package's autograd BPTT, dense surrogate of the engine's law and delta
        # its weights come from `gen` below: the draws of its constructors are undone, so nothing is taken
        # from the global generator (whose state sets the LocalZO keys of what runs next, e.g. gpu_report's activity)
        surrogate = Surrogate.dense("normal", args.delta)
        with torch.random.fork_rng(devices=[]):
            hidden = [BPTTLIF(a, b, beta=beta, recurrent=args.recurrent, surrogate=surrogate)
                      for a, b in zip(sizes[:-1], sizes[1:])]
            readout = BPTTReadout(args.hidden, args.classes, beta=beta_out)
        model = nn.Sequential(*hidden, readout)
    else:
        hidden = [
            SparseLIFLinear(a, b, beta=beta, recurrent=args.recurrent, grad="localzo", dist="normal", delta=args.delta,
                            m=1, path=method)
            for a, b in zip(sizes[:-1], sizes[1:])
        ]
        readout = LeakyReadout(args.hidden, args.classes, beta=beta_out)
        model = nn.Sequential(*hidden, readout)
    gen = torch.Generator().manual_seed(args.seed)

    def draw(weight, scale):
        bound = 1.0 / math.sqrt(weight.shape[1])
        weight.copy_(torch.empty_like(weight).uniform_(-bound, bound, generator=gen) * scale)

    with torch.no_grad():  # identical weights for every method
        for layer in model[:-1]:
            draw(layer.weight, args.gain)
            if args.recurrent:
                draw(layer.recurrent_weight, args.recurrent_gain)
        draw(model[-1].weight, 1.0)
    return model.to(args.device)


def batch(args):
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = (torch.rand(args.steps, args.batch, args.inputs, generator=gen) < args.input_rate).float()
    labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
    return x.to(args.device), labels.to(args.device)


def method_input(x, method, args):
    """The batch as `method` takes it: with --events the engine gets it as events (sparse COO), the BPTT dense."""
    return x.to_sparse() if args.events and method != "bptt" else x


def step(model, x, labels, regularise=False):
    """One forward + backward on a fresh copy of x (nothing cached on the input from an earlier step);
    returns (forward s, backward s). With `regularise`, the loss adds the training application's
    spike-count regulariser (SHD preset) on the hidden layers."""
    x = x.clone()
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    h, spikes = x, []
    for layer in model[:-1]:
        h = layer(h)
        spikes.append(h)
    logits = model[-1](h).sum(0)  # SHD: readout summed over time
    loss = nn.functional.cross_entropy(logits, labels)
    if regularise:
        loss = loss + spike_regulariser(spikes, REGULARISER)
    sync()
    middle = time.perf_counter()
    loss.backward()
    sync()
    return middle - start, time.perf_counter() - middle


REGULARISER = Config(dataset="shd").resolved()


def rss_bytes() -> int:
    """This process's resident set now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def status_bytes(key: str) -> int:
    """A size line of /proc/self/status in bytes, e.g. "VmHWM" (the resident set's high-water mark;
    unlike ru_maxrss, not inherited over exec) or "VmSize"."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _peak_worker(method, args, queue):
    torch.set_num_threads(args.threads)
    model = build(method, args)
    x, labels = batch(args)
    with warnings.catch_warnings():  # load library code (e.g. numba's JIT) before the baseline
        warnings.simplefilter("ignore", SilentLayerWarning)  # a 2-step batch may not make layer 2 fire
        step(model, x[:2, :2], labels[:2], args.regulariser)
    x = method_input(x, method, args)
    before = rss_bytes()
    for _ in range(2):
        step(model, x, labels, args.regulariser)
    peak = status_bytes("VmHWM")
    queue.put(max(0, peak - before))


def peak_memory(method, args) -> int:
    if args.device.startswith("cuda"):  # the allocator's own high-water mark
        model = build(method, args)
        x, labels = batch(args)
        x = method_input(x, method, args)
        step(model, x, labels, args.regulariser)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(model, x, labels, args.regulariser)
        return torch.cuda.max_memory_allocated() - base
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_worker, args=(method, args, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--inputs", type=int, default=700)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--input-rate", type=float, default=0.02)
    parser.add_argument("--gain", type=float, default=4.0, help="scale of the hidden weights (sets the firing rate)")
    parser.add_argument("--recurrent", action="store_true", help="recurrent hidden layers (all-to-all V s[t-1])")
    parser.add_argument("--recurrent-gain", type=float, default=1.0, help="scale of the recurrent weights")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the engine then uses its Triton backend)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--regulariser", action="store_true", help="add the spike-count regulariser to the loss")
    parser.add_argument("--events", action="store_true", help="give the engine the input as a sparse COO tensor")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    x, labels = batch(args)
    inputs = {method: method_input(x, method, args) for method in METHODS}
    models = {method: build(method, args) for method in METHODS}
    times = {method: ([], []) for method in METHODS}
    for method in METHODS:  # warm-up
        step(models[method], inputs[method], labels, args.regulariser)
    for _ in range(args.repeats):  # interleaved, so drifts in machine speed hit every method alike
        for method in METHODS:
            fwd, bwd = step(models[method], inputs[method], labels, args.regulariser)
            times[method][0].append(fwd)
            times[method][1].append(bwd)
    stats = [layer.stats for layer in models["sparse"] if isinstance(layer, SparseLIFLinear)]
    backend = stats[0].get("backend")
    auto_paths = [layer.stats["path"] for layer in models["auto"] if isinstance(layer, SparseLIFLinear)]
    memory = {m: None if args.no_memory else peak_memory(m, args) for m in METHODS}

    b_th = get_distribution("normal").backprop_threshold(args.delta)
    hidden = f"{args.hidden}r" if args.recurrent else str(args.hidden)
    print(
        f"T={args.steps} B={args.batch} {args.inputs}-{'-'.join([hidden] * args.layers)}-{args.classes} "
        f"{f'(recurrent gain {args.recurrent_gain:g}) ' if args.recurrent else ''}"
        f"LocalZO normal delta={args.delta} m=1 (B_th={b_th:.4f}), input rate {args.input_rate}"
        f"{' as events' if args.events else ''}, "
        f"{args.device} ({args.threads} threads), engine backend {backend}, medians of {args.repeats}"
    )
    print("active fraction per layer: " + ", ".join(f"{100 * s['active_fraction']:.3f} %" for s in stats))
    print("auto chose: " + ", ".join(auto_paths))
    print("the sparse path's ops ran on: " + ", ".join(f"{op} {impl}" for op, impl in stats[0]["ops"].items()))
    header = f"{'method':<8}{'forward ms':>12}{'backward ms':>13}{'overall ms':>12}{'peak MiB':>10}"
    header += f"{'bwd x bptt':>12}{'all x bptt':>12}{'bwd x dense':>13}"
    print(header)
    med = {m: (statistics.median(times[m][0]), statistics.median(times[m][1])) for m in METHODS}
    rows = {}
    for m in METHODS:
        fwd, bwd = med[m]
        mem = memory[m]
        row = {
            "forward_ms": 1e3 * fwd,
            "backward_ms": 1e3 * bwd,
            "overall_ms": 1e3 * (fwd + bwd),
            "peak_mib": None if mem is None else mem / 2**20,
            "backward_speedup_vs_bptt": med["bptt"][1] / bwd,
            "overall_speedup_vs_bptt": sum(med["bptt"]) / (fwd + bwd),
            "backward_speedup_vs_dense": med["dense"][1] / bwd,
        }
        rows[m] = row
        mem_text = "-" if mem is None else f"{row['peak_mib']:.0f}"
        print(
            f"{m:<8}{row['forward_ms']:12.1f}{row['backward_ms']:13.1f}{row['overall_ms']:12.1f}{mem_text:>10}"
            f"{row['backward_speedup_vs_bptt']:12.1f}{row['overall_speedup_vs_bptt']:12.2f}"
            f"{row['backward_speedup_vs_dense']:13.1f}"
        )
    if memory["bptt"]:
        print(f"sparse peak memory / bptt peak memory: {memory['sparse'] / memory['bptt']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "active_fraction": [s["active_fraction"] for s in stats], "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
