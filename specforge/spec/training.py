"""Loss, optimizer, learning-rate schedule, metrics and training settings.

Defaults are specforge's own and the same for every backend. Where PyTorch and Keras
disagree (Adam's epsilon placement, SGD momentum under a schedule, RMSprop's epsilon, weight
decay, clipping), the formula is written in docs/semantics.md and in the IR, and every backend
implements exactly that one.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, model_validator

from specforge.spec.layers import SpecModel

LearningRate = Annotated[float, Field(gt=0, le=100, description="Base learning rate.")]


# --- losses ---------------------------------------------------------------------------------

FromLogits = Literal["auto"] | bool
_FROM_LOGITS_DOC = (
    "`auto`: a model that ends in softmax (sigmoid for binary) outputs probabilities and is "
    "trained as logits + cross-entropy-from-logits; any other output is taken as logits. "
    "`false`: the output is probabilities; a final softmax is folded as with `auto`, any "
    "other output gets cross-entropy on probabilities clipped to [1e-7, 1 - 1e-7]. `true` "
    "with a final softmax is an error."
)


class CrossEntropy(SpecModel):
    """Categorical cross-entropy against integer class labels, with label smoothing."""

    type: Literal["cross_entropy", "categorical_crossentropy", "sparse_categorical_crossentropy"]
    from_logits: FromLogits = Field("auto", description=_FROM_LOGITS_DOC)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Target y*(1-e) + e/C.")


class BinaryCrossEntropy(SpecModel):
    """Binary cross-entropy for a single output unit and labels 0/1."""

    type: Literal["binary_cross_entropy", "binary_crossentropy"]
    from_logits: FromLogits = Field("auto", description=_FROM_LOGITS_DOC)
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="Target y*(1-e) + e/2.")


class Regression(SpecModel):
    """Mean squared or absolute error against one-hot targets, averaged over all elements."""

    type: Literal["mse", "mean_squared_error", "mae", "mean_absolute_error"]


Loss = Annotated[CrossEntropy | BinaryCrossEntropy | Regression, Field(discriminator="type")]


# --- learning-rate schedules ------------------------------------------------------------------

class ScheduleBase(SpecModel):
    unit: Literal["epoch", "step"] = Field(
        "epoch", description="What the schedule's counts are in. Per-epoch schedules change "
                             "the rate at epoch boundaries.")
    warmup: int = Field(0, ge=0, description="Linear warmup length, in `unit`s, before the "
                                             "schedule proper starts counting.")
    warmup_start_factor: float = Field(0.0, ge=0, le=1,
                                       description="Warmup starts at this fraction of the rate.")


class ConstantSchedule(ScheduleBase):
    """The base rate throughout (after any warmup)."""

    type: Literal["constant"]


class StepSchedule(ScheduleBase):
    """lr * gamma ** floor(t / step_size)."""

    type: Literal["step"]
    step_size: int = Field(ge=1)
    gamma: float = Field(0.1, gt=0)


class MultiStepSchedule(ScheduleBase):
    """lr * gamma ** (number of milestones <= t)."""

    type: Literal["multistep"]
    milestones: list[Annotated[int, Field(ge=1)]] = Field(min_length=1)
    gamma: float = Field(0.1, gt=0)

    @model_validator(mode="after")
    def _increasing(self) -> MultiStepSchedule:
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:], strict=False)):
            raise ValueError("milestones must be strictly increasing")
        return self


class ExponentialSchedule(ScheduleBase):
    """lr * gamma ** t."""

    type: Literal["exponential"]
    gamma: float = Field(gt=0, le=1)


class CosineSchedule(ScheduleBase):
    """min_lr + (lr - min_lr) * (1 + cos(pi * min(t, t_max) / t_max)) / 2; flat after t_max."""

    type: Literal["cosine"]
    t_max: int = Field(ge=1, description="Length of the half cosine, in `unit`s.")
    min_lr: float = Field(0.0, ge=0)


Schedule = Annotated[
    ConstantSchedule | StepSchedule | MultiStepSchedule | ExponentialSchedule | CosineSchedule,
    Field(discriminator="type"),
]


# --- optimizers -------------------------------------------------------------------------------

class OptimizerBase(SpecModel):
    weight_decay: float = Field(
        0.0, ge=0, lt=1, description="Coupled L2: g += weight_decay * p for every parameter, "
                                     "before the update (AdamW: decoupled, see there).")
    clip_norm: float | None = Field(
        None, gt=0, description="Scale all gradients together so that their global L2 norm "
                                "is at most this.")
    clip_value: float | None = Field(None, gt=0, description="Clamp each gradient element to "
                                                             "[-clip_value, clip_value].")
    schedule: Schedule | None = None


class SGD(OptimizerBase):
    """b = momentum * b + g; p -= lr * b (Nesterov: p -= lr * (g + momentum * b)).

    `gradient_descent` is the same update; full-batch descent is `data.batch_size: full`.
    `momentum` is SGD with momentum 0.9 by default.
    """

    type: Literal["sgd", "gradient_descent", "momentum"]
    learning_rate: LearningRate = 0.01
    momentum: float | None = Field(None, ge=0, lt=1,
                                   description="Default 0 (0.9 for type `momentum`).")
    nesterov: bool = False

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> SGD:
        if self.nesterov and self.effective_momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self

    @property
    def effective_momentum(self) -> float:
        if self.momentum is not None:
            return self.momentum
        return 0.9 if self.type == "momentum" else 0.0


class RMSprop(OptimizerBase):
    """v = rho * v + (1 - rho) * g^2; p -= lr * g / (sqrt(v) + epsilon)."""

    type: Literal["rmsprop"]
    learning_rate: LearningRate = 0.001
    rho: float = Field(0.9, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0, description="Added outside the square root.")


class Adam(OptimizerBase):
    """m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr * m_hat / (sqrt(v_hat) + epsilon).

    The paper's form with bias-corrected m_hat, v_hat. AdamW adds the decoupled decay
    p -= lr * weight_decay * p before the Adam step, instead of the coupled L2.
    """

    type: Literal["adam", "adamw"]
    learning_rate: LearningRate = 0.001
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.999, ge=0, lt=1)
    epsilon: float = Field(1e-7, gt=0, description="Added after the square root, paper form.")
    weight_decay: float | None = Field(  # type: ignore[assignment]
        None, ge=0, lt=1, description="adam: coupled L2 (default 0). adamw: decoupled decay "
                                      "p -= lr * weight_decay * p (default 0.01).")

    @property
    def effective_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 0.01 if self.type == "adamw" else 0.0


Optimizer = Annotated[SGD | RMSprop | Adam, Field(discriminator="type")]


# --- metrics ----------------------------------------------------------------------------------

MetricName = Literal["accuracy", "precision", "recall", "f1", "top_k_accuracy"]


def _metric_json_schema(schema: dict[str, Any]) -> None:
    # A metric may be written as its bare name; say so to editors too.
    as_object = dict(schema)
    schema.clear()
    schema["anyOf"] = [{"type": "string", "enum": list(MetricName.__args__)}, as_object]


class Metric(SpecModel):
    """A metric computed over a whole epoch (streaming), never as a mean of batch values.

    Write a bare name (`accuracy`) or a mapping with options. Classes are predicted by
    argmax (binary: logit > 0). precision, recall and f1 average per-class values (`macro`)
    or pool the counts (`micro`).
    """

    model_config = ConfigDict(json_schema_extra=_metric_json_schema)

    type: MetricName
    average: Literal["macro", "micro"] | None = Field(
        None, description="precision, recall, f1: default macro.")
    k: int | None = Field(None, ge=1, description="top_k_accuracy: default 5.")

    @model_validator(mode="before")
    @classmethod
    def _accept_name(cls, value: Any) -> Any:
        return {"type": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _options_match_type(self) -> Metric:
        if self.average is not None and self.type not in ("precision", "recall", "f1"):
            raise ValueError(f"`average` applies to precision, recall and f1, not {self.type}")
        if self.k is not None and self.type != "top_k_accuracy":
            raise ValueError(f"`k` applies to top_k_accuracy, not {self.type}")
        return self

    @property
    def label(self) -> str:
        """The metric's column name in logs, e.g. ``f1_macro`` or ``top_5_accuracy``."""
        if self.type == "top_k_accuracy":
            return f"top_{self.k or 5}_accuracy"
        if self.type in ("precision", "recall", "f1"):
            return f"{self.type}_{self.average or 'macro'}"
        return self.type


