"""The Keras backend as the conformance suite drives it (:class:`specforge.backends.Probe`).

It trains with the backend's own compiled step (:func:`~specforge_keras.trainer.
make_train_step`) in float32. Dropout layers are replaced by ones that multiply by
specforge's masks; the masks travel with the images as the model's input, so that they are
arguments of the compiled step rather than constants baked into it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
from keras import ops

from specforge.backends import Probe
from specforge.errors import UsageError
from specforge.ir.graph import Node, identifier_names
from specforge.ir.program import Program, optimizer_slots
from specforge_keras.model import create_model, export_weights, variable_of
from specforge_keras.trainer import loss_value, make_slots, make_train_step


class MaskedDropout(keras.layers.Layer):
    """Dropout that multiplies by the mask it is given; the identity in evaluation."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mask: Any = None

    def call(self, x: Any, training: bool = False) -> Any:
        return x * self.mask if training and self.mask is not None else x


class WithMasks:
    """The model, called with ``(images, masks)``: it sets each dropout's mask, then runs
    the model. It offers what the train step uses of a keras.Model."""

    def __init__(self, model: keras.Model, dropouts: list[MaskedDropout]) -> None:
        self.model, self.dropouts = model, dropouts
        self.trainable_variables = model.trainable_variables
        self.non_trainable_variables = model.non_trainable_variables

    def _set(self, masks: Any) -> None:
        for layer, mask in zip(self.dropouts, masks, strict=True):
            layer.mask = mask

    def __call__(self, inputs: Any, training: bool = False) -> Any:
        self._set(inputs[1])
        return self.model(inputs[0], training=training)

    def stateless_call(self, params: Any, states: Any, inputs: Any, training: bool = False
                       ) -> Any:
        self._set(inputs[1])
        return self.model.stateless_call(params, states, inputs[0], training=training)


def full_precision() -> list[str]:
    """Turn off TF32 and reduced-precision matmuls for the running Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(False)
        return ["keras/tensorflow: TF32 execution off; train step without XLA"]
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        return ["keras/jax: default matmul precision 'highest' (no TF32, no bf16 passes)"]
    if backend == "torch":
        from specforge_torch.probe import full_precision as torch_full_precision

        return [f"keras/{n}" for n in torch_full_precision()]
    return []


def where_keras_computes(requested: str | None) -> str:
    """The device the running Keras backend computes on, in words; a clear error when it
    is not the ``requested`` one (Keras picks its device itself)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        kind, name = ("cuda" if device.platform == "gpu" else device.platform), \
            device.device_kind
    elif backend == "torch":
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
        name = torch.cuda.get_device_name() if kind == "cuda" else "cpu"
    else:
        import tensorflow as tf

        kind = "cuda" if tf.config.list_logical_devices("GPU") else "cpu"
        name = kind
    if requested not in (None, "auto") and not requested.startswith(kind):
        raise UsageError(
            f"--device {requested}: Keras on {backend} sees no GPU here" if kind == "cpu" else
            f"--device {requested}: Keras on {backend} computes on the GPU; hide it "
            "(CUDA_VISIBLE_DEVICES=) to compute on the CPU")
    return f"{kind} ({name}, keras on {backend})" if name != kind else \
        f"{kind} (keras on {backend})"


class KerasProbe(Probe):
    def __init__(self, program: Program, device: str | None = None,
                 weights: Mapping[str, np.ndarray] | None = None) -> None:
        self.notes = full_precision()
        self.program = program
        self.device = where_keras_computes(device)
        self.dropout_names: list[str] = []
        layers: list[MaskedDropout] = []

        def masked(node: Node, name: str) -> MaskedDropout:
            self.dropout_names.append(node.name)
            layers.append(MaskedDropout(name=name))
            return layers[-1]

        self.model = create_model(program.graph, program.seed, weights, {"dropout": masked})
        self.wrapped = WithMasks(self.model, layers)
        trainable = list(self.model.trainable_variables)
        self.slots = make_slots(program.optimizer, trainable)
        self._train = make_train_step(self.wrapped, program.loss, program.optimizer,
                                      self.slots)
        names = identifier_names(program.graph)
        by_id = {id(variable_of(self.model, names, n, p.name)): f"{n.name}.{p.name}"
                 for n in program.graph for p in n.params}
        self.trainable_names = [by_id[id(v)] for v in trainable]
        self.steps = 0

    def _inputs(self, x: np.ndarray, masks: Mapping[str, np.ndarray]) -> tuple[Any, list[Any]]:
        ones = np.ones((1,), np.float32)  # a dropout of rate 0 gets no mask: keep everything
        return (ops.convert_to_tensor(x),
                [ops.convert_to_tensor(masks.get(n, ones)) for n in self.dropout_names])

    def output(self, x: np.ndarray, training: bool,
               masks: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(ops.convert_to_numpy(self.wrapped(self._inputs(x, masks),
                                                            training=training)))

    def gradients(self, x: np.ndarray, y: np.ndarray, masks: Mapping[str, np.ndarray]
                  ) -> tuple[float, dict[str, np.ndarray]]:
        value, grads = _loss_and_gradients(self.wrapped, self.program, self._inputs(x, masks),
                                           ops.convert_to_tensor(y))
        return float(ops.convert_to_numpy(value)), {
            name: np.asarray(ops.convert_to_numpy(g))
            for name, g in zip(self.trainable_names, grads, strict=True)}

    def step(self, x: np.ndarray, y: np.ndarray, lr: float,
             masks: Mapping[str, np.ndarray]) -> float:
        self.steps += 1
        value, _ = self._train(self._inputs(x, masks), ops.convert_to_tensor(y),
                               ops.convert_to_tensor(np.float32(lr)),
                               ops.convert_to_tensor(np.float32(self.steps)))
        return float(ops.convert_to_numpy(value))

    def state(self) -> dict[str, np.ndarray]:
        out = export_weights(self.model, self.program.graph)
        slot_names = optimizer_slots(self.program.optimizer)
        for name, group in zip(self.trainable_names, self.slots, strict=True):
            for slot, variable in zip(slot_names, group, strict=True):
                out[f"{name}:{slot}"] = np.asarray(ops.convert_to_numpy(variable))
        return out


def _loss_and_gradients(model: WithMasks, program: Program, inputs: Any, y: Any
                        ) -> tuple[Any, list[Any]]:
    """The loss in training mode and its gradients, with the running Keras backend's own
    differentiation (the train step's, without the update)."""
    trainable = model.trainable_variables
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = loss_value(program.loss, model(inputs, training=True), y)
        return value, tape.gradient(value, trainable)
    if backend == "torch":
        for v in trainable:
            v.value.grad = None
        value = loss_value(program.loss, model(inputs, training=True), y)
        value.backward()
        return value.detach(), [v.value.grad for v in trainable]
    import jax

    others = model.non_trainable_variables

    def forward(params: Any) -> Any:
        output, states = model.stateless_call(params, [v.value for v in others], inputs,
                                              training=True)
        return loss_value(program.loss, output, y), states

    (value, states), grads = jax.value_and_grad(forward, has_aux=True)(
        [v.value for v in trainable])
    for variable, new in zip(others, states, strict=True):
        variable.assign(new)  # the running statistics, as in the other backends
    return value, grads
