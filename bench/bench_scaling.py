"""Scaling curves: step time and peak memory of one training step as T, the hidden width and the activity grow.

The step is `bench_peers.py`'s (700-H-H LIF, B 128, beta e^-0.2, soft reset, threshold 1, loss a
fixed random projection of the last layer's spike counts, the same weights and input for every
framework), built by its functions: ztriton (LocalZO normal, m 1, input as events, default
backend), ztriton recurrent (`SparseLIFLinear(recurrent=True)`), the package's autograd BPTT
(`ztriton.bptt`, dense normal surrogate; feed-forward and recurrent), snntorch (`Leaky`, its
current one GEMM over all T before the per-step loop, layer by layer) and spikingjelly (multi-step
`LIFNode`). Four axes around the base point (T 300, width 200, input density 2 %, delta 0.05):

- T: 100, 300, 1000, 2000;  width: 128, 256, 512, 1024, 2048, 4096 (700-H-H);  input density:
  0.5, 2, 10 % (ztriton, the BPTT and the peers, feed-forward);
- delta: 0.01, 0.05, 0.2 (ztriton only: it sets the active set; no peer's cost depends on it).

Each point runs in its own process (`--child`), which builds the network, runs a tiny step to load
the libraries (numba's JIT cache, lazy imports), then one full warm-up step and up to --repeats
timed steps (medians; min and max kept); it stops adding steps once they have taken --point-budget
seconds (at least two where the time cap allows). Caps: --time-cap seconds of wall clock per
point (the process is killed there: status "time cap"; if only the warm-up step fit, its time is
kept, flagged "first step only"), and --memory-cap-mib of resident-set growth (a watchdog thread
polls the RSS every 10 ms and ends the process above it: status "memory cap"; an address-space
limit of twice the cap plus 1 GiB backs it up). Along an axis, a framework that hit a cap is not run at the
larger values (recorded "time cap" / "memory cap", note "not run"). A point with the same shape
on two axes (the base point) is measured once.

Peak memory: the growth of the child's peak resident set (VmHWM, reset through
/proc/self/clear_refs after the warm-up-of-libraries step) over its resident set at that moment,
across the full steps: the step's working memory above the weights and the input, allocator
caches included (tracemalloc cannot see torch's allocator).

Writes <out>/<name>.csv and <name>.png (log-log, time and memory per axis), prints the tables,
the fitted growth (least-squares slope of log step time / log peak memory against the log of the
axis' value) and, when the grid has it, the issue's goal point (width 1024, T 300, B 128).

    python bench/bench_scaling.py                 # the full grid (estimated 20-25 minutes on 2 idle cores)
    python bench/bench_scaling.py --quick         # a tiny grid (seconds per point; the tests use it)
    python bench/bench_scaling.py --axes width --frameworks ztriton,snntorch
    python bench/bench_scaling.py --axes width --values 1024 --time-cap 240   # the issue's goal point alone
    python bench/bench_scaling.py --from-csv bench/results/scaling.csv        # tables, fits, plot of a CSV

On a machine that other processes load, --threads 1 (torch's and the native backend's threads):
with more threads than free cores the thread pools wait on each other and the peers slow down most.
"""

from __future__ import annotations

import argparse
import csv
import gc
import importlib.util
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
MEMORY_EXIT = 86  # the child's exit status when its watchdog stopped it
RESULT = "RESULT "  # prefix of the child's one result line
FRAMEWORKS = ("ztriton", "ztriton-recurrent", "bptt", "bptt-recurrent", "snntorch", "spikingjelly")
PEERS = ("snntorch", "spikingjelly")
AXES = {"width": "hidden", "T": "steps", "input density": "input_rate", "delta": "delta"}
FIELDS = ("axis", "framework", "steps", "batch", "inputs", "hidden", "layers", "input_rate", "delta", "status", "note",
          "step_ms", "step_ms_min", "step_ms_max", "forward_ms", "backward_ms", "timed_steps", "peak_mib",
          "spike_rate", "active_pct", "wall_s", "load_1min")
SHAPE = ("steps", "batch", "inputs", "hidden", "layers", "input_rate", "delta")

