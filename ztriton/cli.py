"""Command line: `ztriton train` (the paper's networks) and `ztriton calibrate` (the scheduler's crossover)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from .data import DataError
from .train import PRESETS, Config, train


def _train(args) -> int:
    given = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None}
    cfg = Config(**given)
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "checkpoint.pt").exists() or not (run_dir / "config.json").exists():
            raise DataError(f"--resume {run_dir}: no checkpoint.pt and config.json there")
        # the run's own configuration; only --epochs may extend it
        cfg = Config(**json.loads((run_dir / "config.json").read_text()))
        if args.epochs is not None:
            cfg.epochs = args.epochs
    else:
        run_dir = Path(args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if run_dir.exists():
            raise DataError(f"--out {run_dir} exists already; choose another folder (nothing was written)")
    summary = train(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, process 0 reports
        return 0
    print(f"\n{'metric':<22}value")
    for key, value in summary.items():
        text = f"{100 * value:.2f} %" if key.endswith("accuracy") and value is not None else value
        if key == "active_fraction" and value:
            text = ", ".join(f"{100 * a:.3f} %" for a in value)
        if key.endswith("speedup"):
            text = "-" if value is None else f"{value:.2f}x"
        if key == "backward_synops_saved" and value is not None:
            text = f"{100 * value:.2f} %"
        print(f"{key:<22}{text}")
    print(f"run folder: {run_dir}")
    return 0


def _calibrate(args) -> int:
    from .scheduler import calibrate, calibration_file

    entry = calibrate(args.device, steps=args.steps, batch=args.batch)
    for fraction, dense, sparse in zip(entry["fractions"], entry["dense_s"], entry["sparse_s"]):
        print(f"active {100 * fraction:7.3f} %   dense {1e3 * dense:8.1f} ms   sparse {1e3 * sparse:8.1f} ms")
    print(f"crossover {100 * entry['crossover']:.2f} % written to {calibration_file()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ztriton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a fully connected SNN (default: mnist5k, no download)")
    t.add_argument("--dataset", choices=sorted(PRESETS), default="mnist5k")
    t.add_argument("--data-dir", default="data")
    t.add_argument("--download", action="store_true", default=None,
                   help="let tonic download SHD / N-MNIST when the files are not in --data-dir")
    t.add_argument("--grad", choices=["localzo", "sparsegrad", "surrogate"], default="localzo")
    t.add_argument("--dist", choices=["normal", "uniform", "laplace", "sigmoid", "fast_sigmoid"], default="normal")
    t.add_argument("--delta", type=float, default=None, help="default: the dataset preset")
    t.add_argument("--m", type=int, default=1)
    t.add_argument("--bth", type=float, default=None)
    t.add_argument("--path", choices=["auto", "dense", "sparse"], default="auto")
    t.add_argument("--epochs", type=int, default=None, help="default 20")
    t.add_argument("--batch-size", type=int, default=None, help="default: the dataset preset")
    t.add_argument("--lr", type=float, default=None, help="default: the dataset preset")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--backend", choices=["auto", "torch", "native", "triton"], default="auto",
                   help="kernels: auto = Triton on CUDA, native (numba) on CPU, else torch (default: auto)")
    t.add_argument("--hidden", type=int, nargs="+", default=[200, 200])
    t.add_argument("--steps", type=int, default=None, help="time steps T (default: the dataset preset)")
    t.add_argument("--compare-every", type=int, default=10, help="time sparse vs dense every K steps (0: never)")
    t.add_argument("--out", default=None, help="run folder (default runs/<dataset>-<timestamp>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR")
    t.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("calibrate", help="measure the dense/sparse crossover of this device for path='auto'")
    c.add_argument("--device", default="cpu")
    c.add_argument("--steps", type=int, default=100)
    c.add_argument("--batch", type=int, default=128)
    args = parser.parse_args(argv)
    try:
        return _train(args) if args.command == "train" else _calibrate(args)
    except (DataError, ValueError, TypeError) as err:
        print(f"ztriton: error: {err}", file=sys.stderr)
        return 2
