"""Loss, gradient clipping, optimizer updates and batch-norm statistics in numpy float64.

The formulas are specforge's (docs/semantics.md, :mod:`specforge.ir.program`); each backend
implements the same ones, and the conformance suite checks both against these.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from specforge.ir.graph import Graph
from specforge.ir.program import PROBABILITY_EPSILON, LossIR, OptimizerIR, optimizer_slots

Array = np.ndarray


def _log_softmax(z: Array) -> Array:
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def loss_and_gradient(loss: LossIR, output: Array, labels: Array) -> tuple[float, Array]:
    """The batch-mean loss of ``output`` (logits, or probabilities when not from_logits) and
    its gradient with respect to ``output``."""
    n, classes = output.shape
    e = loss.label_smoothing
    if loss.kind == "cross_entropy":
        target = np.eye(classes)[labels] * (1 - e) + e / classes
        if loss.from_logits:
            log_p = _log_softmax(output)
            return -(target * log_p).sum() / n, (np.exp(log_p) - target) / n
        inside = (output > PROBABILITY_EPSILON) & (output < 1 - PROBABILITY_EPSILON)
        p = np.clip(output, PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
        return -(target * np.log(p)).sum() / n, -target / p * inside / n
    if loss.kind == "binary_cross_entropy":
        t = (labels * (1 - e) + e / 2)[:, None]
        if loss.from_logits:
            z = output
            value = np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))
            return value.mean(), (1 / (1 + np.exp(-z)) - t) / n
        inside = (output > PROBABILITY_EPSILON) & (output < 1 - PROBABILITY_EPSILON)
        p = np.clip(output, PROBABILITY_EPSILON, 1 - PROBABILITY_EPSILON)
        value = -(t * np.log(p) + (1 - t) * np.log(1 - p))
        return value.mean(), (-t / p + (1 - t) / (1 - p)) * inside / n
    diff = output - np.eye(classes)[labels]
    if loss.kind == "mse":
        return (diff ** 2).mean(), 2 * diff / diff.size
    return np.abs(diff).mean(), np.sign(diff) / diff.size


def clip_gradients(grads: Mapping[str, Array], clip_value: float | None,
                   clip_norm: float | None) -> dict[str, Array]:
    """Clamp each element to +-clip_value, then scale all gradients together by
    clip_norm / max(global norm, clip_norm)."""
    out = {k: np.clip(g, -clip_value, clip_value) if clip_value is not None else g
           for k, g in grads.items()}
    if clip_norm is not None and out:
        norm = np.sqrt(sum((g ** 2).sum() for g in out.values()))
        out = {k: g * (clip_norm / max(norm, clip_norm)) for k, g in out.items()}
    return out


def initial_slots(opt: OptimizerIR, params: Mapping[str, Array]) -> dict[str, Array]:
    """Zero optimizer state: ``"{param}:{slot}"`` -> array of the parameter's shape."""
    return {f"{name}:{slot}": np.zeros_like(p, np.float64) for name, p in params.items()
            for slot in optimizer_slots(opt)}


def optimizer_update(opt: OptimizerIR, params: Mapping[str, Array], grads: Mapping[str, Array],
                     slots: Mapping[str, Array], step: int, lr: float
                     ) -> tuple[dict[str, Array], dict[str, Array]]:
    """One update (``step`` counts from 1): new parameters and new optimizer state."""
    h, wd = opt.hyper, opt.weight_decay
    new_params, new_slots = {}, {}
    for name, p in params.items():
        g = grads[name]
        if wd and opt.kind != "adamw":
            g = g + wd * p  # coupled L2
        if opt.kind == "sgd":
            if h["momentum"]:
                buf = h["momentum"] * slots[f"{name}:momentum"] + g
                new_slots[f"{name}:momentum"] = buf
                g = g + h["momentum"] * buf if h["nesterov"] else buf
            p = p - lr * g
        elif opt.kind == "rmsprop":
            v = h["rho"] * slots[f"{name}:mean_square"] + (1 - h["rho"]) * g ** 2
            new_slots[f"{name}:mean_square"] = v
            p = p - lr * g / (np.sqrt(v) + h["epsilon"])
        else:
            if opt.kind == "adamw" and wd:
                p = p * (1 - lr * wd)  # decoupled decay, before the Adam step
            m = h["beta1"] * slots[f"{name}:m"] + (1 - h["beta1"]) * g
            v = h["beta2"] * slots[f"{name}:v"] + (1 - h["beta2"]) * g ** 2
            new_slots[f"{name}:m"], new_slots[f"{name}:v"] = m, v
            m_hat, v_hat = m / (1 - h["beta1"] ** step), v / (1 - h["beta2"] ** step)
            p = p - lr * m_hat / (np.sqrt(v_hat) + h["epsilon"])
        new_params[name] = p
    return new_params, new_slots


def moving_statistics(graph: Graph, weights: Mapping[str, Array], values: Mapping[str, Array]
                      ) -> dict[str, Array]:
    """Batch norm's running mean and variance after a training forward pass whose node
    outputs are ``values``: decay * running + (1 - decay) * batch statistic, with the
    unbiased batch variance."""
    out = {}
    for node in graph:
        if node.op != "batch_norm":
            continue
        x = values[node.inputs[0]]
        axes = tuple(range(x.ndim - 1))
        count = x.size // x.shape[-1]
        mean = x.mean(axis=axes)
        unbiased = x.var(axis=axes) * count / max(count - 1, 1)
        decay = node.attrs["decay"]
        for key, batch in (("moving_mean", mean), ("moving_var", unbiased)):
            name = f"{node.name}.{key}"
            out[name] = decay * weights[name] + (1 - decay) * batch
    return out