FULL = {
    "base": {"steps": 300, "batch": 128, "inputs": 700, "hidden": 200, "layers": 2, "input_rate": 0.02, "delta": 0.05},
    "T": ((100, 300, 1000, 2000), FRAMEWORKS),
    "width": ((128, 256, 512, 1024, 2048, 4096), FRAMEWORKS),
    "input density": ((0.005, 0.02, 0.1), ("ztriton", "bptt", "snntorch", "spikingjelly")),
    "delta": ((0.01, 0.05, 0.2), ("ztriton", "ztriton-recurrent")),
}
QUICK = {
    "base": {"steps": 12, "batch": 4, "inputs": 30, "hidden": 16, "layers": 2, "input_rate": 0.1, "delta": 0.05},
    "T": ((8, 16), FRAMEWORKS),
    "width": ((16, 32), FRAMEWORKS),
    "input density": ((0.05, 0.2), ("ztriton", "bptt", "snntorch", "spikingjelly")),
    "delta": ((0.05, 0.2), ("ztriton", "ztriton-recurrent")),
}
#: the issue's goal point: ztriton >= 10x the best peer in time, <= 25 % of its peak memory
GOAL = {"steps": 300, "batch": 128, "inputs": 700, "hidden": 1024, "layers": 2}


def grid(spec: dict, axes=None, frameworks=None, values=None) -> list[dict]:
    """The points of a grid spec (FULL or QUICK): one dict per (axis, value, framework), ordered by axis,
    then value, then framework (the frameworks of one value run one after another); `axes`,
    `frameworks` and `values` (of the axes' variable) keep only those."""
    axes = list(AXES) if axes is None else list(axes)
    for axis in axes:
        if axis not in AXES:
            raise ValueError(f"axes must be among {', '.join(AXES)}, got {axis!r}")
    for name in frameworks or ():
        if name not in FRAMEWORKS:
            raise ValueError(f"frameworks must be among {', '.join(FRAMEWORKS)}, got {name!r}")
    points = []
    for axis in axes:
        axis_values, names = spec[axis]
        for value in axis_values:
            if values is not None and value not in values:
                continue
            for name in names:
                if frameworks is None or name in frameworks:
                    points.append({**spec["base"], AXES[axis]: value, "axis": axis, "framework": name})
    return points


# ---------------------------------------------------------------- the child: one point in its own process

def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _emit(result: dict) -> None:
    sys.stdout.write(RESULT + json.dumps(result) + "\n")
    sys.stdout.flush()


def _watchdog(baseline: int, cap: int, stop: threading.Event) -> None:
    """Poll the RSS every 10 ms; above baseline + cap, report a memory cap and end the process."""
    from bench_layer import rss_bytes  # measure() put bench/ on the path

    while not stop.wait(0.01):
        grown = rss_bytes() - baseline
        if grown > cap:
            _emit({"status": "memory cap", "note": f"RSS grew {grown / 2**20:.0f} MiB", "peak_mib": grown / 2**20})
            os._exit(MEMORY_EXIT)


def _network(point: dict, seed: int):
    """(forward, params, input, projection) of `point`'s framework, from bench_peers' builders."""
    sys.path.insert(0, str(HERE))
    import bench_peers
    import torch

    name = point["framework"]
    recurrent = name.endswith("-recurrent")
    base = name.removesuffix("-recurrent")
    shape = argparse.Namespace(seed=seed, inputs=point["inputs"], hidden=point["hidden"], layers=point["layers"],
                               gain=4.0, recurrent=recurrent, recurrent_gain=1.0)
    weights = bench_peers.make_weights(shape)
    gen = torch.Generator().manual_seed(seed + 1)
    x = (torch.rand(point["steps"], point["batch"], point["inputs"], generator=gen) < point["input_rate"]).float()
    projection = torch.randn(point["batch"], point["hidden"], generator=gen)
    beta = math.exp(-0.2)
    if base == "ztriton":
        net, layers = bench_peers.ztriton_net(weights, beta, point["delta"])
        return net, list(net.parameters()), x.to_sparse(), projection, layers
    if base == "bptt":
        net = bench_peers.bptt_net(weights, beta, point["delta"])
        return net, list(net.parameters()), x, projection, None
    if importlib.util.find_spec(base) is None:
        raise ModuleNotFoundError(f"{base} is not installed (pip install -e '.[bench]' && pip install --no-deps "
                                  "spikingjelly)")
    builder = bench_peers.snntorch_net if base == "snntorch" else bench_peers.spikingjelly_net
    forward, module = builder(weights, beta)
    return forward, list(module.parameters()), x, projection, None


