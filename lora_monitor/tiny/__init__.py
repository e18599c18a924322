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

from pathlib import Path

import torch

from lora_monitor.families import get_family
from lora_monitor.tiny.models import _BUILDERS, FAMILY_SIZES, SIZES, _seeded
from lora_monitor.tiny.tokenizers import build_gemma_tokenizer, build_qwen_tokenizer, build_t5_tokenizer, build_tokenizer

__all__ = [
    "FAMILY_SIZES", "LORA_TARGET_MODULES", "SIZES", "TINY_FAMILIES", "TINY_IMAGE_SIZE", "TINY_RENDER_KWARGS",
    "available_tiny_families", "build_gemma_tokenizer", "build_qwen_tokenizer", "build_t5_tokenizer", "build_tiny_pipeline",
    "build_tokenizer", "denoiser", "pipeline_class", "save_tiny_pipeline",
]

TINY_FAMILIES = ("sd", "sdxl", "sd3", "flux", "sana", "lumina2", "qwenimage", "chroma")

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
