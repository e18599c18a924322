"""The renderer: deterministic, batched like single calls, the training UNet itself, and no side effects."""
from __future__ import annotations

import gc
import random

import numpy as np
import torch
from conftest import nudge_lora

from lora_monitor.render import PreviewRenderer, lora_disabled
from lora_monitor.spec import PreviewSpec


def renderer_for(pipe, **kwargs) -> PreviewRenderer:
    return PreviewRenderer(
        unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler, **kwargs
    )


def test_same_seed_gives_identical_previews(pipeline, small_spec):
    nudge_lora(pipeline.unet, seed=1)
    renderer = renderer_for(pipeline)
    first = renderer.render(small_spec)
    second = renderer.render(small_spec)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # and the seed matters: a different seed gives a different image
    other = renderer.render(PreviewSpec.from_prompts(["a red circle"], seed=99, steps=2, width=64, height=64))
    assert not torch.allclose(first[0], other[0])


def test_batched_render_equals_one_image_per_call(pipeline):
    nudge_lora(pipeline.unet, seed=2)
    spec = PreviewSpec.from_prompts(["a red circle", "a blue square", "a green square"], seed=3, steps=2, width=64, height=64)
    batched = renderer_for(pipeline, batch_size=3).render(spec)
    single = renderer_for(pipeline, batch_size=1).render(spec)
    for a, b in zip(batched, single):
        assert a.shape == (3, 64, 64)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_mixed_sizes_render_in_separate_batches(pipeline):
    from lora_monitor.spec import PreviewPrompt

    spec = PreviewSpec((PreviewPrompt("a", seed=1, steps=2, width=64, height=64), PreviewPrompt("b", seed=2, steps=2, width=32, height=48)))
    images = renderer_for(pipeline, batch_size=4).render(spec)
    assert [tuple(image.shape) for image in images] == [(3, 64, 64), (3, 48, 32)]


def test_renders_with_the_training_unet_itself_and_no_copy(pipeline, small_spec):
    from diffusers import UNet2DConditionModel

    unet = pipeline.unet
    renderer = renderer_for(pipeline)
    assert renderer.unet is unet
    seen = []

    def count_unets(module=None, args=None):
        gc.collect()
        return sum(isinstance(obj, UNet2DConditionModel) for obj in gc.get_objects())

    before = count_unets()  # other tests' pipelines may still be alive in this process: only new UNets count
    handle = unet.register_forward_pre_hook(lambda module, args: seen.append(count_unets()))
    try:
        renderer.render(small_spec)
    finally:
        handle.remove()
    assert seen, "the training UNet was not called during rendering"
    assert set(seen) == {before}, f"{max(seen) - before} UNet object(s) appeared while rendering"


def test_render_restores_modes_grad_and_rng(pipeline, small_spec):
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    unet.train()
    unet.conv_in.eval()  # a mixed state must come back exactly
    text_encoder.eval()
    flags = {name: module.training for name, module in unet.named_modules()}
    during = []
    unet.register_forward_pre_hook(lambda module, args: during.append((module.training, torch.is_grad_enabled())))

    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    torch.set_grad_enabled(True)
    renderer_for(pipeline).render(small_spec)
    after = (random.random(), np.random.rand(), torch.rand(3))

    assert during and all(training is False and grad is False for training, grad in during)
    assert torch.is_grad_enabled()
    assert {name: module.training for name, module in unet.named_modules()} == flags
    assert not text_encoder.training
    assert after[0] == expected[0] and after[1] == expected[1] and torch.equal(after[2], expected[2])


def test_base_render_is_the_model_without_lora_and_lora_comes_back(pipeline, tiny_model, small_spec):
    from diffusers import StableDiffusionPipeline

    nudge_lora(pipeline.unet, seed=4)
    renderer = renderer_for(pipeline)
    with_lora = renderer.render(small_spec)
    base = renderer.render_base(small_spec)
    again = renderer.render(small_spec)

    plain = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    expected_base = renderer_for(plain).render(small_spec)
    for b, e in zip(base, expected_base):
        torch.testing.assert_close(b, e, atol=1e-5, rtol=0)
    assert not torch.allclose(with_lora[0], base[0], atol=1e-3), "the LoRA should change the image"
    assert all(torch.equal(a, b) for a, b in zip(with_lora, again))


def test_lora_disabled_needs_lora_layers(tiny_model):
    import pytest
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    with pytest.raises(ValueError, match="no peft LoRA layers"):
        with lora_disabled(unet):
            pass
