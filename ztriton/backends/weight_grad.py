"""Op `weight_grad` (appendix B.1, eq. 25-26) and its torch implementation.

With the input trace eps[t] = sum_{k<=t} beta^{t-k} x[k] and ds = grad_s * g at the active entries:
dL/dW = sum_{t,b} ds[t,b,:]^T eps[t,b,:] (a sparse x dense product per trace chunk).
"""

from __future__ import annotations

import warnings

import torch

from ..events import dense
from ..sparse import ActiveSet
from .base import Workspace
from .registry import register

#: time steps of input trace held at once by the sparse weight gradient (a 16 x B x N_in block
#: stays in cache while its rows are gathered)
TRACE_CHUNK = 16


def sparse_bias_grad(ds: torch.Tensor, active: ActiveSet, beta: float, n_out: int) -> torch.Tensor:
    """db = sum over active (t, b, i) of ds * sum_{k<=t} beta^{t-k} (index_add: deterministic on CPU)."""
    t, _, neurons = active.coo_indices
    steps = (t + 1).double()
    gain = steps if beta == 1.0 else (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), steps)) / (1.0 - beta)
    grad_b = torch.zeros(n_out, dtype=ds.dtype, device=ds.device)
    return grad_b.index_add_(0, neurons, ds * gain.to(ds.dtype))


@register("weight_grad", "torch")
def weight_grad(ds, active: ActiveSet, x, beta: float, weight_shape, bias: bool, workspace: Workspace):
    """(dW, db): dW = sum over active (t, b, i) of ds * eps[t, b, :] (eq. 25-26) and, with `bias`,
    db = sum of ds * gain(t), gain(t) = sum_{k<=t} beta^(t-k); compute dtype, deterministic.
    Here by `sparse_weight_grad` and `sparse_bias_grad`."""
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
