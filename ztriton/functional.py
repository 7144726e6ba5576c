"""Spike functions: Heaviside forward, three backward rules (paper section 4, Algorithm 1).

All take the distance to threshold `v = u - u_th` and return spikes `H(v)` (1 where v > 0) in the
dtype of `v`. The backward returns `grad_out * g` with

- `localzo_spike`:    g = c/m sum_k 1[|v| < delta |z_k|] |z_k|^alpha / (2 delta), z drawn in forward
                      (eq. 6/7, Algorithm 1);
- `surrogate_spike`:  g = the surrogate LocalZO equals in expectation (Theorem 2/3), dense;
- `sparsegrad_spike`: the same surrogate, zero where |v| >= B_th (Perez-Nieves & Goodman 2021),
                      B_th = delta E[max_k |z_k|] by default (eq. 21).

The `*_grad` functions compute g alone. z follows the RNG contract of `ztriton.rng`: the draw of
sample k at flat position i of `v` depends only on (seed, offset, i, k), one key per call.

`spike_count` sums spikes over time with a backward that stays sparse on a layer's output (for
spike-count regularisers).
"""

from __future__ import annotations

import math

import torch

from . import rng
from ._checks import float_tensor, positive_float, positive_int
from .boundary import eager_under_compile
from .distributions import Distribution, resolve
from .events import cached_events
from .sparse import producer_of, sparse_grad

__all__ = [
    "heaviside",
    "localzo_grad",
    "surrogate_grad",
    "sparsegrad_grad",
    "localzo_spike",
    "surrogate_spike",
    "sparsegrad_spike",
    "spike_count",
]


def heaviside(v: torch.Tensor) -> torch.Tensor:
    """H(v): 1 where v > 0, else 0 (v == 0 does not spike), in the dtype of v."""
    return (v > 0).to(v.dtype)


