"""A spec's `sweep:` section: which fields to search over, and how (`specforge sweep`).

A parameter is a field's dotted path (as `--set` takes it) and a search-space expression:
``uniform(LOW, HIGH)``, ``loguniform(LOW, HIGH)``, ``int(LOW, HIGH)`` (inclusive) or
``choice(A, B, ...)``. The values are YAML scalars. Each value is checked against the spec
before any trial starts (see :mod:`specforge.sweep`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, model_validator

from specforge.spec.layers import SpecModel

KINDS = ("uniform", "loguniform", "int", "choice")
_EXPRESSION = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.DOTALL)
#: A number YAML 1.1 reads as a string (`1e-4`: it wants a dot and a signed exponent).
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


@dataclass(frozen=True)
class SearchSpace:
    """One parameter's search space, parsed from its expression."""

    kind: Literal["uniform", "loguniform", "int", "choice"]
    values: tuple[Any, ...]  # (low, high), or the choices

    @property
    def grid(self) -> tuple[Any, ...] | None:
        """Every value, for grid search (None for a continuous range)."""
        if self.kind == "choice":
            return self.values
        if self.kind == "int":
            return tuple(range(self.values[0], self.values[1] + 1))
        return None


def parse_expression(text: str) -> SearchSpace:
    """``loguniform(1e-4, 1e-1)`` -> SearchSpace; ValueError saying what is accepted."""
    match = _EXPRESSION.match(text)
    if not match or match.group(1) not in KINDS:
        raise ValueError(f"{text!r} is not a search space: write uniform(LOW, HIGH), "
                         "loguniform(LOW, HIGH), int(LOW, HIGH) or choice(A, B, ...)")
    kind = match.group(1)
    try:
        values = yaml.safe_load(f"[{match.group(2)}]")
    except yaml.YAMLError:
        raise ValueError(f"cannot read the values of {text!r}: write them as YAML "
                         "scalars separated by commas") from None
    values = [float(v) if isinstance(v, str) and _NUMBER.match(v) else v for v in values]
    if any(isinstance(v, (list, dict)) for v in values):
        raise ValueError(f"{text!r}: each value must be a number, a string or true/false")
    if kind == "choice":
        if not values:
            raise ValueError("choice() needs at least one value")
        return SearchSpace("choice", tuple(values))
    return SearchSpace(kind, _range(kind, text, values))


def _range(kind: str, text: str, values: list[Any]) -> tuple[Any, Any]:
    number = int if kind == "int" else (int, float)
    if len(values) != 2 or not all(isinstance(v, number) and not isinstance(v, bool)
                                   for v in values):
        what = "whole numbers" if kind == "int" else "numbers"
        raise ValueError(f"{text!r}: {kind}() takes two {what}, LOW and HIGH")
    low, high = values
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"{text!r}: LOW must be below HIGH")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"{text!r}: loguniform() needs LOW > 0")
    return (low, high) if kind == "int" else (float(low), float(high))


def _check_expression(text: str) -> str:
    parse_expression(text)
    return text


Expression = Annotated[str, AfterValidator(_check_expression)]


class Sweep(SpecModel):
    """A hyperparameter search over this spec's fields (`specforge sweep`; ignored by
    `specforge run`). Each trial is a run with the parameters set as by `--set`."""

    params: dict[str, Expression] = Field(
        min_length=1, description="Field path (as `--set` takes it) -> uniform(LOW, HIGH), "
                                  "loguniform(LOW, HIGH), int(LOW, HIGH) or choice(A, B, ...).")
    trials: int | None = Field(None, ge=1, le=100_000, description="How many trials, in "
                               "all (several processes share them). Default 20; grid: every "
                               "combination.")
    metric: str | None = Field(
        None, description="The epoch metric to optimise, as in metrics.jsonl: `val_accuracy`, "
                          "`val_loss`, `val_f1_macro`, ... (the last epoch's value counts). "
                          "Default: val_accuracy when the spec measures accuracy, else val_loss.")
    direction: Literal["maximize", "minimize"] | None = Field(
        None, description="Default: minimize for a loss, maximize otherwise.")
    sampler: Literal["tpe", "random", "grid"] = Field(
        "tpe", description="Optuna's TPE, random search, or every combination of choice() "
                           "and int() values.")
    pruner: Literal["median", "none"] = Field(
        "median", description="Stop a trial after an epoch whose metric is worse than the "
                              "median of earlier trials at that epoch (Optuna's MedianPruner).")
    startup_trials: int = Field(5, ge=0, description="Trials that finish before any is pruned.")
    warmup_epochs: int = Field(0, ge=0, description="Epochs of each trial never pruned.")

    @model_validator(mode="after")
    def _grid_needs_discrete_values(self) -> Sweep:
        if self.sampler == "grid":
            continuous = [p for p, e in self.params.items() if parse_expression(e).grid is None]
            if continuous:
                raise ValueError(f"grid search takes choice() and int() values: "
                                 f"{', '.join(continuous)} is a continuous range")
        return self
