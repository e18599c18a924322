"""Score every candidate and choose the best exactly as the in-training monitor does.

Images are rounded to 8 bits (`monitor.quantize`), scored with `score_images` (per preview, with its
prompt) and `score_sets` (the whole-set signals such as diversity, over the seeds of each prompt) and
the same scorers, and passed to one `BestEpochPolicy.update` per candidate in increasing order, so
ties (within min_delta) go to the earlier epoch or the lower strength. The base model's images are
scored the same way first: their aggregates are the values bounds such as adherence >= 0.9x base
multiply (`policy.set_base`). The result objects here are what the table, the JSON/CSV output
(lora_monitor/cli/posthoc.py) and the HTML report (report.py) read.
"""
from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from lora_monitor.monitor import quantize
from lora_monitor.policy import AGGREGATES, VALIDATION_METRIC, BestEpochPolicy, PolicyPreset
from lora_monitor.posthoc.candidates import Candidate, PosthocError
from lora_monitor.record import json_number
from lora_monitor.scoring import Scorer, get_scorer, score_images
from lora_monitor.scoring.scorers import score_sets


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
    groups: list[int] = field(default_factory=list)  # per preview: equal numbers are one prompt under several seeds
    seeds: list[int | None] = field(default_factory=list)  # per preview, where known
    base_scores: dict[str, list[float]] | None = None  # the base model's images, scored like every candidate
    base_aggregates: dict[str, float] | None = None
    higher_is_better: dict[str, bool] = field(default_factory=dict)  # per metric, from its scorer
    preset: PolicyPreset | None = None  # the preset the settings came from, if any

    @property
    def preview_labels(self) -> list[str]:
        """Each preview's prompt, with its seed where a prompt has several previews."""
        counts = {group: self.groups.count(group) for group in self.groups}
        labels = []
        for index, prompt in enumerate(self.prompts):
            seed = self.seeds[index] if index < len(self.seeds) else None
            several = index < len(self.groups) and counts[self.groups[index]] > 1
            labels.append(f"{prompt} (seed {seed})" if several and seed is not None else prompt)
        return labels

    def bound_texts(self) -> dict[str, str]:
        """Each bound in words with its resolved value: 'adherence >= 0.9x base = 0.243', 'ssim in [0.3, 0.95]'."""
        return {name: describe_bound(self.policy, name) for name in self.policy.bounds}

    @property
    def rule(self) -> str:
        """The rule that chose, as a sentence: the preset's own when the settings are the preset's, else in words."""
        policy, preset = self.policy, self.preset
        if (
            preset is not None and policy.metric == preset.metric and policy.aggregate == "mean"
            and dict(policy.bounds) == {name: tuple(bound) for name, bound in preset.bounds.items()}
        ):
            return preset.rule
        direction = "highest" if policy.higher_is_better else "lowest"
        noun = {"epochs": self.unit, "strength": "strength", "grid": f"({self.unit}, strength) pair"}[self.kind]
        tie = {"epochs": f"earliest {self.unit}", "strength": "lowest strength", "grid": f"earliest {self.unit}, then lowest strength"}[self.kind]
        over = "held-out images" if policy.metric == VALIDATION_METRIC else "previews"
        sentence = f"best = {direction} {policy.aggregate} {policy.metric} over the {over} ({tie} on ties"
        sentence += f" within min_delta {policy.min_delta:g})" if policy.min_delta else ")"
        if policy.bounds:
            sentence += f", among {noun}s whose " + " and ".join(self.bound_texts().values())
        if preset is not None:
            sentence += f" (preset {preset.name!r}, changed by --metric/--bound)"
        return sentence + "."

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
            "groups": list(self.groups),
            "seeds": list(self.seeds),
            "preset": None if self.preset is None else self.preset.name,
            "rule": self.rule,
            "policy": self.policy.describe(),
            "bounds": self.bound_texts(),
            "base": None if self.base_aggregates is None else {
                "files": list(self.reference_files),
                "scores": {name: [json_number(v) for v in values] for name, values in (self.base_scores or {}).items()},
                "aggregates": {name: json_number(v) for name, v in self.base_aggregates.items()},
            },
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
                    "scores": {name: [json_number(v) for v in values] for name, values in r.scores.items()},
                    "aggregates": {name: json_number(v) for name, v in r.aggregates.items()},
                    "eligible": r.eligible,
                    "is_best": r.is_best,
                    "note": r.note,
                }
                for r in self.results
            ],
            "skipped": [{"file": path, "reason": reason} for path, reason in self.skipped],
            "notes": list(self.notes),
        }


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def resolve_bound_side(policy: BestEpochPolicy, metric: str, side: float | str | None) -> tuple[float | None, str]:
    """A bound side as a number and in the policy's words: (0.3, '0.3'), (0.243, '0.9x base (0.27) = 0.243'); a relative
    side whose base value is not known is (None, '0.9x base (unknown)'). The policy's own rule resolves it (a negative
    base, as a cosine may be, is handled there), so the report and the table say what the policy checked."""
    if side is None:
        return None, ""
    if isinstance(side, str) and not math.isfinite((policy.base or {}).get(metric, math.nan)):
        return None, f"{side} base (unknown)"
    limit, text = policy.limit(metric, side)
    return float(limit), text


