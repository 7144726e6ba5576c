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
The LIF family (DESIGN.md section 9): the forward adds each row's recurrent current from its own
spikes of the step before and records the forward traces at the kept entries; `lif_adjoint` walks
each row's delta from t = T-1 down, the recurrent term at the active entries only
(`lif_adjoint_grid`, the dense path, walks the full grid, the recurrent term where g != 0).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import native
from ..events import Events, cache_events, dense, events_of
from ..distributions import KERNEL_LAWS, get_distribution, kernel_law, kernel_law_refusal
from ..functional import candidate_threshold
from ..rng import PhiloxKey
from ..sparse import ActiveSet
from .base import LIFConfig, LIFForward, SpikeRule, Workspace
from .lif_family import FamilyForward, FamilyTraces
from .lif_forward import EVENT_DENSITY
from .registry import register
from .weight_grad import sparse_bias_grad

DTYPES = (torch.float32, torch.float64)
#: time steps of GEMM current per kernel call for dense inputs above the event density
CURRENT_CHUNK = 64


def _numpy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    return t.detach().to(dtype).contiguous().numpy()


def _row_pointer(rows: torch.Tensor, count: int) -> np.ndarray:
    """`events.row_pointer` by numpy's serial bincount: torch's parallel one was seen to take 24 ms
    instead of 0.1 ms (77k rows) on a loaded 2-core machine."""
    ptr = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows.numpy(), minlength=count), out=ptr[1:])
    return ptr


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

    def _offsets(self) -> tuple[np.ndarray, int]:
        """The CSR pointer over (t, b) rows, and the fewest batch rows worth a block of the gather."""
        steps, batch = self.row_counts.shape
        offsets = np.zeros(steps * batch + 1, dtype=np.int64)
        np.cumsum(self.row_counts.reshape(-1), out=offsets[1:])
        per_row = max(1, int(offsets[-1]) // max(batch, 1))
        return offsets, max(native.MIN_BLOCK, native.SMALL_WORK // per_row)

    def gather(self, n_out: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """(positions, values) in row-major order, and the CSR pointer over (t, b) rows."""
        offsets, min_items = self._offsets()
        positions = np.empty(offsets[-1], dtype=np.int64)
        values = np.empty(offsets[-1], dtype=self.val.dtype)
        batch = self.count.shape[0]
        native.run_kernel(native._gather_rows, batch, batch, offsets, self.pos, self.val, self.count, n_out,
                          positions, values, min_items=min_items)
        return torch.from_numpy(positions), torch.from_numpy(values), offsets

    def sources(self, n_out: int) -> tuple[torch.Tensor, np.ndarray]:
        """(positions in row-major order, each one's place in the flattened (batch, capacity) lists):
        `array.reshape(-1)[sources]` orders any list kept alongside (values, traces) the same way."""
        offsets, min_items = self._offsets()
        positions = np.empty(offsets[-1], dtype=np.int64)
        sources = np.empty(offsets[-1], dtype=np.int64)
        batch = self.count.shape[0]
        native.run_kernel(native._gather_sources, batch, batch, offsets, self.pos, self.count, n_out, positions,
                          sources, min_items=min_items)
        return torch.from_numpy(positions), sources


def _draw_args(rule, key: PhiloxKey | None) -> tuple:
    """The kernel's LocalZO arguments: (draw, seed, offset, m, dist, dist_param, cdf, |z| table, delta,
    scale, inverse), float32 where the torch reference computes in float32."""
    law = rule.law
    empty = np.zeros(2, dtype=np.float32)
    if key is None or rule.grad != "localzo":
        return (False, np.uint64(0), np.uint64(0), 1, 0, 0.0, empty, empty, np.float32(0.0), np.float32(0.0), False)
    name = kernel_law(law)
    code = KERNEL_LAWS.index(name)
    cdf, table_z = (t.numpy() for t in law.sampling_tables("cpu")) if name == "table" else (empty, empty)
    param = law.k * law.delta if name == "fast_sigmoid" else 0.0
    return (True, np.uint64(key.seed), np.uint64(key.offset & 0xFFFFFFFF), rule.m, code, param, cdf, table_z,
            np.float32(rule.delta), np.float32(law.c / (2.0 * rule.delta * rule.m)), law.alpha != 1)


def _over_input(kernel, x, weight, table: np.ndarray, *rest) -> None:
    """kernel(rows, t0, t1, batch, row_ptr, cols, values, table, current, use_current, *rest) over all
    batch rows: once over the input events of every (t, b) row, or for inputs denser than
    EVENT_DENSITY CURRENT_CHUNK steps at a time with the current of a GEMM."""
    steps, batch, _ = x.shape
    dtype = weight.dtype
    events = events_of(x)
    if events.nnz <= EVENT_DENSITY * x.numel():
        empty = np.zeros((1, 1, 1), dtype=table.dtype)
        native.run_kernel(kernel, batch, 0, steps, batch, events.row_ptr.numpy(), events.cols.numpy(),
                          _numpy(events.values, dtype), table, empty, False, *rest)
        return
    no_events = (np.zeros(1, np.int64), np.zeros(0, np.int64), np.zeros(0, table.dtype))
    x = dense(x)
    for t0 in range(0, steps, CURRENT_CHUNK):
        t1 = min(steps, t0 + CURRENT_CHUNK)
        current = _numpy(torch.matmul(x[t0:t1].to(dtype), weight.detach().t()), dtype)
        native.run_kernel(kernel, batch, t0, t1, batch, *no_events, table, current, True, *rest)


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
    _over_input(native._lif_rows, x, weight, table, bias_np, _scalar(cfg.beta, dtype), _scalar(cfg.threshold, dtype),
                _scalar(cfg.threshold * (1.0 - cfg.beta), dtype), v, s, spikes, _scalar(cand_threshold, dtype),
                candidates.pos, candidates.val, candidates.count, candidates.row_counts, fired.pos, fired.val,
                fired.count, fired.row_counts, *draw)
    return spikes, candidates, fired


def _candidate_threshold(rule: SpikeRule, needs_grad: bool, dtype: torch.dtype) -> float:
    """|v| below which an entry can be active (0: none, without needs_grad), rounded to `dtype`."""
    if not needs_grad:
        return 0.0
    if rule.grad == "sparsegrad":
        return _rounded(rule.bth, dtype)
    return _rounded(candidate_threshold(rule.law, rule.delta), dtype)


def _with_capacity(run, hints: tuple[str, str], per_row: int, workspace: Workspace):
    """run(caps) -> (spikes, candidate buffers, ..., spike buffers) with per-row capacities from the
    workspace's hints (default per_row / 16), run again with more room while a row overflowed (rare);
    the hints then learn the largest counts seen."""
    default = max(16, per_row // 16)
    caps = [workspace.hints.get(name, default) for name in hints]
    while True:
        result = run(tuple(caps))
        candidates, fired = result[1], result[-1]
        overflow = (candidates.overflow(), fired.overflow())
        if not any(overflow):
            break
        caps = [int(seen * 1.25) + 16 if seen else cap for seen, cap in zip(overflow, caps)]
        del result, candidates, fired  # freed before the rerun allocates its own (T, B, N) spikes
    for name, buffers in zip(hints, (candidates, fired)):
        workspace.hints[name] = max(16, int(int(buffers.count.max(initial=0)) * 1.25))
    return result


def _no_dense_g(x, weight, bias, cfg: LIFConfig, needs_grad: bool, *_) -> bool:
    """The native forward keeps g as an active set: not the surrogate rule's training forward."""
    return not (needs_grad and cfg.rule.grad == "surrogate")


@register("lif_forward", "native", accepts=_no_dense_g)
def lif_forward(x, weight, bias, cfg: LIFConfig, needs_grad: bool, key: PhiloxKey | None,
                workspace: Workspace) -> LIFForward:
    rule = cfg.rule
    steps, batch, _ = x.shape
    n_out, dtype = weight.shape[0], weight.dtype
    threshold = _candidate_threshold(rule, needs_grad, dtype)
    draw = _draw_args(rule, key if needs_grad else None)
    spikes, candidates, fired = _with_capacity(
        lambda caps: _run_forward(x, weight, bias, cfg, threshold, caps, draw, workspace),
        ("candidates_per_row", "spikes_per_row"), steps * n_out, workspace)
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


def _family_no_dense_g(x, weight, bias, recurrent_weight, threshold, cfg: LIFConfig, needs_grad: bool, *_) -> bool:
    """The native family forward keeps g as an active set: not the surrogate rule's training forward."""
    return not (needs_grad and cfg.rule.grad == "surrogate")


def _run_family(x, weight, bias, recurrent_weight, threshold, cfg: LIFConfig, wants: tuple[bool, bool, bool],
                cand_threshold: float, caps: tuple[int, int], draw: tuple, workspace: Workspace):
    """The family's forward kernel over all rows: (spikes, candidate buffers, the traces' per-row lists
    (leak, reset, last spike; (1, 1) where not wanted), spike buffers)."""
    steps, batch, _ = x.shape
    n_out, dtype = weight.shape[0], weight.dtype
    np_dtype, cpu = _np_dtype(dtype), torch.device("cpu")
    table = _numpy(weight.t(), dtype)
    bias_np = _numpy(bias, dtype) if bias is not None else np.zeros(n_out, dtype=np_dtype)
    recurrent = recurrent_weight is not None
    rec_table = _numpy(recurrent_weight.t(), dtype) if recurrent else np.zeros((1, 1), dtype=np_dtype)
    spikes = np.empty((steps, batch, n_out), dtype=np_dtype)
    u, s, leak, reset = (np.zeros((batch, n_out), dtype=np_dtype) for _ in range(4))
    last = np.full((batch, n_out), -1, dtype=np.int64)
    candidates = _Buffers("family_candidates", steps, batch, caps[0], dtype, workspace)
    fired = _Buffers("family_spikes", steps, batch, caps[1], dtype, workspace)
    traces = tuple(workspace.get(f"family_{name}", (batch, caps[0]) if wanted else (1, 1), kind, cpu).numpy()
                   for name, wanted, kind in zip(("leak", "reset", "last"), wants, (dtype, dtype, torch.int64)))
    _over_input(native._family_rows, x, weight, table, bias_np, rec_table, recurrent, _scalar(cfg.beta, dtype),
                _numpy(threshold, dtype), cfg.reset == "zero", u, s, leak, reset, last, spikes,
                _scalar(cand_threshold, dtype), candidates.pos, candidates.val, candidates.count,
                candidates.row_counts, *wants, *traces, fired.pos, fired.val, fired.count, fired.row_counts, *draw)
    return spikes, candidates, traces, fired


@register("lif_family_forward", "native", accepts=_family_no_dense_g)
def lif_family_forward(x, weight, bias, recurrent_weight, threshold, cfg: LIFConfig, needs_grad: bool,
                       key: PhiloxKey | None, workspace: Workspace) -> FamilyForward:
    """The torch op's result (`backends.lif_family`, DESIGN.md section 9) from one kernel call per
    block of batch rows over all T steps: feed-forward current as `lif_forward`, the recurrent one
    from the row's own spikes of the step before, the traces recorded at the kept entries only."""
    rule = cfg.rule
    steps, batch, _ = x.shape
    n_out, dtype = weight.shape[0], weight.dtype
    zero_reset = cfg.reset == "zero"
    wants = (needs_grad and cfg.trace_leak, needs_grad and cfg.trace_reset, needs_grad and zero_reset)
    cand_threshold = _candidate_threshold(rule, needs_grad, dtype)
    draw = _draw_args(rule, key if needs_grad else None)
    spikes, candidates, traces, fired = _with_capacity(
        lambda caps: _run_family(x, weight, bias, recurrent_weight, threshold, cfg, wants, cand_threshold, caps, draw,
                                 workspace),
        ("family_candidates_per_row", "family_spikes_per_row"), steps * n_out, workspace)
    spikes_t = torch.from_numpy(spikes)
    positions, ones, row_ptr = fired.gather(n_out)
    cache_events(spikes_t, Events(torch.from_numpy(row_ptr), positions % n_out, ones))
    if not needs_grad:
        return FamilyForward(spikes_t, None, None, FamilyTraces(None, None, None))
    positions_t, sources = candidates.sources(n_out)
    values = torch.from_numpy(candidates.val.reshape(-1)[sources])
    grad = rule.law.expected_grad(values, rule.delta) if rule.grad == "sparsegrad" else values.float()
    kept = [torch.from_numpy(trace.reshape(-1)[sources]) if wanted else None for trace, wanted in zip(traces, wants)]
    return FamilyForward(spikes_t, None, ActiveSet(positions_t, grad, spikes.shape), FamilyTraces(*kept))


@register("lif_adjoint", "native")
def lif_adjoint(ext, active: ActiveSet, beta: float, reset_spikes, recurrent_weight, weight, targets: ActiveSet | None,
                full_grid: bool, workspace: Workspace):
    """The torch op's triple (ds at the active entries, dL/dx at `targets` or None, the delta grid or
    None) from one reverse walk per batch row (`native._adjoint_rows`, DESIGN.md section 9)."""
    steps, batch, _ = active.shape
    dtype = ext.dtype
    np_dtype = _np_dtype(dtype)
    recurrent = recurrent_weight is not None
    rec_table = _numpy(recurrent_weight.t(), dtype) if recurrent else np.zeros((1, 1), dtype=np_dtype)
    spikes = _numpy(reset_spikes, dtype) if reset_spikes is not None else np.zeros((1, 1, 1), dtype=np_dtype)
    if targets is not None:
        tgt_ptr, tgt_input = _row_pointer(targets.rows, steps * batch), targets.neurons.numpy()
    else:
        tgt_ptr, tgt_input = np.zeros(steps * batch + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ds = np.empty(active.nnz, dtype=np_dtype)
    out = np.empty(tgt_input.shape[0], dtype=np_dtype)
    grid = np.empty(tuple(active.shape) if full_grid else (1, 1, 1), dtype=np_dtype)
    native.run_kernel(native._adjoint_rows, batch, steps, batch, _scalar(beta, dtype),
                      _row_pointer(active.rows, steps * batch), active.neurons.numpy(), _numpy(ext, dtype),
                      _numpy(active.grad, dtype), rec_table, recurrent, spikes, reset_spikes is not None,
                      _numpy(weight.t(), dtype), tgt_ptr, tgt_input, full_grid, ds, out, grid)
    return (torch.from_numpy(ds), torch.from_numpy(out) if targets is not None else None,
            torch.from_numpy(grid) if full_grid else None)


@register("lif_adjoint_grid", "native")
def lif_adjoint_grid(ext, g, beta: float, reset_spikes, recurrent_weight):
    """The torch op's (delta, ds) on the full grid (the dense path): one reverse walk per batch row
    (`native._adjoint_grid_rows`), the recurrent term only where g != 0."""
    dtype = ext.dtype
    np_dtype = _np_dtype(dtype)
    recurrent = recurrent_weight is not None
    rec_table = _numpy(recurrent_weight.t(), dtype) if recurrent else np.zeros((1, 1), dtype=np_dtype)
    spikes = _numpy(reset_spikes, dtype) if reset_spikes is not None else np.zeros((1, 1, 1), dtype=np_dtype)
    delta = np.empty(tuple(ext.shape), dtype=np_dtype)
    ds = np.empty_like(delta)
    native.run_kernel(native._adjoint_grid_rows, ext.shape[1], _numpy(ext, dtype), _numpy(g, dtype),
                      _scalar(beta, dtype), rec_table, recurrent, spikes, reset_spikes is not None, delta, ds)
    return torch.from_numpy(delta), torch.from_numpy(ds)


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
    family = LIFConfig(0.9, 0.5, cfg.rule, "zero", trace_leak=True, trace_reset=True)
    out = lif_family_forward(x, weight, None, weight, torch.full((2,), 0.5, dtype=dtype), family, True, PhiloxKey(1, 0),
                             Workspace())
    lif_adjoint(ds, active, 0.9, out.spikes, weight, weight, active, True, Workspace())
    lif_adjoint_grid(x, x, 0.9, out.spikes, weight)


native.register_warm_up(warm_up)
