"""The LeakyReadout op: o[t] = beta o[t-1] + (1 - beta) (W s[t] + b), backward by the reverse-time filter."""

from __future__ import annotations

import torch

from ..backends import Backend, Workspace, compute_dtype
from ..events import dense
from ..sparse import producer_of
from .common import input_grad_from_filtered, refuse_double_backward, without_autocast


class LeakyReadoutFunction(torch.autograd.Function):
    """apply(spikes, weight, bias, beta, backend, workspace) -> membrane traces (T, B, N_out).

    The current is formed in the layer's dtype, the integration in compute_dtype. Fed by a
    sparse-path SparseLIFLinear, the gradient of the spikes is computed only at its active entries.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, spikes, weight, bias, beta: float, backend: Backend, workspace: Workspace):
        current = torch.matmul(dense(spikes).to(weight.dtype), weight.t())
        if bias is not None:
            current += bias
        current = current.to(compute_dtype(weight.dtype)).mul_(1.0 - beta)
        out = backend.time_filter(current, beta, reverse=False).to(weight.dtype)
        ctx.beta, ctx.has_bias, ctx.backend, ctx.workspace = beta, bias is not None, backend, workspace
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
        filtered = ctx.backend.time_filter(grad, ctx.beta, reverse=True).mul_(1.0 - ctx.beta)
        flat = filtered.view(-1, filtered.shape[2])
        grad_w = flat.t().matmul(dense(spikes).reshape(-1, spikes.shape[2]).to(dtype)).to(weight.dtype)
        grad_b = flat.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad_from_filtered(filtered, weight, spikes, ctx.producer, ctx.backend, ctx.workspace)
        return grad_x, grad_w, grad_b, None, None, None
