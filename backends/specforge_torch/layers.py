"""PyTorch modules for the IR ops whose meaning torch's own layers do not have.

This file imports only torch: `specforge build --backend torch` copies it verbatim into the
standalone scripts it writes, so that `specforge run` and a built script compute with the
very same code. Tensors are NCHW here; the IR's (H, W, C) order matters only for flatten.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specforge.ir.randomness import as_int32, node_key
from specforge_torch.randomness import dropout_mask

_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "replicate"}


def pad_nchw(
    x: torch.Tensor, pads: tuple[int, int, int, int], mode: str = "zeros", value: float = 0.0
) -> torch.Tensor:
    """Pad (top, bottom, left, right) with zeros or constant (``value``), reflect (no edge
    repeat) or replicate."""
    top, bottom, left, right = pads
    if not any(pads):
        return x
    if mode in ("zeros", "constant"):
        return F.pad(x, (left, right, top, bottom), mode="constant", value=value)
    return F.pad(x, (left, right, top, bottom), mode=_PAD_MODES[mode])


class Conv2d(nn.Conv2d):
    """Conv2d with explicit per-side pads and pad mode (IR `conv2d`)."""

    def __init__(self, in_channels: int, filters: int, kernel: tuple[int, int],
                 strides: tuple[int, int], dilation: tuple[int, int], groups: int,
                 pads: tuple[int, int, int, int], pad_mode: str, bias: bool,
                 pad_value: float = 0.0) -> None:
        top, bottom, left, right = pads
        # torch pads symmetrically with zeros by itself; anything else is padded first
        self.symmetric = pad_mode == "zeros" and top == bottom and left == right
        super().__init__(in_channels, filters, kernel, strides,
                         (top, left) if self.symmetric else 0, dilation, groups, bias)
        self.pads, self.pad_mode, self.pad_value = pads, pad_mode, pad_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.symmetric:
            x = pad_nchw(x, self.pads, self.pad_mode, self.pad_value)
        return super().forward(x)


class Pool2d(nn.Module):
    """What both pools share: the window, the pads and the cells ceil_mode adds
    (:func:`specforge.ir.ops.pool_extension`, given as ``extra``)."""

    def __init__(
        self,
        pool: tuple[int, int],
        strides: tuple[int, int],
        pads: tuple[int, int, int, int],
        dilation: tuple[int, int] = (1, 1),
        extra: tuple[int, int] = (0, 0),
    ) -> None:
        super().__init__()
        self.pool, self.strides, self.pads = tuple(pool), tuple(strides), tuple(pads)
        self.dilation, self.extra = tuple(dilation), tuple(extra)

    def padded(self, x: torch.Tensor, value: float, beyond: float) -> torch.Tensor:
        """``x`` with its pads holding ``value`` and the ``extra`` cells (at the bottom and
        the right, where ceil_mode's last windows reach past the pads) ``beyond``."""
        x = pad_nchw(x, self.pads, "zeros", value)
        return pad_nchw(x, (0, self.extra[0], 0, self.extra[1]), "zeros", beyond)

    def window_sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over each (dilated) window of an already padded input."""
        if self.dilation == (1, 1):
            return F.avg_pool2d(x, self.pool, self.strides, divisor_override=1)
        cells = self.cells(x)
        return sum(cells[1:], cells[0])

    def cells(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One strided slice per window cell: cell (a, b) of every window at once."""
        (kh, kw), (sh, sw), (dh, dw) = self.pool, self.strides, self.dilation
        oh = (x.shape[2] - (kh - 1) * dh - 1) // sh + 1
        ow = (x.shape[3] - (kw - 1) * dw - 1) // sw + 1
        return [
            x[
                :,
                :,
                a * dh : a * dh + (oh - 1) * sh + 1 : sh,
                b * dw : b * dw + (ow - 1) * sw + 1 : sw,
            ]
            for a in range(kh)
            for b in range(kw)
        ]


class MaxPool2d(Pool2d):
    """Max pooling whose padded cells never win (-inf), or hold ``pad_value`` (IR
    `max_pool2d`)."""

    def __init__(
        self,
        pool: tuple[int, int],
        strides: tuple[int, int],
        pads: tuple[int, int, int, int],
        dilation: tuple[int, int] = (1, 1),
        extra: tuple[int, int] = (0, 0),
        pad_value: float | None = None,
    ) -> None:
        super().__init__(pool, strides, pads, dilation, extra)
        self.pad_value = float("-inf") if pad_value is None else pad_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.padded(x, self.pad_value, float("-inf"))
        return F.max_pool2d(x, self.pool, self.strides, dilation=self.dilation)


class AvgPool2d(Pool2d):
    """Average pooling whose divisor counts the padded cells only with ``count_include_pad``
    (then they add ``pad_value``) (IR `avg_pool2d`)."""

    def __init__(
        self,
        pool: tuple[int, int],
        strides: tuple[int, int],
        pads: tuple[int, int, int, int],
        dilation: tuple[int, int] = (1, 1),
        extra: tuple[int, int] = (0, 0),
        count_include_pad: bool = False,
        pad_value: float = 0.0,
    ) -> None:
        super().__init__(pool, strides, pads, dilation, extra)
        self.count_include_pad, self.pad_value = count_include_pad, pad_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not any(self.pads) and not any(self.extra) and self.dilation == (1, 1):
            return F.avg_pool2d(x, self.pool, self.strides)
        summed = self.window_sum(self.padded(x, self.pad_value, 0.0))
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        counts = self.window_sum(self.padded(ones, float(self.count_include_pad), 0.0))
        return summed / counts


class FlattenHWC(nn.Module):
    """Flatten in (height, width, channel) order, the IR's order (IR `flatten`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        return x.flatten(1)  # also for an empty shard of a batch (0 rows)


class BatchNorm(nn.Module):
    """running = decay * running + (1 - decay) * batch statistic; unbiased running variance
    (IR `batch_norm`). torch's momentum is the weight of the new value: 1 - decay."""

    def __init__(self, channels: int, decay: float, epsilon: float, scale: bool,
                 center: bool) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels)) if scale else None
        self.beta = nn.Parameter(torch.zeros(channels)) if center else None
        self.register_buffer("moving_mean", torch.zeros(channels))
        self.register_buffer("moving_var", torch.ones(channels))
        self.momentum, self.epsilon = 1.0 - decay, epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and _data_parallel():
            return self._with_batch_statistics(x, across_processes=True)
        if self.training and x.numel() == x.shape[1]:
            # one value per channel (a last batch of one image): F.batch_norm refuses it;
            # the IR's batch variance is 0 and its running update takes n / (n - 1) as 1
            return self._with_batch_statistics(x, across_processes=False)
        return F.batch_norm(x, self.moving_mean, self.moving_var, self.gamma, self.beta,
                            self.training, self.momentum, self.epsilon)

    def _with_batch_statistics(self, x: torch.Tensor, across_processes: bool) -> torch.Tensor:
        """Training, the formulas written out. ``across_processes`` (under DDP): the
        statistics of the whole batch, every process's shard together (the IR's batch norm
        is over the batch), through differentiable all-reduces, so that N processes compute
        what one computes on the whole batch."""
        total = torch.clone  # one process: its sums are the totals
        if across_processes:
            from torch.distributed.nn.functional import all_reduce as total
        axes = [0, 2, 3] if x.dim() == 4 else [0]
        shape = [1, -1] + [1] * (x.dim() - 2)
        # filled on the device: torch.tensor(..., device=cuda) would synchronise the stream
        mine = x.new_full((1,), x.numel() / x.shape[1])
        totals = total(torch.cat([x.sum(axes), mine]))  # the sums and the count
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean.reshape(shape)
        var = total((centred * centred).sum(axes)) / count
        with torch.no_grad():
            unbiased = var * count / torch.clamp(count - 1, min=1)
            self.moving_mean.lerp_(mean, self.momentum)
            self.moving_var.lerp_(unbiased, self.momentum)
        y = centred * torch.rsqrt(var + self.epsilon).reshape(shape)
        if self.gamma is not None:
            y = y * self.gamma.reshape(shape)
        return y + self.beta.reshape(shape) if self.beta is not None else y


