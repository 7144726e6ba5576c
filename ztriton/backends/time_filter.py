"""The time filters along dim 0 (time): the reverse-time filter D of ds and the forward input trace eps.

    D[k] = sum_{t>=k} beta^{t-k} ds[t]        eps[t] = sum_{k<=t} beta^{t-k} x[k]

Ops `time_filter` (in place on a full grid) and `filtered_grad` (D of the active entries' ds on the
full grid); their torch implementations.
"""

from __future__ import annotations

import torch

from ..sparse import ActiveSet
from .registry import register


def reverse_filter_(ds: torch.Tensor, beta: float) -> torch.Tensor:
    """In place: D[k] = sum_{t>=k} beta^{t-k} ds[t] along dim 0."""
    for t in range(ds.shape[0] - 2, -1, -1):
        ds[t].add_(ds[t + 1], alpha=beta)
    return ds


def forward_filter_(x: torch.Tensor, beta: float) -> torch.Tensor:
    """In place: eps[t] = sum_{k<=t} beta^{t-k} x[k] along dim 0."""
    for t in range(1, x.shape[0]):
        x[t].add_(x[t - 1], alpha=beta)
    return x


@register("time_filter", "torch")
def time_filter(grid: torch.Tensor, beta: float, reverse: bool) -> torch.Tensor:
    """grid[t] + beta * out[t -+ 1] along dim 0 (reverse: D, forward: eps); may work in place (here: does)."""
    return reverse_filter_(grid, beta) if reverse else forward_filter_(grid, beta)


@register("filtered_grad", "torch")
def filtered_grad(ds: torch.Tensor, active: ActiveSet, beta: float) -> torch.Tensor:
    """D = reverse-time filter of ds scattered on the full (T, B, N) grid."""
    grid = torch.zeros(active.shape, dtype=ds.dtype, device=ds.device)
    grid.view(-1).index_copy_(0, active.index, ds)
    return reverse_filter_(grid, beta)
