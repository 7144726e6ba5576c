"""The autograd BPTT reference of the engine's networks: plain torch, dense, step by step.

One implementation of what `SparseLIFLinear` and `LeakyReadout` compute, written as a standard
autograd BPTT: the tests' oracle (float64, "autograd through the same g"), the "standard autograd
BPTT" rows of `bench/bench_layer.py` and `bench/bench_peers.py --recurrent` (and so the eager
BPTT op counts of `bench/gpu_report.py`), and the "step x BPTT" column of `ztriton compare`.

- `BPTTLIF`: the LIF family of DESIGN.md section 9. I[t] = W x[t] (+ b) (+ V s[t-1] with
  `recurrent`); `reset="subtract"` (eq. 1): `u[t] = beta u[t-1] + I[t] - theta s[t-1]`;
  `reset="zero"`: `u[t] = beta (1 - s[t-1]) u[t-1] + I[t]`; `s[t] = H(u[t] - theta)`,
  `u[-1] = s[-1] = 0`. The reset factor s[t-1] is held constant in backward, the recurrent input
  V s[t-1] is differentiated. theta is the (out,) `threshold` (a buffer, or a parameter with
  `learn_threshold`) floored at the engine's `ztriton.layers.THRESHOLD_FLOOR`; with `learn_beta`,
  beta = sigmoid(`beta_logit`), a 0-dim parameter. The spike's backward is a `Surrogate` (the
  dense expected surrogate of a law, optionally truncated at B_th as SparseGrad does), or, per
  call, a given g (`forward(x, g)`: the g a LocalZO / SparseGrad layer formed, for autograd
  through the same g).
- `BPTTReadout`: `o[t] = beta o[t-1] + (1 - beta) (W s[t] (+ b))`, `o[-1] = 0`; `learn_beta` as above.
- `BPTTNet`: hidden `BPTTLIF` layers and a `BPTTReadout`, like `ztriton.train.SNN`;
  `from_snn` copies the training application's network (`ztriton.train.SNN`; `ztriton.train.snn_reference`
  builds a fresh one for a configuration).

Well written in the sense of DESIGN.md section 6: the feed-forward current is one GEMM over all
steps (the recurrent one, V s[t-1], is one GEMM per step, as it must be), the time axis is unbound
once (indexing a graph tensor per step would make the backward quadratic in T), the leak and
the floored threshold are formed once per forward, nothing is checked or read back on the host
inside the time loop, and the surrogate saves v and evaluates g in backward (as surrogate-gradient
libraries do). The `from_layer` / `from_layers` / `from_snn` constructors copy every parameter
and buffer (weight, bias, recurrent weight, leak logit, threshold), the leak, reset and law from
the engine's modules, which they take as arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ._checks import choice, unit_interval
from .distributions import Distribution, resolve
from .functional import SpikeWithGrad, heaviside
from .layers import RESETS, THRESHOLD_FLOOR

__all__ = ["Surrogate", "BPTTLIF", "BPTTReadout", "BPTTNet"]


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


def _uniform(rows: int, columns: int, device, dtype) -> torch.Tensor:
    """A (rows, columns) weight ~ U(-1/sqrt(columns), 1/sqrt(columns)), as `nn.Linear(columns, rows)` and
    the engine's layers draw it; on the meta device nothing is drawn (`from_layer` builds there, then
    copies the engine's values)."""
    bound = 1.0 / math.sqrt(columns)
    return torch.empty(rows, columns, device=device, dtype=dtype).uniform_(-bound, bound)


def _copy_state(ref: nn.Module, layer: nn.Module, dtype) -> nn.Module:
    """ref (built on meta) with copies of layer's parameters and buffers of the same names (ref's own:
    weight, bias, recurrent weight, leak logit, threshold), on layer's device, in `dtype` if given."""
    for name, _ in list(ref.named_parameters(recurse=False)):
        setattr(ref, name, nn.Parameter(getattr(layer, name).detach().clone()))
    for name, _ in list(ref.named_buffers(recurse=False)):
        setattr(ref, name, getattr(layer, name).detach().clone())
    return ref if dtype is None else ref.to(dtype)


