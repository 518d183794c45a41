"""Metrics computed over a whole epoch from confusion counts (never a mean of batch values).

Framework-neutral: backends hand over logits and labels as numpy arrays, batch by batch.
Classes are predicted by argmax over the logits (binary, one logit: logit > 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from specforge.ir.program import MetricIR


class MetricAccumulator:
    """Streams (logits, labels) batches; :meth:`result` gives every metric of the spec."""

    def __init__(self, metrics: Sequence[MetricIR], classes: int) -> None:
        self.metrics = list(metrics)
        self.classes = max(classes, 2)
        self.reset()

    def reset(self) -> None:
        self.confusion = np.zeros((self.classes, self.classes), np.int64)
        self.top_k_hits = {m.k: 0 for m in self.metrics if m.kind == "top_k_accuracy"}
        self.count = 0

    def update(self, logits: np.ndarray, labels: np.ndarray) -> None:
        logits = np.asarray(logits, np.float64).reshape(len(labels), -1)
        labels = np.asarray(labels, np.int64)
        if logits.shape[1] == 1:
            predicted = (logits[:, 0] > 0).astype(np.int64)
        else:
            predicted = logits.argmax(axis=1)
        np.add.at(self.confusion, (labels, predicted), 1)
        for k in self.top_k_hits:
            if logits.shape[1] <= k:
                self.top_k_hits[k] += len(labels)
                continue
            # a label is in the top k when fewer than k logits beat it (ties favour it)
            own = logits[np.arange(len(labels)), labels][:, None]
            self.top_k_hits[k] += int(np.sum((logits > own).sum(axis=1) < k))
        self.count += len(labels)

    def result(self) -> dict[str, float]:
        return {m.label: METRIC_VALUES[m.kind](self, m) for m in self.metrics}


def accuracy(counts: MetricAccumulator, metric: MetricIR) -> float:
    return float(np.trace(counts.confusion) / max(counts.confusion.sum(), 1))


def top_k_accuracy(counts: MetricAccumulator, metric: MetricIR) -> float:
    return counts.top_k_hits[metric.k] / max(counts.count, 1)


def _ratio(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a), where=b > 0)


def averaged(counts: MetricAccumulator, metric: MetricIR) -> float:
    """Precision, recall or F1; macro averages classes present in labels or predictions."""
    c = counts.confusion.astype(np.float64)
    tp, predicted, actual = np.diag(c), c.sum(axis=0), c.sum(axis=1)
    if metric.average == "micro":
        tp, predicted, actual = tp.sum(keepdims=True), predicted.sum(keepdims=True), \
            actual.sum(keepdims=True)
    precision, recall = _ratio(tp, predicted), _ratio(tp, actual)
    if metric.kind == "precision":
        values = precision
    elif metric.kind == "recall":
        values = recall
    else:
        values = _ratio(2 * precision * recall, precision + recall)
    present = (predicted + actual) > 0
    return float(values[present].mean()) if present.any() else 0.0


#: A metric's value from the counts, per kind (a built script keeps only its spec's).
METRIC_VALUES = {"accuracy": accuracy, "top_k_accuracy": top_k_accuracy,
                 "precision": averaged, "recall": averaged, "f1": averaged}