def _data_parallel() -> bool:
    """Whether this process is one of several training together (torchrun and DDP)."""
    distributed = torch.distributed
    return distributed.is_available() and distributed.is_initialized() and \
        distributed.get_world_size() > 1


class LayerNorm(nn.Module):
    """Each sample's (each pixel's) channels normalised, then scaled and shifted (IR
    `layer_norm`): torch's F.layer_norm over the last axis, on an NCHW image with the
    channels moved last and back."""

    def __init__(self, channels: int, epsilon: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.epsilon = epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1)
        y = F.layer_norm(x, self.gamma.shape, self.gamma, self.beta, self.epsilon)
        return y.permute(0, 3, 1, 2) if y.dim() == 4 else y


class GroupNorm(nn.Module):
    """Each sample's channels normalised in groups over their channels and pixels, then
    scaled and shifted (IR `group_norm`): torch's F.group_norm, whose groups are
    consecutive channels of dim 1, of an NCHW image or a vector alike."""

    def __init__(self, channels: int, groups: int, epsilon: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))
        self.groups, self.epsilon = groups, epsilon

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.group_norm(x, self.groups, self.gamma, self.beta, self.epsilon)


class Dropout(nn.Module):
    """Dropout with specforge's counter-based masks (IR `dropout`; docs/ir-ops.md, "The
    dropout generator"): element i of the whole batch is kept by its own bits under this
    node's key at this step, computed on the device, the same in every backend and process.
    ``spatial`` draws once per (sample, channel), ``per_sample`` once per sample.
    :meth:`set_key` before each training step; the identity in evaluation."""

    def __init__(self, rate: float, spatial: bool, shape: tuple[int, ...], node: str,
                 per_sample: bool = False) -> None:
        super().__init__()
        self.rate, self.spatial, self.shape, self.node = rate, spatial, tuple(shape), node
        self.per_sample = per_sample
        # not weights: left out of state_dict, and set anew every step
        self.register_buffer("key", torch.zeros((), dtype=torch.int32), persistent=False)
        self.register_buffer("first_sample", torch.zeros((), dtype=torch.int32),
                             persistent=False)

    def set_key(self, seed: int, step: int, first_sample: int = 0) -> None:
        """This step's key; ``first_sample``: the global index of this process's first
        sample (its shard's offset), so that N processes draw what one process draws."""
        self.key.fill_(as_int32(node_key(seed, step, self.node)))  # fill_: no synchronising
        self.first_sample.fill_(first_sample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        mask = dropout_mask((x.shape[0], *self.shape), self.rate, self.key, self.first_sample,
                            self.spatial, self.per_sample, dtype=x.dtype)
        return x * mask


class Activation(nn.Module):
    """Element-wise activation `fn` (softmax over the channel axis) (IR `activation`)."""

    def __init__(self, fn: str, negative_slope: float = 0.01, alpha: float = 1.0,
                 beta: float = 0.5) -> None:
        super().__init__()
        self.fn, self.negative_slope, self.alpha, self.beta = fn, negative_slope, alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fn = self.fn
        if fn == "linear":
            return x
        if fn == "leaky_relu":
            return F.leaky_relu(x, self.negative_slope)
        if fn == "elu":
            return F.elu(x, self.alpha)
        if fn == "gelu":
            return F.gelu(x)
        if fn == "gelu_tanh":
            return F.gelu(x, approximate="tanh")
        if fn == "softmax":
            return torch.softmax(x, dim=1)
        if fn == "softplus":
            return F.softplus(x)  # log(1 + exp(x)); x itself above 20 (error < 3e-9)
        if fn == "hard_sigmoid" and (self.alpha, self.beta) != (1 / 6, 0.5):
            return hard_sigmoid(x, self.alpha, self.beta)
        return _ELEMENTWISE[fn](x)


def hard_sigmoid(x: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """max(0, min(1, alpha * x + beta)); torch's F.hardsigmoid is alpha 1/6, beta 0.5."""
    return torch.clamp(alpha * x + beta, 0, 1)


class HardSigmoid(nn.Module):
    """hard_sigmoid with any alpha and beta (IR `activation`)."""

    def __init__(self, alpha: float, beta: float) -> None:
        super().__init__()
        self.alpha, self.beta = alpha, beta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return hard_sigmoid(x, self.alpha, self.beta)


_ELEMENTWISE = {
    "relu": torch.relu, "relu6": F.relu6, "selu": torch.selu, "silu": F.silu,
    "sigmoid": torch.sigmoid, "hard_sigmoid": F.hardsigmoid, "hard_swish": F.hardswish,
    "tanh": torch.tanh, "softsign": F.softsign,
}


class Add(nn.Module):
    """Element-wise sum (IR `add`)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = out + x
        return out


class Multiply(nn.Module):
    """Element-wise product (IR `multiply`); an (N, C) channel gate scales an (N, C, H, W)
    input at every pixel."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if a.dim() < b.dim():
            a = a[:, :, None, None]
        elif b.dim() < a.dim():
            b = b[:, :, None, None]
        return a * b


class Concat(nn.Module):
    """Concatenation along channels (IR `concat`)."""

    def forward(self, *xs: torch.Tensor) -> torch.Tensor:
        return torch.cat(xs, dim=1)


class GlobalPool(nn.Module):
    """Mean or max over height and width (IR `global_avg_pool2d`, `global_max_pool2d`)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) if self.kind == "avg" else x.amax(dim=(2, 3))


class Pad2d(nn.Module):
    """Explicit padding as a layer (IR `pad2d`)."""

    def __init__(self, pads: tuple[int, int, int, int], mode: str,
                 pad_value: float = 0.0) -> None:
        super().__init__()
        self.pads, self.mode, self.pad_value = pads, mode, pad_value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pad_nchw(x, self.pads, self.mode, self.pad_value)


class Cropping2d(nn.Module):
    """Cuts (top, bottom, left, right) pixels off the sides of an NCHW image (IR
    `cropping2d`); torch has no cropping module, a slice is all it takes."""

    def __init__(self, crops: tuple[int, int, int, int]) -> None:
        super().__init__()
        self.crops = crops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom, left, right = self.crops
        return x[:, :, top : x.shape[2] - bottom, left : x.shape[3] - right]


class ChannelSlice(nn.Module):
    """Channels ``[start, stop)`` of an NCHW image or an (N, C) vector (IR
    `channel_slice`): ``x[:, start:stop]``, one piece of torch's ``x.chunk(2, dim=1)``."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.start : self.stop]


class Rescaling(nn.Module):
    """``x * scale + offset``, each a number or one per channel (IR `rescaling`); ``image``:
    NCHW input, so per-channel values are held as (C, 1, 1)."""

    def __init__(
        self, scale: float | tuple[float, ...], offset: float | tuple[float, ...], image: bool
    ) -> None:
        super().__init__()
        shape = (-1, 1, 1) if image else (-1,)
        # buffers follow the model's device; not persistent: they are spec values, not weights
        self.register_buffer("scale", torch.tensor(scale).reshape(shape), persistent=False)
        self.register_buffer("offset", torch.tensor(offset).reshape(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # in x's dtype: a float32 tensor would otherwise promote an autocast bf16 x
        return x * self.scale.to(x.dtype) + self.offset.to(x.dtype)
