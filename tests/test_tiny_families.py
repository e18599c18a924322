"""The tiny random pipelines of every model family: they build offline, render finite images that
depend on prompt and seed, come back equal through save_pretrained/from_pretrained, and take a LoRA."""
from __future__ import annotations

import pytest
import torch

from lora_monitor.tiny import (
    LORA_TARGET_MODULES,
    TINY_FAMILIES,
    TINY_IMAGE_SIZE,
    TINY_RENDER_KWARGS,
    available_tiny_families,
    build_tiny_pipeline,
    denoiser,
    pipeline_class,
    save_tiny_pipeline,
)

AVAILABLE = available_tiny_families()
PROMPTS = ["a red circle", "a blue square"]


def family_param(family: str):
    import diffusers

    marks = ()
    if family not in AVAILABLE:
        reason = f"diffusers {diffusers.__version__} has no {family} pipeline"
        marks = pytest.mark.skip(reason=reason)
    return pytest.param(family, marks=marks, id=family)


FAMILIES = [family_param(family) for family in TINY_FAMILIES]


def render(pipe, family: str, prompts=PROMPTS, seeds=(1, 1)) -> torch.Tensor:
    size = TINY_IMAGE_SIZE[family]
    return pipe(
        prompt=list(prompts),
        num_inference_steps=2,
        height=size,
        width=size,
        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
        output_type="pt",
        **TINY_RENDER_KWARGS[family],
    ).images


@pytest.fixture(scope="module")
def built():
    """One pipeline per family, built once for the module."""
    cache = {}

    def get(family):
        if family not in cache:
            cache[family] = build_tiny_pipeline(family=family)
            cache[family].set_progress_bar_config(disable=True)
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_renders_finite_images_that_depend_on_prompt_and_seed(family, built):
    pipe = built(family)
    assert isinstance(pipe, pipeline_class(family))
    size = TINY_IMAGE_SIZE[family]
    two_prompts = render(pipe, family, PROMPTS, seeds=(1, 1))
    two_seeds = render(pipe, family, [PROMPTS[0]] * 2, seeds=(1, 2))
    assert two_prompts.shape == (2, 3, size, size)
    assert torch.isfinite(two_prompts).all() and torch.isfinite(two_seeds).all()
    assert two_prompts.std() > 0.01, "a flat image"
    assert (two_prompts[0] - two_prompts[1]).abs().max() > 1e-3, "the prompt does not matter"
    assert (two_seeds[0] - two_seeds[1]).abs().max() > 1e-2, "the seed does not matter"
    # the same prompt and seed in one batch give the same image
    torch.testing.assert_close(two_prompts[0], two_seeds[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_folder_loads_back_and_renders_the_same(family, built, tmp_path):
    pipe = built(family)
    folder = save_tiny_pipeline(tmp_path / family, family=family)
    assert save_tiny_pipeline(folder, family=family) == folder  # a complete folder is reused
    loaded = pipeline_class(family).from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(render(loaded, family), render(pipe, family), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_on_the_denoiser_changes_the_images_once_trained(family, built):
    from peft import LoraConfig

    pipe = build_tiny_pipeline(family=family)  # a fresh one: the adapter stays on it
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe, family)
    model = denoiser(pipe)
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES[family]))
    lora_b = [parameter for name, parameter in model.named_parameters() if "lora_B" in name]
    assert lora_b
    torch.testing.assert_close(render(pipe, family), base, atol=1e-5, rtol=0)  # lora_B starts at zero
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in lora_b:
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    assert (render(pipe, family) - base).abs().max() > 1e-3


def test_build_is_deterministic_and_restores_the_global_rng():
    family = "flux" if "flux" in AVAILABLE else "sd"
    state = torch.random.get_rng_state()
    first = build_tiny_pipeline(family=family, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = build_tiny_pipeline(family=family, seed=3)
    other = build_tiny_pipeline(family=family, seed=4)
    a, b, c = (denoiser(p).state_dict() for p in (first, second, other))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_unknown_or_missing_family_and_size_are_clear_errors(monkeypatch):
    import dataclasses

    from lora_monitor.families import FAMILIES

    with pytest.raises(ValueError, match="unknown model family"):
        build_tiny_pipeline(family="nope")
    with pytest.raises(ValueError, match="size"):
        build_tiny_pipeline(family="sana", size="small")
    # a family the installed diffusers lacks, as chroma is in diffusers 0.32
    monkeypatch.setitem(FAMILIES, "chroma", dataclasses.replace(FAMILIES["chroma"], pipeline="NoSuchChromaPipeline", min_diffusers="99.0.0"))
    assert "chroma" not in available_tiny_families()
    with pytest.raises(ValueError, match=r"the 'chroma' family needs diffusers >= 99\.0\.0 \(NoSuchChromaPipeline\)"):
        build_tiny_pipeline(family="chroma")


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_small_sdxl_and_flux_are_benchmark_sized(family):
    pipe = build_tiny_pipeline(family=family, size="small")
    parameters = sum(parameter.numel() for parameter in denoiser(pipe).parameters())
    assert 20e6 < parameters < 60e6


def test_qwen_tokenizer_spends_34_tokens_on_the_qwenimage_template():
    """QwenImagePipeline drops the first 34 tokens of each encoded prompt: the template's system part."""
    from lora_monitor.tiny import build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    template = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
        "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    )
    if "qwenimage" in AVAILABLE:  # the template the tiny tokenizer is made for is still diffusers'
        from diffusers import QwenImagePipeline

        pipe = QwenImagePipeline(None, None, None, None, None)
        assert pipe.prompt_template_encode == template and pipe.prompt_template_encode_start_idx == 34
    ids = tokenizer(template.format("a red circle")).input_ids
    assert tokenizer.decode(ids[34:]).startswith("a red circle<|im_end|>")