def measure(point: dict, *, memory_cap_mib: float, deadline: float, repeats: int, point_budget: float,
            threads: int, seed: int = 0) -> dict:
    """Time one point in this process (see the module docstring); `deadline` is a time.time() by which
    the last timed step must end. Returns the result's fields (status "ok" or "time cap")."""
    import torch

    sys.path.insert(0, str(HERE))
    import bench_peers
    from bench_layer import rss_bytes, status_bytes

    torch.set_num_threads(threads)
    forward, params, inputs, projection, layers = _network(point, seed)
    small = inputs.to_dense()[:4, :2] if inputs.is_sparse else inputs[:4, :2]
    with warnings.catch_warnings():  # load the libraries; a 4-step batch of 2 may not make a layer fire
        warnings.simplefilter("ignore")
        bench_peers.timed_step(forward, params, small.to_sparse() if inputs.is_sparse else small, projection[:2])
    gc.collect()
    _reset_peak()
    baseline = rss_bytes()
    cap = int(memory_cap_mib * 2**20)
    stop = threading.Event()
    threading.Thread(target=_watchdog, args=(baseline, cap, stop), daemon=True).start()
    # the backstop: address space for twice the cap, plus 1 GiB for thread stacks and malloc arenas
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    backstop = status_bytes("VmSize") + 2 * cap + 2**30
    if hard == resource.RLIM_INFINITY or backstop < hard:
        resource.setrlimit(resource.RLIMIT_AS, (backstop, hard))
    try:
        first = bench_peers.timed_step(forward, params, inputs, projection)
        spike_rate = float(first[2].float().mean())
        first = first[:2]  # no step's output outlives it: the peak is one step's
        timed = []
        last = sum(first)
        while len(timed) < repeats and (len(timed) < 2 or sum(map(sum, timed)) < point_budget) \
                and time.time() + 1.2 * last < deadline:
            fwd, bwd = bench_peers.timed_step(forward, params, inputs, projection)[:2]
            timed.append((fwd, bwd))
            last = fwd + bwd
    except (MemoryError, RuntimeError) as err:  # the address-space backstop: an allocation refused
        if isinstance(err, RuntimeError) and "alloc" not in str(err).lower():
            raise
        stop.set()
        return {"status": "memory cap", "note": f"allocation refused: {str(err).splitlines()[0][:80]}",
                "peak_mib": (status_bytes("VmHWM") - baseline) / 2**20}
    stop.set()
    peak = (status_bytes("VmHWM") - baseline) / 2**20
    result = {"peak_mib": peak, "spike_rate": spike_rate}
    if layers is not None:
        result["active_pct"] = 100 * statistics.fmean(layer.stats["active_fraction"] for layer in layers)
    if not timed:  # only the warm-up step fit under the cap
        return {**result, "status": "time cap", "note": "first step only", "timed_steps": 0,
                "step_ms": 1e3 * sum(first), "forward_ms": 1e3 * first[0], "backward_ms": 1e3 * first[1]}
    steps = [f + b for f, b in timed]
    return {**result, "status": "ok", "note": "", "timed_steps": len(timed), "step_ms": 1e3 * statistics.median(steps),
            "step_ms_min": 1e3 * min(steps), "step_ms_max": 1e3 * max(steps),
            "forward_ms": 1e3 * statistics.median(f for f, _ in timed),
            "backward_ms": 1e3 * statistics.median(b for _, b in timed)}


def _child(spec: str) -> None:
    job = json.loads(spec)
    try:
        result = measure(job["point"], **job["options"])
    except ModuleNotFoundError as err:
        result = {"status": "skipped", "note": str(err)}
    _emit(result)


# ---------------------------------------------------------------- the parent: the sweep

