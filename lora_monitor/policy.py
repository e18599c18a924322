"""Best-epoch selection and early stopping over per-prompt preview scores.

`BestEpochPolicy` is told, once per evaluation, the scores of every preview prompt for every
metric. It aggregates them over prompts, decides whether the epoch is the new best and whether
training should stop, and says why in a whole sentence. The rules follow Lightning's
EarlyStopping: an improvement must beat the best by more than `min_delta`, NaN/inf is the worst
score, `patience` evaluations without improvement stop the run, and the state round-trips
through `state_dict`/`load_state_dict` so a resumed run ends where an uninterrupted one would.

Pure Python on purpose (no torch, no numpy): it is imported by launchers and post-hoc tools
that never build a model.

The policy's other parts live beside it and stay importable from here: bounds, their command-line
form and the DVAR rule in lora_monitor/policy_rules.py, the presets in lora_monitor/policy_presets.py,
saving and restoring the state in lora_monitor/policy_state.py.
"""
from __future__ import annotations

import math
import numbers
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

from lora_monitor.policy_presets import PRESETS, PolicyPreset, get_preset
from lora_monitor.policy_rules import VALIDATION_METRIC, DvarRule, check_bound_value, check_int, parse_bound, relative_factor, value_source
from lora_monitor.policy_state import policy_state, restore_policy_state

__all__ = [
    "AGGREGATES", "PRESETS", "UNITS", "VALIDATION_METRIC", "BestEpochPolicy", "Decision", "DvarRule", "EpochResult", "PolicyPreset",
    "get_preset", "parse_bound",
]


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


#: What an evaluation key counts: epochs, or optimizer steps for loops that evaluate every N steps.
UNITS = ("epoch", "step")

#: How per-prompt values become one number per epoch.
AGGREGATES: dict[str, Callable[[Sequence[float]], float]] = {
    "mean": _mean,
    "median": statistics.median,
    "min": min,
    "max": max,
}


@dataclass(frozen=True)
class EpochResult:
    """One evaluated epoch as the policy saw it.

    `value` is the aggregated monitored metric; when any per-prompt value of it is NaN/inf it
    is the worst possible value (+inf in min mode, -inf in max mode). `aggregates` holds every
    metric aggregated the same way (NaN where a metric other than the monitored one had a
    non-finite value). `eligible` is False when the value is non-finite or a bound failed;
    `note` says why.
    """

    epoch: int
    step: int | None
    value: float
    aggregates: dict[str, float] = field(default_factory=dict)
    eligible: bool = True
    note: str = ""


@dataclass(frozen=True)
class Decision:
    """What `BestEpochPolicy.update` decided for one epoch; `reason` is a sentence for the log."""

    epoch: int
    is_best: bool
    should_stop: bool
    reason: str
    best_epoch: int | None
    best_value: float | None


def _fmt(value: float) -> str:
    return f"{value:.6g}"




