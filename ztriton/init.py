"""A data-driven start: scale each hidden layer's weights so that it fires on real data.

With LocalZO or SparseGrad a layer whose neurons never come near threshold has no active entry,
hence no gradient, and never wakes up; how far the paper's initialisation is from threshold
depends on the data's event density, which differs between data sets (and cannot be guessed for
data we do not have). `scale_to_activity` measures it instead: layer by layer from the input
upward, on one batch, it searches the gain of the layer's weights (the initialisation's shape
stays) that puts the layer's firing rate inside a target band.

The default band, 0.5 %-2 % of (time step, sample, neuron) entries, is the activity of the
trained mnist5k runs (its hidden layers fire on 0.5 % and 1.6 % of entries with the preset's
hand-picked gain, which makes them train), and lies where LocalZO's active entries are a fraction
of a percent at delta 0.05-0.1.

A recurrent layer's gain g multiplies its input weights W; its recurrent weights V take min(g, 1).
Scaled up with W, V would multiply the loop's gain too: past a point the layer's own spikes keep
it firing whatever the input, a saturated or runaway start. Held at its init (uniform
+-1/sqrt(out), a loop gain below 1), V adds a modest term to a rate that W sets. Scaled down with W,
V cannot hold a layer above the band when it is V that saturates it. Neither factor falls as g
grows, so the search over g works as for a feed-forward layer.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ._checks import float_tensor, positive_int
from .layers import SparseLIFLinear

#: default target firing rates (fraction of entries that spike)
BAND = (0.005, 0.02)
#: the gains searched lie in [1 / GAIN_LIMIT, GAIN_LIMIT]
GAIN_LIMIT = 1e4
#: the search aims at the band's geometric centre and stops within this factor of it (or at
#: max_steps, accepting any rate inside the band)
CLOSE = 1.2


def _set_gain(layer: SparseLIFLinear, weight: torch.Tensor, recurrent_weight: torch.Tensor | None,
              gain: float) -> None:
    """W = gain * weight and, for a recurrent layer, V = min(gain, 1) * recurrent_weight."""
    layer.weight.copy_(weight * gain)
    if recurrent_weight is not None:
        layer.recurrent_weight.copy_(recurrent_weight * min(gain, 1.0))


def _firing_rate(layer: SparseLIFLinear, weight: torch.Tensor, recurrent_weight: torch.Tensor | None,
                 gain: float, x: torch.Tensor) -> float:
    _set_gain(layer, weight, recurrent_weight, gain)
    return float(layer(x).mean())


def scale_to_activity(layers: Sequence[SparseLIFLinear], x: torch.Tensor, band: tuple[float, float] = BAND,
                      max_steps: int = 40) -> list[float]:
    """Multiply each layer's weights by the gain that makes it fire at a rate inside `band` on `x`
    (a recurrent layer's recurrent weights by min(gain, 1), see the module's docstring).

    `layers` are applied in order (a stack: each takes the previous one's spikes; `x` feeds the
    first). Inference forwards only (no LocalZO draw, the RNG is untouched), at most `max_steps`
    per layer, aiming at the band's geometric centre: deterministic for a given batch. Returns the gains. Raises ValueError where no gain
    in [1e-4, 1e4] can do it, e.g. for an empty or all-zero batch.
    """
    layers = list(layers)
    if not layers or not all(isinstance(layer, SparseLIFLinear) for layer in layers):
        raise TypeError("layers must be a non-empty sequence of SparseLIFLinear")
    low, high = (float(v) for v in band)
    if not (0.0 < low < high < 1.0):
        raise ValueError(f"band must satisfy 0 < low < high < 1, got {band}")
    max_steps = positive_int("max_steps", max_steps)
    float_tensor("x", x, finite=False)
    if x.dim() != 3 or x.shape[0] * x.shape[1] == 0:
        raise ValueError(f"x must be a non-empty (T, B, in_features) batch, got shape {tuple(x.shape)}")
    values = x._values() if x.is_sparse else x
    if not bool((values != 0).any()):
        raise ValueError("x has no non-zero entry: no weight gain can make the first layer fire")
    target = math.sqrt(low * high)
    gains, h = [], x
    with torch.no_grad():
        for number, layer in enumerate(layers, 1):
            base = layer.weight.detach().clone()
            recurrent_base = None if layer.recurrent_weight is None else layer.recurrent_weight.detach().clone()
            lo, hi = math.log(1.0 / GAIN_LIMIT), math.log(GAIN_LIMIT)  # bracket of log gain
            log_gain, rate = 0.0, _firing_rate(layer, base, recurrent_base, 1.0, h)
            for _ in range(max_steps):
                if low <= rate <= high and abs(math.log(max(rate, 1e-12) / target)) <= math.log(CLOSE):
                    break
                if rate < target:
                    lo = log_gain
                else:
                    hi = log_gain
                log_gain = 0.5 * (lo + hi)
                rate = _firing_rate(layer, base, recurrent_base, math.exp(log_gain), h)
            if not low <= rate <= high:
                _set_gain(layer, base, recurrent_base, 1.0)
                raise ValueError(
                    f"layer {number} ({layer!r}) fires at {100 * rate:.3g} % for the closest gain found, outside "
                    f"the band {100 * low:g}-{100 * high:g} %: no gain in [1e-4, 1e4] reaches it on this batch")
            gains.append(math.exp(log_gain))
            h = layer(h)
    return gains
