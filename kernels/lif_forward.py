"""Fused LIF forward: one Triton kernel over neurons with the time loop inside, for every grad mode.

Each program owns BLOCK columns of the flattened (B * N) neuron grid and keeps their membrane in
registers while it walks t = 0..T-1: it reads the input current I[t] (+ bias; I[t + 1] is already
on its way while step t is computed), applies eq. 1
(tracking v = u - u_th: v[t] = beta v[t-1] + I[t] - u_th (1 - beta) - u_th s[t-1], v[-1] = -u_th)
and writes the spike. Beside the spikes it keeps, by `MODE`:
- LOCALZO: draws the m samples |z| in-kernel and keeps g of eq. 7,
  c/m sum_k 1[|v| < delta |z_k|] |z_k|^alpha / (2 delta), where g != 0: nothing of size
  m x T x B x N exists and no dense g either;
- SPARSEGRAD: |v| where |v| < B_th (the surrogate is applied to this compact set afterwards);
- MEMBRANE: v densely (the surrogate rule's dense g is formed from it);
- SPIKES: nothing (inference).
The kept entries form the compact active set (flat index, value), appended through one atomic
counter and sorted by flat index afterwards (see `lif_forward`).

The draws follow ztriton's RNG contract (`ztriton.rng`): Philox4x32-10 keyed by `seed`, counter
(index lo, index hi, offset, k) with `index` the entry's flat position in (T, B, N), the first two
outputs turned into uniforms u1, u2 as `tl.rand` does. Laws (`DIST`): normal (Box-Muller as
`tl.randn`), uniform, laplace, fast_sigmoid in closed form, and table laws (sigmoid, any surrogate)
by binary search in their CDF table, each the same float32 expression as the torch reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.random import philox, uint_to_uniform_float

from .time_filter import column_block

#: the `dist` codes of the launchers
NORMAL, UNIFORM, LAPLACE, FAST_SIGMOID, TABLE = 0, 1, 2, 3, 4
#: the forward's modes: what it keeps beside the spikes (see `lif_forward`)
LOCALZO, SPARSEGRAD, MEMBRANE, SPIKES = 0, 1, 2, 3


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
def localzo_sum(abs_v, seed, index, offset, delta, dist_param, cdf_ptr, abs_z_ptr, M: tl.constexpr,
                DIST: tl.constexpr, ALPHA: tl.constexpr, TABLE_SIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """Eq. 7 before its scale, per entry: the sum over the M draws at `index` of |z|^ALPHA where |v| < delta |z|."""
    acc = tl.zeros_like(abs_v)
    for k in tl.static_range(M):
        u1, u2 = _contract_uniforms(seed, index, offset, k)
        z = _abs_z(u1, u2, DIST, dist_param, cdf_ptr, abs_z_ptr, TABLE_SIZE, SEARCH_STEPS)
        if ALPHA == 1:
            weight = z
        else:
            weight = 1.0 / z
        acc += tl.where(abs_v < delta * z, weight, 0.0)
    return acc


@triton.jit
def active_entries(v, mask, seed, index, offset, delta, scale, bth, dist_param, cdf_ptr, abs_z_ptr,
                   MODE: tl.constexpr, M: tl.constexpr, DIST: tl.constexpr, ALPHA: tl.constexpr,
                   TABLE_SIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr):
    """(kept, value) of a block of entries: LocalZO (MODE 0) keeps g != 0 and gives g (eq. 7),
    SparseGrad keeps |v| < B_th and gives |v|."""
    abs_v = tl.abs(v)
    if MODE == 0:
        acc = localzo_sum(abs_v, seed, index, offset, delta, dist_param, cdf_ptr, abs_z_ptr, M, DIST, ALPHA,
                          TABLE_SIZE, SEARCH_STEPS)
        return mask & (acc > 0), acc * scale
    return mask & (abs_v < bth), abs_v


@triton.jit
def append_positions(kept, found, count_ptr, capacity):
    """(positions, room) of the kept entries in the compact set: one atomic add of their count, then
    a prefix sum; room is False past the buffer's capacity (the caller reruns with more)."""
    base = tl.atomic_add(count_ptr, found.to(tl.int64))
    position = base + tl.cumsum(kept.to(tl.int32), axis=0).to(tl.int64) - 1
    return position, kept & (position < capacity)


