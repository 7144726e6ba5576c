"""LIF layer engine: forward recurrence, the active set, and dense and sparse layerwise backward.

Neuron (paper eq. 1, reset held constant in backward):

    u[t] = beta u[t-1] + I[t] - u_th s[t-1],  I[t] = W x[t] (+ b),  s[t] = H(u[t] - u_th).

Unrolled (appendix B.1, eq. 25-26), with the input trace eps[t] = sum_{k<=t} beta^{t-k} x[k] and
ds = grad_s * g:

    dL/dW = sum_{t,b} ds[t,b,:]^T eps[t,b,:]          (only active entries contribute)
    dL/dx[k] = D[k] W,  D[k] = sum_{t>=k} beta^{t-k} ds[t]   (a reverse-time filter of ds)

The forward streams the input current FORWARD_CHUNK steps at a time and keeps only the active
entries (g != 0) for backward. The dense path forms ds on the whole (T, B, N) grid and uses GEMMs;
the sparse path touches only the active entries: the weight gradient multiplies them, as a sparse
matrix, with the trace built chunk by chunk, and where the input came from another spiking layer,
the input gradient is computed only at that layer's active entries (the only places where its g,
hence its need for a gradient, is non-zero). The set travels with the output spikes as a
`SpikeLink`.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from .distributions import Distribution
from .functional import localzo_active

#: time steps whose input current is held at once by the forward (the whole (T, B, N) current
#: is never materialised on the torch backend)
FORWARD_CHUNK = 64
#: input density up to which the input current is summed over events instead of a dense GEMM
#: (on a 2-core CPU, a 64-step chunk at 2 % density: 7.8 ms against 24 ms for the GEMM)
EVENT_DENSITY = 0.05
#: time steps of input trace held at once by the sparse weight gradient (a 16 x B x N_in block
#: stays in cache while its rows are gathered)
TRACE_CHUNK = 16
#: active entries processed at once when gathering rows: small enough that the gathered block stays
#: in cache (on a 2-core CPU, 2,048 rows run 12x faster than 16,384 for a 700-wide trace)
GATHER_CHUNK = 2_048


class Workspace:
    """Named buffers reused across calls: on CPU every fresh large tensor costs page faults."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        shape = torch.Size(shape)
        buffer = self._buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype or buffer.device != device:
            buffer = torch.empty(shape, dtype=dtype, device=device)
            self._buffers[name] = buffer
        return buffer

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


@dataclass(frozen=True)
class SpikeRule:
    """How g is formed in forward: `grad` is "localzo", "sparsegrad" or "surrogate"."""

    grad: str
    law: Distribution
    delta: float
    m: int
    bth: float


