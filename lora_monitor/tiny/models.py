"""The tiny models of each family: building blocks (text encoders, VAEs) and one builder per family.

Each builder returns the family's pipeline with random weights from configs; build_tiny_pipeline runs it
inside _seeded(seed). The sizes: "tiny" for every family; "small", a benchmark stand-in for a real model,
for "sd", "sdxl" and "flux".
"""
from __future__ import annotations

import contextlib

import torch

from lora_monitor.tiny.tokenizers import build_gemma_tokenizer, build_qwen_tokenizer, build_t5_tokenizer, build_tokenizer

# Two sizes: "tiny" renders 4 images of 64 px with 4 steps in about a second on a 2-core CPU;
# "small" (a ~26M-parameter UNet) stands in for a real model in the benchmarks.
SIZES = {
    "tiny": dict(unet_channels=(32, 64), layers_per_block=2, text_hidden=32, text_layers=2, vae_channels=(32, 64)),
    "small": dict(unet_channels=(64, 128, 256), layers_per_block=2, text_hidden=64, text_layers=4, vae_channels=(32, 64)),
}

@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global RNG for weight initialisation; restore the caller's state afterwards."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _perturb_final_norm(text_encoder) -> None:
    """A freshly initialised final LayerNorm has zero bias; samplers that normalise by the mean of the
    text embeddings (sd-scripts) then divide by ~0. A small bias keeps them finite."""
    with torch.no_grad():
        final_norm = next(m for name, m in text_encoder.named_modules() if name.endswith("final_layer_norm"))
        final_norm.bias.normal_(0.0, 0.5)


def _randomise_zero_weights(module: torch.nn.Module, std: float = 0.02) -> None:
    """Give small random values to weight matrices that initialised to all zeros (zero-init output
    projections make a random denoiser ignore its input or its prompt). None of the denoisers here
    zero-inits in diffusers 0.32 or 0.42; this guards against a version that does."""
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.normal_(0.0, std)


def _clip_encoder(tokenizer, hidden: int, layers: int, projection: int | None = None):
    """A CLIPTextModel, or a CLIPTextModelWithProjection when projection is given."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoder = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    _perturb_final_norm(encoder)
    return encoder


def _t5_encoder(tokenizer, d_model: int = 32, layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=layers,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _gemma2_encoder(tokenizer, hidden: int = 32, layers: int = 2):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=hidden // 2,
        query_pre_attn_scalar=hidden // 2,
        max_position_embeddings=2048,
        sliding_window=64,
        # no soft-capping: eager and sdpa attention then agree, whichever a loader picks
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma2Model(config)


def _kl_vae(latent_channels: int, channels=(16, 32), groups: int = 8, **extra):
    """An AutoencoderKL with a scale factor of 2 ** (len(channels) - 1)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * len(channels),
        up_block_types=("UpDecoderBlock2D",) * len(channels),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=groups,
        sample_size=32,
        **extra,
    )


def _flow_vae(channels=(16, 32)):
    """The SD3/Flux/Lumina2/Chroma-style VAE: 16 latent channels, no quant convs, shift and scale."""
    return _kl_vae(16, channels, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)


# ---------------------------------------------------------------------------------------------
# One builder per family: each returns the pipeline; it runs inside _seeded(seed).


def _build_sd(size: str):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    shape = SIZES[size]
    tokenizer = build_tokenizer()
    channels = shape["unet_channels"]
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (len(channels) - 1)
    up = ["CrossAttnUpBlock2D"] * (len(channels) - 1) + ["UpBlock2D"]
    unet = UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=shape["layers_per_block"],
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        cross_attention_dim=shape["text_hidden"],
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae_channels = shape["vae_channels"]
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["text_hidden"],
        intermediate_size=shape["text_hidden"] * 2,
        num_hidden_layers=shape["text_layers"],
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
    _perturb_final_norm(text_encoder)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


# "tiny" renders in well under a second; "small" (~30M parameters in the denoiser) stands in
# for a real model in the benchmarks, like "sd"'s "small".
SDXL_SIZES = {
    "tiny": dict(unet_channels=(32, 64), layers_per_block=1, heads=(2, 4), transformer_layers=(1, 1), text_hidden=32,
                 text_layers=2, time_embed_dim=8, vae_channels=(16, 32), vae_groups=8, unet_groups=8),
    "small": dict(unet_channels=(64, 128, 256), layers_per_block=2, heads=(1, 2, 4), transformer_layers=(1, 1, 2), text_hidden=64,
                  text_layers=4, time_embed_dim=32, vae_channels=(32, 64), vae_groups=32, unet_groups=32),
}
FLUX_SIZES = {
    "tiny": dict(heads=2, head_dim=16, axes=(4, 6, 6), double=1, single=1, clip_hidden=32, clip_layers=2, t5_width=32, t5_layers=2),
    "small": dict(heads=6, head_dim=64, axes=(16, 24, 24), double=3, single=6, clip_hidden=64, clip_layers=4, t5_width=64, t5_layers=2),
}


