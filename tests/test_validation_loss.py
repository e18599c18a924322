"""The validation loss on the tiny random pipelines of every family, with real peft LoRAs.

Per family: finite, positive, the same at every call and (to float32 rounding) at every batch size,
the base model's with a zero LoRA and not once the LoRA moves, and fed the timestep the family's own
pipeline feeds its denoiser. Training the LoRA on the validation images lowers it; a validation call
between training steps changes nothing the training sees. ValidationSet reads folders as kohya does.
"""
from __future__ import annotations

import math

import pytest
import torch
from PIL import Image

from conftest import nudge_lora
from lora_monitor.families import FAMILIES, get_family
from lora_monitor.render import PreviewRenderer
from lora_monitor.spec import PreviewSpec
from lora_monitor.tiny import LORA_TARGET_MODULES, TINY_FAMILIES, TINY_RENDER_KWARGS, available_tiny_families, build_tiny_pipeline, denoiser
from lora_monitor.validation import ValidationLoss, ValidationSet

AVAILABLE = available_tiny_families()
SIZE = 32
CAPTIONS = ["a red circle", "a blue square on grass", ""]


def family_param(family: str):
    import diffusers

    reason = f"diffusers {diffusers.__version__} has no {FAMILIES[family].pipeline} (needs >= {FAMILIES[family].min_diffusers})"
    return pytest.param(family, marks=() if family in AVAILABLE else pytest.mark.skip(reason=reason), id=family)


ALL = [family_param(family) for family in TINY_FAMILIES]
FLOW = [family_param(family) for family in TINY_FAMILIES if FAMILIES[family].flow_matching]