class ActiveSet:
    """The entries of a (T, B, N) grid with g != 0: flat indices (row-major, so sorted by time) and g."""

    def __init__(self, index: torch.Tensor, grad: torch.Tensor, shape: torch.Size):
        self.index = index
        self.grad = grad
        self.shape = shape

    @property
    def nnz(self) -> int:
        return self.index.numel()

    @property
    def fraction(self) -> float:
        return self.nnz / max(1, self.shape.numel())

    @functools.cached_property
    def rows(self) -> torch.Tensor:
        """Row t * B + b of the flattened (T * B, N) grid for every active entry (computed on first use)."""
        return torch.div(self.index, self.shape[2], rounding_mode="floor")

    @functools.cached_property
    def neurons(self) -> torch.Tensor:
        """Neuron n of every active entry (computed on first use)."""
        return self.index % self.shape[2]

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(t, b, n) of every active entry."""
        batch = self.shape[1]
        return torch.div(self.rows, batch, rounding_mode="floor"), self.rows % batch, self.neurons

    def dense(self) -> torch.Tensor:
        """g on the full grid (zero where inactive)."""
        out = torch.zeros(self.shape, dtype=self.grad.dtype, device=self.grad.device)
        out.view(-1).index_copy_(0, self.index, self.grad)
        return out

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.grad.numel() * self.grad.element_size()


class SpikeLink:
    """Rides on a layer's output spikes so that a consumer layer computes input gradients sparsely.

    The consumer adds its gradient at the producer's active entries into `received`; the producer's
    backward reads and clears it.
    """

    def __init__(self, active: ActiveSet):
        self.active = active
        self.received: torch.Tensor | None = None

    def receive(self, values: torch.Tensor) -> None:
        self.received = values if self.received is None else self.received + values

    def take(self) -> torch.Tensor | None:
        values, self.received = self.received, None
        return values


LINK_ATTR = "_ztriton_link"


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """Backward arithmetic precision: float64 for a float64 layer, float32 otherwise."""
    return torch.promote_types(weight.dtype, torch.float32)


def link_of(x: torch.Tensor) -> SpikeLink | None:
    """The SpikeLink riding on `x` (None for a plain tensor)."""
    return getattr(x, LINK_ATTR, None)


def lif_recurrence(
    current: torch.Tensor, spikes: torch.Tensor, beta: float, threshold: float,
    previous: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run eq. 1 in place: `current` (T, B, N) holds I on entry and v = u - u_th on exit.

    Tracks v directly: v[t] = beta v[t-1] + I[t] - u_th (1 - beta) - u_th s[t-1], v[-1] = -u_th,
    s[-1] = 0, or `previous` = (v, s) of the step before when the sequence is processed in pieces.
    Writes H(v) into `spikes` and returns `current`.
    """
    current.sub_(threshold * (1.0 - beta))
    steps = current.shape[0]
    if steps == 0:
        return current
    if previous is None:
        current[0].sub_(beta * threshold)
    else:
        current[0].add_(previous[0], alpha=beta).sub_(previous[1], alpha=threshold)
    torch.gt(current[0], 0, out=spikes[0])
    for t in range(1, steps):
        v = current[t]
        v.add_(current[t - 1], alpha=beta).sub_(spikes[t - 1], alpha=threshold)
        torch.gt(v, 0, out=spikes[t])
    return current


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


def active_set(v: torch.Tensor, rule: SpikeRule, generator: torch.Generator | None) -> ActiveSet:
    """The entries with g != 0 and their g, for the LocalZO or SparseGrad rule.

    LocalZO draws exactly as `functional.localzo_grad` does on the same v with the same generator
    state (the same `localzo_active`). `v` is overwritten by |v|.
    """
    abs_v = v.abs_().view(-1)
    if rule.grad == "sparsegrad":
        index = torch.nonzero(abs_v < rule.bth).squeeze(1)
        return ActiveSet(index, rule.law.expected_grad(abs_v[index], rule.delta), v.shape)
    index, grad = localzo_active(abs_v, rule.delta, rule.m, rule.law, generator)
    return ActiveSet(index, grad, v.shape)


def _active_grad(grad_spikes: torch.Tensor, link: SpikeLink, active: ActiveSet, dtype: torch.dtype) -> torch.Tensor:
    """ds at the active entries: (dense upstream gradient + gradient received through the link) * g.

    Gathers by coordinates, so a broadcast zero gradient (from `zero_grad_like`) is never materialised.
    """
    t, b, n = active.coordinates()
    values = grad_spikes[t, b, n].to(dtype)
    received = link.take()
    if received is not None:
        values = values + received
    return values * active.grad.to(dtype)


