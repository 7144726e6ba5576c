"""Native CPU kernels (numba), each equal to a plain-torch reference elsewhere in the package.

Parallelism without a threading layer: work is cut into a FIXED number of blocks (of batch rows
or of columns), each block a `nogil` kernel call, run on a thread pool of torch.get_num_threads()
workers (a new pool, the old one shut down, when that number changes). The blocks, hence every
floating-point summation order, do not depend on the thread count, and no OpenMP runtime is
started, so forked DataLoader workers stay safe. Calls from several threads may run at once: their
blocks share the pool, and a kernel writes only into its caller's arrays (the layers' scratch
buffers are per thread, `backends.Workspace`).

numba is optional: where it is missing or fails to import, AVAILABLE is False, UNAVAILABLE_REASON
says why, and the package runs on the torch backend.

Kernels are compiled on first use and cached on disk (`cache=True`); `warm_up()` compiles them
all and returns the seconds it took.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from numbers import Integral
from typing import Callable

import numpy as np
import torch

from ._checks import positive_int


def _import_numba():
    """(numba, None), or (None, why it cannot be used): numba is optional."""
    try:
        import numba
    except Exception as error:  # not only ImportError: a broken install may raise anything
        if isinstance(error, ModuleNotFoundError) and error.name == "numba":
            return None, "numba is not installed"
        return None, f"numba failed to import: {type(error).__name__}: {error}"
    return numba, None


numba, UNAVAILABLE_REASON = _import_numba()
#: whether the native kernels can run; if not, UNAVAILABLE_REASON says why (it is None when they can)
AVAILABLE = UNAVAILABLE_REASON is None
#: blocks a parallel kernel is cut into (fixed by the problem size, so results do not depend on the
#: thread count), and the fewest items (batch rows, columns) a block gets
BLOCKS = 16
MIN_BLOCK = 4

if AVAILABLE:
    jit = numba.njit(cache=True, nogil=True)

    @numba.njit(cache=True, nogil=True, fastmath={"reassoc", "nsz", "contract"})
    def _dot(a, b):  # pragma: no cover - compiled
        """a . b with the sum reassociated, so it vectorises (a strict left-to-right sum waits on
        each add); the order is fixed by the compiled code, so the result does not vary between calls."""
        total = a[0] * 0
        for n in range(a.shape[0]):
            total += a[n] * b[n]
        return total

    @numba.njit(cache=True, nogil=True, inline="always")
    def _to_uniform(bits):  # pragma: no cover - compiled
        """Triton's uint32 -> float32 uniform: the bits as int32, negatives folded to -x - 1, times 2^-31."""
        signed = np.int32(bits)
        folded = np.int32(-signed - np.int32(1)) if signed < 0 else signed
        return np.float32(folded) * np.float32(4.6566127342e-10)

    @numba.njit(cache=True, nogil=True, inline="always")
    def _philox2(position, seed, offset, k):  # pragma: no cover - compiled
        """(u1, u2) of the RNG contract at one flat position. 32-bit words held as uint32 (numba widens
        their arithmetic to 64 bits: every result is cut back), the products 32 x 32 -> 64 bits, so a
        loop over positions vectorises (inlined into its caller's loop)."""
        k0, k1 = np.uint32(seed & np.uint64(0xFFFFFFFF)), np.uint32(seed >> np.uint64(32))
        c0, c1 = np.uint32(position & np.uint64(0xFFFFFFFF)), np.uint32(position >> np.uint64(32))
        c2, c3 = np.uint32(offset & np.uint64(0xFFFFFFFF)), np.uint32(k)
        for _ in range(10):
            product_b = np.uint64(0xCD9E8D57) * np.uint64(c2)
            product_a = np.uint64(0xD2511F53) * np.uint64(c0)
            c0, c2 = (np.uint32(np.uint32(product_b >> np.uint64(32)) ^ c1 ^ k0),
                      np.uint32(np.uint32(product_a >> np.uint64(32)) ^ c3 ^ k1))
            c1, c3 = np.uint32(product_b), np.uint32(product_a)
            k0, k1 = np.uint32(k0 + np.uint32(0x9E3779B9)), np.uint32(k1 + np.uint32(0xBB67AE85))
        return _to_uniform(c0), _to_uniform(c1)

    @jit
    def _philox_uniforms(lo, hi, index, seed, offset, k, u1, u2):  # pragma: no cover - compiled
        for i in range(lo, hi):
            u1[i], u2[i] = _philox2(np.uint64(index[i]), seed, offset, k)

    @jit
    def _normal_radius(u1):  # pragma: no cover - compiled
        """Box-Muller's radius sqrt(-2 ln u1), float64."""
        return np.sqrt(-2.0 * np.log(np.float64(max(u1, np.float32(1e-7)))))

    @jit
    def _normal_abs_z(radius, u2):  # pragma: no cover - compiled
        """|z| = |radius cos(2 pi u2)| rounded once to float32 (never above float32(radius): |cos| <= 1)."""
        return np.float32(abs(radius * np.cos(np.float64(u2 * np.float32(6.283185307179586)))))

    @jit
    def _abs_z(u1, u2, dist, dist_param, cdf, table_z):  # pragma: no cover - compiled
        """|z| of a law from the contract's uniforms, float32: `Distribution.abs_z_from_uniforms` op for op."""
        if dist == 0:  # normal, Box-Muller in float64, rounded once
            return _normal_abs_z(_normal_radius(u1), u2)
        if dist == 1:  # uniform
            return u1 * np.float32(1.7320508075688772)
        if dist == 2:  # laplace
            return np.float32(-np.log(np.float64(np.float32(1.0) - u1)) * 0.7071067811865476)
        if dist == 3:  # fast sigmoid, dist_param = k * delta
            root = np.float32(np.sqrt(np.float64(u1)))
            return root / ((np.float32(1.0) - root) * np.float32(dist_param))
        hi = cdf.shape[0] - 1  # table: smallest index with cdf >= u1, then linear interpolation
        lo = 0
        while lo < hi:
            mid = (lo + hi) // 2
            if cdf[mid] < u1:
                lo = mid + 1
            else:
                hi = mid
        upper = max(hi, 1)
        c_lo, c_hi = cdf[upper - 1], cdf[upper]
        frac = min(max((u1 - c_lo) / max(c_hi - c_lo, np.float32(1e-30)), np.float32(0.0)), np.float32(1.0))
        z_lo = table_z[upper - 1]
        return z_lo + frac * (table_z[upper] - z_lo)

    @jit
    def _row_candidates(abs_v, cand_threshold, base, draw, seed, offset, m, dist, dist_param, cdf, table_z, delta,
                        scale, inverse, cand_n, cand_v, u1, u2, total):  # pragma: no cover - compiled
        """The entries of one (t, b) row kept for backward; returns their count `kept`.

        Candidates (abs_v[n] < cand_threshold) are listed by a branch-free pass (cand_n: neuron,
        cand_v: |v|). With `draw`, eq. 7 at each (flat position base + n, the RNG contract's m
        draws): the Philox integers of all candidates in one straight loop (it vectorises), then per
        draw the test near < delta |z|; only candidates with g != 0 stay, cand_v = g (float32
        arithmetic, as `functional.localzo_at`). For the normal law a draw whose Box-Muller radius
        cannot pass is rejected before the logarithm: -2 ln u <= 1/u - u on (0, 1], so
        (1/u - u) (1 + 1e-6) < (near / delta)^2 (1 - 1e-6) proves near >= delta float32(radius)
        (the margins cover the roundings, 1/u - u's cancellation near u = 1 included); one that
        passes is tested on its exact radius, and skips the cosine when that fails
        (|z| <= float32(radius)). The kept entries and their g are those of drawing every |z| in full."""
        count = 0
        for n in range(abs_v.shape[0]):  # no branch: write the slot, advance only on a candidate
            cand_n[count] = n
            cand_v[count] = abs_v[n]
            count += 1 if abs_v[n] < cand_threshold else 0
        if not draw or count == 0:
            return count
        for i in range(count):
            total[i] = np.float32(0.0)
        for k in range(m):
            for i in range(count):  # straight-line integer work over the candidates
                u1[i], u2[i] = _philox2(np.uint64(base + cand_n[i]), seed, offset, k)
            for i in range(count):
                near = np.float32(cand_v[i])
                if dist == 0:
                    u = np.float64(max(u1[i], np.float32(1e-7)))
                    reach = np.float64(near) / np.float64(delta)
                    if (1.0 / u - u) * (1.0 + 1e-6) < reach * reach * (1.0 - 1e-6):
                        continue
                    radius = _normal_radius(u1[i])
                    if not near < delta * np.float32(radius):
                        continue
                    z = _normal_abs_z(radius, u2[i])
                else:
                    z = _abs_z(u1[i], u2[i], dist, dist_param, cdf, table_z)
                if near < delta * z:
                    total[i] += np.float32(1.0) / z if inverse else z
        kept = 0
        for i in range(count):
            cand_n[kept] = cand_n[i]
            value = total[i] * scale
            cand_v[kept] = value
            kept += 1 if value > 0 else 0
        return kept

    @jit
    def _gather_events(bins, units, offsets, samples, steps, out):  # pragma: no cover - compiled
        """COO indices (3, nnz) of a batch, row-major: a counting sort by bin of the samples' events,
        taken column by column (each sample's events are sorted by (bin, unit), so the result is
        ordered by (t, b, n)). Serial: safe in forked DataLoader workers. False (nothing written) if an
        event's bin is outside [0, steps)."""
        start = np.zeros(steps + 1, dtype=np.int64)
        for b in range(samples.shape[0]):
            for e in range(offsets[samples[b]], offsets[samples[b] + 1]):
                if bins[e] < 0 or bins[e] >= steps:
                    return False
                start[bins[e] + 1] += 1
        for t in range(steps):
            start[t + 1] += start[t]
        for b in range(samples.shape[0]):
            for e in range(offsets[samples[b]], offsets[samples[b] + 1]):
                t = bins[e]
                p = start[t]
                out[0, p] = t
                out[1, p] = b
                out[2, p] = units[e]
                start[t] = p + 1
        return True

    @jit
    def _scan_rows(lo, hi, dense, counts):  # pragma: no cover - compiled
        """counts[r] = non-zeros of row r, rows lo..hi-1 of a (rows, width) array."""
        for r in range(lo, hi):
            c = 0
            for j in range(dense.shape[1]):
                if dense[r, j] != 0:
                    c += 1
            counts[r] = c

    @jit
    def _scan_fill_rows(lo, hi, dense, counts, cols, values, start, cap):  # pragma: no cover - compiled
        """One pass over rows lo..hi-1: counts[r], and their non-zeros in row order into
        cols/values[start:start + cap] while they fit. Returns how many there were (> cap: not all kept)."""
        p = start
        end = start + cap
        for r in range(lo, hi):
            c = 0
            for j in range(dense.shape[1]):
                if dense[r, j] != 0:
                    if p < end:
                        cols[p] = j
                        values[p] = dense[r, j]
                    p += 1
                    c += 1
            counts[r] = c
        return p - start

    @jit
    def _fill_rows(lo, hi, dense, row_ptr, cols, values):  # pragma: no cover - compiled
        for r in range(lo, hi):
            p = row_ptr[r]
            for j in range(dense.shape[1]):
                if dense[r, j] != 0:
                    cols[p] = j
                    values[p] = dense[r, j]
                    p += 1

    @jit
    def _lif_rows(b_lo, b_hi, t0, t1, batch, row_ptr, cols, values, table, current, use_current, bias, beta,
                  threshold, leak, v_state, s_state, spikes, cand_threshold, cand_pos, cand_abs_v, cand_count,
                  row_counts, spk_pos, spk_val, spk_count, spk_row_counts, draw, seed, offset, m, dist,
                  dist_param, cdf, table_z, delta, scale, inverse):  # pragma: no cover - compiled
        """Eq. 1 for batch rows b_lo..b_hi-1 and steps t0..t1-1 (state carried in v_state, s_state).

        Input current: `current[t - t0, b]` if use_current, else the events of row t * batch + b
        (cols, values) times table = W^T. Candidates (|v| < cand_threshold) and spikes are appended
        per batch row (flat position in (T, B, N); |v|, resp. 1) while capacity lasts; the counts go
        on past it, so the caller can see an overflow and run again with more room. With `draw`,
        a candidate is kept only if its LocalZO g (eq. 7, the RNG contract's m draws) is non-zero,
        and g is recorded instead of |v| (float32 arithmetic, as `functional.localzo_at`).
        """
        n_out = table.shape[1]
        acc = np.empty(n_out, dtype=v_state.dtype)
        cand_n, fired_n = np.empty(n_out, dtype=np.int64), np.empty(n_out, dtype=np.int64)
        cand_v = np.empty(n_out, dtype=v_state.dtype)
        u1, u2, total = np.empty(n_out, np.float32), np.empty(n_out, np.float32), np.empty(n_out, np.float32)
        zero = beta * 0  # 0 and 1 in the arrays' precision: no float64 promotion in the loops
        one = zero + 1
        for b in range(b_lo, b_hi):
            for t in range(t0, t1):
                for n in range(n_out):
                    acc[n] = bias[n]
                if use_current:
                    for n in range(n_out):
                        acc[n] += current[t - t0, b, n]
                else:
                    r = t * batch + b
                    for e in range(row_ptr[r], row_ptr[r + 1]):
                        w = values[e]
                        j = cols[e]
                        for n in range(n_out):
                            acc[n] += w * table[j, n]
                for n in range(n_out):  # branch-free, so it vectorises
                    v = (acc[n] - leak) + beta * v_state[b, n] - threshold * s_state[b, n]
                    v_state[b, n] = v
                    s = one if v > zero else zero
                    s_state[b, n] = s
                    spikes[t, b, n] = s
                    acc[n] = abs(v)
                base = (t * batch + b) * n_out
                found = _row_candidates(acc, cand_threshold, base, draw, seed, offset, m, dist, dist_param, cdf,
                                        table_z, delta, scale, inverse, cand_n, cand_v, u1, u2, total)
                c = cand_count[b]
                for i in range(min(found, cand_pos.shape[1] - c)):
                    cand_pos[b, c + i] = base + cand_n[i]
                    cand_abs_v[b, c + i] = cand_v[i]
                cand_count[b] = c + found
                fired = 0
                for n in range(n_out):  # spikes are rarer than candidates: a branch costs less here
                    if s_state[b, n] > zero:
                        fired_n[fired] = n
                        fired += 1
                c = spk_count[b]
                for i in range(min(fired, spk_pos.shape[1] - c)):
                    spk_pos[b, c + i] = base + fired_n[i]
                    spk_val[b, c + i] = one
                spk_count[b] = c + fired
                row_counts[t, b] = found
                spk_row_counts[t, b] = fired

    @jit
    def _gather_rows(b_lo, b_hi, batch, row_offsets, cand_pos, cand_abs_v, cand_count, n_out, out_pos,
                     out_abs_v):  # pragma: no cover - compiled
        """Scatter each batch row's entries (position, value) to their row-major place (offsets per (t, b) row)."""
        stride = batch * n_out
        for b in range(b_lo, b_hi):
            c = 0
            while c < cand_count[b]:
                t = cand_pos[b, c] // stride
                p = row_offsets[t * batch + b]
                while c < cand_count[b] and cand_pos[b, c] // stride == t:
                    out_pos[p] = cand_pos[b, c]
                    out_abs_v[p] = cand_abs_v[b, c]
                    p += 1
                    c += 1

    @jit
    def _last_active_step(act_ptr, steps, batch, b):  # pragma: no cover - compiled
        """The last t whose row (t, b) has an active entry, or -1."""
        for t in range(steps - 1, -1, -1):
            r = t * batch + b
            if act_ptr[r + 1] > act_ptr[r]:
                return t
        return -1

    @jit
    def _weight_grad_rows(b_lo, b_hi, steps, batch, beta, row_ptr, cols, values, act_ptr, act_neuron, ds,
                          out):  # pragma: no cover - compiled
        """out += sum over active (t, b, i), b in b_lo..b_hi-1, of ds * eps[t, b, :] (trace on the fly)."""
        eps = np.zeros(out.shape[1], dtype=out.dtype)
        for b in range(b_lo, b_hi):
            last = _last_active_step(act_ptr, steps, batch, b)
            if last < 0:
                continue
            eps[:] = 0.0
            for t in range(last + 1):
                r = t * batch + b
                for j in range(eps.shape[0]):
                    eps[j] *= beta
                for e in range(row_ptr[r], row_ptr[r + 1]):
                    eps[cols[e]] += values[e]
                for e in range(act_ptr[r], act_ptr[r + 1]):
                    i = act_neuron[e]
                    d = ds[e]
                    for j in range(eps.shape[0]):
                        out[i, j] += d * eps[j]

    @jit
    def _input_grad_rows(b_lo, b_hi, steps, batch, beta, act_ptr, act_neuron, ds, table, tgt_ptr, tgt_input,
                         out):  # pragma: no cover - compiled
        """out[k] = D[t, b, :] . W[:, j] at the targets of rows b_lo..b_hi-1, D the reverse filter of ds."""
        n_out = table.shape[1]
        d = np.zeros(n_out, dtype=out.dtype)
        for b in range(b_lo, b_hi):
            last = _last_active_step(act_ptr, steps, batch, b)
            d[:] = 0.0
            for t in range(steps - 1, -1, -1):
                r = t * batch + b
                if t <= last:
                    for n in range(n_out):
                        d[n] *= beta
                    for e in range(act_ptr[r], act_ptr[r + 1]):
                        d[act_neuron[e]] += ds[e]
                for k in range(tgt_ptr[r], tgt_ptr[r + 1]):
                    j = tgt_input[k]
                    total = d[0] * 0
                    if t <= last:
                        for n in range(n_out):
                            total += d[n] * table[j, n]
                    out[k] = total

    @jit
    def _time_filter_columns(lo, hi, grid, beta, reverse):  # pragma: no cover - compiled
        """In place on a (T, columns) array: grid[t] += beta * grid[t -+ 1], columns lo..hi-1."""
        steps = grid.shape[0]
        if reverse:
            for t in range(steps - 2, -1, -1):
                for c in range(lo, hi):
                    grid[t, c] += beta * grid[t + 1, c]
        else:
            for t in range(1, steps):
                for c in range(lo, hi):
                    grid[t, c] += beta * grid[t - 1, c]

    @jit
    def _family_rows(b_lo, b_hi, t0, t1, batch, row_ptr, cols, values, table, current, use_current, bias,
                     rec_table, recurrent, beta, theta, zero_reset, u_state, s_state, m_state, r_state, last_state,
                     spikes, cand_threshold, cand_pos, cand_val, cand_count, row_counts, want_leak, want_reset,
                     want_last, cand_leak, cand_reset, cand_last, spk_pos, spk_val, spk_count, spk_row_counts, draw,
                     seed, offset, m, dist, dist_param, cdf, table_z, delta, scale, inverse):  # pragma: no cover - compiled
        """The LIF family's forward (DESIGN.md section 9) for batch rows b_lo..b_hi-1, steps t0..t1-1.

        State (u, s, the traces M and S, the last spike) is carried in the *_state arrays. The input
        current comes as in `_lif_rows`; the recurrent one adds rec_table[k] = V[:, k] for every neuron k
        that fired at t-1. Candidates are appended as in `_lif_rows`, with the traces wanted (M, S,
        the neuron's last spike before t) at the same places.
        """
        n_out = table.shape[1]
        acc = np.empty(n_out, dtype=u_state.dtype)
        fired, cand_n = np.empty(n_out, dtype=np.int64), np.empty(n_out, dtype=np.int64)
        cand_v = np.empty(n_out, dtype=u_state.dtype)
        u1, u2, total = np.empty(n_out, np.float32), np.empty(n_out, np.float32), np.empty(n_out, np.float32)
        zero = beta * 0
        one = zero + 1
        for b in range(b_lo, b_hi):
            n_fired = 0
            for n in range(n_out):  # spikes of the step before t0
                if s_state[b, n] > zero:
                    fired[n_fired] = n
                    n_fired += 1
            for t in range(t0, t1):
                if use_current:
                    for n in range(n_out):
                        acc[n] = current[t - t0, b, n]
                else:
                    acc[:] = zero
                    r = t * batch + b
                    for e in range(row_ptr[r], row_ptr[r + 1]):
                        w = values[e]
                        j = cols[e]
                        for n in range(n_out):
                            acc[n] += w * table[j, n]
                for n in range(n_out):
                    acc[n] += bias[n]
                if recurrent:
                    for f in range(n_fired):
                        k = fired[f]
                        for n in range(n_out):
                            acc[n] += rec_table[k, n]
                if want_leak:  # M[t] = a[t] M[t-1] + du[t]/dbeta
                    for n in range(n_out):
                        if zero_reset:
                            keep = one - s_state[b, n]
                            m_state[b, n] = beta * (m_state[b, n] * keep) + u_state[b, n] * keep
                        else:
                            m_state[b, n] = beta * m_state[b, n] + u_state[b, n]
                if want_reset:  # S[t] = beta S[t-1] + s[t-1]
                    for n in range(n_out):
                        r_state[b, n] = beta * r_state[b, n] + s_state[b, n]
                if want_last:
                    for f in range(n_fired):
                        last_state[b, fired[f]] = t - 1
                for n in range(n_out):
                    if zero_reset:
                        u = beta * (u_state[b, n] * (one - s_state[b, n])) + acc[n]
                    else:
                        u = beta * u_state[b, n] + acc[n] - theta[n] * s_state[b, n]
                    u_state[b, n] = u
                    v = u - theta[n]
                    s = one if v > zero else zero
                    s_state[b, n] = s
                    spikes[t, b, n] = s
                    acc[n] = abs(v)
                base = (t * batch + b) * n_out
                found = _row_candidates(acc, cand_threshold, base, draw, seed, offset, m, dist, dist_param, cdf,
                                        table_z, delta, scale, inverse, cand_n, cand_v, u1, u2, total)
                c = cand_count[b]
                for i in range(min(found, cand_pos.shape[1] - c)):
                    n = cand_n[i]
                    cand_pos[b, c + i] = base + n
                    cand_val[b, c + i] = cand_v[i]
                    if want_leak:
                        cand_leak[b, c + i] = m_state[b, n]
                    if want_reset:
                        cand_reset[b, c + i] = r_state[b, n]
                    if want_last:
                        cand_last[b, c + i] = last_state[b, n]
                cand_count[b] = c + found
                n_fired = 0
                for n in range(n_out):  # spikes are rarer than candidates: a branch costs less here
                    if s_state[b, n] > zero:
                        fired[n_fired] = n
                        n_fired += 1
                c = spk_count[b]
                for i in range(min(n_fired, spk_pos.shape[1] - c)):
                    spk_pos[b, c + i] = base + fired[i]
                    spk_val[b, c + i] = one
                spk_count[b] = c + n_fired
                row_counts[t, b] = found
                spk_row_counts[t, b] = n_fired

    @jit
    def _gather_sources(b_lo, b_hi, batch, row_offsets, cand_pos, cand_count, n_out, out_pos,
                        out_source):  # pragma: no cover - compiled
        """As `_gather_rows`, giving each entry's place b * capacity + c in the per-row lists instead of a value."""
        stride = batch * n_out
        capacity = cand_pos.shape[1]
        for b in range(b_lo, b_hi):
            c = 0
            while c < cand_count[b]:
                t = cand_pos[b, c] // stride
                p = row_offsets[t * batch + b]
                while c < cand_count[b] and cand_pos[b, c] // stride == t:
                    out_pos[p] = cand_pos[b, c]
                    out_source[p] = b * capacity + c
                    p += 1
                    c += 1

    @jit
    def _adjoint_rows(b_lo, b_hi, steps, batch, beta, act_ptr, act_neuron, ext, g, rec_table, recurrent,
                      reset_spikes, zero_reset, table, tgt_ptr, tgt_input, full_grid, ds, out,
                      grid):  # pragma: no cover - compiled
        """The LIF family's reverse walk (DESIGN.md section 9) for batch rows b_lo..b_hi-1.

        From t = T-1 down, delta holds delta[t+1]: at the active entries of (t, b),
        ds = g (ext + rec_table[j] . delta) (rec_table[j] = V[:, j], recurrent); then
        delta = a[t+1] delta + ds there; then out[k] = delta . table[i] (table[i] = W[:, i]) at the
        targets of (t, b), and delta into grid[t, b] with full_grid.
        """
        width = table.shape[1]
        delta = np.zeros(width, dtype=ds.dtype)
        zero = beta * 0
        one = zero + 1
        for b in range(b_lo, b_hi):
            last = _last_active_step(act_ptr, steps, batch, b)
            delta[:] = zero
            for t in range(steps - 1, -1, -1):
                r = t * batch + b
                if t <= last:
                    for e in range(act_ptr[r], act_ptr[r + 1]):
                        total = ext[e]
                        if recurrent:
                            total += _dot(rec_table[act_neuron[e]], delta)
                        ds[e] = g[e] * total
                    if zero_reset:
                        for n in range(width):
                            delta[n] *= beta * (one - reset_spikes[t, b, n])
                    else:
                        for n in range(width):
                            delta[n] *= beta
                    for e in range(act_ptr[r], act_ptr[r + 1]):
                        delta[act_neuron[e]] += ds[e]
                for k in range(tgt_ptr[r], tgt_ptr[r + 1]):
                    out[k] = _dot(delta, table[tgt_input[k]]) if t <= last else zero
                if full_grid:
                    for n in range(width):
                        grid[t, b, n] = delta[n]

    @jit
    def _adjoint_grid_rows(b_lo, b_hi, ext, g, beta, rec_table, recurrent, reset_spikes, zero_reset, delta,
                           ds):  # pragma: no cover - compiled
        """`_adjoint_rows` on the full (T, B, N) grids (the dense path) for batch rows b_lo..b_hi-1:
        ds = g (ext + rec_table[j] . delta[t+1]), the recurrent term only where g != 0, and
        delta[t] = ds[t] + a[t+1] delta[t+1]."""
        steps, _, width = ext.shape
        zero = beta * 0
        one = zero + 1
        for b in range(b_lo, b_hi):
            for t in range(steps - 1, -1, -1):
                later = t + 1 < steps
                for j in range(width):
                    e = ext[t, b, j]
                    if recurrent and later and g[t, b, j] != zero:
                        e += _dot(rec_table[j], delta[t + 1, b])
                    ds[t, b, j] = g[t, b, j] * e
                for n in range(width):
                    leak = zero
                    if later:
                        leak = delta[t + 1, b, n] * beta
                        if zero_reset:
                            leak *= one - reset_spikes[t, b, n]
                    delta[t, b, n] = ds[t, b, n] + leak


