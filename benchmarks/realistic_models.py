"""Random-weight pipelines at the width of real models, built from configs (nothing downloads).

For the GPU runs of the benchmarks (benchmarks/gpu_check.sh): the GPU machine reaches no network, so
the models cannot be downloaded, and lora_monitor.tiny's "small" models are far too small to say
anything about a GPU. These keep the real architectures' widths (channels, hidden sizes, heads) so
that every matrix product has a real model's shape:

  sd     Stable Diffusion 1.5: the real UNet (860M), VAE and CLIP ViT-L/14 text encoder.
  sdxl   SDXL base 1.0: the real UNet (2.6B), VAE, CLIP ViT-L and OpenCLIP bigG text encoders.
  flux   FLUX.1-dev's widths (3072 wide, 24 heads of 128, T5-XXL 4096 wide, CLIP ViT-L, the 16-channel
         VAE) with fewer blocks: FLUX_DEPTH double/single blocks and T5 layers instead of 19/38/24,
         so that a 20-step 1024 px evaluation and the build, save and reloads fit the check's minutes.

What differs from the real models: random weights (images are noise; the timings do not depend on
the weights), a small character-level tokenizer (lora_monitor.tiny's: small embedding tables, the
same sequence lengths, 77 and 512 tokens), and Flux's depth. Flux's smaller T5 makes the example
way's text-encoder reload cheaper than with the real 4.7B T5-XXL, so it flatters (b), not the monitor.

    python benchmarks/realistic_models.py            # parameter counts (meta device, no memory)
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch

import common

common.use_checkout()

# Flux depth: double-stream blocks, single-stream blocks, T5 encoder layers (FLUX.1-dev: 19, 38, 24).
FLUX_DEPTH = {"double": 2, "single": 4, "t5_layers": 4}
# The preview side the GPU check renders each family at (the resolution each was trained for).
RESOLUTION = {"sd": 512, "sdxl": 1024, "flux": 1024}


def _clip_l(tokenizer, projection: bool = False):
    """CLIP ViT-L/14's text tower (SD 1.5's encoder; SDXL's and Flux's first)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def _clip_big_g(tokenizer):
    """OpenCLIP ViT-bigG/14's text tower with its projection (SDXL's second encoder)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return CLIPTextModelWithProjection(config)


def _t5_xxl(tokenizer, layers: int):
    """T5 v1.1 XXL's encoder width (4096, 64 heads, gated-GELU 10240) with `layers` layers."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=4096, d_kv=64, d_ff=10240, num_layers=layers, num_heads=64,
        relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        dropout_rate=0.0, is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    return T5EncoderModel(config)


def _vae(latent_channels: int, sample_size: int, **extra):
    """The SD/SDXL/Flux VAE architecture: 128-256-512-512 channels, scale factor 8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, latent_channels=latent_channels, norm_num_groups=32, sample_size=sample_size, **extra,
    )  # fmt: skip


def _build_sd(weights):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from lora_monitor.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    with weights():
        unet = UNet2DConditionModel(
            sample_size=64, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8,
        )  # fmt: skip
        vae, text_encoder = _vae(4, 512, scaling_factor=0.18215), _clip_l(tokenizer)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _build_sdxl(weights):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from lora_monitor.tiny import build_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_tokenizer()
    with weights():
        unet = UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280), layers_per_block=2,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(5, 10, 20), use_linear_projection=True, transformer_layers_per_block=(1, 2, 10),
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, norm_num_groups=32,
        )  # fmt: skip
        vae = _vae(4, 1024, scaling_factor=0.13025, force_upcast=True)
        text_encoder, text_encoder_2 = _clip_l(tokenizer), _clip_big_g(tokenizer_2)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False,
    )  # fmt: skip


def _build_flux(weights):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from lora_monitor.tiny import build_t5_tokenizer, build_tokenizer

    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    with weights():
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=FLUX_DEPTH["double"], num_single_layers=FLUX_DEPTH["single"],
            attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56),
        )  # fmt: skip
        vae = _vae(16, 1024, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611)
        text_encoder, text_encoder_2 = _clip_l(tokenizer), _t5_xxl(tokenizer_2, FLUX_DEPTH["t5_layers"])
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer,
    )  # fmt: skip


BUILDERS = {"sd": _build_sd, "sdxl": _build_sdxl, "flux": _build_flux}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_pipeline(family: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """The family's pipeline at real width with random weights, built directly on `device` in `dtype`
    (on a GPU this takes seconds where a CPU takes minutes)."""
    if family not in BUILDERS:
        raise ValueError(f"no realistic model for family {family!r}; choose one of {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed(seed)

    @contextlib.contextmanager
    def weights():  # modules only: schedulers and tokenizers stay on the CPU in their own dtypes
        with torch.device(device), _default_dtype(dtype):
            yield

    pipeline = BUILDERS[family](weights)
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def save_realistic_pipeline(path: str | Path, family: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> Path:
    """Build and save as a diffusers model folder (weights in `dtype`); an existing complete folder is reused."""
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    pipeline = build_pipeline(family, device, dtype)
    partial = path.with_name(path.name + ".partial")
    pipeline.save_pretrained(partial)
    partial.rename(path)
    del pipeline
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return path


def parameter_counts(family: str) -> dict[str, int]:
    """Parameters per module, counted on the meta device (nothing allocated)."""
    pipeline = build_pipeline(family, device="meta")
    return {name: sum(p.numel() for p in module.parameters()) for name, module in pipeline.components.items() if isinstance(module, torch.nn.Module)}


if __name__ == "__main__":
    for name in BUILDERS:
        counts = parameter_counts(name)
        print(f"{name:5s} " + ", ".join(f"{module} {count / 1e6:,.0f}M" for module, count in counts.items()) + f"; {RESOLUTION[name]} px")
