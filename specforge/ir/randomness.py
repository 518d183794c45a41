"""specforge's random stream for dropout masks: a counter-based generator that numpy, torch
and keras.ops compute bit for bit alike, on any device and inside compiled steps.

All arithmetic is on unsigned 32-bit words, modulo 2^32; ``>>`` is a logical shift. The
mixing function is Chris Wellons' "lowbias32":

    mix32(x):  x ^= x >> 16;  x = x * 0x7FEB352D;  x ^= x >> 15;
               x = x * 0x846CA68B;  x ^= x >> 16

**Key.** The key of dropout node ``name`` at training step ``step`` is computed on the host
from the spec's seed (an integer in [0, 2^64); specs allow [0, 2^32), so ``seed_hi`` is 0
there):

    node_id = crc32(utf8(name))
    seed_lo = seed & 0xFFFFFFFF,  seed_hi = (seed >> 32) & 0xFFFFFFFF
    key     = mix32(mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ (step & 0xFFFFFFFF)) ^ node_id)

**Bits.** Element ``i`` of the mask (a 32-bit counter, taken modulo 2^32) draws

    bits(i) = mix32((mix32(i ^ key) + 0x9E3779B9) mod 2^32)
    r(i)    = bits(i) >> 8            (24 bits, uniform in [0, 2^24))

**Keep.** Element ``i`` is kept iff ``r(i) >= threshold(rate)`` with
``threshold(rate) = ceil(rate * 2^24)``, computed exactly from the float ``rate`` (a binary
fraction), so it keeps with probability ``1 - threshold / 2^24`` (``1 - rate`` up to
2^-24). The mask is float32: ``1 / (1 - rate)`` (rounded once from float64) where kept, 0
elsewhere.

**Counter.** ``i`` is the element's position in the IR (channels-last) layout of the node's
output for the whole batch, counting samples from ``first_sample``, the global index of the
first sample computed (so data-parallel shards draw what one process draws):

- (N, H, W, C): ``i = ((n * H + h) * W + w) * C + c``
- (N, F): ``i = n * F + f``
- spatial dropout, one draw per sample and channel, mask (N, 1, 1, C): ``i = n * C + c``
- per-sample dropout, one draw per sample, mask (N, 1, 1, 1) on images, (N, 1) on
  features: ``i = n``

where ``n`` is the global sample index: each rule is the element's position in the mask's
own layout, whose axes are the output's or 1. Frameworks without unsigned 32-bit
arithmetic use int32 with two's-complement wrap-around (the same bits; constants above
2^31 written as their int32 values) and write ``x >> k`` as an arithmetic shift followed
by ``& (2^(32-k) - 1)``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

MASK32 = 0xFFFFFFFF
#: lowbias32's multipliers and the golden-ratio constant added between the two mixes
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B
GOLDEN = 0x9E3779B9
#: r(i) keeps the top 24 bits of bits(i): a float32 mantissa's worth
UNIFORM_BITS = 24
SEED_LIMIT = 2**64


def as_int32(word: int) -> int:
    """The int32 value with the bits of the 32-bit word ``word`` (taken modulo 2^32): the
    backends compute in int32 with two's-complement wrap-around."""
    word &= MASK32
    return word - (1 << 32) if word >= 1 << 31 else word


def mix32(x: int) -> int:
    """lowbias32 of one 32-bit word, on Python ints (exact, for keys and known values)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MUL1) & MASK32
    x ^= x >> 15
    x = (x * MUL2) & MASK32
    x ^= x >> 16
    return x


def node_key(seed: int, step: int, node_name: str) -> int:
    """The key (a 32-bit word) of dropout node ``node_name`` at training step ``step``."""
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be in [0, 2^64), got {seed}")
    seed_lo, seed_hi = seed & MASK32, (seed >> 32) & MASK32
    node_id = zlib.crc32(node_name.encode("utf-8"))
    return mix32(mix32(mix32(mix32(seed_lo) ^ seed_hi) ^ (step & MASK32)) ^ node_id)


def keep_threshold(rate: float) -> int:
    """ceil(rate * 2^24), exactly: an element is kept iff its r(i) is at least this."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return math.ceil(Fraction(rate) * 2**UNIFORM_BITS)


def mask_shape(shape: Sequence[int], spatial: bool = False, per_sample: bool = False
               ) -> tuple[int, ...]:
    """The mask's IR shape for a node output of IR shape ``shape`` (batch first): the whole
    shape (one draw per element), (N, 1, 1, C) when ``spatial`` (one per sample and
    channel), (N, 1, ..., 1) when ``per_sample`` (one per sample). The batch, ``shape[0]``,
    is passed through untouched (a traced graph's may be a tensor)."""
    if spatial and per_sample:
        raise ValueError("dropout is spatial or per_sample, not both")
    if per_sample:
        return (shape[0], *[1] * (len(shape) - 1))
    if spatial:
        if len(shape) != 4:
            raise ValueError(f"spatial dropout needs (N, H, W, C), got {tuple(shape)}")
        return (shape[0], 1, 1, shape[3])
    return tuple(shape)


def mix32_array(x: np.ndarray) -> np.ndarray:
    """lowbias32 element-wise on a uint32 array (numpy's uint32 arrays wrap silently)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(MUL1)
    x = x ^ (x >> np.uint32(15))
    x = x * np.uint32(MUL2)
    return x ^ (x >> np.uint32(16))


def uniform24(shape: Sequence[int], key: int, first_sample: int = 0,
              spatial: bool = False, per_sample: bool = False) -> np.ndarray:
    """r(i) of every mask element, uint32 in [0, 2^24), in the mask's IR shape
    (:func:`mask_shape`)."""
    shape = mask_shape(shape, spatial, per_sample)
    draws_per_sample = math.prod(shape[1:])
    start = (first_sample * draws_per_sample) & MASK32
    # counters past 2^32 wrap, as uint32 arithmetic does on every backend
    counters = ((np.arange(math.prod(shape), dtype=np.uint64) + start) & MASK32)
    counters = counters.astype(np.uint32).reshape(shape)
    mixed = mix32_array(counters ^ np.uint32(key & MASK32)) + np.uint32(GOLDEN)
    return mix32_array(mixed) >> np.uint32(32 - UNIFORM_BITS)


def dropout_mask(shape: Sequence[int], rate: float, key: int, first_sample: int = 0,
                 spatial: bool = False, per_sample: bool = False) -> np.ndarray:
    """The float32 dropout mask (0 or 1 / (1 - rate)) of a node output of IR shape ``shape``
    (batch first), in the mask's shape (:func:`mask_shape`: (N, 1, 1, C) when ``spatial``,
    (N, 1, ..., 1) when ``per_sample``), drawn from the samples ``first_sample`` onwards
    with ``key`` (:func:`node_key`)."""
    keep = uniform24(shape, key, first_sample, spatial, per_sample) >= keep_threshold(rate)
    return np.where(keep, np.float32(1 / (1 - rate)), np.float32(0))
