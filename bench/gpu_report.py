"""One command for a GPU: tests, kernel benchmarks, the SHD step against BPTT and the peers, and a cost model.

    python bench/gpu_report.py                 # on a GPU: everything (< 5 minutes), report in bench/results/
    python bench/gpu_report.py --gpu h100      # the cost model's prediction for another GPU
    python bench/gpu_report.py --model-only    # the cost model alone (what a machine without a GPU writes)

    python bench/gpu_report.py --dry-run --compile-backend aot_eager   # every part at a tiny shape, on CPU

It writes `gpu_report.md` (and the raw outputs) to --out. The cost model comes first and also runs
without a GPU, so the prediction exists before the measurement. For the step of `bench_layer.py`
(SHD shape: T 500, B 256, 700-200-200-20, LocalZO delta 0.05, input as events) it adds up

- device ops: torch ops and Triton launches of one engine step, counted by `ztriton.counting` on a
  small grid (they do not depend on T or on the active count: `tests/test_device_work.py`); for the
  eager BPTT (the package's autograd reference `ztriton.bptt`, as `bench_layer.py` builds and times
  it), counted at T 4 and 8 and extrapolated linearly in T;
- bytes moved and flops of every kernel, from the shape and the activity measured on that batch
  (weights are read from L2 and not counted; the rows the weight gradients gather are counted as
  DRAM reads, an upper bound);

and predicts time = device ops x launch cost + bytes / (bandwidth x 0.8) + flops / (fp32 peak x 0.6)
+ time-loop iterations x 0.6 us for the named GPU (spec-sheet peaks; launch cost 5 us per torch op,
10 us per Triton launch, as measured for eager PyTorch and Triton's Python launcher; a kernel that
walks the time axis pays about a DRAM round trip per step, or per tile of steps). Each term is
printed, so a miss can be traced to the term that caused it.

The strongest GPU peers are timed on `bench_peers.py`'s step (T 300, B 128, 700-200-200, 2 % input,
the same weights, loss on the last layer's spike counts), beside ztriton (events) and the eager
BPTT: spikingjelly 2.0's multi-step `LIFNode` (on CUDA it picks its own kernels, a native build if
the wheel has one, else its Triton kernels, for its built-in surrogates; the report names the one
it picked) and the eager BPTT with its per-step cell under `torch.compile` (`compiled_bptt_net`:
the GEMMs eager, each step's membrane update, spike and surrogate one compiled graph, forward and
backward; the first step's extra time is reported as compile time, apart). The cost model
predicts those rows too, on the same step (`peer_costs`).

The GPU machine has no network: the peers come from wheels carried with the working tree. Prepare
them once on a machine with PyPI access, in the repository root (the folder is not tracked; it
travels with the working tree as untracked files, or name it in the device tool's carry list):

    pip download --no-deps -d wheels/ spikingjelly snntorch loguru

A peer that is not installed is installed from wheels/ (`pip install --no-index --no-deps
--find-links wheels/`); one that is neither installed nor carried is skipped with a message.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():  # count the Triton path through the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

from torch import nn  # noqa: E402

import bench_layer  # noqa: E402
import bench_peers  # noqa: E402
import ztriton  # noqa: E402
from ztriton import events, rng  # noqa: E402
from ztriton.counting import DeviceWork, count_device_work  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes / s, spec sheet
    fp32: float  # flop / s without tensor cores, spec sheet


GPUS = {
    "h200": GPU("NVIDIA H200", 4.8e12, 67e12),
    "h100": GPU("NVIDIA H100 SXM", 3.35e12, 67e12),
    "a100": GPU("NVIDIA A100 80GB SXM", 2.04e12, 19.5e12),
    "l4": GPU("NVIDIA L4", 0.3e12, 30e12),
}
TORCH_OP_S, TRITON_LAUNCH_S = 5e-6, 10e-6
#: one call of a `torch.compile`d graph from eager code (guards, the compiled wrapper, its one fused
#: kernel's launch), forward or its backward node: an assumption the measurement checks
COMPILED_CALL_S = 20e-6
#: a kernel's dependent iteration along time (one tile of loads, then the recurrence) costs at least a
#: DRAM round trip, whatever the bandwidth
LOOP_STEP_S = 0.6e-6
BANDWIDTH_USE, FLOPS_USE = 0.8, 0.6
from ztriton.kernels.sparse_weight_grad import CHECKPOINT_STEPS  # noqa: E402
from ztriton.kernels.time_filter import FILTER_TILE  # noqa: E402


@dataclass
class Cost:
    """One phase (forward or backward) of one step."""

    ops: int = 0
    launches: int = 0
    syncs: int = 0
    bytes: float = 0.0
    flops: float = 0.0
    loop_steps: float = 0.0  # dependent time-loop iterations of the kernels, one after another
    compiled_calls: int = 0  # calls of torch.compile'd graphs (each launches one fused kernel)

    def seconds(self, gpu: GPU) -> dict:
        launch = self.ops * TORCH_OP_S + self.launches * TRITON_LAUNCH_S + self.compiled_calls * COMPILED_CALL_S
        memory = self.bytes / (gpu.bandwidth * BANDWIDTH_USE)
        compute = self.flops / (gpu.fp32 * FLOPS_USE)
        latency = self.loop_steps * LOOP_STEP_S
        return {"launch": launch, "memory": memory, "compute": compute, "latency": latency,
                "total": launch + memory + compute + latency}


def shape_args(steps=500, batch=256, inputs=700, hidden=200, classes=20):
    """bench_layer.py's arguments (defaults: its SHD shape)."""
    return argparse.Namespace(steps=steps, batch=batch, inputs=inputs, hidden=hidden, layers=2, classes=classes,
                              delta=0.05, input_rate=0.02, gain=4.0, recurrent=False, recurrent_gain=1.0, seed=0,
                              device="cpu")


