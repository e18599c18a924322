"""kohya-ss sd-scripts' file contract: how it names epoch samples and network files.

Shared by the post-hoc commands and the kohya launcher and watcher; names only, no sd-scripts code.
Samples go to {output_dir}/sample/{output_name}_e{epoch:06d}_{i:02d}_{YYYYmmddHHMMSS}_{seed}.png;
an epoch's network is {output_name}-{epoch:06d}.safetensors, the last one {output_name}.safetensors.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

#: An epoch sample: {output_name}_e{epoch:06d}_{prompt index:02d}_{YYYYmmddHHMMSS}_{seed}.png (seed optional).
SAMPLE_NAME = re.compile(
    r"^(?:(?P<name>.+)_)?e(?P<epoch>\d{6})_(?P<prompt>\d{2,})_(?P<timestamp>\d{14})(?:_(?P<seed>\d+))?\.png$"
)
#: An epoch's network file: {output_name}-{epoch:06d}.safetensors.
CHECKPOINT_NAME = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6})\.safetensors$")
_ANY = object()


@dataclass(frozen=True)
class SampleFile:
    """One sample PNG of an epoch, as kohya names it."""

    path: Path
    output_name: str | None
    epoch: int
    index: int
    stamp: str
    seed: int | None


def parse_sample_name(path: str | os.PathLike) -> SampleFile | None:
    """The parts of a kohya epoch-sample file name; None for any other file (step samples included)."""
    path = Path(path)
    match = SAMPLE_NAME.match(path.name)
    if match is None:
        return None
    seed = match["seed"]
    return SampleFile(path, match["name"], int(match["epoch"]), int(match["prompt"]), match["timestamp"], None if seed is None else int(seed))


def list_samples(folder: str | os.PathLike, output_name: Any = _ANY) -> list[SampleFile]:
    """The epoch samples in `folder` (kohya's <output_dir>/sample), optionally of one output name only."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [parse_sample_name(path) for path in folder.iterdir() if path.suffix == ".png"]
    return [s for s in found if s is not None and (output_name is _ANY or s.output_name == output_name)]


def group_by_epoch(samples: Iterable[SampleFile]) -> dict[int, dict[int, SampleFile]]:
    """epoch -> prompt index -> sample; when a run was restarted the newest file of each pair wins."""
    groups: dict[int, dict[int, SampleFile]] = {}
    for sample in sorted(samples, key=lambda s: (s.stamp, s.path.name)):
        groups.setdefault(sample.epoch, {})[sample.index] = sample
    return groups


def epoch_checkpoint_name(output_name: str | None, epoch: int, suffix: str = ".safetensors") -> str:
    """kohya's name for an epoch's network file (output name "epoch" when none is given)."""
    return f"{output_name or 'epoch'}-{epoch:06d}{suffix}"


def last_checkpoint_name(output_name: str | None, suffix: str = ".safetensors") -> str:
    """kohya's name for the network saved after the last epoch (output name "last" when none is given)."""
    return f"{output_name or 'last'}{suffix}"
