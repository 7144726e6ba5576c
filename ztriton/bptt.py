"""The autograd BPTT reference of the engine's networks: plain torch, dense, step by step.

One implementation of what `SparseLIFLinear` and `LeakyReadout` compute, written as a standard
autograd BPTT: the tests' oracle (float64, "autograd through the same g"), the "standard autograd
BPTT" rows of `bench/bench_layer.py` (and so the eager BPTT op counts of `bench/gpu_report.py`),
and the "step x BPTT" column of `ztriton compare`.

- `BPTTLIF`: eq. 1, `u[t] = beta u[t-1] + W x[t] (+ b) - theta s[t-1]`, `s[t] = H(u[t] - theta)`,
  `u[-1] = s[-1] = 0`, the reset held constant in backward. The spike's backward is a `Surrogate`
  (the dense expected surrogate of a law, optionally truncated at B_th as SparseGrad does), or,
  per call, a given g (`forward(x, g)`: the g a LocalZO / SparseGrad layer formed, for autograd
  through the same g).
- `BPTTReadout`: `o[t] = beta o[t-1] + (1 - beta) (W s[t] (+ b))`, `o[-1] = 0`.
- `BPTTNet`: hidden `BPTTLIF` layers and a `BPTTReadout`, like `ztriton.train.SNN`;
  `snn_reference` builds the one matching the training application's network.

Well written in the sense of DESIGN.md section 6: the input current is one GEMM over all steps,
the time axis is unbound once (indexing a graph tensor per step would make the backward
quadratic in T), nothing is checked or read back on the host inside the time loop, and the
surrogate saves v and evaluates g in backward (as surrogate-gradient libraries do). The
`from_layer` / `from_layers` / `from_snn` constructors copy weights, leak, threshold and law from
the engine's modules, which they take as arguments (no import of `ztriton.layers`).

The LIF family of DESIGN.md section 9 (reset to zero, a recurrent weight, learnable leak and
threshold) changes `BPTTLIF.membrane` only: reset to zero is
`self.beta * (1 - s.detach()) * u + current`; a recurrent weight V adds `s @ V.t()` to the
current (s itself: the recurrence is differentiated, only the reset is held constant); a
learnable leak or threshold makes `beta` / `threshold` an `nn.Parameter` (the readout's leak
likewise, in `BPTTReadout.forward`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .distributions import Distribution, resolve
from .functional import SpikeWithGrad, heaviside

__all__ = ["Surrogate", "BPTTLIF", "BPTTReadout", "BPTTNet", "snn_reference"]


@dataclass(frozen=True)
class Surrogate:
    """A spike's backward: g(v) = the dense expected surrogate of `law` at `delta` (Theorem 2/3),
    zero where |v| >= `bth` when `bth` is given (SparseGrad). Calling it on v gives H(v)."""

    law: Distribution
    delta: float
    bth: float | None = None

    @classmethod
    def dense(cls, dist: str | Distribution = "normal", delta: float = 0.05) -> Surrogate:
        """The dense surrogate (the `surrogate` rule, the reference without truncation)."""
        return cls(resolve(dist, delta), float(delta))

    @classmethod
    def truncated(cls, dist: str | Distribution = "normal", delta: float = 0.05, bth: float | None = None,
                  m: int = 1) -> Surrogate:
        """SparseGrad's surrogate: zero where |v| >= bth (default B_th = backprop_threshold(delta, m), eq. 21)."""
        law = resolve(dist, delta)
        return cls(law, float(delta), law.backprop_threshold(delta, m) if bth is None else float(bth))

    @classmethod
    def of_layer(cls, layer, truncated: bool = False) -> Surrogate:
        """The surrogate of a `SparseLIFLinear`'s law and delta; with `truncated`, cut at its B_th."""
        rule = layer.rule
        return cls(rule.law, rule.delta, rule.bth if truncated else None)

    def grad(self, v: torch.Tensor) -> torch.Tensor:
        """g at every entry of v."""
        g = self.law.expected_grad(v, self.delta)
        if self.bth is None:
            return g
        return torch.where(v.abs() < self.bth, g, torch.zeros_like(g))

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return _SurrogateSpike.apply(v, self)


