"""The lora-monitor command."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

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
    from lora_monitor.integrations import kohya_commands
    from lora_monitor.scoring import commands as scoring_commands

    parser = argparse.ArgumentParser(prog="lora-monitor", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"lora-monitor {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = subparsers.add_parser(
        "demo",
        help="train a LoRA on a tiny offline model with the monitor attached (about 30 s on a 2-core CPU)",
        description=(
            "Build a tiny Stable Diffusion model with random weights (offline), make a small synthetic data set of "
            "coloured shapes, train a LoRA on it for a few epochs on the CPU with the monitor attached, print a "
            "table of scores per epoch, export the best epoch's LoRA and say where everything went. "
            "BRISQUE needs its SVR model: run `lora-monitor models brisque` once first (`make demo` does)."
        ),
    )
    demo.add_argument("--output-dir", default="demo-output", help="where the model, data, previews and best LoRA go (default: demo-output)")
    demo.add_argument("--epochs", type=_at_least_one, default=8, help="epochs to train at most, at least 1 (default: 8)")
    demo.add_argument("--patience", type=int, default=3, help="stop after this many evaluations without improvement (default: 3)")
    demo.add_argument("--metric", default="brisque", help="the metric that picks the best epoch (default: brisque)")
    demo.add_argument("--report-to", default="none", choices=["none", "wandb", "tensorboard", "all"], help="accelerate trackers to log to")
    demo.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    demo.set_defaults(func=run_demo)

    scoring_commands.register(subparsers)
    posthoc_commands.register(subparsers)
    kohya_commands.register(subparsers)
    return parser


def _at_least_one(text: str) -> int:
    """--epochs: a whole number, at least 1; else argparse's message (exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, at least 1 (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _check_output_dir(output_dir: Path) -> None:
    """--output-dir must be (or be creatable as) a directory: a file there, or above it, is a message."""
    for path in (output_dir, *output_dir.parents):
        if path.exists():
            if not path.is_dir():
                what = "is a file" if path == output_dir else f"cannot be made: {path} is a file"
                raise ValueError(f"--output-dir {output_dir} {what}, not a directory; choose another --output-dir")
            return


def run_demo(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir).resolve()
    _check_output_dir(output_dir)  # before the (slow) imports
    from lora_monitor.demo import TrainConfig, train, write_synthetic_dataset
    from lora_monitor.integrations.trackers import listeners_for
    from lora_monitor.tiny import save_tiny_pipeline

    metrics = tuple(dict.fromkeys([args.metric, "brisque", "ssim"]))
    print(f"lora-monitor demo: everything goes to {output_dir}")
    model = save_tiny_pipeline(output_dir / "tiny-sd")
    data = write_synthetic_dataset(output_dir / "data", count=8, size=64, seed=args.seed)
    print(f"  tiny model: {model}\n  training images: {data} (8 coloured shapes with captions)\n")
    header = f"{'epoch':>5}  " + "  ".join(f"{name + '_mean':>13}" for name in metrics) + "  best"
    print(header)
    print("-" * len(header))
    started = time.monotonic()

    def show(report) -> None:
        values = "  ".join(f"{report.aggregates[name]:>13.4f}" for name in metrics)
        print(f"{report.epoch:>5}  {values}  {'*' if report.is_best else ''}", flush=True)

    result = train(
        TrainConfig(
            pretrained=str(model),
            train_data_dir=str(data),
            output_dir=str(output_dir / "run"),
            epochs=args.epochs,
            seed=args.seed,
            report_to=args.report_to,
            learning_rate=1e-2,
            monitor=dict(metrics=metrics, monitor=args.metric, patience=args.patience, listeners=listeners_for(args.report_to)),
            on_report=show,
        )
    )
    monitor = result["monitor"]
    policy = monitor.policy
    print(f"\nfinished in {time.monotonic() - started:.0f} s")
    print(policy.stop_reason or f"trained all {args.epochs} epochs; best {args.metric} at epoch {policy.best_epoch}.")
    if policy.best_epoch is not None:
        print(f"best epoch {policy.best_epoch}: LoRA in {monitor.output_dir / 'best'} (pytorch_lora_weights.safetensors + lora_monitor.json)")
    print(f"previews: {monitor.output_dir / 'previews'}  scores: {monitor.record.scores_path}")
    return 0


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


if __name__ == "__main__":
    sys.exit(main())
