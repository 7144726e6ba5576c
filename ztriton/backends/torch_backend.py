"""The plain-torch backend: every device, and the float64 reference of the tests.

Forward (eq. 1): the input current is formed FORWARD_CHUNK time steps at a time in the layer's
dtype (an event-driven sum over the non-zero inputs while they are sparse, else a GEMM), the
membrane runs in place in compute_dtype, and g is kept as an active set (flat index + g) or, for
the surrogate rule, densely.

Backward (appendix B.1, eq. 25-26), with the input trace eps[t] = sum_{k<=t} beta^{t-k} x[k] and
ds = grad_s * g at the active entries:

    dL/dW = sum_{t,b} ds[t,b,:]^T eps[t,b,:]             (a sparse x dense product per trace chunk)
    dL/dx[k] = D[k] W,  D[k] = sum_{t>=k} beta^{t-k} ds[t]  (a reverse-time filter of ds)
"""

from __future__ import annotations

import warnings

import torch

from ..events import dense
from ..functional import localzo_active
from ..rng import PhiloxKey
from ..sparse import ActiveSet
from .base import LIFConfig, LIFForward, SpikeRule, Workspace, compute_dtype

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


def active_set(v: torch.Tensor, rule: SpikeRule, key: PhiloxKey | None, base: int) -> ActiveSet:
    """The entries with g != 0 of a piece of the grid and their g (LocalZO or SparseGrad rule).

    `base` is the flat position of the piece in the layer's grid (the RNG contract's index).
    LocalZO draws exactly as `functional.localzo_grad`. `v` is overwritten by |v|.
    """
    abs_v = v.abs_().view(-1)
    if rule.grad == "sparsegrad":
        index = torch.nonzero(abs_v < rule.bth).squeeze(1)
        return ActiveSet(index, rule.law.expected_grad(abs_v[index], rule.delta), v.shape)
    index, grad = localzo_active(abs_v, rule.delta, rule.m, rule.law, key, base)
    return ActiveSet(index, grad, v.shape)


def sparse_bias_grad(ds: torch.Tensor, active: ActiveSet, beta: float, n_out: int) -> torch.Tensor:
    """db = sum over active (t, b, i) of ds * sum_{k<=t} beta^{t-k} (index_add: deterministic on CPU)."""
    t, _, neurons = active.coo_indices
    steps = (t + 1).double()
    gain = steps if beta == 1.0 else (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), steps)) / (1.0 - beta)
    grad_b = torch.zeros(n_out, dtype=ds.dtype, device=ds.device)
    return grad_b.index_add_(0, neurons, ds * gain.to(ds.dtype))


def weight_grad(ds, active: ActiveSet, x, beta: float, weight_shape, bias: bool, workspace: Workspace):
    """(dW by `sparse_weight_grad`, db by `sparse_bias_grad` or None)."""
    grad_b = sparse_bias_grad(ds, active, beta, weight_shape[0]) if bias else None
    return sparse_weight_grad(ds, active, x, beta, weight_shape, workspace), grad_b


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
    x = dense(x)
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


def filtered_grad(ds: torch.Tensor, active: ActiveSet, beta: float) -> torch.Tensor:
    """D = reverse-time filter of ds scattered on the full (T, B, N) grid."""
    grid = torch.zeros(active.shape, dtype=ds.dtype, device=ds.device)
    grid.view(-1).index_copy_(0, active.index, ds)
    return reverse_filter_(grid, beta)


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


def lif_forward(x, weight, bias, cfg: LIFConfig, needs_grad: bool, key: PhiloxKey | None,
                workspace: Workspace) -> LIFForward:
    """Eq. 1 and g, FORWARD_CHUNK time steps at a time (see the module docstring)."""
    x = dense(x)
    steps, batch, _ = x.shape
    n_out, device = weight.shape[0], weight.device
    rule, dtype = cfg.rule, compute_dtype(weight.dtype)
    spikes = torch.empty(steps, batch, n_out, dtype=weight.dtype, device=device)
    chunk = min(steps, FORWARD_CHUNK)
    membrane = workspace.get("membrane", (chunk, batch, n_out), dtype, device)
    current = membrane if weight.dtype == dtype else workspace.get("current", membrane.shape, weight.dtype, device)
    dense_g = needs_grad and rule.grad == "surrogate"
    g = torch.empty(spikes.shape, dtype=dtype, device=device) if dense_g else None
    indices, grads, previous = [], [], None
    sparse_input, table = True, weight.t().contiguous()  # event-driven while the input stays sparse
    for start in range(0, steps, FORWARD_CHUNK):
        stop = min(steps, start + FORWARD_CHUNK)
        piece, v = current[: stop - start], membrane[: stop - start]
        found = input_events(x[start:stop]) if sparse_input else None
        if found is not None:
            piece.copy_(event_current(found, (stop - start) * batch, table).view(piece.shape))
        else:
            sparse_input = False  # once dense, stay with the GEMM
            torch.matmul(x[start:stop].to(weight.dtype), weight.t(), out=piece)
        if piece is not v:
            v.copy_(piece)
        if bias is not None:
            v += bias  # in the membrane's precision, as the Triton kernel adds it
        lif_recurrence(v, spikes[start:stop], cfg.beta, cfg.threshold, previous)
        previous = (v[-1].clone(), spikes[stop - 1])
        if dense_g:
            g[start:stop] = rule.law.expected_grad(v, rule.delta)
        elif needs_grad:
            found = active_set(v, rule, key, start * batch * n_out)
            indices.append(found.index + start * batch * n_out)
            grads.append(found.grad)
    active = None
    if needs_grad and not dense_g:
        active = ActiveSet(torch.cat(indices), torch.cat(grads), spikes.shape) if indices else ActiveSet.empty(spikes.shape, device)
    return LIFForward(spikes, g, active)


def time_filter(grid: torch.Tensor, beta: float, reverse: bool) -> torch.Tensor:
    """In place along dim 0: the reverse-time filter D or the forward trace eps."""
    return reverse_filter_(grid, beta) if reverse else forward_filter_(grid, beta)


class TorchBackend:
    """Plain torch on any device (see the module docstring)."""

    name = "torch"

    @staticmethod
    def available(device: torch.device, dtype: torch.dtype) -> bool:
        return True

    @staticmethod
    def unsupported(rule) -> str | None:
        return None  # evaluates every law's own torch code

    @staticmethod
    def implementation(op: str, rule, needs_grad: bool) -> str:
        return "torch"

    lif_forward = staticmethod(lif_forward)
    weight_grad = staticmethod(weight_grad)
    input_grad = staticmethod(sparse_input_grad)
    filtered_grad = staticmethod(filtered_grad)
    input_grad_at = staticmethod(input_grad_at)
    time_filter = staticmethod(time_filter)