def images(count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random images (a 4x4 grid of colours blown up): something a tiny model can learn."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.functional.interpolate(torch.rand(1, 3, 4, 4, generator=generator), size=SIZE, mode="bilinear")[0] for _ in range(count)]


def setup(family: str, *, text_encoder_lora: bool = False, dropout: float = 0.0):
    """A tiny pipeline with a fresh (zero) LoRA on its frozen denoiser, and the renderer over its modules."""
    from peft import LoraConfig

    pipe = build_tiny_pipeline(family=family)
    model = denoiser(pipe)
    model.requires_grad_(False)
    torch.manual_seed(0)  # the LoRA's lora_A init
    model.add_adapter(LoraConfig(r=4, lora_alpha=4, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES[family]))
    if text_encoder_lora:
        pipe.text_encoder.requires_grad_(False)
        from peft import inject_adapter_in_model  # (transformers 5's add_adapter wants a peft newer than this one)

        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"]), pipe.text_encoder)
    renderer = PreviewRenderer(family=family, **{name: getattr(pipe, name, None) for name in get_family(family).components})
    return pipe, renderer


def release_text_encoders(renderer) -> None:
    """What the monitor does once built: encode its previews and let the frozen text encoders go."""
    renderer.encode(PreviewSpec.from_prompts(["a red circle"], steps=1, width=SIZE, height=SIZE), release=True)


@pytest.mark.parametrize("family", ALL)
def test_loss_is_fixed_batch_invariant_and_follows_the_lora(family):
    pipe, renderer = setup(family)
    validation = ValidationLoss(renderer, ValidationSet(images=images(), captions=CAPTIONS), batch_size=3)
    validation.prepare()
    release_text_encoders(renderer)
    assert not renderer.text_encoders  # everything below runs on what prepare() kept

    base = validation(base=True)
    assert validation() == base  # a fresh LoRA (lora_B = 0) adds exactly nothing
    nudge_lora(denoiser(pipe), seed=1)
    first = validation()
    assert len(first) == 3 and all(math.isfinite(value) and value > 0 for value in first)
    assert validation() == first  # fixed noise, fixed levels: exactly the same
    assert validation(base=True) == base
    assert all(abs(value - reference) > 1e-4 * reference for value, reference in zip(first, base))
    validation.batch_size = 1
    # One pair per forward instead of three: the same noise and conditioning, but CPU matmuls may round a
    # batch of 3 differently from a batch of 1 in the last float32 bits (measured: relative 2e-8 to 5e-8).
    assert validation() == pytest.approx(first, rel=1e-6, abs=0)


@pytest.mark.parametrize("family", FLOW)
def test_the_denoiser_is_fed_the_timestep_its_pipeline_feeds(family):
    """The family table's timestep units (x1000 or not, Lumina's reversed time, Sana's timestep_scale) against the
    real pipeline: at each of its steps, the noise level its scheduler is at maps to the timestep it passes."""
    pipe, renderer = setup(family)
    validation = ValidationLoss(renderer, ValidationSet(images=images(1), captions=CAPTIONS[:1]))
    scheduler = renderer.pipeline.scheduler
    fed = []

    def record(module, args, kwargs):
        sigma = float(scheduler.sigmas[scheduler.step_index or 0])
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        fed.append((sigma, timestep.flatten()[0].item()))

    handle = renderer.denoiser.register_forward_pre_hook(record, with_kwargs=True)
    try:
        renderer.pipeline(prompt="a red circle", num_inference_steps=3, height=SIZE, width=SIZE, output_type="latent", **TINY_RENDER_KWARGS[family])
    finally:
        handle.remove()
    sigmas = {round(sigma, 4) for sigma, _ in fed}
    assert len(sigmas) == 3 and any(0.05 < sigma < 0.95 for sigma in sigmas)
    zeros = torch.zeros(1, 1, 2, 2)
    span = abs(validation.noised(zeros, zeros, torch.tensor([1.0]))[2].item() - validation.noised(zeros, zeros, torch.tensor([0.0]))[2].item())
    for sigma, timestep in fed:
        ours = validation.noised(zeros, zeros, torch.tensor([sigma]))[2].item()
        # within a thousandth of the timestep range: Sana's DPM-Solver feeds its sigma * 1000 rounded to an integer
        assert ours == pytest.approx(timestep, abs=1e-3 * span), f"sigma {sigma}: the pipeline feeds {timestep}, we feed {ours}"


@pytest.mark.parametrize("family", FLOW)
def test_a_denoiser_predicting_our_target_makes_the_pipeline_draw_the_image(family):
    """Noising, target direction and latent normalisation against the family's own sampler and decoder: a denoiser
    that always predicts our target for an image's validation latent x0 (whatever noise its input holds) makes the
    pipeline land on x0 and decode the VAE's reconstruction of that image. (Lumina 2's pipeline negates the
    prediction: the other sign flies off; a wrong shift or scale decodes another image.)"""
    _, renderer = setup(family)
    validation = ValidationLoss(renderer, ValidationSet(images=images(1), captions=[""]))
    validation.prepare()
    pipeline, scheduler = renderer.pipeline, renderer.pipeline.scheduler
    x0 = validation.latents[0][None]

    def oracle(module, args, kwargs, output):
        noisy = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]  # (Sana passes its latents first)
        sigma = float(scheduler.sigmas[scheduler.step_index or 0])
        clean = x0 if noisy.dim() == 4 else pipeline._pack_latents(x0, 1, *x0.shape[1:])  # Flux, Chroma, Qwen pack 2x2
        noise = (noisy - (1 - sigma) * clean) / sigma
        four_d = (lambda tensor: tensor) if noisy.dim() == 4 else (lambda tensor: tensor[:, None])  # (B, tokens, C*4)
        target = validation.noised(four_d(clean.expand_as(noisy)), four_d(noise), torch.full((noisy.shape[0],), sigma))[1]
        return (target.reshape(noisy.shape),)

    handle = renderer.denoiser.register_forward_hook(oracle, with_kwargs=True)
    try:
        drawn = pipeline(
            prompt="a red circle", num_inference_steps=4, height=SIZE, width=SIZE, output_type="pt",
            generator=torch.Generator().manual_seed(1), **TINY_RENDER_KWARGS[family],
        ).images
    finally:
        handle.remove()
    video = get_family(family).video_vae  # Qwen's VAE takes and gives one-frame clips
    with torch.no_grad():
        pixels = validation.data.images[0][None] * 2 - 1
        encoded = pipeline.vae.encode(pixels[:, :, None] if video else pixels)
        raw = encoded.latent_dist.mode() if hasattr(encoded, "latent_dist") else encoded.latent
        reconstruction = pipeline.vae.decode(raw).sample
    reconstruction = (reconstruction[:, :, 0] if video else reconstruction) / 2 + 0.5
    torch.testing.assert_close(drawn, reconstruction.clamp(0, 1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", [family_param("flux"), family_param("chroma"), family_param("qwenimage")])
def test_packed_latents_are_packed_as_the_pipeline_packs(family):
    """Flux, Chroma and Qwen-Image feed 2x2 patches as tokens; the denoiser must see ours in the pipeline's order."""
    from lora_monitor.validation import _pack

    latents = torch.randn(2, 16, 8, 6, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_pack(latents), get_family(family).pipeline_class()._pack_latents(latents, 2, 16, 8, 6), rtol=0, atol=0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_noising_matches_the_ddpm_scheduler(prediction_type):
    """SD's objective against diffusers' DDPMScheduler.add_noise / get_velocity on the training scheduler's config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    pipe = build_tiny_pipeline(family="sd")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    renderer = PreviewRenderer(family="sd", **{name: getattr(pipe, name) for name in get_family("sd").components})
    validation = ValidationLoss(renderer, ValidationSet(images=images(1), captions=[""]))
    reference = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    noisy, target, timestep = validation.noised(latents, noise, torch.tensor([0.1, 0.5, 0.9999]))
    assert timestep.tolist() == [100, 500, 999]
    torch.testing.assert_close(noisy, reference.add_noise(latents, noise, timestep), rtol=1e-6, atol=1e-6)
    expected = noise if prediction_type == "epsilon" else reference.get_velocity(latents, noise, timestep)
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-6)


def train(validation: ValidationLoss, model: torch.nn.Module, steps: int, lr: float, seed: int | None = None) -> None:
    """A plain LoRA training loop on the validation images with the same objective at random levels (global RNG
    when `seed` is None, as a training script draws)."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    indices = list(range(len(validation.data)))
    for _ in range(steps):
        levels = torch.rand(len(indices), generator=generator, dtype=torch.float64) * 0.98 + 0.01
        noise = torch.stack([torch.randn(validation.latents[index].shape, generator=generator) for index in indices])
        loss = validation.item_losses(indices, levels, noise).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("family", [family_param("sd"), family_param("flux")])
def test_training_on_the_validation_images_lowers_their_loss(family):
    pipe, renderer = setup(family)
    validation = ValidationLoss(renderer, ValidationSet(images=images(), captions=CAPTIONS))
    validation.prepare()
    before = validation()
    model = denoiser(pipe)
    model.train()
    train(validation, model, steps=30, lr=1e-2, seed=1)
    after = validation()
    assert all(late < early for late, early in zip(after, before)), (before, after)
    assert sum(after) < 0.985 * sum(before), (before, after)  # measured: -3% for sd, -15% for flux


def test_a_validation_between_training_steps_changes_nothing_training_sees():
    """Two identical runs (LoRA dropout and noise from the global RNG), one validated after every step: same weights."""
    runs = []
    for validate in (False, True):
        pipe, renderer = setup("sd", dropout=0.2)
        nudge_lora(denoiser(pipe), seed=1)
        validation = ValidationLoss(renderer, ValidationSet(images=images(2), captions=CAPTIONS[:2]), batch_size=3)
        validation.prepare()
        model = denoiser(pipe)
        model.train()
        grads = [(name, parameter.requires_grad) for name, parameter in model.named_parameters()]
        torch.manual_seed(123)
        for _ in range(3):
            train(validation, model, steps=1, lr=1e-3)
            if validate:
                model.eval()
                without_dropout = validation()
                model.train()
                assert validation() == without_dropout  # evaluated in eval mode: no LoRA dropout
                validation(base=True)
                assert model.training and all(module.training for module in model.modules())
                assert [(name, parameter.requires_grad) for name, parameter in model.named_parameters()] == grads
        runs.append({name: value.clone() for name, value in model.state_dict().items() if "lora" in name})
    plain, validated = runs
    assert plain.keys() == validated.keys() and plain
    assert all(torch.equal(plain[name], validated[name]) for name in plain)


def test_a_text_encoder_lora_is_followed_at_every_call():
    """A LoRA'd text encoder is live: its captions are encoded again at every call, with its LoRA off for base."""
    pipe, renderer = setup("sd", text_encoder_lora=True)
    validation = ValidationLoss(renderer, ValidationSet(images=images(2), captions=CAPTIONS[:2]))
    validation.prepare()
    release_text_encoders(renderer)  # a live encoder is kept
    base = validation(base=True)
    assert validation() == base
    nudge_lora(pipe.text_encoder, seed=2, scale=1.0)  # only the text encoder's LoRA moves
    moved = validation()
    assert all(abs(value - reference) > 1e-5 * reference for value, reference in zip(moved, base))
    assert validation(base=True) == base


def test_captions_must_be_captured_before_the_text_encoders_go():
    _, renderer = setup("sd")
    release_text_encoders(renderer)
    validation = ValidationLoss(renderer, ValidationSet(images=images(1), captions=["a red circle"]))
    with pytest.raises(RuntimeError, match=r"text encoders were released before ValidationLoss\.prepare\(\)"):
        validation.prepare()


def test_bad_arguments_are_clear_errors():
    _, renderer = setup("flux")  # a 4-pixel grid: the tiny VAE's 2 times the 2x2 latent patch
    data = ValidationSet(images=images(1), captions=[""])
    with pytest.raises(ValueError, match=r"image 0 is 30x30; a 'flux' model needs width and height divisible by 4"):
        ValidationLoss(renderer, ValidationSet(images=[torch.rand(3, 30, 30)], captions=[""]))
    with pytest.raises(ValueError, match=r"timesteps must be noise levels in \(0, 1\]"):
        ValidationLoss(renderer, data, timesteps=(0.0, 0.5))
    with pytest.raises(ValueError, match=r"timesteps must be noise levels"):
        ValidationLoss(renderer, data, timesteps=())
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        ValidationLoss(renderer, data, batch_size=0)
    with pytest.raises(TypeError, match="data must be a ValidationSet"):
        ValidationLoss(renderer, images(1))
    with pytest.raises(RuntimeError, match=r"prepare\(\) first"):
        ValidationLoss(renderer, data).item_losses([0], torch.tensor([0.5]), torch.zeros(1, 16, 16, 16))


# ----------------------------------------------------------------------------------- ValidationSet
def test_validation_set_checks_its_images_and_captions():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        ValidationSet(images=images(2), captions=["a"])
    with pytest.raises(ValueError, match="at least one image"):
        ValidationSet(images=[], captions=[])
    with pytest.raises(ValueError, match=r"image 0 must be a \(3, H, W\) float tensor in \[0, 1\], got \(1, 3, 32, 32\)"):
        ValidationSet(images=[torch.rand(1, 3, 32, 32)], captions=[""])
    with pytest.raises(ValueError, match=r"image 1 has values outside \[0, 1\]"):
        ValidationSet(images=[torch.rand(3, 8, 8), torch.rand(3, 8, 8) * 2 - 1], captions=["", ""])
    with pytest.raises(ValueError, match="the caption of validation image 0 must be a string, got None"):
        ValidationSet(images=images(1), captions=[None])


def test_from_folder_reads_scales_crops_and_captions(tmp_path):
    halves = Image.new("RGB", (64, 32), (255, 0, 0))
    halves.paste((0, 0, 255), (32, 0, 64, 32))  # a wide image: red left half, blue right half
    halves.save(tmp_path / "b_wide.png")
    (tmp_path / "b_wide.txt").write_text("  red and blue \n", encoding="utf-8")
    Image.new("RGB", (24, 24), (0, 255, 0)).save(tmp_path / "a_small.jpg")  # smaller than the size: scaled up, no caption
    (tmp_path / "notes.md").write_text("not an image", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"1 of 2 validation images in .* have no \.txt caption \(e.g\. a_small\.jpg\)") as caught:
        data = ValidationSet.from_folder(tmp_path, size=16)
    assert len(caught) == 1
    assert data.names == ["a_small.jpg", "b_wide.png"] and data.captions == ["", "red and blue"]
    assert [tuple(image.shape) for image in data.images] == [(3, 16, 16)] * 2
    assert data.images[0][1].min() > 0.95 and data.images[0][0].max() < 0.05  # green, scaled up from 24 px
    wide = data.images[1]  # 64x32 -> 32x16, the middle 16 columns: red on the left, blue on the right
    assert wide[0, :, :6].min() > 0.95 and wide[2, :, -6:].min() > 0.95 and wide[2, :, :6].max() < 0.05
    (tmp_path / "a_small.caption").write_text("green", encoding="utf-8")
    with pytest.warns(UserWarning, match=r"1 of 2 .* no \.caption caption \(e\.g\. b_wide\.png\)"):
        data = ValidationSet.from_folder(tmp_path, size=(8, 12), caption_extension="caption")
    assert data.captions == ["green", ""] and tuple(data.images[1].shape) == (3, 8, 12)


def test_from_folder_errors_name_the_folder(tmp_path):
    with pytest.raises(ValueError, match=f"no images .* in validation folder {tmp_path}"):
        ValidationSet.from_folder(tmp_path, size=32)
    (tmp_path / "only.txt").write_text("a caption", encoding="utf-8")
    with pytest.raises(ValueError, match="no images"):
        ValidationSet.from_folder(tmp_path, size=32)
    with pytest.raises(ValueError, match=f"validation folder {tmp_path / 'missing'} does not exist"):
        ValidationSet.from_folder(tmp_path / "missing", size=32)
    Image.new("RGB", (8, 8)).save(tmp_path / "only.png")
    with pytest.raises(ValueError, match=r"size must be a positive int or \(height, width\)"):
        ValidationSet.from_folder(tmp_path, size=(0, 32))
