"""Fused LIF + LocalZO forward: one Triton kernel over neurons with the time loop inside.

Each program owns BLOCK columns of the flattened (B * N) neuron grid and keeps their membrane in
registers while it walks t = 0..T-1: it reads the input current I[t], applies eq. 1 (tracking
v = u - u_th: v[t] = beta v[t-1] + I[t] - u_th (1 - beta) - u_th s[t-1], v[-1] = -u_th), writes the
spike, draws the m samples |z| in-kernel from Philox (seed from torch's generator, offset = the
entry's position, so runs are reproducible), and writes g of eq. 7,
c/m sum_k 1[|v| < delta |z_k|] |z_k|^alpha / (2 delta). Nothing of size m x T x B x N exists.
The backward kernels read the active set that `torch.nonzero(g)` compacts from this g.

Laws: normal, uniform, laplace, fast_sigmoid in closed form; sigmoid and surrogate-derived laws by
binary search in their CDF table (`SurrogateDistribution`).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ztriton.distributions import FastSigmoid, Laplace, Normal, SurrogateDistribution, Uniform

NORMAL, UNIFORM, LAPLACE, FAST_SIGMOID, TABLE = 0, 1, 2, 3, 4


@triton.jit
def _sample_abs_z(seed, offsets, DIST: tl.constexpr, dist_param, cdf_ptr, abs_z_ptr, TABLE_SIZE: tl.constexpr,
                  SEARCH_STEPS: tl.constexpr):
    """|z| for each offset: closed forms, or inverse transform through a CDF table."""
    if DIST == 0:
        z = tl.abs(tl.randn(seed, offsets))
    else:
        r = tl.rand(seed, offsets)
        if DIST == 1:
            z = r * 1.7320508075688772
        elif DIST == 2:
            z = -tl.log(1.0 - r) * 0.7071067811865476
        elif DIST == 3:
            root = tl.sqrt(r)
            z = root / ((1.0 - root) * dist_param)  # dist_param = k * delta
        else:
            lo = tl.zeros_like(offsets)
            hi = tl.zeros_like(offsets) + (TABLE_SIZE - 1)
            for _ in tl.static_range(SEARCH_STEPS):  # smallest index with cdf >= r
                mid = (lo + hi) // 2
                below = tl.load(cdf_ptr + mid) < r
                lo = tl.where(below, mid + 1, lo)
                hi = tl.where(below, hi, mid)
            upper = tl.maximum(hi, 1)
            c_lo = tl.load(cdf_ptr + upper - 1)
            c_hi = tl.load(cdf_ptr + upper)
            frac = tl.minimum(tl.maximum((r - c_lo) / tl.maximum(c_hi - c_lo, 1e-30), 0.0), 1.0)
            z_lo = tl.load(abs_z_ptr + upper - 1)
            z = z_lo + frac * (tl.load(abs_z_ptr + upper) - z_lo)
    return z


@triton.jit
def lif_localzo_forward_kernel(
    current_ptr, spikes_ptr, grad_ptr, cdf_ptr, abs_z_ptr,
    n_cols, steps, beta, threshold, leak, delta, scale, seed, dist_param,
    M: tl.constexpr, DIST: tl.constexpr, ALPHA: tl.constexpr, TABLE_SIZE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    v = tl.zeros([BLOCK], tl.float32) - threshold
    s = tl.zeros([BLOCK], tl.float32)
    for t in range(steps):
        base = t * n_cols
        i_t = tl.load(current_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        v = (i_t - leak) + beta * v - threshold * s
        s = (v > 0).to(tl.float32)
        tl.store(spikes_ptr + base + cols, s, mask=mask)
        abs_v = tl.abs(v)
        acc = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(M):
            offsets = (k * steps + t) * n_cols + cols
            z = _sample_abs_z(seed, offsets, DIST, dist_param, cdf_ptr, abs_z_ptr, TABLE_SIZE, SEARCH_STEPS)
            if ALPHA == 1:
                weight = z
            else:
                weight = 1.0 / z
            acc += tl.where(abs_v < delta * z, weight, 0.0)
        tl.store(grad_ptr + base + cols, acc * scale, mask=mask)


@triton.jit
def sample_abs_z_kernel(out_ptr, n, seed, dist_param, cdf_ptr, abs_z_ptr, DIST: tl.constexpr,
                        TABLE_SIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """The |z| the forward kernel draws at offsets 0..n-1 (for tests and references)."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    z = _sample_abs_z(seed, offsets, DIST, dist_param, cdf_ptr, abs_z_ptr, TABLE_SIZE, SEARCH_STEPS)
    tl.store(out_ptr + offsets, z, mask=offsets < n)


