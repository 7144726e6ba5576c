"""The native CPU backend: numba kernels (`ztriton.native`) behind the backend protocol.

Forward: one kernel per block of batch rows runs eq. 1 over all T steps -- input current from the
events of each (t, b) row (or from a GEMM, time chunk by time chunk, for dense inputs), spikes and
their events written, and at every candidate entry (|v| below the rule's threshold) LocalZO's m
draws by the RNG contract, keeping only entries with g != 0 (SparseGrad keeps |v| and takes the
surrogate afterwards). No per-time-step Python. A training forward of the surrogate rule (dense g)
runs on the torch implementation (this one declines it), as do `filtered_grad` and `input_grad_at`
(registered on torch only).
Backward: the weight gradient builds each batch row's input trace on the fly and adds ds * eps
at that row's active entries (one accumulator per fixed block, summed in block order); the input
gradient walks each row's reverse-time filter and evaluates it at the upstream targets only.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import native
from ..events import Events, cache_events, dense, events_of, row_pointer
from ..distributions import KERNEL_LAWS, get_distribution, kernel_law, kernel_law_refusal
from ..functional import candidate_threshold
from ..rng import PhiloxKey
from ..sparse import ActiveSet
from .base import LIFConfig, LIFForward, SpikeRule, Workspace
from .lif_forward import EVENT_DENSITY
from .registry import register
from .weight_grad import sparse_bias_grad

DTYPES = (torch.float32, torch.float64)
#: time steps of GEMM current per kernel call for dense inputs above the event density
CURRENT_CHUNK = 64


def _numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _row_pointer(rows: torch.Tensor, count: int) -> np.ndarray:
    return row_pointer(rows, count).numpy()


def _np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def _scalar(value: float, dtype: torch.dtype):
    """A scalar in the arrays' precision, so the kernels compute in it (no silent float64 promotion)."""
    return _np_dtype(dtype)(value)


