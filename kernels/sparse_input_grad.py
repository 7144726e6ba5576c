"""Sparse input gradient at the previous layer's active entries: dx[t, b, j] = D[t, b, :] . W[:, j].

D is the reverse-time filter of ds (see time_filter). Only the entries where the previous layer has
g != 0 ever need this value (everywhere else its gradient is multiplied by zero), so one program
computes BLOCK_U such targets: it gathers their D rows and the matching rows of W^T (contiguous, as
D's rows are), BLOCK_O output neurons at a time, and reduces. Each target is written by one program: deterministic, no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def sparse_input_grad_kernel(filtered_ptr, weight_t_ptr, rows_ptr, inputs_ptr, out_ptr, n_targets, n_out,
                             BLOCK_U: tl.constexpr, BLOCK_O: tl.constexpr):
    targets = tl.program_id(0).to(tl.int64) * BLOCK_U + tl.arange(0, BLOCK_U)  # int64: may pass 2^31
    target_mask = targets < n_targets
    rows = tl.load(rows_ptr + targets, mask=target_mask, other=0).to(tl.int64)
    inputs = tl.load(inputs_ptr + targets, mask=target_mask, other=0).to(tl.int64)
    acc = tl.zeros([BLOCK_U], tl.float32)
    for first in range(0, n_out, BLOCK_O):
        outs = first + tl.arange(0, BLOCK_O)
        mask = target_mask[:, None] & (outs < n_out)[None, :]
        d = tl.load(filtered_ptr + rows[:, None] * n_out + outs[None, :], mask=mask, other=0.0)
        w = tl.load(weight_t_ptr + inputs[:, None] * n_out + outs[None, :], mask=mask, other=0.0)
        acc += tl.sum(d * w, axis=1)
    tl.store(out_ptr + targets, acc, mask=target_mask)


def sparse_input_grad(filtered: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, inputs: torch.Tensor,
                      block_u: int = 64, block_o: int = 64) -> torch.Tensor:
    """dL/dx at the targets (rows of the (T*B) grid, input indices j), from D (T, B, N_out) and W (N_out, N_in)."""
    filtered = filtered.reshape(-1, filtered.shape[-1]).contiguous().float()
    weight_t = weight.t().float().contiguous()
    n = rows.numel()
    out = torch.empty(n, dtype=torch.float32, device=filtered.device)
    if n:
        sparse_input_grad_kernel[(triton.cdiv(n, block_u),)](
            filtered, weight_t, rows.contiguous(), inputs.contiguous(), out, n, weight.shape[0],
            BLOCK_U=block_u, BLOCK_O=block_o,
        )
    return out


def sparse_input_grad_reference(filtered, weight, rows, inputs):
    """Plain torch, float64."""
    flat = filtered.reshape(-1, filtered.shape[-1]).double()
    return (flat[rows] * weight.double().t()[inputs]).sum(1)