#: the small grid on which ops are counted (the counts depend on neither T, widths nor activity)
def _small(steps):
    return shape_args(steps=steps, batch=8, inputs=40, hidden=32, classes=5)


def _engine(args, device, backend):
    model = bench_layer.build("sparse", args)
    for layer in model:
        layer.backend = backend
    return model.to(device)


def _phases(model, x, labels) -> tuple[DeviceWork, DeviceWork]:
    with count_device_work() as forward:
        logits = model(x).sum(0)
        loss = nn.functional.cross_entropy(logits, labels)
    with count_device_work() as backward:
        loss.backward()
    return forward, backward


def count_engine(device) -> tuple[DeviceWork, DeviceWork]:
    """Ops, launches and syncs of one engine step (Triton backend) on a small grid, after a warm-up.

    On CPU what differs on CUDA is set as there (as in tests/test_device_work.py): the RNG key comes
    from host-side state, the inputs' NaN checks are off, row pointers are searched, not counted.
    """
    args = _small(16)
    model = _engine(args, device, "triton")
    x, labels = bench_layer.batch(args)
    x, labels = x.to_sparse().to(device), labels.to(device)
    next_key, row_pointer = rng.next_key, events.row_pointer
    if device.type == "cpu":
        keys = iter(range(10**9))
        rng.next_key = lambda generator, where: rng.PhiloxKey(7, 4 * next(keys))
        events.row_pointer = events.searched_row_pointer
        ztriton.set_value_checks(False)
    try:
        _phases(model, x, labels)
        return _phases(model, x.clone(), labels)  # a fresh batch: its events are not cached yet
    finally:
        rng.next_key, events.row_pointer = next_key, row_pointer
        ztriton.set_value_checks(None)


def count_bptt(device) -> tuple[tuple[float, float], tuple[float, float]]:
    """(forward, backward) device ops of the eager BPTT (`ztriton.bptt`, bench_layer's "bptt" model) as
    (fixed, per time step)."""
    counts = []
    for t in (4, 8):
        args = _small(t)
        model = bench_layer.build("bptt", args).to(device)
        x, labels = bench_layer.batch(args)
        counts.append(_phases(model, x.to(device), labels.to(device)))
    out = []
    for phase in (0, 1):
        at_4, at_8 = counts[0][phase].device_ops, counts[1][phase].device_ops
        per_step = (at_8 - at_4) / 4
        out.append((at_4 - 4 * per_step, per_step))
    return tuple(out)


def measure_activity(args, device) -> dict:
    """Active fraction and spike rate of each hidden layer on the benchmark's batch, and the input density."""
    backend = "triton" if device.type == "cuda" else "auto"
    model = _engine(args, device, backend)
    x, labels = bench_layer.batch(args)
    x = x.to(device)
    h, rates = x.to_sparse(), []
    for layer in model[:-1]:
        h = layer(h)
        rates.append(float(h.detach().float().mean()))
    nn.functional.cross_entropy(model[-1](h).sum(0), labels.to(device)).backward()
    return {"active": [layer.stats["active_fraction"] for layer in model[:-1]], "rates": rates,
            "input_density": float(x.mean())}