def sparse_weight_grad(
    ds: torch.Tensor, active: ActiveSet, x: torch.Tensor, beta: float, weight_shape: torch.Size,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """dW = sum over active (t, b, i) of ds * eps[t, b, :], the trace built TRACE_CHUNK steps at a time.

    The active entries are grouped once by (chunk, neuron); per chunk they form a CSR matrix
    (N_out, chunk rows) of ds, and one sparse x dense product with the trace chunk reads only the
    rows it needs (nnz x N_in work). Stops after the last chunk that has an active entry.
    """
    steps, batch, _ = active.shape
    n_out, n_in = weight_shape
    grad_w = torch.zeros(weight_shape, dtype=ds.dtype, device=x.device)
    if active.nnz == 0:
        return grad_w
    rows = active.rows
    span = TRACE_CHUNK * batch
    key = torch.div(rows, span, rounding_mode="floor") * n_out + active.neurons
    order = torch.argsort(key, stable=True)
    n_chunks = -(-steps // TRACE_CHUNK)
    crow_all = torch.zeros(n_chunks * n_out + 1, dtype=torch.int64, device=x.device)
    torch.cumsum(torch.bincount(key, minlength=n_chunks * n_out), 0, out=crow_all[1:])
    local_rows, values = rows[order] % span, ds[order]
    bounds = crow_all[::n_out].tolist()
    workspace = workspace or Workspace()
    trace = workspace.get("trace", (TRACE_CHUNK, batch, n_in), ds.dtype, x.device)
    carry = workspace.get("carry", (batch, n_in), ds.dtype, x.device).zero_()  # eps before the chunk
    flat = trace.view(span, n_in)
    last_chunk = int(key.max()) // n_out
    for chunk in range(last_chunk + 1):
        start = chunk * TRACE_CHUNK
        previous = carry
        for step in range(min(TRACE_CHUNK, steps - start)):
            torch.add(x[start + step], previous, alpha=beta, out=trace[step])  # eps[t] = x[t] + beta eps[t-1]
            previous = trace[step]
        carry.copy_(previous)
        lo, hi = bounds[chunk], bounds[chunk + 1]
        if hi > lo:
            crow = crow_all[chunk * n_out : (chunk + 1) * n_out + 1] - lo
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
                matrix = torch.sparse_csr_tensor(crow, local_rows[lo:hi], values[lo:hi], (n_out, span),
                                                 check_invariants=False)
            grad_w.addmm_(matrix, flat)
    return grad_w


def sparse_bias_grad(ds: torch.Tensor, active: ActiveSet, beta: float, n_out: int) -> torch.Tensor:
    """db = sum over active (t, b, i) of ds * sum_{k<=t} beta^{t-k}."""
    t, _, neurons = active.coordinates()
    steps = (t + 1).double()
    gain = steps if beta == 1.0 else (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), steps)) / (1.0 - beta)
    grad_b = torch.zeros(n_out, dtype=ds.dtype, device=ds.device)
    return grad_b.index_add_(0, neurons, ds * gain.to(ds.dtype))


def filtered_grad(ds: torch.Tensor, active: ActiveSet, beta: float) -> torch.Tensor:
    """D = reverse-time filter of ds scattered on the full (T, B, N) grid."""
    dense = torch.zeros(active.shape, dtype=ds.dtype, device=ds.device)
    dense.view(-1).index_copy_(0, active.index, ds)
    return reverse_filter_(dense, beta)


def _row_dots(flat, rows, weight_t, inputs, out, workspace: Workspace) -> None:
    """out[k] = flat[rows[k]] . weight_t[inputs[k]], GATHER_CHUNK targets at a time."""
    width = flat.shape[1]
    block = workspace.get("rows", (GATHER_CHUNK, width), flat.dtype, flat.device)
    columns = workspace.get("columns", (GATHER_CHUNK, width), flat.dtype, flat.device)
    for lo in range(0, rows.numel(), GATHER_CHUNK):
        hi = min(rows.numel(), lo + GATHER_CHUNK)
        picked = torch.index_select(flat, 0, rows[lo:hi], out=block[: hi - lo])
        picked.mul_(torch.index_select(weight_t, 0, inputs[lo:hi], out=columns[: hi - lo]))
        torch.sum(picked, 1, out=out[lo:hi])


def input_grad_at(
    filtered: torch.Tensor, weight: torch.Tensor, targets: ActiveSet, workspace: Workspace | None = None
) -> torch.Tensor:
    """dL/dx only at `targets` (entries of the input grid): D[t, b, :] . W[:, j] for each (t, b, j)."""
    out = torch.empty(targets.nnz, dtype=filtered.dtype, device=filtered.device)
    weight_t = weight.t().to(filtered.dtype).contiguous()
    _row_dots(filtered.view(-1, filtered.shape[2]), targets.rows, weight_t, targets.neurons, out,
              workspace or Workspace())
    return out


