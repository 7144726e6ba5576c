"""Launches and host syncs of a training step on the Triton backend, counted on CPU.

`ztriton.counting` counts the torch ops and Triton launches a step dispatches (what a GPU would
run) and the ops that would make the host wait for a GPU. Two things differ on CPU and are set as
a GPU run has them: the RNG key (on CUDA it is the generator's seed and Philox offset, host-side
state; on CPU a seed is drawn with one randint) and the inputs' NaN/inf checks (off by default on
CUDA, `ztriton.set_value_checks`), and the CSR row pointer of event input (counted on CPU,
searched on CUDA).
"""

import pytest
import torch

pytest.importorskip("triton")

import ztriton  # noqa: E402
from ztriton import LeakyReadout, SparseLIFLinear, spike_count  # noqa: E402
from ztriton import events, rng  # noqa: E402
from ztriton.counting import count_device_work  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # on CPU: the Triton interpreter
#: (torch ops, Triton launches, host syncs) of one training step of 2 hidden layers + readout +
#: cross-entropy + the spike-count regulariser, forward and backward, the same at T 16 and T 64
#: (README, "Launches and host syncs"); (rule, input as events) -> counts, path of both layers
WORK = {
    ("localzo", False): ((92, 11, 2), "sparse"),
    ("localzo", True): ((100, 12, 2), "sparse"),  # the batch's row pointer and the event-driven kernels
    ("sparsegrad", False): ((102, 11, 2), "sparse"),
    ("surrogate", False): ((56, 6, 2), "dense"),
}


@pytest.fixture
def as_on_cuda(monkeypatch):
    keys = iter(range(1_000_000))
    monkeypatch.setattr(rng, "next_key", lambda generator, device: rng.PhiloxKey(7, 4 * next(keys)))
    monkeypatch.setattr(events, "row_pointer", events.searched_row_pointer)  # CPU counts, CUDA searches
    ztriton.set_value_checks(False)
    yield
    ztriton.set_value_checks(None)


def _network(grad, steps, seed=0, events=False):
    torch.manual_seed(seed)
    kwargs = dict(beta=0.9, grad=grad, delta=0.05, backend="triton")
    layers = [SparseLIFLinear(40, 32, **kwargs), SparseLIFLinear(32, 24, **kwargs)]
    for layer in layers:
        layer.weight.data.mul_(12 if events else 4)
    readout = LeakyReadout(24, 5, beta=0.9, backend="triton")
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(steps, 6, 40, generator=gen) < (0.04 if events else 0.2)).float()  # events: below 5 %
    y = torch.randint(0, 5, (6,), generator=gen)
    x = (x.to_sparse() if events else x).to(DEVICE)
    return [layer.to(DEVICE) for layer in layers], readout.to(DEVICE), x, y.to(DEVICE)


def _step(layers, readout, x, y):
    hidden, h = [], x
    for layer in layers:
        h = layer(h)
        hidden.append(h)
    loss = torch.nn.functional.cross_entropy(readout(h).amax(0), y)
    loss = loss + 0.01 * sum(spike_count(s).sum() for s in hidden)
    loss.backward()
    assert all(layer.stats["active_fraction"] > 0.002 for layer in layers)  # real work in every layer
    return [layer.stats["path"] for layer in layers]


def _counted_step(grad, steps, events=False):
    layers, readout, x, y = _network(grad, steps, events=events)
    _step(layers, readout, x, y)  # warm-up: the active-set buffers learn their size
    x = x.clone()  # a fresh batch: nothing cached on it from the warm-up
    with count_device_work() as work:
        paths = _step(layers, readout, x, y)
    return work, paths


@pytest.mark.parametrize("grad,events", list(WORK))
@pytest.mark.parametrize("steps", [16, 64])
def test_device_ops_launches_and_syncs_per_step(as_on_cuda, grad, events, steps):
    """Dense input, or a sparse COO batch of events (event-driven current in the first layer): exact
    counts, whatever T."""
    (ops, launches, syncs), path = WORK[grad, events]
    work, paths = _counted_step(grad, steps, events)
    assert paths == [path, path]
    assert (work.ops, work.launches, work.syncs) == (ops, launches, syncs), (
        work.op_names.most_common(), work.kernel_names, work.sync_names)
    # one sync per layer: its active count (the active set's size, or g's nonzeros on the dense path)
    assert work.sync_names == {"_local_scalar_dense": 2}


def test_counting_sees_syncs_launches_and_ops():
    from ztriton.kernels.time_filter import time_filter

    x = torch.tensor([0.0, 1.0, 2.0], device=DEVICE)
    with count_device_work() as work:
        y = x * 2
        torch.nonzero(y)
        y[y > 1]
        float(y.sum())
        y.tolist()
        y.view(3, 1)
        time_filter(torch.ones(4, 3, device=DEVICE), 0.5)
    assert work.sync_names == {"nonzero": 1, "index": 1, "_local_scalar_dense": 1, "tolist": 1}
    assert work.op_names == {"mul": 1, "gt": 1, "sum": 1, "ones": 1}
    assert work.launches == 1 and work.kernel_names == {"time_filter_kernel": 1}
