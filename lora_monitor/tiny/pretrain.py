"""The demo's base model: a tiny Stable Diffusion pipeline pre-trained on coloured shapes, built once and cached.

A tiny model with random weights renders coloured noise, which shows the monitor's mechanics but no story.
This one is trained for a couple of minutes on a 2-core CPU (lora_monitor.tiny.shapes): its VAE on every
shape the world knows (a codec, as a real model's VAE encodes anything), then its UNet and text encoder on
circles and squares with captions ("a red circle"). Its renders are then recognisable shapes in the colour
asked for, and a LoRA can teach it something new.

The result is a diffusers model folder (save_pretrained), loaded with from_pretrained like any other, cached
under $LORA_MONITOR_CACHE (default ~/.cache/lora-monitor) as demo-base-<key>; the key hashes the recipe, so a
changed recipe builds a new folder. It is written to a temporary folder and renamed into place when complete.
A build is deterministic for a given number of torch threads; another thread count gives slightly other weights.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

# Bump when the training code changes what a recipe builds: the cache key changes with it.
RECIPE_VERSION = 2
RECIPE_FILE = "demo_recipe.json"


@dataclass(frozen=True)
class BaseRecipe:
    """How the base model is built. Every field is in the cache key."""

    size: int = 32  # image side in pixels; the VAE halves it, so the UNet works on size/2 latents
    images: int = 2048  # synthetic training images (drawn, not downloaded)
    vae_channels: tuple[int, ...] = (16, 32)
    vae_steps: int = 300
    vae_learning_rate: float = 3e-3
    unet_channels: tuple[int, ...] = (16, 32, 64)
    unet_steps: int = 1000
    learning_rate: float = 2e-3
    batch_size: int = 16
    caption_dropout: float = 0.1  # empty captions, so that classifier-free guidance has an unconditional model
    ema_decay: float = 0.995
    seed: int = 0

    def key(self) -> str:
        """A short hash of the recipe, the shapes it is trained on and RECIPE_VERSION: the cache folder's name."""
        text = json.dumps({"version": RECIPE_VERSION, "world": _world(), **dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def _world() -> dict:
    """What the synthetic images are made of (lora_monitor.tiny.shapes), for the cache key."""
    from lora_monitor.tiny import shapes

    return {name: getattr(shapes, name) for name in ("COLOURS", "BACKGROUNDS", "BASE_SHAPES", "SHAPES")}


DEMO_RECIPE = BaseRecipe()


def base_model_dir(recipe: BaseRecipe = DEMO_RECIPE, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the base model of `recipe` is cached: <cache>/demo-base-<key>."""
    from lora_monitor.scoring.brisque_model import cache_dir as default_cache_dir

    return Path(cache_dir if cache_dir is not None else default_cache_dir()) / f"demo-base-{recipe.key()}"


def is_complete(folder: Path) -> bool:
    """A cached base model is complete once its recipe file is written (the last file, inside the temporary folder)."""
    return (folder / "model_index.json").is_file() and (folder / RECIPE_FILE).is_file()


def pretrained_base(
    recipe: BaseRecipe = DEMO_RECIPE, cache_dir: str | os.PathLike | None = None, *, progress: bool = True
) -> tuple[Path, bool]:
    """The base model folder for `recipe` and whether it came from the cache; built (with a progress bar) when missing."""
    folder = base_model_dir(recipe, cache_dir)
    if is_complete(folder):
        return folder, True
    folder.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        pipeline = build_base(recipe, progress=progress)
        pipeline.save_pretrained(partial)
        (partial / RECIPE_FILE).write_text(
            json.dumps({"version": RECIPE_VERSION, "key": recipe.key(), "world": _world(), **dataclasses.asdict(recipe)}, indent=2), encoding="utf-8"
        )
        try:
            os.rename(partial, folder)
        except OSError:
            if not is_complete(folder):  # not another process finishing first: a real error
                raise
            shutil.rmtree(partial, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return folder, False


def build_base(recipe: BaseRecipe = DEMO_RECIPE, *, progress: bool = True):
    """Train the base model of `recipe` and return it as a StableDiffusionPipeline (v-prediction, DDIM sampler)."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from tqdm.auto import tqdm

    from lora_monitor.tiny.models import _seeded
    from lora_monitor.tiny.shapes import BASE_SHAPES, SHAPES, shape_batch
    from lora_monitor.tiny.tokenizers import build_tokenizer

    if recipe.size % 8:
        raise ValueError(f"BaseRecipe.size must be a multiple of 8, got {recipe.size}")
    bar = tqdm(total=recipe.vae_steps + recipe.unet_steps, desc="pre-training the demo's base model (once)", unit="step", disable=not progress)
    generator = torch.Generator().manual_seed(recipe.seed)
    with _seeded(recipe.seed):
        vae, tokenizer, text_encoder, unet = _build_modules(recipe, build_tokenizer())
    codec_images, _ = shape_batch(recipe.images, recipe.seed + 1, size=recipe.size, shapes=SHAPES)
    _train_vae(vae, codec_images, recipe, generator, bar)
    del codec_images
    images, captions = shape_batch(recipe.images, recipe.seed, size=recipe.size, shapes=BASE_SHAPES)
    with torch.no_grad():
        latents = torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)])
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    latents = latents * vae.config.scaling_factor
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", prediction_type="v_prediction")
    unet, text_encoder = _train_denoiser(unet, text_encoder, tokenizer, latents, captions, DDPMScheduler(**schedule), recipe, generator, bar)
    bar.close()
    sampler = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=tokenizer, unet=unet.eval(), scheduler=sampler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def _build_modules(recipe: BaseRecipe, tokenizer):
    """The VAE (no attention: it costs more than everything else at this size), the text encoder and the UNet."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from lora_monitor.tiny.models import _clip_encoder

    levels = len(recipe.vae_channels)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=recipe.vae_channels, latent_channels=4, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        norm_num_groups=8, sample_size=recipe.size, mid_block_add_attention=False,
    )
    text_encoder = _clip_encoder(tokenizer, hidden=32, layers=2)
    depth = len(recipe.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=recipe.size // 2 ** (levels - 1), in_channels=4, out_channels=4, block_out_channels=recipe.unet_channels,
        layers_per_block=1, down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (depth - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (depth - 1) + ("UpBlock2D",), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=8,  # not 32: with 16 or 32 channels that normalises each channel alone and wipes out colour
    )
    return vae, tokenizer, text_encoder, unet


def _schedule(optimizer, steps: int):
    """A short warm-up to the optimizer's learning rate, then a cosine decay to almost nothing."""
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, optimizer.param_groups[0]["lr"], total_steps=steps, pct_start=0.05)