class _Leak(nn.Module):
    """A module with one leak factor: the float `beta`, or `beta = sigmoid(beta_logit)` (0-dim parameter)."""

    def _init_leak(self, beta: float, learn_beta: bool, device, dtype) -> None:
        self.learn_beta = bool(learn_beta)
        self._beta = unit_interval("beta", beta)
        logit = None
        if self.learn_beta:
            if self._beta == 1.0:
                raise ValueError("beta must be < 1 with learn_beta=True (sigmoid(beta_logit) cannot reach 1), got 1.0")
            logit = nn.Parameter(torch.tensor(math.log(self._beta / (1.0 - self._beta)), device=device, dtype=dtype))
        self.register_parameter("beta_logit", logit)

    @property
    def beta(self) -> float:
        """The leak factor now (read-only): sigmoid(beta_logit) with `learn_beta`, else the fixed value."""
        return float(torch.sigmoid(self.beta_logit.detach())) if self.learn_beta else self._beta

    def leak(self) -> float | torch.Tensor:
        """beta for a forward: the fixed float, or sigmoid(beta_logit) in the graph."""
        return torch.sigmoid(self.beta_logit) if self.learn_beta else self._beta


class BPTTLIF(_Leak):
    """Linear synapses into LIF neurons (the family of DESIGN.md section 9), autograd BPTT; input
    (T, B, in), output (T, B, out) spikes.

    `threshold`: a number or an (out,) tensor, kept as the (out,) tensor `threshold` (a buffer, the
    parameter with `learn_threshold`); `recurrent`: an (out, out) `recurrent_weight`, no bias;
    `surrogate`: the spike's backward (default: the dense normal surrogate at delta 0.05), replaced
    for one call by a `g` given to `forward`. Weights initialised as `SparseLIFLinear`'s, made on
    `device` in `dtype` as torch's modules do.
    """

    def __init__(self, in_features: int, out_features: int, *, beta: float, threshold: float | torch.Tensor = 1.0,
                 recurrent: bool = False, reset: str = "subtract", learn_beta: bool = False,
                 learn_threshold: bool = False, bias: bool = False, surrogate: Surrogate | None = None, device=None,
                 dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.recurrent, self.reset = bool(recurrent), choice("reset", reset, RESETS)
        self.learn_threshold = bool(learn_threshold)
        self.surrogate = surrogate if surrogate is not None else Surrogate.dense()
        self.weight = nn.Parameter(_uniform(out_features, in_features, device, dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.recurrent_weight = (nn.Parameter(_uniform(out_features, out_features, device, dtype)) if self.recurrent
                                 else None)
        self._init_leak(beta, learn_beta, device, dtype)
        theta = torch.as_tensor(threshold, device=device, dtype=dtype or torch.get_default_dtype()).detach()
        if theta.dim() > 1 or theta.numel() not in (1, out_features):
            raise ValueError(f"threshold must be a number or an ({out_features},) tensor, "
                             f"got shape {tuple(theta.shape)}")
        if not theta.is_meta and not bool((theta > 0).all()):
            raise ValueError("threshold must be > 0 for every neuron")
        theta = theta.reshape(-1).expand(out_features).clone()
        if self.learn_threshold:
            self.threshold = nn.Parameter(theta)
        else:
            self.register_buffer("threshold", theta)

    @classmethod
    def from_layer(cls, layer, surrogate: Surrogate | None = None, dtype: torch.dtype | None = None) -> BPTTLIF:
        """A copy of a `SparseLIFLinear` (weight, bias, recurrent weight, leak or its logit, threshold,
        reset; on its device); `surrogate` defaults to the dense surrogate of its law and delta
        (`Surrogate.of_layer`)."""
        ref = cls(layer.in_features, layer.out_features, beta=layer.beta, recurrent=layer.recurrent,
                  reset=layer.reset, learn_beta=layer.learn_beta, learn_threshold=layer.learn_threshold,
                  bias=layer.bias is not None,
                  surrogate=surrogate if surrogate is not None else Surrogate.of_layer(layer), device="meta")
        return _copy_state(ref, layer, dtype)

    def current(self, x: torch.Tensor) -> torch.Tensor:
        """The feed-forward current x W^T (+ b) for all steps: one GEMM."""
        current = torch.matmul(x, self.weight.t())
        return current if self.bias is None else current + self.bias

    def membrane(self, u: torch.Tensor, s: torch.Tensor, current: torch.Tensor, beta, theta) -> torch.Tensor:
        """u[t] from u[t-1], s[t-1] and the full current I[t]; the reset factor s[t-1] held constant in backward."""
        if self.reset == "zero":
            return beta * (1 - s.detach()) * u + current
        return torch.addcmul(beta * u + current, theta, s.detach(), value=-1)

    def dynamics(self, current: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """Spikes (T, B, out) for a given feed-forward current (T, B, out) (the recurrent input is added
        here, step by step); backward through `g` if given (a (T, B, out) tensor, e.g. the active set a
        layer formed, as a dense grid), else the surrogate."""
        currents = current.unbind(0)
        if g is None:
            spike = lambda v, t: self.surrogate(v)  # noqa: E731
        else:
            gs = g.unbind(0)
            spike = lambda v, t: SpikeWithGrad.apply(v, gs[t])  # noqa: E731
        # theta in the current's dtype (the engine keeps a fixed threshold as a float64 buffer)
        beta, theta = self.leak(), self.threshold.clamp(min=THRESHOLD_FLOOR).to(current.dtype)
        recurrent = None if self.recurrent_weight is None else self.recurrent_weight.t()
        u = torch.zeros_like(currents[0])
        s = torch.zeros_like(currents[0])
        out = []
        for t, i_t in enumerate(currents):
            if recurrent is not None:  # V s[t-1] (s[-1] = 0: V gets its zero gradient at T = 1 too)
                i_t = torch.addmm(i_t, s, recurrent)
            u = self.membrane(u, s, i_t, beta, theta)
            s = spike(u - theta, t)
            out.append(s)
        return torch.stack(out)

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return self.dynamics(self.current(x), g)

    def extra_repr(self) -> str:
        s = self.surrogate
        flags = "".join(f", {name}=True" for name in ("recurrent", "learn_beta", "learn_threshold")
                        if getattr(self, name))
        return (f"{self.in_features}, {self.out_features}, beta={self.beta:.4g}, reset={self.reset}{flags}, "
                f"surrogate={s.law.name} delta={s.delta:g}" + ("" if s.bth is None else f" bth={s.bth:.4g}"))


class BPTTReadout(_Leak):
    """Leaky integrator o[t] = beta o[t-1] + (1 - beta) (W s[t] (+ b)), autograd BPTT; (T, B, in) -> (T, B, out).

    `learn_beta`: beta = sigmoid(beta_logit), a 0-dim parameter. Weights initialised as
    `LeakyReadout`'s, made on `device` in `dtype`."""

    def __init__(self, in_features: int, out_features: int, *, beta: float, bias: bool = False,
                 learn_beta: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(_uniform(out_features, in_features, device, dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self._init_leak(beta, learn_beta, device, dtype)

    @classmethod
    def from_layer(cls, layer, dtype: torch.dtype | None = None) -> BPTTReadout:
        """A copy of a `LeakyReadout` (weight, bias, leak or its logit; on its device)."""
        ref = cls(layer.in_features, layer.out_features, beta=layer.beta, bias=layer.bias is not None,
                  learn_beta=layer.learn_beta, device="meta")
        return _copy_state(ref, layer, dtype)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        beta = self.leak()
        current = torch.matmul(s, self.weight.t())
        if self.bias is not None:
            current = current + self.bias
        currents = (current * (1 - beta)).unbind(0)
        o = torch.zeros_like(currents[0])
        out = []
        for i_t in currents:
            o = beta * o + i_t
            out.append(o)
        return torch.stack(out)

    def extra_repr(self) -> str:
        learn = ", learn_beta=True" if self.learn_beta else ""
        return f"{self.in_features}, {self.out_features}, beta={self.beta:.4g}{learn}"


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

