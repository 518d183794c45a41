"""Keras 3 layers for the IR ops whose meaning Keras's own layers do not have.

This file imports only keras: `specforge build --backend keras` copies it into the
standalone scripts it writes. Tensors are NHWC, as in the IR. Everything is written with
``keras.ops``, so it runs on the TensorFlow, JAX and PyTorch backends of Keras.
"""

from __future__ import annotations

import keras
from keras import ops

from specforge.ir.randomness import as_int32, node_key
from specforge_keras.randomness import dropout_mask


def pad_nhwc(x, pads, mode="zeros", value=0.0):
    """Pad (top, bottom, left, right): zeros or constant (``value``), reflect (no edge
    repeat) or replicate (repeat the edge; built from slices, since TensorFlow has no `edge`
    pad)."""
    top, bottom, left, right = pads
    if not any(pads):
        return x
    widths = [[0, 0], [top, bottom], [left, right], [0, 0]]
    if mode in ("zeros", "constant"):
        return ops.pad(x, widths, mode="constant", constant_values=value)
    if mode == "reflect":
        return ops.pad(x, widths, mode="reflect")
    rows = [x[:, :1]] * top + [x] + [x[:, -1:]] * bottom
    x = ops.concatenate(rows, axis=1) if top or bottom else x
    cols = [x[:, :, :1]] * left + [x] + [x[:, :, -1:]] * right
    return ops.concatenate(cols, axis=2) if left or right else x


