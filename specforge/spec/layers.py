"""The `model:` section: input shape and layers, as users write them.

Each layer type's *meaning* (formula, defaults, shape rule) lives in the IR op it lowers to,
in :mod:`specforge.ir.ops`; this module only describes what may be written. Sizes are
``(height, width)``, tensors are ``(height, width, channels)`` per sample.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, model_validator

#: Lets a tuple field take the list YAML gives. Spec models validate strictly (see
#: SpecModel), which would take tuples only; the items stay strict.
FromList = Strict(False)
#: Names of layers and blocks: safe as identifiers in every backend and every template.
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
Size = Annotated[int, Field(ge=1, le=65_536)]
Extent = Annotated[int, Field(ge=1, le=4_096)]
Pad = Annotated[int, Field(ge=0, le=4_096)]
PairOrInt = Extent | Annotated[tuple[Extent, Extent], FromList]

ActivationName = Literal[
    "linear", "relu", "relu6", "leaky_relu", "elu", "selu", "gelu", "gelu_tanh", "silu",
    "sigmoid", "hard_sigmoid", "hard_swish", "tanh", "softplus", "softsign", "softmax",
]


class SpecModel(BaseModel):
    """Base of every spec model: unknown keys are errors and values are immutable.

    Validation is strict: a count is a whole number, never the text `'16'` or `true`; a
    number is never `true`; a flag is `true` or `false`, never `1`. Floats are finite
    everywhere (`.nan` and `.inf` are refused). Tuple fields take lists (`FromList`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class ActivationConfig(SpecModel):
    """An activation function with its parameters."""

    fn: ActivationName = Field(description="Which function; see the IR `activation` op.")
    negative_slope: float | None = Field(
        None, description="leaky_relu only: slope for x < 0 (default 0.01).")
    alpha: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "elu: scale of the negative part (default 1.0); hard_sigmoid: the slope (default "
        "1/6, so that hard_sigmoid is relu6(x + 3) / 6; ONNX's default is 0.2)."))
    beta: float | None = Field(None, allow_inf_nan=False, description=(
        "hard_sigmoid only: the offset, max(0, min(1, alpha * x + beta)) (default 0.5)."))

    @model_validator(mode="after")
    def _params_match_fn(self) -> ActivationConfig:
        check_activation_params(self.fn, self.negative_slope, self.alpha, self.beta)
        return self


def check_activation_params(fn: str, negative_slope: float | None, alpha: float | None,
                            beta: float | None) -> None:
    """Each activation parameter belongs to its functions only."""
    if negative_slope is not None and fn != "leaky_relu":
        raise ValueError(f"negative_slope applies to leaky_relu, not {fn}")
    if alpha is not None and fn not in ("elu", "hard_sigmoid"):
        raise ValueError(f"alpha applies to elu and hard_sigmoid, not {fn}")
    if beta is not None and fn != "hard_sigmoid":
        raise ValueError(f"beta applies to hard_sigmoid, not {fn}")


Activation = Annotated[
    ActivationName | ActivationConfig,
    Field(description="An activation name (`relu`) or `{fn: leaky_relu, negative_slope: 0.1}`."),
]


class PerSidePadding(SpecModel):
    """Explicit padding for each side, in pixels."""

    top: Pad = 0
    bottom: Pad = 0
    left: Pad = 0
    right: Pad = 0


Padding = Annotated[
    Literal["valid", "same", "same_lower"] | Pad | Annotated[tuple[Pad, Pad], FromList]
    | PerSidePadding,
    Field(description="`valid` (none), `same` (output = ceil(input / stride), an odd extra "
                      "pixel after: ONNX's SAME_UPPER), `same_lower` (the same, the odd "
                      "pixel before: ONNX's SAME_LOWER), an int for every side, "
                      "`[height, width]` for both sides of each, or `{top, bottom, left, "
                      "right}`."),
]
PaddingMode = Literal["zeros", "constant", "reflect", "replicate"]
PadValue = Annotated[float | None, Field(
    None, allow_inf_nan=False,
    description="With the padding mode `constant` only: the value every padded pixel holds "
                "(default 0).")]


def check_pad_value(mode: str, pad_value: float | None) -> None:
    """``pad_value`` belongs to the constant padding mode only."""
    if pad_value is not None and mode != "constant":
        raise ValueError(f"pad_value applies to padding mode constant, not {mode}")