def engine_traffic(args, activity, readout: bool = True) -> tuple[Cost, Cost]:
    """Bytes and flops of the engine's sparse step (Triton backend), by kernel; see the module docstring.
    Without `readout` (bench_peers.py's step: the loss on the last layer's spike counts) the readout's
    terms are left out."""
    forward, backward = Cost(), Cost()
    rows = args.steps * args.batch
    widths = [args.inputs] + [args.hidden] * args.layers
    for number, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        grid = rows * n_out
        nnz = activity["active"][number] * grid
        if number == 0:  # event-driven current: each event adds a row of W^T (W^T stays in L2: not counted)
            events = activity["input_density"] * rows * n_in
            forward.bytes += events * 16 + grid * 4
            forward.flops += 2 * events * n_out
        else:  # GEMM of the previous layer's spikes
            forward.bytes += rows * n_in * 4 + grid * 4
            forward.flops += 2 * rows * n_in * n_out
        forward.bytes += grid * 4 * 2 + nnz * 12 * 3  # current in, spikes out, compact set + its sort
        forward.flops += grid * 150  # Philox-10 and Box-Muller per neuron and step (integer ops as flops)
        forward.loop_steps += args.steps  # the fused forward walks T steps
        # D, the reverse filter of ds on the grid (zero, scatter, filter): for the weight gradient over
        # events (layer 1) or for the input gradient (the others)
        backward.bytes += grid * 4 * 3
        backward.loop_steps += args.steps / FILTER_TILE
        if number == 0:  # weight gradient over the events: a row of D per event, the events sorted by column
            backward.bytes += events * n_out * 4 + events * 32
            backward.flops += 2 * events * n_out
        else:
            # weight gradient by active entry: checkpoints (read x, write T/K rows), then per entry its
            # checkpoint row and on average (K - 1) / 2 + 1 input rows (counted as DRAM reads: an upper
            # bound, L2 may hold some)
            x_bytes = rows * n_in * 4
            per_entry = (CHECKPOINT_STEPS - 1) / 2 + 2
            backward.bytes += x_bytes + x_bytes / CHECKPOINT_STEPS + nnz * per_entry * n_in * 4
            backward.flops += 2 * nnz * per_entry * n_in
            backward.loop_steps += args.steps / FILTER_TILE
            # input gradient at the previous layer's active entries: a row of D each (W^T in L2)
            targets = activity["active"][number - 1] * rows * n_in
            backward.bytes += targets * n_out * 4
            backward.flops += 2 * targets * n_out
    if not readout:
        return forward, backward
    n, classes = args.hidden, args.classes
    forward.loop_steps += args.steps / FILTER_TILE  # the readout's filters, forward and reverse
    backward.loop_steps += args.steps / FILTER_TILE
    forward.bytes += rows * (n + classes * 3) * 4
    forward.flops += 2 * rows * n * classes
    backward.bytes += rows * (n + classes * 3) * 4 + activity["active"][-1] * rows * n * classes * 8
    backward.flops += 2 * rows * n * classes
    return forward, backward


def bptt_traffic(args, readout: bool = True) -> tuple[Cost, Cost]:
    """Bytes and flops of the eager BPTT: GEMMs, and about 8 (forward) / 16 (backward) passes over each
    layer's (T, B, N) state (one per elementwise op of the unbound time loop)."""
    forward, backward = Cost(), Cost()
    rows = args.steps * args.batch
    widths = [args.inputs] + [args.hidden] * args.layers + ([args.classes] if readout else [])
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        forward.flops += 2 * rows * n_in * n_out
        backward.flops += 4 * rows * n_in * n_out  # dW and dx
        forward.bytes += rows * (n_in + n_out) * 4 + 8 * rows * n_out * 4
        backward.bytes += 2 * rows * (n_in + n_out) * 4 + 16 * rows * n_out * 4
    return forward, backward


def cost_model(device, gpu: GPU, args) -> dict:
    engine_fwd, engine_bwd = count_engine(device)
    (bptt_fwd_fixed, bptt_fwd_step), (bptt_bwd_fixed, bptt_bwd_step) = count_bptt(device)
    activity = measure_activity(args, device)
    fwd, bwd = engine_traffic(args, activity)
    for cost, work in ((fwd, engine_fwd), (bwd, engine_bwd)):
        cost.ops, cost.launches, cost.syncs = work.ops, work.launches, work.syncs
    bptt_fwd, bptt_bwd = bptt_traffic(args)
    bptt_fwd.ops = round(bptt_fwd_fixed + bptt_fwd_step * args.steps)
    bptt_bwd.ops = round(bptt_bwd_fixed + bptt_bwd_step * args.steps)
    rows = {}
    for name, (f, b) in {"engine (sparse, Triton)": (fwd, bwd), "eager BPTT": (bptt_fwd, bptt_bwd)}.items():
        rows[name] = {"forward": {**vars(f), **f.seconds(gpu)}, "backward": {**vars(b), **b.seconds(gpu)}}
    engine, bptt = rows["engine (sparse, Triton)"], rows["eager BPTT"]
    return {
        "gpu": gpu.name, "activity": activity, "rows": rows,
        "predicted_backward_speedup": bptt["backward"]["total"] / engine["backward"]["total"],
        "predicted_overall_speedup": (bptt["forward"]["total"] + bptt["backward"]["total"])
        / (engine["forward"]["total"] + engine["backward"]["total"]),
    }


def peer_shape_args(steps=300, batch=128, inputs=700, hidden=200) -> argparse.Namespace:
    """bench_peers.py's step (its defaults: T 300, B 128, 700-200-200, 2 % input, gain 4)."""
    return shape_args(steps=steps, batch=batch, inputs=inputs, hidden=hidden)


def _peer_inputs(args, device):
    """bench_peers.py's weights, input and projection for `args` (the same draws as its main)."""
    shape = argparse.Namespace(seed=args.seed, inputs=args.inputs, hidden=args.hidden, layers=args.layers,
                               gain=args.gain, recurrent=False, recurrent_gain=1.0)
    weights = [(w.to(device), None) for w, _ in bench_peers.make_weights(shape)]
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = (torch.rand(args.steps, args.batch, args.inputs, generator=gen) < args.input_rate).float().to(device)
    projection = torch.randn(args.batch, args.hidden, generator=gen).to(device)
    return weights, x, projection


