"""A user's input buffer refilled between calls gives its new spikes and gradients on every backend.

Data loaders and C extensions refill a buffer without bumping torch's version counter
(`buf.numpy()[:] = ...`, `buf.data.copy_(...)`, a DLPack view): the event cache must not hold for
such a tensor, only for the tensors the package made (a layer's output).
"""

import numpy as np
import pytest
import torch

from ztriton import SparseLIFLinear
from ztriton.backends import TritonBackend
from ztriton.events import CACHE_ATTR, cached_events

BACKENDS = ["torch", "native"] + (["triton"] if TritonBackend.available(torch.device("cpu"), torch.float32) else [])


def _refill_numpy(buf, new):
    buf.numpy()[:] = new.numpy()


def _refill_data(buf, new):
    buf.data.copy_(new)


def _refill_dlpack(buf, new):
    torch.from_dlpack(np.from_dlpack(buf)).copy_(new)  # a view with a version counter of its own


REFILLS = [_refill_numpy, _refill_data, _refill_dlpack]


def _layer(backend, n_in=60, n_out=24, seed=0):
    torch.manual_seed(seed)
    layer = SparseLIFLinear(n_in, n_out, beta=0.9, delta=0.3, backend=backend, path="sparse")
    layer.weight.data.mul_(6)
    return layer


def _batch(seed, density, shape=(30, 6, 60)):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < density).float()


@pytest.mark.parametrize("refill", REFILLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.03, 0.2])  # event-driven current (<= 5 %) and GEMM current
def test_a_refilled_buffer_gives_the_new_batch_spikes(backend, refill, density):
    layer = _layer(backend)
    first, second = _batch(1, density), _batch(2, density)
    buf = first.clone()
    with torch.no_grad():
        old = layer(buf)
        version = buf._version
        refill(buf, second)
        assert buf._version == version  # the refill is invisible to the version counter
        assert torch.equal(layer(buf), layer(second.clone()))
        assert not torch.equal(old, layer(second.clone()))  # the batches really differ


@pytest.mark.parametrize("refill", REFILLS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("density", [0.03, 0.2])
def test_a_refilled_buffer_gives_the_new_batch_gradients(backend, refill, density):
    first, second = _batch(3, density), _batch(4, density)
    buf = first.clone()
    layer = _layer(backend)
    layer(buf).sum().backward()
    refill(buf, second)
    torch.manual_seed(5)
    layer.weight.grad = None
    layer(buf).sum().backward()
    grad_refilled = layer.weight.grad.clone()
    torch.manual_seed(5)
    layer.weight.grad = None
    layer(second.clone()).sum().backward()
    assert layer.stats["active_fraction"] > 0.005  # real gradient work
    assert torch.equal(grad_refilled, layer.weight.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_buffer_refilled_with_nan_is_refused(backend):
    layer = _layer(backend)
    buf = _batch(6, 0.03)
    with torch.no_grad():
        layer(buf)
        buf.numpy()[0, 0, 0] = np.nan
        with pytest.raises(ValueError, match="x contains NaN or inf"):
            layer(buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_events_are_cached_on_layer_outputs_only(backend):
    """A user's tensor keeps nothing between calls; a native layer's output keeps the events its
    kernel wrote, so the next layer does not scan it."""
    layer = _layer(backend)
    x = _batch(7, 0.03)
    out = layer(x)
    out.sum().backward()
    assert not hasattr(x, CACHE_ATTR)
    if backend == "native":
        events = cached_events(out)
        assert events is not None and events.nnz == int(out.count_nonzero())
        with torch.no_grad():
            out.mul_(1)  # an in-place change bumps the version: the cache no longer holds
        assert cached_events(out) is None


def _two_layers(backend, recurrent=False):
    torch.manual_seed(0)
    first = SparseLIFLinear(60, 40, beta=0.9, delta=0.3, backend=backend, path="sparse")
    second = SparseLIFLinear(40, 24, beta=0.9, delta=0.3, backend=backend, path="sparse", recurrent=recurrent)
    first.weight.data.mul_(6)
    second.weight.data.mul_(4)
    return first, second


@pytest.mark.parametrize("recurrent", [False, True])
def test_a_sparse_backward_keeps_its_input_as_events_only(recurrent):
    """The hidden spikes between two native sparse-path layers are freed once the caller drops them
    (the second layer keeps their events), and the gradients are those of a run that keeps them."""
    import gc
    import weakref

    first, second = _two_layers("native", recurrent)
    x = _batch(8, 0.1)
    grads = []
    for keep in (True, False):
        torch.manual_seed(9)
        for p in (*first.parameters(), *second.parameters()):
            p.grad = None
        hidden = first(x)
        out = second(hidden)
        watch = weakref.ref(hidden)
        if not keep:
            del hidden
            gc.collect()
            assert watch() is None  # nothing else holds the (T, B, 40) float32 spikes
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        assert second.stats["path"] == "sparse" and second.stats["active_fraction"] > 0.005
        grads.append([p.grad.clone() for p in (*first.parameters(), *second.parameters())])
    for kept, freed in zip(*grads):
        assert torch.equal(kept, freed)


def test_kept_events_rebuild_the_dense_input():
    from ztriton.events import KeptEvents, dense, events_of, kept_for_backward

    layer = _layer("native")
    out = layer(_batch(10, 0.1))
    kept = kept_for_backward(out)
    assert isinstance(kept, KeptEvents) and events_of(kept) is cached_events(out)
    assert (kept.shape, kept.dtype) == (out.shape, out.dtype)
    assert torch.equal(dense(kept), out)
    user = _batch(11, 0.1)
    assert kept_for_backward(user) is user  # a user's tensor has no cached events: kept as is


@pytest.mark.parametrize("refill", REFILLS, ids=lambda f: f.__name__)
def test_a_buffer_refilled_before_the_backward_gives_the_forward_batch_gradients(refill):
    """On the native sparse path the backward reads the events the forward scanned, not the buffer."""
    first, second = _batch(12, 0.03), _batch(13, 0.03)
    layer = _layer("native")
    torch.manual_seed(5)
    layer(first.clone()).sum().backward()
    expected = layer.weight.grad.clone()
    layer.weight.grad = None
    buf = first.clone()
    torch.manual_seed(5)
    out = layer(buf)
    refill(buf, second)
    out.sum().backward()
    assert layer.stats["path"] == "sparse" and layer.stats["active_fraction"] > 0.005
    assert torch.equal(layer.weight.grad, expected)


@pytest.mark.parametrize("recurrent", [False, True])
def test_a_torch_layer_after_a_native_one_keeps_the_input_its_forward_read(recurrent):
    """A native layer's output edited without a version bump (`.data`): a torch-backend consumer
    reads the dense values in its forward, so its backward must not take the stale cached events."""
    first, _ = _two_layers("native")
    torch.manual_seed(0)
    second = SparseLIFLinear(40, 24, beta=0.9, delta=0.3, backend="torch", path="sparse", recurrent=recurrent)
    second.weight.data.mul_(4)
    x = _batch(14, 0.1)
    grads = []
    for edit in ("data", "fresh"):
        torch.manual_seed(9)
        second.weight.grad = None
        if edit == "data":
            hidden = first(x)
            hidden.data.mul_(0.5)  # invisible to the version counter: the events cache still holds
        else:
            hidden = 0.5 * first(x).detach()
        out = second(hidden)
        (out * torch.linspace(-1, 1, 24)).sum().backward()
        assert second.stats["path"] == "sparse" and second.stats["active_fraction"] > 0.005
        grads.append(second.weight.grad.clone())
    assert torch.equal(grads[0], grads[1])
