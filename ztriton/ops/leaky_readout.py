"""The LeakyReadout op: o[t] = beta o[t-1] + (1 - beta) c[t], c = W s + b, backward by the reverse-time filter.

A learnable leak (DESIGN.md section 9): with lambda[t] = dL/do[t] + beta lambda[t+1],
dL/dbeta = sum_t lambda[t] (o[t-1] - c[t]) (dense and cheap: the readout is narrow).
"""

from __future__ import annotations

import torch

from ..backends import Backend, Workspace, compute_dtype
from ..boundary import eager_under_compile
from ..events import dense
from ..sparse import producer_of
from .common import input_grad_from_filtered, refuse_double_backward, run_op, without_autocast


class LeakyReadoutFunction(torch.autograd.Function):
    """apply(spikes, weight, bias, beta_tensor, beta, backend, workspace, ops) -> membrane traces (T, B, N_out).

    `beta_tensor` is None or the 0-dim tensor of a learnable leak (`beta` its value).

    `ops` (the layer's `stats["ops"]`) gets the implementation of each op that runs, backward's too.

    The current is formed in the layer's dtype, the integration in compute_dtype. Fed by a
    sparse-path SparseLIFLinear, the gradient of the spikes is computed only at its active entries.
    """

    @staticmethod
    @without_autocast
    def forward(ctx, spikes, weight, bias, beta_tensor, beta: float, backend: Backend, workspace: Workspace,
                ops: dict):
        current = torch.matmul(dense(spikes).to(weight.dtype), weight.t())
        if bias is not None:
            current += bias
        current = current.to(compute_dtype(weight.dtype))
        learn = ctx.needs_input_grad[3]
        kept = current.clone() if learn else None  # c, for the leak's gradient
        out = run_op(ops, "time_filter", "time_filter", backend, current.mul_(1.0 - beta), beta, False)
        ctx.beta, ctx.has_bias, ctx.backend, ctx.workspace, ctx.ops = beta, bias is not None, backend, workspace, ops
        ctx.producer = producer_of(spikes) if ctx.needs_input_grad[0] else None
        ctx.save_for_backward(spikes, weight, kept, out if learn else None)
        return out.to(weight.dtype)

    @staticmethod
    @eager_under_compile
    @without_autocast
    def backward(ctx, grad_out):
        refuse_double_backward("LeakyReadout")
        spikes, weight, current, out = ctx.saved_tensors
        dtype = compute_dtype(weight.dtype)
        grad = dense(grad_out).to(dtype, copy=True)
        filtered = run_op(ctx.ops, "time_filter", "time_filter", ctx.backend, grad, ctx.beta, True)  # lambda
        grad_beta = None
        if current is not None:  # sum_t lambda[t] (o[t-1] - c[t])
            earlier = torch.cat([torch.zeros_like(out[:1]), out[:-1]])
            grad_beta = (filtered * (earlier - current)).sum()
        filtered.mul_(1.0 - ctx.beta)
        flat = filtered.view(-1, filtered.shape[2])
        grad_w = flat.t().matmul(dense(spikes).reshape(-1, spikes.shape[2]).to(dtype)).to(weight.dtype)
        grad_b = flat.sum(0).to(weight.dtype) if ctx.has_bias else None
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = input_grad_from_filtered(filtered, weight, spikes, ctx.producer, ctx.backend, ctx.workspace,
                                              ctx.ops)
        return grad_x, grad_w, grad_b, grad_beta, None, None, None, None
