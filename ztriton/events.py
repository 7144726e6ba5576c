"""Spike events as first-class data: sparse COO batches from the data sets, per-row CSR for the kernels.

A batch of events is a coalesced torch sparse COO tensor of shape (T, B, N_in) (`spike_batch`).
Kernels read events row by row: `events_of(x)` gives the CSR of x seen as (T * B, N_in) rows --
from a sparse tensor by counting its (sorted) rows, from a dense one by a native scan.

Events are cached only on tensors the package made: a layer's output (written by the kernel that
made it, `cache_events`, while its version counter is unchanged) and the per-call alias of a
user's input (`call_input`), which lives for one forward and its backward. A user's tensor is
scanned anew on every call: a buffer refilled in place without a version bump (`buf.numpy()[:] =`,
`buf.data.copy_`, a DLPack view) gives its new events.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

CACHE_ATTR = "_ztriton_events"
#: marks the alias `call_input` makes of a user's input: its events are cached for that call only
CALL_ATTR = "_ztriton_call_input"


class Events(NamedTuple):
    """Rows r = t * B + b of a (T, B, N) tensor: the non-zeros of row r are cols/values[row_ptr[r]:row_ptr[r + 1]]."""

    row_ptr: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor

    @property
    def nnz(self) -> int:
        return self.cols.numel()


def spike_batch(t: np.ndarray, b: np.ndarray, n: np.ndarray, shape: tuple[int, int, int],
                by_column: bool = False) -> torch.Tensor:
    """A coalesced sparse COO spike tensor (value 1.0) with ones at the (t, b, n) given (repeats merge).

    `by_column` promises distinct entries already ordered by (b, t, n), as a batch of samples whose
    own events are sorted by (t, n): one stable radix sort by t then gives the row-major order
    (checked: the sparse tensor is flagged coalesced, which a broken promise would make wrong).
    """
    steps, batch, width = shape
    if by_column:
        order = np.argsort(np.asarray(t), kind="stable")
        indices = np.stack([np.asarray(t, np.int64)[order], np.asarray(b, np.int64)[order],
                            np.asarray(n, np.int64)[order]])
        flat = (indices[0] * batch + indices[1]) * width + indices[2]
        if flat.size > 1 and not bool(np.all(flat[1:] > flat[:-1])):
            raise ValueError("spike_batch(by_column=True) needs distinct entries ordered by (b, t, n)")
    else:
        flat = np.sort((np.asarray(t, np.int64) * batch + np.asarray(b, np.int64)) * width + np.asarray(n, np.int64))
        if flat.size > 1:  # drop repeats by sorting (np.unique's hash path is ~50x slower on 1e6 keys)
            flat = flat[np.concatenate(([True], flat[1:] != flat[:-1]))]
        indices = np.stack([flat // (batch * width), (flat // width) % batch, flat % width])
    return torch.sparse_coo_tensor(torch.from_numpy(indices), torch.ones(indices.shape[1]), shape,
                                   is_coalesced=True, check_invariants=False)


def row_pointer(rows: torch.Tensor, count: int) -> torch.Tensor:
    """CSR pointer over `count` rows for sorted row numbers (entries of row r: [ptr[r], ptr[r + 1])).

    On CUDA `searched_row_pointer` (a bincount would make the host wait for the device); on CPU by
    counting, which is 1.5-4x faster there.
    """
    if rows.device.type == "cuda":
        return searched_row_pointer(rows, count)
    ptr = torch.zeros(count + 1, dtype=torch.int64, device=rows.device)
    torch.cumsum(torch.bincount(rows, minlength=count), 0, out=ptr[1:])
    return ptr


def searched_row_pointer(rows: torch.Tensor, count: int) -> torch.Tensor:
    """`row_pointer` by binary search of every row boundary: no host sync."""
    return torch.searchsorted(rows, torch.arange(count + 1, dtype=rows.dtype, device=rows.device))


def _from_sparse(x: torch.Tensor) -> Events:
    x = x if x.is_coalesced() else x.coalesce()
    indices = x._indices()
    steps, batch, _ = x.shape
    return Events(row_pointer(indices[0] * batch + indices[1], steps * batch), indices[2].contiguous(), x._values())


def _from_dense(x: torch.Tensor) -> Events:
    from . import native

    flat = x.reshape(-1, x.shape[-1])
    if native.AVAILABLE and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
        return Events(*native.scan_rows(flat))
    rows, cols = torch.nonzero(flat, as_tuple=True)
    return Events(row_pointer(rows, flat.shape[0]), cols, flat[rows, cols])


def cache_events(x: torch.Tensor, events: Events) -> None:
    """Remember the events of x, a tensor the package made (e.g. by the kernel that wrote x), while
    x is unchanged (its version counter)."""
    setattr(x, CACHE_ATTR, (events, x._version))


def cached_events(x: torch.Tensor) -> Events | None:
    """The events remembered for x while it is unchanged (a layer's output, a call's input), else None."""
    cached = getattr(x, CACHE_ATTR, None)
    return cached[0] if cached is not None and cached[1] == x._version else None


def call_input(x: torch.Tensor) -> torch.Tensor:
    """The tensor an op reads x through for one call (forward and its backward).

    x itself when its events are cached (a layer's output); else a detached alias of x whose events,
    once computed, are kept on the alias only, so the next call scans x again.
    """
    if cached_events(x) is not None:
        return x
    alias = x.detach()
    setattr(alias, CALL_ATTR, True)
    return alias


class KeptEvents:
    """A layer's dense (T, B, N) input kept for the backward as its events only.

    A sparse-path backward reads its input through `events_of` (or rebuilds it with `dense`), so
    the dense tensor need not outlive the forward: a network's hidden spikes are freed as soon as
    nothing else holds them (a width-1024 layer's float32 spikes at T 300, B 128 are 157 MiB, its
    events at 3 % firing 16 MiB). Kept where the forward read x through these same events (the
    native backend's), so the backward sees what the forward read.
    """

    is_sparse = False

    def __init__(self, x: torch.Tensor, events: Events):
        self.shape, self.dtype, self.device, self.events = x.shape, x.dtype, x.device, events

    def to_dense(self) -> torch.Tensor:
        rows, width = self.shape[0] * self.shape[1], self.shape[2]
        out = torch.zeros(rows, width, dtype=self.dtype, device=self.device)
        row_of = torch.repeat_interleave(torch.arange(rows, device=self.device), self.events.row_ptr.diff(),
                                         output_size=self.events.nnz)
        out[row_of, self.events.cols] = self.events.values.to(self.dtype)
        return out.view(self.shape)


def kept_for_backward(x: torch.Tensor) -> torch.Tensor | KeptEvents:
    """What a sparse-path backward keeps of its input x: its events where the forward already has
    them (a dense layer output or call input with cached events), else x itself."""
    events = None if x.is_sparse else cached_events(x)
    return x if events is None else KeptEvents(x, events)


def events_of(x: torch.Tensor | KeptEvents) -> Events:
    """The CSR events of a (T, B, N) tensor, sparse COO or dense; computed anew unless x is a
    tensor the package made (`cache_events`, `call_input`) or kept events."""
    if isinstance(x, KeptEvents):
        return x.events
    events = cached_events(x)
    if events is not None:
        return events
    events = _from_sparse(x) if x.is_sparse else _from_dense(x)
    if getattr(x, CALL_ATTR, False):
        cache_events(x, events)
    return events


def dense(x: torch.Tensor | KeptEvents) -> torch.Tensor:
    """x as a strided tensor (a sparse COO batch or kept events are densified)."""
    return x.to_dense() if x.is_sparse or isinstance(x, KeptEvents) else x