class LayerBase(SpecModel):
    """Fields every layer has."""

    name: Name | None = Field(None, description="Unique layer name; generated when omitted.")
    inputs: Name | Annotated[list[Name], Field(min_length=1)] | None = Field(
        None, description="Layer name(s) this layer reads; `input` is the model's (or a "
                          "block's) input. Default: the previous layer.")
    repeat: int = Field(1, ge=1, le=1_000, description="Stack this layer N times in sequence.")


class Conv2D(LayerBase):
    """2-D convolution (cross-correlation), optionally grouped, with optional activation."""

    type: Literal["conv2d"]
    filters: Size = Field(description="Number of output channels.")
    kernel: PairOrInt = Field(description="Kernel size: int or [height, width].")
    strides: PairOrInt = 1
    dilation: PairOrInt = 1
    groups: Size = Field(1, description="Split channels into groups; must divide both "
                                        "input channels and filters.")
    padding: Padding = "valid"
    padding_mode: PaddingMode = Field("zeros", description="What the padded pixels hold.")
    pad_value: PadValue = None
    bias: bool = True
    activation: Activation | None = None

    @model_validator(mode="after")
    def _pad_value_with_constant(self) -> Conv2D:
        check_pad_value(self.padding_mode, self.pad_value)
        return self


class DepthwiseConv2D(LayerBase):
    """Depthwise convolution: each input channel convolved with its own kernel(s)."""

    type: Literal["depthwise_conv2d"]
    kernel: PairOrInt
    depth_multiplier: Size = Field(1, description="Output channels per input channel.")
    strides: PairOrInt = 1
    dilation: PairOrInt = 1
    padding: Padding = "valid"
    padding_mode: PaddingMode = "zeros"
    pad_value: PadValue = None
    bias: bool = True
    activation: Activation | None = None

    @model_validator(mode="after")
    def _pad_value_with_constant(self) -> DepthwiseConv2D:
        check_pad_value(self.padding_mode, self.pad_value)
        return self


class Pad2D(LayerBase):
    """Explicit spatial padding as a layer of its own."""

    type: Literal["pad2d", "zero_padding2d"]
    padding: Pad | Annotated[tuple[Pad, Pad], FromList] | PerSidePadding = 1
    mode: PaddingMode = "zeros"
    pad_value: PadValue = None

    @model_validator(mode="after")
    def _pad_value_with_constant(self) -> Pad2D:
        check_pad_value(self.mode, self.pad_value)
        return self


class PerSideCropping(PerSidePadding):
    """Pixels cut from each side."""


class Cropping2D(LayerBase):
    """Cut pixels off the sides of an image (Keras's Cropping2D); written as pad2d's
    padding is. What is cut must leave at least one pixel of height and width."""

    type: Literal["cropping2d"]
    cropping: Pad | Annotated[tuple[Pad, Pad], FromList] | PerSideCropping = Field(
        description="An int for every side, `[height, width]` for both sides of each, or "
                    "`{top, bottom, left, right}`.")


class ChannelSlice(LayerBase):
    """Channels ``[start, stop)`` of an image or a vector (torch's ``x[:, start:stop]``,
    one piece of ``x.chunk(2, dim=1)``). At least one channel must remain."""

    type: Literal["channel_slice"]
    start: Annotated[int, Field(ge=0, le=65_536)] = Field(
        0, description="The first channel taken (counted from 0).")
    stop: Size | None = Field(None, description=(
        "One past the last channel taken; default: to the last channel."))

    @model_validator(mode="after")
    def _takes_a_channel(self) -> ChannelSlice:
        if self.stop is not None and self.stop <= self.start:
            raise ValueError(f"stop {self.stop} must be greater than start {self.start}: "
                             "a slice takes at least one channel")
        return self


class ChannelShuffle(LayerBase):
    """ShuffleNet's channel shuffle of an image: the channels, seen as ``groups`` groups of
    C / groups, interleaved (torch's ``nn.ChannelShuffle``)."""

    type: Literal["channel_shuffle"]
    groups: Size = Field(description=(
        "How many groups the channels form; must divide the channels."))


class Pool2D(LayerBase):
    """Fields of both pooling layers."""

    pool: PairOrInt = Field(2, description="Window size: int or [height, width].")
    strides: PairOrInt | None = Field(None, description="Default: the window size.")
    dilation: PairOrInt = Field(1, description="Spacing of the window's cells.")
    padding: Padding = Field("valid", description="As for conv2d. Padded cells never win a "
                                                  "max and never count in an average, "
                                                  "unless pad_value or count_include_pad "
                                                  "says otherwise.")
    ceil_mode: bool = Field(False, description=(
        "Output length by ceil instead of floor: a last, partial window, unless it would "
        "start in the right padding (ONNX's and torch's ceil_mode)."))
    pad_value: float | None = Field(None, allow_inf_nan=False, description=(
        "The value padded cells hold; they then take part in the max (in the average, "
        "counted). Default: none, padded cells are left out."))


