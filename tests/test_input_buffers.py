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