@triton.jit
def lif_forward_kernel(
    current_ptr, bias_ptr, spikes_ptr, index_ptr, value_ptr, count_ptr, membrane_ptr, cdf_ptr, abs_z_ptr,
    n_cols, n_out, steps, beta, threshold, leak, delta, scale, bth, capacity, seed, offset, dist_param,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, M: tl.constexpr, DIST: tl.constexpr, ALPHA: tl.constexpr,
    TABLE_SIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr, BLOCK: tl.constexpr,
):
    cols = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
    mask = cols < n_cols
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols % n_out, mask=mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK], tl.float32)
    v = tl.zeros([BLOCK], tl.float32) - threshold
    s = tl.zeros([BLOCK], tl.float32)
    # the step is compared as a block: Triton 3.9's interpreter broadcasts a scalar comparison
    # into an int32 block, which `tl.load` refuses as a mask
    first = tl.zeros_like(cols)
    upcoming = tl.load(current_ptr + cols, mask=mask & (first < steps), other=0.0)
    for t in range(steps):
        step = first + t
        index = step * n_cols + cols  # int64: flat positions may pass 2^31
        i_t = upcoming.to(tl.float32) + bias
        # the next step's current is loaded before this step's work, so its latency overlaps it
        upcoming = tl.load(current_ptr + index + n_cols, mask=mask & (step + 1 < steps), other=0.0)
        v = (i_t - leak) + beta * v - threshold * s
        s = (v > 0).to(tl.float32)
        tl.store(spikes_ptr + index, s, mask=mask)
        if MODE == 2:
            tl.store(membrane_ptr + index, v, mask=mask)
        if MODE < 2:
            keep, value = active_entries(v, mask, seed, index, offset, delta, scale, bth, dist_param, cdf_ptr,
                                         abs_z_ptr, MODE, M, DIST, ALPHA, TABLE_SIZE, SEARCH_STEPS)
            found = tl.sum(keep.to(tl.int32), axis=0)
            if found > 0:  # append to the compact set: one atomic per program and step
                position, room = append_positions(keep, found, count_ptr, capacity)
                tl.store(index_ptr + position, index, mask=room)
                tl.store(value_ptr + position, value, mask=room)


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


class KernelOutput(NamedTuple):
    """What `lif_forward` returns: spikes; the compact set (flat `index` sorted, `values`) for
    LOCALZO (g) and SPARSEGRAD (|v|); the dense membrane v = u - u_th for MEMBRANE."""

    spikes: torch.Tensor
    index: torch.Tensor | None
    values: torch.Tensor | None
    membrane: torch.Tensor | None


def lif_forward(current, beta, threshold, *, mode=LOCALZO, bias=None, spike_dtype=torch.float32, delta=1.0, m=1,
                seed=0, offset=0, bth=0.0, dist=NORMAL, dist_param=0.0, alpha=1, c=1.0, cdf=None, abs_z=None,
                capacity=None, block=None) -> KernelOutput:
    """Launch the fused kernel on `current` (T, B, N) (+ `bias` (N,)): eq. 1, spikes in `spike_dtype`.

    `mode`: LOCALZO (g of eq. 7 with m draws by the RNG contract), SPARSEGRAD (|v| where |v| < bth),
    MEMBRANE (dense v for the surrogate rule) or SPIKES (inference). `dist` is one of the codes
    NORMAL .. TABLE; `dist_param` is k * delta for FAST_SIGMOID; `cdf`, `abs_z` the float32 tables of
    a TABLE law; `alpha` (1 or -1) and `c` are the law's eq. 7 terms.

    Compact set: programs append the entries they keep to one buffer of `capacity` entries (default
    T B N / 16) through an atomic counter, then the set is sorted by flat index, so its order does not
    depend on scheduling. Reading the count is the one host sync; if it exceeds the capacity the
    kernel runs again with exactly that capacity (same key, same draws, same result).
    """
    steps, device = current.shape[0], current.device
    n_cols = current[0].numel() if steps else 0
    n_out = current.shape[-1]
    current = current.contiguous()
    spikes = torch.empty(current.shape, dtype=spike_dtype, device=device)
    compact = mode in (LOCALZO, SPARSEGRAD)
    membrane = torch.empty(current.shape, dtype=torch.float32, device=device) if mode == MEMBRANE else spikes
    cdf, abs_z = _tables(cdf, abs_z, device)
    capacity = max(1, min(current.numel(), capacity or current.numel() // 16))
    block = block or column_block(n_cols, device)
    while True:
        count = torch.zeros(1, dtype=torch.int64, device=device)
        index = torch.empty(capacity if compact else 1, dtype=torch.int64, device=device)
        values = torch.empty(index.shape, dtype=torch.float32, device=device)
        if n_cols:
            lif_forward_kernel[(triton.cdiv(n_cols, block),)](
                current, bias if bias is not None else spikes, spikes, index, values, count, membrane, cdf, abs_z,
                n_cols, n_out, steps, float(beta), float(threshold), float(threshold * (1.0 - beta)), float(delta),
                float(c / (2.0 * delta * m)), float(bth), capacity, int(seed), int(offset) & 0xFFFFFFFF,
                float(dist_param), MODE=mode, HAS_BIAS=bias is not None, M=m, DIST=dist,
                ALPHA=1 if alpha == 1 else -1, TABLE_SIZE=cdf.numel(), SEARCH_STEPS=_search_steps(cdf.numel()),
                BLOCK=block,
            )
        if not compact:
            return KernelOutput(spikes, None, None, membrane if mode == MEMBRANE else None)
        found = int(count.item())  # the host sync: the size of the set
        if found <= capacity:
            break
        capacity = found
    index, order = torch.sort(index[:found])
    return KernelOutput(spikes, index, values[:found][order], None)


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
