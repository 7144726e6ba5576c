"""Dense-or-sparse path choice from the measured activity, with a calibrated crossover.

`calibrate()` times the dense and the sparse backward of a SparseLIFLinear on the current device
over a range of activities, and stores the activity where the sparse path stops being faster (the
crossover) in a JSON file (`$ZTRITON_CALIBRATION`, default `~/.cache/ztriton/calibration.json`),
one entry per device kind. `Scheduler.choose` takes the sparse path below the crossover. Where no
calibration exists, DEFAULT_CROSSOVER is used.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from ._checks import positive_float

#: active fraction below which the sparse path is taken when the device has no calibration;
#: a 2-core CPU measured 4.7 % (`ztriton calibrate`, T 100 B 128 200->200) to 10 %
#: (bench/bench_kernels.py, the weight gradient at the paper's shapes)
DEFAULT_CROSSOVER = 0.05


def calibration_file() -> Path:
    """Where calibrations are stored: $ZTRITON_CALIBRATION or ~/.cache/ztriton/calibration.json."""
    env = os.environ.get("ZTRITON_CALIBRATION")
    return Path(env) if env else Path.home() / ".cache" / "ztriton" / "calibration.json"


def device_key(device: torch.device | str) -> str:
    """Calibration key of a device: "cpu", or "cuda:<device name>"."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return device.type


class Scheduler:
    """Picks "sparse" when the active fraction is below the crossover of the device, else "dense".

    `crossover` forces a value (e.g. an injected calibration); otherwise it is read from the
    calibration file once per device, falling back to DEFAULT_CROSSOVER.
    """

    def __init__(self, crossover: float | None = None):
        self._forced = None if crossover is None else positive_float("crossover", crossover)
        self._known: dict[str, tuple[float, str]] = {}

    def crossover(self, device: torch.device | str) -> tuple[float, str]:
        """(crossover, source) for `device`; source is "forced", "calibrated" or "default"."""
        if self._forced is not None:
            return self._forced, "forced"
        key = device_key(device)
        if key not in self._known:
            value, source = DEFAULT_CROSSOVER, "default"
            path = calibration_file()
            if path.exists():
                try:
                    entry = json.loads(path.read_text()).get(key)
                except (OSError, ValueError):
                    entry = None
                if entry is not None:
                    value, source = float(entry["crossover"]), "calibrated"
            self._known[key] = (value, source)
        return self._known[key]

    def forget(self) -> None:
        """Drop the crossovers read so far (the next choice reads the calibration file again)."""
        self._known.clear()

    def choose(self, active_fraction: float, device: torch.device | str) -> str:
        return "sparse" if active_fraction < self.crossover(device)[0] else "dense"


DEFAULT_SCHEDULER = Scheduler()


def _time_backward(layer, x, grad, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):
        layer.weight.grad = None
        spikes = layer(x)
        start = time.perf_counter()
        spikes.backward(grad)
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def calibrate(
    device: torch.device | str = "cpu",
    *,
    steps: int = 100,
    batch: int = 128,
    n_in: int = 200,
    n_out: int = 200,
    fractions: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3),
    repeats: int = 3,
    save: bool = True,
) -> dict:
    """Time the dense and sparse backward over `fractions` of active entries; store the crossover.

    The activity is set through SparseGrad's B_th (quantiles of |v| of a fixed input). Returns the entry
    written: {"crossover", "fractions", "dense_s", "sparse_s", "shape"}.
    """
    from .layers import SparseLIFLinear  # the layer is what is being timed
    from .backends.torch_backend import lif_recurrence

    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(0)
    x = (torch.rand(steps, batch, n_in, generator=gen, device=device) < 0.05).float()
    grad = torch.randn(steps, batch, n_out, generator=gen, device=device)
    measured, dense_s, sparse_s = [], [], []
    probe = SparseLIFLinear(n_in, n_out, beta=math.exp(-0.2), grad="sparsegrad").to(device)
    with torch.no_grad():  # the membrane distance |v| of this input, to set B_th for each activity
        current = torch.matmul(x, probe.weight.t())
        v = lif_recurrence(current, torch.empty_like(current), probe.beta, probe.threshold)
        levels = torch.quantile(v.abs().flatten()[:1_000_000].float(), torch.tensor(fractions, device=device))
    for bth in levels.tolist():
        timings = {}
        for path in ("dense", "sparse"):
            layer = SparseLIFLinear(n_in, n_out, beta=probe.beta, grad="sparsegrad", bth=max(bth, 1e-6), path=path)
            layer = layer.to(device)
            layer.load_state_dict(probe.state_dict())
            timings[path] = _time_backward(layer, x, grad, repeats)
            actual = layer.stats["active_fraction"]
        measured.append(actual)
        dense_s.append(timings["dense"])
        sparse_s.append(timings["sparse"])
    crossover = crossover_density(measured, dense_s, sparse_s)
    entry = {
        "crossover": crossover,
        "fractions": measured,
        "dense_s": dense_s,
        "sparse_s": sparse_s,
        "shape": [steps, batch, n_in, n_out],
    }
    if save:
        path = calibration_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        table = json.loads(path.read_text()) if path.exists() else {}
        table[device_key(device)] = entry
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=2))
        tmp.replace(path)
        DEFAULT_SCHEDULER.forget()
    return entry


def crossover_density(fractions, dense_s, sparse_s) -> float:
    """Activity where sparse time meets dense time (log-linear interpolation between measurements)."""
    pairs = sorted(zip(fractions, dense_s, sparse_s))
    previous = None
    for fraction, dense, sparse in pairs:
        if sparse >= dense:
            if previous is None:
                return fraction
            f0, d0, s0 = previous
            r0, r1 = math.log(s0 / d0), math.log(sparse / dense)
            w = r0 / (r0 - r1) if r0 != r1 else 1.0
            return math.exp(math.log(f0) + w * (math.log(fraction) - math.log(f0)))
        previous = (fraction, dense, sparse)
    return 1.0
