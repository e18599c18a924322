"""Tiny CLIP and DINOv2 models with random weights, saved as model folders (no download).

Tests load them with EmbeddingModel(folder, kind) exactly as a hub model is loaded. The CLIP folder
holds a preprocessor_config.json in CLIP's style (int sizes), the DINOv2 one in DINOv2's (dict sizes,
resize past the crop), so both ways of writing the preprocessing are exercised.
"""
from __future__ import annotations

import json
from pathlib import Path

from lora_monitor.scoring.embeddings import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD
from lora_monitor.tiny.models import _seeded
from lora_monitor.tiny.tokenizers import build_tokenizer

TINY_EMBED_IMAGE_SIZE = 32


def _save(path: Path, model, preprocessor: dict, tokenizer=None) -> Path:
    """Save into a .partial folder and rename, so an interrupted save is never taken for a model."""
    partial = path.with_name(path.name + ".partial")
    model.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    (partial / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2), encoding="utf-8")
    partial.rename(path)
    return path


def build_tiny_clip(seed: int = 0):
    """(CLIPModel, tokenizer): 2-layer text and vision towers of width 32, 32 px images in 8 px patches."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = build_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=TINY_EMBED_IMAGE_SIZE, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4,
    )
    with _seeded(seed):
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    return model.eval(), tokenizer


def build_tiny_dino(seed: int = 0):
    """A Dinov2Model: 2 layers of width 32, 32 px images in 8 px patches."""
    from transformers import Dinov2Config, Dinov2Model

    config = Dinov2Config(
        image_size=TINY_EMBED_IMAGE_SIZE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2,
    )
    with _seeded(seed):
        model = Dinov2Model(config)
    return model.eval()


def save_tiny_clip(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny CLIP and save it (model, tokenizer, preprocessor config) as a model folder; reuse a complete one."""
    path = Path(path)
    if path.is_dir():
        return path
    model, tokenizer = build_tiny_clip(seed)
    size = TINY_EMBED_IMAGE_SIZE
    preprocessor = dict(
        image_processor_type="CLIPImageProcessor", do_resize=True, size=size, do_center_crop=True, crop_size=size,
        do_normalize=True, image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3,
    )
    return _save(path, model, preprocessor, tokenizer)


def save_tiny_dino(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny DINOv2 and save it (model, preprocessor config) as a model folder; reuse a complete one."""
    path = Path(path)
    if path.is_dir():
        return path
    size = TINY_EMBED_IMAGE_SIZE
    preprocessor = dict(
        image_processor_type="BitImageProcessor", do_resize=True, size={"shortest_edge": size * 8 // 7}, do_center_crop=True,
        crop_size={"height": size, "width": size}, do_normalize=True, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), resample=3,
    )
    return _save(path, build_tiny_dino(seed), preprocessor)
