"""Training a Keras model with specforge's loss, optimizer and clipping, written in keras.ops.

Keras's optimizers differ from specforge's formulas (SGD momentum under a schedule, RMSprop's
epsilon inside the square root, Adam's "epsilon hat", per-variable clipnorm), so the update
is specforge's own: a pure function of (parameters, gradients, slots, step, lr) in keras.ops,
compiled with tf.function on TensorFlow, run eagerly on PyTorch and jit-compiled on JAX.
`fit()` is not used: it shuffles by itself and its epoch loss is a weighted mean that
includes regularisers.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import ops

from specforge.atomic import atomic_path, file_sha256, write_atomically
from specforge.backends import PendingStep, Trainer
from specforge.errors import UsageError
from specforge.ir.program import (
    PROBABILITY_EPSILON,
    LossIR,
    OptimizerIR,
    Program,
    optimizer_slots,
)
from specforge.runfolder import DamagedFile, check_loop_state, read_json
from specforge.weights import load_arrays, save_arrays
from specforge_keras.model import create_model, export_weights


def cross_entropy(loss: LossIR, output: Any, labels: Any) -> Any:
    e, classes = loss.label_smoothing, output.shape[-1]
    target = ops.one_hot(labels, classes) * (1 - e) + e / classes
    if loss.from_logits:
        log_p = output - ops.logsumexp(output, axis=-1, keepdims=True)
    else:
        log_p = ops.log(ops.clip(output, PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON))
    return -ops.mean(ops.sum(target * log_p, axis=-1))


def binary_cross_entropy(loss: LossIR, output: Any, labels: Any) -> Any:
    e = loss.label_smoothing
    target = ops.cast(labels, output.dtype) * (1 - e) + e / 2
    z = output[:, 0]
    if loss.from_logits:  # max(z, 0) - z t + log(1 + exp(-|z|)), the stable form
        return ops.mean(ops.relu(z) - z * target + ops.log1p(ops.exp(-ops.abs(z))))
    p = ops.clip(z, PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
    return -ops.mean(target * ops.log(p) + (1 - target) * ops.log(1 - p))


def mse(loss: LossIR, output: Any, labels: Any) -> Any:
    return ops.mean(ops.square(output - ops.one_hot(labels, output.shape[-1])))


def mae(loss: LossIR, output: Any, labels: Any) -> Any:
    return ops.mean(ops.abs(output - ops.one_hot(labels, output.shape[-1])))


#: The batch-mean loss per kind (a built script keeps only its spec's).
LOSSES = {"cross_entropy": cross_entropy, "binary_cross_entropy": binary_cross_entropy,
          "mse": mse, "mae": mae}


def loss_value(loss: LossIR, output: Any, labels: Any) -> Any:
    """The batch-mean loss of ``output`` (logits, or probabilities when not from_logits)."""
    return LOSSES[loss.kind](loss, output, labels)


def clip_gradients(grads: list[Any], clip_value: float | None,
                   clip_norm: float | None) -> list[Any]:
    """Clamp each element to +-clip_value, then scale all gradients together by
    clip_norm / max(global norm, clip_norm)."""
    if clip_value is not None:
        grads = [ops.clip(g, -clip_value, clip_value) for g in grads]
    if clip_norm is not None and grads:
        norm = ops.sqrt(sum(ops.sum(ops.square(g)) for g in grads))
        scale = clip_norm / ops.maximum(norm, clip_norm)
        grads = [g * scale for g in grads]
    return grads


def sgd_update(opt: OptimizerIR, p: Any, g: Any, s: list[Any], step: Any, lr: Any
               ) -> tuple[Any, list[Any]]:
    h = opt.hyper
    if not h["momentum"]:
        return p - lr * g, s
    buf = h["momentum"] * s[0] + g
    d = g + h["momentum"] * buf if h["nesterov"] else buf
    return p - lr * d, [buf]


def rmsprop_update(opt: OptimizerIR, p: Any, g: Any, s: list[Any], step: Any, lr: Any
                   ) -> tuple[Any, list[Any]]:
    h = opt.hyper
    v = h["rho"] * s[0] + (1 - h["rho"]) * ops.square(g)
    return p - lr * g / (ops.sqrt(v) + h["epsilon"]), [v]


def adam_update(opt: OptimizerIR, p: Any, g: Any, s: list[Any], step: Any, lr: Any
                ) -> tuple[Any, list[Any]]:
    h, wd = opt.hyper, opt.weight_decay
    if opt.kind == "adamw" and wd:
        p = p * (1 - lr * wd)  # decoupled decay, before the Adam step
    m = h["beta1"] * s[0] + (1 - h["beta1"]) * g
    v = h["beta2"] * s[1] + (1 - h["beta2"]) * ops.square(g)
    # 1 - beta^t as -expm1(t log beta): in float32, 1 - 0.999^t loses 1e-5 of its
    # value to cancellation, which the conformance suite sees after a few steps
    m_hat = m / -ops.expm1(step * float(np.log(h["beta1"])))
    v_hat = v / -ops.expm1(step * float(np.log(h["beta2"])))
    return p - lr * m_hat / (ops.sqrt(v_hat) + h["epsilon"]), [m, v]


#: One parameter's update per optimizer kind (a built script keeps only its spec's).
UPDATES = {"sgd": sgd_update, "rmsprop": rmsprop_update, "adam": adam_update,
           "adamw": adam_update}


def optimizer_update(opt: OptimizerIR, params: list[Any], grads: list[Any],
                     slots: list[list[Any]], step: Any, lr: Any
                     ) -> tuple[list[Any], list[list[Any]]]:
    """specforge's update rules (docs/semantics.md); ``step`` counts from 1."""
    update, wd = UPDATES[opt.kind], opt.weight_decay
    new_params, new_slots = [], []
    for p, g, s in zip(params, grads, slots, strict=True):
        if wd and opt.kind != "adamw":
            g = g + wd * p  # coupled L2
        p, s = update(opt, p, g, s, step, lr)
        new_params.append(p)
        new_slots.append(s)
    return new_params, new_slots