def describe_bound(policy: BestEpochPolicy, metric: str) -> str:
    """'adherence >= 0.9x base = 0.243', 'ssim <= 0.95' or 'ssim in [0.3, 0.95]'."""
    lo, hi = (resolve_bound_side(policy, metric, side)[1] for side in policy.bounds[metric])
    if lo and hi:
        return f"{metric} in [{lo}, {hi}]"
    return f"{metric} >= {lo}" if lo else f"{metric} <= {hi}"


def groups_from_prompts(prompts: Sequence[str]) -> list[int]:
    """Seed groups from prompt text: previews with the same prompt are one group, numbered in order of appearance."""
    numbers: dict[str, int] = {}
    return [numbers.setdefault(prompt, len(numbers)) for prompt in prompts]


def build_policy(
    scorers: Sequence[Scorer],
    monitor: str,
    *,
    min_delta: float = 0.0,
    aggregate: str = "mean",
    bounds: Mapping[str, tuple[float | str | None, float | str | None]] | None = None,
    unit: str = "epoch",
) -> BestEpochPolicy:
    """The policy LoraMonitor builds for the same settings (polarity from the scorer; no patience);
    `unit` "step" for candidates keyed by step (its sentences then say "step N"). A bound side may be
    relative to the base model ('0.9x'); `analyse` sets the base values from the base images."""
    by_name = {scorer.name: scorer for scorer in scorers}
    if monitor not in by_name:
        raise PosthocError(f"--metric {monitor!r} is not among the metrics {list(by_name)}; add it to --metrics")
    for name in bounds or {}:
        if name not in by_name:
            raise PosthocError(f"--bound names the metric {name!r}, which is not among the metrics {list(by_name)}; add it to --metrics")
    try:
        return BestEpochPolicy(
            monitor, higher_is_better=by_name[monitor].higher_is_better, min_delta=min_delta, aggregate=aggregate, bounds=bounds, unit=unit
        )
    except ValueError as error:
        raise PosthocError(str(error)) from None


def make_scorers(names: Sequence[str], have_references: bool, monitor: str, options=None) -> tuple[list[Scorer], list[str]]:
    """Scorers for `names` (the monitored metric first), prepared (models loaded, training images embedded);
    reference metrics are dropped, with a note, when there are no references (base images). `options`
    (SignalOptions) go to the embedding signals."""
    notes = []
    scorers: list[Scorer] = []
    for name in dict.fromkeys([monitor, *names]):
        try:
            scorer = get_scorer(name, options=options)
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


def check_groups(scorers: Sequence[Scorer], groups: Sequence[int], fix: str) -> None:
    """Let whole-set scorers refuse the previews' seed groups now (diversity needs 2+ seeds a prompt); `fix` says how."""
    for scorer in scorers:
        check = getattr(scorer, "check_groups", None)
        if check is not None:
            try:
                check(list(groups))
            except ValueError as error:
                raise PosthocError(f"{str(error).split('; ask for')[0]}; {fix}") from None


def _score(scorers, images, references, prompts, groups, warn) -> dict[str, list[float]]:
    """Per-preview scores of one candidate (or of the base): score_images, then the whole-set signals."""
    needs = any(scorer.needs_reference for scorer in scorers)
    scores = score_images(scorers, images, references if needs else None, warn=warn, prompts=list(prompts))
    scores.update(score_sets(scorers, images, list(groups), warn=warn))
    return {name: scores[name] for name in [scorer.name for scorer in scorers] if name in scores}


