"""The lora-monitor command."""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Score LoRA preview images every epoch (BRISQUE, SSIM against the base model), keep the best
epoch, stop early. In a training loop use the Python API (see the README); these commands run
the demo, score image files, and fetch the models the scorers need."""


def _quiet_libraries() -> None:
    """The libraries' own progress bars and notices drown our table; keep their errors."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    from lora_monitor import __version__
    from lora_monitor import posthoc_commands
    from lora_monitor.cli import demo
    from lora_monitor.integrations import kohya_commands
    from lora_monitor.scoring import commands as scoring_commands

    parser = argparse.ArgumentParser(prog="lora-monitor", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lora-monitor {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo.register(subparsers)
    scoring_commands.register(subparsers)
    posthoc_commands.register(subparsers)
    kohya_commands.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lora_monitor.scoring.brisque_model import BrisqueModelError

    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, BrisqueModelError) as error:  # bad input: a message, not a traceback
        print(f"lora-monitor {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except OSError as error:  # e.g. an --output-dir that cannot be written: a message, not a traceback
        print(f"lora-monitor {args.command}: error: {error}", file=sys.stderr)
        return 2