def make_slots(opt: OptimizerIR, trainable: list[Any]) -> list[list[Any]]:
    """Zero-initialised optimizer state variables, per parameter."""
    return [[keras.Variable(ops.zeros(v.shape), trainable=False, name=f"slot{k}_{i}")
             for k in range(len(optimizer_slots(opt)))] for i, v in enumerate(trainable)]


def apply_update(opt: OptimizerIR, trainable: list[Any], slots: list[list[Any]],
                 grads: list[Any], step: Any, lr: Any) -> None:
    """Clip, compute specforge's update and assign it to the variables."""
    grads = clip_gradients(grads, opt.clip_value, opt.clip_norm)
    params = [v.value for v in trainable]
    values = [[s.value for s in group] for group in slots]
    new_params, new_slots = optimizer_update(opt, params, grads, values, step, lr)
    for v, value in zip(trainable, new_params, strict=True):
        v.assign(value)
    for group, group_values in zip(slots, new_slots, strict=True):
        for s, value in zip(group, group_values, strict=True):
            s.assign(value)


def make_train_step(model: Any, loss: LossIR, opt: OptimizerIR, slots: list[list[Any]]
                    ) -> Any:
    """``step(x, y, lr, t) -> (loss, output)`` for the running Keras backend: compiled with
    tf.function on TensorFlow (without XLA, which changes rounding), eager on PyTorch,
    jit-compiled as a pure function on JAX."""
    trainable = list(model.trainable_variables)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        @tf.function(jit_compile=False, reduce_retracing=True)
        def tf_step(x: Any, y: Any, lr: Any, t: Any) -> Any:
            with tf.GradientTape() as tape:
                output = model(x, training=True)
                value = loss_value(loss, output, y)
            apply_update(opt, trainable, slots, tape.gradient(value, trainable), t, lr)
            return value, output
        return tf_step
    if backend == "torch":
        import torch

        def torch_step(x: Any, y: Any, lr: Any, t: Any) -> Any:
            output = model(x, training=True)
            value = loss_value(loss, output, y)
            for v in trainable:
                v.value.grad = None
            value.backward()
            with torch.no_grad():
                apply_update(opt, trainable, slots, [v.value.grad for v in trainable], t, lr)
            return value, output
        return torch_step
    if backend == "jax":
        return _jax_step(model, loss, opt, slots)
    raise UsageError(f"specforge trains Keras models on KERAS_BACKEND=tensorflow, torch or "
                     f"jax, not {backend!r}")


