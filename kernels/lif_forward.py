"""Fused LIF + LocalZO forward: one Triton kernel over neurons with the time loop inside.

Each program owns BLOCK columns of the flattened (B * N) neuron grid and keeps their membrane in
registers while it walks t = 0..T-1: it reads the input current I[t], applies eq. 1 (tracking
v = u - u_th: v[t] = beta v[t-1] + I[t] - u_th (1 - beta) - u_th s[t-1], v[-1] = -u_th), writes the
spike, draws the m samples |z| in-kernel and writes g of eq. 7,
c/m sum_k 1[|v| < delta |z_k|] |z_k|^alpha / (2 delta). Nothing of size m x T x B x N exists.

The draws follow ztriton's RNG contract (`ztriton.rng`): Philox4x32-10 keyed by `seed`, counter
(index lo, index hi, offset, k) with `index` the entry's flat position in (T, B, N), the first two
outputs turned into uniforms u1, u2 as `tl.rand` does. Laws (`DIST`): normal (Box-Muller as
`tl.randn`), uniform, laplace, fast_sigmoid in closed form, and table laws (sigmoid, any surrogate)
by binary search in their CDF table, each the same float32 expression as the torch reference.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

#: the `dist` codes of the launchers
NORMAL, UNIFORM, LAPLACE, FAST_SIGMOID, TABLE = 0, 1, 2, 3, 4


@triton.jit
def _contract_uniforms(seed, index, offset, k):
    """(u1, u2) of the RNG contract for int64 flat positions `index`, sample k."""
    c0 = (index & 0xFFFFFFFF).to(tl.uint32)
    c1 = (index >> 32).to(tl.uint32)
    c2 = (tl.zeros_like(index) + offset).to(tl.uint32)
    c3 = (tl.zeros_like(index) + k).to(tl.uint32)
    r0, r1, _, _ = philox(seed, c0, c1, c2, c3)
    return uint_to_uniform_float(r0), uint_to_uniform_float(r1)


@triton.jit
def _abs_z(u1, u2, DIST: tl.constexpr, dist_param, cdf_ptr, abs_z_ptr, TABLE_SIZE: tl.constexpr,
           SEARCH_STEPS: tl.constexpr):
    """|z| from the contract's uniforms: closed forms, or inverse transform through a CDF table."""
    if DIST == 0:
        radius = tl.sqrt(-2.0 * tl.log(tl.maximum(u1, 1.0e-7)))
        z = tl.abs(radius * tl.cos(u2 * 6.283185307179586))
    elif DIST == 1:
        z = u1 * 1.7320508075688772
    elif DIST == 2:
        z = -tl.log(1.0 - u1) * 0.7071067811865476
    elif DIST == 3:
        root = tl.sqrt(u1)
        z = root / ((1.0 - root) * dist_param)  # dist_param = k * delta
    else:
        lo = tl.zeros_like(u1).to(tl.int32)
        hi = lo + (TABLE_SIZE - 1)
        for _ in tl.static_range(SEARCH_STEPS):  # smallest index with cdf >= u1
            mid = (lo + hi) // 2
            below = tl.load(cdf_ptr + mid) < u1
            lo = tl.where(below, mid + 1, lo)
            hi = tl.where(below, hi, mid)
        upper = tl.maximum(hi, 1)
        c_lo = tl.load(cdf_ptr + upper - 1)
        c_hi = tl.load(cdf_ptr + upper)
        frac = tl.minimum(tl.maximum((u1 - c_lo) / tl.maximum(c_hi - c_lo, 1e-30), 0.0), 1.0)
        z_lo = tl.load(abs_z_ptr + upper - 1)
        z = z_lo + frac * (tl.load(abs_z_ptr + upper) - z_lo)
    return z


