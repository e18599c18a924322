"""Post-hoc analysis: which saved epoch, which LoRA strength, which (epoch, strength) pair is best.

Inputs are either images already on disk (kohya samples, the older tools' epoch_NN.png /
strength_X.png layouts, or a user's name pattern) or LoRA checkpoints (kohya .safetensors files,
diffusers LoRA folders) that are rendered here with the in-training renderer. Either way every
candidate is scored and chosen exactly as `LoraMonitor.evaluate` does: images rounded to 8 bits
(`monitor.quantize`), `score_images` with the same scorers, one `BestEpochPolicy.update` per
candidate in increasing order. So the same images give the same choice as the in-training monitor,
and ties (within min_delta) go to the earlier epoch or the lower strength.
"""
from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch

from lora_monitor.monitor import quantize
from lora_monitor.policy import BestEpochPolicy
from lora_monitor.record import from_pil
from lora_monitor.scoring import Scorer, get_scorer, score_images

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"

#: The rule for images of one prompt that differ in size; quoted in --help and in the report.
RESIZE_RULE = (
    "Images of one prompt must share a size to be compared: any image (candidate or reference) whose "
    "size differs from that prompt's reference image - or, without a shared reference, from the prompt's "
    "image in the first epoch/lowest strength - is resized to that size with Lanczos resampling before "
    "scoring, and listed. Different prompts may have different sizes."
)

_EXT = r"\.(?:png|jpe?g|webp|bmp)"
# kohya sd-scripts: {output_name}_e{epoch:06d}_{prompt:02d}_{YYYYmmddHHMMSS}_{seed}.png (name and seed optional)
KOHYA_SAMPLE = re.compile(r"^(?:(?P<name>.+)_)?e(?P<epoch>\d{6})_(?P<prompt>\d{2,})_(?P<timestamp>\d{14})(?:_(?P<seed>\d+))?\.png$")
OLD_EPOCH = re.compile(rf"^epoch_(?P<epoch>\d+){_EXT}$", re.IGNORECASE)
OLD_EPOCH_CONTROL = re.compile(rf"^control_(?P<epoch>\d+){_EXT}$", re.IGNORECASE)
OLD_STRENGTH = re.compile(rf"^strength_(?P<strength>\d*\.?\d+){_EXT}$", re.IGNORECASE)
SINGLE_CONTROL = re.compile(rf"^control(?:_base)?{_EXT}$", re.IGNORECASE)
KOHYA_CHECKPOINT = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6})\.safetensors$")


class PosthocError(ValueError):
    """Bad input for a post-hoc command; the message names the file and what is allowed."""


# ----------------------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    """One epoch, strength or (epoch, strength) pair: one image per prompt, in prompt order."""

    epoch: int | None
    strength: float | None
    images: list[torch.Tensor]
    files: list[str | None]
    references: list[torch.Tensor] | None = None  # only when this candidate has its own (control_NN.png)
    reference_files: list[str | None] | None = None

    @property
    def order(self) -> tuple[float, float]:
        return (self.epoch if self.epoch is not None else 0, self.strength if self.strength is not None else 0.0)

    @property
    def label(self) -> str:
        parts = []
        if self.epoch is not None:
            parts.append(f"epoch {self.epoch}")
        if self.strength is not None:
            parts.append(f"strength {format_strength(self.strength)}")
        return " @ ".join(parts)


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
    def best(self) -> CandidateResult | None:
        return next((result for result in self.results if result.is_best), None)

    def explanation(self) -> str:
        """Why the best one won, in sentences: the policy's own reason and what the others lacked."""
        best = self.best
        policy = self.policy
        noun = {"epochs": "epoch", "strength": "strength", "grid": "(epoch, strength) pair"}[self.kind]
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


def format_strength(value: float) -> str:
    return f"{value:g}"


# ----------------------------------------------------------------------------------------- scoring


