"""Op `lif_forward` (eq. 1 and g) and its torch implementation.

The input current is formed FORWARD_CHUNK time steps at a time in the layer's dtype (an
event-driven sum over the non-zero inputs while they are sparse, else a GEMM), the membrane runs in
place in compute_dtype, and g is kept as an active set (flat index + g) or, for the surrogate rule,
densely.
"""

from __future__ import annotations

import torch

from ..events import dense
from ..functional import localzo_active
from ..rng import PhiloxKey
from ..sparse import ActiveSet
from .base import LIFConfig, LIFForward, SpikeRule, Workspace, compute_dtype
from .registry import register

#: time steps whose input current is held at once by the forward (the whole (T, B, N) current
#: is never materialised on the torch backend)
FORWARD_CHUNK = 64
#: input density up to which the input current is summed over events instead of a dense GEMM
#: (on a 2-core CPU, a 64-step chunk at 2 % density: 7.8 ms against 24 ms for the GEMM)
EVENT_DENSITY = 0.05


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


def chunk_current(x: torch.Tensor, weight: torch.Tensor, start: int, stop: int, sparse_input: bool,
                  table: torch.Tensor, out: torch.Tensor) -> bool:
    """out = W x[start:stop] in the layer's dtype (table = W^T), summed over the events while the input
    is `sparse_input` and below EVENT_DENSITY, else a GEMM; returns whether the input still counts as sparse."""
    found = input_events(x[start:stop]) if sparse_input else None
    if found is not None:
        out.copy_(event_current(found, (stop - start) * x.shape[1], table).view(out.shape))
        return True
    torch.matmul(x[start:stop].to(weight.dtype), weight.t(), out=out)
    return False


@register("lif_forward", "torch")
def lif_forward(x, weight, bias, cfg: LIFConfig, needs_grad: bool, key: PhiloxKey | None,
                workspace: Workspace) -> LIFForward:
    """(spikes, g, active): eq. 1 with input current W x (+ b) formed in the layer's dtype and the
    membrane in compute_dtype. With `needs_grad`: dense g for the surrogate rule, else the active set
    (LocalZO draws by the RNG contract with `key`); without: spikes only, no draw.
    FORWARD_CHUNK time steps at a time (see the module docstring)."""
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
        sparse_input = chunk_current(x, weight, start, stop, sparse_input, table, piece)  # once dense, a GEMM
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
