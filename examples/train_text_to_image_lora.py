#!/usr/bin/env python
"""Train a LoRA on a Stable Diffusion UNet with lora-monitor attached.

A hand-written diffusers/accelerate loop in the shape of diffusers'
examples/text_to_image/train_text_to_image_lora.py. The monitor's lines are marked
`# lora-monitor`: build it from the modules in memory, attach it to the Accelerator, call it at
each epoch end, obey its stop decision.

Data: a folder of images, each with a same-name .txt caption (the file name when missing).

    python examples/train_text_to_image_lora.py \\
        --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
        --train_data_dir my_images --resolution 512 --rank 8 --num_train_epochs 20 \\
        --output_dir out --preview_prompts prompts.txt --patience 4 --report_to wandb
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTokenizer

from lora_monitor import LoraMonitor, PreviewSpec
from lora_monitor.policy import get_preset
from lora_monitor.demo import load_image_folder
from lora_monitor.integrations.trackers import listeners_for

logger = get_logger(__name__)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained_model_name_or_path", required=True, help="a diffusers model folder or hub id")
    parser.add_argument("--train_data_dir", required=True, help="folder of images with same-name .txt captions")
    parser.add_argument("--output_dir", default="sd-lora-monitored")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (lora_alpha is set equal)")
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--num_train_epochs", type=int, default=10)
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    parser.add_argument("--report_to", default="none", choices=["none", "wandb", "tensorboard", "all"])
    parser.add_argument("--checkpointing_epochs", type=int, default=0, help="accelerate save_state every N epochs (0: never)")
    parser.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint-<epoch> folder from --checkpointing_epochs")
    monitor = parser.add_argument_group("lora-monitor")
    monitor.add_argument("--preview_prompts", default=None, help="kohya-style prompt file (.txt with --n --w --h --d --s --l), or .toml/.json")
    monitor.add_argument("--validation_prompt", action="append", default=None, help="a preview prompt (repeatable) when no prompt file is given")
    monitor.add_argument("--preview_steps", type=int, default=20, help="sampling steps for prompts that do not set --s")
    monitor.add_argument("--preview_size", type=int, default=None, help="preview width and height (default: --resolution)")
    monitor.add_argument("--preview_every_n_epochs", type=int, default=1)
    monitor.add_argument("--preset", default="quality", choices=["quality", "likeness", "loss"],
                         help="quality: lowest BRISQUE; likeness: most like --refs_dir within adherence and diversity bounds "
                              "relative to the base model; loss: lowest validation loss, DVAR stop (needs --validation_dir)")
    monitor.add_argument("--monitor_metric", default=None, help="the metric that picks the best epoch (default: the preset's)")
    monitor.add_argument("--refs_dir", default=None, help="reference images for likeness/memorization (default: --train_data_dir)")
    monitor.add_argument("--validation_dir", default=None, help="held-out images with .txt captions: adds the validation loss")
    monitor.add_argument("--seeds_per_prompt", type=int, default=1, help="previews per prompt with different seeds (diversity needs 2+)")
    monitor.add_argument("--strip_words", action="append", default=[], help="a trigger word removed before CLIP-T adherence (repeatable)")
    monitor.add_argument("--clip_model", default=None, help="CLIP for adherence (default: openai/clip-vit-base-patch32)")
    monitor.add_argument("--dino_model", default=None, help="DINOv2 for likeness, diversity (default: facebook/dinov2-small)")
    monitor.add_argument("--patience", type=int, default=None, help="stop after N evaluations without improvement")
    monitor.add_argument("--min_delta", type=float, default=0.0)
    monitor.add_argument("--ssim_min", type=float, default=None, help="an epoch whose mean SSIM to the base is below this cannot be best")
    monitor.add_argument("--ssim_max", type=float, default=None, help="... or above this (the LoRA changed nothing)")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(args.seed)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    name = args.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(name, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(name, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(name, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler")
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    unet.to(accelerator.device)

    size = args.preview_size or args.resolution
    if args.preview_prompts:
        spec = PreviewSpec.load(args.preview_prompts, steps=args.preview_steps, width=size, height=size, seed=args.seed)
    else:
        spec = PreviewSpec.from_prompts(args.validation_prompt or ["a photo"], steps=args.preview_steps, width=size, height=size, seed=args.seed)
    spec = spec.with_seeds(args.seeds_per_prompt)
    preset = get_preset(args.preset)
    metrics = [args.monitor_metric or preset.metric, *preset.metrics, *(["val_loss"] if args.validation_dir else [])]
    bounds = {"ssim": (args.ssim_min, args.ssim_max)} if args.ssim_min is not None or args.ssim_max is not None else None
    monitor = LoraMonitor(  # lora-monitor: the modules already in memory, no second UNet
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=noise_scheduler,
        spec=spec, output_dir=output_dir / "monitor", preset=args.preset, metric=args.monitor_metric,
        metrics=tuple(dict.fromkeys(metrics)), references=args.refs_dir or args.train_data_dir, validation=args.validation_dir,
        clip_model=args.clip_model, dino_model=args.dino_model, strip_words=args.strip_words,
        patience=args.patience, min_delta=args.min_delta, bounds=bounds, every_n_epochs=args.preview_every_n_epochs,
        listeners=listeners_for(args.report_to),  # previews and scores in W&B / TensorBoard
    )

    items = load_image_folder(args.train_data_dir, args.resolution)
    pixels = torch.stack([pixel for pixel, _ in items])
    input_ids = tokenizer([c for _, c in items], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    dataloader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pixels, input_ids), batch_size=args.train_batch_size, shuffle=True)
    lora_parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lora_parameters, lr=args.learning_rate)

    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    monitor.attach(accelerator)  # lora-monitor: joins save_state/load_state and mixed precision
    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-lora-monitored", config={k: v for k, v in vars(args).items() if v is not None and not isinstance(v, list)})

    first_epoch = 0
    if args.resume_from_checkpoint:
        accelerator.load_state(args.resume_from_checkpoint)  # restores the monitor's history too
        first_epoch = int(Path(args.resume_from_checkpoint).name.split("-")[-1])
    global_step = first_epoch * len(dataloader)
    if args.resume_from_checkpoint:
        monitor.on_resume(first_epoch or None, global_step)  # lora-monitor: evaluates an epoch the checkpoint skipped
    progress = tqdm(total=args.num_train_epochs * len(dataloader), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)

    for epoch in range(first_epoch, args.num_train_epochs):
        unet.train()
        for pixel_values, ids in dataloader:
            with accelerator.accumulate(unet):
                latents = vae.encode(pixel_values.to(dtype=weight_dtype)).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device).long()
                noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
                encoder_hidden_states = text_encoder(ids, return_dict=False)[0]
                model_pred = unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
                loss = F.mse_loss(model_pred.float(), noise.float(), reduction="mean")
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            global_step += 1
            progress.update(1)
            accelerator.log({"train_loss": loss.item()}, step=global_step)
        accelerator.wait_for_everyone()

        report = monitor.on_epoch_end(epoch + 1, step=global_step)  # lora-monitor: previews, scores, best export
        if report is not None and accelerator.is_main_process:
            logger.info(report.decision.reason, main_process_only=True)
        if args.checkpointing_epochs and (epoch + 1) % args.checkpointing_epochs == 0:
            accelerator.save_state(str(output_dir / f"checkpoint-{epoch + 1}"))
        if monitor.should_stop:  # lora-monitor: obey the stop decision
            break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # the last epoch's LoRA, as the diffusers example saves it
        unet_lora_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(accelerator.unwrap_model(unet)))
        StableDiffusionPipeline.save_lora_weights(output_dir / "last", unet_lora_layers=unet_lora_layers, safe_serialization=True)
        best = monitor.best_epoch
        print(f"best epoch: {best} -> {output_dir / 'monitor' / 'best'}" if best is not None else "no epoch qualified as best")
        if monitor.should_stop:
            print(monitor.policy.stop_reason)
    monitor.close()
    accelerator.end_training()


if __name__ == "__main__":
    main()
