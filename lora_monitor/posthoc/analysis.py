"""Score every candidate and choose the best exactly as the in-training monitor does.

Images are rounded to 8 bits (`monitor.quantize`), scored with `score_images` and the same scorers,
and passed to one `BestEpochPolicy.update` per candidate in increasing order, so ties (within
min_delta) go to the earlier epoch or the lower strength. The result objects here are what the
table, the JSON/CSV output (posthoc_commands.py) and the HTML report (report.py) read.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from lora_monitor.monitor import quantize
from lora_monitor.policy import BestEpochPolicy
from lora_monitor.posthoc.candidates import Candidate, PosthocError
from lora_monitor.scoring import Scorer, get_scorer, score_images


@dataclass
class CandidateResult:
    candidate: Candidate
    scores: dict[str, list[float]]
    aggregates: dict[str, float]
    eligible: bool
    note: str
    reason: str
    is_best: bool = False


@dataclass
class Analysis:
    """Everything a table, the JSON/CSV output and the HTML report need."""

    kind: str  # "epochs", "strength" or "grid"
    prompts: list[str]
    references: list[torch.Tensor] | None
    reference_files: list[str | None]
    results: list[CandidateResult]
    policy: BestEpochPolicy
    metrics: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def unit(self) -> str:
        """What the candidates' epoch numbers count: "epoch", or "step" for a run saved by step."""
        return next((r.candidate.unit for r in self.results if r.candidate.epoch is not None), "epoch")

    @property
    def best(self) -> CandidateResult | None:
        return next((result for result in self.results if result.is_best), None)

    def explanation(self) -> str:
        """Why the best one won, in sentences: the policy's own reason and what the others lacked."""
        best = self.best
        policy = self.policy
        noun = {"epochs": self.unit, "strength": "strength", "grid": f"({self.unit}, strength) pair"}[self.kind]
        if best is None:
            return f"No {noun} was eligible: " + "; ".join(f"{r.candidate.label}: {r.note}" for r in self.results) + "."
        sentences = [f"Best: {best.candidate.label}, {policy.metric} ({policy.aggregate}) {best.aggregates[policy.metric]:.6g}.", best.reason]
        later = [r for r in self.results if r.candidate.order > best.candidate.order and r.eligible]
        close = [
            r for r in later
            if (r.aggregates[policy.metric] - best.aggregates[policy.metric]) * (1 if policy.higher_is_better else -1) >= 0
        ]
        if close:
            names = ", ".join(f"{r.candidate.label} ({r.aggregates[policy.metric]:.6g})" for r in close)
            sentences.append(
                f"Later candidates that scored as well or better did not beat the best by more than min_delta "
                f"{policy.min_delta:g}, so the earlier one keeps it: {names}."
            )
        ineligible = [r for r in self.results if not r.eligible]
        if ineligible:
            sentences.append("Not eligible: " + "; ".join(f"{r.candidate.label}: {r.note}" for r in ineligible) + ".")
        return " ".join(sentences)

    def to_dict(self) -> dict[str, Any]:
        best = self.best
        return {
            "kind": self.kind,
            "unit": self.unit,
            "source": self.source,
            "prompts": list(self.prompts),
            "metrics": list(self.metrics),
            "policy": self.policy.describe(),
            "best": None if best is None else {"epoch": best.candidate.epoch, "strength": best.candidate.strength, "label": best.candidate.label},
            "explanation": self.explanation(),
            "references": list(self.reference_files),
            "candidates": [
                {
                    "epoch": r.candidate.epoch,
                    "unit": r.candidate.unit,
                    "strength": r.candidate.strength,
                    "label": r.candidate.label,
                    "files": list(r.candidate.files),
                    "scores": {name: [_json_number(v) for v in values] for name, values in r.scores.items()},
                    "aggregates": {name: _json_number(v) for name, v in r.aggregates.items()},
                    "eligible": r.eligible,
                    "is_best": r.is_best,
                    "note": r.note,
                }
                for r in self.results
            ],
            "skipped": [{"file": path, "reason": reason} for path, reason in self.skipped],
            "notes": list(self.notes),
        }


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


def build_policy(
    scorers: Sequence[Scorer],
    monitor: str,
    *,
    min_delta: float = 0.0,
    aggregate: str = "mean",
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
    unit: str = "epoch",
) -> BestEpochPolicy:
    """The policy LoraMonitor builds for the same settings (polarity from the scorer; no patience);
    `unit` "step" for candidates keyed by step (its sentences then say "step N")."""
    by_name = {scorer.name: scorer for scorer in scorers}
    if monitor not in by_name:
        raise PosthocError(f"--metric {monitor!r} is not among the metrics {list(by_name)}; add it to --metrics")
    for name in bounds or {}:
        if name not in by_name:
            raise PosthocError(f"--bound names the metric {name!r}, which is not among the metrics {list(by_name)}; add it to --metrics")
    return BestEpochPolicy(
        monitor, higher_is_better=by_name[monitor].higher_is_better, min_delta=min_delta, aggregate=aggregate, bounds=bounds, unit=unit
    )