def _train_vae(vae, images: torch.Tensor, recipe: BaseRecipe, generator: torch.Generator, bar) -> None:
    """Reconstruction (MSE) with a tiny KL term, as latent diffusion's VAEs are trained (less the perceptual losses)."""
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_learning_rate)
    scheduler = _schedule(optimizer, recipe.vae_steps)
    bar.set_postfix_str("VAE")
    for step in range(recipe.vae_steps):
        batch = images[torch.randint(0, len(images), (recipe.batch_size * 2,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        bar.update()
        if step % 25 == 0:
            bar.set_postfix_str(f"VAE, loss {loss.item():.4f}")
    vae.eval()
    # A few hundred steps leave the posterior wide (std ~0.4 against latents of std ~1). The denoiser learns the
    # posterior mean, and a LoRA loop that samples the posterior (as diffusers' scripts do) would learn noisy
    # latents instead; a posterior std of e^-6 makes both the same. The decoder, trained on samples, is unchanged.
    with torch.no_grad():
        half = vae.quant_conv.out_channels // 2  # (mean, log variance) channels
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -12.0


def _train_denoiser(unet, text_encoder, tokenizer, latents, captions, noise_scheduler, recipe: BaseRecipe, generator, bar):
    """The UNet and the text encoder together (v-prediction), with caption dropout; returns their EMA copies."""
    texts = sorted(set(captions)) + [""]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    index = torch.tensor([texts.index(text) for text in captions])
    empty = len(texts) - 1
    unet.train()
    text_encoder.train()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=recipe.learning_rate, weight_decay=0.0)
    scheduler = _schedule(optimizer, recipe.unet_steps)
    ema_unet, ema_text_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    averaged = [*ema_unet.parameters(), *ema_text_encoder.parameters()]
    bar.set_postfix_str("UNet")
    for step in range(recipe.unet_steps):
        chosen = torch.randint(0, len(latents), (recipe.batch_size,), generator=generator)
        batch, caption_index = latents[chosen], index[chosen].clone()
        caption_index[torch.rand(recipe.batch_size, generator=generator) < recipe.caption_dropout] = empty
        noise = torch.randn(batch.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (recipe.batch_size,), generator=generator)
        # every caption once a step (there are only a few), picked by a product with one-hot rows: indexing's backward
        # adds up gradients in an order that varies with the threads, and the build would then vary from run to run
        choice = torch.nn.functional.one_hot(caption_index, len(texts)).to(latents.dtype)
        embeddings = torch.einsum("bc,ctd->btd", choice, text_encoder(ids)[0])
        prediction = unet(noise_scheduler.add_noise(batch, noise, timesteps), timesteps, embeddings).sample
        loss = torch.nn.functional.mse_loss(prediction, noise_scheduler.get_velocity(batch, noise, timesteps))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, parameter in zip(averaged, parameters):
                average.lerp_(parameter, 1 - decay)
        bar.update()
        if step % 25 == 0:
            bar.set_postfix_str(f"UNet, loss {loss.item():.4f}")
    return ema_unet, ema_text_encoder