def _law_args(law, device):
    """(DIST code, dist_param, cdf table, |z| table) for a distribution."""
    empty = torch.zeros(2, dtype=torch.float32, device=device)
    if isinstance(law, Normal):
        return NORMAL, 0.0, empty, empty
    if isinstance(law, Uniform):
        return UNIFORM, 0.0, empty, empty
    if isinstance(law, Laplace):
        return LAPLACE, 0.0, empty, empty
    if isinstance(law, FastSigmoid):
        return FAST_SIGMOID, law.k * law.delta, empty, empty
    if isinstance(law, SurrogateDistribution):
        cdf, abs_z = law._tables(device)
        return TABLE, 0.0, cdf, abs_z
    raise ValueError(f"no Triton sampler for the distribution {law!r}")


def _check_offsets(total: int) -> None:
    if total >= 2**31:
        raise ValueError(f"m * T * B * N = {total} exceeds the 2^31 Philox offsets of one call; split the batch")


def lif_localzo_forward(current, beta, threshold, law, delta, m, seed, block=256):
    """Launch the fused kernel on `current` (T, B, N): returns (spikes, g), both float32 (T, B, N)."""
    steps = current.shape[0]
    n_cols = current[0].numel()
    _check_offsets(m * current.numel())
    current = current.contiguous()
    spikes = torch.empty(current.shape, dtype=torch.float32, device=current.device)
    grad = torch.empty_like(spikes)
    code, param, cdf, abs_z = _law_args(law, current.device)
    table_size = cdf.numel()
    lif_localzo_forward_kernel[(triton.cdiv(n_cols, block),)](
        current, spikes, grad, cdf, abs_z,
        n_cols, steps, float(beta), float(threshold), float(threshold * (1.0 - beta)), float(delta),
        float(law.c / (2.0 * delta * m)), int(seed), float(param),
        M=m, DIST=code, ALPHA=1 if law.alpha == 1 else -1, TABLE_SIZE=table_size,
        SEARCH_STEPS=max(1, math.ceil(math.log2(table_size))), BLOCK=block,
    )
    return spikes, grad


def sample_abs_z(law, n, seed, device, block=1024):
    """The |z| stream of the forward kernel at offsets 0..n-1."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    code, param, cdf, abs_z = _law_args(law, device)
    sample_abs_z_kernel[(triton.cdiv(n, block),)](
        out, n, int(seed), float(param), cdf, abs_z, DIST=code, TABLE_SIZE=cdf.numel(),
        SEARCH_STEPS=max(1, math.ceil(math.log2(cdf.numel()))), BLOCK=block,
    )
    return out


def lif_localzo_forward_reference(current, beta, threshold, law, delta, abs_z):
    """Plain torch: the same recurrence and eq. 7 with given |z| of shape (m, T, B, N), float64."""
    current = current.double()
    v = torch.full_like(current[0], -threshold)
    s = torch.zeros_like(current[0])
    spikes, grads = [], []
    m = abs_z.shape[0]
    for t in range(current.shape[0]):
        v = (current[t] - threshold * (1.0 - beta)) + beta * v - threshold * s
        s = (v > 0).double()
        z = abs_z[:, t].double()
        weight = z if law.alpha == 1 else 1.0 / z
        g = torch.where(v.abs() < delta * z, weight, 0.0).sum(0) * (law.c / (2.0 * delta * m))
        spikes.append(s)
        grads.append(g)
    return torch.stack(spikes), torch.stack(grads)
