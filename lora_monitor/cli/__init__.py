"""The lora-monitor command."""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Score LoRA preview images every epoch (BRISQUE, SSIM against the base model, likeness, adherence,
diversity), keep the best epoch, stop early. In your own training loop use the Python API (see the
README); these commands run the demo, score images, rank saved checkpoints, run kohya's trainer
with the monitor, and watch other trainers' output folders."""
EPILOG = """\
Every command's --help ends with examples. Start with:
  lora-monitor demo                      # a LoRA learning, then overfitting, on a tiny offline model"""


def _quiet_libraries() -> None:
    """The libraries' own progress bars and notices drown our table; keep their errors."""
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command: one module of this package per command group, each with `register`."""
    from lora_monitor import __version__
    from lora_monitor.cli import demo, kohya, posthoc, score, watch

    parser = argparse.ArgumentParser(prog="lora-monitor", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"lora-monitor {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for group in (demo, score, posthoc, kohya, watch):
        group.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; bad input and missing models end with a message (exit 2 and 1), not a traceback."""
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from lora_monitor.kohya_names import FolderLockedError
    from lora_monitor.scoring.brisque_model import BrisqueModelError
    from lora_monitor.scoring.embeddings import ModelNotAvailableError

    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except (BrisqueModelError, ModelNotAvailableError) as error:  # a model this machine does not have (the message says how to get it)
        print(f"lora-monitor {args.command}: error: {error}", file=sys.stderr)
        return 1
    except (ValueError, OSError, FolderLockedError) as error:  # bad input, an unwritable folder, a folder another process scores
        print(f"lora-monitor {args.command}: error: {error}", file=sys.stderr)
        return 2