def _peer_phases(forward, x, projection) -> tuple[DeviceWork, DeviceWork]:
    with count_device_work() as fwd:
        loss = (forward(x).sum(0) * projection).sum()
    with count_device_work() as bwd:
        loss.backward()
    return fwd, bwd


def count_peer_bptt(device) -> tuple[tuple[float, float], tuple[float, float]]:
    """(forward, backward) device ops of bench_peers.py's eager BPTT as (fixed, per time step), counted at
    T 4 and 8 on a small grid."""
    counts = []
    for steps in (4, 8):
        args = argparse.Namespace(**{**vars(_small(steps)), "input_rate": 0.2})
        weights, x, projection = _peer_inputs(args, device)
        counts.append(_peer_phases(bench_peers.bptt_net(weights, math.exp(-0.2)), x, projection))
    out = []
    for phase in (0, 1):
        at_4, at_8 = counts[0][phase].device_ops, counts[1][phase].device_ops
        out.append((at_4 - (at_8 - at_4), (at_8 - at_4) / 4))
    return tuple(out)


def peer_activity(args, device) -> dict:
    """Active fraction and spike rate of ztriton's hidden layers on bench_peers.py's step, and the input density."""
    weights, x, projection = _peer_inputs(args, device)
    net, layers = bench_peers.ztriton_net(weights, math.exp(-0.2))
    h, rates = x.to_sparse(), []
    for layer in layers:
        h = layer(h)
        rates.append(float(h.detach().float().mean()))
    (h.sum(0) * projection).sum().backward()
    return {"active": [layer.stats["active_fraction"] for layer in layers], "rates": rates,
            "input_density": float(x.mean())}


def spikingjelly_traffic(args) -> tuple[Cost, Cost]:
    """spikingjelly's multi-step LIF on CUDA (its own kernels): per layer the current's GEMM and the
    state's zeros (torch ops) and one LIF kernel walking T (current in, spikes and the membrane it
    saves out); backward one LIF kernel walking T back (spike gradient and membrane in, current
    gradient out), the weight gradient's GEMM and, after the first layer, the input gradient's."""
    forward, backward = Cost(), Cost()
    rows = args.steps * args.batch
    widths = [args.inputs] + [args.hidden] * args.layers
    for number, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        grid, gemms = rows * n_out, 1 if number == 0 else 2
        forward.ops += 2
        forward.launches += 1
        forward.flops += 2 * rows * n_in * n_out
        forward.bytes += rows * (n_in + n_out) * 4 + grid * 4 * 3
        forward.loop_steps += args.steps
        backward.ops += gemms
        backward.launches += 1
        backward.flops += 2 * gemms * rows * n_in * n_out
        backward.bytes += gemms * rows * (n_in + n_out) * 4 + grid * 4 * 3
        backward.loop_steps += args.steps
    forward.ops += 3  # the loss: spike counts, the projection, the sum (and their backward)
    backward.ops += 3
    return forward, backward


def compiled_bptt_traffic(args) -> tuple[Cost, Cost]:
    """The BPTT with its per-step cell compiled (`compiled_bptt_net`): the GEMMs as the eager BPTT's, per
    layer and step one compiled call forward (current, u and s in; u, s and the saved v out) and one
    backward (about 8 passes of a step's (B, N) state), and per layer the zeros, the stack of the
    spikes and, in backward, of the current's gradients."""
    forward, backward = bptt_traffic(args, readout=False)
    rows = args.steps * args.batch
    for _ in range(args.layers):
        grid = rows * args.hidden
        forward.bytes -= 8 * grid * 4 - 6 * grid * 4  # eager: ~8 passes per step, fused: 6
        backward.bytes -= 16 * grid * 4 - 8 * grid * 4
        forward.compiled_calls += args.steps
        backward.compiled_calls += args.steps
        forward.ops += 3  # GEMM, zeros, stack
        backward.ops += 3  # stack of the current's gradients, the GEMMs
    forward.ops += 3
    backward.ops += 3
    return forward, backward


def peer_costs(device, gpu: GPU, args) -> dict:
    """Predicted time of bench_peers.py's step for ztriton (events, Triton), spikingjelly's multi-step LIF,
    the compiled BPTT and the eager BPTT (the engine's ops counted as in `cost_model`, its readout's few
    included; the eager BPTT's counted on bench_peers.py's own network)."""
    engine_fwd, engine_bwd = count_engine(device)
    (bptt_fwd_fixed, bptt_fwd_step), (bptt_bwd_fixed, bptt_bwd_step) = count_peer_bptt(device)
    activity = peer_activity(args, device)
    fwd, bwd = engine_traffic(args, activity, readout=False)
    for cost, work in ((fwd, engine_fwd), (bwd, engine_bwd)):
        cost.ops, cost.launches, cost.syncs = work.ops, work.launches, work.syncs
    bptt_fwd, bptt_bwd = bptt_traffic(args, readout=False)
    bptt_fwd.ops = round(bptt_fwd_fixed + bptt_fwd_step * args.steps)
    bptt_bwd.ops = round(bptt_bwd_fixed + bptt_bwd_step * args.steps)
    costs = {"ztriton (events)": (fwd, bwd), "spikingjelly": spikingjelly_traffic(args),
             "compiled BPTT": compiled_bptt_traffic(args), "eager BPTT": (bptt_fwd, bptt_bwd)}
    rows = {name: {"forward": {**vars(f), **f.seconds(gpu)}, "backward": {**vars(b), **b.seconds(gpu)}}
            for name, (f, b) in costs.items()}
    return {"gpu": gpu.name, "activity": activity, "rows": rows,
            "step_ms": {name: 1e3 * (r["forward"]["total"] + r["backward"]["total"]) for name, r in rows.items()}}