def _build_sdxl(size: str):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    shape = SDXL_SIZES[size]
    hidden = shape["text_hidden"]
    tokenizer = build_tokenizer()
    tokenizer_2 = build_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=hidden, layers=shape["text_layers"])
    text_encoder_2 = _clip_encoder(tokenizer_2, hidden=hidden, layers=shape["text_layers"], projection=hidden)
    channels = shape["unet_channels"]
    time_embed_dim = shape["time_embed_dim"]
    unet = UNet2DConditionModel(
        sample_size=16 if size == "tiny" else 32,
        in_channels=4,
        out_channels=4,
        block_out_channels=channels,
        layers_per_block=shape["layers_per_block"],
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(channels) - 1) + ("UpBlock2D",),
        attention_head_dim=shape["heads"],  # SDXL's configs name the head count so
        use_linear_projection=True,
        transformer_layers_per_block=shape["transformer_layers"],
        cross_attention_dim=hidden * 2,  # the two encoders' penultimate hidden states, concatenated
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + hidden,  # six time ids + the pooled projection
        norm_num_groups=shape["unet_groups"],
    )
    vae = _kl_vae(4, shape["vae_channels"], groups=shape["vae_groups"])
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )


def _build_sd3(size: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = build_tokenizer(), build_tokenizer(), build_t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=32, layers=2, projection=32)
    text_encoder_2 = _clip_encoder(tokenizer_2, hidden=32, layers=2, projection=32)
    # the CLIP hidden states (32 + 32) are padded to the T5 width and joined with the T5 tokens
    text_encoder_3 = _t5_encoder(tokenizer_3, d_model=64)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,  # = heads * head dim
        pooled_projection_dim=32 + 32,
        pos_embed_max_size=16,
    )
    _randomise_zero_weights(transformer)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def _build_flux(size: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    shape = FLUX_SIZES[size]
    tokenizer, tokenizer_2 = build_tokenizer(), build_t5_tokenizer()
    text_encoder = _clip_encoder(tokenizer, hidden=shape["clip_hidden"], layers=shape["clip_layers"])
    text_encoder_2 = _t5_encoder(tokenizer_2, d_model=shape["t5_width"], layers=shape["t5_layers"])
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,  # 16 latent channels packed in 2x2 patches
        num_layers=shape["double"],
        num_single_layers=shape["single"],
        attention_head_dim=shape["head_dim"],
        num_attention_heads=shape["heads"],
        joint_attention_dim=shape["t5_width"],
        pooled_projection_dim=shape["clip_hidden"],  # CLIP's pooled output
        guidance_embeds=True,
        axes_dims_rope=shape["axes"],  # sums to the head dim
    )
    _randomise_zero_weights(transformer)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def _build_chroma(size: str):
    from diffusers import ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = build_t5_tokenizer()
    text_encoder = _t5_encoder(tokenizer, d_model=32)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16 * 4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    _randomise_zero_weights(transformer)
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_flow_vae(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def _build_sana(size: str):
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    tokenizer = build_gemma_tokenizer()
    text_encoder = _gemma2_encoder(tokenizer, hidden=32)
    transformer = SanaTransformer2DModel(
        in_channels=32,
        out_channels=32,
        num_attention_heads=2,
        attention_head_dim=16,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=16,
        cross_attention_dim=32,
        caption_channels=32,  # Gemma width
        sample_size=16,
        patch_size=1,
    )
    _randomise_zero_weights(transformer)
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(16, 32),
        decoder_block_out_channels=(16, 32),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    # Sana's own sampler: flow-matching DPM-Solver++
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True, flow_shift=3.0, prediction_type="flow_prediction", algorithm_type="dpmsolver++", solver_order=2
    )
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)


def _build_lumina2(size: str):
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    tokenizer = build_gemma_tokenizer()
    text_encoder = _gemma2_encoder(tokenizer, hidden=32)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=16,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(512, 64, 64),
        cap_feat_dim=32,
    )
    _randomise_zero_weights(transformer)
    return Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        # Lumina2Pipeline takes the VAE scale factor to be 8 whatever the VAE: four blocks
        vae=_flow_vae(channels=(16, 16, 16, 16)),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )


def _build_qwenimage(size: str):
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = build_qwen_tokenizer()
    ids = tokenizer.convert_tokens_to_ids
    hidden = 32
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": hidden * 2,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_scaling": {"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},  # sums to head dim / 2
            "rope_theta": 1000000.0,
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|endoftext|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": hidden},
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        bos_token_id=ids("<|endoftext|>"),
        eos_token_id=ids("<|endoftext|>"),
        pad_token_id=ids("<|endoftext|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(config)
    z_dim = 16
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=z_dim * 4,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=hidden,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    _randomise_zero_weights(transformer)
    # Attention spreads over every text and image token alike in a random transformer, and the
    # prompt's few tokens then barely move the image: larger text values give the prompt about the
    # weight it has in the other tiny families.
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if name.endswith("add_v_proj.weight"):
                parameter.mul_(3.0)
    vae = AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=z_dim,
        dim_mult=[1, 2],
        num_res_blocks=1,
        temperal_downsample=[False],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


_BUILDERS = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "sana": _build_sana,
    "lumina2": _build_lumina2,
    "qwenimage": _build_qwenimage,
    "chroma": _build_chroma,
}


# The sizes each family can be built in.
FAMILY_SIZES = {family: ("tiny",) for family in _BUILDERS}
FAMILY_SIZES.update(sd=tuple(SIZES), sdxl=tuple(SDXL_SIZES), flux=tuple(FLUX_SIZES))