def make_scorers(names: Sequence[str], have_references: bool, monitor: str) -> tuple[list[Scorer], list[str]]:
    """Scorers for `names` (the monitored metric first); reference metrics are dropped, with a note, when there are no references."""
    notes = []
    scorers: list[Scorer] = []
    for name in dict.fromkeys([monitor, *names]):
        try:
            scorer = get_scorer(name)
        except ValueError as error:
            raise PosthocError(str(error)) from None
        if scorer.needs_reference and not have_references:
            if name == monitor:
                raise PosthocError(f"the metric {name!r} needs reference images (the base model's renders): pass --references")
            notes.append(f"{name} is skipped: it needs reference images (base renders) and none were found or given")
            continue
        prepare = getattr(scorer, "prepare", None)
        if prepare is not None:
            prepare()
        scorers.append(scorer)
    return scorers, notes


def analyse(
    kind: str,
    candidates: Sequence[Candidate],
    references: Sequence[torch.Tensor] | None,
    scorers: Sequence[Scorer],
    policy: BestEpochPolicy,
    *,
    prompts: Sequence[str],
    reference_files: Sequence[str | None] = (),
    progress: bool = False,
) -> Analysis:
    """Score every candidate and run the policy over them in increasing (epoch, strength) order.

    This is LoraMonitor.evaluate without the record: quantise to 8 bits, score_images, policy.update.
    For strength and grid the policy's "epoch" is the candidate's position, so ties go to the
    earlier epoch and then the lower strength; the reasons are reworded with the candidates' labels.
    """
    from tqdm.auto import tqdm

    if not candidates:
        raise PosthocError("nothing to rank: no complete candidate was found")
    units = {c.unit for c in candidates if c.epoch is not None}
    if len(units) > 1:
        raise PosthocError("candidates keyed by epoch and by step cannot be ranked together; give checkpoints of one kind")
    ordered = sorted(candidates, key=lambda c: c.order)
    keys = [c.order for c in ordered]
    if len(set(keys)) != len(keys):
        duplicates = sorted({c.label for c, k in zip(ordered, keys) if keys.count(k) > 1})
        raise PosthocError(f"several candidates share a label: {', '.join(duplicates)}; give one file or checkpoint each")
    shared = [quantize(image) for image in references] if references is not None else None
    warned: set[str] = set()

    def warn_once(key: str, message: str) -> None:
        if key not in warned:
            warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    needs = any(scorer.needs_reference for scorer in scorers)
    labels = {}
    results = []
    bar = tqdm(ordered, desc="scoring", unit="candidate", disable=not progress, leave=False)
    for position, candidate in enumerate(bar):
        step = candidate.epoch if kind == "epochs" else position
        labels[step] = candidate.label
        refs = [quantize(image) for image in candidate.references] if candidate.references is not None else shared
        scores = score_images(scorers, [quantize(image) for image in candidate.images], refs if needs else None, warn=warn_once)
        decision = policy.update(step, scores)
        result = policy.history[-1]
        reason = decision.reason if kind == "epochs" else _relabel(decision.reason, labels)
        note = result.note if kind == "epochs" else _relabel(result.note, labels)
        results.append(CandidateResult(candidate, scores, dict(result.aggregates), result.eligible, note, reason))
    bar.close()
    best_step = policy.best_epoch
    for position, result in enumerate(results):
        step = result.candidate.epoch if kind == "epochs" else position
        result.is_best = best_step is not None and step == best_step
    return Analysis(
        kind=kind,
        prompts=list(prompts),
        references=shared,
        reference_files=list(reference_files) or [None] * len(prompts),
        results=results,
        policy=policy,
        metrics=[scorer.name for scorer in scorers],
    )


def _relabel(text: str, labels: Mapping[int, str]) -> str:
    """Policy sentences say "epoch N"; for strength/grid N is a position: put the candidate's label there."""

    def replace(match: re.Match) -> str:
        label = labels.get(int(match.group(2)), match.group(0))
        return label[0].upper() + label[1:] if match.group(1) == "Epoch" else label

    return re.sub(r"\b(epoch|Epoch) (\d+)\b", replace, text)
