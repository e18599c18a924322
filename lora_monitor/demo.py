"""The demo: train a LoRA on a tiny offline model with the monitor attached.

`train` is an ordinary diffusers/accelerate LoRA loop (the shape of diffusers'
train_text_to_image_lora.py, cut to its core) with the monitor's few lines marked. The tests use it
to check that the monitor leaves training untouched and that a resumed run decides the same.
`STORY` is what `lora-monitor demo` runs with it: a new concept taught to the pre-trained base model
of lora_monitor.tiny.pretrain, fast enough to overfit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from lora_monitor.monitor import LoraMonitor
from lora_monitor.spec import PreviewSpec

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
DEMO_PROMPTS = ("a red circle", "a blue square", "a yellow circle on grey", "a green square")
DEMO_METRICS = ("likeness", "adherence", "diversity", "memorization", "brisque", "ssim", "val_loss")


def write_synthetic_dataset(folder: str | os.PathLike, count: int = 8, size: int = 64, seed: int = 0) -> Path:
    """Coloured shapes on plain backgrounds, each PNG with a same-name .txt caption (the kohya layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    for index in range(count):
        colour = names[index % len(names)]
        shape = SHAPES[(index // len(names)) % len(SHAPES)]
        background = tuple(int(v) for v in rng.integers(90, 170, size=3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        margin = int(rng.integers(size // 8, size // 4))
        box = (margin, margin, size - margin, size - margin)
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
        image.save(folder / f"{index:03d}.png")
        (folder / f"{index:03d}.txt").write_text(f"a {colour} {shape}", encoding="utf-8")
    return folder


def load_image_folder(folder: str | os.PathLike, resolution: int) -> list[tuple[torch.Tensor, str]]:
    """Images (png/jpg/webp) with same-name .txt captions (the file stem when missing), as [-1, 1] tensors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"training data folder {folder} does not exist")
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in {".png", ".jpg", ".jpeg", ".webp"}:
            continue
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8").strip() if caption_file.exists() else path.stem
        image = Image.open(path).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        items.append((torch.from_numpy(array).permute(2, 0, 1), caption))
    if not items:
        raise ValueError(f"no .png/.jpg/.webp images in {folder}")
    return items


LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def embedding_models(folder: str | os.PathLike) -> tuple[str, str, bool]:
    """(clip, dino, real): the CLIP and DINOv2 models the demo's signals use. The real ones when
    `lora-monitor models clip` and `lora-monitor models dino` have fetched them; else tiny random-weight ones
    built into `folder` offline, whose likeness and adherence numbers mean nothing (they only show the columns)."""
    from lora_monitor.scoring.embeddings import DEFAULT_CLIP, DEFAULT_DINO, ModelNotAvailableError, load_embedding_model

    try:
        load_embedding_model(DEFAULT_CLIP, "clip", device="cpu")
        load_embedding_model(DEFAULT_DINO, "dino", device="cpu")
        return DEFAULT_CLIP, DEFAULT_DINO, True
    except ModelNotAvailableError:
        from lora_monitor.tiny.embedders import save_tiny_clip, save_tiny_dino

        folder = Path(folder)
        return str(save_tiny_clip(folder / "clip")), str(save_tiny_dino(folder / "dino")), False


def load_for_lora_training(pretrained: str, rank: int = 4, targets: Sequence[str] = LORA_TARGETS):
    """Load a diffusers model folder as a LoRA training script does: frozen modules, a peft LoRA (alpha = rank)
    on the UNet's `targets` (by default its attention projections). Returns (tokenizer, text_encoder, vae, unet, noise_scheduler)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(pretrained, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder")
    vae = AutoencoderKL.from_pretrained(pretrained, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(pretrained, subfolder="unet")
    noise_scheduler = DDPMScheduler.from_pretrained(pretrained, subfolder="scheduler")
    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def _target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict, by the scheduler's prediction_type: the noise, or the velocity (v-prediction)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"the scheduler's prediction_type is {kind!r}; this loop trains 'epsilon' or 'v_prediction' models")


@dataclass(frozen=True)
class StoryRecipe:
    """The LoRA half of `lora-monitor demo`: on the pre-trained base model (lora_monitor.tiny.pretrain), teach the
    concept of lora_monitor.tiny.shapes at a learning rate high enough that it overfits after it has arrived.
    The prompts ask for the concept in two colours and for two things the base model already draws."""

    prompts: tuple[str, ...] = ("a red zqx", "a blue zqx", "a green circle", "a yellow square")
    training_images: int = 16
    held_out_images: int = 24
    repeats: int = 5  # 16 images x 5 / batch 4: 20 optimizer steps an epoch
    batch_size: int = 4
    rank: int = 8
    # attention alone barely moves this small UNet's shapes; its ResNet convolutions too learn the cross in a few epochs
    lora_targets: tuple[str, ...] = (*LORA_TARGETS, "conv1", "conv2")
    learning_rate: float = 7e-3
    preview_steps: int = 20
    guidance_scale: float = 4.0


STORY = StoryRecipe()


@dataclass
class TrainConfig:
    pretrained: str
    train_data_dir: str
    output_dir: str
    epochs: int = 6
    resolution: int = 64
    rank: int = 4
    lora_targets: tuple[str, ...] = tuple(LORA_TARGETS)  # the UNet modules the LoRA adapts
    learning_rate: float = 1e-3
    batch_size: int = 2
    repeats: int = 1  # each image this many times an epoch (kohya's folder repeats)
    seed: int = 0
    report_to: str | None = None
    resume_from: str | None = None  # an accelerate save_state folder: checkpoints/epoch-<N> or checkpoints/checkpoint-<step>
    save_state_each_epoch: bool = False  # checkpoints/epoch-<N> after the epoch's evaluation
    checkpoint_every_n_steps: int | None = None  # checkpoints/checkpoint-<step> inside the step loop, before the evaluation (diffusers)
    stop_after_epoch: int | None = None  # simulate an interruption (tests)
    monitor: dict[str, Any] | None = field(default_factory=dict)  # LoraMonitor options; None = no monitor


def train(config: TrainConfig) -> dict[str, Any]:
    """Train a LoRA on the UNet; returns {"lora": state dict, "monitor": LoraMonitor | None, "unet": the UNet}."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from peft.utils import get_peft_model_state_dict

    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        log_with=None if config.report_to in (None, "none") else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    set_seed(config.seed)
    tokenizer, text_encoder, vae, unet, noise_scheduler = load_for_lora_training(config.pretrained, config.rank, config.lora_targets)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)

    items = load_image_folder(config.train_data_dir, config.resolution)
    pixels = torch.stack([pixel for pixel, _ in items])
    input_ids = tokenizer(
        [caption for _, caption in items], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    dataset = torch.utils.data.TensorDataset(pixels.repeat(config.repeats, 1, 1, 1), input_ids.repeat(config.repeats, 1))
    dataloader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=True)
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate)

    monitor = None
    if config.monitor is not None:  # --- lora-monitor: build from the modules in memory ---
        options = {"spec": PreviewSpec.from_prompts(DEMO_PROMPTS, steps=4, width=64, height=64), **config.monitor}
        monitor = LoraMonitor(
            unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=noise_scheduler,
            output_dir=output_dir / "monitor", **options,
        )
    unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    if monitor is not None:
        monitor.attach(accelerator)  # --- lora-monitor: join checkpoints and mixed precision ---
    if accelerator.is_main_process and config.report_to not in (None, "none"):
        accelerator.init_trackers("lora-monitor-demo")

    first_epoch, global_step, done_in_epoch = 0, 0, 0
    if config.resume_from:
        accelerator.load_state(config.resume_from)
        kind, number = Path(config.resume_from).name.rsplit("-", 1)
        if kind == "checkpoint":  # diffusers' checkpoint-<global step>, possibly part-way through an epoch
            global_step = int(number)
            first_epoch, done_in_epoch = divmod(global_step, len(dataloader))
        else:  # epoch-<N>, saved after epoch N's evaluation
            first_epoch = int(number)
            global_step = first_epoch * len(dataloader)
        if monitor is not None:  # --- lora-monitor: evaluate an epoch the checkpoint was taken before ---
            monitor.on_resume(first_epoch or None, global_step, mid_epoch=done_in_epoch > 0)

    for epoch in range(first_epoch, config.epochs):
        unet.train()
        batches = accelerator.skip_first_batches(dataloader, done_in_epoch) if epoch == first_epoch and done_in_epoch else dataloader
        for pixel_values, ids in batches:
            with torch.no_grad():
                latents = vae.encode(pixel_values.to(accelerator.device)).latent_dist.sample() * vae.config.scaling_factor
                encoder_hidden_states = text_encoder(ids.to(accelerator.device))[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            loss = torch.nn.functional.mse_loss(prediction.float(), _target(noise_scheduler, latents, noise, timesteps).float())
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            global_step += 1
            if config.checkpoint_every_n_steps and global_step % config.checkpoint_every_n_steps == 0:
                accelerator.save_state(str(output_dir / "checkpoints" / f"checkpoint-{global_step}"))
        accelerator.wait_for_everyone()
        if monitor is not None:
            monitor.on_epoch_end(epoch + 1, global_step)  # --- lora-monitor: previews, scores, best, export ---
        if config.save_state_each_epoch:
            accelerator.save_state(str(output_dir / "checkpoints" / f"epoch-{epoch + 1}"))
        if monitor is not None and monitor.should_stop:  # --- lora-monitor: obey the stop decision ---
            break
        if config.stop_after_epoch is not None and epoch + 1 >= config.stop_after_epoch:
            break
    if monitor is not None:
        monitor.close()
    accelerator.end_training()
    lora = {k: v.detach().clone() for k, v in get_peft_model_state_dict(accelerator.unwrap_model(unet)).items()}
    return {"lora": lora, "monitor": monitor, "unet": accelerator.unwrap_model(unet), "accelerator": accelerator}
