"""Event batches: vectorised gathers equal a per-sample reference; DataLoader workers work."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ztriton import SparseLIFLinear
from ztriton.data import EventDataset, SpikeTimeDataset


def _events(samples=7, steps=12, inputs=9, seed=0):
    rng = np.random.default_rng(seed)
    bins, units, offsets = [], [], [0]
    for i in range(samples):
        count = 0 if i == 3 else int(rng.integers(1, 15))  # sample 3 holds no event
        pairs = np.unique(rng.integers(0, steps, count) * 1000 + rng.integers(0, inputs, count))
        bins.append(pairs // 1000)
        units.append(pairs % 1000)
        offsets.append(offsets[-1] + pairs.size)
    return EventDataset(np.concatenate(bins).astype(np.int16), np.concatenate(units).astype(np.int16),
                        np.asarray(offsets), rng.integers(0, 4, samples), steps, inputs, 4)


def test_event_batches_equal_a_per_sample_reference():
    data = _events()
    index = torch.tensor([5, 3, 0, 5, 6])  # a repeated sample and an empty one
    x, y = data.batch(index)
    reference = torch.zeros(data.steps, index.numel(), data.inputs)
    for column, sample in enumerate(index.tolist()):
        lo, hi = data.offsets[sample], data.offsets[sample + 1]
        reference[data.bins[lo:hi], column, data.units[lo:hi]] = 1.0
    assert x.is_sparse and x.is_coalesced() and torch.equal(x.to_dense(), reference)
    assert y.tolist() == data.labels[index].tolist()
    empty, _ = data.batch(torch.tensor([3]))
    assert empty._nnz() == 0 and empty.shape == (data.steps, 1, data.inputs)


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")  # torch rebuilding sparse tensors from workers
@pytest.mark.parametrize("kind", ["events", "times"])
def test_dataloader_workers_after_native_kernels_ran(kind):
    """Forked workers build batches after the parent used the native backend's thread pool."""
    if kind == "events":
        data = _events(samples=40)
    else:
        times = torch.randint(-1, 12, (40, 9), generator=torch.Generator().manual_seed(0))
        data = SpikeTimeDataset(times, torch.arange(40) % 4, steps=12, classes=4)
    layer = SparseLIFLinear(9, 5, beta=0.9, backend="auto")
    with torch.no_grad():
        layer.weight.mul_(4)
    layer(data.batch(torch.arange(8))[0])  # the parent runs the native kernels first
    assert layer.stats["backend"] == "native"
    loader = DataLoader(range(len(data)), batch_size=8, collate_fn=data.collate, num_workers=2,
                        multiprocessing_context="fork")
    batches = list(loader)
    assert len(batches) == 5
    for number, (x, y) in enumerate(batches):
        expected_x, expected_y = data.batch(torch.arange(number * 8, number * 8 + 8))
        assert torch.equal(x.to_dense(), expected_x.to_dense()) and torch.equal(y, expected_y)
        layer(x)  # and the parent can still use them


def test_event_batches_without_numba_are_the_same(monkeypatch):
    data = _events(samples=12)
    index = torch.tensor([11, 3, 0, 0, 7])
    native_x, _ = data.batch(index)
    monkeypatch.setattr("ztriton.native.AVAILABLE", False)
    numpy_x, _ = data.batch(index)
    assert torch.equal(native_x._indices(), numpy_x._indices()) and numpy_x.is_coalesced()


@pytest.mark.parametrize("count", [1, 7, 300])
def test_row_pointer_by_counting_and_by_search_agree(count):
    from ztriton.events import row_pointer, searched_row_pointer

    rows = torch.sort(torch.randint(0, count, (count * 3,), generator=torch.Generator().manual_seed(count))).values
    ptr = row_pointer(rows, count)
    assert torch.equal(ptr, searched_row_pointer(rows, count))
    assert ptr[0] == 0 and ptr[-1] == rows.numel()
    assert torch.equal(ptr[1:] - ptr[:-1], torch.bincount(rows, minlength=count))
    empty = torch.zeros(0, dtype=torch.int64)
    assert torch.equal(searched_row_pointer(empty, 4), torch.zeros(5, dtype=torch.int64))