class MaxPool2D(Pool2D):
    """Maximum over each window."""

    type: Literal["max_pool2d", "max_pooling2d"]


class AvgPool2D(Pool2D):
    """Mean over each window; padded cells are not counted unless count_include_pad."""

    type: Literal["avg_pool2d", "average_pooling2d"]
    count_include_pad: bool | None = Field(None, description=(
        "Whether padded cells count in the divisor (adding 0, or pad_value, to the sum). "
        "Default false (as ONNX; torch's default is true), true when pad_value is given."))

    @model_validator(mode="after")
    def _pad_value_counts(self) -> AvgPool2D:
        if self.pad_value is not None and self.count_include_pad is False:
            raise ValueError("pad_value makes padded cells count in the average: leave out "
                             "count_include_pad: false, or pad_value")
        return self


class GlobalAvgPool2D(LayerBase):
    """Mean over all spatial positions: (H, W, C) -> (C,)."""

    type: Literal["global_avg_pool2d", "global_average_pooling2d"]


class GlobalMaxPool2D(LayerBase):
    """Maximum over all spatial positions: (H, W, C) -> (C,)."""

    type: Literal["global_max_pool2d", "global_max_pooling2d"]


class Flatten(LayerBase):
    """(H, W, C) -> (H*W*C,), in height, width, channel order."""

    type: Literal["flatten"]


class Dense(LayerBase):
    """Fully connected layer on a flat vector."""

    type: Literal["dense", "linear"]
    units: Size
    bias: bool = True
    activation: Activation | None = None


class BatchNorm(LayerBase):
    """Batch normalisation over the channel axis."""

    type: Literal["batch_norm", "batch_normalization"]
    running_decay: float = Field(
        0.9, ge=0, lt=1, description="running = decay * running + (1 - decay) * batch "
        "statistic. (Not `momentum`: torch and Keras use that word for opposite things.)")
    epsilon: float = Field(1e-5, gt=0, description="Added to the variance before the sqrt.")
    scale: bool = Field(True, description="Learn a per-channel scale (gamma).")
    center: bool = Field(True, description="Learn a per-channel offset (beta).")


class LayerNorm(LayerBase):
    """Layer normalisation: each sample's channel vector (each pixel's, on an image)
    normalised over the channel axis, with a learned per-channel scale and offset."""

    type: Literal["layer_norm", "layer_normalization"]
    epsilon: float = Field(1e-3, gt=0, description=(
        "Added to the variance before the sqrt (Keras's default; torch's is 1e-5)."))


class GroupNorm(LayerBase):
    """Group normalisation: each sample's channels in `groups` groups of C / groups, each
    group normalised over its channels and every pixel, with a learned per-channel scale and
    offset (torch's `nn.GroupNorm`, Keras's `GroupNormalization`)."""

    type: Literal["group_norm", "group_normalization"]
    groups: Size = Field(description="Number of channel groups; must divide the channels.")
    epsilon: float = Field(1e-3, gt=0, description=(
        "Added to the variance before the sqrt (Keras's default, as `layer_norm`'s; "
        "torch's is 1e-5)."))


class PReLU(LayerBase):
    """Parametric ReLU: ``x`` where ``x > 0``, else ``alpha * x``, with a learned slope
    ``alpha`` per channel (shared by every pixel of an image): torch's
    ``nn.PReLU(num_parameters=C)``, Keras's ``PReLU(shared_axes=[1, 2])`` on images and
    ``PReLU()`` on vectors."""

    type: Literal["prelu"]
    alpha_init: float = Field(0.25, allow_inf_nan=False, description=(
        "Every channel's initial slope (torch's default and He et al.'s; Keras's is 0, "
        "which starts as a relu)."))


