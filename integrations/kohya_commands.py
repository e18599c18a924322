"""The `kohya` (launcher) and `watch` (watcher) subcommands of lora-monitor.

`register(subparsers)` adds both to an argparse subparsers object; each sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lora_monitor.kohya_names import KOHYA_TRAINERS, FolderLockedError
from lora_monitor.policy import get_preset, parse_bound
from lora_monitor.scoring.embeddings import ModelNotAvailableError
from lora_monitor.signal_flags import (
    TRAINING_REFERENCE_METRICS,
    VALIDATION_METRIC,
    add_preset_argument,
    add_signal_arguments,
    signal_settings,
    split_names,
)

KOHYA_HELP = "run kohya-ss sd-scripts' LoRA trainer (SD, SDXL, SD3, FLUX.1, Lumina) with the monitor attached"
KOHYA_DESCRIPTION = """\
Run sd-scripts' LoRA trainer from your checkout with the monitor attached: kohya renders its
samples from your --sample_prompts as usual; each epoch's samples are scored (against base renders
made by kohya with the network multiplier at 0, same prompts and seeds), the best epoch's network
file is copied at once to <output_dir>/best/ (before --save_last_n_epochs can delete it), scores
go to kohya's trackers (--log_with) and <output_dir>/scores.jsonl, and the run stops early, with
exit code 0, when the policy says so. Prompts without --d get a fixed seed (the prompt file
kohya reads is rewritten into <output_dir>/lora_monitor_prompts.txt|.json). With --sample_at_first
kohya's own step-0 samples, rendered with the network off, are the base references. When the last
epoch is the best, best/ ends up holding kohya's final <output_name>.safetensors with its metadata.
An error inside training prints its traceback and exits with code 1.
--preset likeness picks the epoch most like your training images (--refs DIR) among those that still
follow the prompt (adherence) and vary with the seed (diversity) as well as the base model nearly
does; diversity compares the seeds of a prompt: repeat its line in the prompt file with another --d.
--family picks sd-scripts' trainer script: sd train_network.py (the default), sdxl
sdxl_train_network.py, sd3 sd3_train_network.py, flux flux_train_network.py, lumina
lumina_train_network.py; --script names another (its family is known by its name or its trainer
class). Prompt options --l (CFG scale) and --g (FLUX's distilled guidance) reach kohya as written.
Everything after `--` goes to the trainer unchanged."""
KOHYA_EPILOG = """\
example:
  lora-monitor kohya --sd-scripts ~/sd-scripts --metrics brisque ssim --patience 3 -- \\
      --pretrained_model_name_or_path model.safetensors --train_data_dir data --output_dir out \\
      --output_name mylora --network_module networks.lora --max_train_epochs 10 \\
      --save_every_n_epochs 1 --sample_prompts prompts.txt --sample_every_n_epochs 1
  lora-monitor kohya --sd-scripts ~/sd-scripts --family flux --metrics ssim --patience 2 -- \\
      --pretrained_model_name_or_path flux1-dev.safetensors --clip_l clip_l.safetensors \\
      --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --network_module networks.lora_flux \\
      --train_data_dir data --output_dir out --output_name myflux --max_train_epochs 10 \\
      --save_every_n_epochs 1 --sample_prompts prompts.txt   # prompt lines like: a cat --g 3.5 --l 1.0
  lora-monitor kohya --sd-scripts ~/sd-scripts --preset likeness --refs data/10_sks --strip-words sks -- \
      ... --sample_prompts prompts.txt   # lines like: sks toy on a table --d 1 / sks toy on a table --d 2
"""

WATCH_HELP = "follow a trainer's output folder (kohya, ai-toolkit, OneTrainer, musubi-tuner) and score its samples"
WATCH_DESCRIPTION = """\
Follow a running or finished kohya-ss output folder without touching the trainer: score each
epoch's sample PNGs as they appear (<output_dir>/sample/<name>_e<epoch>_<prompt>_...png), keep
the record (previews/, scores.jsonl), copy the best epoch's network file to <output_dir>/best/,
and when the policy says stop, write <output_dir>/STOP and print it (the trainer is never killed:
stop it yourself). Restarting the watcher continues where it was. Base references for SSIM and
for relative bounds (--preset likeness: adherence >= 0.9x, diversity >= 0.8x the base model's) come
from --base, or the run's --sample_at_first samples (epoch 0).
One lora-monitor process scores a folder at a time: a second watcher (or the launcher) on the same
folder exits with code 2 naming the first (<output_dir>/lora_monitor.lock; a lock whose process is
gone is replaced). Network files are copied only from inside the folder (links out of it are refused)
and only when they check out: a .safetensors header that parses, a .ckpt/.pt only with --allow-pickle.
A sample that does not decode is named once, and given up once the run's final file is written;
--once lists what it could not score.
Other trainers: the trainer is detected from the folder (or named with --trainer): ai-toolkit,
OneTrainer and musubi-tuner folders are scored by round (step or epoch, as the trainer names them),
against the trainer's before-training round or --base-samples DIR (one file per prompt index);
the best round's LoRA file is copied to OUTPUT_DIR/best/; the trainer's own validation loss, when it
logs one, is the metric trainer_val_loss (lower is better; --metric trainer_val_loss picks by it);
video samples are scored per frame (mean and _worst) and by temporal_ssim. None of them reads a
stop file: STOP is written and how to stop that trainer by hand is printed. SimpleTuner (its saved
images are labelled side-by-side display images) and the diffusers scripts (no samples on disk) are
not watched."""


def add_monitor_arguments(parser: argparse.ArgumentParser, preview_seed_default: str = "0") -> None:
    group = parser.add_argument_group("monitor")
    add_preset_argument(group)
    group.add_argument("--metrics", nargs="+", default=None,
                       help="scorers to run, space- or comma-separated; the monitored and bounded metrics are added when missing "
                            "(default: the preset's; without --preset brisque ssim)")
    group.add_argument("--metric", default=None,
                       help="the metric that picks the best epoch (default: the preset's; without --preset the first of --metrics)")
    group.add_argument("--patience", type=int, default=None, help="stop after this many scored epochs without improvement (default: never stop)")
    group.add_argument("--min-delta", type=float, default=0.0, help="an improvement must beat the best by more than this (default: 0)")
    group.add_argument("--aggregate", default="mean", help="how per-prompt scores combine: mean, median, min, max (default: mean)")
    group.add_argument("--bound", action="append", default=[], metavar="METRIC=LO:HI",
                       help="an epoch is eligible only if METRIC lies in [LO, HI] (either side may be empty), e.g. ssim=0.3:; "
                            "a side 0.9x is 0.9 times the base model's value, e.g. adherence=0.9x:")
    group.add_argument("--top-k", type=int, default=1, help="also keep the k best epochs under top_k/ (default: 1, best/ only)")
    group.add_argument("--preview-seed", type=int, default=0, help=f"prompt i without a seed gets this + i (default: {preview_seed_default})")
    add_signal_arguments(parser)


def _refuse_validation_loss(what: str, command: str) -> None:
    """The validation loss runs the denoiser on held-out images in the training loop: neither command can."""
    if command == "watch":
        where = ("the watcher only reads the sample images and network files kohya writes and has no model to run. "
                 "For a validation loss give the trainer --validation_split (sd-scripts logs loss/validation/* to its "
                 "trackers), or train with the Python API: LoraMonitor(preset='loss', validation=...) in your own loop")
    else:
        where = ("the launcher only scores the samples kohya renders. kohya logs a validation loss of its own: give the "
                 "trainer --validation_split 0.1 (with --log_with, its trackers get loss/validation/epoch_average); the "
                 "monitor's in-loop val_loss (and the loss preset's DVAR stop) needs the Python API: "
                 "LoraMonitor(preset='loss', validation=...) in your own training loop")
    raise ValueError(f"{what}, which runs the model on held-out images during training: {where}. Here use --preset quality or --preset likeness")


def monitor_options(args: argparse.Namespace) -> dict[str, Any]:
    """LoraMonitor keyword arguments from the monitor and signal options; --refs and the validation loss are
    checked here, the rest by LoraMonitor itself. Without --preset: quality's settings, or the first of --metrics
    as the monitored metric. Explicit --metrics gain the monitored and the bounded metrics."""
    command = getattr(args, "monitor_command", "kohya")
    preset = get_preset(args.preset or "quality")
    explicit = split_names(args.metrics)
    bounds = dict(parse_bound(text) for text in args.bound)
    monitor = args.metric or (explicit[0] if explicit and not args.preset else preset.monitor)
    if preset.name == "loss" or VALIDATION_METRIC in (monitor, *explicit, *bounds):
        what = (f"--preset loss picks the epoch by the deterministic validation loss ({VALIDATION_METRIC})" if preset.name == "loss"
                else f"the metric {VALIDATION_METRIC!r} is the deterministic validation loss")
        _refuse_validation_loss(what, command)
    metrics = list(explicit or preset.metrics)
    if monitor not in metrics:
        metrics.insert(0, monitor)
    all_bounds = {**(preset.bounds if monitor == preset.monitor else {}), **bounds}
    metrics += [name for name in all_bounds if name not in metrics]
    return dict(
        preset=preset.name,
        metrics=tuple(metrics),
        monitor=monitor,
        patience=args.patience,
        min_delta=args.min_delta,
        aggregate=args.aggregate,
        bounds=bounds or None,
        top_k=args.top_k,
        **signal_settings(args, metrics, base_flag="--base" if command == "watch" else None),
    )


def _unused_refs_note(args: argparse.Namespace, options: dict[str, Any]) -> str | None:
    if args.refs is not None and not any(name in TRAINING_REFERENCE_METRICS for name in options["metrics"]):
        return f"note: --refs is unused: none of {', '.join(TRAINING_REFERENCE_METRICS)} is among the metrics"
    return None


def register(subparsers) -> None:
    """Add the `kohya` and `watch` subcommands to an argparse subparsers object."""
    kohya = subparsers.add_parser("kohya", help=KOHYA_HELP, description=KOHYA_DESCRIPTION, epilog=KOHYA_EPILOG,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    kohya.add_argument("--sd-scripts", required=True, metavar="PATH", help="your kohya-ss/sd-scripts checkout")
    which = kohya.add_mutually_exclusive_group()
    which.add_argument("--family", choices=tuple(KOHYA_TRAINERS), default=None,
                       help="the model family, which picks the trainer script: "
                            + ", ".join(f"{t.family} {t.script}" for t in KOHYA_TRAINERS.values()) + " (default: sd, or --script's)")
    which.add_argument("--sdxl", action="store_true", help="SDXL: same as --family sdxl")
    kohya.add_argument("--script", default=None,
                       help="a trainer script of the checkout, overriding the family's (its family is known by its name or its trainer class)")
    add_monitor_arguments(kohya, preview_seed_default="0; 1 for lumina, whose sampler refuses seed 0")
    kohya.set_defaults(preview_seed=None, monitor_command="kohya")
    kohya.add_argument("trainer_args", nargs=argparse.REMAINDER, metavar="-- TRAINER_ARGS", help="arguments of the trainer script")
    kohya.set_defaults(func=run_kohya)

    watch = subparsers.add_parser("watch", help=WATCH_HELP, description=WATCH_DESCRIPTION,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    watch.add_argument("output_dir", metavar="OUTPUT_DIR", help="the run's --output_dir")
    watch.add_argument("--prompts", default=None, help="the run's --sample_prompts file (default: OUTPUT_DIR/sample/prompt.txt|.toml|.json, as the GUI writes it)")
    watch.add_argument("--output-name", default=None, help="the run's --output_name (default: read from the sample names)")
    watch.add_argument("--base", "--base-samples", dest="base", default=None, metavar="DIR",
                       help="base-model renders of the prompts (kohya-named or NN_*.png; other trainers: one file per prompt index, "
                            "in order by name); default: the run's before-training samples (epoch 0, step 0)")
    watch.add_argument("--trainer", default=None, metavar="NAME",
                       help="the trainer whose folder it is (default: detected from the folder): " + ", ".join(_layout_names()))
    watch.add_argument("--logging-dir", default=None, metavar="DIR",
                       help="where the trainer writes its TensorBoard logs, for its validation loss (default: the trainer's own place)")
    watch.add_argument("--interval", type=float, default=10.0, help="seconds between looks at the folder (default: 10)")
    watch.add_argument("--once", action="store_true", help="score what is there now, list what could not be scored, and exit")
    watch.add_argument("--allow-pickle", action="store_true",
                       help="copy .ckpt/.pt network files into best/ (checked with torch.load(weights_only=True)); "
                            "without it only .safetensors files are copied, as unpickling can run arbitrary code")
    watch.add_argument("--report-to", choices=["none", "wandb"], default="none", help="also log to W&B (default: none)")
    watch.add_argument("--wandb-project", default=None, help="W&B project for --report-to wandb")
    add_monitor_arguments(watch)
    watch.set_defaults(func=run_watch, monitor_command="watch")


def run_kohya(args: argparse.Namespace) -> int:
    from lora_monitor.integrations.kohya import TrainingFailed, launch

    trainer_args = list(args.trainer_args)
    if trainer_args[:1] == ["--"]:
        trainer_args = trainer_args[1:]
    if not trainer_args:
        raise ValueError("no trainer arguments: put them after `--`, e.g. lora-monitor kohya --sd-scripts PATH -- --output_dir out ...")
    family = "sdxl" if args.sdxl else args.family
    options = monitor_options(args)
    note = _unused_refs_note(args, options)
    if note:
        print(f"lora-monitor: {note}")
    try:
        return launch(args.sd_scripts, trainer_args, script=args.script, family=family, monitor_options=options,
                      preview_seed=args.preview_seed)
    except (ModelNotAvailableError, TrainingFailed) as error:  # a model this machine lacks; an error inside training (traceback shown)
        print(f"lora-monitor kohya: error: {error}", file=sys.stderr)
        return 1
    except FolderLockedError as error:
        print(f"lora-monitor kohya: error: {error}", file=sys.stderr)
        return 2


def _layout_names() -> list[str]:
    from lora_monitor.trainer_layouts import LAYOUTS

    return list(LAYOUTS)


def _watch_layout(args: argparse.Namespace):
    """The trainer layout of the watched folder: --trainer, else detected (and said); a folder nothing fits yet is
    kohya's when it has kohya's sample/ folder (the kohya_ss GUI writes sample/prompt.txt before training).
    ValueError (listing the known layouts) when neither tells."""
    from lora_monitor import trainer_layouts

    if args.trainer:
        layout = trainer_layouts.get_layout(args.trainer)
        print(f"lora-monitor watch: {args.output_dir}: {layout.title} layout (--trainer {args.trainer})")
        return layout
    try:
        return trainer_layouts.detect_layout(args.output_dir, say=lambda text: print(f"lora-monitor watch: detected {text}"))
    except ValueError:
        folder = Path(args.output_dir)
        if (folder / "sample").is_dir() or args.output_name is not None or not folder.is_dir():
            return trainer_layouts.get_layout("kohya")  # today's kohya path (it waits for samples, or names the missing folder)
        raise


def run_watch(args: argparse.Namespace) -> int:
    from lora_monitor.integrations.kohya_watch import KohyaWatcher

    try:
        layout = _watch_layout(args)
    except ValueError as error:
        print(f"lora-monitor watch: error: {error}\nName the trainer with --trainer NAME if it is one of these.", file=sys.stderr)
        return 2
    if layout.name != "kohya":
        return _run_trainer_watch(args, layout)
    options = monitor_options(args)
    note = _unused_refs_note(args, options)
    if note:
        print(f"lora-monitor watch: {note}")
    listeners = []
    if args.report_to == "wandb":
        from lora_monitor.integrations.trackers import listeners_for

        listeners = listeners_for("wandb", project=args.wandb_project)
    try:
        watcher = KohyaWatcher(
            args.output_dir,
            prompts=args.prompts,
            output_name=args.output_name,
            base=args.base,
            monitor_options={**options, "listeners": listeners},
            preview_seed=args.preview_seed,
            allow_pickle=args.allow_pickle,
        )
    except ModelNotAvailableError as error:  # a CLIP/DINOv2 model this machine does not have: as the post-hoc commands
        print(f"lora-monitor watch: error: {error}", file=sys.stderr)
        return 1
    except FolderLockedError as error:  # another watcher (or the launcher) scores this folder
        print(f"lora-monitor watch: error: {error}", file=sys.stderr)
        return 2
    return watcher.run(interval=args.interval, once=args.once)


def _run_trainer_watch(args: argparse.Namespace, layout) -> int:
    """`watch` for the trainers of integrations/trainer_watch.py (all but kohya)."""
    from lora_monitor.integrations.trainer_watch import TrainerWatcher

    if args.output_name is not None:
        print(f"lora-monitor watch: note: --output-name is kohya's; {layout.title} folders are read by their own names")
    options = monitor_options(args)
    listeners = []
    if args.report_to == "wandb":
        from lora_monitor.integrations.trackers import listeners_for

        listeners = listeners_for("wandb", project=args.wandb_project)
    try:
        watcher = TrainerWatcher(args.output_dir, layout, prompts=args.prompts, base_samples=args.base,
                                 monitor_options={**options, "listeners": listeners}, logging_dir=args.logging_dir,
                                 allow_pickle=args.allow_pickle)
    except ModelNotAvailableError as error:
        print(f"lora-monitor watch: error: {error}", file=sys.stderr)
        return 1
    except FolderLockedError as error:
        print(f"lora-monitor watch: error: {error}", file=sys.stderr)
        return 2
    return watcher.run(interval=args.interval, once=args.once)
