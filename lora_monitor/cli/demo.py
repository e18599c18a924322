"""`lora-monitor demo`: teach a tiny pre-trained model a new concept with a LoRA while the monitor watches."""
from __future__ import annotations

import argparse
import shutil
import textwrap
import time
from pathlib import Path

DESCRIPTION = (
    "A LoRA run with a story, offline on the CPU. The base model is a tiny Stable Diffusion pre-trained on coloured "
    "circles and squares (built once, about 2-3 minutes on a 2-core CPU, then reused from ~/.cache/lora-monitor). "
    "A LoRA then teaches it 'zqx', a cross it has never drawn, at a learning rate high enough to overfit later. The "
    "monitor renders the same previews every epoch, scores them (validation loss on held-out crosses, BRISQUE, SSIM "
    "against the base renders, likeness, adherence, diversity, memorization), keeps the epoch with the lowest "
    "validation loss, stops when it has not improved for --patience epochs, and writes an HTML report whose path is "
    "the last line printed. Its run/, data/, validation/ and report/ folders in --output-dir are replaced each time. "
    "BRISQUE needs its SVR model: run `lora-monitor models brisque` once first (`make demo` does)."
)

EPILOG = """\
examples:
  lora-monitor demo                                    # everything goes to demo-output/
  lora-monitor demo --output-dir demo-seed1 --seed 1  # another seed, another folder
"""


