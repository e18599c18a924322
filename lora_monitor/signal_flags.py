"""The flags of the policy presets and the embedding signals, shared by every command that scores previews
(`epochs`, `strength`, `grid`, `kohya`, `watch`): each is defined here once, with one spelling and one help text.

`add_preset_argument(group)` adds --preset; `add_signal_arguments(parser)` adds the group of --refs,
--clip-model, --dino-model and --strip-words; `signal_settings(args, metrics)` checks them (before anything
is rendered or trained) and returns them as LoraMonitor's keyword arguments. `split_names` reads a list of
metric names given space- or comma-separated.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable

from lora_monitor.policy import PRESETS, VALIDATION_METRIC
from lora_monitor.scoring.embeddings import DEFAULT_CLIP, DEFAULT_DINO
from lora_monitor.scoring.signals import REFERENCE_SUFFIXES

__all__ = [
    "TRAINING_REFERENCE_METRICS",
    "VALIDATION_METRIC",
    "add_preset_argument",
    "add_signal_arguments",
    "signal_settings",
    "split_names",
]

#: The metrics that compare previews with the training images given by --refs.
TRAINING_REFERENCE_METRICS = ("likeness", "likeness_clip", "memorization")

PRESET_HELP = (
    "metrics, monitored metric and bounds by name: quality (lowest BRISQUE), likeness (highest likeness among epochs "
    "whose adherence is at least 0.9x and diversity at least 0.8x the base model's; needs --refs and several seeds "
    "a prompt); loss (the validation loss) needs the model and held-out images in a training loop and is refused here "
    "(default: quality's settings)"
)


def add_preset_argument(group: argparse._ActionsContainer) -> None:
    """--preset, into the policy group of a command."""
    group.add_argument("--preset", choices=list(PRESETS), default=None, help=PRESET_HELP)


def add_signal_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The group of the embedding signals' flags: --refs, --clip-model, --dino-model, --strip-words."""
    signals = parser.add_argument_group("embedding signals (likeness, likeness_clip, memorization, adherence, diversity)")
    signals.add_argument(
        "--refs", metavar="DIR",
        help="folder of TRAINING (reference) images that likeness, likeness_clip and memorization compare every preview "
             "with; not the base model's images",
    )
    signals.add_argument(
        "--clip-model", metavar="NAME_OR_DIR",
        help=f"CLIP model for adherence and likeness_clip: a cached hub name or a folder (default: {DEFAULT_CLIP})",
    )
    signals.add_argument(
        "--dino-model", metavar="NAME_OR_DIR",
        help=f"DINOv2 model for likeness, memorization and diversity: a cached hub name or a folder (default: {DEFAULT_DINO})",
    )
    signals.add_argument(
        "--strip-words", action="append", default=[], metavar="WORD[,WORD]",
        help="trigger words removed from the prompts before CLIP-T (adherence), e.g. sks: made-up tokens mean nothing "
             "to CLIP (repeatable)",
    )
    return signals


def split_names(items: str | Iterable[str] | None) -> list[str]:
    """Names given space- or comma-separated, in one string or several ('brisque,ssim', ['brisque', 'ssim']);
    duplicates dropped, order kept."""
    if items is None:
        return []
    if isinstance(items, str):
        items = [items]
    return list(dict.fromkeys(name for item in items for name in item.replace(",", " ").split()))


def signal_settings(args: argparse.Namespace, metrics: Iterable[str], *, base_flag: str | None = None) -> dict[str, Any]:
    """LoraMonitor's keyword arguments from the signal flags (references, clip_model, dino_model, strip_words;
    the models only when given), with --refs checked now: a missing or empty folder, or a metric in `metrics`
    that needs the training images without --refs, is a ValueError naming --refs. `base_flag`: the command's
    flag for the base model's images, named in that message so that the two are not confused."""
    wanting = [name for name in metrics if name in TRAINING_REFERENCE_METRICS]
    if args.refs is not None:
        folder = Path(args.refs)
        if not folder.is_dir():
            raise ValueError(
                f"--refs {args.refs}: no such folder; --refs is the folder of training images that "
                f"{', '.join(TRAINING_REFERENCE_METRICS)} compare with"
            )
        if not any(path.is_file() and path.suffix.lower() in REFERENCE_SUFFIXES for path in folder.iterdir()):
            raise ValueError(f"--refs {args.refs}: the folder holds no images ({', '.join(REFERENCE_SUFFIXES)})")
    elif wanting:
        raise ValueError(
            f"the metric(s) {', '.join(wanting)} compare every preview with the training images: pass --refs DIR, "
            "the folder of training (reference) images"
            + (f" ({base_flag} is the base model's images, which they do not use)" if base_flag else "")
        )
    settings: dict[str, Any] = {"references": args.refs, "clip_model": args.clip_model, "dino_model": args.dino_model}
    settings = {name: value for name, value in settings.items() if value is not None}
    settings["strip_words"] = tuple(dict.fromkeys(word.strip() for item in args.strip_words for word in item.split(",") if word.strip()))
    return settings