#: the pool the calls' blocks run on, (workers, pool), and the lock held while it is replaced or
#: given a call's blocks (so no call submits to a pool that was shut down)
_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, and its lock may be held."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _submit(work, ranges: list[tuple[int, int]], workers: int) -> list[Future]:
    """work(block, lo, hi) for every range, submitted to a pool of `workers` threads.

    A pool of another size is replaced and shut down (the blocks already given to it still run).
    """
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != workers:
            if _pool is not None:
                _pool[1].shutdown(wait=False)
            _pool = (workers, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ztriton-native"))
        return [_pool[1].submit(work, block, lo, hi) for block, (lo, hi) in enumerate(ranges)]


def _count(name: str, value, limit: int | None = None) -> int:
    """`value` as an int in [0, limit) (no upper limit if None)."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0 or (limit is not None and value >= limit):
        raise ValueError(f"{name} must be in [0, {limit if limit is not None else 'inf'}), got {value}")
    return int(value)


def block_ranges(count: int, min_items: int = MIN_BLOCK) -> list[tuple[int, int]]:
    """[0, count) cut into at most BLOCKS fixed, non-empty ranges of at least `min_items` items."""
    count, min_items = _count("count", count), positive_int("min_items", min_items)
    bounds = np.linspace(0, count, min(BLOCKS, max(count // min_items, 1)) + 1).astype(np.int64)
    return [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


def run_blocks(work, count: int, min_items: int = MIN_BLOCK) -> None:
    """work(block, lo, hi) for the fixed ranges of [0, count), on a pool of torch.get_num_threads()
    workers (nogil kernels inside); returns when every block has finished, also if one failed."""
    if not callable(work):
        raise TypeError(f"work must be callable, got {type(work).__name__}")
    ranges = block_ranges(count, min_items)
    workers = torch.get_num_threads()
    if len(ranges) <= 1 or workers <= 1:
        for block, (lo, hi) in enumerate(ranges):
            work(block, lo, hi)
        return
    errors = [future.exception() for future in _submit(work, ranges, workers)]  # waits for every block
    first = next((error for error in errors if error is not None), None)
    if first is not None:
        raise first


def run_kernel(kernel, count: int, *args, min_items: int = MIN_BLOCK) -> None:
    """kernel(lo, hi, *args) over the fixed ranges of [0, count)."""
    if not callable(kernel):
        raise TypeError(f"kernel must be callable, got {type(kernel).__name__}")
    run_blocks(lambda block, lo, hi: kernel(lo, hi, *args), count, min_items)


def _require_numba() -> None:
    if not AVAILABLE:
        raise RuntimeError(f"the native kernels need numba: {UNAVAILABLE_REASON}")


#: elements of work below which a block is not worth a thread hand-off
SMALL_WORK = 1 << 16
#: `scan_rows` lists in one pass into a scratch of 2x the sampled density (+ 1/64), up to this
#: density; denser arrays are counted, then listed (a second pass, without scratch)
MAX_SCAN_ROOM = 0.125


def philox_uniforms(index: torch.Tensor, seed: int, offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u1, u2) float32 of the RNG contract at int64 CPU positions `index` (as `rng.uniforms`)."""
    _require_numba()
    if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 or index.dim() != 1 or index.is_sparse \
            or index.device.type != "cpu":
        raise TypeError(f"index must be a 1-D int64 CPU tensor, got {_describe(index)}")
    seed, offset, k = (_count(name, value, 2**64) for name, value in (("seed", seed), ("offset", offset), ("k", k)))
    positions = index.contiguous().numpy()
    u1 = np.empty(positions.shape[0], dtype=np.float32)
    u2 = np.empty_like(u1)
    run_kernel(_philox_uniforms, positions.shape[0], positions, np.uint64(seed), np.uint64(offset), np.uint64(k), u1, u2,
               min_items=SMALL_WORK // 16)
    return torch.from_numpy(u1), torch.from_numpy(u2)


def scan_rows(dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row_ptr, cols, values) of the non-zeros of a (rows, width) float32/64 CPU tensor, row-major."""
    _require_numba()
    if not isinstance(dense, torch.Tensor) or dense.dtype not in (torch.float32, torch.float64) or dense.dim() != 2 \
            or dense.layout != torch.strided or dense.device.type != "cpu":
        raise TypeError(f"dense must be a strided 2-D float32/64 CPU tensor, got {_describe(dense)}")
    array = dense.detach().contiguous().numpy()
    rows, width = array.shape
    counts = np.empty(rows, dtype=np.int64)
    sample = array[::max(1, rows // 256)]
    room = 2.0 * np.count_nonzero(sample) / max(sample.size, 1) + 1 / 64  # density the scratch holds
    ranges = block_ranges(rows, max(MIN_BLOCK, SMALL_WORK // max(width, 1)))
    if room > MAX_SCAN_ROOM:  # dense: count every row, then list every block (no scratch)
        run_kernel(_scan_rows, rows, array, counts)
        redo = ranges
    else:  # sparse: one pass, each block into its own slice of a scratch sized from the sample
        caps = [int((hi - lo) * width * room) + 16 for lo, hi in ranges]
        starts = np.zeros(len(caps) + 1, dtype=np.int64)
        np.cumsum(caps, out=starts[1:])
        scratch_cols = np.empty(starts[-1], dtype=np.int64)
        scratch_values = np.empty(starts[-1], dtype=array.dtype)
        found = np.empty(len(ranges), dtype=np.int64)

        def scan(block: int) -> None:
            lo, hi = ranges[block]
            found[block] = _scan_fill_rows(lo, hi, array, counts, scratch_cols, scratch_values, starts[block],
                                           caps[block])

        run_blocks(lambda _, first, last: [scan(block) for block in range(first, last)], len(ranges), 1)
        redo = [lo_hi for block, lo_hi in enumerate(ranges) if found[block] > caps[block]]  # held more: again
    row_ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    cols = np.empty(row_ptr[-1], dtype=np.int64)
    values = np.empty(row_ptr[-1], dtype=array.dtype)
    if redo is not ranges:
        for block, (lo, hi) in enumerate(ranges):
            if found[block] <= caps[block]:
                kept = slice(starts[block], starts[block] + found[block])
                cols[row_ptr[lo]:row_ptr[hi]] = scratch_cols[kept]
                values[row_ptr[lo]:row_ptr[hi]] = scratch_values[kept]
    run_blocks(lambda _, first, last: [_fill_rows(*redo[i], array, row_ptr, cols, values) for i in range(first, last)],
               len(redo), 1)
    return torch.from_numpy(row_ptr), torch.from_numpy(cols), torch.from_numpy(values)
    # sparse: one pass, each block listing its non-zeros into its own slice of a scratch sized from a
    # sample of rows; a block that held more than its slice is listed again (its rows only)
    ranges = block_ranges(rows, max(MIN_BLOCK, SMALL_WORK // max(width, 1)))
    caps = [int((hi - lo) * width * room) + 16 for lo, hi in ranges]
    starts = np.zeros(len(caps) + 1, dtype=np.int64)
    np.cumsum(caps, out=starts[1:])
    scratch_cols = np.empty(starts[-1], dtype=np.int64)
    scratch_values = np.empty(starts[-1], dtype=array.dtype)
    found = np.empty(len(ranges), dtype=np.int64)

    def scan(block: int) -> None:
        lo, hi = ranges[block]
        found[block] = _scan_fill_rows(lo, hi, array, counts, scratch_cols, scratch_values, starts[block], caps[block])

    run_blocks(lambda _, first, last: [scan(block) for block in range(first, last)], len(ranges), 1)
    row_ptr = np.zeros(rows + 1, dtype=np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    cols = np.empty(row_ptr[-1], dtype=np.int64)
    values = np.empty(row_ptr[-1], dtype=array.dtype)
    for block, (lo, hi) in enumerate(ranges):
        if found[block] <= caps[block]:
            kept = slice(starts[block], starts[block] + found[block])
            cols[row_ptr[lo]:row_ptr[hi]] = scratch_cols[kept]
            values[row_ptr[lo]:row_ptr[hi]] = scratch_values[kept]
    redo = [lo_hi for block, lo_hi in enumerate(ranges) if found[block] > caps[block]]
    run_blocks(lambda _, first, last: [_fill_rows(*redo[i], array, row_ptr, cols, values) for i in range(first, last)],
               len(redo), 1)
    return torch.from_numpy(row_ptr), torch.from_numpy(cols), torch.from_numpy(values)


def gather_events(bins: np.ndarray, units: np.ndarray, offsets: np.ndarray, samples: np.ndarray,
                  steps: int) -> np.ndarray:
    """Row-major COO indices (3, nnz) of the events of `samples` (see `_gather_events`): sample s owns
    the events offsets[s]:offsets[s + 1] of (bins, units), each in bin [0, steps)."""
    _require_numba()
    arrays = dict(bins=bins, units=units, offsets=offsets, samples=samples)
    for name, array in arrays.items():
        if not isinstance(array, np.ndarray) or array.ndim != 1 or array.dtype.kind not in "iu":
            raise TypeError(f"{name} must be a 1-D integer numpy array, got {_describe(array)}")
    steps = positive_int("steps", steps)
    if bins.shape != units.shape:
        raise ValueError(f"bins and units must have one entry per event, got {bins.size} and {units.size}")
    if samples.size and (samples.min() < 0 or samples.max() >= offsets.size - 1):
        raise ValueError(f"samples must be in [0, {max(offsets.size - 1, 0)}), got [{samples.min()}, {samples.max()}]")
    first, last = offsets[samples], offsets[samples + 1]
    if samples.size and (first.min() < 0 or last.max() > bins.size or (last < first).any()):
        raise ValueError(f"offsets must delimit the samples' events within the {bins.size} events")
    total = int((last - first).sum())
    out = np.empty((3, total), dtype=np.int64)
    if not _gather_events(bins, units, offsets, samples, steps, out):
        raise ValueError(f"the events of these samples must lie in bins [0, {steps})")
    return out


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dim()}-D {value.dtype} {value.layout} tensor on {value.device}"
    if isinstance(value, np.ndarray):
        return f"a {value.ndim}-D {value.dtype} array"
    return type(value).__name__


#: warm-up calls of the kernels' users, registered by them (the native backend registers its
#: layer ops on import), so this module never imports upward
WARM_UPS: list = []


def register_warm_up(warm: Callable[[torch.dtype], None]) -> None:
    """Have `warm_up()` call `warm(dtype)` for float32 and float64 (a caller of these kernels)."""
    if not callable(warm):
        raise TypeError(f"warm must be callable, got {type(warm).__name__}")
    WARM_UPS.append(warm)


def warm_up() -> float:
    """Compile (or load from the disk cache) every kernel for float32 and float64; seconds taken.
    Raises a RuntimeError naming the reason where numba cannot be used (`UNAVAILABLE_REASON`)."""
    _require_numba()
    start = time.perf_counter()
    philox_uniforms(torch.arange(4), 1, 0, 0)
    gather_events(np.zeros(1, np.int16), np.zeros(1, np.int16), np.array([0, 1]), np.array([0]), 1)
    for dtype in (torch.float32, torch.float64):
        scan_rows(torch.eye(3, dtype=dtype))  # dense: counted, then listed
        scan_rows(torch.eye(64, dtype=dtype))  # sparse: one pass
        for warm in WARM_UPS:
            warm(dtype)
    return time.perf_counter() - start