def build_policy(
    scorers: Sequence[Scorer],
    monitor: str,
    *,
    min_delta: float = 0.0,
    aggregate: str = "mean",
    bounds: Mapping[str, tuple[float | None, float | None]] | None = None,
) -> BestEpochPolicy:
    """The policy LoraMonitor builds for the same settings (polarity from the scorer; no patience)."""
    by_name = {scorer.name: scorer for scorer in scorers}
    if monitor not in by_name:
        raise PosthocError(f"--metric {monitor!r} is not among the metrics {list(by_name)}; add it to --metrics")
    for name in bounds or {}:
        if name not in by_name:
            raise PosthocError(f"--bound names the metric {name!r}, which is not among the metrics {list(by_name)}; add it to --metrics")
    return BestEpochPolicy(monitor, higher_is_better=by_name[monitor].higher_is_better, min_delta=min_delta, aggregate=aggregate, bounds=bounds)


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

    labels = {}
    results = []
    bar = tqdm(ordered, desc="scoring", unit="candidate", disable=not progress, leave=False)
    for position, candidate in enumerate(bar):
        step = candidate.epoch if kind == "epochs" else position
        labels[step] = candidate.label
        refs = [quantize(image) for image in candidate.references] if candidate.references is not None else shared
        needs = any(scorer.needs_reference for scorer in scorers)
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


# ----------------------------------------------------------------------------------------- images on disk


@dataclass
class _Found:
    path: Path
    epoch: int | None
    strength: float | None
    prompt: int
    sort_key: str = ""


