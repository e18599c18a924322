"""The flags shared by the commands, each defined here once, with one spelling and one help text.

- `add_policy_arguments(group, stopping=...)`: --preset, --metric, --metrics, --bound, --min-delta, --aggregate
  (and --patience, --top-k for the commands that follow a training run); `resolve_policy(args, command)` turns
  them into the preset, metrics, monitored metric and bounds by one rule, the same in every command.
- `add_signal_arguments(parser)`: --refs, --clip-model, --dino-model, --strip-words; `signal_settings(args,
  metrics)` checks them (before anything is rendered or trained) and returns LoraMonitor's keyword arguments.
- `add_device_argument(group, default)` and `check_device(name)`: --device, checked before anything loads.
- `split_names` reads metric names given comma- or space-separated (`--metrics brisque,ssim` or `brisque ssim`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from lora_monitor.policy import PRESETS, VALIDATION_METRIC, PolicyPreset, get_preset, parse_bound
from lora_monitor.scoring.embeddings import DEFAULT_CLIP, DEFAULT_DINO
from lora_monitor.scoring.signals import REFERENCE_SUFFIXES

__all__ = [
    "TRAINING_REFERENCE_METRICS",
    "VALIDATION_METRIC",
    "PolicyChoice",
    "add_device_argument",
    "add_policy_arguments",
    "add_signal_arguments",
    "available_devices",
    "check_device",
    "resolve_policy",
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

#: Where each command sends a user who asks it for the validation loss, which none of them can compute.
VALIDATION_LOSS_ELSEWHERE = {
    "kohya": "the launcher only scores the samples kohya renders. kohya logs a validation loss of its own: give the "
             "trainer --validation_split 0.1 (with --log_with, its trackers get loss/validation/epoch_average); the "
             "monitor's in-loop val_loss (and the loss preset's DVAR stop) needs the Python API: "
             "LoraMonitor(preset='loss', validation=...) in your own training loop",
    "watch": "the watcher only reads the sample images, logs and network files the trainer writes and has no model "
             "to run. A trainer's own validation loss is the metric trainer_val_loss (kohya: give it --validation_split; "
             "--metric trainer_val_loss picks by it), or train with the Python API: "
             "LoraMonitor(preset='loss', validation=...) in your own loop",
    "posthoc": "the post-hoc commands score images and cannot compute it. Use the in-training monitor for it "
               "(LoraMonitor(preset='loss', validation=...))",
}


def add_policy_arguments(group: argparse._ActionsContainer, *, stopping: bool) -> None:
    """The policy's flags, into a command's group. `stopping`: the command follows a training run, so it also
    takes --patience and --top-k."""
    group.add_argument("--preset", choices=list(PRESETS), default=None, help=PRESET_HELP)
    group.add_argument(
        "--metrics", nargs="+", default=None, metavar="NAME",
        help="metrics to compute, comma- or space-separated (brisque,ssim or brisque ssim); the monitored and bounded "
             "metrics are added when missing (default: the preset's; quality's are brisque,ssim)",
    )
    group.add_argument(
        "--metric", default=None,
        help="the metric that picks the best (default: the preset's; without --preset the first of --metrics)",
    )
    group.add_argument(
        "--bound", action="append", default=[], metavar="METRIC=LO:HI",
        help="eligible only if METRIC's aggregate lies in [LO, HI] (either side may be empty, e.g. ssim=0.3:); a side "
             "0.9x is 0.9 times the base model's value (e.g. adherence=0.9x:)",
    )
    group.add_argument("--min-delta", type=float, default=0.0, help="an improvement must beat the best by more than this (default: 0)")
    group.add_argument("--aggregate", default="mean", choices=["mean", "median", "min", "max"],
                       help="how the per-prompt scores combine (default: mean)")
    if stopping:
        group.add_argument("--patience", type=int, default=None,
                           help="stop after this many scored rounds without improvement (default: never stop)")
        group.add_argument("--top-k", type=int, default=1, help="also keep the k best under top_k/ (default: 1, best/ only)")


@dataclass
class PolicyChoice:
    """What the policy flags resolve to. `preset` is the named preset or quality's; `named` says whether
    --preset was given; `bounds` are the explicit --bound ones, `all_bounds` add the preset's when its
    monitored metric is kept."""

    preset: PolicyPreset
    named: bool
    metrics: list[str]
    metric: str
    bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    all_bounds: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)


def resolve_policy(args: argparse.Namespace, command: str) -> PolicyChoice:
    """The one rule of every command: the preset (quality's when none is named) fills in what is not given; the
    monitored metric is --metric, else the first of --metrics when no --preset is named, else the preset's; the
    metrics are --metrics (or the preset's) plus the monitored and bounded metrics. The validation loss is a
    ValueError saying where it can be had (`command`: a key of VALIDATION_LOSS_ELSEWHERE)."""
    preset = get_preset(args.preset or "quality")
    explicit = split_names(args.metrics)
    bounds = dict(parse_bound(text) for text in args.bound)
    metric = args.metric or (explicit[0] if explicit and not args.preset else preset.metric)
    all_bounds = {**(preset.bounds if metric == preset.metric else {}), **bounds}
    if preset.name == "loss" or VALIDATION_METRIC in (metric, *explicit, *bounds):
        what = (f"--preset loss picks by the deterministic validation loss ({VALIDATION_METRIC})" if preset.name == "loss"
                else f"the metric {VALIDATION_METRIC!r} is the deterministic validation loss")
        raise ValueError(
            f"{what}, which runs the model on held-out images during training: {VALIDATION_LOSS_ELSEWHERE[command]}. "
            "Here use --preset quality or --preset likeness"
        )
    metrics = list(explicit or preset.metrics)
    if metric not in metrics:
        metrics.insert(0, metric)
    metrics += [name for name in all_bounds if name not in metrics]
    return PolicyChoice(preset, args.preset is not None, metrics, metric, bounds, all_bounds)


def add_device_argument(group: argparse._ActionsContainer, default: str | None, default_text: str) -> None:
    """--device; checked with check_device when the command runs, before anything is loaded."""
    group.add_argument("--device", default=default,
                       help=f"torch device: cpu, cuda[:N] or mps where this machine has it (default: {default_text})")


def available_devices() -> list[str]:
    """The torch device types this machine can use: cpu, and cuda / mps where available."""
    import torch

    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(name: str, option: str = "--device") -> str:
    """`name` if this machine has that torch device, else a ValueError naming it and what is available."""
    import torch

    available = available_devices()
    listed = ", ".join(available)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {name!r}: not a torch device; available here: {listed}") from None
    if device.type not in available:
        if device.type in ("cuda", "mps"):
            reason = f"{device.type.upper() if device.type == 'cuda' else 'MPS'} is not available on this machine"
        else:
            reason = "not a device lora-monitor can use"
        raise ValueError(f"{option} {name!r}: {reason}; available here: {listed}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"{option} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}); available here: {listed}"
        )
    return name


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


def add_monitor_arguments(parser: argparse.ArgumentParser, preview_seed_default: str = "0") -> None:
    """The flags of the commands that follow a training run (`kohya`, `watch`): the policy's, --preview-seed and
    the embedding signals'."""
    group = parser.add_argument_group("monitor")
    add_policy_arguments(group, stopping=True)
    group.add_argument("--preview-seed", type=int, default=0, help=f"prompt i without a seed gets this + i (default: {preview_seed_default})")
    add_signal_arguments(parser)


def monitor_options(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """LoraMonitor's keyword arguments from add_monitor_arguments' flags, resolved by resolve_policy; --refs is
    checked here, the rest by LoraMonitor itself."""
    choice = resolve_policy(args, command)
    return dict(
        preset=choice.preset.name,
        metrics=tuple(choice.metrics),
        metric=choice.metric,
        patience=args.patience,
        min_delta=args.min_delta,
        aggregate=args.aggregate,
        bounds=choice.bounds or None,
        top_k=args.top_k,
        **signal_settings(args, choice.metrics, base_flag="--base" if command == "watch" else None),
    )


def unused_refs_note(args: argparse.Namespace, metrics: Iterable[str]) -> str | None:
    """A note when --refs is given but no metric reads the training images."""
    if args.refs is not None and not any(name in TRAINING_REFERENCE_METRICS for name in metrics):
        return f"--refs is unused: none of {', '.join(TRAINING_REFERENCE_METRICS)} is among the metrics"
    return None
