"""`lora-monitor watch`: follow a trainer's output folder (kohya, ai-toolkit, OneTrainer, musubi-tuner,
SimpleTuner) and score its samples.

`register(subparsers)` adds the command to an argparse subparsers object; it sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lora_monitor.cli.flags import add_monitor_arguments, monitor_options, unused_refs_note

WATCH_HELP = "score the samples in a trainer's output folder as they appear"
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
The trainer's own validation loss, where it logs one (kohya: --validation_split, read from its
TensorBoard logs below --logging-dir or OUTPUT_DIR), is the metric trainer_val_loss beside the image
scores (lower is better; --metric trainer_val_loss picks by it).
Other trainers: the trainer is detected from the folder (or named with --trainer): ai-toolkit,
OneTrainer, musubi-tuner and SimpleTuner (run with --disable_benchmark: each sample is cut out of the
labelled image SimpleTuner saves) folders are scored by round (step or epoch, as the trainer names
them), against the trainer's before-training round or --base-samples DIR (one file per prompt index);
the best round's LoRA file is copied to OUTPUT_DIR/best/; video samples are scored per frame (mean and
_worst) and by temporal_ssim. None of them reads a stop file: STOP is written and how to stop that
trainer by hand is printed. The diffusers example scripts write no samples to disk and are not
watched: put a LoraMonitor into the script (README: "Where the lines go")."""


WATCH_EPILOG = """\
examples:
  lora-monitor watch out/ --patience 3 --interval 5       # kohya --output_dir out: follow it until its final file is written
  lora-monitor watch out/ --once                          # score what is there now, list what is missing, exit
  lora-monitor watch output/my_lora/ --once               # an ai-toolkit run: detected from its samples/ folder
  lora-monitor watch output/my_lora/ --trainer ai-toolkit --metric ssim --base-samples base/ --once
"""


def register(subparsers) -> None:
    """Add the `watch` subcommand to an argparse subparsers object."""
    watch = subparsers.add_parser("watch", help=WATCH_HELP, description=WATCH_DESCRIPTION, epilog=WATCH_EPILOG,
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
                       help="where the trainer writes its logs, for its validation loss: kohya's --logging_dir (default: the "
                            "trainer's own place; kohya: below OUTPUT_DIR)")
    watch.add_argument("--interval", type=float, default=10.0, help="seconds between looks at the folder (default: 10)")
    watch.add_argument("--once", action="store_true", help="score what is there now, list what could not be scored, and exit")
    watch.add_argument("--allow-pickle", action="store_true",
                       help="copy .ckpt/.pt network files into best/ (checked with torch.load(weights_only=True)); "
                            "without it only .safetensors files are copied, as unpickling can run arbitrary code")
    watch.add_argument("--report-to", choices=["none", "wandb"], default="none", help="also log to W&B (default: none)")
    watch.add_argument("--wandb-project", default=None, help="W&B project for --report-to wandb")
    add_monitor_arguments(watch)
    watch.set_defaults(func=run_watch)


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
    try:
        layout = _watch_layout(args)
    except ValueError as error:
        print(f"lora-monitor watch: error: {error}\nName the trainer with --trainer NAME if it is one of these.", file=sys.stderr)
        return 2
    options = monitor_options(args, "watch")
    if layout.name != "kohya" and args.output_name is not None:
        print(f"lora-monitor watch: note: --output-name is kohya's; {layout.title} folders are read by their own names")
    note = unused_refs_note(args, options["metrics"])
    if note:
        print(f"lora-monitor watch: note: {note}")
    if args.report_to == "wandb":
        from lora_monitor.integrations.trackers import listeners_for

        options["listeners"] = listeners_for("wandb", project=args.wandb_project)
    if layout.name == "kohya":
        from lora_monitor.integrations.kohya_watch import KohyaWatcher

        watcher = KohyaWatcher(args.output_dir, prompts=args.prompts, output_name=args.output_name, base=args.base,
                               monitor_options=options, preview_seed=args.preview_seed, allow_pickle=args.allow_pickle,
                               logging_dir=args.logging_dir)
    else:  # the trainers of integrations/trainer_watch.py
        from lora_monitor.integrations.trainer_watch import TrainerWatcher

        watcher = TrainerWatcher(args.output_dir, layout, prompts=args.prompts, base_samples=args.base, monitor_options=options,
                                 logging_dir=args.logging_dir, allow_pickle=args.allow_pickle)
    return watcher.run(interval=args.interval, once=args.once)