def run_point(point: dict, *, time_cap: float, memory_cap_mib: float, repeats: int, point_budget: float,
              threads: int, seed: int = 0) -> dict:
    """One point in a fresh process under the caps; returns its CSV row (every field of FIELDS)."""
    start = time.time()
    load = os.getloadavg()[0]
    options = {"memory_cap_mib": memory_cap_mib, "deadline": start + time_cap, "repeats": repeats,
               "point_budget": point_budget, "threads": threads, "seed": seed}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps({"point": point, "options": options})]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=time_cap)
        lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
        if lines:
            result = json.loads(lines[-1][len(RESULT):])
        else:
            tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
            result = {"status": "error", "note": tail[:200]}
    except subprocess.TimeoutExpired:
        result = {"status": "time cap", "note": f"killed after {time_cap:g} s"}
    row = {field: "" for field in FIELDS}
    row.update({key: point[key] for key in ("axis", "framework", *SHAPE)})
    row.update(result)
    row["wall_s"] = round(time.time() - start, 2)
    row["load_1min"] = round(load, 2)
    return row


def capped_row(point: dict, status: str) -> dict:
    """The row of a point not run because a smaller value of its axis exceeded `status`'s cap."""
    row = {field: "" for field in FIELDS}
    row.update({key: point[key] for key in ("axis", "framework", *SHAPE)})
    row.update({"status": status, "note": "not run: a smaller value exceeded the cap"})
    return row


def sweep(points: list[dict], log=print, csv_path: Path | None = None, **options) -> list[dict]:
    """Every point through `run_point`; the base point measured once (its row copied to each axis), and a
    framework that hit a cap along an axis recorded as capped, not run, at that axis' larger values.
    With `csv_path`, the rows so far are written there after every point (an interrupted sweep keeps them)."""
    rows, measured, capped = [], {}, {}
    for number, point in enumerate(points, 1):
        key = (point["framework"], *(point[k] for k in SHAPE))
        lane = (point["axis"], point["framework"])
        if lane in capped:
            row = capped_row(point, capped[lane])
        elif key in measured:
            row = {**measured[key], "axis": point["axis"]}
        else:
            row = run_point(point, **options)
            measured[key] = row
        if row["status"] in ("time cap", "memory cap"):
            capped[lane] = row["status"]
        rows.append(row)
        if csv_path is not None:
            write_csv(rows, csv_path)
        log(f"[{number}/{len(points)}] {point['axis']} {AXES[point['axis']]}={point[AXES[point['axis']]]} "
            f"{point['framework']}: {row['status']} {_ms(row)} {_mib(row)} ({row['wall_s'] or 0:.0f} s, "
            f"load {row['load_1min'] or '-'}) {row['note']}")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({field: row.get(field, "") for field in FIELDS})


def read_csv(path: Path) -> list[dict]:
    """Rows of a CSV written by `write_csv`, numbers as floats (empty fields as None)."""
    out = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            parsed = {}
            for key, value in row.items():
                if key in ("axis", "framework", "status", "note"):
                    parsed[key] = value
                else:
                    parsed[key] = float(value) if value != "" else None
            out.append(parsed)
    return out


def fit_slope(xs, ys) -> float | None:
    """Least-squares slope of log y against log x (the exponent of y ~ x^k); None below two distinct x."""
    pairs = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x and y and x > 0 and y > 0]
    if len({px for px, _ in pairs}) < 2:
        return None
    mx = statistics.fmean(px for px, _ in pairs)
    my = statistics.fmean(py for _, py in pairs)
    return sum((px - mx) * (py - my) for px, py in pairs) / sum((px - mx) ** 2 for px, _ in pairs)


def _lane(rows, axis, framework, field):
    """(values, field) of the measured ('ok') rows of one axis and framework, in the axis' order."""
    key = AXES[axis]
    got = [(float(r[key]), float(r[field])) for r in rows
           if r["axis"] == axis and r["framework"] == framework and r["status"] == "ok" and r[field] not in ("", None)]
    return sorted(got)


def fits(rows: list[dict]) -> dict:
    """{(axis, framework): {"time": slope, "memory": slope, "points": n}} over the measured rows."""
    out = {}
    for axis in AXES:
        for framework in FRAMEWORKS:
            time_lane = _lane(rows, axis, framework, "step_ms")
            if not time_lane:
                continue
            memory_lane = _lane(rows, axis, framework, "peak_mib")
            out[(axis, framework)] = {"time": fit_slope(*zip(*time_lane)),
                                      "memory": fit_slope(*zip(*memory_lane)) if memory_lane else None,
                                      "points": len(time_lane)}
    return out


def _ms(row) -> str:
    return "" if row.get("step_ms") in ("", None) else f"{float(row['step_ms']):.1f} ms"


