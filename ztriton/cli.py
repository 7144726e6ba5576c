"""Command-line interface: `ztriton demo` shows the LocalZO estimate against its expected surrogate."""

from __future__ import annotations

import argparse

import torch

from .distributions import DISTRIBUTIONS, resolve
from .functional import localzo_grad


def _demo(args: argparse.Namespace) -> int:
    gen = torch.Generator().manual_seed(args.seed)
    print(f"{'dist':>13} {'B_th/delta':>10} {'active %':>9} {'max |mean-E[g]|':>16}")
    for name in DISTRIBUTIONS:
        law = resolve(name, args.delta)
        v = args.delta * torch.linspace(-3.0, 3.0, 61)
        g = localzo_grad(v.expand(args.draws, -1).contiguous(), args.delta, 1, law, gen)
        error = (g.double().mean(0) - law.expected_grad(v.double(), args.delta)).abs().max()
        activity = (localzo_grad(torch.randn(args.draws, 61, generator=gen) * 0.5, args.delta, 1, law, gen) != 0)
        print(
            f"{name:>13} {law.backprop_threshold(args.delta) / args.delta:10.4f} "
            f"{100 * activity.float().mean():9.3f} {float(error):16.4f}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ztriton", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="compare LocalZO estimates with their expected surrogates")
    demo.add_argument("--delta", type=float, default=0.05)
    demo.add_argument("--draws", type=int, default=20_000)
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    return _demo(args)