def peer_markdown(costs: dict, args) -> str:
    act = costs["activity"]
    lines = [f"## Cost model: the strongest peers, predicted for {costs['gpu']}", "",
             f"Step of `bench_peers.py` (T {args.steps}, B {args.batch}, {args.inputs}-{args.hidden}-{args.hidden}); "
             f"input density {100 * act['input_density']:.2f} %, ztriton active "
             + ", ".join(f"{100 * a:.3f} %" for a in act["active"]) + ".", "",
             "| step part | torch ops | kernel launches | compiled calls | MB moved | GFLOP | launch ms | memory ms "
             "| compute ms | time-loop ms | predicted ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in costs["rows"].items():
        for phase in ("forward", "backward"):
            r = row[phase]
            lines.append(f"| {name} {phase} | {r['ops']} | {r['launches']} | {r['compiled_calls']} | "
                         f"{r['bytes'] / 1e6:.0f} | {r['flops'] / 1e9:.1f} | {1e3 * r['launch']:.2f} | "
                         f"{1e3 * r['memory']:.2f} | {1e3 * r['compute']:.2f} | {1e3 * r['latency']:.2f} | "
                         f"{1e3 * r['total']:.2f} |")
    best = min(v for k, v in costs["step_ms"].items() if k != "ztriton (events)")
    lines += ["", f"Predicted step: " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs["step_ms"].items())
              + f"; ztriton {best / costs['step_ms']['ztriton (events)']:.1f}x the fastest of the others.", ""]
    return "\n".join(lines)


def compiled_bptt_net(layers, beta: float, delta: float = 0.05, backend: str = "inductor"):
    """bench_peers.py's eager BPTT (`ztriton.bptt.BPTTLIF`, soft reset, threshold 1, the dense normal
    surrogate at `delta`) with the per-step cell under `torch.compile`: each layer's current is one
    eager GEMM over all steps, unbound once; the cell (membrane update, eq. 1, spike, surrogate) is one
    compiled graph, forward and backward. The spike is H(v) in value and has the gradient of
    Phi(v / delta), the normal law's expected surrogate pdf(v / delta) / delta. Returns (forward, module)."""
    if any(v is not None for _, v in layers):
        raise ValueError("compiled_bptt_net covers feed-forward layers only, got a recurrent weight")
    linears = nn.ModuleList(bench_peers._linear(w) for w, _ in layers)
    scale = 1.0 / (delta * math.sqrt(2.0))

    @torch.compile(backend=backend, dynamic=False, fullgraph=True)
    def cell(u, s, current):
        u = beta * u + current - s.detach()
        v = u - 1.0
        smooth = 0.5 * torch.special.erf(v * scale)
        return u, (v > 0).to(v.dtype) + (smooth - smooth.detach())

    def forward(x):
        h = x
        for linear in linears:
            currents = linear(h).unbind(0)
            u = torch.zeros_like(currents[0])
            s = torch.zeros_like(currents[0])
            out = []
            for current in currents:
                u, s = cell(u, s, current)
                out.append(s)
            h = torch.stack(out)
        return h

    return forward, linears


def _spikingjelly_kernels() -> str:
    """The implementations spikingjelly's LIF selected on CUDA so far ("cpu" where none was)."""
    from spikingjelly._ops.lif import _selection

    names = sorted({impl.name for impl in _selection._selections.values() if impl is not None})
    return ", ".join(names) or "cpu"


