"""Shared fixtures: the tiny offline Stable Diffusion model, built once per test session."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs (deterministic_algorithms)

LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """One torch thread: the tiny models and BRISQUE's many small passes run no faster on two, and
    several times slower when other processes share a 2-core machine. Restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def deterministic_algorithms():
    """torch's deterministic algorithms on, for a test that compares two trainings bit for bit. On a GPU two trainings
    without the monitor already differ (cuBLAS/cuDNN kernels add in varying orders: seen on an H200), so the
    comparison means something only with them on; this CPU's kernels are deterministic either way."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.fixture
def isolated_caches(tmp_path, monkeypatch):
    """Our BRISQUE model cache and torch.hub's folder under tmp_path; no explicit model; the hub forbidden."""
    from lora_monitor.scoring import brisque_model

    monkeypatch.setenv(brisque_model.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(brisque_model.MODEL_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A diffusers model folder with random weights, saved with save_pretrained (no download)."""
    from lora_monitor.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd"))


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    """family -> a saved tiny model folder of that family (lora_monitor.tiny), built once per session on first use."""
    from lora_monitor.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("family-models")
    cache: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in cache:
            cache[family] = str(save_tiny_pipeline(root / family, family=family))
        return cache[family]

    return get


@pytest.fixture
def pipeline(tiny_model):
    """The tiny pipeline loaded with from_pretrained, with a peft LoRA on its UNet."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)  # the LoRA's random init must not depend on which tests ran before
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    return pipe


def nudge_lora(module: torch.nn.Module, seed: int, scale: float = 0.3) -> None:
    """Move the LoRA weights of `module` (a UNet, transformer or text encoder) as a training step would, deterministically."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "lora_B" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


@pytest.fixture
def small_spec():
    from lora_monitor.spec import PreviewSpec

    return PreviewSpec.from_prompts(["a red circle", "a blue square"], seed=7, steps=2, width=64, height=64)


@pytest.fixture(scope="session")
def tiny_embedders(tmp_path_factory):
    """Random-weight CLIP and DINOv2 folders (lora_monitor.tiny.embedders), loadable by path like a hub name."""
    from lora_monitor.tiny.embedders import save_tiny_clip, save_tiny_dino

    root = tmp_path_factory.mktemp("embedders")
    return {"clip": str(save_tiny_clip(root / "clip")), "dino": str(save_tiny_dino(root / "dino"))}


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """An empty Hugging Face cache and no downloads. huggingface_hub and transformers 4 read these
    variables once at import, so their module constants are pointed at tmp_path too."""
    import huggingface_hub.constants
    import transformers.utils.hub

    cache = tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(transformers.utils.hub, "TRANSFORMERS_CACHE", str(cache), raising=False)
    return tmp_path / "hf"


def cached_brisque_model():
    """The BRISQUE SVR model from an explicit path, our cache or a pyiqa/piq cache, never downloaded here;
    without it the test fails under CI (`make test` fetches it first) and is skipped elsewhere."""
    from lora_monitor.scoring import brisque_model as bm

    try:
        return bm.resolve_brisque_model(sources=("path", "cache", "pyiqa-cache"), write_cache=False)
    except bm.BrisqueModelError as err:
        message = f"BRISQUE SVR model unavailable; run `lora-monitor models brisque` first.\n{err}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def brisque_beside(tmp_path, monkeypatch):
    """The BRISQUE model as an explicit file, so that the cache ($LORA_MONITOR_CACHE) may point at tmp_path / "cache"."""
    from lora_monitor.scoring import brisque_model

    model = cached_brisque_model()
    path = tmp_path / "brisque.safetensors"
    brisque_model.save_model(model, path)
    monkeypatch.setenv(brisque_model.MODEL_ENV, str(path))
    monkeypatch.setenv(brisque_model.CACHE_ENV, str(tmp_path / "cache"))
    return path


def fast_demo_recipe():
    """A base recipe that builds in seconds: a model that loads and trains like the demo's, without learning to draw."""
    from lora_monitor.tiny.pretrain import BaseRecipe

    return BaseRecipe(images=32, vae_steps=3, unet_steps=3, batch_size=4)


@pytest.fixture
def fast_demo(brisque_beside, monkeypatch):
    """`lora-monitor demo` in seconds: the fast base recipe, built into the temporary cache of `brisque_beside`, and a
    story of 2 training and 2 held-out images, each seen once an epoch, previews of 2 denoising steps. The embedding models
    the demo loaded are let go afterwards."""
    import dataclasses

    import lora_monitor.demo
    from lora_monitor.tiny import pretrain

    monkeypatch.setattr(pretrain, "DEMO_RECIPE", fast_demo_recipe())
    story = dataclasses.replace(lora_monitor.demo.STORY, training_images=2, held_out_images=2, repeats=1, preview_steps=2)
    monkeypatch.setattr(lora_monitor.demo, "STORY", story)
    yield story
    from lora_monitor.scoring.embeddings import release_embedding_models

    release_embedding_models()  # the demo's CLIP and DINOv2 stay shared in the process otherwise; later tests count them


def shape_image(kind: str, size: int = 32, shift: int = 0, seed: int | None = None) -> torch.Tensor:
    """A (3, size, size) picture of a disc, square or stripe: on flat grey, or with `seed` on a smooth random
    background (distinct content even a tiny random DINOv2 tells apart)."""
    if seed is None:
        image = torch.full((3, size, size), 0.5)
    else:
        background = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed))
        image = 0.35 + 0.3 * torch.nn.functional.interpolate(background[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = size / 2 + shift
    if kind == "disc":
        mask, colour = (y - centre) ** 2 + (x - centre) ** 2 < (size / 3) ** 2, (0.9, 0.1, 0.1)
    elif kind == "square":
        mask, colour = ((y - centre).abs() < size / 4) & ((x - centre).abs() < size / 4), (0.1, 0.1, 0.9)
    else:
        mask, colour = (y - centre).abs() < size / 8, (0.1, 0.8, 0.1)
    for channel, value in enumerate(colour):
        image[channel][mask] = value
    return image.clamp(0, 1)

