"""kohya's samples as the launcher and the watcher read them: where they are, when kohya renders them,
the images of an epoch in prompt order, and the sentences printed about each evaluation.

kohya's sampler (library/train_util.py, sample_images_common and sample_image_inference; the same names for
every family) writes <output_dir>/sample/<output_name>_e<epoch:06d>_<prompt:02d>_<YYYYmmddHHMMSS>[_<seed>].png;
lora_monitor.kohya_names parses those names.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from lora_monitor.kohya_names import SampleFile
from lora_monitor.monitor import EpochReport
from lora_monitor.policy import BestEpochPolicy
from lora_monitor.record import read_image

SAMPLE_DIR = "sample"
#: The launcher's base renders (network multiplier 0) go to <output_dir>/BASE_DIR/sample/ under kohya's names.
BASE_DIR = "lora_monitor_base"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")


class UnreadableSampleError(ValueError):
    """A sample image that does not decode, whatever the decoder raised (OSError, ValueError, SyntaxError,
    PIL's DecompressionBombError, ...); `path` is the file and `why` the decoder's error."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} does not decode: {why}")
        self.path = path
        self.why = why


def read_sample(path: str | os.PathLike) -> torch.Tensor:
    """One sample image as (3, H, W) floats in [0, 1]; any decoding error as an UnreadableSampleError naming the file."""
    try:
        return read_image(path)
    except Exception as error:  # PIL raises many kinds for a damaged or hostile file: each is "unreadable"
        raise UnreadableSampleError(Path(path), f"{type(error).__name__}: {error}") from error


def images_in_order(by_index: Mapping[int, SampleFile], count: int, where: str) -> list[torch.Tensor]:
    """The images of prompts 0..count-1; a missing or extra index, or a file that does not decode, is an error naming `where`."""
    indices = sorted(by_index)
    if indices != list(range(count)):
        raise ValueError(f"{where}: found samples for prompt indices {indices}, expected 0..{count - 1} (one per prompt of the preview file)")
    try:
        return [read_sample(by_index[i].path) for i in indices]
    except UnreadableSampleError as error:
        raise UnreadableSampleError(error.path, f"{error.why} ({where})") from error.__cause__


def sample_point(args: Any, epoch: int | None, step: int) -> bool:
    """Whether kohya's sampler renders at this call of sample_images (library/train_util.py, sample_images_common):
    step 0 only with --sample_at_first; otherwise epoch ends every --sample_every_n_epochs epochs, or, without it,
    steps every --sample_every_n_steps steps inside an epoch."""
    if step == 0:
        return bool(getattr(args, "sample_at_first", False))
    every_epochs, every_steps = getattr(args, "sample_every_n_epochs", None), getattr(args, "sample_every_n_steps", None)
    if every_epochs is not None:
        return epoch is not None and epoch % every_epochs == 0
    return every_steps is not None and epoch is None and step % every_steps == 0


def decision_text(report: EpochReport, policy: BestEpochPolicy, stopped_before: int | None) -> str:
    """The policy's sentence for an evaluation; once the policy has stopped (`stopped_before`: the epoch it stopped
    at, before this evaluation) a sentence of its own, as the wait count then goes past the patience."""
    if stopped_before is None:
        return report.decision.reason
    if report.is_best:
        return (f"a new best after the stop at epoch {stopped_before} (the trainer went on); the policy stays stopped, "
                f"best/ now holds epoch {report.epoch}")
    best = (f"the best, epoch {policy.best_epoch} ({policy.metric} {policy.best_value:.4f})" if policy.best_epoch is not None
            else "no eligible epoch yet")
    return f"not better than {best}; already stopped at epoch {stopped_before} (the trainer went on past the stop)"


def describe_base(policy) -> str:
    """The base model's values (LoRA off) and the bounds they resolve, for one line after the first
    evaluation: 'adherence 0.2512, diversity 0.3301, ...; bounds: adherence >= 0.9x base (0.2512) = 0.226'."""
    values = ", ".join(f"{name} {value:.4f}" for name, value in (policy.base or {}).items())
    bounds = []
    for name, (low, high) in policy.bounds.items():
        try:
            if low is not None:
                bounds.append(f"{name} >= {policy.limit(name, low)[1]}")
            if high is not None:
                bounds.append(f"{name} <= {policy.limit(name, high)[1]}")
        except ValueError:  # a relative bound whose base value is unknown: the epoch lines say so
            continue
    return values + (f"; bounds: {', '.join(bounds)}" if bounds else "")

