"""Where each trainer writes its preview samples and LoRA checkpoints, and how to find them (issue 13, "watch any trainer").

The layouts are data: one `TrainerLayout` per trainer in `trainer_entries` (ai-toolkit, OneTrainer, kohya
sd-scripts, musubi-tuner) and `trainer_entries_diffusers` (SimpleTuner, the diffusers example scripts), each
value cited to the code of the trainer that writes it; the types and file checks are in `trainer_files`. This
module holds them under their names and reads folders with them: `detect_layout(folder)` tells the trainer from
a folder's contents, `sample_rounds` groups the finished sample files into rounds (skipping half-written ones),
`checkpoint_for` finds the LoRA file that holds a round's weights. No torch.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Callable

from lora_monitor.trainer_entries import AI_TOOLKIT, KOHYA, MUSUBI, ONETRAINER
from lora_monitor.trainer_entries_diffusers import DIFFUSERS, DIFFUSERS_LORA_FILE, SIMPLETUNER
from lora_monitor.trainer_files import (
    UNITS,
    CheckpointName,
    DisplayCut,
    DisplayError,
    RoundKey,
    SampleName,
    TrainerLayout,
    is_finished,
    is_temporary,
    safetensors_metadata,
)

__all__ = [
    "UNITS", "RoundKey", "SampleName", "CheckpointName", "DisplayCut", "DisplayError", "TrainerLayout", "LAYOUTS",
    "AI_TOOLKIT", "ONETRAINER", "SIMPLETUNER", "MUSUBI", "KOHYA", "DIFFUSERS", "DIFFUSERS_LORA_FILE",
    "is_finished", "safetensors_metadata", "get_layout", "describe_layouts", "detect_layout", "list_samples",
    "sample_rounds", "list_base_files", "base_references", "final_checkpoint", "checkpoint_for",
]

LAYOUTS: dict[str, TrainerLayout] = {layout.name: layout for layout in (AI_TOOLKIT, ONETRAINER, SIMPLETUNER, MUSUBI, KOHYA, DIFFUSERS)}
# checkpoint names alone cannot tell kohya from musubi-tuner (the same names), nor diffusers from an older
# SimpleTuner (checkpoint-<step> folders both): kohya and diffusers are the guesses then
_CHECKPOINT_ORDER = ("ai-toolkit", "onetrainer", "kohya", "musubi-tuner", "diffusers", "simpletuner")


# ------------------------------------------------------------------------------------------ lookup
def get_layout(name: str) -> TrainerLayout:
    """The layout of that name; an unknown name raises ValueError naming the close ones and all known."""
    wanted = name.strip().lower()
    for layout in LAYOUTS.values():
        if wanted in (layout.name, layout.title.lower(), layout.title.split(" ")[0].split("/")[-1].lower()):
            return layout
    close = difflib.get_close_matches(wanted, LAYOUTS, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown trainer layout {name!r}.{hint} Known layouts: {', '.join(LAYOUTS)}.")


def _entries(folder: Path, globs: tuple[str, ...]) -> list[Path]:
    found = {path for pattern in globs for path in folder.glob(pattern)}
    return sorted(path for path in found if not any(map(is_temporary, path.relative_to(folder).parts)))


def _evidence(folder: Path, layout: TrainerLayout) -> tuple[str | None, str | None]:
    """(a sample name or marker only this trainer writes, a checkpoint name it writes), as sentences."""
    for path in _entries(folder, layout.sample_globs):
        if path.is_file() and layout.parse_sample(path) is not None:
            return f"{path.relative_to(folder)} has the name {layout.title} gives its samples", None
    for pattern in layout.markers:
        for path in folder.glob(pattern):
            return f"{path.relative_to(folder)} is a {layout.title} file", None
    for path in _entries(folder, layout.checkpoint_globs):
        if layout.parse_checkpoint(path) is not None:
            return None, f"{path.relative_to(folder)} has the name {layout.title} gives its checkpoints"
    return None, None


def describe_layouts() -> str:
    """One line per known layout: where it keeps samples and checkpoints, with an example name of each."""
    lines = []
    for layout in LAYOUTS.values():
        samples = f"samples {', '.join(layout.sample_globs)} e.g. {layout.sample_example}" if layout.sample_globs else "no samples on disk"
        lines.append(f"  {layout.name} ({layout.title}): {samples}; checkpoints {', '.join(layout.checkpoint_globs)}"
                     f" e.g. {layout.checkpoint_example}")
    return "\n".join(lines)


def detect_layout(folder: str | Path, say: Callable[[str], None] | None = None) -> TrainerLayout:
    """The trainer whose output `folder` is, told by its sample names and marker files first, by checkpoint
    names otherwise; `say` (when given) hears what was detected and why. ValueError when nothing fits."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; point at a trainer's output folder.\nKnown layouts:\n{describe_layouts()}")
    found = {name: _evidence(folder, layout) for name, layout in LAYOUTS.items()}
    strong = [(name, sure) for name, (sure, _) in found.items() if sure]
    weak = [(name, found[name][1]) for name in _CHECKPOINT_ORDER if found[name][1]]
    chosen = strong or weak
    if not chosen:
        raise ValueError(
            f"{folder}: no known trainer layout fits (no sample, marker or checkpoint name of one).\n"
            f"Known layouts:\n{describe_layouts()}"
        )
    name, reason = chosen[0]
    if say is not None:
        others = [other for other, _ in chosen[1:]]
        also = f" (also fits: {', '.join(others)})" if others else ""
        say(f"{folder}: {LAYOUTS[name].title} layout: {reason}{also}.")
    return LAYOUTS[name]