class BestEpochPolicy:
    """Picks the best epoch by one metric and says when to stop.

    Args:
        metric: the monitored metric, a key of the `scores` given to `update`.
        higher_is_better: the metric's polarity (a constant of the scorer, e.g. False for
            BRISQUE, True for SSIM). It fixes `mode`: 'max' when higher is better, else 'min'.
        mode: optional; if given it must agree with `higher_is_better`.
        min_delta: an epoch improves only if it beats the best by MORE than this (>= 0).
        patience: stop after this many evaluations in a row without improvement (>= 1);
            None never stops.
        aggregate: how per-prompt values become one number: 'mean', 'median', 'min', 'max'.
        bounds: `{metric: (lo, hi)}`: the epoch's aggregated value of that metric must lie in
            [lo, hi] (None leaves a side open) for the epoch to be eligible. E.g.
            `{"ssim": (0.3, 0.95)}` keeps "best" from being "nothing changed" (ssim near 1) or
            "the LoRA broke the model" (ssim near 0). An ineligible epoch cannot become best
            and counts as an evaluation without improvement.
        unit: what the key given to `update` counts, 'epoch' or 'step' (a loop that evaluates
            every N optimizer steps); it only words the messages.

    Ties go to the earliest epoch (a later equal value is not an improvement). A NaN/inf in the
    monitored metric of any prompt makes the epoch the worst possible: never best.

    After the policy has stopped, `update` still evaluates and records further epochs (a loop
    may train on, e.g. to reach a synchronisation point); such an epoch can still become best,
    but `should_stop`, `stopped_epoch` and `stop_reason` keep the first stop.
    """

    def __init__(
        self,
        metric: str = "brisque",
        *,
        higher_is_better: bool,
        mode: str | None = None,
        min_delta: float = 0.0,
        patience: int | None = None,
        aggregate: str = "mean",
        bounds: Mapping[str, tuple[float | str | None, float | str | None]] | None = None,
        unit: str = "epoch",
        dvar: DvarRule | None = None,
    ) -> None:
        if unit not in UNITS:
            raise ValueError(f"unit can be {', '.join(repr(u) for u in UNITS)}, got {unit!r}")
        if not isinstance(metric, str) or not metric:
            raise ValueError(f"metric must be a non-empty string, got {metric!r}")
        if not isinstance(higher_is_better, bool):
            raise ValueError(f"higher_is_better must be True or False, got {higher_is_better!r}")
        implied = "max" if higher_is_better else "min"
        if mode is not None:
            if mode not in ("min", "max"):
                raise ValueError(f"mode can be 'min', 'max' or None (derived from the metric), got {mode!r}")
            if mode != implied:
                polarity = "higher is better" if higher_is_better else "lower is better"
                raise ValueError(
                    f"mode {mode!r} contradicts metric {metric!r}: {polarity}, which means mode {implied!r}; "
                    f"leave mode unset to derive it"
                )
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not math.isfinite(min_delta):
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        if min_delta < 0:
            raise ValueError(
                f"min_delta must be >= 0, got {min_delta!r}; the direction comes from the metric's polarity, "
                f"so give the size of the smallest improvement that counts"
            )
        if patience is not None:
            patience = check_int("patience", patience)
            if patience < 1:
                raise ValueError(f"patience must be an integer >= 1 or None (never stop), got {patience}")
        if aggregate not in AGGREGATES:
            raise ValueError(f"aggregate can be {', '.join(repr(name) for name in AGGREGATES)}, got {aggregate!r}")
        checked_bounds: dict[str, tuple[float | None, float | None]] = {}
        for name, bound in (bounds or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"bounds keys must be metric names, got {name!r}")
            if isinstance(bound, (str, bytes)) or not isinstance(bound, Sequence) or len(bound) != 2:
                raise ValueError(f"bounds[{name!r}] must be a pair (lo, hi), None for an open side; got {bound!r}")
            lo = check_bound_value(name, "lower", bound[0])
            hi = check_bound_value(name, "upper", bound[1])
            if isinstance(lo, float) and isinstance(hi, float) and lo > hi:
                raise ValueError(f"bounds[{name!r}]: lower bound {lo} is above upper bound {hi}")
            checked_bounds[name] = (lo, hi)
        if dvar is not None and not isinstance(dvar, DvarRule):
            raise ValueError(f"dvar must be a DvarRule or None, got {type(dvar).__name__}")

        self.unit = unit
        self.dvar = dvar
        # the base model's aggregated value of each metric (LoRA off), for bounds relative to it ('0.9x')
        self.base: dict[str, float] | None = None
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.mode = implied
        self.min_delta = float(min_delta)
        self.patience = patience
        self.aggregate = aggregate
        self.bounds = checked_bounds
        self.best_epoch: int | None = None
        self.best_value: float | None = None
        self.best_step: int | None = None
        self.wait_count = 0
        self.stopped_epoch: int | None = None
        self.stop_reason: str | None = None
        self.history: list[EpochResult] = []

    @property
    def needs_base(self) -> bool:
        """Whether a bound is relative to the base model's value."""
        return any(isinstance(side, str) for bound in self.bounds.values() for side in bound)

    def set_base(self, values: Mapping[str, float]) -> None:
        """The base model's aggregated metric values (LoRA off), which relative bounds multiply."""
        self.base = {str(name): float(value) for name, value in values.items()}

    def limit(self, metric: str, side: float | str) -> tuple[float, str]:
        """A bound side as a number, and how to say it ('0.3', or '0.9x base = 0.243')."""
        if not isinstance(side, str):
            return side, _fmt(side)
        if self.base is None or metric not in self.base:
            raise ValueError(
                f"the bound {side} on {metric!r} is relative to the base model's {metric}, which is not known; "
                f"the monitor measures it on the base renders (or call policy.set_base({{{metric!r}: value}}))"
            )
        # f x base for a positive base; for a negative one (a cosine can be) the same distance from it, so that
        # 0.9x still means "at most 10% worse than the base" rather than "10% better"
        base = self.base[metric]
        limit = base + (relative_factor(side) - 1) * abs(base)
        return limit, f"{side} base ({_fmt(base)}) = {_fmt(limit)}"

    @property
    def should_stop(self) -> bool:
        """True once patience ran out (or the DVAR rule fired); stays True."""
        return self.stopped_epoch is not None

    @property
    def _worst(self) -> float:
        return -math.inf if self.higher_is_better else math.inf

    def _improves(self, value: float) -> bool:
        """Better than the best by more than min_delta (Lightning's rule); strict, so ties lose."""
        if self.best_value is None:
            return True
        if self.higher_is_better:
            return value - self.min_delta > self.best_value
        return value + self.min_delta < self.best_value

    def update(self, epoch: int, scores: Mapping[str, Sequence[float]], step: int | None = None) -> Decision:
        """Record one evaluation and decide: new best? stop?

        `scores` maps a metric name to its per-prompt values (a bare number counts as one
        prompt). Epochs must increase from call to call: a repeated or earlier epoch means a
        resumed run replays epochs the policy has already seen.
        """
        epoch = check_int("epoch", epoch)
        if step is not None:
            step = check_int("step", step)
        if self.history and epoch <= self.history[-1].epoch:
            raise ValueError(
                f"{self.unit} {epoch} is not after the last evaluated {self.unit} {self.history[-1].epoch}: {self.unit}s must "
                f"increase; a repeated {self.unit} usually means the policy state was restored from a later "
                f"checkpoint than the model, or update() was called twice for one {self.unit}"
            )
        if not isinstance(scores, Mapping):
            raise ValueError(f"scores must map metric names to per-prompt values, got {type(scores).__name__}")
        present = sorted(scores)
        for name in (self.metric, *self.bounds, *([self.dvar.metric] if self.dvar else [])):
            if name not in scores:
                role = "monitored metric" if name == self.metric else "bounded metric" if name in self.bounds else "DVAR metric"
                raise ValueError(f"the {role} {name!r} is missing from the scores of {self.unit} {epoch}; present: {present}")
        per_prompt = {name: _as_values(name, values, epoch) for name, values in scores.items()}

        aggregates: dict[str, float] = {}
        non_finite: dict[str, list[int]] = {}
        for name, values in per_prompt.items():
            bad = [index for index, value in enumerate(values) if not math.isfinite(value)]
            if bad:
                non_finite[name] = bad
                aggregates[name] = self._worst if name == self.metric else math.nan
            else:
                aggregates[name] = float(AGGREGATES[self.aggregate](values))
        value = aggregates[self.metric]
        count = len(per_prompt[self.metric])
        label = f"{self.metric} ({self.aggregate} over {count} {value_source(self.metric)}{'s' if count != 1 else ''})"

        problems = []
        if self.metric in non_finite:
            problems.append(
                f"{self.metric} is NaN or infinite for prompt(s) {non_finite[self.metric]}, which counts as the worst score"
            )
        for name, (lo, hi) in self.bounds.items():
            bound_value = aggregates[name]
            low = self.limit(name, lo) if lo is not None else None
            high = self.limit(name, hi) if hi is not None else None
            if name in non_finite:
                problems.append(f"{name} is NaN or infinite for prompt(s) {non_finite[name]}, so its bound cannot hold")
            elif low is not None and bound_value < low[0]:
                problems.append(f"{name} ({self.aggregate}) {_fmt(bound_value)} is below the lower bound {low[1]}")
            elif high is not None and bound_value > high[0]:
                problems.append(f"{name} ({self.aggregate}) {_fmt(bound_value)} is above the upper bound {high[1]}")
        eligible = not problems

        previous_best_epoch, previous_best_value = self.best_epoch, self.best_value
        is_best = eligible and self._improves(value)
        if is_best:
            self.best_epoch, self.best_value, self.best_step = epoch, value, step
            self.wait_count = 0
            if previous_best_value is None:
                reason = f"{label} is {_fmt(value)} at {self.unit} {epoch}, the first eligible value; new best."
            else:
                reason = (
                    f"{label} improved from {_fmt(previous_best_value)} ({self.unit} {previous_best_epoch}) "
                    f"to {_fmt(value)} at {self.unit} {epoch}; new best."
                )
            note = "new best"
        else:
            self.wait_count += 1
            if not eligible:
                note = "; ".join(problems)
                reason = f"{self.unit.capitalize()} {epoch} is not eligible: {note}."
            else:
                note = f"not better than the best by more than {_fmt(self.min_delta)}"
                reason = (
                    f"{label} is {_fmt(value)} at {self.unit} {epoch}, not better than the best "
                    f"{_fmt(self.best_value)} ({self.unit} {self.best_epoch}) by more than {_fmt(self.min_delta)}."
                )
            if self.patience is None:
                reason += f" {self.wait_count} evaluation(s) without improvement; no patience set, so no early stop."
            else:
                reason += f" {self.wait_count} of {self.patience} evaluation(s) without improvement."

        was_stopped = self.should_stop
        dvar_ratio = None
        if self.dvar is not None:
            trajectory = [result.aggregates.get(self.dvar.metric, math.nan) for result in self.history] + [aggregates[self.dvar.metric]]
            dvar_ratio = self.dvar.ratio(trajectory)
        if self.best_epoch is None:
            tail = f"no {self.unit} was eligible."
        else:
            tail = f"best {_fmt(self.best_value)} at {self.unit} {self.best_epoch}."
        if not was_stopped and self.patience is not None and self.wait_count >= self.patience:
            self.stopped_epoch = epoch
            self.stop_reason = (
                f"Stopping at {self.unit} {epoch}: {label} did not improve by more than {_fmt(self.min_delta)} "
                f"for {self.wait_count} evaluation(s); {tail}"
            )
            reason += " " + self.stop_reason
        elif not was_stopped and dvar_ratio is not None and dvar_ratio < self.dvar.threshold:
            self.stopped_epoch = epoch
            self.stop_reason = (
                f"Stopping at {self.unit} {epoch} by DVAR: the variance of {self.dvar.metric} over the last {self.dvar.window} "
                f"evaluations is {_fmt(dvar_ratio)} of its variance over all {len(self.history) + 1}, below {_fmt(self.dvar.threshold)} "
                f"(it has stopped moving); {tail}"
            )
            reason += " " + self.stop_reason
        elif was_stopped:
            reason += f" (Already stopped at {self.unit} {self.stopped_epoch}; training continued.)"

        self.history.append(
            EpochResult(epoch=epoch, step=step, value=value, aggregates=aggregates, eligible=eligible, note=note)
        )
        return Decision(
            epoch=epoch,
            is_best=is_best,
            should_stop=self.should_stop,
            reason=reason,
            best_epoch=self.best_epoch,
            best_value=self.best_value,
        )

    def ranked(self, k: int | None = None) -> list[EpochResult]:
        """Eligible epochs best-first by their value (ties: earliest epoch first), at most k.

        This is a plain ordering by value, for top-k export; `best_epoch` additionally applies
        min_delta, so with min_delta > 0 the first entry can be a later epoch that beat
        `best_epoch` by less than min_delta.
        """
        if k is not None:
            k = check_int("k", k)
            if k < 0:
                raise ValueError(f"k must be >= 0 or None (all), got {k}")
        sign = -1.0 if self.higher_is_better else 1.0
        order = sorted((result for result in self.history if result.eligible), key=lambda r: (sign * r.value, r.epoch))
        return order if k is None else order[:k]

    def describe(self) -> dict[str, Any]:
        """The settings, JSON-serialisable (for the exported checkpoint's sidecar)."""
        return {
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "mode": self.mode,
            "min_delta": self.min_delta,
            "patience": self.patience,
            "aggregate": self.aggregate,
            "bounds": {name: [lo, hi] for name, (lo, hi) in sorted(self.bounds.items())},
            "unit": self.unit,
            "dvar": self.dvar.describe() if self.dvar else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume; JSON-serialisable (inf/NaN as strings) and picklable (lora_monitor.policy_state)."""
        return policy_state(self)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from `state_dict()` output (also after a JSON round trip).

        The saved settings must equal this policy's: resuming with another metric, patience or
        bound would silently change what "best" means. The error lists each difference.
        """
        restore_policy_state(self, state)

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in self.describe().items())
        return f"BestEpochPolicy({settings}, best_epoch={self.best_epoch!r}, wait_count={self.wait_count})"


def _as_values(name: str, values: Any, epoch: int) -> list[float]:
    """Per-prompt values as floats; a bare number is one prompt."""
    if isinstance(values, numbers.Real) and not isinstance(values, bool):
        return [float(values)]
    if isinstance(values, (str, bytes)):
        raise ValueError(f"scores[{name!r}] at epoch {epoch} must be numbers, got {values!r}")
    try:
        result = [float(value) for value in values]
    except (TypeError, ValueError):
        raise ValueError(f"scores[{name!r}] at epoch {epoch} must be a sequence of numbers, got {values!r}") from None
    if not result:
        raise ValueError(f"scores[{name!r}] at epoch {epoch} is empty; expected one value per preview prompt")
    return result

