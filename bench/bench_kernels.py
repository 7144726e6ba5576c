"""Kernel microbenchmark: sparse weight gradient vs dense GEMM vs torch.sparse, over activity.

For each of the paper's shapes (T 100/300/500, B 256, N_in 784/1156/700, N_out 200) and activities
0.1 % .. 50 %, times the weight gradient of one layer from the same ds and input:

- dense:        reverse-time filter of ds on the full grid, then D^T X (cuBLAS / MKL GEMM)
- torch-sparse: the input trace, then a CSR (N_out x T*B) @ trace product (torch.sparse)
- engine-torch: the engine's torch sparse path (trace chunks gathered at the active rows)
- triton:       the CSR-by-neuron Triton kernel, trace rebuilt in-kernel from checkpoints (GPU only)

and the fused LIF + LocalZO forward against the time to read the current and write the spikes at
the device's copy bandwidth (GPU only). Prints a summary table with the crossover activity (where
the best sparse method stops beating dense), writes a CSV and a log-log plot.

    python bench/bench_kernels.py                 # GPU: all methods; CPU: torch paths only
    python bench/bench_kernels.py --quick         # one shape, fewer points
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import time
import warnings
from pathlib import Path

import torch

from ztriton.backends.time_filter import reverse_filter_
from ztriton.backends.weight_grad import sparse_weight_grad
from ztriton.sparse import ActiveSet
from ztriton.scheduler import crossover_density

SHAPES = [(100, 256, 784, 200), (300, 256, 1156, 200), (500, 256, 700, 200)]
DENSITIES = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 0.5]
BETA = math.exp(-0.1)


def timer(device):
    """Median wall time of a callable in ms (CUDA-synchronised on a GPU)."""

    def run(fn, repeats):
        fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return 1e3 * statistics.median(times)

    return run


def case(shape, density, device, gen):
    steps, batch, n_in, n_out = shape
    x = (torch.rand(steps, batch, n_in, generator=gen, device=device) < 0.02).float()
    keep = torch.rand(steps * batch * n_out, generator=gen, device=device) < density
    index = torch.nonzero(keep).squeeze(1)
    ds = torch.randn(index.numel(), generator=gen, device=device)
    return x, ActiveSet(index, torch.ones_like(ds), torch.Size((steps, batch, n_out))), ds


def methods(x, active, ds, n_out, device):
    steps, batch, n_in = x.shape

    def dense():
        grid = torch.zeros(active.shape, device=device)
        grid.view(-1).index_copy_(0, active.index, ds)
        d = reverse_filter_(grid, BETA) if device.type == "cpu" else _triton_filter(grid, reverse=True)
        return d.view(-1, n_out).t() @ x.view(-1, n_in)

    def torch_sparse():
        trace = reverse_free_trace(x)
        neurons = active.neurons
        order = torch.sort(neurons, stable=True).indices
        crow = torch.zeros(n_out + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.cumsum(torch.bincount(neurons, minlength=n_out), 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
            matrix = torch.sparse_csr_tensor(crow, active.rows[order], ds[order], (n_out, steps * batch),
                                             check_invariants=False)
        return matrix @ trace.view(-1, n_in)

    def reverse_free_trace(src):
        if device.type == "cuda":
            return _triton_filter(src, reverse=False)
        out = src.clone()
        for t in range(1, steps):
            out[t].add_(out[t - 1], alpha=BETA)
        return out

    out = {"dense": dense, "torch-sparse": torch_sparse}
    if device.type == "cpu":
        out["engine-torch"] = lambda: sparse_weight_grad(ds, active, x, BETA, torch.Size((n_out, n_in)))
    else:
        from ztriton.kernels.sparse_weight_grad import sparse_weight_grad as triton_weight_grad

        def triton():
            return triton_weight_grad(x, ds, active.rows, active.neurons, n_out, BETA)[0]

        out["triton"] = triton
    return out


def _triton_filter(src, reverse):
    from ztriton.kernels.time_filter import time_filter

    return time_filter(src, BETA, reverse=reverse)


def forward_bandwidth(device, run, repeats):
    """Fused forward time vs reading I and writing the spikes at copy bandwidth (T 500, B 256, N 200)."""
    from ztriton.kernels.lif_forward import LOCALZO, lif_forward

    current = torch.randn(500, 256, 200, device=device)
    fused = run(lambda: lif_forward(current, 0.82, 1.0, mode=LOCALZO, delta=0.05, seed=1), repeats)
    copy = run(lambda: torch.empty_like(current).copy_(current), repeats)
    # the fused kernel reads I and writes the spikes (and a compact set of ~1 %): what a copy moves
    return fused, copy


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only the SHD shape and 4 activities")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="bench/results", help="folder for kernels.csv and kernels.png")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    run = timer(device)
    shapes = SHAPES[-1:] if args.quick else SHAPES
    densities = [0.001, 0.01, 0.1, 0.5] if args.quick else DENSITIES
    if device.type == "cpu":
        print("no GPU: timing the torch paths only (dense GEMM, torch.sparse, the engine's torch path)")
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in shapes:
        for density in densities:
            x, active, ds = case(shape, density, device, gen)
            for name, fn in methods(x, active, ds, shape[3], device).items():
                rows.append({"T": shape[0], "B": shape[1], "N_in": shape[2], "N_out": shape[3],
                             "density": active.fraction, "method": name, "ms": run(fn, args.repeats)})
                print(f"T={shape[0]:4d} N_in={shape[2]:5d} active {100 * active.fraction:7.3f} %  {name:<13}{rows[-1]['ms']:10.2f} ms")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"\n{'shape':<22}{'best sparse':<14}{'crossover %':>12}{'x dense @0.1%':>15}{'x dense @1%':>13}")
    for shape in shapes:
        sel = [r for r in rows if (r["T"], r["N_in"]) == (shape[0], shape[2])]
        sparse_names = sorted({r["method"] for r in sel} - {"dense"})
        best = min(sparse_names, key=lambda m: sum(r["ms"] for r in sel if r["method"] == m))
        dense = [r["ms"] for r in sel if r["method"] == "dense"]
        fast = [r["ms"] for r in sel if r["method"] == best]
        fractions = [r["density"] for r in sel if r["method"] == "dense"]
        cross = crossover_density(fractions, dense, fast)
        ratios = {d: dense[i] / fast[i] for i, d in enumerate(densities)}
        label = f"T{shape[0]} B{shape[1]} {shape[2]}->{shape[3]}"
        print(f"{label:<22}{best:<14}{100 * cross:12.2f}{ratios.get(0.001, float('nan')):15.1f}{ratios.get(0.01, float('nan')):13.1f}")
    if device.type == "cuda":
        fused, floor = forward_bandwidth(device, run, args.repeats)
        print(f"fused LIF + LocalZO forward (T500 B256 N200): {fused:.3f} ms; memory-bandwidth floor {floor:.3f} ms; "
              f"ratio {fused / floor:.2f}")
    _plot(rows, shapes, out / "kernels.png")
    print(f"wrote {out / 'kernels.csv'} and {out / 'kernels.png'}")


def _plot(rows, shapes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        sel = [r for r in rows if (r["T"], r["N_in"]) == (shape[0], shape[2])]
        for name in sorted({r["method"] for r in sel}):
            pts = [(r["density"], r["ms"]) for r in sel if r["method"] == name]
            ax.loglog([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set(title=f"T{shape[0]} B{shape[1]} {shape[2]}->{shape[3]}", xlabel="active %", ylabel="weight grad ms")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