@triton.jit
def lif_localzo_forward_kernel(
    current_ptr, spikes_ptr, grad_ptr, cdf_ptr, abs_z_ptr,
    n_cols, steps, beta, threshold, leak, delta, scale, seed, offset, dist_param,
    M: tl.constexpr, DIST: tl.constexpr, ALPHA: tl.constexpr, TABLE_SIZE: tl.constexpr,
    SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    v = tl.zeros([BLOCK], tl.float32) - threshold
    s = tl.zeros([BLOCK], tl.float32)
    row = tl.zeros([BLOCK], tl.int64)  # t as int64: flat positions may pass 2^31
    for t in range(steps):
        index = (row + t) * n_cols + cols
        i_t = tl.load(current_ptr + index, mask=mask, other=0.0).to(tl.float32)
        v = (i_t - leak) + beta * v - threshold * s
        s = (v > 0).to(tl.float32)
        tl.store(spikes_ptr + index, s, mask=mask)
        abs_v = tl.abs(v)
        acc = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(M):
            u1, u2 = _contract_uniforms(seed, index, offset, k)
            z = _abs_z(u1, u2, DIST, dist_param, cdf_ptr, abs_z_ptr, TABLE_SIZE, SEARCH_STEPS)
            if ALPHA == 1:
                weight = z
            else:
                weight = 1.0 / z
            acc += tl.where(abs_v < delta * z, weight, 0.0)
        tl.store(grad_ptr + index, acc * scale, mask=mask)


@triton.jit
def sample_abs_z_kernel(out_ptr, n, seed, offset, k, dist_param, cdf_ptr, abs_z_ptr, DIST: tl.constexpr,
                        TABLE_SIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr):
    """The |z| of sample k the forward kernel draws at flat positions 0..n-1 (for tests)."""
    index = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    u1, u2 = _contract_uniforms(seed, index, offset, k)
    z = _abs_z(u1, u2, DIST, dist_param, cdf_ptr, abs_z_ptr, TABLE_SIZE, SEARCH_STEPS)
    tl.store(out_ptr + index, z, mask=index < n)


def _search_steps(table_size: int) -> int:
    return max(1, math.ceil(math.log2(table_size)))


def _tables(cdf, abs_z, device):
    """The CDF/|z| tables of a table law, or 2-entry placeholders for the closed forms."""
    if cdf is None:
        empty = torch.zeros(2, dtype=torch.float32, device=device)
        return empty, empty
    return cdf.contiguous(), abs_z.contiguous()


def lif_localzo_forward(current, beta, threshold, delta, m, seed, offset, *, dist, dist_param=0.0, alpha=1,
                        c=1.0, cdf=None, abs_z=None, block=256):
    """Launch the fused kernel on `current` (T, B, N): returns (spikes, g), both float32 (T, B, N).

    `dist` is one of the codes NORMAL .. TABLE; `dist_param` is k * delta for FAST_SIGMOID; `cdf` and
    `abs_z` are the float32 tables of a TABLE law; `alpha` (1 or -1) and `c` are the law's eq. 7 terms.
    """
    steps = current.shape[0]
    n_cols = current[0].numel()
    current = current.contiguous()
    spikes = torch.empty(current.shape, dtype=torch.float32, device=current.device)
    grad = torch.empty_like(spikes)
    cdf, abs_z = _tables(cdf, abs_z, current.device)
    if n_cols:
        lif_localzo_forward_kernel[(triton.cdiv(n_cols, block),)](
            current, spikes, grad, cdf, abs_z,
            n_cols, steps, float(beta), float(threshold), float(threshold * (1.0 - beta)), float(delta),
            float(c / (2.0 * delta * m)), int(seed), int(offset) & 0xFFFFFFFF, float(dist_param),
            M=m, DIST=dist, ALPHA=1 if alpha == 1 else -1, TABLE_SIZE=cdf.numel(),
            SEARCH_STEPS=_search_steps(cdf.numel()), BLOCK=block,
        )
    return spikes, grad


def sample_abs_z(n, seed, offset, k, device, *, dist, dist_param=0.0, cdf=None, abs_z=None, block=1024):
    """The |z| of sample k that the forward kernel draws at flat positions 0..n-1."""
    out = torch.empty(n, dtype=torch.float32, device=device)
    cdf, abs_z = _tables(cdf, abs_z, device)
    sample_abs_z_kernel[(triton.cdiv(n, block),)](
        out, n, int(seed), int(offset) & 0xFFFFFFFF, int(k), float(dist_param), cdf, abs_z, DIST=dist,
        TABLE_SIZE=cdf.numel(), SEARCH_STEPS=_search_steps(cdf.numel()), BLOCK=block,
    )
    return out


def lif_localzo_forward_reference(current, beta, threshold, alpha, c, delta, abs_z):
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
        weight = z if alpha == 1 else 1.0 / z
        g = torch.where(v.abs() < delta * z, weight, 0.0).sum(0) * (c / (2.0 * delta * m))
        spikes.append(s)
        grads.append(g)
    return torch.stack(spikes), torch.stack(grads)
