"""Find the candidates' images on disk by their names, read them and give one prompt's images one size.

Naming schemes: kohya sd-scripts samples, the older tools' epoch_NN.png / control_NN.png and
strength_X.png layouts, or a user's --pattern. Unreadable or truncated files are skipped and listed.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from lora_monitor.kohya_names import SAMPLE_NAME
from lora_monitor.posthoc.candidates import Candidate, PosthocError
from lora_monitor.record import from_pil, read_image, to_pil

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: The rule for images of one prompt that differ in size; quoted in --help and in the report.
RESIZE_RULE = (
    "Images of one prompt must share a size to be compared: any image (candidate or reference) whose "
    "size differs from that prompt's reference image - or, without a shared reference, from the prompt's "
    "image in the first epoch/lowest strength - is resized to that size with Lanczos resampling before "
    "scoring, and listed. Different prompts may have different sizes."
)

_EXT = r"\.(?:png|jpe?g|webp|bmp)"
# kohya sd-scripts: {output_name}_e{epoch:06d}_{prompt:02d}_{YYYYmmddHHMMSS}_{seed}.png (name and seed optional)
KOHYA_SAMPLE = SAMPLE_NAME
OLD_EPOCH = re.compile(rf"^epoch_(?P<epoch>\d+){_EXT}$", re.IGNORECASE)
OLD_EPOCH_CONTROL = re.compile(rf"^control_(?P<epoch>\d+){_EXT}$", re.IGNORECASE)
OLD_STRENGTH = re.compile(rf"^strength_(?P<strength>\d*\.?\d+){_EXT}$", re.IGNORECASE)
SINGLE_CONTROL = re.compile(rf"^control(?:_base)?{_EXT}$", re.IGNORECASE)


@dataclass
class _Found:
    path: Path
    epoch: int | None
    strength: float | None
    prompt: int
    sort_key: str = ""
    seed: int | None = None

    @property
    def key(self) -> tuple[int, int | None]:
        """The preview this file shows: its prompt index and, when the name carries one, its seed."""
        return (self.prompt, self.seed)


def pattern_regex(template: str) -> re.Pattern:
    """A file-name template -> regex: {epoch}, {strength}, {prompt}, {seed} and * (anything)."""
    fields = {
        "epoch": r"(?P<epoch>\d+)",
        "strength": r"(?P<strength>[-+]?\d*\.?\d+)",
        "prompt": r"(?P<prompt>\d+)",
        "seed": r"(?P<seed>\d+)",
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


def _scan(files: list[Path], regex: re.Pattern, axis: str, seeds: bool = False) -> list[_Found]:
    """The files whose names match; with `seeds`, a {seed} in the name makes each seed a preview of its own."""
    found = []
    for path in files:
        match = regex.match(path.name)
        if not match:
            continue
        groups = match.groupdict()
        epoch = int(groups["epoch"]) if groups.get("epoch") is not None else None
        strength = float(groups["strength"]) if groups.get("strength") is not None else None
        prompt = int(groups["prompt"]) if groups.get("prompt") is not None else 0
        seed = int(groups["seed"]) if seeds and groups.get("seed") is not None else None
        found.append(_Found(path, epoch, strength, prompt, groups.get("timestamp") or "", seed))
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
    seeds: list[int | None] = field(default_factory=list)  # per preview: its seed when the names carry one


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
    and listed; a candidate missing a prompt's image is dropped and listed. With a `pattern` holding
    {seed}, each (prompt, seed) is a preview of its own (`ImageSet.seeds` holds the seeds): the
    previews the diversity signal compares.
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
        # a {seed} in the user's pattern separates the seeds of a prompt; kohya's random seeds never do
        found = _scan(files, regex, axis, seeds=bool(pattern))
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

    # group by candidate; a repeated (candidate, preview) keeps the latest file (kohya reruns: newest timestamp)
    groups: dict[tuple, dict[tuple[int, int | None], _Found]] = {}
    for f in sorted(found, key=lambda f: (f.sort_key, f.path.name)):
        slot = groups.setdefault((f.epoch, f.strength), {})
        if f.key in slot:
            notes.append(f"{f.path.name} replaces {slot[f.key].path.name} (same candidate and prompt; the later one is used)")
        slot[f.key] = f
    keys = {k for slot in groups.values() for k in slot}
    keys |= {(p, None) for p in ref_by_prompt if all(k[0] != p for k in keys)}
    preview_keys = sorted(keys, key=lambda k: (k[0], -1 if k[1] is None else k[1]))
    prompt_ids = sorted({k[0] for k in preview_keys})

    ref_by_key: dict[tuple[int, int | None], Path] = {}
    if references is not None:
        ref_by_key = _reference_files(Path(references), preview_keys, pattern_regex(pattern) if pattern else None)
    elif ref_by_prompt:
        ref_by_key = {k: ref_by_prompt[k[0]] for k in preview_keys if k[0] in ref_by_prompt}
    elif not per_candidate_refs:
        singles = [p for p in files if SINGLE_CONTROL.match(p.name)]
        if scheme == "strength_X" and not singles:
            singles = [f.path for f in found if f.strength == 0.0]
        if singles:
            ref_by_key = {k: singles[0] for k in preview_keys}
            matched.add(singles[0])
    ignored = [p.name for p in files if p not in matched and p not in ref_by_key.values()]
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

    if prompts is not None and len(prompts) != len(prompt_ids):
        raise PosthocError(f"--prompts lists {len(prompts)} prompt(s) but the images hold {len(prompt_ids)} (indices {prompt_ids})")
    texts = dict(zip(prompt_ids, prompts)) if prompts is not None else {p: f"prompt {p:02d}" for p in prompt_ids}
    labels = [texts[k[0]] for k in preview_keys]

    def describe(key: tuple[int, int | None]) -> str:
        return str(key[0]) if key[1] is None else f"{key[0]} (seed {key[1]})"

    shared_refs: list[torch.Tensor] | None = None
    reference_files: list[str | None] = [None] * len(preview_keys)
    if ref_by_key:
        missing = [describe(k) for k in preview_keys if k not in ref_by_key]
        if missing:
            raise PosthocError(f"no reference image for prompt(s) {', '.join(missing)} (references: {sorted(str(p) for p in set(ref_by_key.values()))})")
        loaded = [load(ref_by_key[k]) for k in preview_keys]
        if any(image is None for image in loaded):
            raise PosthocError("a reference image is unreadable: " + "; ".join(f"{path}: {why}" for path, why in skipped))
        shared_refs = loaded  # type: ignore[assignment]
        reference_files = [str(ref_by_key[k]) for k in preview_keys]

    candidates = []
    for (epoch, strength), slot in groups.items():
        probe = Candidate(epoch, strength, [], [])
        lacking = [k for k in preview_keys if k not in slot]
        images_here = [load(slot[k].path) if k in slot else None for k in preview_keys]
        unreadable = [k for k, image in zip(preview_keys, images_here) if image is None and k in slot]
        if lacking or unreadable:
            why = (f"no image for prompt(s) {', '.join(map(describe, lacking))}" if lacking
                   else f"unreadable image for prompt(s) {', '.join(map(describe, unreadable))}")
            skipped.append((probe.label, f"{why}; this candidate is left out so that all are scored on the same prompts"))
            continue
        candidate = Candidate(epoch, strength, images_here, [str(slot[k].path) for k in preview_keys])  # type: ignore[arg-type]
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
    return ImageSet(candidates, shared_refs, reference_files, labels, skipped, notes, scheme, [k[1] for k in preview_keys])


def _reference_files(
    path: Path, keys: list[tuple[int, int | None]], regex: re.Pattern | None = None
) -> dict[tuple[int, int | None], Path]:
    """--references: one image for every preview, or a folder with one image per prompt (by index in the name,
    else in name order) or, when the previews carry seeds, one per prompt and seed (named by the --pattern,
    else in name order)."""
    prompt_ids = sorted({k[0] for k in keys})
    if path.is_file():
        return {k: path for k in keys}
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
        return {k: kohya[k[0]] for k in keys}
    if regex is not None and any(k[1] is not None for k in keys):
        named = {}
        for p in files:
            match = regex.match(p.name)
            if match and match.groupdict().get("seed") is not None:
                named[(int(match.groupdict().get("prompt") or 0), int(match.group("seed")))] = p
        if all(k in named for k in keys):
            return {k: named[k] for k in keys}
    if len(files) == 1:
        return {k: files[0] for k in keys}
    if len(files) == len(keys):
        return dict(zip(keys, files))
    if len(files) == len(prompt_ids):
        by_prompt = dict(zip(prompt_ids, files))
        return {k: by_prompt[k[0]] for k in keys}
    per_seed = f" or one per prompt and seed ({len(keys)})" if len(keys) != len(prompt_ids) else ""
    raise PosthocError(
        f"--references {path}: {len(files)} images for {len(prompt_ids)} prompt(s); give one image per prompt "
        f"(taken in name order){per_seed} or a single image for all"
    )

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

    return from_pil(to_pil(image).resize((size[1], size[0]), Image.LANCZOS))
