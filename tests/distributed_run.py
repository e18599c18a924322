"""A short monitored "training" run, launched on several processes by tests/test_distributed.py.

    accelerate launch --multi_gpu --num_processes 2 --main_process_port P tests/distributed_run.py \
        --model TINY_MODEL --output-dir OUT
    torchrun --nproc_per_node 2 tests/distributed_run.py --model TINY_MODEL --output-dir OUT

Each epoch moves the LoRA weights the same way on every rank (as a synchronised training step
would), then calls monitor.on_epoch_end and stops when the monitor says so. Each rank gives its
monitor its own output dir, OUT/rank<R>/monitor, so a write by a rank other than 0 would show,
and saves what it saw (shards rendered, images, scores, decisions) to OUT/rank<R>/result.pt.
`run()` is also imported by the test for the one-process reference run.

With --external the monitor has no diffusers modules, as under the kohya launcher: each rank renders
kohya's round-robin share of the previews itself and hands it to monitor.evaluate_shard; the base
renders are gathered with lora_monitor.distributed.gather_images.

Failure injection, read from the environment: LORA_MONITOR_TEST_FAIL_RANK=R makes rank R raise
inside rendering from epoch LORA_MONITOR_TEST_FAIL_EPOCH (default 2) on; the error every rank
raised is written to OUT/rank<R>/error.txt.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from conftest import LORA_TARGETS, nudge_lora  # this script's folder (tests/) is on sys.path when it runs

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
PROMPTS = ("a red circle", "a blue square", "a yellow circle on grey", "a green square", "a red square", "a blue circle", "a grey field", "a green circle")


class Brightness:
    """Mean pixel value, higher is better: a no-reference scorer that moves with the LoRA, so the run
    below has a best epoch other than the first and stops early (best 4, stop 5 on the tiny model)."""

    name = "brightness"
    higher_is_better = True
    needs_reference = False

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        return images.mean(dim=(1, 2, 3))


def preview_spec(prompts: int, size: int, steps: int):
    from lora_monitor.spec import PreviewSpec

    return PreviewSpec.from_prompts(PROMPTS[:prompts], seed=7, steps=steps, width=size, height=size)


def run(
    model: str,
    output_dir: str | os.PathLike,
    *,
    accelerator=None,
    epochs: int = 6,
    prompts: int = 4,
    size: int = 32,
    steps: int = 2,
    patience: int = 1,
    fail_rank: int | None = None,
    fail_epoch: int = 2,
    external: bool = False,
    signals: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """Load the model, add a LoRA, evaluate up to `epochs` epochs; returns what this rank saw."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from lora_monitor import export as exporting
    from lora_monitor.distributed import gather_images
    from lora_monitor.monitor import LoraMonitor
    from lora_monitor.render import PreviewRenderer

    rank = accelerator.process_index if accelerator is not None else 0
    world_size = accelerator.num_processes if accelerator is not None else 1
    torch.manual_seed(0)  # the LoRA's gaussian init: the same on every rank and in the one-process run
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    spec = preview_spec(prompts, size, steps)
    options = dict(spec=spec, output_dir=Path(output_dir) / "monitor", metrics=None, scorers=[Brightness(), _ssim()], metric="brightness", patience=patience)
    if signals is not None:  # embedding signals (diversity is whole-set: scored on the main process) and the validation loss
        options.update(_signal_options(spec, size, *signals))
        spec = options["spec"]
    if external:  # the trainer renders (kohya): the monitor only scores, decides and writes its weights
        monitor = LoraMonitor(write_weights=exporting.diffusers_lora_writer(pipe.unet), **options)
        renderer = PreviewRenderer(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)
    else:
        monitor = LoraMonitor.from_pipeline(pipe, **options)
        renderer = monitor.renderer
    unet = pipe.unet
    if accelerator is not None:
        unet = accelerator.prepare(unet)  # DDP-wrapped, as in a training loop; the monitor holds the inner module
        monitor.attach(accelerator)

    renders: list[list[int] | None] = []
    epoch_now = [0]
    original_render = renderer.render

    def render(spec, indices=None):
        renders.append(None if indices is None else list(indices))
        if fail_rank == rank and epoch_now[0] >= fail_epoch:
            raise ValueError(f"injected preview failure on rank {rank} at epoch {epoch_now[0]}")
        return original_render(spec, indices)

    renderer.render = render  # render_base goes through it too
    kohya_share = list(range(rank, len(spec), world_size))  # kohya splits its sample prompts round-robin

    result: dict[str, Any] = {"rank": rank, "renders": renders, "epochs": [], "images": {}, "scores": {}, "decisions": {}}
    for epoch in range(1, epochs + 1):
        epoch_now[0] = epoch
        nudge_lora(pipe.unet, seed=epoch)
        if external:
            if epoch == 1:
                monitor.set_base_references(gather_images(kohya_share, renderer.render_base(spec, kohya_share), len(spec)))
            report = monitor.evaluate_shard(epoch, kohya_share, renderer.render(spec, kohya_share), step=epoch * 10)
        else:
            report = monitor.on_epoch_end(epoch, step=epoch * 10)
        result["epochs"].append(epoch)
        result["images"][epoch] = torch.stack(report.images)
        result["scores"][epoch] = report.scores
        result["decisions"][epoch] = (report.is_best, report.should_stop, report.decision.best_epoch)
        if monitor.should_stop:
            break
    result["base"] = torch.stack(monitor.base_references())
    result["best_epoch"] = monitor.best_epoch
    result["stopped_epoch"] = monitor.policy.stopped_epoch
    result["policy_state"] = monitor.policy.state_dict()
    result["is_main_process"] = monitor.is_main_process
    return result


