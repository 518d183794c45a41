"""Comparisons and tolerances: when two arrays count as the same number.

A difference is measured against the quantity's scale, the largest magnitude of its
reference value (or of the first backend's, without the reference). Tolerances:

- **forward and gradients** (one computation from the same weights): ``rtol * (scale +
  GROUP_SHARE * group scale)``, where the group scale is the largest magnitude among all
  quantities of the same kind (all gradients, say). The second term is there because float32
  sums with cancellation carry rounding error in proportion to their terms, not to their
  result: a bias gradient that sums to 0.05 from terms of size 1 is only good to about
  1e-7 of the terms.
- **after N steps**: training amplifies rounding differences by however chaotic the run is.
  The run's own sensitivity is measured: each backend trains again with its initial
  weights and every batch's pixels all moved by one float32 ulp (about 1e-7 relative), and
  the largest difference that makes, over the backends, is the *chaos floor*. The tolerance
  is ``max(rtol * (scale + GROUP_SHARE * group scale), chaos_factor * floor)``, but never
  more than the ceiling ``steps_ceiling_rtol * (scale + GROUP_SHARE * group scale)``: a
  floor inflated by a broken perturbed run cannot let any difference pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The share of its group's scale that a quantity's tolerance includes (see above).
GROUP_SHARE = 0.1


@dataclass(frozen=True)
class Tolerance:
    """How close two backends must be; a conformance case may override any field."""

    #: forward outputs and the loss, relative to the scale
    forward_rtol: float = 1e-5
    #: gradients, relative to the scale
    gradient_rtol: float = 1e-5
    #: parameters and optimizer state after N steps, before the chaos floor is considered
    steps_rtol: float = 1e-5
    #: the N-step difference may be this multiple of the chaos floor
    chaos_factor: float = 10.0
    #: ... but never more than this, relative to the scale, whatever the floor: beyond twice
    #: its scale any two values of a quantity would pass, signs included. (The seed's model
    #: after 50 steps at lr 1e-3 is chaotic: its largest N-step difference is 0.62 of that
    #: scale; the tests' short digits runs bound their tolerances far tighter.)
    steps_ceiling_rtol: float = 2.0

    def steps_ceiling(self, scale: float, group: float) -> float:
        """The most the N-step tolerance of a quantity of ``scale`` (in a group of
        ``group``) can be, whatever its chaos floor."""
        return self.steps_ceiling_rtol * (scale + GROUP_SHARE * group)

    def after_steps(self, scale: float, group: float, floor: float) -> float:
        """The N-step tolerance: the rounding allowance or ``chaos_factor`` times the chaos
        floor, whichever is larger, up to the ceiling."""
        allowance = max(self.steps_rtol * (scale + GROUP_SHARE * group),
                        self.chaos_factor * floor)
        return min(allowance, self.steps_ceiling(scale, group))


@dataclass(frozen=True)
class Difference:
    """How far ``actual`` is from ``expected``."""

    max_abs: float
    scale: float

    @property
    def max_rel(self) -> float:
        return self.max_abs / self.scale if self.scale else (0.0 if self.max_abs == 0
                                                             else float("inf"))


def magnitude(value: np.ndarray) -> float:
    value = np.asarray(value, np.float64)
    return float(np.abs(value).max()) if value.size else 0.0


def difference(actual: np.ndarray, expected: np.ndarray) -> Difference:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shapes differ: {actual.shape} and {expected.shape}")
    finite = np.isfinite(actual).all() and np.isfinite(expected).all()
    max_abs = magnitude(actual - expected) if finite else float("inf")
    return Difference(max_abs, magnitude(expected))


def move_one_ulp(value: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every non-zero float32 element moved one ulp up or down at random: about 1e-7
    relative, the smallest change float32 can make (zeros stay zero)."""
    value = np.asarray(value, np.float32)
    direction = np.where(rng.random(value.shape) < 0.5, -np.inf, np.inf).astype(np.float32)
    return np.where(value != 0, np.nextafter(value, direction), value).astype(np.float32)