def _rounded(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype`, so the kernel's comparison equals one made in that dtype."""
    return float(torch.tensor(value, dtype=dtype))


class _Buffers:
    """Per-batch-row lists the forward kernel fills: (position, value) entries, counts, per-(t, b) counts.

    Scratch kept in the layer's workspace (fresh pages cost more than the kernel's own writes).
    """

    def __init__(self, name: str, steps: int, batch: int, cap: int, dtype: torch.dtype, workspace: Workspace):
        cpu = torch.device("cpu")
        self.pos = workspace.get(f"{name}_pos", (batch, cap), torch.int64, cpu).numpy()
        self.val = workspace.get(f"{name}_val", (batch, cap), dtype, cpu).numpy()
        self.count = workspace.get(f"{name}_count", (batch,), torch.int64, cpu).zero_().numpy()
        self.row_counts = workspace.get(f"{name}_rows", (steps, batch), torch.int64, cpu).numpy()

    def overflow(self) -> int:
        """0 if every row fitted, else the largest count seen."""
        largest = int(self.count.max()) if self.count.size else 0
        return largest if largest > self.pos.shape[1] else 0

    def gather(self, n_out: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(positions, values) in row-major order, and the CSR pointer over (t, b) rows."""
        steps, batch = self.row_counts.shape
        offsets = np.zeros(steps * batch + 1, dtype=np.int64)
        np.cumsum(self.row_counts.reshape(-1), out=offsets[1:])
        positions = np.empty(offsets[-1], dtype=np.int64)
        values = np.empty(offsets[-1], dtype=self.val.dtype)
        per_row = max(1, int(offsets[-1]) // max(batch, 1))
        native.run_kernel(native._gather_rows, batch, batch, offsets, self.pos, self.val, self.count, n_out,
                          positions, values, min_items=max(native.MIN_BLOCK, native.SMALL_WORK // per_row))
        return torch.from_numpy(positions), torch.from_numpy(values), offsets


def _draw_args(rule, key: PhiloxKey | None) -> tuple:
    """The kernel's LocalZO arguments: (draw, seed, offset, m, dist, dist_param, cdf, |z| table, delta,
    scale, inverse), float32 where the torch reference computes in float32."""
    law = rule.law
    empty = np.zeros(2, dtype=np.float32)
    if key is None or rule.grad != "localzo":
        return (False, 0, 0, 1, 0, 0.0, empty, empty, np.float32(0.0), np.float32(0.0), False)
    name = kernel_law(law)
    code = KERNEL_LAWS.index(name)
    cdf, table_z = (t.numpy() for t in law.sampling_tables("cpu")) if name == "table" else (empty, empty)
    param = law.k * law.delta if name == "fast_sigmoid" else 0.0
    return (True, key.seed, key.offset & 0xFFFFFFFF, rule.m, code, param, cdf, table_z,
            np.float32(rule.delta), np.float32(law.c / (2.0 * rule.delta * rule.m)), law.alpha != 1)


def _run_forward(x, weight, bias, cfg: LIFConfig, cand_threshold: float, caps: tuple[int, int], draw: tuple,
                 workspace: Workspace):
    """The forward kernel over all rows: (spikes, candidate buffers, spike buffers)."""
    steps, batch, _ = x.shape
    n_out, dtype = weight.shape[0], weight.dtype
    table = _numpy(weight.t(), dtype)
    bias_np = _numpy(bias, dtype) if bias is not None else np.zeros(n_out, dtype=table.dtype)
    spikes = np.empty((steps, batch, n_out), dtype=table.dtype)
    v = np.full((batch, n_out), -cfg.threshold, dtype=table.dtype)
    s = np.zeros((batch, n_out), dtype=table.dtype)
    candidates = _Buffers("candidates", steps, batch, caps[0], dtype, workspace)
    fired = _Buffers("spikes", steps, batch, caps[1], dtype, workspace)
    events = events_of(x)
    event_driven = events.nnz <= EVENT_DENSITY * x.numel()
    common = (_scalar(cfg.beta, dtype), _scalar(cfg.threshold, dtype), _scalar(cfg.threshold * (1.0 - cfg.beta), dtype),
              v, s, spikes, _scalar(cand_threshold, dtype),
              candidates.pos, candidates.val, candidates.count,
              candidates.row_counts, fired.pos, fired.val, fired.count, fired.row_counts, *draw)
    if event_driven:
        row_ptr, cols = events.row_ptr.numpy(), events.cols.numpy()
        values = _numpy(events.values, dtype)
        empty = np.zeros((1, 1, 1), dtype=table.dtype)
        native.run_kernel(native._lif_rows, batch, 0, steps, batch, row_ptr, cols, values, table, empty, False,
                          bias_np, *common)
    else:
        no_events = (np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, table.dtype))
        x = dense(x)
        for t0 in range(0, steps, CURRENT_CHUNK):
            t1 = min(steps, t0 + CURRENT_CHUNK)
            current = _numpy(torch.matmul(x[t0:t1].to(dtype), weight.detach().t()), dtype)
            native.run_kernel(native._lif_rows, batch, t0, t1, batch, *no_events, table, current, True, bias_np, *common)
    return spikes, candidates, fired


def _no_dense_g(x, weight, bias, cfg: LIFConfig, needs_grad: bool, *_) -> bool:
    """The native forward keeps g as an active set: not the surrogate rule's training forward."""
    return not (needs_grad and cfg.rule.grad == "surrogate")


@register("lif_forward", "native", accepts=_no_dense_g)
def lif_forward(x, weight, bias, cfg: LIFConfig, needs_grad: bool, key: PhiloxKey | None,
                workspace: Workspace) -> LIFForward:
    rule = cfg.rule
    steps, batch, _ = x.shape
    n_out, dtype = weight.shape[0], weight.dtype
    if not needs_grad:
        threshold = 0.0
    elif rule.grad == "sparsegrad":
        threshold = _rounded(rule.bth, dtype)
    else:
        threshold = _rounded(candidate_threshold(rule.law, rule.delta), dtype)
    default = max(16, steps * n_out // 16)
    caps = [workspace.hints.get("candidates_per_row", default), workspace.hints.get("spikes_per_row", default)]
    draw = _draw_args(rule, key if needs_grad else None)
    while True:
        spikes, candidates, fired = _run_forward(x, weight, bias, cfg, threshold, tuple(caps), draw, workspace)
        overflow = (candidates.overflow(), fired.overflow())
        if not any(overflow):
            break
        caps = [int(seen * 1.25) + 16 if seen else cap for seen, cap in zip(overflow, caps)]  # rare: run again
    for name, buffers in (("candidates_per_row", candidates), ("spikes_per_row", fired)):
        workspace.hints[name] = max(16, int(int(buffers.count.max(initial=0)) * 1.25))
    spikes_t = torch.from_numpy(spikes)
    positions, ones, row_ptr = fired.gather(n_out)
    cache_events(spikes_t, Events(torch.from_numpy(row_ptr), positions % n_out, ones))
    if not needs_grad:
        return LIFForward(spikes_t, None, None)
    positions_t, values, _ = candidates.gather(n_out)
    if rule.grad == "sparsegrad":  # values: |v| at |v| < B_th
        return LIFForward(spikes_t, None, ActiveSet(positions_t, rule.law.expected_grad(values, rule.delta),
                                                    spikes.shape))
    return LIFForward(spikes_t, None, ActiveSet(positions_t, values.float(), spikes.shape))  # values: LocalZO g


@register("weight_grad", "native")
def weight_grad(ds, active: ActiveSet, x, beta: float, weight_shape, bias: bool, workspace: Workspace):
    """dW = sum over active (t, b, i) of ds * eps[t, b, :], each batch row's trace built on the fly
    (blocks summed in a fixed order); db as the torch backend's (CPU: deterministic)."""
    steps, batch, _ = active.shape
    dtype = ds.dtype
    events = events_of(x)
    act_ptr = _row_pointer(active.rows, steps * batch)
    blocks = native.block_ranges(batch)
    out = np.zeros((len(blocks),) + tuple(weight_shape), dtype=_np_dtype(dtype))
    args = (steps, batch, _scalar(beta, dtype), events.row_ptr.numpy(), events.cols.numpy(), _numpy(events.values, dtype),
            act_ptr,
            active.neurons.numpy(), _numpy(ds, dtype))
    native.run_blocks(lambda block, lo, hi: native._weight_grad_rows(lo, hi, *args, out[block]), batch)
    grad_b = sparse_bias_grad(ds, active, beta, weight_shape[0]) if bias else None
    return torch.from_numpy(out.sum(0)), grad_b


@register("input_grad", "native")
def input_grad(ds, active: ActiveSet, beta: float, weight, targets: ActiveSet, workspace: Workspace):
    """dL/dx at the targets: each batch row's reverse filter of ds, dotted with W's columns there."""
    steps, batch, _ = active.shape
    dtype = ds.dtype
    out = np.empty(targets.nnz, dtype=_np_dtype(dtype))
    native.run_kernel(native._input_grad_rows, batch, steps, batch, _scalar(beta, dtype), _row_pointer(active.rows, steps * batch),
                      active.neurons.numpy(), _numpy(ds, dtype), _numpy(weight.t(), dtype),
                      _row_pointer(targets.rows, steps * batch), targets.neurons.numpy(), out)
    return torch.from_numpy(out)


@register("time_filter", "native")
def time_filter(grid, beta: float, reverse: bool):
    """In place along dim 0, columns in fixed blocks."""
    grid = grid.contiguous()
    flat = grid.view(grid.shape[0], -1).numpy()
    native.run_kernel(native._time_filter_columns, flat.shape[1], flat, _scalar(beta, grid.dtype), reverse,
                      min_items=max(native.MIN_BLOCK, native.SMALL_WORK // max(flat.shape[0], 1)))
    return grid


class NativeBackend:
    """numba kernels on CPU for float32 and float64 layers (see the module docstring)."""

    name = "native"

    @staticmethod
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        return native.AVAILABLE and device.type == "cpu" and dtype in DTYPES

    @staticmethod
    def unsupported(rule) -> str | None:
        return kernel_law_refusal(rule.law, "native") if rule.grad == "localzo" else None


def warm_up(dtype: torch.dtype) -> None:
    """Compile the backend's kernels for `dtype` on a tiny problem (`ztriton.native.warm_up` calls it)."""
    law = get_distribution("normal")
    x = torch.eye(2, dtype=dtype).expand(3, 2, 2).contiguous()
    weight = torch.ones(2, 2, dtype=dtype)
    cfg = LIFConfig(0.9, 0.5, SpikeRule("localzo", law, 1.0, 1, 1.0))
    out = lif_forward(x, weight, None, cfg, True, PhiloxKey(1, 0), Workspace())
    active = out.active if out.active.nnz else ActiveSet(torch.tensor([0]), torch.ones(1, dtype=dtype), (3, 2, 2))
    ds = torch.ones(active.nnz, dtype=dtype)
    weight_grad(ds, active, x, 0.9, weight.shape, True, Workspace())
    input_grad(ds, active, 0.9, weight, active, Workspace())
    time_filter(torch.ones(3, 2, dtype=dtype), 0.9, True)


native.register_warm_up(warm_up)
