"""Active sets and the sparse gradients that travel between layers through autograd.

A layer's active set is the list of (t, b, n) entries of its (T, B, N) output grid with g != 0.
Only those entries of dL/d(spikes) ever matter to the layer (its backward multiplies by g), so a
consumer of the spikes may return its input gradient as a sparse COO tensor holding just those
entries, and autograd carries it to the producer like any other gradient:

- the producer marks its output with its active set and the output's version counter
  (`mark_producer`); a consumer takes the sparse route only while the tensor is unchanged
  (`producer_of`), so an in-place op on the spikes makes it compute the dense gradient;
- the producer reads whatever arrives, sparse (from one or several consumers) or dense (from any
  other op), at its active entries (`values_at`).

Hooks and `retain_grad` on such spikes see that sparse COO gradient: exact at every active entry
of the producer, absent (zero) elsewhere, where the producer does not use it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


class ActiveSet:
    """Entries of a (T, B, N) grid with g != 0: flat row-major indices (sorted) and g there."""

    def __init__(self, index: torch.Tensor, grad: torch.Tensor, shape: torch.Size):
        self.index = index
        self.grad = grad
        self.shape = torch.Size(shape)

    @property
    def nnz(self) -> int:
        return self.index.numel()

    @property
    def fraction(self) -> float:
        return self.nnz / max(1, self.shape.numel())

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """Row t * B + b of the flattened (T * B, N) grid for every active entry."""
        return torch.div(self.index, self.shape[2], rounding_mode="floor")

    @functools.cached_property
    def neurons(self) -> torch.Tensor:
        """Neuron n of every active entry."""
        return self.index % self.shape[2]

    @functools.cached_property
    def coo_indices(self) -> torch.Tensor:
        """(3, nnz) int64 (t, b, n) of every active entry, the indices of sparse COO gradients."""
        batch = self.shape[1]
        rows = self.rows
        return torch.stack([torch.div(rows, batch, rounding_mode="floor"), rows % batch, self.neurons])

    def dense(self) -> torch.Tensor:
        """g on the full grid (zero where inactive)."""
        out = torch.zeros(self.shape, dtype=self.grad.dtype, device=self.grad.device)
        out.view(-1).index_copy_(0, self.index, self.grad)
        return out

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.grad.numel() * self.grad.element_size()

    @staticmethod
    def empty(shape, device) -> "ActiveSet":
        return ActiveSet(torch.zeros(0, dtype=torch.int64, device=device),
                         torch.zeros(0, dtype=torch.float32, device=device), shape)


@dataclass(frozen=True)
class ProducerMark:
    """What a layer attaches to its output: its active set and the output's version at creation."""

    active: ActiveSet
    version: int


MARK_ATTR = "_ztriton_producer"


def mark_producer(spikes: torch.Tensor, active: ActiveSet) -> None:
    """Let consumers of `spikes` return sparse gradients at `active` (while `spikes` is unchanged)."""
    setattr(spikes, MARK_ATTR, ProducerMark(active, spikes._version))


def producer_of(x: torch.Tensor) -> ActiveSet | None:
    """The active set of the layer that produced `x`, if `x` is that layer's unmodified output."""
    mark = getattr(x, MARK_ATTR, None)
    if mark is None or mark.version != x._version:
        return None
    return mark.active


def sparse_grad(active: ActiveSet, values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A sparse COO gradient of the producer's grid holding `values` at its active entries."""
    return torch.sparse_coo_tensor(active.coo_indices, values.to(dtype), active.shape, dtype=dtype,
                                   is_coalesced=True, check_invariants=False)


def values_at(grad: torch.Tensor, active: ActiveSet, dtype: torch.dtype) -> torch.Tensor:
    """The entries of an incoming gradient (dense, broadcast or sparse COO) at the active set.

    A sparse gradient is coalesced (duplicates summed) and each active entry looks its value up by
    binary search: a gather, with no host sync and no float atomics, so the result does not depend
    on scheduling; entries outside the set are dropped.
    """
    if not grad.is_sparse:
        t, b, n = active.coo_indices
        return grad[t, b, n].to(dtype)
    indices, values = grad._indices(), grad._values()
    own = active.coo_indices
    if indices.data_ptr() == own.data_ptr() and indices.shape == own.shape and indices.stride() == own.stride():
        return values.to(dtype)  # one consumer's gradient, built on the set's own indices: aligned with it
    grad = grad if grad.is_coalesced() else grad.coalesce()
    indices, values = grad._indices(), grad._values().to(dtype)
    if active.nnz == 0 or values.numel() == 0:
        return torch.zeros(active.nnz, dtype=dtype, device=values.device)
    _, batch, width = active.shape
    flat = (indices[0] * batch + indices[1]) * width + indices[2]  # sorted: the gradient is coalesced
    position = torch.searchsorted(flat, active.index).clamp_(max=flat.numel() - 1)
    return torch.where(flat[position] == active.index, values[position], 0.0)
