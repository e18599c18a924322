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


# ------------------------------------------------------------------------------------ the trainers
@dataclass(frozen=True)
class KohyaTrainer:
    """One of sd-scripts' LoRA trainer scripts: its file, its NetworkTrainer subclass and its sampler's defaults.

    `family` is the launcher's --family name; `model_family` the lora_monitor.families name of the
    same architecture. `sample_defaults` are what kohya's sampler uses for a prompt that does not set
    them (PreviewSpec.load keywords), read from the sampler named by `sampler`. `since` is the first
    sd-scripts release holding the script. `min_seed` is the smallest seed kohya's sampler accepts.
    """

    family: str
    script: str
    trainer_class: str
    model_family: str
    sampler: str
    sample_defaults: dict[str, Any]
    since: str
    min_seed: int = 0


#: The trainers the launcher knows, by --family name. All subclass train_network.NetworkTrainer,
#: keep its training loop (so its checkpoint names) and override
#: sample_images(self, accelerator, args, epoch, global_step, device, vae|ae, tokenizer(s), text_encoder, unet|mmdit|flux|lumina).
KOHYA_TRAINERS: dict[str, KohyaTrainer] = {
    trainer.family: trainer
    for trainer in (
        KohyaTrainer("sd", "train_network.py", "NetworkTrainer", "sd", "library/train_util.py sample_image_inference",
                     dict(steps=30, guidance_scale=7.5, width=512, height=512), "v0.2.0"),
        KohyaTrainer("sdxl", "sdxl_train_network.py", "SdxlNetworkTrainer", "sdxl", "library/train_util.py sample_image_inference",
                     dict(steps=30, guidance_scale=7.5, width=512, height=512), "v0.7.0"),
        KohyaTrainer("sd3", "sd3_train_network.py", "Sd3NetworkTrainer", "sd3", "library/sd3_train_utils.py sample_image_inference",
                     dict(steps=30, guidance_scale=7.5, width=512, height=512), "v0.10.0"),
        # FLUX.1: --l is a true CFG scale (1.0: none), --g the distilled guidance (3.5 when not given)
        KohyaTrainer("flux", "flux_train_network.py", "FluxNetworkTrainer", "flux", "library/flux_train_utils.py sample_image_inference",
                     dict(steps=20, guidance_scale=1.0, width=512, height=512), "v0.10.0"),
        # Lumina Image 2.0: its sampler asserts seed > 0
        KohyaTrainer("lumina", "lumina_train_network.py", "LuminaNetworkTrainer", "lumina2", "library/lumina_train_util.py sample_image_inference",
                     dict(steps=36, guidance_scale=3.5, width=1024, height=1024), "v0.10.0", min_seed=1),
    )
}


def family_of_script(script: str | os.PathLike) -> str | None:
    """The --family whose trainer script has this file name; None for any other script."""
    name = Path(script).name
    return next((t.family for t in KOHYA_TRAINERS.values() if t.script == name), None)


def family_of_trainer_class(cls: type) -> str | None:
    """The --family of a trainer class: that of the nearest class in its MRO named like one of KOHYA_TRAINERS'.
    NetworkTrainer itself counts only for itself: every trainer derives from it (sd-scripts' other
    trainers, e.g. HunyuanImageNetworkTrainer or AnimaNetworkTrainer, are of no family here)."""
    by_class = {t.trainer_class: t.family for t in KOHYA_TRAINERS.values()}
    base = KOHYA_TRAINERS["sd"].trainer_class
    if cls.__name__ == base:
        return "sd"
    return next((by_class[c.__name__] for c in cls.__mro__ if c.__name__ in by_class and c.__name__ != base), None)