def _mib(row) -> str:
    return "" if row.get("peak_mib") in ("", None) else f"{float(row['peak_mib']):.0f} MiB"


def _cell(row) -> str:
    if row["status"] == "ok":
        return f"{float(row['step_ms']):.0f} / {float(row['peak_mib']):.0f}"
    if row["status"] == "time cap" and row.get("step_ms") not in ("", None):
        return f">cap ({float(row['step_ms']):.0f})"
    return {"time cap": "time cap", "memory cap": "mem cap"}.get(row["status"], row["status"])


def tables(rows: list[dict]) -> str:
    """Per axis: step ms / peak MiB of each framework at each value, then the fitted exponents."""
    lines = []
    slopes = fits(rows)
    for axis, key in AXES.items():
        on_axis = [r for r in rows if r["axis"] == axis]
        if not on_axis:
            continue
        values = sorted({float(r[key]) for r in on_axis})
        names = [f for f in FRAMEWORKS if any(r["framework"] == f for r in on_axis)]
        lines += [f"{axis} ({key}): step ms / peak MiB", "| framework | " + " | ".join(f"{v:g}" for v in values)
                  + " | time ~ x^k | memory ~ x^k |", "|---" * (len(values) + 3) + "|"]
        for name in names:
            cells = []
            for v in values:
                match = [r for r in on_axis if r["framework"] == name and float(r[key]) == v]
                cells.append(_cell(match[0]) if match else "")
            fit = slopes.get((axis, name), {})
            k_time = "-" if fit.get("time") is None else f"{fit['time']:.2f}"
            k_mem = "-" if fit.get("memory") is None else f"{fit['memory']:.2f}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {k_time} | {k_mem} |")
        lines.append("")
    return "\n".join(lines)


def goal(rows: list[dict]) -> str | None:
    """ztriton against the best peer at the goal point (width 1024, T 300, B 128), if the sweep measured it."""
    at = [r for r in rows if all(float(r[k]) == v for k, v in GOAL.items()) and r["status"] == "ok"
          and r["axis"] == "width"]
    engine = [r for r in at if r["framework"] == "ztriton"]
    peers = [r for r in at if r["framework"] in PEERS]
    if not engine or not peers:
        return None
    engine, best = engine[0], min(peers, key=lambda r: float(r["step_ms"]))
    smallest = min(peers, key=lambda r: float(r["peak_mib"]))
    return (f"goal point 700-1024-1024, T 300, B 128: ztriton {float(engine['step_ms']):.0f} ms, "
            f"{float(engine['peak_mib']):.0f} MiB; best peer {best['framework']} {float(best['step_ms']):.0f} ms, "
            f"{float(best['peak_mib']):.0f} MiB: {float(best['step_ms']) / float(engine['step_ms']):.2f}x its time "
            f"(goal >= 10x), {100 * float(engine['peak_mib']) / float(best['peak_mib']):.0f} % of its peak memory "
            f"(goal <= 25 %; {100 * float(engine['peak_mib']) / float(smallest['peak_mib']):.0f} % of the smallest "
            f"peer peak, {smallest['framework']})")