class _SurrogateSpike(torch.autograd.Function):
    """H(v) forward; saves v, backward grad * surrogate.grad(v)."""

    @staticmethod
    def forward(ctx, v, surrogate):
        ctx.save_for_backward(v)
        ctx.surrogate = surrogate
        return heaviside(v)

    @staticmethod
    def backward(ctx, grad):
        (v,) = ctx.saved_tensors
        return grad * ctx.surrogate.grad(v), None


def _times(factor, s: torch.Tensor) -> torch.Tensor:
    """factor * s, without the multiply at the plain number 1 (theta = 1: the subtraction alone)."""
    return s if isinstance(factor, (int, float)) and factor == 1 else factor * s


def _parameters(module: nn.Module, bias: bool, device, dtype) -> None:
    """module.weight ~ U(-1/sqrt(in), 1/sqrt(in)) (as the engine's layers), module.bias zeros or None.
    On the meta device nothing is drawn: `from_layer` builds there, then copies the engine's values."""
    bound = 1.0 / math.sqrt(module.in_features)
    weight = torch.empty(module.out_features, module.in_features, device=device, dtype=dtype)
    module.weight = nn.Parameter(weight.uniform_(-bound, bound))
    module.register_parameter("bias", nn.Parameter(torch.zeros(module.out_features, device=device, dtype=dtype))
                              if bias else None)


def _copy_parameters(ref: nn.Module, layer: nn.Module, dtype) -> nn.Module:
    """ref (built on meta) with copies of layer's weight and bias, on layer's device, in `dtype` if given."""
    ref.weight = nn.Parameter(layer.weight.detach().clone())
    ref.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())
    return ref if dtype is None else ref.to(dtype)


