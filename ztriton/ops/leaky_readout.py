"""The LeakyReadout op: o[t] = beta o[t-1] + (1 - beta) (W s[t] + b), backward by the reverse-time filter."""

from __future__ import annotations

import torch

from ..backends import Backend, Workspace, compute_dtype
from ..events import dense
from ..sparse import producer_of
from .common import input_grad_from_filtered, refuse_double_backward, run_op, without_autocast


class LeakyReadoutFunction(torch.autograd.Function):
    """apply(spikes, weight, bias, beta, backend, workspace, ops) -> membrane traces (T, B, N_out).

    `ops` (the layer's `stats["ops"]`) gets the implementation of each op that runs, backward's too.

    The current is formed in the layer's dtype, the integration in compute_dtype. Fed by a
    sparse-path SparseLIFLinear, the gradient of the spikes is computed only at its active entries.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, spikes, weight, bias, beta: float, backend: Backend, workspace: Workspace, ops: dict):
        current = torch.matmul(dense(spikes).to(weight.dtype), weight.t())
        if bias is not None:
            current += bias
        current = current.to(compute_dtype(weight.dtype)).mul_(1.0 - beta)
        out = run_op(ops, "time_filter", "time_filter", backend, current, beta, False).to(weight.dtype)
        ctx.beta, ctx.has_bias, ctx.backend, ctx.workspace, ctx.ops = beta, bias is not None, backend, workspace, ops
        ctx.producer = producer_of(spikes) if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(spikes, weight)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        refuse_double_backward("LeakyReadout")
        spikes, weight = ctx.saved_tensors
        dtype = compute_dtype(weight.dtype)
        grad = dense(grad_out).to(dtype, copy=True)
        filtered = run_op(ctx.ops, "time_filter", "time_filter", ctx.backend, grad, ctx.beta, True).mul_(1.0 - ctx.beta)
        flat = filtered.view(-1, filtered.shape[2])
        grad_w = flat.t().matmul(dense(spikes).reshape(-1, spikes.shape[2]).to(dtype)).to(weight.dtype)
        grad_b = flat.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad_from_filtered(filtered, weight, spikes, ctx.producer, ctx.backend, ctx.workspace,
                                              ctx.ops)
        return grad_x, grad_w, grad_b, None, None, None, None