def measure_base(
    scorers: Sequence[Scorer],
    images: Sequence[torch.Tensor],
    *,
    prompts: Sequence[str],
    groups: Sequence[int],
    aggregate: str,
    reference_files: Sequence[str | None] = (),
    warn=None,
) -> tuple[dict[str, list[float]], dict[str, float], list[str]]:
    """Every metric on the base model's images (8-bit, compared with themselves where a metric needs a reference),
    as the monitor measures its base renders: (per-preview scores, aggregates, notes). An aggregate is NaN when a
    value is not finite, and the whole-set signals' are NaN when the base images of one prompt are one file
    (one --references image for several seeds: there is no variety of the base to measure)."""
    images = [quantize(image) for image in images]
    scores = _score(scorers, images, images, prompts, groups, warn)
    notes = []
    files = list(reference_files) or [None] * len(images)
    shared = [group for group in dict.fromkeys(groups) if _repeats([files[i] for i, g in enumerate(groups) if g == group])]
    for scorer in scorers:
        if getattr(scorer, "whole_set", False) and shared:
            scores[scorer.name] = [math.nan] * len(images)
            notes.append(
                f"the base model's {scorer.name} is unknown: the base images of prompt group(s) {shared} are one file for "
                "several seeds; give --references one base image per prompt and seed"
            )
    aggregates = {
        name: float(AGGREGATES[aggregate](values)) if all(math.isfinite(v) for v in values) else math.nan
        for name, values in scores.items()
    }
    return scores, aggregates, notes


def _repeats(files: Sequence[str | None]) -> bool:
    named = [name for name in files if name is not None]
    return len(set(named)) < len(named)


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
    groups: Sequence[int] | None = None,
    seeds: Sequence[int | None] | None = None,
    preset: PolicyPreset | None = None,
) -> Analysis:
    """Score every candidate and run the policy over them in increasing (epoch, strength) order.

    This is LoraMonitor.evaluate without the record: quantise to 8 bits, score_images (with each preview's
    prompt) and score_sets (over the seed `groups`; by default previews with the same prompt text are one
    group), policy.update. The shared `references` are the base model's images: they are scored first
    (`measure_base`) and their aggregates set as the policy's base, which relative bounds ('0.9x') need.
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
    groups = list(groups) if groups is not None else groups_from_prompts(prompts)
    if len(groups) != len(prompts):
        raise PosthocError(f"{len(groups)} seed groups for {len(prompts)} previews; give one group number per preview")
    check_groups(scorers, groups, "give several previews of each prompt (seeds)")
    shared = [quantize(image) for image in references] if references is not None else None
    warned: set[str] = set()

    def warn_once(key: str, message: str) -> None:
        if key not in warned:
            warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=2)

    base_scores = base_aggregates = None
    notes: list[str] = []
    if shared is not None:
        base_scores, base_aggregates, notes = measure_base(
            scorers, shared, prompts=prompts, groups=groups, aggregate=policy.aggregate, reference_files=reference_files, warn=warn_once
        )
        policy.set_base(base_aggregates)
    if policy.needs_base:
        relative = [name for name, bound in policy.bounds.items() if any(isinstance(side, str) for side in bound)]
        if shared is None:
            raise PosthocError(
                f"the bound(s) on {', '.join(relative)} are relative to the base model's values, and there are no base images: "
                "give --references (the base model's images) or --base MODEL to render them"
            )
        unknown = [name for name in relative if not math.isfinite(base_aggregates.get(name, math.nan))]
        if unknown:
            raise PosthocError(
                f"the base model's {', '.join(unknown)} could not be measured (NaN; see the notes), so the bound(s) relative to it "
                "cannot be checked: " + "; ".join(notes or ["a base image could not be scored"])
            )

    labels = {}
    results = []
    bar = tqdm(ordered, desc="scoring", unit="candidate", disable=not progress, leave=False)
    for position, candidate in enumerate(bar):
        step = candidate.epoch if kind == "epochs" else position
        labels[step] = candidate.label
        refs = [quantize(image) for image in candidate.references] if candidate.references is not None else shared
        scores = _score(scorers, [quantize(image) for image in candidate.images], refs, prompts, groups, warn_once)
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
        notes=notes,
        groups=groups,
        seeds=list(seeds) if seeds is not None else [None] * len(prompts),
        base_scores=base_scores,
        base_aggregates=base_aggregates,
        higher_is_better={scorer.name: bool(scorer.higher_is_better) for scorer in scorers},
        preset=preset,
    )


def _relabel(text: str, labels: Mapping[int, str]) -> str:
    """Policy sentences say "epoch N"; for strength/grid N is a position: put the candidate's label there."""

    def replace(match: re.Match) -> str:
        label = labels.get(int(match.group(2)), match.group(0))
        return label[0].upper() + label[1:] if match.group(1) == "Epoch" else label

    return re.sub(r"\b(epoch|Epoch) (\d+)\b", replace, text)