class Dropout(LayerBase):
    """Inverted dropout: zero each element with probability `rate`, scale the rest."""

    type: Literal["dropout"]
    rate: float = Field(ge=0, lt=1)
    spatial: bool = Field(False, description="Drop whole channels (SpatialDropout2D).")
    per_sample: bool = Field(False, description=(
        "Drop whole samples: one draw per sample zeroes (or scales) its whole output, "
        "before an `add` as drop-connect or stochastic depth (Keras's Dropout with "
        "noise_shape (None, 1, 1, 1)). Not with `spatial`."))

    @model_validator(mode="after")
    def _one_draw_unit(self) -> Dropout:
        if self.spatial and self.per_sample:
            raise ValueError("per_sample drops whole samples and spatial whole channels: "
                             "set one of them, not both")
        return self


class ActivationLayer(LayerBase):
    """An activation function as a layer of its own."""

    type: Literal["activation"]
    fn: ActivationName
    negative_slope: float | None = None
    alpha: float | None = Field(None, gt=0, allow_inf_nan=False)
    beta: float | None = Field(None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _params_match_fn(self) -> ActivationLayer:
        check_activation_params(self.fn, self.negative_slope, self.alpha, self.beta)
        return self

    def config(self) -> ActivationConfig:
        return ActivationConfig(fn=self.fn, negative_slope=self.negative_slope,
                                alpha=self.alpha, beta=self.beta)


#: A per-tensor number, or a list of one number per channel (the last axis).
ScaleValue = float | Annotated[list[float], Field(min_length=1)]


class Rescaling(LayerBase):
    """y = x * scale + offset, element-wise (Keras's Rescaling; a fixed Normalization)."""

    type: Literal["rescaling"]
    scale: ScaleValue = Field(1.0, description=(
        "A number, or a list of one number per channel (the last axis)."))
    offset: ScaleValue = Field(0.0, description=(
        "A number, or a list of one number per channel (the last axis)."))


class Merge(LayerBase):
    """Fields of both merge layers."""

    inputs: list[Name] = Field(min_length=2, description="The layers to merge (at least 2).")


class Add(Merge):
    """Element-wise sum of inputs of one shape."""

    type: Literal["add"]


class Multiply(Merge):
    """Element-wise product of two inputs: of one shape, or a (channels,) vector and an
    image whose channels it scales (a squeeze-and-excitation gate)."""

    type: Literal["multiply"]
    inputs: list[Name] = Field(min_length=2, max_length=2,
                               description="The two layers to multiply.")


class Concat(Merge):
    """Concatenation along the channel (last) axis."""

    type: Literal["concat", "concatenate"]


class BlockUse(LayerBase):
    """An instance of a block from `blocks:`, with arguments for its parameters."""

    type: Literal["block"]
    block: Name = Field(description="Name of a block defined under `blocks:`.")
    args: dict[Name, Any] = Field(default_factory=dict,
                                  description="Values for the block's parameters.")


Layer = Annotated[
    Conv2D | DepthwiseConv2D | Pad2D | Cropping2D | ChannelSlice | ChannelShuffle | MaxPool2D
    | AvgPool2D | GlobalAvgPool2D | GlobalMaxPool2D | Flatten | Dense | BatchNorm | LayerNorm
    | GroupNorm | PReLU | Dropout | ActivationLayer | Rescaling | Add | Multiply | Concat
    | BlockUse,
    Field(discriminator="type"),
]


LayerDefaults = Annotated[
    dict[str, dict[str, Any]],
    Field(description="Default field values by layer type, e.g. `{batch_norm: {epsilon: "
                      "0.001}}`; a layer's own value wins, a block's defaults win over the "
                      "spec's. See Blocks, expressions and defaults."),
]


class BlockDef(SpecModel):
    """A reusable, parameterised group of layers. Inside it, `${...}` holds an expression
    over the parameters and the input's shape (`${4 * filters}`, `${input.channels}`),
    `input` names the block's input, and a layer with `when: "${...}"` is left out where the
    condition is false; its output is its last present layer. See Blocks, expressions and
    defaults."""

    params: dict[Name, Any] = Field(
        default_factory=dict, description="Parameter names with defaults; null = required.")
    defaults: LayerDefaults = Field(default_factory=dict)
    layers: list[dict[str, Any]] = Field(
        min_length=1, description="Layers, as in the model, each with an optional `when:`.")


class ModelSpec(SpecModel):
    """The network: an input shape and a list (or graph) of layers."""

    input: Annotated[tuple[Extent, Extent, Annotated[int, Field(ge=1, le=4_096)]],
                     FromList] = Field(
        description="Input shape per sample: [height, width, channels].")
    layers: list[Layer] = Field(min_length=1)
    output: Name | None = Field(None, description="The output layer; default: the last one.")
