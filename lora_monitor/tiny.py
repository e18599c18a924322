"""Tiny diffusion pipelines built offline from configs with random weights.

Tests, the demo and the benchmarks use them in place of a downloaded model: each is saved with
save_pretrained and loaded back with from_pretrained, exactly as a real model folder is. Nothing
here touches the network: every tokenizer is built in code from a small character-level vocabulary.

One pipeline per model family (TINY_FAMILIES): "sd" (the default, StableDiffusionPipeline), "sdxl",
"sd3", "flux", "sana" and, where the installed diffusers has them, "lumina2", "qwenimage" and
"chroma". available_tiny_families() says which of them the installed diffusers can build.

Rendering one: TINY_IMAGE_SIZE[family] is the smallest image side the family's architecture takes
(pass it as height and width) and TINY_RENDER_KWARGS[family] the pipeline arguments a tiny model
needs on top (Sana must not snap the size to its 512/1024 px resolution bins).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from pathlib import Path

import torch

from lora_monitor.families import get_family

# Two sizes: "tiny" renders 4 images of 64 px with 4 steps in about a second on a 2-core CPU;
# "small" (a ~26M-parameter UNet) stands in for a real model in the benchmarks.
SIZES = {
    "tiny": dict(unet_channels=(32, 64), layers_per_block=2, text_hidden=32, text_layers=2, vae_channels=(32, 64)),
    "small": dict(unet_channels=(64, 128, 256), layers_per_block=2, text_hidden=64, text_layers=4, vae_channels=(32, 64)),
}

TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux", "sana", "lumina2", "qwenimage", "chroma")

# The sizes each family can be built in: "tiny" for all; "small", a benchmark stand-in for a real
# model, for "sd", "sdxl" and "flux" (set below with their size tables).
FAMILY_SIZES = {family: ("tiny",) for family in TINY_FAMILIES}
FAMILY_SIZES["sd"] = tuple(SIZES)

# The image side (px) to render each tiny pipeline at: 32 for all, the smallest of 32/64 every
# architecture takes. The tiny VAEs scale by 2 (but Lumina2's by 8: Lumina2Pipeline assumes 8), so
# 32 px is a 16x16 latent: SD3, Flux, Chroma, QwenImage and Lumina2 patch it 2x2 (Lumina2: 2x2
# tokens of a 4x4 latent), Sana wants sides divisible by 32, SD/SDXL by 8. The monitor's own SD tests
# render at 64 px.
TINY_IMAGE_SIZE = {family: 32 for family in TINY_FAMILIES}

# Pipeline arguments a tiny model needs on top of prompt/height/width/steps/generator.
TINY_RENDER_KWARGS: dict[str, dict] = {family: {} for family in TINY_FAMILIES}
# Sana snaps height/width to its aspect-ratio bins (512 px and up) unless told not to, and rejects a
# transformer whose sample_size is not 16/32/64 when binning.
# (diffusers 0.32's Sana also cleans captions by default, which wants Beautiful Soup and warns without it.)
TINY_RENDER_KWARGS["sana"] = {"use_resolution_binning": False, "clean_caption": False}


# peft target modules for a LoRA on each family's denoiser (pipeline.unet for sd/sdxl,
# pipeline.transformer otherwise): the attention projections, present in all of them under these names.
LORA_TARGET_MODULES: dict[str, list[str]] = {family: ["to_q", "to_k", "to_v", "to_out.0"] for family in TINY_FAMILIES}


def denoiser(pipeline) -> torch.nn.Module:
    """The pipeline's denoiser, the module a LoRA trains: its UNet, or its transformer."""
    unet = getattr(pipeline, "unet", None)
    return unet if unet is not None else pipeline.transformer


def available_tiny_families() -> tuple[str, ...]:
    """The families whose pipeline class the installed diffusers has, in TINY_FAMILIES order."""
    import diffusers

    return tuple(family for family in TINY_FAMILIES if hasattr(diffusers, get_family(family).pipeline))


def pipeline_class(family: str):
    """The diffusers pipeline class of a family (the family table's); a clear error when the installed diffusers lacks it."""
    return get_family(family).pipeline_class()


# ---------------------------------------------------------------------------------------------
# Tokenizers, built in code


def _bytes_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet (GPT-2/CLIP): every byte gets a printable unicode character."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(char) for byte, char in zip(printable, chars)}