def _jax_step(model: Any, loss: LossIR, opt: OptimizerIR, slots: list[list[Any]]) -> Any:
    """JAX has no variables to assign inside a traced step: the step is a pure function of
    the variables' values (jit-compiled), and the new values are assigned after it."""
    import jax

    trainable = list(model.trainable_variables)
    others = list(model.non_trainable_variables)

    def forward(params: Any, states: Any, x: Any, y: Any) -> Any:
        output, states = model.stateless_call(params, states, x, training=True)
        return loss_value(loss, output, y), (output, states)

    @jax.jit
    def pure_step(params: Any, states: Any, slot_values: Any, x: Any, y: Any, lr: Any,
                  t: Any) -> Any:
        (value, (output, states)), grads = jax.value_and_grad(forward, has_aux=True)(
            params, states, x, y)
        grads = clip_gradients(grads, opt.clip_value, opt.clip_norm)
        params, slot_values = optimizer_update(opt, params, grads, slot_values, t, lr)
        return value, output, params, states, slot_values

    def jax_step(x: Any, y: Any, lr: Any, t: Any) -> Any:
        value, output, params, states, slot_values = pure_step(
            [v.value for v in trainable], [v.value for v in others],
            [[s.value for s in group] for group in slots], x, y, lr, t)
        for variable, new in zip([*trainable, *others], [*params, *states], strict=True):
            variable.assign(new)
        for group, values in zip(slots, slot_values, strict=True):
            for s, new in zip(group, values, strict=True):
                s.assign(new)
        return value, output
    return jax_step


def dropout_layers(model: Any) -> list[Any]:
    """specforge's dropout layers of ``model`` (:class:`specforge_keras.layers.Dropout`)."""
    return [layer for layer in model._flatten_layers() if hasattr(layer, "set_key")]


def start_keras_step(step: Any, x: np.ndarray, y: np.ndarray, lr: float, t: float
                     ) -> PendingStep:
    """Start ``step`` on numpy data; what it returns waits for the loss (a float) and the
    output (numpy). The frameworks dispatch asynchronously, and their results are new
    arrays each step, so they can be read after the next step has started."""
    value, output = step(ops.convert_to_tensor(x), ops.convert_to_tensor(y),
                         ops.convert_to_tensor(np.float32(lr)),
                         ops.convert_to_tensor(np.float32(t)))
    return lambda: (float(ops.convert_to_numpy(value)),
                    np.asarray(ops.convert_to_numpy(output)))


def keras_evaluate(model: Any, loss: LossIR, x: np.ndarray, y: np.ndarray
                   ) -> tuple[float, np.ndarray]:
    """Loss and output in evaluation mode."""
    output = model(ops.convert_to_tensor(x), training=False)
    value = loss_value(loss, output, ops.convert_to_tensor(y))
    return float(ops.convert_to_numpy(value)), np.asarray(ops.convert_to_numpy(output))


class KerasSteps:
    """The training and evaluation steps of a Keras model in one process, with specforge's
    update rule in keras.ops: what the training loop (:class:`specforge.runner.TrainingLoop`)
    asks of a trainer. KerasTrainer and the built script both use it."""

    def __init__(self, model: Any, loss: LossIR, opt: OptimizerIR, seed: int) -> None:
        self.model, self.loss, self.seed = model, loss, seed
        self.slots = make_slots(opt, list(model.trainable_variables))
        self.train = make_train_step(model, loss, opt, self.slots)
        self.dropouts = dropout_layers(model)
        #: training steps started: the optimizer's step count (t of the next step, less 1)
        self.step_count = 0

    def next_step(self) -> np.float32:
        """Count a step and set dropout's keys for it; its t (the first step's is 1)."""
        for dropout in self.dropouts:  # keys count steps from 0
            dropout.set_key(self.seed, self.step_count)
        self.step_count += 1
        return np.float32(self.step_count)

    def start_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> PendingStep:
        """Start the next training step; what it returns waits for its loss and logits."""
        t = self.next_step()
        return start_keras_step(self.train, x, y, lr, t)

    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        return keras_evaluate(self.model, self.loss, x, y)

    def agree_to_stop(self, wanted: bool) -> bool:
        return wanted


