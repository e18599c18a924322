"""The rules BestEpochPolicy applies besides "better than the best by more than min_delta": bounds an epoch must
stay within to be eligible, and the DVAR stop rule.

A bound side is None (open), a number, or a factor of the base model's value ('0.9x': `relative_factor`);
`check_bound_value` checks one as given in code, `parse_bound` reads the command line's METRIC=LO:HI. `DvarRule`
stops when a deterministic loss (by default the validation loss, VALIDATION_METRIC) has stopped moving.
Pure Python, as lora_monitor.policy.
"""
from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["VALIDATION_METRIC", "DvarRule", "check_bound_value", "check_int", "parse_bound", "relative_factor", "value_source"]

#: The deterministic validation loss's metric name: computed by the denoiser on held-out images, not from previews.
VALIDATION_METRIC = "val_loss"


def value_source(metric: str) -> str:
    """What one of `metric`'s values stands for, in the policy's reasons: a held-out image for the validation loss,
    else a preview's prompt."""
    return "held-out image" if metric == VALIDATION_METRIC else "prompt"


def check_int(name: str, value: Any) -> int:
    """`value` as an int; a bool or a non-integer is a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def check_bound_value(metric: str, side: str, value: Any) -> float | str | None:
    """A bound side: None (open), a finite number, or 'Fx' (F times the base model's value of the metric)."""
    if value is None:
        return None
    if isinstance(value, str):
        factor = relative_factor(value)
        if factor is None:
            raise ValueError(
                f"bounds[{metric!r}] {side} bound {value!r}: a relative bound is a factor and 'x', e.g. '0.9x' (0.9 times the base model's value)"
            )
        return f"{factor:g}x"
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"bounds[{metric!r}] {side} bound must be a finite number, 'Fx' (relative to the base) or None, got {value!r}")
    return float(value)


def relative_factor(text: str) -> float | None:
    """'0.9x' -> 0.9; anything else -> None."""
    if not text.endswith("x"):
        return None
    try:
        factor = float(text[:-1])
    except ValueError:
        return None
    return factor if math.isfinite(factor) and factor >= 0 else None


@dataclass(frozen=True)
class DvarRule:
    """DVAR early stopping (Voronov et al., "Is This Loss Informative? Faster Text-to-Image Customization by
    Tracking Objective Dynamics", NeurIPS 2023): stop once the variance of a deterministic loss over the last
    `window` evaluations falls below `threshold` times its variance over every evaluation so far, i.e. the
    loss has stopped moving. Checked from the (window + 1)-th evaluation on; a non-finite value in the
    window, or a loss that never moved, does not stop."""

    metric: str = VALIDATION_METRIC
    window: int = 5
    threshold: float = 0.15

    def __post_init__(self) -> None:
        if not isinstance(self.metric, str) or not self.metric:
            raise ValueError(f"DvarRule.metric must be a metric name, got {self.metric!r}")
        if check_int("DvarRule.window", self.window) < 2:
            raise ValueError(f"DvarRule.window must be an integer >= 2, got {self.window}")
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not 0 < threshold < 1:
            raise ValueError(f"DvarRule.threshold must be a number between 0 and 1, got {threshold!r}")

    def ratio(self, values: Sequence[float]) -> float | None:
        """Variance of the last `window` values over the variance of all; None when not yet defined."""
        if len(values) <= self.window or not all(math.isfinite(value) for value in values[-self.window:]):
            return None
        finite = [value for value in values if math.isfinite(value)]
        overall = statistics.pvariance(finite)
        return statistics.pvariance(values[-self.window:]) / overall if overall > 0 else None

    def describe(self) -> dict[str, Any]:
        return {"metric": self.metric, "window": self.window, "threshold": self.threshold}



def parse_bound(text: str) -> tuple[str, tuple[float | None, float | None]]:
    """A command-line bound: 'ssim=0.3:0.95' -> ('ssim', (0.3, 0.95)); an empty side is open ('ssim=0.3:').

    '=' separates the metric because metric names may hold ':' (pyiqa:niqe).
    """
    metric, sep, limits = text.partition("=")
    low, colon, high = limits.partition(":")
    if not (metric and sep and colon):
        raise ValueError(
            f"--bound {text!r}: expected METRIC=LO:HI with either side empty for open, e.g. ssim=0.3: or ssim=0.3:0.95, "
            "or relative to the base model, e.g. adherence=0.9x:"
        )

    def side(value: str) -> float | str | None:
        if not value:
            return None
        if relative_factor(value) is not None:
            return value
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"--bound {text!r}: LO and HI must be numbers, factors of the base value such as 0.9x, or empty") from None

    return metric, (side(low), side(high))