def time_strongest_peers(args, device, compile_backend="inductor", repeats=5) -> dict:
    """One step of bench_peers.py's network: ztriton (events), spikingjelly's multi-step LIF (if installed),
    the compiled BPTT and the eager BPTT, same weights and input, interleaved medians of `repeats` after a
    warm-up step; the compiled BPTT's compile time = its first step minus its median step; on CUDA the
    allocator's peak during one step above what was allocated before it."""
    beta = math.exp(-0.2)
    weights, x, projection = _peer_inputs(args, device)
    runs = {}
    net, layers = bench_peers.ztriton_net(weights, beta)
    runs["ztriton (events)"] = (net, list(net.parameters()), x.to_sparse())
    messages = []
    if importlib.util.find_spec("spikingjelly") is None:
        messages.append("spikingjelly: not installed (nor carried as a wheel), skipped")
    else:
        forward, module = bench_peers.spikingjelly_net(weights, beta)
        runs["spikingjelly"] = (forward, list(module.parameters()), x)
    forward, module = compiled_bptt_net(weights, beta, backend=compile_backend)
    runs["compiled BPTT"] = (forward, list(module.parameters()), x)
    eager = bench_peers.bptt_net(weights, beta)
    runs["eager BPTT"] = (eager, list(eager.parameters()), x)
    first, spikes = {}, {}
    for name, (forward, params, inputs) in runs.items():
        start = time.perf_counter()
        spikes[name] = bench_peers.timed_step(forward, params, inputs, projection)[2]
        first[name] = time.perf_counter() - start
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (forward, params, inputs) in runs.items():
            times[name].append(bench_peers.timed_step(forward, params, inputs, projection)[:2])
    rows = {}
    for name, (forward, params, inputs) in runs.items():
        step = statistics.median(sum(t) for t in times[name])
        peak = None
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            bench_peers.timed_step(forward, params, inputs, projection)
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        rows[name] = {"forward_ms": 1e3 * statistics.median(t[0] for t in times[name]),
                      "backward_ms": 1e3 * statistics.median(t[1] for t in times[name]), "step_ms": 1e3 * step,
                      "first_step_ms": 1e3 * first[name], "peak_mib": peak,
                      "spike_rate": float(spikes[name].float().mean()),
                      "spikes_equal_eager_bptt": float((spikes[name] == spikes["eager BPTT"]).float().mean())}
    rows["compiled BPTT"]["compile_s"] = first["compiled BPTT"] - rows["compiled BPTT"]["step_ms"] / 1e3
    kernels = _spikingjelly_kernels() if "spikingjelly" in runs else None
    return {"shape": {k: getattr(args, k) for k in ("steps", "batch", "inputs", "hidden", "layers")},
            "device": str(device), "compile_backend": compile_backend, "repeats": repeats,
            "spikingjelly_kernels": kernels, "ztriton_ops": layers[0].stats["ops"], "messages": messages, "rows": rows}


def strongest_markdown(measured: dict, costs: dict | None) -> str:
    shape = measured["shape"]
    kernels = measured["spikingjelly_kernels"]
    lines = [f"## Measured: the strongest peers ({measured['device']})", "",
             f"`gpu_report.py --strongest-peers` (bench_peers.py's step: T {shape['steps']}, B {shape['batch']}, "
             f"{shape['inputs']}-{shape['hidden']}-{shape['hidden']}; medians of {measured['repeats']}; spikingjelly's "
             f"LIF ran on: {kernels or 'not installed'}; torch.compile backend {measured['compile_backend']}, compile "
             f"time {measured['rows']['compiled BPTT']['compile_s']:.1f} s apart):", ""]
    lines += [*measured["messages"], ""] if measured["messages"] else []
    lines += ["| framework | forward ms | backward ms | step ms | peak MiB | spikes = eager BPTT % | predicted ms "
              "| predicted / measured |", "|---|---|---|---|---|---|---|---|"]
    for name, r in measured["rows"].items():
        predicted = None if costs is None else costs["step_ms"].get(name)
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        ratio = "-" if predicted is None else f"{predicted / r['step_ms']:.2f}"
        lines.append(f"| {name} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | {r['step_ms']:.2f} | {peak} | "
                     f"{100 * r['spikes_equal_eager_bptt']:.2f} | {'-' if predicted is None else f'{predicted:.2f}'} "
                     f"| {ratio} |")
    others = [r["step_ms"] for name, r in measured["rows"].items() if name != "ztriton (events)"]
    lines += ["", f"ztriton {min(others) / measured['rows']['ztriton (events)']['step_ms']:.2f}x the fastest of the "
              "others.", ""]
    return "\n".join(lines)


PEER_PACKAGES = ("loguru", "snntorch", "spikingjelly")  # loguru first: spikingjelly imports it


def ensure_peers(wheels: Path, dry_run: bool = False) -> list[str]:
    """Install each missing peer from the wheels carried in `wheels` (no index, no dependencies); one that
    is neither installed nor carried is left out with a message. With `dry_run`, only say what would be
    installed. Returns one line per package."""
    lines = []
    for name in PEER_PACKAGES:
        if importlib.util.find_spec(name) is not None:
            lines.append(f"{name}: installed")
            continue
        carried = sorted(wheels.glob(f"{name}-*.whl")) if wheels.is_dir() else []
        if not carried:
            lines.append(f"{name}: not installed and no wheel in {wheels}/, skipped "
                         f"(prepare: pip download --no-deps -d {wheels}/ {' '.join(PEER_PACKAGES)})")
            continue
        command = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--find-links",
                   str(wheels), name]
        if dry_run:
            lines.append(f"{name}: would run {' '.join(command)}")
            continue
        done = subprocess.run(command, capture_output=True, text=True)
        importlib.invalidate_caches()
        lines.append(f"{name}: installed from {carried[-1].name}" if done.returncode == 0
                     else f"{name}: pip failed ({done.stderr.strip().splitlines()[-1:]}), skipped")
    return lines