class BPTTLIF(nn.Module):
    """Linear synapses into LIF neurons (eq. 1), autograd BPTT; input (T, B, in), output (T, B, out) spikes.

    `surrogate`: the spike's backward (default: the dense normal surrogate at delta 0.05); a `g`
    given to `forward` replaces it for that call. Weights initialised as `SparseLIFLinear`'s, made
    on `device` in `dtype` as torch's modules do.
    """

    def __init__(self, in_features: int, out_features: int, *, beta: float, threshold: float = 1.0,
                 bias: bool = False, surrogate: Surrogate | None = None, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.beta, self.threshold = beta, threshold
        self.surrogate = surrogate if surrogate is not None else Surrogate.dense()
        _parameters(self, bias, device, dtype)

    @classmethod
    def from_layer(cls, layer, surrogate: Surrogate | None = None, dtype: torch.dtype | None = None) -> BPTTLIF:
        """A copy of a `SparseLIFLinear` (weight, bias, beta, threshold; on its device); `surrogate`
        defaults to the dense surrogate of its law and delta (`Surrogate.of_layer`)."""
        theta = layer.threshold.detach()
        threshold = float(theta[0]) if bool((theta == theta[0]).all()) else theta.clone()
        ref = cls(layer.in_features, layer.out_features, beta=layer.beta, threshold=threshold,
                  surrogate=surrogate if surrogate is not None else Surrogate.of_layer(layer), device="meta")
        return _copy_parameters(ref, layer, dtype)

    def current(self, x: torch.Tensor) -> torch.Tensor:
        """I = x W^T (+ b) for all steps: one GEMM."""
        current = torch.matmul(x, self.weight.t())
        return current if self.bias is None else current + self.bias

    def membrane(self, u: torch.Tensor, s: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        """u[t] from u[t-1], s[t-1] and I[t] (eq. 1, subtractive reset held constant in backward)."""
        return self.beta * u + current - _times(self.threshold, s.detach())

    def dynamics(self, current: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """Spikes (T, B, out) for a given input current (T, B, out); backward through `g` if given
        (a (T, B, out) tensor, e.g. the active set a layer formed, as a dense grid), else the surrogate."""
        currents = current.unbind(0)
        if g is None:
            spike = lambda v, t: self.surrogate(v)  # noqa: E731
        else:
            gs = g.unbind(0)
            spike = lambda v, t: SpikeWithGrad.apply(v, gs[t])  # noqa: E731
        u = torch.zeros_like(currents[0])
        s = torch.zeros_like(currents[0])
        out = []
        for t, i_t in enumerate(currents):
            u = self.membrane(u, s, i_t)
            s = spike(u - self.threshold, t)
            out.append(s)
        return torch.stack(out)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return self.dynamics(self.current(x), g)

    def extra_repr(self) -> str:
        s = self.surrogate
        return (f"{self.in_features}, {self.out_features}, beta={self.beta:.4g}, threshold={self.threshold:g}, "
                f"surrogate={s.law.name} delta={s.delta:g}" + ("" if s.bth is None else f" bth={s.bth:.4g}"))


class BPTTReadout(nn.Module):
    """Leaky integrator o[t] = beta o[t-1] + (1 - beta) (W s[t] (+ b)), autograd BPTT; (T, B, in) -> (T, B, out).

    Weights initialised as `LeakyReadout`'s, made on `device` in `dtype`."""

    def __init__(self, in_features: int, out_features: int, *, beta: float, bias: bool = False, device=None,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.beta = in_features, out_features, beta
        _parameters(self, bias, device, dtype)

    @classmethod
    def from_layer(cls, layer, dtype: torch.dtype | None = None) -> BPTTReadout:
        """A copy of a `LeakyReadout` (weight, bias, beta; on its device)."""
        ref = cls(layer.in_features, layer.out_features, beta=layer.beta, device="meta")
        return _copy_parameters(ref, layer, dtype)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        current = torch.matmul(s, self.weight.t())
        if self.bias is not None:
            current = current + self.bias
        currents = (current * (1 - self.beta)).unbind(0)
        o = torch.zeros_like(currents[0])
        out = []
        for i_t in currents:
            o = self.beta * o + i_t
            out.append(o)
        return torch.stack(out)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, beta={self.beta:.4g}"


class BPTTNet(nn.Module):
    """Hidden `BPTTLIF` layers and a `BPTTReadout`; `forward(x, g=None)` returns (out, hidden spikes)
    with out the readout reduced over time (`reduce` "max" or "sum", the logits of `ztriton.train.SNN`)
    or, with `reduce=None`, the readout's (T, B, classes) trace. `g`: one entry per hidden layer
    (a (T, B, N) g, or None for that layer's surrogate)."""

    def __init__(self, hidden: Sequence[BPTTLIF], readout: BPTTReadout, reduce: str | None = "max"):
        super().__init__()
        if reduce not in ("max", "sum", None):
            raise ValueError(f"reduce must be 'max', 'sum' or None, got {reduce!r}")
        self.hidden = nn.ModuleList(hidden)
        self.readout = readout
        self.reduce = reduce

    @classmethod
    def from_layers(cls, hidden, readout, reduce: str | None = None, surrogate: Surrogate | None = None,
                    dtype: torch.dtype | None = None) -> BPTTNet:
        """A copy of `SparseLIFLinear` layers and a `LeakyReadout` (`surrogate` as in `BPTTLIF.from_layer`)."""
        return cls([BPTTLIF.from_layer(layer, surrogate, dtype) for layer in hidden],
                   BPTTReadout.from_layer(readout, dtype), reduce)

    @classmethod
    def from_snn(cls, snn, surrogate: Surrogate | None = None, dtype: torch.dtype | None = None) -> BPTTNet:
        """A copy of a `ztriton.train.SNN` (its hidden layers, readout and reduction over time)."""
        return cls.from_layers(snn.hidden, snn.readout, snn.reduce, surrogate, dtype)

    def layers(self) -> list[nn.Module]:
        """The hidden layers and the readout, input to output."""
        return [*self.hidden, self.readout]

    def forward(self, x: torch.Tensor, g: Sequence[torch.Tensor | None] | None = None):
        if g is not None and len(g) != len(self.hidden):
            raise ValueError(f"g must have one entry per hidden layer ({len(self.hidden)}), got {len(g)}")
        h, spikes = x, []
        for number, layer in enumerate(self.hidden):
            h = layer(h, None if g is None else g[number])
            spikes.append(h)
        out = self.readout(h)
        if self.reduce == "max":
            out = out.amax(0)
        elif self.reduce == "sum":
            out = out.sum(0)
        return out, spikes


def snn_reference(inputs: int, classes: int, cfg, surrogate: Surrogate | None = None,
                  dtype: torch.dtype | None = None) -> BPTTNet:
    """The autograd BPTT of the training application's network, `ztriton.train.SNN(inputs, classes, cfg)`:
    its sizes, leaks, thresholds, law and delta, reduction over time, and the initial weights SNN
    draws (from the global generator, as SNN does)."""
    from .train import SNN

    return BPTTNet.from_snn(SNN(inputs, classes, cfg), surrogate, dtype)
