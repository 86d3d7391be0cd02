"""Counter-based random numbers: each uniform is a hash of (seed, counter, stream).

A request's draws depend only on its seed and the index of the output token
they decide: not on which requests share the batch, their order, the device, or
any generator state carried between steps. So a seeded request reproduces
anywhere, and a whole batch's numbers come from one vectorised computation on
the device that holds the logits.

The hash is MurmurHash3's 32-bit finaliser chained over the key's words. torch
has no unsigned 64-bit multiply and signed overflow is not something to rely
on, so the 32-bit products are formed from 16-bit halves, every intermediate
below 2**49.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
SEED_BITS = 63  # seeds are taken modulo 2**63: they travel as int64


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for 0 <= x, c < 2**32."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & MASK32


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def hash32(seed: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """int64 tensors (broadcast together) -> int64 values in [0, 2**32)."""
    h = _fmix32((seed & MASK32) ^ ((stream * 0x9E3779B9) & MASK32))
    h = _fmix32(h ^ ((seed >> 32) & MASK32))
    return _fmix32(h ^ (counter & MASK32))


def uniform(seed: torch.Tensor, counter: torch.Tensor, stream: int) -> torch.Tensor:
    """float64 uniforms in the open interval (0, 1), one per broadcast (seed, counter)."""
    return (hash32(seed, counter, stream).double() + 0.5) / 2.0**32