def model_markdown(model: dict, args) -> str:
    act = model["activity"]
    lines = [
        f"## Cost model: predicted for {model['gpu']}",
        "",
        f"Step of `bench_layer.py --events` (T {args.steps}, B {args.batch}, {args.inputs}-{args.hidden}-{args.hidden}-"
        f"{args.classes}); input density {100 * act['input_density']:.2f} %, active "
        + ", ".join(f"{100 * a:.3f} %" for a in act["active"]) + ", spike rate "
        + ", ".join(f"{100 * r:.2f} %" for r in act["rates"]) + ".",
        "",
        "| step part | torch ops | Triton launches | host syncs | MB moved | GFLOP | launch ms | memory ms | compute ms "
        "| time-loop ms | predicted ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in model["rows"].items():
        for phase in ("forward", "backward"):
            r = row[phase]
            lines.append(
                f"| {name} {phase} | {r['ops']} | {r['launches']} | {r['syncs']} | {r['bytes'] / 1e6:.0f} | "
                f"{r['flops'] / 1e9:.1f} | {1e3 * r['launch']:.2f} | {1e3 * r['memory']:.2f} | "
                f"{1e3 * r['compute']:.2f} | {1e3 * r['latency']:.2f} | {1e3 * r['total']:.2f} |"
            )
    lines += ["", f"Predicted: backward {model['predicted_backward_speedup']:.0f}x, overall "
              f"{model['predicted_overall_speedup']:.1f}x the eager BPTT.", ""]
    return "\n".join(lines)


def run(command: list[str], out: Path, name: str, timeout: int) -> dict:
    """Run one part of the report; its output goes to out/name.log whatever happens."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        code, text = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:  # its output may come as bytes even with text=True
        code, text = "timeout", "".join(o.decode() if isinstance(o, bytes) else o for o in (err.stdout, err.stderr) if o)
    (out / f"{name}.log").write_text(text)
    return {"command": " ".join(command), "returncode": code, "seconds": time.perf_counter() - start,
            "tail": "\n".join(text.strip().splitlines()[-25:])}


def measured_markdown(model: dict, layer: dict | None, peers: dict | None) -> str:
    lines = ["## Measured", ""]
    if layer is not None:
        rows, run_args = layer["rows"], layer["args"]
        flags = "".join(f" --{flag}" for flag in ("events", "regulariser") if run_args[flag])
        engine_input = "events (sparse COO)" if run_args["events"] else "dense"
        peak = ("the CUDA allocator's high-water mark during one step above what was allocated before it"
                if run_args["device"].startswith("cuda") else "growth of a fresh process's peak resident set over two steps")
        lines += [f"`bench_layer.py --device {run_args['device']}{flags}` (medians of {run_args['repeats']}; peak: "
                  f"{peak}, the engine's input {engine_input}, the BPTT's dense):", "",
                  "| method | forward ms | backward ms | overall ms | peak MiB | bwd x BPTT | all x BPTT |",
                  "|---|---|---|---|---|---|---|"]
        for method, r in rows.items():
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {method} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | {r['overall_ms']:.2f} | {peak} | "
                         f"{r['backward_speedup_vs_bptt']:.1f} | {r['overall_speedup_vs_bptt']:.2f} |")
        engine, bptt = model["rows"]["engine (sparse, Triton)"], model["rows"]["eager BPTT"]
        lines += ["", "| quantity | predicted | measured | predicted / measured |", "|---|---|---|---|"]
        pairs = [
            ("engine forward ms", 1e3 * engine["forward"]["total"], rows["sparse"]["forward_ms"]),
            ("engine backward ms", 1e3 * engine["backward"]["total"], rows["sparse"]["backward_ms"]),
            ("BPTT forward ms", 1e3 * bptt["forward"]["total"], rows["bptt"]["forward_ms"]),
            ("BPTT backward ms", 1e3 * bptt["backward"]["total"], rows["bptt"]["backward_ms"]),
            ("backward speedup", model["predicted_backward_speedup"], rows["sparse"]["backward_speedup_vs_bptt"]),
            ("overall speedup", model["predicted_overall_speedup"], rows["sparse"]["overall_speedup_vs_bptt"]),
        ]
        for name, predicted, measured in pairs:
            lines.append(f"| {name} | {predicted:.2f} | {measured:.2f} | {predicted / measured:.2f} |")
        lines.append("")
    if peers is not None:
        lines += ["`bench_peers.py --device cuda` (T 300, B 128):", "",
                  "| framework | forward ms | backward ms | step ms | x best peer |", "|---|---|---|---|---|"]
        for name, r in peers["rows"].items():
            ratio = "-" if r["speedup_vs_best_peer"] is None else f"{r['speedup_vs_best_peer']:.2f}"
            lines.append(f"| {name} | {r['forward_ms']:.2f} | {r['backward_ms']:.2f} | {r['step_ms']:.2f} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def _tiny_shapes() -> tuple[argparse.Namespace, argparse.Namespace]:
    """(bench_layer's, bench_peers') shapes of --dry-run: every part runs in seconds on a CPU."""
    return shape_args(steps=12, batch=4, inputs=30, hidden=16, classes=3), peer_shape_args(12, 4, 30, 16)


def strongest_part(path: Path, dry_run: bool, compile_backend: str) -> dict:
    """The --strongest-peers part: time the strongest peers (tiny shape on CPU with --dry-run), write JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = _tiny_shapes()[1] if dry_run else peer_shape_args()
    measured = time_strongest_peers(shape, device, compile_backend, repeats=1 if dry_run else 5)
    path.write_text(json.dumps(measured, indent=2))
    print(strongest_markdown(measured, None))
    return measured


#: the parts of a GPU run, in order of importance, with their time limits in seconds; together they
#: stay within --budget (a part gets at most what is left of it)
PARTS = (("tests", 150), ("layer", 90), ("strongest", 150), ("peers", 90), ("kernels", 60))


def run_parts(commands: dict, out: Path, budget: float, limits=PARTS) -> dict:
    """Run the parts named in `limits` (name, seconds) in that order, each under the lesser of its limit
    and what is left of `budget`; a part with under 10 s left is not run (and says so)."""
    deadline = time.perf_counter() + budget
    parts = {}
    for name, limit in limits:
        left = int(deadline - time.perf_counter())
        if left < 10:
            parts[name] = {"command": " ".join(commands[name]), "returncode": "not run (budget spent)",
                           "seconds": 0.0, "tail": ""}
            continue
        parts[name] = run(commands[name], out, name, min(limit, left))
    return parts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", choices=sorted(GPUS), help="GPU of the prediction (default: the one present, else h200)")
    parser.add_argument("--model-only", action="store_true", help="only the cost model, no tests or benchmarks")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, no install: the cost models and the strongest-peers part, on a CPU too")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled BPTT (aot_eager: no code generation, for a quick CPU check)")
    parser.add_argument("--wheels", default="wheels", help="folder of the carried peer wheels (see the docstring)")
    parser.add_argument("--budget", type=float, default=270.0, help="seconds for all the measured parts together")
    parser.add_argument("--strongest-peers", metavar="JSON", help="only time the strongest peers, write them to JSON")
    parser.add_argument("--out", default="bench/results", help="folder of gpu_report.md and the raw outputs")
    args = parser.parse_args(argv)
    if args.strongest_peers:
        return strongest_part(Path(args.strongest_peers), args.dry_run, args.compile_backend)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    gpu_key = args.gpu
    if gpu_key is None:
        present = torch.cuda.get_device_name().lower() if cuda else ""
        gpu_key = next((key for key in GPUS if key in present), "h200")
    shape, peer_shape = _tiny_shapes() if args.dry_run else (shape_args(), peer_shape_args())
    import triton

    header = [
        "# ztriton GPU report", "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch.__version__}, triton {triton.__version__}, Python "
        f"{platform.python_version()}; device: {torch.cuda.get_device_name() if cuda else 'none (cost model only)'}"
        f"{'; DRY RUN (tiny shapes)' if args.dry_run else ''}.",
        "",
    ]
    model = cost_model(device, GPUS[gpu_key], shape)
    costs = peer_costs(device, GPUS[gpu_key], peer_shape)
    sections = [model_markdown(model, shape), peer_markdown(costs, peer_shape)]
    (out / "cost_model.json").write_text(json.dumps({"layer": model, "peers": costs}, indent=2))
    for stale in ("layer.json", "peers.json", "strongest.json"):  # a failed part must not show an old run's figures
        (out / stale).unlink(missing_ok=True)
    py = sys.executable
    strongest = [py, "bench/gpu_report.py", "--strongest-peers", str(out / "strongest.json"),
                 "--compile-backend", args.compile_backend]
    if args.dry_run:  # the wiring of a GPU run, at tiny shapes: what can run without a GPU
        lines = ensure_peers(ROOT / args.wheels, dry_run=True)
        sections.append("## Peers\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
        part = run(strongest + ["--dry-run"], out, "strongest", 600)
        if (out / "strongest.json").exists():
            sections.append(strongest_markdown(json.loads((out / "strongest.json").read_text()), costs))
        sections.append(f"### strongest: exit {part['returncode']}, {part['seconds']:.0f} s\n\n`{part['command']}`\n")
    elif cuda and not args.model_only:
        lines = ensure_peers(ROOT / args.wheels)
        sections.append("## Peers\n\n" + "\n".join(f"- {line}" for line in lines) + "\n")
        commands = {
            "tests": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
                      "tests/test_device_work.py", "tests/test_rng.py"],
            "layer": [py, "bench/bench_layer.py", "--device", "cuda", "--events", "--json", str(out / "layer.json")],
            "strongest": strongest,
            "peers": [py, "bench/bench_peers.py", "--device", "cuda", "--json", str(out / "peers.json")],
            "kernels": [py, "bench/bench_kernels.py", "--quick", "--device", "cuda", "--out", str(out)],
        }
        parts = run_parts(commands, out, args.budget)
        layer = json.loads((out / "layer.json").read_text()) if (out / "layer.json").exists() else None
        peers = json.loads((out / "peers.json").read_text()) if (out / "peers.json").exists() else None
        sections.append(measured_markdown(model, layer, peers))
        if (out / "strongest.json").exists():
            sections.append(strongest_markdown(json.loads((out / "strongest.json").read_text()), costs))
        for name, part in parts.items():
            sections.append(f"### {name}: exit {part['returncode']}, {part['seconds']:.0f} s\n\n`{part['command']}`\n\n"
                            f"```\n{part['tail']}\n```\n")
    report = "\n".join(header + sections)
    (out / "gpu_report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
