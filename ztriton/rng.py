"""The random-number contract every backend follows (torch reference, Triton kernels, native kernels).

Each LocalZO draw is a pure function of (seed, offset, flat index, sample k): Philox4x32-10, the
counter-based generator behind Triton's `tl.rand`, with

    key     = (seed mod 2^32, seed div 2^32)
    counter = (index mod 2^32, index div 2^32, offset mod 2^32, k)

where `index` is the entry's row-major position in the layer's (T, B, N) grid. The first two
32-bit outputs become uniforms u1, u2 in [0, 1) exactly as Triton's `uint_to_uniform_float` does,
and each law turns them into |z| (`Distribution.abs_z_from_uniforms`). So a draw does not depend
on how the grid is split across threads, chunks or programs, and every backend draws the same z:
the integers and uniforms bit for bit, |z| up to the last bits of `log`/`cos` where a law uses them.

(seed, offset) come from the torch generator in use (`next_key`), advanced once per call: on CUDA
through the generator's Philox offset (no host sync), on CPU by drawing a seed. So
`torch.manual_seed`, `get_rng_state`/`set_rng_state`, activation-checkpoint recomputation and a
resumed run reproduce the same z.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon et al. 2011), as in triton/language/random.py
KEY_A, KEY_B = 0x9E3779B9, 0xBB67AE85
ROUND_A, ROUND_B = 0xD2511F53, 0xCD9E8D57
ROUNDS = 10
#: the factor of Triton's uint_to_uniform_float: the largest int32 times it stays below 1.0
UNIFORM_SCALE = 4.6566127342e-10
#: largest uniform the contract returns ((2^31 - 1) * UNIFORM_SCALE in float32)
UNIFORM_MAX = float(torch.tensor(2**31 - 1, dtype=torch.float32) * UNIFORM_SCALE)
#: how far a CUDA generator's offset moves per call (torch's own kernels move it in steps of 4)
OFFSET_STEP = 4


class PhiloxKey(NamedTuple):
    """Seed and offset of one call's draws."""

    seed: int
    offset: int


def next_key(generator: torch.Generator | None, device: torch.device) -> PhiloxKey:
    """The (seed, offset) of the next call, advancing `generator` (default: the device's global one).

    CUDA: seed = the generator's seed, offset = its Philox offset, then moved on by OFFSET_STEP
    (host-side state, no sync). CPU: a fresh 62-bit seed drawn from the generator, offset 0.
    """
    if device.type == "cuda":
        if generator is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            generator = torch.cuda.default_generators[index]
        offset = generator.get_offset()
        generator.set_offset(offset + OFFSET_STEP)
        return PhiloxKey(generator.initial_seed(), offset)
    seed = torch.randint(0, 2**62, (), generator=generator, device="cpu")
    return PhiloxKey(int(seed), 0)


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of the 64-bit product a * b of uint32 values held in int64.

    `a` is split into 16-bit halves so no intermediate exceeds 2^49 (int64 never overflows).
    """
    p_lo, p_hi = b * (a & 0xFFFF), b * (a >> 16)
    low = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (low >> 32), low & MASK32


def philox(seed: int, c0: torch.Tensor, c1, c2, c3) -> tuple[torch.Tensor, ...]:
    """Philox4x32-10 of counters (c0, c1, c2, c3) (int64 tensors or ints holding uint32 values).

    Returns the four uint32 outputs as int64 tensors; bit-identical to triton.language.random.philox.
    """
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    shape = c0.shape
    c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64, device=c0.device).expand(shape) for c in (c1, c2, c3))
    for _ in range(ROUNDS):
        hi_b, lo_b = _mulhilo(ROUND_B, c2)
        hi_a, lo_a = _mulhilo(ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + KEY_A) & MASK32, (k1 + KEY_B) & MASK32
    return c0, c1, c2, c3


def to_uniform(bits: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 in [0, 1), as Triton: reinterpret as int32, fold negatives, scale."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(torch.float32) * UNIFORM_SCALE


def uniforms_reference(key: PhiloxKey, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u1, u2) float32 for the entries at flat positions `index` (int64) and sample `k`, in torch ops."""
    index = index.to(torch.int64)
    out0, out1, _, _ = philox(key.seed, index & MASK32, index >> 32, key.offset & MASK32, k)
    return to_uniform(out0), to_uniform(out1)


def uniforms(key: PhiloxKey, index: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u1, u2) as `uniforms_reference`; on CPU by the native kernel where numba is installed (the
    integer stage only: bit-identical, about 10x faster than ~200 int64 torch passes)."""
    from . import native

    if index.device.type == "cpu" and native.AVAILABLE:
        return native.philox_uniforms(index.to(torch.int64), key.seed, key.offset & MASK32, k)
    return uniforms_reference(key, index, k)


def abs_z(law, key: PhiloxKey, index: torch.Tensor, k: int) -> torch.Tensor:
    """|z| of sample `k` at flat positions `index` under `law` (a `Distribution`), float32."""
    return law.abs_z_from_uniforms(*uniforms(key, index, k))
