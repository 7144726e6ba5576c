"""torch.compile on the default run's training step: eager vs compiled step time, compile time apart.

The default run's network and loss (`ztriton.train.SNN`, mnist5k preset: 784-200-200-10, T 100,
B 32, LocalZO delta 0.1, init auto; cross-entropy + the spike-count regulariser), one batch of
mnist5k. The step (forward, loss, backward) runs eagerly and as `torch.compile(step)` on the SAME
model, batch and LocalZO key (the generator is reseeded before every step), interleaved, --repeats
rounds after a warm-up; the first compiled call is timed apart (compile time). Each compiled
result is checked against the eager one (spikes equal, gradients to float32 tolerance). Input as
the data sets deliver it (events, a sparse COO tensor) and, with --dense-input, as a dense tensor.
Last, the eager cost of the compile boundary (`ztriton.boundary.eager_under_compile`): the
eager step with and without it (the undecorated functions swapped in), interleaved, and per call
(a no-op function with and without it, 100,000 calls, interleaved).

    python bench/bench_compile.py                  # about a minute on 2 cores
    python bench/bench_compile.py --dense-input --repeats 20
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from ztriton import LeakyReadout, SparseLIFLinear
from ztriton.boundary import eager_under_compile
from ztriton.data import load_mnist5k
from ztriton.init import scale_to_activity
from ztriton.ops import LeakyReadoutFunction, LIFFamilyFunction, LIFFunction
from ztriton.train import SNN, Config, spike_regulariser


def step(model, x, y, cfg):
    logits, spikes = model(x)
    loss = nn.functional.cross_entropy(logits, y) + spike_regulariser(spikes, cfg)
    loss.backward()
    return loss.detach(), [s.detach() for s in spikes]


def timed(fn, model, x, y, cfg, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    start = time.perf_counter()
    result = fn(model, x, y, cfg)
    return time.perf_counter() - start, result, [p.grad.clone() for p in model.parameters()]


def check(eager, compiled) -> None:
    (_, (loss_e, spikes_e), grads_e), (_, (loss_c, spikes_c), grads_c) = eager, compiled
    assert all(torch.equal(a, b) for a, b in zip(spikes_e, spikes_c)), "compiled spikes differ"
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_e, grads_c):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


#: (owner, attribute) of every function the boundary wraps
BOUNDARY = [(SparseLIFLinear, "forward"), (LeakyReadout, "forward"), (LIFFunction, "backward"),
            (LIFFamilyFunction, "backward"), (LeakyReadoutFunction, "backward")]


def without_boundary():
    """The undecorated functions, to swap in (the boundary's eager cost)."""
    return {(owner, name): owner.__dict__[name] for owner, name in BOUNDARY}


def swap(functions: dict, unwrap: bool) -> None:
    for (owner, name), function in functions.items():
        inner = function.__func__ if isinstance(function, staticmethod) else function
        value = inner.__wrapped__ if unwrap else inner
        setattr(owner, name, staticmethod(value) if isinstance(function, staticmethod) else value)


def summary(name: str, times: list[float]) -> str:
    ms = sorted(1e3 * t for t in times)
    return f"{name:<28} median {statistics.median(ms):7.1f} ms   range {ms[0]:.1f}-{ms[-1]:.1f} ms"


def per_call_us(calls: int = 100_000, rounds: int = 5) -> tuple[list[float], list[float]]:
    """Microseconds per call of a no-op function, bare and behind the boundary, interleaved."""
    def noop(x):
        return x

    bounded, out = eager_under_compile(noop), ([], [])
    for _ in range(rounds):
        for function, times in ((noop, out[0]), (bounded, out[1])):
            start = time.perf_counter()
            for _ in range(calls):
                function(None)
            times.append(1e6 * (time.perf_counter() - start) / calls)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--dense-input", action="store_true", help="feed the batch as a dense tensor, not events")
    args = parser.parse_args(argv)
    cfg = Config().resolved()
    torch.manual_seed(cfg.seed)
    train, _ = load_mnist5k(cfg.steps)
    model = SNN(train.inputs, train.classes, cfg)
    x, y = train.batch(torch.arange(cfg.batch_size))
    cfg.init_gains = scale_to_activity(model.hidden, x)
    if args.dense_input:
        x = x.to_dense()
    layout = "dense tensor" if args.dense_input else "events (sparse COO)"
    print(f"default run: {train.inputs}-{'-'.join(map(str, cfg.hidden))}-{train.classes}, T {cfg.steps}, "
          f"B {cfg.batch_size}, {cfg.grad}, backend {cfg.backend} -> {model.hidden[0].resolve_backend().name}; "
          f"input as {layout}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    compiled = torch.compile(step)
    timed(step, model, x, y, cfg)  # warm-up (native kernels from numba's cache)
    first = timed(compiled, model, x, y, cfg)
    for _ in range(3):  # the compiled step's warm-up (its later calls still load code)
        timed(compiled, model, x, y, cfg)
    eager_times, compiled_times = [], []
    for _ in range(args.repeats):
        eager = timed(step, model, x, y, cfg)
        again = timed(compiled, model, x, y, cfg)
        check(eager, again)
        eager_times.append(eager[0])
        compiled_times.append(again[0])
    print(f"first compiled call (compile + one step): {first[0]:.2f} s; every compiled step checked against eager")
    print(summary("eager step", eager_times))
    print(summary("torch.compile(step) step", compiled_times))
    functions = without_boundary()
    with_boundary, bare = [], []
    try:
        for _ in range(args.repeats):
            with_boundary.append(timed(step, model, x, y, cfg)[0])
            swap(functions, unwrap=True)
            bare.append(timed(step, model, x, y, cfg)[0])
            swap(functions, unwrap=False)
    finally:
        swap(functions, unwrap=False)
    print(summary("eager, with the boundary", with_boundary))
    print(summary("eager, without it", bare))
    bare_us, bounded_us = per_call_us()
    print(f"per call: no-op {min(bare_us):.2f}-{max(bare_us):.2f} us, behind the boundary "
          f"{min(bounded_us):.2f}-{max(bounded_us):.2f} us (a step calls it 3 + 3 times)")


if __name__ == "__main__":
    main()
