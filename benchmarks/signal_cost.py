"""What each signal costs per evaluation, as a ratio to rendering the previews it scores.

On one model, with the same number of images everywhere, this times in one process:

  render       PreviewRenderer.render: the previews of one evaluation (the reference, ratio 1)
  val_loss     ValidationLoss: the deterministic validation loss on as many held-out images, at its 5
               fixed noise levels (no sampling loop: one denoiser pass per image and level)
  likeness, likeness_clip, memorization, adherence, diversity
               the embedding scorers on the rendered previews (DINOv2 / CLIP forward passes; likeness
               and memorization share one DINOv2 pass, so the second costs almost nothing)
  brisque, ssim
               today's scorers, for comparison

Embedding models (--embedders): "tiny" (lora_monitor.tiny.embedders, 32 px), or "real-size": random
weights at the published architectures of openai/clip-vit-base-patch32 (ViT-B/32 at 224 px) and
facebook/dinov2-small (ViT-S/14 at 224 px), built offline; their cost is the real models' cost. With
"cached" the real weights from the Hugging Face cache are used (`lora-monitor models clip|dino`).

    python benchmarks/signal_cost.py                                # tiny and small SD, real-size embedders
    python benchmarks/signal_cost.py --models small --images 8 --steps 20
    python benchmarks/signal_cost.py --family flux --models small --steps 4
    python benchmarks/signal_cost.py --device cuda --models small --embedders cached
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import common

common.offline_environment(TRANSFORMERS_VERBOSITY="error")

import torch  # noqa: E402

RESOLUTION = {"tiny": 64, "small": 128}
PROMPTS = ["a red apple on a table", "a lighthouse at dusk", "an old sailor, oil painting", "a cabin in the snow"]
SIGNALS = ("likeness", "likeness_clip", "memorization", "adherence", "diversity", "brisque", "ssim")


def real_size_embedders(folder: Path) -> tuple[str, str]:
    """Random-weight models with the published widths of clip-vit-base-patch32 and dinov2-small (costs, not scores)."""
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from lora_monitor.scoring.embeddings import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
    from lora_monitor.tiny.embedders import _save
    from lora_monitor.tiny.tokenizers import build_tokenizer

    clip, dino = folder / "clip-b32", folder / "dinov2-s14"
    if not clip.is_dir():
        tokenizer = build_tokenizer()
        text = dict(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                    bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        vision = dict(image_size=224, patch_size=32, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)).eval()
        preprocessor = dict(image_processor_type="CLIPImageProcessor", do_resize=True, size=224, do_center_crop=True, crop_size=224,
                            do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
        _save(clip, model, preprocessor, tokenizer)
    if not dino.is_dir():
        model = Dinov2Model(Dinov2Config(image_size=518, patch_size=14, hidden_size=384, num_hidden_layers=12, num_attention_heads=6)).eval()
        preprocessor = dict(image_processor_type="BitImageProcessor", do_resize=True, size={"shortest_edge": 256}, do_center_crop=True,
                            crop_size={"height": 224, "width": 224}, do_normalize=True, image_mean=list(IMAGENET_MEAN),
                            image_std=list(IMAGENET_STD), resample=3)
        _save(dino, model, preprocessor)
    return str(clip), str(dino)


def embedders(kind: str, folder: Path) -> tuple[str, str]:
    if kind == "cached":
        from lora_monitor.scoring.embeddings import DEFAULT_CLIP, DEFAULT_DINO

        return DEFAULT_CLIP, DEFAULT_DINO
    if kind == "tiny":
        from lora_monitor.tiny.embedders import save_tiny_clip, save_tiny_dino

        return str(save_tiny_clip(folder / "tiny-clip")), str(save_tiny_dino(folder / "tiny-dino"))
    return real_size_embedders(folder)


def timed(function, repeats: int, device: str) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    function()
    return statistics.median(common.timed(device, function)[0] for _ in range(repeats))


def measure(family: str, size: str, args, folder: Path) -> dict[str, float]:
    from peft import LoraConfig

    from lora_monitor.render import PreviewRenderer
    from lora_monitor.scoring import get_scorer, score_images
    from lora_monitor.scoring.scorers import score_sets
    from lora_monitor.scoring.signals import SignalOptions
    from lora_monitor.spec import PreviewSpec
    from lora_monitor.tiny import LORA_TARGET_MODULES, build_tiny_pipeline, denoiser
    from lora_monitor.validation import ValidationLoss, ValidationSet

    resolution = RESOLUTION[size]
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(size, family=family).to(args.device)
    denoiser(pipe).add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGET_MODULES[family]))
    components = {name: getattr(pipe, name) for name in pipe.components if getattr(pipe, name, None) is not None}
    renderer = PreviewRenderer(family=family, batch_size=args.images, **components)
    seeds = 2  # two seeds per prompt: what diversity compares
    spec = PreviewSpec.from_prompts((PROMPTS * args.images)[: args.images // seeds], steps=args.steps, width=resolution,
                                    height=resolution, seeds_per_prompt=seeds)
    generator = torch.Generator().manual_seed(1)
    held_out = ValidationSet([torch.rand(3, resolution, resolution, generator=generator) for _ in range(len(spec))],
                             [p.prompt for p in spec.prompts])
    validation = ValidationLoss(renderer, held_out, batch_size=args.images)
    validation.prepare()
    renderer.encode(spec)

    figures = {"render": timed(lambda: renderer.render(spec), args.repeats, args.device)}
    figures["val_loss"] = timed(validation, args.repeats, args.device)
    images = renderer.render(spec)
    clip, dino = embedders(args.embedders, folder)
    options = SignalOptions(references=[torch.rand(3, resolution, resolution, generator=generator) for _ in range(8)],
                            clip_model=clip, dino_model=dino, device=args.device)
    prompts, groups = [p.prompt for p in spec.prompts], spec.seed_groups()
    for name in SIGNALS:
        scorer = get_scorer(name, options=options)
        getattr(scorer, "prepare", lambda: None)()
        if getattr(scorer, "whole_set", False):
            figures[name] = timed(lambda: score_sets([scorer], images, groups), args.repeats, args.device)
        else:
            # a fresh copy per call: the embedding models remember the last batch they embedded
            figures[name] = timed(
                lambda: score_images([scorer], [image.clone() for image in images], images, prompts=prompts), args.repeats, args.device
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl", "flux"])
    parser.add_argument("--models", default="tiny,small", help="comma-separated: tiny (64 px), small (128 px)")
    parser.add_argument("--images", type=int, default=8, help="previews (and held-out images) per evaluation (default: 8)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps per preview (default: 20)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after a warm-up, median reported (default: 3)")
    parser.add_argument("--embedders", default="real-size", choices=["tiny", "real-size", "cached"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"signal cost per evaluation, {args.family}, {args.images} images, {args.steps} steps, {args.embedders} embedders, "
          f"{args.device}, torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        for size in args.models.split(","):
            figures = measure(args.family, size, args, Path(folder))
            render = figures["render"]
            print(f"\n{size} model, {RESOLUTION[size]} px")
            print(f"  {'signal':<14} {'seconds':>9} {'x render':>9}")
            for name, seconds in figures.items():
                print(f"  {name:<14} {seconds:>9.3f} {seconds / render:>9.3f}")


if __name__ == "__main__":
    main()
