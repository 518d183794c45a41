"""specforge's dropout masks in keras.ops: the generator of ``specforge.ir.randomness``, bit
for bit (docs/ir-ops.md, "The dropout generator"), on the TensorFlow, JAX and PyTorch
backends of Keras.

Besides keras this file imports only ``as_int32`` and ``mask_shape`` from the reference
(pure Python), so a built script can carry it verbatim. JAX has no int64 by
default and torch no uint32 shifts, so the words are int32 with two's-complement
wrap-around (the same bits), and a logical shift is an arithmetic one followed by a mask.
Everything is traceable: the per-step key is a tensor argument (a new key is new data, not
a new graph) and nothing reads a value back to the host, so a trainer can call
:func:`dropout_mask` inside a ``tf.function`` or ``jax.jit``-ed step. Masks are NHWC, as
the IR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from keras import ops

from specforge.ir.randomness import as_int32, mask_shape

Tensor = Any  # a backend tensor: tf.Tensor, jax.Array or torch.Tensor

_UNIFORM_BITS = 24

# lowbias32's multipliers and the golden-ratio constant, as int32 values
_MUL1 = as_int32(0x7FEB352D)
_MUL2 = as_int32(0x846CA68B)
_GOLDEN = as_int32(0x9E3779B9)


def key_tensor(key: int) -> Tensor:
    """A 32-bit key (``specforge.ir.randomness.node_key``) as an int32 scalar tensor."""
    return ops.convert_to_tensor(as_int32(key), dtype="int32")


def keep_threshold(rate: float) -> int:
    """ceil(rate * 2^24), exactly (``specforge.ir.randomness.keep_threshold``): scaling a
    float by a power of two is exact, and plain float arithmetic stays traceable."""
    if not 0 <= rate < 1:
        raise ValueError(f"dropout rate must be in [0, 1), got {rate}")
    return math.ceil(rate * 2.0**_UNIFORM_BITS)


def _int32(value: int) -> Tensor:
    # explicit int32 constants: no backend may promote a large Python int to int64
    return ops.convert_to_tensor(value, dtype="int32")


def _shr(x: Tensor, k: int) -> Tensor:
    """Logical right shift of int32 words: arithmetic shift, then clear the copied signs."""
    return ops.bitwise_and(ops.right_shift(x, _int32(k)), _int32((1 << (32 - k)) - 1))


def mix32_tensor(x: Tensor) -> Tensor:
    """lowbias32 element-wise on int32 words."""
    x = ops.bitwise_xor(x, _shr(x, 16))
    x = ops.multiply(x, _int32(_MUL1))
    x = ops.bitwise_xor(x, _shr(x, 15))
    x = ops.multiply(x, _int32(_MUL2))
    return ops.bitwise_xor(x, _shr(x, 16))


def _first_counter(first_sample: int | Tensor, draws_per_sample: int) -> Tensor:
    if isinstance(first_sample, int):
        return _int32(as_int32(first_sample * draws_per_sample))
    # wraps like uint32
    return ops.multiply(ops.cast(first_sample, "int32"), _int32(as_int32(draws_per_sample)))


def uniform24(shape: Sequence[int], key: Tensor, first_sample: int | Tensor = 0,
              spatial: bool = False, per_sample: bool = False) -> Tensor:
    """r(i) of every mask element (int32 in [0, 2^24)) in the mask's shape (``mask_shape``);
    ``shape`` is the node output's shape (NHWC or (N, F)), batch first."""
    shape = mask_shape(shape, spatial, per_sample)
    # the batch, shape[0], may be a tensor (traced graphs)
    draws_per_sample = math.prod(shape[1:])
    counters = ops.add(ops.arange(shape[0] * draws_per_sample, dtype="int32"),
                       _first_counter(first_sample, draws_per_sample))
    mixed = ops.add(mix32_tensor(ops.bitwise_xor(counters, ops.cast(key, "int32"))),
                    _int32(_GOLDEN))
    return ops.reshape(_shr(mix32_tensor(mixed), 32 - _UNIFORM_BITS), shape)


def dropout_mask(shape: Sequence[int], rate: float, key: Tensor,
                 first_sample: int | Tensor = 0, spatial: bool = False,
                 per_sample: bool = False, dtype: str = "float32") -> Tensor:
    """The dropout mask (0 or 1 / (1 - rate)) of a node output of shape ``shape``: (N, H, W,
    C) or (N, F), N being the samples computed here; (N, 1, 1, C) when ``spatial``, (N, 1,
    1, 1) or (N, 1) when ``per_sample``.

    ``key``: the node's key at this step (:func:`key_tensor`), an int32 scalar tensor.
    ``first_sample``: the global index of the first of the N samples (a data-parallel
    shard's offset), a Python int or an integer scalar tensor.
    """
    keep = ops.greater_equal(uniform24(shape, key, first_sample, spatial, per_sample),
                             _int32(keep_threshold(rate)))
    return ops.where(keep, ops.convert_to_tensor(1 / (1 - rate), dtype=dtype),
                     ops.convert_to_tensor(0, dtype=dtype))
