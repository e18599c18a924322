"""`lora-monitor kohya`: run kohya-ss sd-scripts' LoRA trainer with the monitor attached.

`register(subparsers)` adds the command to an argparse subparsers object; it sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import sys

from lora_monitor.cli.flags import add_monitor_arguments, monitor_options, unused_refs_note
from lora_monitor.kohya_names import KOHYA_TRAINERS

KOHYA_HELP = "run kohya sd-scripts' LoRA trainer with the monitor attached"
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
examples:
  lora-monitor kohya --sd-scripts ~/sd-scripts --metrics brisque,ssim --patience 3 -- \\
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --train_data_dir data --output_dir runs/mylora \\
      --output_name mylora --network_module networks.lora --max_train_epochs 10 \\
      --save_every_n_epochs 1 --sample_prompts prompts.txt --sample_every_n_epochs 1 --save_state
  lora-monitor kohya --sd-scripts ~/sd-scripts --preset likeness --refs data/10_sks --strip-words sks -- \\
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --train_data_dir data --output_dir runs/mylora \\
      --output_name mylora --network_module networks.lora --max_train_epochs 4 \\
      --sample_prompts likeness_prompts.txt --sample_every_n_epochs 1   # lines: sks toy --d 1 / sks toy --d 2
Resume a run saved with --save_state by adding --resume runs/mylora/mylora-000002-state (the monitor's state travels in
kohya's state folders). Other families: --family sdxl|sd3|flux|lumina and that script's own model arguments.
"""

def register(subparsers) -> None:
    """Add the `kohya` subcommand to an argparse subparsers object."""
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
    kohya.set_defaults(preview_seed=None)
    kohya.add_argument("trainer_args", nargs=argparse.REMAINDER, metavar="-- TRAINER_ARGS", help="arguments of the trainer script")
    kohya.set_defaults(func=run_kohya)


def run_kohya(args: argparse.Namespace) -> int:
    from lora_monitor.integrations.kohya import TrainingFailed, launch

    trainer_args = list(args.trainer_args)
    if trainer_args[:1] == ["--"]:
        trainer_args = trainer_args[1:]
    if not trainer_args:
        raise ValueError("no trainer arguments: put them after `--`, e.g. lora-monitor kohya --sd-scripts PATH -- --output_dir out ...")
    family = "sdxl" if args.sdxl else args.family
    options = monitor_options(args, "kohya")
    note = unused_refs_note(args, options["metrics"])
    if note:
        print(f"lora-monitor: note: {note}")
    try:
        return launch(args.sd_scripts, trainer_args, script=args.script, family=family, monitor_options=options,
                      preview_seed=args.preview_seed)
    except TrainingFailed as error:  # an error inside training (its traceback is shown above)
        print(f"lora-monitor kohya: error: {error}", file=sys.stderr)
        return 1
