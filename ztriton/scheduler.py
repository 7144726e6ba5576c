"""Dense-or-sparse path choice from the measured activity, with a calibrated crossover.

A calibration (`ztriton.calibration.calibrate`) stores, per device and backend ("cpu/native",
"cuda:<name>/triton", ...), the activity where the sparse backward gets as slow as the dense one
(`crossover_density`: an isotonic fit of log(sparse / dense) over log(activity)) in a JSON file
(`$ZTRITON_CALIBRATION`, default `~/.cache/ztriton/calibration.json`). `Scheduler.choose` takes
the sparse path below the crossover; where no calibration exists, DEFAULT_CROSSOVER.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from ._checks import positive_float

#: active fraction below which the sparse path is taken when the device has no calibration: half of
#: what a 2-core CPU measured (10.2 % and 11.6 % by `ztriton calibrate`, T 100 B 128 200->200,
#: native; 8.7-12.6 % for the weight gradient alone at the paper's shapes, bench/bench_kernels.py),
#: so an uncalibrated device errs towards the dense path, whose cost does not depend on activity
DEFAULT_CROSSOVER = 0.05


def calibration_file() -> Path:
    """Where calibrations are stored: $ZTRITON_CALIBRATION or ~/.cache/ztriton/calibration.json."""
    env = os.environ.get("ZTRITON_CALIBRATION")
    return Path(env) if env else Path.home() / ".cache" / "ztriton" / "calibration.json"


def device_key(device: torch.device | str, backend: str) -> str:
    """Calibration key of a device and backend: "cpu/native", "cuda:<device name>/triton", ..."""
    device = torch.device(device)
    name = f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else device.type
    return f"{name}/{backend}"


class Scheduler:
    """Picks "sparse" when the active fraction is below the crossover of the device, else "dense".

    `crossover` forces a value (e.g. an injected calibration); otherwise it is read from the
    calibration file once per device, falling back to DEFAULT_CROSSOVER.
    """

    def __init__(self, crossover: float | None = None):
        self._forced = None if crossover is None else positive_float("crossover", crossover)
        self._known: dict[str, tuple[float, str]] = {}

    def crossover(self, device: torch.device | str, backend: str) -> tuple[float, str]:
        """(crossover, source) for `device` and `backend`; source is "forced", "calibrated" or "default"."""
        if self._forced is not None:
            return self._forced, "forced"
        key = device_key(device, backend)
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

    def choose(self, active_fraction: float, device: torch.device | str, backend: str) -> str:
        return "sparse" if active_fraction < self.crossover(device, backend)[0] else "dense"


DEFAULT_SCHEDULER = Scheduler()


def isotonic(values: list[float]) -> list[float]:
    """The non-decreasing sequence closest to `values` in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, count]
    for value in values:
        blocks.append([value, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m1, c1), (m2, c2) = blocks[-2], blocks.pop()
            blocks[-1] = [(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2]
    return [mean for mean, count in blocks for _ in range(count)]


def crossover_density(fractions, dense_s, sparse_s) -> float:
    """Activity where the isotonic fit of log(sparse / dense) over log(activity) crosses 0.

    The sparse path's cost relative to the dense one can only grow with the activity, so noise
    that breaks that order is pooled away before interpolating (log-linearly) between measurements.
    Below every measurement: the smallest activity; above: 1.
    """
    pairs = sorted(zip(fractions, dense_s, sparse_s))
    logs = [math.log(max(f, 1e-12)) for f, _, _ in pairs]
    fitted = isotonic([math.log(s / d) for _, d, s in pairs])
    if fitted[0] >= 0:
        return pairs[0][0]
    for i in range(1, len(pairs)):
        if fitted[i] >= 0:
            r0, r1 = fitted[i - 1], fitted[i]
            w = r0 / (r0 - r1) if r0 != r1 else 1.0
            return math.exp(logs[i - 1] + w * (logs[i] - logs[i - 1]))
    return 1.0
