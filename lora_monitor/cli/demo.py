"""`lora-monitor demo`: train a LoRA on a tiny offline model with the monitor attached."""
from __future__ import annotations

import argparse
import textwrap
import time
from pathlib import Path


EPILOG = """\
examples:
  lora-monitor demo                                    # everything goes to demo-output/
  lora-monitor demo --output-dir demo-seed1 --seed 1  # another seed, another folder
"""


def register(subparsers) -> None:
    from lora_monitor.policy import PRESETS

    demo = subparsers.add_parser(
        "demo", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train a tiny offline LoRA and watch the monitor pick its epoch",
        description=textwrap.fill(
            "Build a tiny Stable Diffusion model with random weights (offline), make a small synthetic data set of "
            "coloured shapes, train a LoRA on it for a few epochs on the CPU with the monitor attached, print a "
            "table of scores per epoch, export the best epoch's LoRA and say where everything went. "
            "BRISQUE needs its SVR model: run `lora-monitor models brisque` once first (`make demo` does).", 100
        ),
    )
    demo.add_argument("--output-dir", default="demo-output", help="where the model, data, previews and best LoRA go (default: demo-output)")
    demo.add_argument("--epochs", type=_at_least_one, default=8, help="epochs to train at most, at least 1 (default: 8)")
    demo.add_argument("--patience", type=int, default=3, help="stop after this many evaluations without improvement (default: 3)")
    demo.add_argument(
        "--preset", default="likeness", choices=sorted(PRESETS),
        help="the policy: " + " ".join(f"'{name}': {preset.rule}" for name, preset in PRESETS.items()) + " (default: likeness)",
    )
    demo.add_argument("--metric", default=None, help="pick the best epoch by this metric instead of the preset's")
    demo.add_argument("--report-to", default="none", choices=["none", "wandb", "tensorboard", "all"], help="accelerate trackers to log to")
    demo.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")
    demo.set_defaults(func=run)


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


def run(args: argparse.Namespace) -> int:
    output_dir = Path(args.output_dir).resolve()
    _check_output_dir(output_dir)  # before the (slow) imports
    from lora_monitor.demo import DEMO_METRICS, DEMO_PROMPTS, TrainConfig, embedding_models, train, write_synthetic_dataset
    from lora_monitor.integrations.trackers import listeners_for
    from lora_monitor.policy import get_preset
    from lora_monitor.spec import PreviewSpec
    from lora_monitor.tiny import save_tiny_pipeline

    preset = get_preset(args.preset)
    metric = args.metric or preset.monitor
    metrics = list(dict.fromkeys([metric, *preset.metrics, *DEMO_METRICS]))  # every signal, whichever policy picks
    print(f"lora-monitor demo: everything goes to {output_dir}")
    model = save_tiny_pipeline(output_dir / "tiny-sd")
    data = write_synthetic_dataset(output_dir / "data", count=8, size=64, seed=args.seed)
    held_out = write_synthetic_dataset(output_dir / "validation", count=4, size=64, seed=args.seed + 1)
    clip, dino, real = embedding_models(output_dir / "embedders")
    print(f"  tiny model: {model}\n  training images: {data} (8 coloured shapes with captions; also the likeness references)")
    print(f"  held-out images: {held_out} (4, for the validation loss)")
    print(
        f"  embedding models: {clip}, {dino}" if real else
        "  embedding models: tiny random-weight CLIP and DINOv2 built offline, so likeness, adherence, diversity and\n"
        "  memorization are computed for real but mean nothing here; `lora-monitor models clip` and `lora-monitor models dino`\n"
        "  fetch the real ones, which the demo then uses"
    )
    print(f"\npolicy '{preset.name}': {preset.rule}\n" if metric == preset.monitor else f"\npolicy: best {metric}\n")
    widths = [max(len(name), 9) for name in metrics]
    header = f"{'epoch':>5}  " + "  ".join(f"{name:>{width}}" for name, width in zip(metrics, widths)) + "  best"
    print(header)
    print("-" * len(header))
    started = time.monotonic()

    def row(label: str, values: dict, mark: str = "") -> str:
        cells = "  ".join(f"{values[name]:>{width}.4f}" if name in values else f"{'-':>{width}}" for name, width in zip(metrics, widths))
        return f"{label:>5}  {cells}  {mark}"

    class Table:  # a monitor listener: one row per evaluation, the base model's row before the first
        def on_evaluation(self, monitor, report) -> None:
            if len(monitor.policy.history) == 1 and monitor.policy.base:
                print(row("base", monitor.policy.base), flush=True)
            print(row(str(report.epoch), report.aggregates, "*" if report.is_best else ""), flush=True)

    spec = PreviewSpec.from_prompts(DEMO_PROMPTS, steps=4, width=64, height=64, seeds_per_prompt=2)
    options = dict(
        spec=spec, preset=preset.name, metrics=metrics, monitor=metric, patience=args.patience, references=str(data),
        validation=str(held_out), clip_model=clip, dino_model=dino, listeners=[Table(), *listeners_for(args.report_to)],
    )
    result = train(
        TrainConfig(
            pretrained=str(model),
            train_data_dir=str(data),
            output_dir=str(output_dir / "run"),
            epochs=args.epochs,
            seed=args.seed,
            report_to=args.report_to,
            learning_rate=1e-2,
            monitor=options,
        )
    )
    monitor = result["monitor"]
    policy = monitor.policy
    print(f"\nfinished in {time.monotonic() - started:.0f} s")
    print(policy.stop_reason or f"trained all {args.epochs} epochs; best {metric} at epoch {policy.best_epoch}.")
    best = next((result for result in policy.history if result.epoch == policy.best_epoch), None)
    if best is not None:
        from lora_monitor.record import read_scores

        reason = next(line["reason"] for line in read_scores(monitor.output_dir) if line["epoch"] == policy.best_epoch)
        print(f"why epoch {policy.best_epoch}: {reason}")
        print(f"best epoch {policy.best_epoch}: LoRA in {monitor.output_dir / 'best'} (pytorch_lora_weights.safetensors + lora_monitor.json)")
    else:
        print("no epoch met the policy's bounds, so nothing was exported: " + "; ".join(f"epoch {r.epoch}: {r.note}" for r in policy.history))
    print(f"previews: {monitor.output_dir / 'previews'}  scores: {monitor.record.scores_path}")
    return 0