#: Keras's own variables for several processes (machines): `keras.distribution.initialize`
#: reads them. Every process runs the same command with its own process id.
PROCESS_VARIABLES = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                     "KERAS_DISTRIBUTION_PROCESS_ID")


def data_parallel_over_devices() -> Any:
    """Keras's DataParallel over every device it sees, set as the distribution (so that the
    variables created next are replicated). Keras 3 distributes on JAX only. With Keras's
    process variables set, the processes first join each other and the devices are all of
    theirs."""
    backend = keras.backend.backend()
    if backend != "jax":
        raise UsageError(f"--data-parallel uses Keras's distribution API, which runs on "
                         f"JAX: set KERAS_BACKEND=jax (not {backend})")
    import jax
    from keras import distribution

    if any(v in os.environ for v in PROCESS_VARIABLES):
        missing = [v for v in PROCESS_VARIABLES if v not in os.environ]
        if missing:
            raise UsageError(f"several processes need all of {', '.join(PROCESS_VARIABLES)}; "
                             f"missing {', '.join(missing)}")
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPUs talk too
        distribution.initialize()
    parallel = distribution.DataParallel(devices=distribution.list_devices())
    distribution.set_distribution(parallel)
    return parallel


class KerasTrainer(Trainer):
    def __init__(self, program: Program, device: str | None = None,
                 weights: Mapping[str, np.ndarray] | None = None,
                 data_parallel: bool = False) -> None:
        self.program = program
        backend = keras.backend.backend()
        self.device = f"{device or 'auto'} (keras on {backend})"
        #: Keras's DataParallel distribution, when training over several devices
        self.processes = 1
        self.parallel = data_parallel_over_devices() if data_parallel else None
        if self.parallel is not None:
            import jax

            devices = self.parallel.device_mesh.devices.ravel().tolist()
            self.device += f", data-parallel over {len(devices)} devices ({', '.join(devices)})"
            self.processes = jax.process_count()
            self.writes_run_folder = jax.process_index() == 0
        self.model = create_model(program.graph, program.seed, weights)
        self.steps = KerasSteps(self.model, program.loss, program.optimizer, program.seed)
        from specforge_keras.probe import where_keras_computes  # it imports this module

        # asked once the backend is set up (a JAX distribution must be initialised first)
        self.accelerated = where_keras_computes(None).startswith("cuda")

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, np.ndarray]:
        return self.start_step(x, y, lr)()

    def start_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> PendingStep:
        if self.parallel is None:
            return self.steps.start_step(x, y, lr)
        t = self.steps.next_step()
        value, output = self.steps.train(self._split(x), self._split(y), np.float32(lr), t)
        # read at once: gathering the output across processes is a collective
        result = float(np.asarray(value)), self._whole(output)
        return lambda: result

    def _whole(self, array: Any) -> np.ndarray:
        """A batch-sharded array as numpy, whichever processes hold its parts."""
        if self.processes == 1:
            return np.asarray(array)
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(array, tiled=True))

    def agree_to_stop(self, wanted: bool) -> bool:
        if self.parallel is None or self.processes == 1:
            return wanted
        from jax.experimental import multihost_utils

        return bool(np.asarray(multihost_utils.process_allgather(np.array([wanted]))).any())

    def _split(self, batch: np.ndarray) -> Any:
        """The batch cut along its first axis over the devices (XLA then reduces the
        gradients across them). A batch that does not divide evenly stays whole."""
        from keras import distribution

        if len(batch) % self.parallel.device_mesh.shape[0]:
            return batch
        return distribution.distribute_tensor(batch,
                                              self.parallel.get_data_layout(batch.shape))

    def evaluate_batch(self, x: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
        return self.steps.evaluate_batch(x, y)

    def predict(self, x: np.ndarray) -> np.ndarray:
        output = self.model(ops.convert_to_tensor(x), training=False)
        if self.program.output_activation == "softmax":
            output = ops.softmax(output, axis=-1)
        elif self.program.output_activation == "sigmoid":
            output = ops.sigmoid(output)
        return np.asarray(ops.convert_to_numpy(output))

    def export_weights(self) -> dict[str, np.ndarray]:
        return export_weights(self.model, self.program.graph)

    # --- checkpoints: Keras's weights file, an .npz of optimizer slots, a JSON pointer ----
    def save_checkpoint(self, path: Path, loop_state: Mapping[str, Any]) -> None:
        if not self.writes_run_folder:  # another process holds the same (replicated) state
            return
        tag = f"{self.steps.step_count:09d}"
        weights = path.with_name(f"checkpoint-{tag}.weights.h5")
        state = path.with_name(f"checkpoint-{tag}.state.npz")
        with atomic_path(weights) as tmp:  # named *.weights.h5, as save_weights insists
            self.model.save_weights(tmp)
        arrays = {f"slot_{i}_{k}": ops.convert_to_numpy(s) for i, group in
                  enumerate(self.steps.slots) for k, s in enumerate(group)}
        # The weights file leaves out the dropout layers' random state: keep every
        # non-trainable variable here, so that a resumed run draws the same masks.
        arrays.update({f"state_{i}": ops.convert_to_numpy(v)
                       for i, v in enumerate(self.model.non_trainable_variables)})
        save_arrays(state, {"step_count": np.int64(self.steps.step_count), **arrays})
        # the pointer holds each file's sha256: replaced or damaged files are refused
        pointer = {"weights": weights.name, "state": state.name, "loop": loop_state,
                   "sha256": {name: file_sha256(path.with_name(name))
                              for name in (weights.name, state.name)}}
        try:  # the files the last pointer named are deleted once it is replaced
            old = read_pointer(path) if path.exists() else None
        except UsageError:
            old = None
        # the checkpoint is whatever the pointer names: replacing it is the atomic step
        write_atomically(path, json.dumps(pointer))
        if old:
            for name in (old["weights"], old["state"]):
                if name not in (weights.name, state.name):
                    path.with_name(name).unlink(missing_ok=True)

    def load_checkpoint(self, path: Path) -> dict[str, Any]:
        if not path.exists():
            raise UsageError(f"no checkpoint at {path}")
        pointer = read_pointer(path)
        files = {part: path.with_name(pointer[part]) for part in ("weights", "state")}
        for file in files.values():
            if not file.exists():
                raise UsageError(f"no checkpoint at {path} ({file} is missing)")
            expected = pointer.get("sha256", {}).get(file.name)
            if expected is not None and file_sha256(file) != expected:
                raise DamagedFile(file, f"it does not match the sha256 {path.name} holds for "
                                        "it (the file changed after it was written)")
        try:
            self.model.load_weights(files["weights"])
        except Exception as exc:  # h5py and Keras raise many kinds; each means "unreadable"
            raise DamagedFile(files["weights"], f"Keras cannot read it as this model's "
                                                f"weights ({type(exc).__name__}: {exc})") from None
        state = load_arrays(files["state"])
        try:
            self.steps.step_count = int(state["step_count"])
            for i, group in enumerate(self.steps.slots):
                for k, s in enumerate(group):
                    s.assign(state[f"slot_{i}_{k}"])
            for i, v in enumerate(self.model.non_trainable_variables):
                v.assign(state[f"state_{i}"])
        except (KeyError, ValueError, TypeError) as exc:
            raise DamagedFile(files["state"], f"it is not this spec's optimizer state "
                                              f"({type(exc).__name__}: {exc})") from None
        return pointer["loop"]


def read_pointer(path: Path) -> dict[str, Any]:
    """checkpoint.json, checked: the names of the weights and state files (in its folder),
    their sha256 and the loop state."""
    pointer = read_json(path, "an object naming the checkpoint's files")
    for part in ("weights", "state"):
        name = pointer.get(part)
        if not isinstance(name, str) or name in ("", ".", "..") or Path(name).name != name:
            raise DamagedFile(path, f"its {part!r} is not the name of a file in its folder")
    if not isinstance(pointer.get("sha256", {}), dict):
        raise DamagedFile(path, "its 'sha256' is not a table of file names and digests")
    if "loop" not in pointer:
        raise DamagedFile(path, "it lacks the loop state ('loop')")
    check_loop_state(pointer["loop"], path)
    return pointer