def sparse_input_grad(
    ds: torch.Tensor, active: ActiveSet, beta: float, weight: torch.Tensor, targets: ActiveSet,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """dL/dx at `targets` only, without the full D grid.

    Runs the reverse-time filter TRACE_CHUNK steps at a time from the end, carrying D across
    chunks, and gathers the targets of each chunk while it is in cache (the same values as
    `input_grad_at(filtered_grad(...))`).
    """
    steps, batch, width = active.shape
    workspace = workspace or Workspace()
    chunk = workspace.get("reverse", (TRACE_CHUNK, batch, width), ds.dtype, ds.device)
    carry = torch.zeros(batch, width, dtype=ds.dtype, device=ds.device)
    weight_t = weight.t().to(ds.dtype).contiguous()
    starts = torch.arange(0, steps + TRACE_CHUNK, TRACE_CHUNK, device=ds.device)
    source_bounds = torch.searchsorted(active.index, starts * batch * width).tolist()
    target_rows, target_inputs = targets.rows, targets.neurons
    target_bounds = torch.searchsorted(target_rows, starts * batch).tolist()
    out = torch.empty(targets.nnz, dtype=ds.dtype, device=ds.device)
    for number in range(len(starts) - 2, -1, -1):
        if target_bounds[number + 1] == 0:
            break  # no target at or before this chunk
        start = number * TRACE_CHUNK
        length = min(TRACE_CHUNK, steps - start)
        lo, hi = source_bounds[number], source_bounds[number + 1]
        chunk[:length].zero_()
        chunk.view(-1).index_copy_(0, active.index[lo:hi] - start * batch * width, ds[lo:hi])
        chunk[length - 1].add_(carry, alpha=beta)
        for t in range(length - 2, -1, -1):
            chunk[t].add_(chunk[t + 1], alpha=beta)
        carry.copy_(chunk[0])
        first, last = target_bounds[number], target_bounds[number + 1]
        _row_dots(chunk.view(-1, width), target_rows[first:last] - start * batch, weight_t,
                  target_inputs[first:last], out[first:last], workspace)
    return out


def zero_grad_like(x: torch.Tensor) -> torch.Tensor:
    """A zero gradient for `x` that costs no memory (a broadcast scalar)."""
    return torch.zeros((), dtype=x.dtype, device=x.device).expand(x.shape)


def input_events(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(rows, columns, values) of the non-zero entries of x seen as (rows, features), or None when
    more than EVENT_DENSITY of x is non-zero (dense products are then faster)."""
    flat = x.reshape(-1, x.shape[-1])
    rows, cols = torch.nonzero(flat, as_tuple=True)
    if rows.numel() > EVENT_DENSITY * flat.numel():
        return None
    return rows, cols, flat[rows, cols]


def event_current(events, n_rows: int, table: torch.Tensor) -> torch.Tensor:
    """(n_rows, N_out) = x W^T summed over the events only: embedding-bag rows of table = W^T."""
    rows, cols, values = events
    offsets = torch.zeros(n_rows, dtype=torch.int64, device=table.device)
    torch.cumsum(torch.bincount(rows, minlength=n_rows)[:-1], 0, out=offsets[1:])
    return torch.nn.functional.embedding_bag(cols, table, offsets, mode="sum", per_sample_weights=values.to(table.dtype))


def _streamed_forward(x, weight, bias, layer, generator, needs_grad: bool):
    """Eq. 1 and g, FORWARD_CHUNK time steps at a time: (spikes, dense g or None, ActiveSet or None).

    Each piece's input current goes into a reused buffer, summed over the input events while the
    input is sparse, else by one GEMM; the recurrence carries (v, s) across pieces; g is formed
    per piece (dense for the surrogate rule, an active set otherwise).
    """
    steps, batch, _ = x.shape
    n_out = weight.shape[0]
    rule, dtype = layer.rule, compute_dtype(weight)
    spikes = torch.empty(steps, batch, n_out, dtype=weight.dtype, device=weight.device)
    buffer = layer.workspace.get("current", (min(steps, FORWARD_CHUNK), batch, n_out), weight.dtype, weight.device)
    dense = needs_grad and rule.grad == "surrogate"
    g = torch.empty(spikes.shape, dtype=dtype, device=weight.device) if dense else None
    indices, grads, previous = [], [], None
    sparse_input, table = True, weight.t().contiguous()  # event-driven while the input stays sparse
    for start in range(0, steps, FORWARD_CHUNK):
        stop = min(steps, start + FORWARD_CHUNK)
        current = buffer[: stop - start]
        found = input_events(x[start:stop]) if sparse_input else None
        if found is not None:
            current.copy_(event_current(found, (stop - start) * batch, table).view(current.shape))
        else:
            sparse_input = False  # once dense, stay with the GEMM
            torch.matmul(x[start:stop].to(weight.dtype), weight.t(), out=current)
        if bias is not None:
            current += bias
        v = lif_recurrence(current, spikes[start:stop], layer.beta, layer.threshold, previous)
        previous = (v[-1].clone(), spikes[stop - 1])
        if dense:
            g[start:stop] = rule.law.expected_grad(v, rule.delta)
        elif needs_grad:
            piece = active_set(v, rule, generator)
            indices.append(piece.index + start * batch * n_out)
            grads.append(piece.grad)
    active = None
    if needs_grad and not dense:
        index = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64, device=weight.device)
        values = torch.cat(grads) if grads else torch.zeros(0, dtype=torch.float32, device=weight.device)
        active = ActiveSet(index, values, spikes.shape)
    return spikes, g, active


class TorchBackend:
    """The plain-torch implementation of the layer's sparse operations (every device)."""

    name = "torch"
    localzo_forward = None  # no fused forward: recurrence, then `active_set`
    weight_grad = staticmethod(sparse_weight_grad)
    filtered_grad = staticmethod(filtered_grad)
    sparse_input_grad = staticmethod(sparse_input_grad)


class LIFFunction(torch.autograd.Function):
    """Autograd function of SparseLIFLinear: forward recurrence with g, dense or sparse backward.

    forward(x, weight, bias, layer, generator, needs_grad, backend) -> spikes; with `needs_grad`
    False (inference, e.g. under torch.no_grad) no g is formed and nothing is kept. `layer`
    supplies the hyper-parameters (`beta`, `threshold`, `rule`), chooses the path from the
    measured activity (`choose_path`) and records its stats (`record`); `backend` (TorchBackend
    or TritonBackend) implements the sparse operations. The output carries a SpikeLink.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layer, generator, needs_grad, backend):
        rule = layer.rule
        if needs_grad and rule.grad == "localzo" and backend.localzo_forward is not None:
            current = torch.matmul(x.to(weight.dtype), weight.t())
            if bias is not None:
                current += bias
            spikes, active = backend.localzo_forward(current, layer.beta, layer.threshold, rule, generator)
            spikes, g = spikes.to(weight.dtype), None
        else:
            spikes, g, active = _streamed_forward(x, weight, bias, layer, generator, needs_grad)
            if not needs_grad:
                layer.record(path="none", active_fraction=None, saved_bytes=0, backend=backend.name, grid=spikes.numel())
                return spikes
        fraction = active.fraction if active is not None else float(torch.count_nonzero(g)) / max(1, g.numel())
        path = layer.choose_path(fraction)
        if path == "dense" and g is None:
            g = active.dense().to(compute_dtype(weight))
        if path == "sparse" and active is None:
            index = torch.nonzero(g.view(-1)).squeeze(1)
            active, g = ActiveSet(index, g.view(-1)[index], g.shape), None
        ctx.beta, ctx.path, ctx.has_bias = layer.beta, path, bias is not None
        ctx.upstream, ctx.workspace, ctx.backend = link_of(x), layer.workspace, backend
        ctx.link = SpikeLink(active) if active is not None else None
        ctx.save_for_backward(x, weight, g)
        saved = active.nbytes if path == "sparse" else g.numel() * g.element_size()
        layer.record(path=path, active_fraction=fraction, saved_bytes=saved, backend=backend.name, grid=spikes.numel())
        if ctx.link is not None:
            setattr(spikes, LINK_ATTR, ctx.link)
        return spikes

    @staticmethod
    def backward(ctx, grad_spikes):
        x, weight, g = ctx.saved_tensors
        step = _dense_backward if ctx.path == "dense" else _sparse_backward
        grad_x, grad_w, grad_b = step(ctx, grad_spikes, x, weight, g, compute_dtype(weight))
        grad_b = None if grad_b is None else grad_b.to(weight.dtype)
        return grad_x, grad_w.to(weight.dtype), grad_b, None, None, None, None


def _input_grad_from_filtered(ctx, x, weight, filtered, dtype, workspace=None):
    """dL/dx from the full D grid: sent through the link at the upstream layer's active entries
    (x then gets a zero gradient), or D W for a plain tensor."""
    if not ctx.needs_input_grad[0]:
        return None
    if ctx.upstream is not None:
        ctx.upstream.receive(input_grad_at(filtered, weight, ctx.upstream.active, workspace))
        return zero_grad_like(x)
    return filtered.view(-1, filtered.shape[2]).matmul(weight.to(dtype)).view(x.shape).to(x.dtype)


def _dense_backward(ctx, grad_spikes, x, weight, g, dtype):
    """GEMMs over the whole grid: D = reverse filter of grad_s * g, dW = D^T x, dx = D W."""
    ds = grad_spikes.to(dtype) * g
    received = ctx.link.take() if ctx.link is not None else None
    if received is not None:
        ds.view(-1).index_add_(0, ctx.link.active.index, received * ctx.link.active.grad.to(dtype))
    filtered = reverse_filter_(ds, ctx.beta)
    flat = filtered.view(-1, filtered.shape[2])
    grad_w = flat.t().matmul(x.reshape(-1, x.shape[2]).to(dtype))
    grad_b = flat.sum(0) if ctx.has_bias else None
    return _input_grad_from_filtered(ctx, x, weight, filtered, dtype, ctx.workspace), grad_w, grad_b


def _sparse_backward(ctx, grad_spikes, x, weight, g, dtype):
    """Work at the active entries only (and at the upstream layer's active entries for dx)."""
    active, backend, workspace = ctx.link.active, ctx.backend, ctx.workspace
    ds = _active_grad(grad_spikes, ctx.link, active, dtype)
    grad_w = backend.weight_grad(ds, active, x, ctx.beta, weight.shape, workspace)
    grad_b = sparse_bias_grad(ds, active, ctx.beta, weight.shape[0]) if ctx.has_bias else None
    if not ctx.needs_input_grad[0]:
        grad_x = None
    elif ctx.upstream is not None:
        targets = ctx.upstream.active
        ctx.upstream.receive(backend.sparse_input_grad(ds, active, ctx.beta, weight, targets, workspace))
        grad_x = zero_grad_like(x)
    else:
        grad_x = _input_grad_from_filtered(ctx, x, weight, backend.filtered_grad(ds, active, ctx.beta), dtype)
    return grad_x, grad_w, grad_b


class LeakyReadoutFunction(torch.autograd.Function):
    """o[t] = beta o[t-1] + (1 - beta) (W s[t] + b); backward by the reverse-time filter.

    When `s` carries a SpikeLink, the gradient for `s` is computed only at the producer's active entries.
    """

    @staticmethod
    def forward(ctx, spikes, weight, bias, beta):
        current = torch.matmul(spikes.to(weight.dtype), weight.t())
        if bias is not None:
            current += bias
        out = forward_filter_(current.mul_(1.0 - beta), beta)
        ctx.beta, ctx.has_bias, ctx.upstream = beta, bias is not None, link_of(spikes)
        ctx.save_for_backward(spikes, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        spikes, weight = ctx.saved_tensors
        dtype = compute_dtype(weight)
        filtered = reverse_filter_(grad_out.to(dtype, copy=True), ctx.beta).mul_(1.0 - ctx.beta)
        flat = filtered.view(-1, filtered.shape[2])
        grad_w = flat.t().matmul(spikes.reshape(-1, spikes.shape[2]).to(dtype)).to(weight.dtype)
        grad_b = flat.sum(0).to(weight.dtype) if ctx.has_bias else None
        return _input_grad_from_filtered(ctx, spikes, weight, filtered, dtype), grad_w, grad_b, None