def build_tokenizer(max_length: int = 77):
    """A CLIPTokenizer over a byte-level vocabulary with no merges: every character is a token."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        merges_file = Path(folder) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
        merges_file.write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=max_length, pad_token="<|endoftext|>")
    return tokenizer


# Printable ASCII but the space: the alphabet of the T5 and Gemma tokenizers (one token per character).
_ASCII = [chr(code) for code in range(33, 127)]


def _load_tokenizer(cls, backend, config: dict):
    """Write a `tokenizers` backend and its config as a tokenizer folder and load it with cls.

    Loading rather than wrapping makes the built tokenizer exactly what from_pretrained gives back
    after save_pretrained, in transformers 4 (which reads tokenizer.json as is) and 5 (which rebuilds
    the backend from the vocabulary in the class's own way).
    """
    with tempfile.TemporaryDirectory() as folder:
        backend.save(str(Path(folder) / "tokenizer.json"))
        (Path(folder) / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        return cls.from_pretrained(folder)


def build_t5_tokenizer(max_length: int = 512):
    """A T5TokenizerFast (SentencePiece-style Unigram) whose pieces are single characters; no sentinels."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in _ASCII]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    backend.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    backend.add_special_tokens(["<pad>", "</s>", "<unk>"])
    config = dict(
        tokenizer_class="T5Tokenizer", model_max_length=max_length, extra_ids=0, additional_special_tokens=[],
        eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
    )
    return _load_tokenizer(T5TokenizerFast, backend, config)


def build_gemma_tokenizer(max_length: int = 2048):
    """A GemmaTokenizerFast (BPE with byte fallback, no merges): one token per character, <bos> first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import GemmaTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    vocab = {token: index for index, token in enumerate(specials)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in ["▁"] + _ASCII:
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=True, unk_token="<unk>", byte_fallback=True, dropout=None))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous", invert=False)
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single=["<bos>", "$A"], pair=["<bos>", "$A", "<bos>", "$B"], special_tokens=[("<bos>", vocab["<bos>"])]
    )
    backend.add_special_tokens(specials)
    config = dict(
        tokenizer_class="GemmaTokenizer", model_max_length=max_length, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
        unk_token="<unk>", mask_token="<mask>", add_bos_token=True, add_eos_token=False, padding_side="right",
    )
    return _load_tokenizer(GemmaTokenizerFast, backend, config)


_QWEN_PRETOKENIZE = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Whole-word tokens for the words of QwenImagePipeline's prompt template. The pipeline drops the
# first 34 tokens of every encoded prompt (the template's system part, 34 tokens with Qwen's own
# vocabulary); with these words merged the tiny tokenizer spends exactly 34 on it too, so what is
# left is the prompt itself rather than most of an instruction every prompt shares.
_QWEN_WORDS = ["system", "user", "assistant", "Describe"]
_QWEN_SPACED_WORDS = (
    "the image by detailing color shape size texture quantity text spatial relationships of objects and background"
).split()


def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level alphabet, a merge chain for each template word (space-prefixed words first, so
    that no bare-word merge can split them), then the special tokens."""
    alphabet = _bytes_to_unicode()
    space = alphabet[ord(" ")]
    vocab = {char: index for index, char in enumerate(alphabet.values())}
    merges = []
    for word in [space + word for word in _QWEN_SPACED_WORDS] + _QWEN_WORDS:
        for end in range(2, len(word) + 1):
            if word[:end] not in vocab:
                merges.append((word[: end - 1], word[end - 1]))
                vocab[word[:end]] = len(vocab)
    for token in _QWEN_SPECIALS:
        vocab[token] = len(vocab)
    return vocab, merges


def build_qwen_tokenizer(max_length: int = 32768):
    """A Qwen2TokenizerFast (byte-level BPE): one token per byte but for the words of QwenImage's
    prompt template, plus Qwen's chat tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import Qwen2TokenizerFast

    vocab, merges = _qwen_vocab_and_merges()
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="", end_of_word_suffix="",
                   fuse_unk=False, byte_fallback=False)
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(_QWEN_PRETOKENIZE), behavior="isolated", invert=False),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens(_QWEN_SPECIALS)
    config = dict(
        tokenizer_class="Qwen2Tokenizer", model_max_length=max_length, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, add_prefix_space=False, errors="replace", additional_special_tokens=_QWEN_SPECIALS[1:],
    )
    return _load_tokenizer(Qwen2TokenizerFast, backend, config)


# ---------------------------------------------------------------------------------------------
# Building blocks


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
FAMILY_SIZES["sdxl"] = tuple(SDXL_SIZES)
FAMILY_SIZES["flux"] = tuple(FLUX_SIZES)


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


def build_tiny_pipeline(size: str = "tiny", seed: int = 0, family: str = "sd"):
    """Build a pipeline of the family with random weights from configs (no download).

    The weights depend on seed only; torch's global RNG state is restored afterwards.
    """
    pipeline_class(family)  # a clear error for an unknown family or one the installed diffusers lacks
    if size not in FAMILY_SIZES[family]:
        raise ValueError(f"unknown tiny model size {size!r} for family {family!r}; choose one of {', '.join(FAMILY_SIZES[family])}")
    with _seeded(seed):
        pipeline = _BUILDERS[family](size)
    # eval mode, as from_pretrained leaves every model: a model built from its config is in training
    # mode, where any dropout would make renders random and unlike the saved model's
    for component in pipeline.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipeline


def save_tiny_pipeline(path: str | Path, size: str = "tiny", seed: int = 0, family: str = "sd") -> Path:
    """Build the tiny pipeline and save it as a diffusers model folder; return the folder.

    An existing complete folder is reused (its model_index.json marks it complete).
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    pipeline = build_tiny_pipeline(size=size, seed=seed, family=family)
    partial = path.with_name(path.name + ".partial")
    pipeline.save_pretrained(partial)
    partial.rename(path)
    return path