class Training(SpecModel):
    """How long to train and how often to validate."""

    epochs: int = Field(10, ge=1, le=100_000)
    steps_per_epoch: int | None = Field(None, ge=1, description="Default: one pass over the "
                                                                "training data.")
    validation_steps: int | None = Field(None, ge=1, description="Default: the whole "
                                                                 "validation set.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to train; `auto` takes a GPU when there is one.")
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast the forward pass to bf16/fp16 (weights stay fp32).")
    channels_last: bool = Field(False, description="Channels-last memory format (GPU speed).")
    compile: bool | Literal["default", "reduce-overhead", "max-autotune"] = Field(
        False, description="Compile the model with torch.compile (true: its default mode; "
                           "`reduce-overhead` replays CUDA graphs, which helps small batches; "
                           "`max-autotune` also searches kernels). Keras: ignored (its "
                           "train step is a tf.function without XLA, or jax.jit).")
    data_on_device: Literal["auto"] | bool = Field(
        "auto", description="Hold the training set on the device and build batches there "
                            "(`auto`: on a GPU, when it fits in 2 GiB).")
    checkpoint_every: int = Field(1, ge=1, description="Write a checkpoint every N epochs.")
    track: Literal["mlflow"] | None = Field(
        None, description="Also log the run to MLflow (as `--track mlflow`): the resolved "
                          "spec's fields as params, the metrics of every step and epoch, and "
                          "the run folder as artifacts, to MLFLOW_TRACKING_URI or ./mlruns. "
                          "Needs `pip install 'specforge[mlflow]'`. Every run folder gets "
                          "TensorBoard event files whatever this says.")