def _signal_options(spec, size: int, clip: str, dino: str) -> dict[str, Any]:
    from lora_monitor.scoring import get_scorer
    from lora_monitor.scoring.signals import SignalOptions
    from lora_monitor.validation import ValidationSet

    generator = torch.Generator().manual_seed(11)
    options = SignalOptions(references=[torch.rand(3, size, size, generator=generator) for _ in range(3)], clip_model=clip, dino_model=dino, device="cpu")
    scorers = [Brightness(), _ssim(), *(get_scorer(name, options=options) for name in ("likeness", "adherence", "diversity"))]
    held_out = ValidationSet([torch.rand(3, size, size, generator=generator) for _ in range(3)], ["a red circle", "a blue square", "a field"])
    return dict(spec=spec.with_seeds(2), scorers=scorers, metrics=("val_loss",), validation=held_out)


def _ssim():
    from lora_monitor.scoring import get_scorer

    return get_scorer("ssim")


def main(argv: list[str] | None = None) -> int:
    from accelerate import Accelerator

    from lora_monitor.distributed import RankFailedError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--external", action="store_true", help="render outside the monitor and call evaluate_shard (the kohya path)")
    parser.add_argument("--signals", nargs=2, metavar=("CLIP_DIR", "DINO_DIR"), help="also score likeness, adherence, diversity and val_loss")
    args = parser.parse_args(argv)

    accelerator = Accelerator(cpu=True)
    rank_dir = Path(args.output_dir) / f"rank{accelerator.process_index}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    fail_rank = os.environ.get("LORA_MONITOR_TEST_FAIL_RANK")
    try:
        result = run(
            args.model,
            rank_dir,
            accelerator=accelerator,
            epochs=args.epochs,
            prompts=args.prompts,
            size=args.size,
            steps=args.steps,
            patience=args.patience,
            fail_rank=int(fail_rank) if fail_rank else None,
            fail_epoch=int(os.environ.get("LORA_MONITOR_TEST_FAIL_EPOCH", "2")),
            external=args.external,
            signals=tuple(args.signals) if args.signals else None,
        )
    except RankFailedError as error:
        (rank_dir / "error.txt").write_text(str(error), encoding="utf-8")
        raise
    result["world_size"] = accelerator.num_processes
    torch.save(result, rank_dir / "result.pt")
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
