"""Layers called from several threads at once give the results of serial calls; independent layers
really run at the same time; the native thread pool is replaced safely."""

import copy
import gc
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

from ztriton import SparseLIFLinear, native, rng
from ztriton.backends import Workspace
from ztriton.events import events_of

pytestmark = pytest.mark.filterwarnings("ignore::ztriton.SilentLayerWarning")
THREADS = 4
CALLS = 6  # per thread, each on its own input
BACKENDS = [pytest.param("native", marks=pytest.mark.skipif(not native.AVAILABLE, reason="numba is not installed")),
            "torch"]


def _in_threads(count: int, work) -> list:
    """work(i) in `count` threads started together; their results, or the first exception raised."""
    start, results, errors = threading.Barrier(count, timeout=60), [None] * count, []

    def body(i):
        try:
            start.wait()
            results[i] = work(i)
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


def _inputs():
    """Dense inputs (GEMM current) and sparser ones (event-driven current), one per call."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.rand(30, 12, 50, generator=gen) < (0.3 if i % 2 else 0.03)).float() for i in range(THREADS * CALLS)]


def _layers(backend):
    torch.manual_seed(0)
    layers = [SparseLIFLinear(a, b, beta=0.9, delta=0.3, path="sparse", backend=backend) for a, b in ((50, 40), (40, 30))]
    with torch.no_grad():
        for layer in layers:
            layer.weight.mul_(4.0)
    return layers


def _infer(layers, x):
    with torch.no_grad():
        h = layers[1](layers[0](x))
    return h, events_of(h)


def _train(layers, x):
    """Forward and backward of one call: its spikes and gradients, and the layers' active fractions."""
    x = x.clone().requires_grad_(True)
    first = layers[0](x)
    second = layers[1](first)
    loss = second.sum() + 0.5 * (first * torch.linspace(-1.0, 1.0, 40)).sum()
    grads = torch.autograd.grad(loss, [layers[0].weight, layers[1].weight, x])
    actives = [layer.stats["active_fraction"] for layer in layers]
    return [first, second, *grads], actives


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_layer_in_several_threads_gives_the_serial_results_in_inference(backend):
    layers, inputs = _layers(backend), _inputs()
    serial = [_infer(layers, x) for x in inputs]
    assert any(bool(h.any()) for h, _ in serial)
    for _ in range(2):
        threaded = _in_threads(THREADS, lambda i: [_infer(layers, inputs[i * CALLS + c]) for c in range(CALLS)])
        for i, calls in enumerate(threaded):
            for c, (h, events) in enumerate(calls):
                ref_h, ref_events = serial[i * CALLS + c]
                assert torch.equal(h, ref_h)
                for one, two in zip(events, ref_events):
                    assert torch.equal(one, two)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_layer_in_several_threads_gives_the_serial_results_in_training(backend, monkeypatch):
    """Each thread builds and runs its own graph; each call's LocalZO key is fixed (its index) so that
    the serial and the threaded calls draw the same z."""
    keys = threading.local()
    monkeypatch.setattr(rng, "next_key", lambda generator, device: keys.key)
    layers, inputs = _layers(backend), _inputs()

    def call(index):
        keys.key = rng.PhiloxKey(1000 + index, 0)
        return _train(layers, inputs[index])

    serial = [call(index) for index in range(len(inputs))]
    assert all(min(actives) > 0 for _, actives in serial)
    threaded = _in_threads(THREADS, lambda i: [call(i * CALLS + c) for c in range(CALLS)])
    for i, calls in enumerate(threaded):
        for c, (tensors, _) in enumerate(calls):
            ref = serial[i * CALLS + c][0]
            for one, two in zip(tensors[:2], ref[:2]):
                assert torch.equal(one, two)  # spikes: exact
            for one, two in zip(tensors[2:], ref[2:]):
                if backend == "native":  # fixed blocks: the same sums in the same order
                    assert torch.equal(one, two)
                else:  # torch's own kernels may split their sums differently when called concurrently
                    torch.testing.assert_close(one, two, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not native.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("kernel", ["_lif_rows", "_weight_grad_rows", "_family_rows", "_adjoint_rows"])
def test_independent_layers_in_independent_threads_run_at_once(kernel, monkeypatch):
    """Every block of the kernel waits for a block of the other thread's layer (blocks run in their
    caller's thread with one torch thread): if the two calls could not be in flight together, the
    barrier would break. A single call alone does break it, so the check is live."""
    original = getattr(native, kernel)
    barrier = threading.Barrier(2, timeout=30)

    def meeting(*args):
        barrier.wait()
        return original(*args)

    torch.manual_seed(0)
    recurrent = kernel in ("_family_rows", "_adjoint_rows")  # the LIF family's kernels
    layers = [SparseLIFLinear(50, 40, beta=0.9, delta=0.3, path="sparse", backend="native", recurrent=recurrent)
              for _ in range(2)]
    gen = torch.Generator().manual_seed(2)
    inputs = [(torch.rand(20, 16, 50, generator=gen) < 0.05).float() for _ in range(2)]
    assert len(native.block_ranges(16)) > 1
    for layer in layers:
        layer.weight.data.mul_(4.0)
        layer(inputs[0]).sum().backward()  # compiled before the barrier's timeout applies

    def call(i):
        assert torch.get_num_threads() == 1
        if kernel in ("_lif_rows", "_family_rows"):
            with torch.no_grad():
                return layers[i](inputs[i])
        x = inputs[i].clone().requires_grad_(True)
        layers[i](x).sum().backward()
        return x.grad

    threads = torch.get_num_threads()
    monkeypatch.setattr(native, kernel, meeting)
    torch.set_num_threads(1)
    try:
        _in_threads(2, call)
        barrier = threading.Barrier(2, timeout=0.5)
        with pytest.raises(threading.BrokenBarrierError):
            call(0)
    finally:
        torch.set_num_threads(threads)


def test_a_workspace_gives_each_thread_its_own_buffers_and_counts_all_live_ones():
    workspace = Workspace()
    mine = workspace.get("a", (10,), torch.float32, torch.device("cpu"))
    workspace.hints["cap"] = 1
    assert workspace.get("a", (10,), torch.float32, torch.device("cpu")) is mine
    hold, release, seen = threading.Barrier(4, timeout=30), threading.Event(), []

    def work(i):
        buffer = workspace.get("a", (100,), torch.float32, torch.device("cpu"))
        seen.append((buffer.data_ptr(), workspace.hints.get("cap")))
        workspace.hints["cap"] = i
        hold.wait()
        release.wait(30)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    hold.wait()
    assert workspace.nbytes == 40 + 3 * 400
    assert len({ptr for ptr, _ in seen} | {mine.data_ptr()}) == 4 and all(cap is None for _, cap in seen)
    assert workspace.hints == {"cap": 1}
    release.set()
    for thread in threads:
        thread.join()
    gc.collect()
    assert workspace.nbytes == 40  # an ended thread's buffers are freed
    for clone in (copy.deepcopy(workspace), pickle.loads(pickle.dumps(workspace))):
        assert clone.nbytes == 0 and clone.hints == {}
    layer = copy.deepcopy(SparseLIFLinear(4, 3, beta=0.9))
    assert layer.workspace_bytes == 0


@pytest.mark.parametrize("args,error", [((-1,), ValueError), ((2.0,), TypeError), ((8, 0), ValueError)])
def test_block_ranges_checks_its_arguments(args, error):
    with pytest.raises(error):
        native.block_ranges(*args)


def _events(bins=(0, 2, 1), offsets=(0, 2, 3), samples=(1, 0), steps=4):
    return (np.array(bins, np.int16), np.array([1, 0, 3], np.int16), np.array(offsets), np.array(samples), steps)


@pytest.mark.skipif(not native.AVAILABLE, reason="numba is not installed")
@pytest.mark.parametrize("call,error,message", [
    (lambda: native.philox_uniforms(torch.arange(4.0), 1, 0, 0), TypeError, "index must be a 1-D int64 CPU tensor"),
    (lambda: native.philox_uniforms(torch.arange(4), -1, 0, 0), ValueError, "seed must be in"),
    (lambda: native.philox_uniforms(torch.arange(4), 1, 0, 2.0), TypeError, "k must be an int"),
    (lambda: native.scan_rows(torch.ones(2, 3, 4)), TypeError, "dense must be a strided 2-D float32/64 CPU tensor"),
    (lambda: native.scan_rows(torch.ones(2, 3, dtype=torch.int64)), TypeError, "dense must be"),
    (lambda: native.gather_events(*_events(samples=(2,))), ValueError, r"samples must be in \[0, 2\)"),
    (lambda: native.gather_events(*_events(offsets=(0, 2, 4))), ValueError, "offsets must delimit"),
    (lambda: native.gather_events(*_events(bins=(0, 4, 1))), ValueError, r"must lie in bins \[0, 4\)"),
    (lambda: native.gather_events(*_events(steps=0)), ValueError, "steps must be >= 1"),
    (lambda: native.run_kernel(None, 4), TypeError, "kernel must be callable"),
])
def test_the_native_entry_points_check_their_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()
    assert native.gather_events(*_events()).tolist() == [[0, 1, 2], [1, 0, 1], [1, 3, 0]]


def test_the_pool_is_replaced_and_shut_down_when_the_thread_count_changes():
    def fill(out):
        def work(block, lo, hi):
            time.sleep(0.0005)
            out[lo:hi] = [block + 1] * (hi - lo)
        return work

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        native.run_blocks(fill([0] * 64), 64)
        old = native._pool[1]
        torch.set_num_threads(3)
        out = [0] * 64
        native.run_blocks(fill(out), 64)
        assert native._pool[0] == 3 and native._pool[1] is not old and old._shutdown
        assert out == [b + 1 for b, (lo, hi) in enumerate(native.block_ranges(64)) for _ in range(lo, hi)]

        def hammer(i):  # threads with different counts replace the pool under each other's calls
            torch.set_num_threads(2 + i % 2)
            try:
                for _ in range(40):
                    result = [0] * 64
                    native.run_blocks(fill(result), 64)
                    assert result == out
            finally:
                torch.set_num_threads(threads)
        _in_threads(4, hammer)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_makes_its_own_pool_even_if_the_parent_held_its_lock():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        native.run_blocks(lambda block, lo, hi: None, 64)
        with native._pool_lock:
            pid = os.fork()
            if pid == 0:  # the child: a fresh lock and pool
                out = [0] * 64
                native.run_blocks(lambda block, lo, hi: out.__setitem__(slice(lo, hi), [1] * (hi - lo)), 64)
                os._exit(0 if out == [1] * 64 else 1)
        deadline = time.monotonic() + 60
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if done[0] == 0:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung on the parent's pool lock")
        assert os.waitstatus_to_exitcode(done[1]) == 0
    finally:
        torch.set_num_threads(threads)