def plot(rows: list[dict], path: Path) -> None:
    """Log-log step time (top) and peak memory (bottom) per axis; capped points marked at their last value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    axes_present = [a for a in AXES if any(r["axis"] == a for r in rows)]
    fig, grid_axes = plt.subplots(2, len(axes_present), figsize=(4.2 * len(axes_present), 7.5), squeeze=False)
    colours = dict(zip(FRAMEWORKS, ("C0", "C1", "C2", "C3", "C4", "C5")))
    for column, axis in enumerate(axes_present):
        key = AXES[axis]
        for name in FRAMEWORKS:
            mine = sorted((r for r in rows if r["axis"] == axis and r["framework"] == name), key=lambda r: float(r[key]))
            if not mine:
                continue
            for row_number, field in enumerate(("step_ms", "peak_mib")):
                ax = grid_axes[row_number][column]
                lane = _lane(rows, axis, name, field)
                style = "--" if name.endswith("-recurrent") else "-"
                if lane:
                    ax.plot(*zip(*lane), style, marker="o", color=colours[name], label=name, markersize=4)
                over = [(float(r[key]), float(r[field])) for r in mine
                        if r["status"] != "ok" and r.get(field) not in ("", None)]
                if over:  # a time cap after one step, or the RSS at which the watchdog stopped it
                    ax.plot(*zip(*over), "^", color=colours[name], markersize=8, markerfacecolor="none")
        for row_number, label in enumerate(("step ms", "peak MiB (RSS growth)")):
            ax = grid_axes[row_number][column]
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            ax.set_xlabel(f"{axis} ({key})")
            ax.set_ylabel(label)
            ax.grid(True, which="both", alpha=0.3)
    grid_axes[0][0].legend(fontsize=8)
    fig.suptitle("one training step per point, each in its own process; open triangles: over a cap", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command_line(args) -> str:
    """The command that reproduces this sweep exactly."""
    parts = ["python bench/bench_scaling.py"] + (["--quick"] if args.quick else [])
    parts += [f"--time-cap {args.time_cap:g}", f"--memory-cap-mib {args.memory_cap_mib:g}", f"--repeats {args.repeats}",
              f"--point-budget {args.point_budget:g}", f"--threads {args.threads}", f"--seed {args.seed}",
              f"--out {args.out}", f"--name {args.name}"]
    if args.axes:
        parts.append(f"--axes '{args.axes}'")
    if args.frameworks:
        parts.append(f"--frameworks {args.frameworks}")
    if args.values:
        parts.append(f"--values {args.values}")
    return " ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the tiny grid (for tests)")
    parser.add_argument("--axes", help=f"comma-separated subset of: {', '.join(AXES)}")
    parser.add_argument("--frameworks", help=f"comma-separated subset of: {', '.join(FRAMEWORKS)}")
    parser.add_argument("--values", help="comma-separated values of the axes' variable to keep (e.g. 1024)")
    parser.add_argument("--time-cap", type=float, default=60.0, help="wall seconds per point, process start included")
    parser.add_argument("--memory-cap-mib", type=float, default=5120.0, help="resident-set growth per point")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per point (after one warm-up step)")
    parser.add_argument("--point-budget", type=float, default=15.0,
                        help="stop adding timed steps once they took this many seconds (at least two)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--name", help="file stem of the CSV and PNG (default scaling, or scaling_quick)")
    parser.add_argument("--from-csv", help="only print the tables and fits of this CSV and redraw its PNG beside it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return _child(args.child)
    for name in ("time_cap", "memory_cap_mib", "point_budget"):
        if getattr(args, name) <= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {getattr(args, name)}")
    if args.repeats < 1 or args.threads < 1:
        raise ValueError("--repeats and --threads must be >= 1")
    if args.from_csv:  # the tables, fits and plot of an earlier (or interrupted) sweep
        rows = read_csv(Path(args.from_csv))
        plot(rows, Path(args.from_csv).with_suffix(".png"))
        print(tables(rows))
        summary = goal(rows)
        if summary:
            print(summary)
        return rows
    args.name = args.name or ("scaling_quick" if args.quick else "scaling")
    axes = args.axes.split(",") if args.axes else None
    frameworks = args.frameworks.split(",") if args.frameworks else None
    values = [float(v) for v in args.values.split(",")] if args.values else None
    points = grid(QUICK if args.quick else FULL, axes, frameworks, values)
    print(f"{len(points)} points; caps: {args.time_cap:g} s wall and {args.memory_cap_mib:g} MiB RSS growth per point; "
          f"{args.threads} threads; load {os.getloadavg()[0]:.2f}")
    print("reproduce: " + command_line(args))
    start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = sweep(points, csv_path=out / f"{args.name}.csv", time_cap=args.time_cap, memory_cap_mib=args.memory_cap_mib,
                 repeats=args.repeats, point_budget=args.point_budget, threads=args.threads, seed=args.seed)
    plot(rows, out / f"{args.name}.png")
    loads = [float(r["load_1min"]) for r in rows if r["load_1min"] not in ("", None)]
    print(f"\nsweep: {time.time() - start:.0f} s, load (1 min) {min(loads, default=0):.2f}-{max(loads, default=0):.2f}; "
          f"wrote {out / args.name}.csv and .png\n")
    print(tables(rows))
    summary = goal(rows)
    if summary:
        print(summary)
    print("reproduce: " + command_line(args))
    return rows


if __name__ == "__main__":
    main()
