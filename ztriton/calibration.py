"""Measure the dense/sparse crossover of a device and backend for `path="auto"` (`ztriton calibrate`).

`calibrate()` times the dense and the sparse backward of a SparseLIFLinear over a range of
activities -- each timing repeated, dense and sparse interleaved, medians kept with their spread
-- and stores the activity where the isotonic fit of log(sparse / dense) crosses 0
(`scheduler.crossover_density`) in the calibration file the scheduler reads.
"""

from __future__ import annotations

import json
import math
import statistics
import time

import torch

from .backends.lif_forward import lif_recurrence
from .layers import SparseLIFLinear
from .scheduler import DEFAULT_SCHEDULER, calibration_file, crossover_density, device_key


def _time_backward(layer, x, grad) -> float:
    """Seconds of one backward of `layer` on `x` (a fresh forward before it, untimed)."""
    layer.weight.grad = None
    spikes = layer(x)
    start = time.perf_counter()
    spikes.backward(grad)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - start


def calibrate(
    device: torch.device | str = "cpu",
    *,
    backend: str = "auto",
    steps: int = 100,
    batch: int = 128,
    n_in: int = 200,
    n_out: int = 200,
    fractions: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    repeats: int = 7,
    save: bool = True,
) -> dict:
    """Time the dense and sparse backward over `fractions` of active entries; store the crossover.

    The activity is set through SparseGrad's B_th (quantiles of |v| of a fixed input). Each
    activity gets one warm-up and `repeats` timed backwards per path, dense and sparse alternating.
    Returns the entry written: {"crossover", "fractions", "dense_s", "sparse_s", "dense_spread",
    "sparse_spread" (interquartile ranges), "shape", "repeats", "backend"}.
    """
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.rand(steps, batch, n_in, generator=gen, device=device) < 0.05).float()
    grad = torch.randn(steps, batch, n_out, generator=gen, device=device)
    probe = SparseLIFLinear(n_in, n_out, beta=math.exp(-0.2), grad="sparsegrad", backend=backend).to(device)
    backend_name = probe.resolve_backend().name
    with torch.no_grad():  # the membrane distance |v| of this input, to set B_th for each activity
        current = torch.matmul(x, probe.weight.t())
        v = lif_recurrence(current, torch.empty_like(current), probe.beta, 1.0)  # the probe's threshold
        levels = torch.quantile(v.abs().flatten()[:1_000_000].float(), torch.tensor(fractions, device=device))
    entry = {key: [] for key in ("fractions", "dense_s", "sparse_s", "dense_spread", "sparse_spread")}
    for bth in levels.tolist():
        layers = {}
        for path in ("dense", "sparse"):
            layers[path] = SparseLIFLinear(n_in, n_out, beta=probe.beta, grad="sparsegrad", bth=max(bth, 1e-6),
                                           path=path, backend=backend).to(device)
            layers[path].load_state_dict(probe.state_dict())
            _time_backward(layers[path], x, grad)  # warm-up
        times = {"dense": [], "sparse": []}
        for _ in range(repeats):
            for path in ("dense", "sparse"):
                times[path].append(_time_backward(layers[path], x, grad))
        entry["fractions"].append(layers["sparse"].stats["active_fraction"])
        for path in ("dense", "sparse"):
            quartiles = statistics.quantiles(times[path], n=4) if repeats > 1 else [times[path][0]] * 3
            entry[f"{path}_s"].append(statistics.median(times[path]))
            entry[f"{path}_spread"].append(quartiles[2] - quartiles[0])
    entry["crossover"] = crossover_density(entry["fractions"], entry["dense_s"], entry["sparse_s"])
    entry.update(shape=[steps, batch, n_in, n_out], repeats=repeats, backend=backend_name)
    if save:
        path = calibration_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        table = json.loads(path.read_text()) if path.exists() else {}
        table[device_key(device, backend_name)] = entry
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2))
        tmp.replace(path)
        DEFAULT_SCHEDULER.forget()
    return entry
