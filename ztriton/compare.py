"""`ztriton compare`: the paper's Table 3 for a data set -- surrogate, SparseGrad and LocalZO trained
with the same recipe (that of `ztriton train`) over several seeds.

Rows: the dense surrogate (the reference without truncation), SparseGrad with its B_th matched to
LocalZO's (eq. 21, as the paper does) and LocalZO (normal, m 1). Columns: held-out accuracy (mean
and standard deviation over seeds), the backward and overall speedup of the row's own path over
the engine's dense path on the same weights and batch (logged during training; 1.0 for the
surrogate, whose every entry is active), the active fraction, and the step time of a plain autograd
BPTT of the same network over the row's mean step time. Every run trains the configured network:
its hidden sizes, recurrence, reset and learnable leak and threshold (`network`).
"""

from __future__ import annotations

import json
import math
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from .train import Config, load_data, snn_reference, train

METHODS = ("surrogate", "sparsegrad", "localzo")
#: the Config fields that make the network every method trains
NETWORK = ("hidden", "recurrent", "reset", "learn_beta", "learn_threshold")


def network(cfg: Config) -> str:
    """The network in words, e.g. "hidden 200r-200r, reset zero, learned leak": sizes (r: recurrent),
    then what differs from a fixed-leak, fixed-threshold, subtractive-reset LIF."""
    words = ["hidden " + "-".join(f"{size}{'r' if cfg.recurrent else ''}" for size in cfg.hidden)]
    if cfg.reset != "subtract":
        words.append(f"reset {cfg.reset}")
    if cfg.learn_beta:
        words.append("learned leak")
    if cfg.learn_threshold:
        words.append("learned threshold")
    return ", ".join(words)


def bptt_step_seconds(cfg: Config, train_data, repeats: int = 3) -> float:
    """Median seconds of one forward + backward of the autograd BPTT of the configured network
    (`ztriton.train.snn_reference`: the SNN's sizes, law and initial weights for cfg.seed, the dense
    surrogate, the autograd readout) on a batch of dense input, cross-entropy of its logits."""
    torch.manual_seed(cfg.seed)
    model = snn_reference(train_data.inputs, train_data.classes, cfg)
    x, y = train_data.batch(torch.arange(min(cfg.batch_size, len(train_data))))
    x = x.to_dense() if x.is_sparse else x
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        logits, _ = model(x)
        nn.functional.cross_entropy(logits, y).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def compare(base: Config, seeds: int, out: Path, progress: bool = False) -> list[dict]:
    """Train every method for `seeds` seeds (base.seed, base.seed + 1, ...); write table.json and table.md."""
    from .distributions import resolve

    base = base.resolved()
    out.mkdir(parents=True, exist_ok=False)
    train_data, _ = load_data(base)
    steps_per_epoch = math.ceil(len(train_data) / base.batch_size)
    bptt_s = bptt_step_seconds(base, train_data)
    bth = resolve(base.dist, base.delta).backprop_threshold(base.delta, base.m)  # SparseGrad matched to LocalZO
    rows = []
    for method in METHODS:
        accuracies, backward, overall, active, step_s = [], [], [], [], []
        for offset in range(seeds):
            cfg = replace(base, grad=method, seed=base.seed + offset, bth=bth if method == "sparsegrad" else None)
            run_dir = out / f"{method}-seed{cfg.seed}"
            summary = train(cfg, run_dir, progress=progress)
            epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            accuracies.append(summary["test_accuracy"])
            step_s.append(sum(e["forward_s"] + e["backward_s"] for e in epochs) / (len(epochs) * steps_per_epoch))
            active.append(statistics.mean(summary["active_fraction"]))
            if method != "surrogate" and summary["backward_speedup"] is not None:
                backward.append(summary["backward_speedup"])
                overall.append(summary["overall_speedup"])
        mean_step = statistics.mean(step_s)
        rows.append({
            "method": method,
            "test_accuracy_mean": statistics.mean(accuracies),
            "test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
            "backward_speedup": 1.0 if method == "surrogate" else (statistics.median(backward) if backward else None),
            "overall_speedup": 1.0 if method == "surrogate" else (statistics.median(overall) if overall else None),
            "active_fraction": statistics.mean(active),
            "step_s": mean_step,
            "speedup_vs_bptt": bptt_s / mean_step,
        })
    (out / "table.json").write_text(json.dumps({"dataset": base.dataset, "seeds": seeds, "epochs": base.epochs,
                                                "network": {name: getattr(base, name) for name in NETWORK},
                                                "bptt_step_s": bptt_s, "rows": rows}, indent=2))
    (out / "table.md").write_text(markdown(rows, base, seeds))
    return rows


def markdown(rows: list[dict], cfg: Config, seeds: int) -> str:
    def ratio(value):
        return "-" if value is None else f"{value:.2f}x"

    lines = [f"{cfg.dataset}, {network(cfg)}, {cfg.epochs} epochs, {seeds} seeds, delta {cfg.delta}, "
             f"{cfg.dist} (m {cfg.m})", "",
             "| method | test accuracy % | backward x dense | overall x dense | active % | step x BPTT |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {100 * row['test_accuracy_mean']:.2f} +- {100 * row['test_accuracy_std']:.2f} "
                     f"| {ratio(row['backward_speedup'])} | {ratio(row['overall_speedup'])} "
                     f"| {100 * row['active_fraction']:.3f} | {row['speedup_vs_bptt']:.2f}x |")
    return "\n".join(lines) + "\n"
