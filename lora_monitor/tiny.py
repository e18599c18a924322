"""A tiny Stable Diffusion pipeline built offline from configs with random weights.

Tests, the demo and the benchmarks use it in place of a downloaded model: it is saved with
save_pretrained and loaded back with from_pretrained, exactly as a real model folder is. Nothing
here touches the network.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

# Two sizes: "tiny" renders 4 images of 64 px with 4 steps in about a second on a 2-core CPU;
# "small" (a ~26M-parameter UNet) stands in for a real model in the benchmarks.
SIZES = {
    "tiny": dict(unet_channels=(32, 64), layers_per_block=2, text_hidden=32, text_layers=2, vae_channels=(32, 64)),
    "small": dict(unet_channels=(64, 128, 256), layers_per_block=2, text_hidden=64, text_layers=4, vae_channels=(32, 64)),
}


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


def build_tiny_pipeline(size: str = "tiny", seed: int = 0):
    """Build a StableDiffusionPipeline with random weights from configs (no download)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in SIZES:
        raise ValueError(f"unknown tiny model size {size!r}; choose one of {', '.join(SIZES)}")
    shape = SIZES[size]
    tokenizer = build_tokenizer()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
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
        # A freshly initialised final LayerNorm has zero bias; samplers that normalise by the mean
        # of the text embeddings (sd-scripts) then divide by ~0. A small bias keeps them finite.
        with torch.no_grad():
            final_norm = next(m for name, m in text_encoder.named_modules() if name.endswith("final_layer_norm"))
            final_norm.bias.normal_(0.0, 0.5)
    finally:
        torch.random.set_rng_state(state)
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


def save_tiny_pipeline(path: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build the tiny pipeline and save it as a diffusers model folder; return the folder.

    An existing complete folder is reused (its model_index.json marks it complete).
    """
    path = Path(path)
    if (path / "model_index.json").is_file():
        return path
    pipeline = build_tiny_pipeline(size=size, seed=seed)
    partial = path.with_name(path.name + ".partial")
    pipeline.save_pretrained(partial)
    partial.rename(path)
    return path