# ------------------------------------------------------------------------------------------ rounds
def list_samples(folder: str | Path, layout: TrainerLayout) -> list[SampleName]:
    """The finished sample files of `folder` under `layout`'s names (temporary, empty and truncated files left out)."""
    folder = Path(folder)
    found = (layout.parse_sample(path) for path in _entries(folder, layout.sample_globs) if path.is_file() and is_finished(path))
    return [sample for sample in found if sample is not None]


def _group(samples: list[SampleName]) -> dict[RoundKey, dict[int | str, list[Path]]]:
    rounds: dict[RoundKey, dict[int | str, list[Path]]] = {}
    for sample in sorted(samples, key=lambda s: (s.key, s.stamp, s.path.name)):
        rounds.setdefault(sample.key, {}).setdefault(sample.prompt, []).append(sample.path)
    return rounds


def sample_rounds(folder: str | Path, layout: TrainerLayout) -> dict[RoundKey, dict[int | str, list[Path]]]:
    """round -> prompt -> its finished sample files, oldest first (a round rendered again after a restart, or
    several images of one prompt, give several); rounds in key order."""
    return _group(list_samples(folder, layout))


def list_base_files(folder: str | Path, layout: TrainerLayout) -> list[SampleName]:
    """The finished base references `layout` keeps apart from the rounds (SimpleTuner's benchmarks/base_model), by
    their names; [] for a trainer that keeps none."""
    folder = Path(folder)
    if layout.parse_base is None:
        return []
    found = (layout.parse_base(path) for path in _entries(folder, layout.base_globs) if path.is_file() and is_finished(path))
    return [reference for reference in found if reference is not None]


def base_references(folder: str | Path, layout: TrainerLayout) -> dict[int | str, list[Path]]:
    """The before-training images by prompt: the base round, or else the layout's separate base references
    (SimpleTuner's benchmarks/base_model); {} when the trainer renders none."""
    folder = Path(folder)
    if layout.base_key is None:
        return {}
    base = sample_rounds(folder, layout).get(layout.base_key)
    if base:
        return base
    return _group(list_base_files(folder, layout)).get(RoundKey("step", 0), {})


def _lora_file(layout: TrainerLayout, path: Path) -> Path:
    return path / layout.checkpoint_file if layout.checkpoint_file else path


def final_checkpoint(folder: str | Path, layout: TrainerLayout) -> Path | None:
    """The completely written file the trainer saves when training ends, or None (not yet, or not in `folder`).
    When several files could be it, the one named like the run's checkpoints wins; None if still unclear."""
    folder = Path(folder)
    candidates = [
        path for path in _entries(folder, layout.final_globs)
        if path.is_file() and layout.parse_checkpoint(path) is None and safetensors_metadata(path) is not None
    ]
    if len(candidates) > 1:
        names = {c.run_name for c in map(layout.parse_checkpoint, _entries(folder, layout.checkpoint_globs)) if c}
        candidates = [path for path in candidates if path.stem in names]
    return candidates[0] if len(candidates) == 1 else None


def checkpoint_for(folder: str | Path, layout: TrainerLayout, key: RoundKey) -> Path | None:
    """The completely written LoRA file holding the weights of round `key`: a checkpoint named with that key
    (the newest if a restart wrote two), else the final file when its metadata says it holds that round; None
    when the trainer kept no such file (see the layout's notes)."""
    folder = Path(folder)
    matches = []
    for path in _entries(folder, layout.checkpoint_globs):
        name = layout.parse_checkpoint(path)
        lora = _lora_file(layout, path)
        if name is not None and name.key == key and lora.is_file() and safetensors_metadata(lora) is not None:
            matches.append(lora)
    if matches:
        return max(matches, key=lambda path: (path.stat().st_mtime, path.name))
    final = final_checkpoint(folder, layout)
    if final is not None and layout.final_rounds is not None and key in layout.final_rounds(safetensors_metadata(final) or {}):
        return final
    return None