def read_image(path: Path) -> torch.Tensor:
    """An image file as (3, H, W) float32 in [0, 1]; OSError/ValueError for unreadable or truncated files."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()  # decodes everything: truncated files fail here, not later
        return from_pil(image)


def pattern_regex(template: str) -> re.Pattern:
    """A file-name template -> regex: {epoch}, {strength}, {prompt}, {seed} and * (anything)."""
    fields = {
        "epoch": r"(?P<epoch>\d+)",
        "strength": r"(?P<strength>[-+]?\d*\.?\d+)",
        "prompt": r"(?P<prompt>\d+)",
        "seed": r"\d+",
    }
    parts = re.split(r"(\{[a-z]+\}|\*)", template)
    regex = ""
    for part in parts:
        if part == "*":
            regex += ".*?"
        elif part.startswith("{") and part.endswith("}"):
            name = part[1:-1]
            if name not in fields:
                raise PosthocError(f"--pattern {template!r}: unknown placeholder {part}; allowed: {{epoch}}, {{strength}}, {{prompt}}, {{seed}} and *")
            if f"(?P<{name}>" in regex:
                raise PosthocError(f"--pattern {template!r}: {part} appears twice")
            regex += fields[name]
        else:
            regex += re.escape(part)
    return re.compile(f"^{regex}$", re.IGNORECASE)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _scan(files: list[Path], regex: re.Pattern, axis: str) -> list[_Found]:
    found = []
    for path in files:
        match = regex.match(path.name)
        if not match:
            continue
        groups = match.groupdict()
        epoch = int(groups["epoch"]) if groups.get("epoch") is not None else None
        strength = float(groups["strength"]) if groups.get("strength") is not None else None
        prompt = int(groups["prompt"]) if groups.get("prompt") is not None else 0
        found.append(_Found(path, epoch, strength, prompt, groups.get("timestamp") or ""))
    needed = {"epochs": ["epoch"], "strength": ["strength"], "grid": ["epoch", "strength"]}[axis]
    return found if found and all(f"(?P<{name}>" in regex.pattern for name in needed) else []


@dataclass
class ImageSet:
    candidates: list[Candidate]
    references: list[torch.Tensor] | None
    reference_files: list[str | None]
    prompts: list[str]
    skipped: list[tuple[str, str]]
    notes: list[str]
    scheme: str


def collect_images(
    folder: str | Path,
    axis: str,
    *,
    pattern: str | None = None,
    references: str | Path | None = None,
    prompts: Sequence[str] | None = None,
) -> ImageSet:
    """Find the candidates' images in `folder` by naming scheme and read them, with their references.

    axis: "epochs", "strength" or "grid". Schemes tried without --pattern: kohya sample names
    (`{name}_e{epoch:06d}_{i:02d}_{timestamp}_{seed}.png`; epoch 0 samples are the references
    unless `references` is given), the older tools' `epoch_01.png` (+ `control_01.png` per epoch or
    one `control.png`) and `strength_0.5.png` (+ `control_base.png`). Unreadable files are skipped
    and listed; a candidate missing a prompt's image is dropped and listed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise PosthocError(f"{folder}: not a folder of images")
    files = _image_files(folder)
    if not files and (folder / "sample").is_dir():  # a kohya output dir: its samples are in sample/
        folder = folder / "sample"
        files = _image_files(folder)
    if not files:
        raise PosthocError(f"{folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    schemes: list[tuple[str, re.Pattern]] = []
    if pattern:
        schemes.append((f"pattern {pattern!r}", pattern_regex(pattern)))
    elif axis == "epochs":
        schemes += [("kohya samples", KOHYA_SAMPLE), ("epoch_NN", OLD_EPOCH)]
    elif axis == "strength":
        schemes.append(("strength_X", OLD_STRENGTH))
    found, scheme = [], ""
    for scheme, regex in schemes:
        found = _scan(files, regex, axis)
        if found:
            break
    if not found:
        wanted = {
            "epochs": "kohya sample names ({name}_e000003_00_{timestamp}_{seed}.png) or epoch_01.png",
            "strength": "strength_0.5.png",
            "grid": "a --pattern with both {epoch} and {strength}",
        }[axis]
        given = f" matching --pattern {pattern!r}" if pattern else ""
        raise PosthocError(f"{folder}: {len(files)} image file(s), none{given} named as expected: {wanted}; use --pattern for other names")

    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    matched = {f.path for f in found}
    ref_by_prompt: dict[int, Path] = {}
    per_candidate_refs: dict[int, Path] = {}
    if scheme == "kohya samples" and references is None:
        zero = [f for f in found if f.epoch == 0]
        if zero:
            found = [f for f in found if f.epoch != 0]
            for f in sorted(zero, key=lambda f: f.sort_key):
                ref_by_prompt[f.prompt] = f.path
            notes.append("references: the run's epoch-0 samples (--sample_at_first)")
    elif scheme == "epoch_NN" and references is None:
        for path in files:
            match = OLD_EPOCH_CONTROL.match(path.name)
            if match:
                per_candidate_refs[int(match.group("epoch"))] = path
                matched.add(path)
    if references is not None:
        ref_by_prompt = _reference_files(Path(references), sorted({f.prompt for f in found}))
    elif not ref_by_prompt and not per_candidate_refs:
        singles = [p for p in files if SINGLE_CONTROL.match(p.name)]
        if scheme == "strength_X" and not singles:
            singles = [f.path for f in found if f.strength == 0.0]
        if singles:
            ref_by_prompt = {prompt: singles[0] for prompt in {f.prompt for f in found}}
            matched.add(singles[0])
    ignored = [p.name for p in files if p not in matched and p not in ref_by_prompt.values()]
    if ignored:
        notes.append(f"ignored {len(ignored)} image file(s) not named as {scheme}: {', '.join(ignored[:5])}{' ...' if len(ignored) > 5 else ''}")

    images: dict[Path, torch.Tensor] = {}

    def load(path: Path) -> torch.Tensor | None:
        if path not in images:
            try:
                images[path] = read_image(path)
            except (OSError, ValueError, SyntaxError) as error:
                skipped.append((str(path), f"unreadable image: {error}"))
                images[path] = None  # type: ignore[assignment]
        return images[path]

    # group by candidate; a repeated (candidate, prompt) keeps the latest file (kohya reruns: newest timestamp)
    groups: dict[tuple, dict[int, _Found]] = {}
    for f in sorted(found, key=lambda f: (f.sort_key, f.path.name)):
        slot = groups.setdefault((f.epoch, f.strength), {})
        if f.prompt in slot:
            notes.append(f"{f.path.name} replaces {slot[f.prompt].path.name} (same candidate and prompt; the later one is used)")
        slot[f.prompt] = f
    prompt_ids = sorted({p for slot in groups.values() for p in slot} | set(ref_by_prompt))
    if prompts is not None and len(prompts) != len(prompt_ids):
        raise PosthocError(f"--prompts lists {len(prompts)} prompt(s) but the images hold {len(prompt_ids)} (indices {prompt_ids})")
    labels = list(prompts) if prompts is not None else [f"prompt {index:02d}" for index in prompt_ids]

    shared_refs: list[torch.Tensor] | None = None
    reference_files: list[str | None] = [None] * len(prompt_ids)
    if ref_by_prompt:
        missing = [p for p in prompt_ids if p not in ref_by_prompt]
        if missing:
            raise PosthocError(f"no reference image for prompt(s) {missing} (references: {sorted(str(p) for p in set(ref_by_prompt.values()))})")
        loaded = [load(ref_by_prompt[p]) for p in prompt_ids]
        if any(image is None for image in loaded):
            raise PosthocError("a reference image is unreadable: " + "; ".join(f"{path}: {why}" for path, why in skipped))
        shared_refs = loaded  # type: ignore[assignment]
        reference_files = [str(ref_by_prompt[p]) for p in prompt_ids]

    candidates = []
    for (epoch, strength), slot in groups.items():
        probe = Candidate(epoch, strength, [], [])
        lacking = [p for p in prompt_ids if p not in slot]
        images_here = [load(slot[p].path) if p in slot else None for p in prompt_ids]
        unreadable = [p for p, image in zip(prompt_ids, images_here) if image is None and p in slot]
        if lacking or unreadable:
            why = f"no image for prompt(s) {lacking}" if lacking else f"unreadable image for prompt(s) {unreadable}"
            skipped.append((probe.label, f"{why}; this candidate is left out so that all are scored on the same prompts"))
            continue
        candidate = Candidate(epoch, strength, images_here, [str(slot[p].path) for p in prompt_ids])  # type: ignore[arg-type]
        if per_candidate_refs:
            if epoch not in per_candidate_refs:
                skipped.append((probe.label, f"no control_{epoch:02d} image beside epoch_{epoch:02d}; left out"))
                continue
            ref = load(per_candidate_refs[epoch])
            if ref is None:
                skipped.append((probe.label, "its control image is unreadable; left out"))
                continue
            candidate.references = [ref]
            candidate.reference_files = [str(per_candidate_refs[epoch])]
        candidates.append(candidate)
    if not candidates:
        raise PosthocError(f"{folder}: no complete candidate left to rank; skipped: " + "; ".join(f"{p}: {why}" for p, why in skipped))
    candidates.sort(key=lambda c: c.order)
    notes += harmonise_sizes(candidates, shared_refs)
    if scheme == "epoch_NN" and per_candidate_refs:
        notes.append("references: control_NN.png beside each epoch_NN.png")
    return ImageSet(candidates, shared_refs, reference_files, labels, skipped, notes, scheme)


def _reference_files(path: Path, prompt_ids: list[int]) -> dict[int, Path]:
    """--references: one image for every prompt, or a folder with one image per prompt (by index in the name, else in name order)."""
    if path.is_file():
        return {prompt: path for prompt in prompt_ids}
    if not path.is_dir():
        raise PosthocError(f"--references {path}: no such file or folder")
    files = _image_files(path)
    if not files:
        raise PosthocError(f"--references {path}: no image files in this folder")
    kohya = {}
    for p in files:
        match = KOHYA_SAMPLE.match(p.name)
        if match:
            kohya[int(match.group("prompt"))] = p  # later (newer) files win
    if kohya and all(prompt in kohya for prompt in prompt_ids):
        return {prompt: kohya[prompt] for prompt in prompt_ids}
    if len(files) == 1:
        return {prompt: files[0] for prompt in prompt_ids}
    if len(files) != len(prompt_ids):
        raise PosthocError(
            f"--references {path}: {len(files)} images for {len(prompt_ids)} prompt(s); give one image per prompt "
            f"(taken in name order) or a single image for all"
        )
    return dict(zip(prompt_ids, files))


def harmonise_sizes(candidates: Sequence[Candidate], references: list[torch.Tensor] | None) -> list[str]:
    """Apply RESIZE_RULE in place; return one note per resized image."""
    notes = []
    for index in range(len(candidates[0].images)):
        target = tuple(references[index].shape[1:]) if references is not None else tuple(candidates[0].images[index].shape[1:])
        for candidate in candidates:
            own = [(candidate.images, candidate.files)]
            if candidate.references is not None:
                own.append((candidate.references, candidate.reference_files or [None]))
            for images, files in own:
                if index >= len(images):
                    continue
                size = tuple(images[index].shape[1:])
                if size != target:
                    images[index] = _resize(images[index], target)
                    name = files[index] if index < len(files) and files[index] else candidate.label
                    notes.append(f"resized {name} from {size[1]}x{size[0]} to {target[1]}x{target[0]} (Lanczos) to match prompt {index}")
    return notes


def _resize(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    from lora_monitor.record import to_pil

    return from_pil(to_pil(image).resize((size[1], size[0]), Image.LANCZOS))


# ----------------------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    path: Path
    epoch: int | None
    kind: str  # "kohya", "diffusers" or "pickle"

    @property
    def name(self) -> str:
        return self.path.name


def find_checkpoints(
    paths: Sequence[str | Path],
    *,
    allow_pickle: bool = False,
    final_epoch: int | None = None,
    name: str | None = None,
    need_epoch: bool = True,
) -> tuple[list[Checkpoint], list[tuple[str, str]]]:
    """LoRA checkpoints in files and folders: kohya `{name}-{epoch:06d}.safetensors` (and the final
    `{name}.safetensors`, whose epoch comes from its ss_epoch metadata or `final_epoch`), diffusers
    LoRA folders (pytorch_lora_weights.safetensors; epoch from lora_monitor.json or the folder
    name's trailing number) and, only with allow_pickle, .ckpt/.pt/.pth/.bin files.
    Returns (checkpoints, skipped with reasons)."""
    found: list[Checkpoint] = []
    skipped: list[tuple[str, str]] = []
    entries: list[Path] = []
    for item in map(Path, paths):
        if not item.exists():
            raise PosthocError(f"{item}: no such checkpoint file or folder")
        if item.is_dir() and not (item / DIFFUSERS_LORA_FILE).is_file():
            entries += sorted(item.iterdir())
        else:
            entries.append(item)
    for path in entries:
        if path.is_dir():
            if (path / DIFFUSERS_LORA_FILE).is_file():
                found.append(Checkpoint(path, _folder_epoch(path), "diffusers"))
            continue
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise PosthocError(
                    f"{path} is a pickle checkpoint ({suffix}): unpickling can run arbitrary code. Convert it to "
                    f".safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
                )
            found.append(Checkpoint(path, _trailing_number(path.stem), "pickle"))
        elif suffix == ".safetensors":
            match = KOHYA_CHECKPOINT.match(path.name)
            if match:
                found.append(Checkpoint(path, int(match.group("epoch")), "kohya"))
            else:
                epoch = _metadata_epoch(path)
                found.append(Checkpoint(path, epoch if epoch is not None else final_epoch, "kohya"))
    if name is not None:
        found = [c for c in found if c.kind != "kohya" or c.path.name.startswith(name)]
    names = {KOHYA_CHECKPOINT.sub(r"\g<name>", c.path.name).removesuffix(".safetensors") for c in found if c.kind == "kohya"}
    if len(names) > 1:
        raise PosthocError(f"checkpoints of several runs in one folder ({', '.join(sorted(names))}); choose one with --name")
    complete = []
    for checkpoint in found:
        if checkpoint.epoch is None and need_epoch:
            skipped.append((str(checkpoint.path), "its epoch is unknown (no number in the name, no ss_epoch metadata); pass --final-epoch N to include it"))
        else:
            complete.append(checkpoint)
    if not complete:
        looked = ", ".join(str(p) for p in paths)
        raise PosthocError(
            f"no LoRA checkpoints found in {looked}: looked for kohya name-000003.safetensors files, diffusers LoRA "
            f"folders ({DIFFUSERS_LORA_FILE}) and, with --allow-pickle, .ckpt/.pt files"
            + ("; skipped: " + "; ".join(f"{p}: {why}" for p, why in skipped) if skipped else "")
        )
    complete.sort(key=lambda c: (c.epoch is not None, c.epoch or 0))
    epochs = [c.epoch for c in complete]
    if need_epoch and len(set(epochs)) != len(epochs):
        raise PosthocError("several checkpoints for one epoch: " + ", ".join(f"{c.path.name} (epoch {c.epoch})" for c in complete))
    return complete, skipped


def _trailing_number(text: str) -> int | None:
    match = re.search(r"(\d+)$", text)
    return int(match.group(1)) if match else None


def _folder_epoch(folder: Path) -> int | None:
    import json

    sidecar = folder / "lora_monitor.json"
    if sidecar.is_file():
        try:
            epoch = json.loads(sidecar.read_text(encoding="utf-8")).get("epoch")
            if isinstance(epoch, int):
                return epoch
        except (OSError, ValueError):
            pass
    return _trailing_number(folder.name)


def _metadata_epoch(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get("ss_epoch")
        return int(value) if value is not None else None
    except (OSError, ValueError, Exception):  # an unreadable header is reported when the file is loaded
        return None


def load_lora_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; pickles only through torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    try:
        if checkpoint.kind == "diffusers":
            return load_file(str(checkpoint.path / DIFFUSERS_LORA_FILE))
        if checkpoint.kind == "kohya":
            return load_file(str(checkpoint.path))
        state = torch.load(str(checkpoint.path), map_location="cpu", weights_only=True)
    except PosthocError:
        raise
    except Exception as error:
        raise PosthocError(f"{checkpoint.path}: cannot be loaded as a LoRA checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PosthocError(f"{checkpoint.path}: expected a dict of tensors (a LoRA state dict), got {type(state).__name__}")
    return state


@contextlib.contextmanager
def lora_scale(modules: Sequence[torch.nn.Module], scale: float) -> Iterator[None]:
    """Multiply every peft LoRA layer's scaling by `scale` (what diffusers' cross_attention_kwargs={"scale": s}
    does to the UNet and lora_scale to the text encoder) and restore the exact values on exit; 0 is the base model."""
    from peft.tuners.lora import LoraLayer

    layers = [sub for module in modules if module is not None for sub in module.modules() if isinstance(sub, LoraLayer)]
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in layers:
            for adapter in layer.scaling:
                layer.scaling[adapter] = layer.scaling[adapter] * scale
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.clear()
            layer.scaling.update(scaling)


def load_base_pipeline(base: str, *, device: str = "cpu", dtype: str = "float32"):
    """A Stable Diffusion 1.x/2.x pipeline from a diffusers folder (or hub id), or a single .safetensors/.ckpt file."""
    from diffusers import StableDiffusionPipeline

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    path = Path(base)
    try:
        if path.is_file():
            pipeline = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=torch_dtype, safety_checker=None)
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as error:
        raise PosthocError(f"--base {base}: cannot load a Stable Diffusion pipeline ({error})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def render_checkpoints(
    pipeline,
    spec,
    checkpoints: Sequence[Checkpoint],
    strengths: Sequence[float] | None,
    *,
    sampler: str = "ddim",
    batch_size: int = 4,
    with_epoch: bool = True,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[Candidate]]:
    """Base references (no LoRA loaded) and every checkpoint's previews (at every strength, if given),
    rendered with the in-training PreviewRenderer over the pipeline's modules."""
    from tqdm.auto import tqdm

    from lora_monitor.render import PreviewRenderer

    renderer = PreviewRenderer(
        unet=pipeline.unet, vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
        scheduler=pipeline.scheduler, sampler=sampler, batch_size=batch_size,
    )
    renderer.check_spec(spec)
    scales = list(strengths) if strengths is not None else [None]
    jobs = 1 + len(checkpoints) * sum(1 for s in scales if s != 0.0)
    bar = tqdm(total=jobs * len(spec), desc="rendering", unit="image", disable=not progress, leave=False)
    bar.set_postfix_str("base model")
    references = renderer.render(spec)  # nothing loaded yet: the base model, same as render_base
    bar.update(len(spec))
    candidates = []
    for checkpoint in checkpoints:
        # a diffusers folder is loaded by path, so that newer diffusers read the rank/alpha kept in its header
        source = str(checkpoint.path) if checkpoint.kind == "diffusers" else load_lora_state_dict(checkpoint)
        extra = {"weight_name": DIFFUSERS_LORA_FILE} if checkpoint.kind == "diffusers" else {}
        try:
            pipeline.load_lora_weights(source, adapter_name="posthoc", **extra)
        except Exception as error:
            raise PosthocError(f"{checkpoint.path}: diffusers cannot load it as a LoRA for this base model ({error})") from None
        try:
            for scale in scales:
                if scale == 0.0:  # scale 0 is the base model: reuse the references
                    images = [image.clone() for image in references]
                else:
                    bar.set_postfix_str(f"{checkpoint.name}" + ("" if scale is None else f" @ {format_strength(scale)}"))
                    with lora_scale([pipeline.unet, pipeline.text_encoder], 1.0 if scale is None else scale):
                        images = renderer.render(spec)
                    bar.update(len(spec))
                candidates.append(Candidate(checkpoint.epoch if with_epoch else None, scale, images, [None] * len(spec)))
        finally:
            pipeline.unload_lora_weights()
    bar.close()
    return references, candidates


def parse_strengths(text: str) -> list[float]:
    """'0:1.5:0.1' (start:stop:step, stop included) or '0,0.5,1' -> sorted, rounded strengths."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise PosthocError(f"--strengths {text!r}: give START:STOP:STEP (e.g. 0:1.5:0.1, STOP included, STEP > 0) or a list like 0,0.5,1") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise PosthocError(f"--strengths {text!r}: no finite strengths")
    return sorted(set(values))