class Conv2D(keras.layers.Conv2D):
    """Conv2D with explicit per-side pads and pad mode (IR `conv2d`). Keras refuses strides
    with dilation: then the conv runs at stride 1 and every stride-th output is kept, the
    same numbers."""

    def __init__(
        self,
        filters,
        kernel,
        strides,
        dilation,
        groups,
        pads,
        pad_mode,
        bias,
        pad_value=0.0,
        **kwargs,
    ):
        strides, dilation = tuple(strides), tuple(dilation)
        self.subsample = strides if max(strides) > 1 and max(dilation) > 1 else (1, 1)
        super().__init__(
            filters,
            kernel,
            strides=(1, 1) if self.subsample != (1, 1) else strides,
            padding="valid",
            dilation_rate=dilation,
            groups=groups,
            use_bias=bias,
            **kwargs,
        )
        self.pads, self.pad_mode, self.pad_value = tuple(pads), pad_mode, pad_value

    def call(self, x):
        y = super().call(pad_nhwc(x, self.pads, self.pad_mode, self.pad_value))
        sh, sw = self.subsample
        return y[:, ::sh, ::sw] if sh > 1 or sw > 1 else y

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        top, bottom, left, right = self.pads
        grown = (
            n,
            None if h is None else h + top + bottom,
            None if w is None else w + left + right,
            c,
        )
        n, h, w, f = super().compute_output_shape(grown)
        sh, sw = self.subsample
        return (n, None if h is None else -(-h // sh), None if w is None else -(-w // sw), f)


class Pad2D(keras.layers.Layer):
    """Explicit padding as a layer (IR `pad2d`)."""

    def __init__(self, pads, mode, pad_value=0.0, **kwargs):
        super().__init__(**kwargs)
        self.pads, self.mode, self.pad_value = tuple(pads), mode, pad_value

    def call(self, x):
        return pad_nhwc(x, self.pads, self.mode, self.pad_value)


class ChannelSlice(keras.layers.Layer):
    """Channels ``[start, stop)`` (the last axis) of an image or a vector (IR
    `channel_slice`)."""

    def __init__(self, start, stop, **kwargs):
        super().__init__(**kwargs)
        self.start, self.stop = start, stop

    def call(self, x):
        return x[..., self.start : self.stop]


class ChannelShuffle(keras.layers.Layer):
    """ShuffleNet's channel shuffle of an NHWC image (IR `channel_shuffle`): the channels as
    ``groups`` groups, interleaved."""

    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        self.groups = groups

    def call(self, x):
        _, h, w, c = x.shape
        grouped = ops.reshape(x, (-1, h, w, self.groups, c // self.groups))
        return ops.reshape(ops.transpose(grouped, (0, 1, 2, 4, 3)), (-1, h, w, c))


class Pool2D(keras.layers.Layer):
    """What both pools share: the window, the pads and the cells ceil_mode adds
    (:func:`specforge.ir.ops.pool_extension`, given as ``extra``)."""

    def __init__(self, pool, strides, pads, dilation=(1, 1), extra=(0, 0), **kwargs):
        super().__init__(**kwargs)
        self.pool, self.strides, self.pads = tuple(pool), tuple(strides), tuple(pads)
        self.dilation, self.extra = tuple(dilation), tuple(extra)

    def padded(self, x, value, beyond):
        """``x`` with its pads holding ``value`` and the ``extra`` cells (at the bottom and
        the right, where ceil_mode's last windows reach past the pads) ``beyond``."""
        x = pad_nhwc(x, self.pads, "zeros", value)
        return pad_nhwc(x, (0, self.extra[0], 0, self.extra[1]), "zeros", beyond)

    def cells(self, x):
        """One strided slice per window cell: cell (a, b) of every window at once (Keras's
        pools have no dilation)."""
        (kh, kw), (sh, sw), (dh, dw) = self.pool, self.strides, self.dilation
        oh = (x.shape[1] - (kh - 1) * dh - 1) // sh + 1
        ow = (x.shape[2] - (kw - 1) * dw - 1) // sw + 1
        return [
            x[:, a * dh : a * dh + (oh - 1) * sh + 1 : sh, b * dw : b * dw + (ow - 1) * sw + 1 : sw]
            for a in range(kh)
            for b in range(kw)
        ]


class MaxPool2D(Pool2D):
    """Max pooling whose padded cells never win (-inf), or hold ``pad_value`` (IR
    `max_pool2d`)."""

    def __init__(
        self, pool, strides, pads, dilation=(1, 1), extra=(0, 0), pad_value=None, **kwargs
    ):
        super().__init__(pool, strides, pads, dilation, extra, **kwargs)
        self.pad_value = float("-inf") if pad_value is None else pad_value

    def call(self, x):
        x = self.padded(x, self.pad_value, float("-inf"))
        if self.dilation == (1, 1):
            return ops.max_pool(x, self.pool, self.strides, padding="valid")
        out = None
        for cell in self.cells(x):
            out = cell if out is None else ops.maximum(out, cell)
        return out


class AvgPool2D(Pool2D):
    """Average pooling whose divisor counts the padded cells only with ``count_include_pad``
    (then they add ``pad_value``) (IR `avg_pool2d`)."""

    def __init__(
        self,
        pool,
        strides,
        pads,
        dilation=(1, 1),
        extra=(0, 0),
        count_include_pad=False,
        pad_value=0.0,
        **kwargs,
    ):
        super().__init__(pool, strides, pads, dilation, extra, **kwargs)
        self.count_include_pad, self.pad_value = count_include_pad, pad_value

    def call(self, x):
        mean = self.window_mean(self.padded(x, self.pad_value, 0.0))
        if not any(self.pads) and not any(self.extra):
            return mean
        ones = ops.ones((1, x.shape[1], x.shape[2], 1), dtype=x.dtype)
        share = self.window_mean(self.padded(ones, float(self.count_include_pad), 0.0))
        return mean / share  # mean over the window / fraction of it that counts

    def window_mean(self, x):
        if self.dilation == (1, 1):
            return ops.average_pool(x, self.pool, self.strides, "valid")
        cells = self.cells(x)
        return sum(cells[1:], cells[0]) / len(cells)


class PReLU(keras.layers.Layer):
    """x where x > 0, else alpha * x, one slope per channel (IR `prelu`), computed as
    Keras's PReLU does (relu(x) - alpha * relu(-x)), with alpha kept as specforge's (C,)
    where Keras's PReLU(shared_axes=[1, 2]) keeps (1, 1, C)."""

    def build(self, input_shape):
        self.alpha = self.add_weight(shape=(input_shape[-1],), initializer="zeros",
                                     name="alpha")

    def call(self, x):
        return ops.relu(x) - self.alpha * ops.relu(-x)


class BatchNorm(keras.layers.Layer):
    """running = decay * running + (1 - decay) * batch statistic, with the unbiased batch
    variance for the running variance (IR `batch_norm`). Keras's own BatchNormalization
    uses the biased one and a momentum of the opposite meaning."""

    def __init__(self, decay, epsilon, scale, center, **kwargs):
        super().__init__(**kwargs)
        self.decay, self.epsilon, self.scale, self.center = decay, epsilon, scale, center

    def build(self, input_shape):
        c = input_shape[-1]
        self.gamma = self.add_weight(shape=(c,), initializer="ones", name="gamma") \
            if self.scale else None
        self.beta = self.add_weight(shape=(c,), initializer="zeros", name="beta") \
            if self.center else None
        self.moving_mean = self.add_weight(shape=(c,), initializer="zeros",
                                           name="moving_mean", trainable=False)
        self.moving_var = self.add_weight(shape=(c,), initializer="ones", name="moving_var",
                                          trainable=False)

    def call(self, x, training=False):
        axes = list(range(len(x.shape) - 1))
        if training:
            mean = ops.mean(x, axis=axes)
            var = ops.mean(ops.square(x - mean), axis=axes)
            n = 1
            for a in axes:
                n = n * ops.shape(x)[a]
            n = ops.cast(n, x.dtype)
            unbiased = var * n / ops.maximum(n - 1, 1)
            self.moving_mean.assign(self.decay * self.moving_mean + (1 - self.decay) * mean)
            self.moving_var.assign(self.decay * self.moving_var + (1 - self.decay) * unbiased)
        else:
            mean, var = self.moving_mean, self.moving_var
        y = (x - mean) * ops.rsqrt(var + self.epsilon)
        if self.gamma is not None:
            y = y * self.gamma
        if self.beta is not None:
            y = y + self.beta
        return y


class Dropout(keras.layers.Layer):
    """Dropout with specforge's counter-based masks (IR `dropout`; docs/ir-ops.md, "The
    dropout generator"): element i of the whole batch is kept by its own bits under this
    node's key at this step, computed on the device inside the compiled step, the same in
    every backend. ``spatial`` draws once per (sample, channel), ``per_sample`` once per
    sample. :meth:`set_key` before each training step; the identity in evaluation."""

    def __init__(self, rate, spatial, node, per_sample=False, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.spatial, self.node, self.per_sample = rate, spatial, node, per_sample
        # a variable, so that a new key is new data for the compiled step, not a new graph
        self.key = self.add_weight(shape=(), initializer="zeros", dtype="int32",
                                   trainable=False, name="key")

    def set_key(self, seed, step):
        self.key.assign(as_int32(node_key(seed, step, self.node)))

    def call(self, x, training=False):
        if not training or self.rate == 0:
            return x
        shape = (ops.shape(x)[0], *x.shape[1:])  # the batch may be unknown when traced
        return x * dropout_mask(shape, self.rate, self.key, 0, self.spatial, self.per_sample,
                                x.dtype)


class Activation(keras.layers.Layer):
    """Element-wise activation `fn` (softmax over the last axis) (IR `activation`)."""

    def __init__(self, fn, negative_slope=0.01, alpha=1.0, beta=0.5, **kwargs):
        super().__init__(**kwargs)
        self.fn, self.negative_slope, self.alpha, self.beta = fn, negative_slope, alpha, beta

    def call(self, x):
        fn = self.fn
        if fn == "linear":
            return x
        if fn == "leaky_relu":
            return ops.leaky_relu(x, negative_slope=self.negative_slope)
        if fn == "elu":
            return ops.elu(x, alpha=self.alpha)
        if fn == "gelu":
            return ops.gelu(x, approximate=False)
        if fn == "gelu_tanh":
            return ops.gelu(x, approximate=True)
        if fn == "softmax":
            return ops.softmax(x, axis=-1)
        if fn == "hard_sigmoid" and (self.alpha, self.beta) != (1 / 6, 0.5):
            return ops.clip(self.alpha * x + self.beta, 0, 1)
        return getattr(ops, _ELEMENTWISE[fn])(x)


_ELEMENTWISE = {
    "relu": "relu", "relu6": "relu6", "selu": "selu", "silu": "silu", "sigmoid": "sigmoid",
    "hard_sigmoid": "hard_sigmoid", "hard_swish": "hard_silu", "tanh": "tanh",
    "softplus": "softplus", "softsign": "softsign",
}


class GlobalPool(keras.layers.Layer):
    """Mean or max over height and width (IR `global_avg_pool2d`, `global_max_pool2d`)."""

    def __init__(self, kind, **kwargs):
        super().__init__(**kwargs)
        self.kind = kind

    def call(self, x):
        return ops.mean(x, axis=(1, 2)) if self.kind == "avg" else ops.max(x, axis=(1, 2))
