"""Fused forward of the LIF family (DESIGN.md section 9): one Triton kernel with the time loop inside.

    I[t] = W x[t] (+ b) (+ V s[t-1], recurrent)
    subtract: u[t] = beta u[t-1] + I[t] - theta s[t-1]
    zero:     u[t] = beta (1 - s[t-1]) u[t-1] + I[t]
    s[t] = H(u[t] - theta), theta per neuron, u[-1] = s[-1] = 0.

Grid (B, column blocks): program (b, c) owns the neurons c*BLOCK_N .. of batch row b and keeps
their membrane and forward traces in registers while it walks t = 0..T-1; the feed-forward current
W x (+ b) is precomputed (a GEMM or the event current) and read one step ahead, as in
`lif_forward.py`.

Recurrent layers: the current of step t needs the spikes of step t-1 of *every* neuron of the row,
so a recurrent row is held by one program (one column block, BLOCK_N = next power of two >= N, at
most MAX_WIDTH). The program stores s[t-1] (it does anyway: the spikes output), waits at a block
barrier so every thread sees the whole row, then forms V s[t-1] as a sum over tiles of TILE_K input
neurons: a tile whose spikes are all zero is skipped (no load of V), else the (TILE_K, BLOCK_N)
tile of V^T (contiguous along the output neurons) times the tile's spikes is reduced over the
input neurons. Cost per step: the tiles holding a spike, not N^2.

Beside the spikes it keeps, by `MODE` (the codes of `lif_forward.py`):
- LOCALZO: g of eq. 7 with m draws by the RNG contract at the entry's flat position in (T, B, N),
  the same helpers as `lif_forward.py`; SPARSEGRAD: |v| where |v| < B_th. Both append the kept
  entries (flat index, value) and, at those entries, the forward traces (M for a learnable beta,
  S for a learnable threshold under the subtractive reset, the neuron's last spike before the entry
  under reset to zero) through one atomic counter; the set is sorted by flat index afterwards.
- MEMBRANE: v = u - theta densely, and M, S densely (the surrogate rule's dense path);
- SPIKES: nothing (inference).

The plain-torch reference is the torch op `lif_family_forward` in `ztriton/backends/lif_family.py`.

Width limit (MAX_WIDTH = 2048): each program holds about a dozen (BLOCK_N,) float32 vectors (u, s,
theta, bias, the prefetched current, M, S, last spike, the current being formed, v, the flat index,
the LocalZO sum) plus one TILE_K x BLOCK_N tile of V (TILE_ELEMENTS = 8192 values). With
num_warps = BLOCK_N / 128 (16 warps, 512 threads at 2048) every thread holds 4 entries of each
vector and 16 of the tile, well inside the 128 registers per thread that one 512-thread block may
use on an SM of 64 K registers (sm_80, sm_90); at 4096 it would need 32 warps (1024 threads, 64
registers each) and spill. Above MAX_WIDTH a recurrent layer is declined by the Triton backend
(`accepts=`) and runs on the torch op; a feed-forward layer of any width runs here, in several column
blocks per row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .lif_forward import LOCALZO, MEMBRANE, NORMAL, SPARSEGRAD, SPIKES, _search_steps, _tables, active_entries, append_positions

__all__ = ["LOCALZO", "MEMBRANE", "SPARSEGRAD", "SPIKES", "MAX_WIDTH", "FamilyKernelOutput", "lif_family_forward",
           "lif_family_forward_kernel", "block_width", "tile_k"]

#: widest recurrent layer one program holds (a whole batch row per program); wider ones run on torch
MAX_WIDTH = 2048
#: values of V per recurrent tile (TILE_K input neurons x BLOCK_N output neurons)
TILE_ELEMENTS = 8192


@triton.jit
def lif_family_forward_kernel(
    current_ptr, bias_ptr, rec_t_ptr, threshold_ptr, spikes_ptr, index_ptr, value_ptr, leak_ptr, reset_ptr,
    last_ptr, count_ptr, membrane_ptr, cdf_ptr, abs_z_ptr,
    batch, n_out, steps, beta, delta, scale, bth, capacity, seed, offset, dist_param,
    MODE: tl.constexpr, HAS_BIAS: tl.constexpr, RECURRENT: tl.constexpr, ZERO_RESET: tl.constexpr,
    TRACE_LEAK: tl.constexpr, TRACE_RESET: tl.constexpr, TRACE_LAST: tl.constexpr, M: tl.constexpr,
    DIST: tl.constexpr, ALPHA: tl.constexpr, TABLE_SIZE: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    BLOCK_N: tl.constexpr, TILE_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)  # output neurons j
    mask = cols < n_out
    n_cols = batch * n_out  # entries per step
    row_base = row * n_out  # int64: the flat position of (t, row, 0) is t * n_cols + row_base
    step_base = row_base
    theta = tl.load(threshold_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    leak_trace = tl.zeros([BLOCK_N], tl.float32)
    reset_trace = tl.zeros([BLOCK_N], tl.float32)
    last = tl.zeros([BLOCK_N], tl.int64) - 1
    # the step is compared as a block: Triton 3.9's interpreter broadcasts a scalar comparison
    # into an int32 block, which `tl.load` refuses as a mask (as in lif_forward.py)
    first = tl.zeros_like(cols)
    upcoming = tl.load(current_ptr + row_base + cols, mask=mask & (first < steps), other=0.0)
    for t in range(steps):
        step = first + t
        index = step_base + cols  # int64: flat positions may pass 2^31
        i_t = upcoming.to(tl.float32) + bias
        upcoming = tl.load(current_ptr + index + n_cols, mask=mask & (step + 1 < steps), other=0.0)
        if RECURRENT:
            if t > 0:
                # s[t-1] of the whole row was stored by this program's threads: make it visible to all
                tl.debug_barrier()
                previous = spikes_ptr + (step_base - n_cols)
                for k0 in range(0, n_out, TILE_K):
                    ks = k0 + tl.arange(0, TILE_K)
                    kmask = ks < n_out
                    s_k = tl.load(previous + ks, mask=kmask, other=0.0).to(tl.float32)
                    if tl.sum(s_k, axis=0) > 0:  # event-driven: tiles without a spike load nothing
                        tile = tl.load(rec_t_ptr + ks[:, None].to(tl.int64) * n_out + cols[None, :],
                                       mask=kmask[:, None] & mask[None, :], other=0.0).to(tl.float32)
                        i_t += tl.sum(tile * s_k[:, None], axis=0)
        if ZERO_RESET:
            keep = 1.0 - s
        if TRACE_LEAK:  # M[t] = a[t] M[t-1] + du[t]/dbeta
            if ZERO_RESET:
                leak_trace = beta * (leak_trace * keep) + u * keep
            else:
                leak_trace = beta * leak_trace + u
        if TRACE_RESET:  # S[t] = beta S[t-1] + s[t-1]
            reset_trace = beta * reset_trace + s
        if TRACE_LAST:
            last = tl.where(s > 0, step - 1, last)
        if ZERO_RESET:
            u = beta * (u * keep) + i_t
        else:
            u = beta * u + i_t - theta * s
        v = u - theta
        s = (v > 0).to(tl.float32)
        tl.store(spikes_ptr + index, s.to(spikes_ptr.dtype.element_ty), mask=mask)
        if MODE == 2:
            tl.store(membrane_ptr + index, v, mask=mask)
            if TRACE_LEAK:
                tl.store(leak_ptr + index, leak_trace, mask=mask)
            if TRACE_RESET:
                tl.store(reset_ptr + index, reset_trace, mask=mask)
        if MODE < 2:
            kept, value = active_entries(v, mask, seed, index, offset, delta, scale, bth, dist_param, cdf_ptr,
                                         abs_z_ptr, MODE, M, DIST, ALPHA, TABLE_SIZE, SEARCH_STEPS)
            found = tl.sum(kept.to(tl.int32), axis=0)
            if found > 0:  # append to the compact set: one atomic per program and step
                position, room = append_positions(kept, found, count_ptr, capacity)
                tl.store(index_ptr + position, index, mask=room)
                tl.store(value_ptr + position, value, mask=room)
                if TRACE_LEAK:
                    tl.store(leak_ptr + position, leak_trace, mask=room)
                if TRACE_RESET:
                    tl.store(reset_ptr + position, reset_trace, mask=room)
                if TRACE_LAST:
                    tl.store(last_ptr + position, last, mask=room)
        step_base += n_cols


def block_width(n_out: int, recurrent: bool) -> int:
    """BLOCK_N: the row's width rounded up to a power of two (at least 16), at most MAX_WIDTH; a
    recurrent layer wider than MAX_WIDTH is refused (the backend sends it to torch first)."""
    if recurrent and n_out > MAX_WIDTH:
        raise ValueError(f"a recurrent layer of width {n_out} exceeds the kernel's MAX_WIDTH {MAX_WIDTH}")
    return min(MAX_WIDTH, max(16, triton.next_power_of_2(n_out)))


def tile_k(block_n: int) -> int:
    """TILE_K: input neurons per tile of V, TILE_ELEMENTS values per tile, at most the row's block."""
    return max(1, min(block_n, TILE_ELEMENTS // block_n))


def num_warps(block_n: int) -> int:
    """4 entries of each row vector per thread: BLOCK_N / 128 warps, 4 to 16."""
    return max(4, min(16, block_n // 128))


class FamilyKernelOutput(NamedTuple):
    """What `lif_family_forward` returns: spikes; for LOCALZO (g) and SPARSEGRAD (|v|) the compact set
    (flat `index` sorted, `values`) and the traces at its entries (`leak` M, `reset` S, `last` int64);
    for MEMBRANE the dense `membrane` v = u - theta and dense `leak`, `reset` grids. None where not kept."""

    spikes: torch.Tensor
    index: torch.Tensor | None
    values: torch.Tensor | None
    leak: torch.Tensor | None
    reset: torch.Tensor | None
    last: torch.Tensor | None
    membrane: torch.Tensor | None


def lif_family_forward(current, threshold, beta, *, recurrent_weight=None, zero_reset=False, trace_leak=False,
                       trace_reset=False, trace_last=False, mode=LOCALZO, bias=None, spike_dtype=torch.float32,
                       delta=1.0, m=1, seed=0, offset=0, bth=0.0, dist=NORMAL, dist_param=0.0, alpha=1, c=1.0,
                       cdf=None, abs_z=None, capacity=None) -> FamilyKernelOutput:
    """Launch the family kernel on the feed-forward `current` (T, B, N) (+ `bias` (N,)) with per-neuron
    `threshold` (N,) and, when given, `recurrent_weight` V (N, N) (the current adds V s[t-1]).

    `mode` and the law arguments as in `lif_forward.lif_forward`; `trace_leak`, `trace_reset`,
    `trace_last` say which forward traces to keep (`trace_last` in the compact modes only).
    Compact set: appended through an atomic counter into `capacity` entries (default T B N / 16),
    sorted by flat index (the traces follow the same order); if the count exceeds the capacity the
    kernel runs again with exactly that capacity (same key, same draws, same result).
    """
    steps, batch, n_out = current.shape
    device = current.device
    recurrent = recurrent_weight is not None
    block = block_width(n_out, recurrent)
    current = current.contiguous()
    threshold = threshold.to(torch.float32).contiguous()
    rec_t = recurrent_weight.t().contiguous() if recurrent else current  # V^T: row k holds V[:, k]
    spikes = torch.empty(current.shape, dtype=spike_dtype, device=device)
    compact = mode in (LOCALZO, SPARSEGRAD)
    trace_leak, trace_reset = trace_leak and mode != SPIKES, trace_reset and mode != SPIKES
    trace_last = trace_last and compact
    dense_shape = current.shape if mode == MEMBRANE else None
    membrane = torch.empty(current.shape, dtype=torch.float32, device=device) if mode == MEMBRANE else spikes
    cdf, abs_z = _tables(cdf, abs_z, device)
    capacity = max(1, min(current.numel(), capacity or current.numel() // 16))
    while True:
        size = dense_shape if dense_shape is not None else ((capacity,) if compact else (1,))
        count = torch.zeros(1, dtype=torch.int64, device=device)
        index = torch.empty(capacity if compact else 1, dtype=torch.int64, device=device)
        values = torch.empty(index.shape, dtype=torch.float32, device=device)
        leak = torch.empty(size, dtype=torch.float32, device=device) if trace_leak else None
        reset = torch.empty(size, dtype=torch.float32, device=device) if trace_reset else None
        last = torch.empty(size, dtype=torch.int64, device=device) if trace_last else None
        if current.numel():
            grid = (batch, triton.cdiv(n_out, block))
            lif_family_forward_kernel[grid](
                current, bias if bias is not None else threshold, rec_t, threshold, spikes, index, values,
                leak if leak is not None else values, reset if reset is not None else values,
                last if last is not None else index, count, membrane, cdf, abs_z,
                batch, n_out, steps, float(beta), float(delta), float(c / (2.0 * delta * m)), float(bth), capacity,
                int(seed), int(offset) & 0xFFFFFFFF, float(dist_param),
                MODE=mode, HAS_BIAS=bias is not None, RECURRENT=recurrent, ZERO_RESET=bool(zero_reset),
                TRACE_LEAK=trace_leak, TRACE_RESET=trace_reset, TRACE_LAST=trace_last, M=m, DIST=dist,
                ALPHA=1 if alpha == 1 else -1, TABLE_SIZE=cdf.numel(), SEARCH_STEPS=_search_steps(cdf.numel()),
                BLOCK_N=block, TILE_K=tile_k(block), num_warps=num_warps(block),
            )
        if not compact:
            if mode == MEMBRANE:
                return FamilyKernelOutput(spikes, None, None, leak, reset, None, membrane)
            return FamilyKernelOutput(spikes, None, None, None, None, None, None)
        found = int(count.item())  # the host sync: the size of the set
        if found <= capacity:
            break
        capacity = found
    index, order = torch.sort(index[:found])
    pick = lambda trace: None if trace is None else trace[:found][order]  # noqa: E731
    return FamilyKernelOutput(spikes, index, values[:found][order], pick(leak), pick(reset), pick(last), None)
