"""Native CPU kernels (numba), each equal to a plain-torch reference elsewhere in the package.

`philox_uniforms`: the integer stage of the RNG contract (`ztriton.rng`) for a list of flat
positions, serial, so it is safe in forked DataLoader workers (no threading layer is started).
Compiled on first use and cached on disk (`cache=True`).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import torch

AVAILABLE = importlib.util.find_spec("numba") is not None

if AVAILABLE:
    import numba

    @numba.njit(cache=True, nogil=True)
    def _philox_uniforms(index, seed, offset, k, u1, u2):  # pragma: no cover - compiled
        mask = np.uint64(0xFFFFFFFF)
        key0 = np.uint64(seed) & mask
        key1 = (np.uint64(seed) >> np.uint64(32)) & mask
        for i in range(index.shape[0]):
            position = np.uint64(index[i])
            c0, c1 = position & mask, position >> np.uint64(32)
            c2, c3 = np.uint64(offset) & mask, np.uint64(k)
            k0, k1 = key0, key1
            for _ in range(10):
                product_b = np.uint64(0xCD9E8D57) * c2
                product_a = np.uint64(0xD2511F53) * c0
                c0, c2 = ((product_b >> np.uint64(32)) ^ c1 ^ k0) & mask, ((product_a >> np.uint64(32)) ^ c3 ^ k1) & mask
                c1, c3 = product_b & mask, product_a & mask
                k0, k1 = (k0 + np.uint64(0x9E3779B9)) & mask, (k1 + np.uint64(0xBB67AE85)) & mask
            for out, bits in ((u1, c0), (u2, c1)):
                signed = np.int64(bits) - np.int64(4294967296) if bits >= np.uint64(2147483648) else np.int64(bits)
                folded = -signed - 1 if signed < 0 else signed
                out[i] = np.float32(folded) * np.float32(4.6566127342e-10)


def philox_uniforms(index: torch.Tensor, seed: int, offset: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(u1, u2) float32 of the RNG contract at int64 CPU positions `index` (as `rng.uniforms`)."""
    positions = index.contiguous().numpy()
    u1 = np.empty(positions.shape[0], dtype=np.float32)
    u2 = np.empty_like(u1)
    _philox_uniforms(positions, np.uint64(seed), np.uint64(offset), np.uint64(k), u1, u2)
    return torch.from_numpy(u1), torch.from_numpy(u2)