def register(subparsers) -> None:
    from lora_monitor.policy import PRESETS

    demo = subparsers.add_parser(
        "demo", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        help="watch a LoRA learn, then overfit, on a tiny offline model",
        description=textwrap.fill(DESCRIPTION, 100),
    )
    demo.add_argument("--output-dir", default="demo-output", help="where the data, previews, best LoRA and report go (default: demo-output)")
    demo.add_argument("--epochs", type=_at_least_one, default=20, help="epochs to train at most, at least 1 (default: 20)")
    demo.add_argument("--patience", type=int, default=3, help="stop after this many evaluations without improvement (default: 3)")
    demo.add_argument(
        "--preset", default=None, choices=sorted(PRESETS),
        help="the policy: " + " ".join(f"'{name}': {preset.rule}" for name, preset in PRESETS.items())
        + " (default: none of them: the lowest validation loss, stopping after --patience evaluations without improvement; "
        "the signal that means something on this tiny model, see the README)",
    )
    demo.add_argument("--metric", default=None, help="pick the best epoch by this metric instead of the preset's")
    demo.add_argument("--report-to", default="none", choices=["none", "wandb", "tensorboard", "all"], help="accelerate trackers to log to")
    demo.add_argument("--seed", type=int, default=0, help="seed of the LoRA run and of its training and held-out images (default: 0)")
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
    from lora_monitor.demo import DEMO_METRICS, STORY, TrainConfig, embedding_models, train
    from lora_monitor.demo_report import story_outcome, write_run_report, write_summary_picture
    from lora_monitor.integrations.trackers import listeners_for
    from lora_monitor.policy import VALIDATION_METRIC, get_preset
    from lora_monitor.spec import PreviewSpec
    from lora_monitor.tiny.pretrain import DEMO_RECIPE, pretrained_base
    from lora_monitor.tiny.shapes import CONCEPT_SHAPE, TRIGGER, write_concept_dataset

    preset = get_preset(args.preset) if args.preset else None
    metric = args.metric or (preset.metric if preset else VALIDATION_METRIC)
    metrics = list(dict.fromkeys([metric, *(preset.metrics if preset else ()), *DEMO_METRICS]))  # every signal, whichever policy picks
    started = time.monotonic()
    print(f"lora-monitor demo: everything goes to {output_dir}")
    print("  base model: a tiny Stable Diffusion pre-trained on coloured circles and squares", flush=True)
    model, cached = pretrained_base(DEMO_RECIPE)
    print(f"  {'reused from the cache' if cached else f'pre-trained in {time.monotonic() - started:.0f} s and cached'}: {model}")
    for name in ("run", "data", "validation", "report"):
        shutil.rmtree(output_dir / name, ignore_errors=True)
    data = write_concept_dataset(output_dir / "data", STORY.training_images, seed=args.seed, size=DEMO_RECIPE.size)
    held_out = write_concept_dataset(output_dir / "validation", STORY.held_out_images, seed=args.seed + 1000, size=DEMO_RECIPE.size)
    clip, dino, real = embedding_models(output_dir / "embedders")
    print(f"  the concept: '{TRIGGER}', a {CONCEPT_SHAPE} the base model has never drawn")
    print(f"  training images: {data} ({STORY.training_images}, captioned 'a <colour> {TRIGGER}'; also the likeness references)")
    print(f"  held-out images: {held_out} ({STORY.held_out_images} more, for the validation loss)")
    print(
        f"  embedding models: {clip}, {dino}" if real else
        "  embedding models: tiny random-weight CLIP and DINOv2 built offline, so likeness, adherence, diversity and\n"
        "  memorization are computed for real but mean nothing here; `lora-monitor models clip` and `lora-monitor models dino`\n"
        "  fetch the real ones, which the demo then uses"
    )
    if preset is not None and metric == preset.metric:
        rule = f"policy '{preset.name}': {preset.rule}"
    elif metric == VALIDATION_METRIC:
        rule = "policy: best = lowest validation loss on the held-out images (val_loss), earliest epoch on ties."
    else:
        rule = f"policy: best {metric}."
    print(f"\n{rule} Stop after {args.patience} evaluations without improvement.\n")
    widths = [max(len(name), 9) for name in metrics]
    header = f"{'epoch':>5}  " + "  ".join(f"{name:>{width}}" for name, width in zip(metrics, widths)) + "  best"
    print(header)
    print("-" * len(header))
    training_started = time.monotonic()

    def row(label: str, values: dict, mark: str = "") -> str:
        cells = "  ".join(f"{values[name]:>{width}.4f}" if name in values else f"{'-':>{width}}" for name, width in zip(metrics, widths))
        return f"{label:>5}  {cells}  {mark}"

    class Table:  # a monitor listener: one row per evaluation, the base model's row before the first
        def on_evaluation(self, monitor, report) -> None:
            if len(monitor.policy.history) == 1 and monitor.policy.base:
                print(row("base", monitor.policy.base), flush=True)
            print(row(str(report.epoch), report.aggregates, "*" if report.is_best else ""), flush=True)

    spec = PreviewSpec.from_prompts(
        STORY.prompts, steps=STORY.preview_steps, guidance_scale=STORY.guidance_scale, width=DEMO_RECIPE.size, height=DEMO_RECIPE.size,
        seeds_per_prompt=2,
    )
    options = dict(
        spec=spec, metrics=metrics, metric=metric, patience=args.patience, references=str(data), validation=str(held_out),
        clip_model=clip, dino_model=dino, listeners=[Table(), *listeners_for(args.report_to)], **({"preset": preset.name} if preset else {}),
    )
    result = train(
        TrainConfig(
            pretrained=str(model), train_data_dir=str(data), output_dir=str(output_dir / "run"), epochs=args.epochs,
            resolution=DEMO_RECIPE.size, rank=STORY.rank, lora_targets=STORY.lora_targets, learning_rate=STORY.learning_rate,
            batch_size=STORY.batch_size, repeats=STORY.repeats, seed=args.seed, report_to=args.report_to, monitor=options,
        )
    )
    monitor = result["monitor"]
    policy = monitor.policy
    print(f"\nthe LoRA run took {time.monotonic() - training_started:.0f} s ({time.monotonic() - started:.0f} s in all)")
    print(policy.stop_reason or f"trained all {args.epochs} epochs; best {metric} at epoch {policy.best_epoch}.")
    if policy.best_epoch is not None:
        from lora_monitor.record import read_scores

        reason = next(line["reason"] for line in read_scores(monitor.output_dir) if line["epoch"] == policy.best_epoch)
        print(f"why epoch {policy.best_epoch}: {reason}")
        print(f"best epoch {policy.best_epoch}: LoRA in {monitor.output_dir / 'best'} (pytorch_lora_weights.safetensors + lora_monitor.json)")
    else:
        print("no epoch met the policy's bounds, so nothing was exported: " + "; ".join(f"epoch {r.epoch}: {r.note}" for r in policy.history))
    print(story_outcome(policy, args.epochs).sentence)
    print(f"previews: {monitor.output_dir / 'previews'}  scores: {monitor.record.scores_path}")
    try:
        picture = write_summary_picture(monitor, output_dir / "report" / "summary.png")
        report = write_run_report(monitor, output_dir / "report", metrics=metrics)
    except ImportError as error:  # matplotlib: the report's curves need it
        print(f"report: not written: {error}")
        return 0
    print(f"summary picture (contact sheet and curves): {picture}")
    print(f"report: {report}")
    return 0