def _check_generator(generator, v: torch.Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != v.device.type:
        raise ValueError(f"generator is on {generator.device} but v is on {v.device}")


def _localzo_args(v, delta, m, dist, generator) -> tuple[float, int, Distribution]:
    float_tensor("v", v)
    delta = positive_float("delta", delta)
    m = positive_int("m", m)
    law = resolve(dist, delta)
    _check_generator(generator, v)
    return delta, m, law


def _sparsegrad_args(v, dist, delta, bth, m) -> tuple[float, Distribution, float]:
    float_tensor("v", v)
    delta = positive_float("delta", delta)
    m = positive_int("m", m)
    law = resolve(dist, delta)
    bth = law.backprop_threshold(delta, m) if bth is None else positive_float("bth", bth)
    return delta, law, bth


def localzo_active(
    abs_v: torch.Tensor, delta: float, m: int, law: Distribution, key: rng.PhiloxKey, base: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 on a flat tensor of |v|: (positions where g != 0, g there, float32).

    `base` is the flat position of abs_v[0] in the layer's grid (the contract's index is base + i).
    Only entries with |v| < delta * abs_z_bound can be active (no draw returns a larger |z|), so
    |z| is drawn for those candidates only: for the normal law that is |v| < 5.68 delta, a few
    percent of a layer's entries. Memory: one candidate-sized tensor per sample, never m x |v|.
    """
    if math.isfinite(law.abs_z_bound):
        candidates = torch.nonzero(abs_v < candidate_threshold(law, delta)).squeeze(1)
    else:
        candidates = torch.arange(abs_v.numel(), device=abs_v.device)
    keep, g = localzo_at(candidates + base, abs_v[candidates], delta, m, law, key)
    return candidates[keep], g


def candidate_threshold(law: Distribution, delta: float) -> float:
    """|v| below which LocalZO can be active: delta * abs_z_bound, with a margin for rounding."""
    return delta * law.abs_z_bound * (1 + 1e-6)


def localzo_at(positions: torch.Tensor, abs_v: torch.Tensor, delta: float, m: int, law: Distribution,
               key: rng.PhiloxKey) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 7 at candidate entries (flat `positions` in the grid, their |v|): (kept rows, g float32)."""
    near = abs_v.float()
    total = torch.zeros_like(near)
    for k in range(m):
        abs_z = rng.abs_z(law, key, positions, k)
        weight = abs_z if law.alpha == 1 else abs_z.reciprocal()
        total += torch.where(near < delta * abs_z, weight, 0.0)
    keep = torch.nonzero(total).squeeze(1)
    return keep, total[keep].mul_(law.c / (2.0 * delta * m))


def _localzo(v, delta: float, m: int, law: Distribution, generator) -> torch.Tensor:
    key = rng.next_key(generator, v.device)
    index, values = localzo_active(v.detach().abs().reshape(-1), delta, m, law, key)
    g = torch.zeros(v.numel(), dtype=v.dtype, device=v.device)
    return g.index_copy_(0, index, values.to(v.dtype)).view(v.shape)


def _sparsegrad(v, delta: float, law: Distribution, bth: float) -> torch.Tensor:
    g = law.expected_grad(v.detach(), delta)
    return torch.where(v.detach().abs() < bth, g, torch.zeros_like(g))


def localzo_grad(
    v: torch.Tensor,
    delta: float = 0.05,
    m: int = 1,
    dist: str | Distribution = "normal",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The LocalZO estimate g of eq. 7 for every entry of `v` (one draw of m samples each).

    Draws one (seed, offset) from `generator` (default: the global generator of v's device).
    """
    delta, m, law = _localzo_args(v, delta, m, dist, generator)
    return _localzo(v, delta, m, law, generator)


def surrogate_grad(v: torch.Tensor, dist: str | Distribution = "normal", delta: float = 0.05) -> torch.Tensor:
    """The dense surrogate c E[G(v; z, delta)] (Theorem 2/3) at every entry of `v`."""
    float_tensor("v", v)
    delta = positive_float("delta", delta)
    return resolve(dist, delta).expected_grad(v.detach(), delta)


def sparsegrad_grad(
    v: torch.Tensor,
    dist: str | Distribution = "normal",
    delta: float = 0.05,
    bth: float | None = None,
    m: int = 1,
) -> torch.Tensor:
    """The surrogate truncated to |v| < B_th; B_th defaults to `backprop_threshold(delta, m)` (eq. 21)."""
    delta, law, bth = _sparsegrad_args(v, dist, delta, bth, m)
    return _sparsegrad(v, delta, law, bth)


class SpikeWithGrad(torch.autograd.Function):
    """Heaviside forward; backward multiplies by a gradient `g` fixed in forward."""

    @staticmethod
    def forward(ctx, v, g):
        ctx.save_for_backward(g)
        return heaviside(v)

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return grad_out * g, None


def _spike(v: torch.Tensor, make_grad) -> torch.Tensor:
    if torch.is_grad_enabled() and v.requires_grad:
        return SpikeWithGrad.apply(v, make_grad())
    return heaviside(v)


def localzo_spike(
    v: torch.Tensor,
    delta: float = 0.05,
    m: int = 1,
    dist: str | Distribution = "normal",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """H(v) with the LocalZO backward of Algorithm 1; z is drawn in this forward call.

    No draw is made when no gradient is needed (v does not require grad, or inside no_grad).
    """
    delta, m, law = _localzo_args(v, delta, m, dist, generator)
    return _spike(v, lambda: _localzo(v, delta, m, law, generator))


def surrogate_spike(v: torch.Tensor, dist: str | Distribution = "normal", delta: float = 0.05) -> torch.Tensor:
    """H(v) with the dense expected surrogate as backward (the reference without truncation)."""
    float_tensor("v", v)
    delta = positive_float("delta", delta)
    law = resolve(dist, delta)
    return _spike(v, lambda: law.expected_grad(v.detach(), delta))


def sparsegrad_spike(
    v: torch.Tensor,
    dist: str | Distribution = "normal",
    delta: float = 0.05,
    bth: float | None = None,
    m: int = 1,
) -> torch.Tensor:
    """H(v) with the surrogate backward zeroed where |v| >= B_th (SparseGrad)."""
    delta, law, bth = _sparsegrad_args(v, dist, delta, bth, m)
    return _spike(v, lambda: _sparsegrad(v, delta, law, bth))


class _SpikeCount(torch.autograd.Function):
    """counts[b, n] = sum_t s[t, b, n]; backward sparse at the producing layer's active entries."""

    @staticmethod
    def forward(ctx, spikes):
        ctx.producer = producer_of(spikes)
        ctx.shape, ctx.dtype = spikes.shape, spikes.dtype
        events = cached_events(spikes)
        if events is None:
            return spikes.sum(0)
        batch, width = spikes.shape[1], spikes.shape[2]  # from the events: work proportional to the spikes
        rows = torch.repeat_interleave(torch.arange(events.row_ptr.numel() - 1, device=spikes.device) % batch,
                                       events.row_ptr.diff(), output_size=events.nnz)
        counts = torch.zeros(batch * width, dtype=spikes.dtype, device=spikes.device)
        return counts.index_add_(0, rows * width + events.cols, events.values.to(spikes.dtype)).view(batch, width)

    @staticmethod
    @eager_under_compile
    def backward(ctx, grad):
        if ctx.producer is None:
            return grad.unsqueeze(0).expand(ctx.shape)
        _, b, n = ctx.producer.coo_indices
        return sparse_grad(ctx.producer, grad[b, n], ctx.dtype)


@eager_under_compile
def spike_count(spikes: torch.Tensor) -> torch.Tensor:
    """Spike count per sample and neuron, `spikes.sum(0)` of a (T, B, N) tensor, as (B, N).

    On the unmodified output of a sparse-path `SparseLIFLinear`, its gradient is a sparse COO
    tensor at that layer's active entries (the only ones its backward reads), so a spike-count
    regulariser adds no dense (T, B, N) gradient; elsewhere it is the dense broadcast. Runs eagerly
    under torch.compile (one graph break per call: its events have data-dependent sizes).
    """
    float_tensor("spikes", spikes, finite=False)
    if spikes.dim() != 3:
        raise ValueError(f"spikes must have shape (T, B, N), got {spikes.dim()} dimensions {tuple(spikes.shape)}")
    return _SpikeCount.apply(spikes)
