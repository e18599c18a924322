"""Every model family in the loop, each on a tiny random model of its own architecture.

For SD 1.x, SDXL, SD3, Flux and the transformer families the installed diffusers provides: previews
equal a fresh pipeline of that family after load_lora_weights of the export; training with the
monitor attached is bit-identical; frozen LoRA parameters stay frozen; the monitor works after the
loop deleted its text encoders; half-given and unsupported configurations fail at build time.
"""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from conftest import nudge_lora
from peft import LoraConfig

from lora_monitor import export as exporting
from lora_monitor.families import FAMILIES, get_family
from lora_monitor.monitor import LoraMonitor
from lora_monitor.record import read_scores
from lora_monitor.spec import PreviewPrompt, PreviewSpec
from lora_monitor.tiny import LORA_TARGET_MODULES, TINY_FAMILIES, TINY_IMAGE_SIZE, available_tiny_families, denoiser

AVAILABLE = available_tiny_families()
PARAMS = [
    pytest.param(name, marks=[] if name in AVAILABLE else pytest.mark.skip(reason=f"the installed diffusers has no {FAMILIES[name].pipeline} "
                                                                                    f"(needs >= {FAMILIES[name].min_diffusers})"))
    for name in TINY_FAMILIES
]


@pytest.fixture
def saved_models(family_models):
    return family_models


def load(saved_models, family: str, *, lora: bool = True, **lora_options):
    pipe = get_family(family).pipeline_class().from_pretrained(saved_models(family))
    pipe.set_progress_bar_config(disable=True)
    if lora:
        options = dict(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES[family])
        options.update(lora_options)
        torch.manual_seed(0)  # the same initial LoRA weights for every load
        denoiser(pipe).add_adapter(LoraConfig(**options))
    return pipe


def add_text_encoder_lora(text_encoder, config) -> None:
    """text_encoder.add_adapter(config), as diffusers' scripts do; transformers 5 asks for a peft newer than any
    released here, so then the same thing by hand: peft's layers injected, the config where transformers keeps it."""
    try:
        text_encoder.add_adapter(config)
    except ValueError as error:
        if "version of PEFT" not in str(error):
            raise
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, text_encoder, adapter_name="default")
        text_encoder.peft_config = {"default": config}


def spec_for(family: str, **overrides) -> PreviewSpec:
    size = TINY_IMAGE_SIZE[family]
    options = dict(seed=7, steps=2, width=size, height=size)
    options.update(overrides)
    return PreviewSpec.from_prompts(["a red circle", "a blue square on grass"], **options)


def monitor_for(pipe, family, output_dir, spec=None, **kwargs) -> LoraMonitor:
    options = dict(metrics=("ssim",), metric="ssim", spec=spec or spec_for(family), output_dir=output_dir)
    options.update(kwargs)
    return LoraMonitor(pipeline=pipe, **options)


@pytest.mark.parametrize("family", PARAMS)
def test_previews_equal_a_fresh_pipeline_of_the_family_loading_the_export(family, saved_models, tmp_path):
    pipe = load(saved_models, family)
    monitor = monitor_for(pipe, family, tmp_path)
    assert monitor.family.name == family
    nudge_lora(denoiser(pipe), seed=1)
    report = monitor.on_epoch_end(1)
    assert report.is_best and report.exported == tmp_path / "best"

    fresh = load(saved_models, family, lora=False)
    fresh.load_lora_weights(tmp_path / "best", weight_name="pytorch_lora_weights.safetensors")
    sampler = monitor.renderer.pipeline.scheduler  # SD-style UNets preview with DDIM from the training config, as before
    fresh.scheduler = type(sampler).from_config(sampler.config)
    spec = monitor.spec
    # the fresh pipeline's own call from prompt strings: our encoded-once embeddings must give the same images
    # the plain call: no negative prompt where the spec has none (SDXL then zeroes its negative embeddings);
    # true-CFG families (Flux at CFG > 1, Qwen-Image) need a negative text to guide at all: the spec's "" then
    arguments = monitor.renderer.call_arguments(spec.prompts[0])
    arguments.pop("negative_prompt", None)
    entry = get_family(family)
    if entry.cfg_needs_negative and arguments[entry.cfg_argument] > 1:
        negatives = {"negative_prompt": [p.negative_prompt for p in spec.prompts]}
    else:
        negatives = {}
    expected = fresh(
        prompt=[p.prompt for p in spec.prompts], **negatives, **arguments,
        generator=[torch.Generator().manual_seed(p.seed) for p in spec.prompts],
    ).images
    for ours, theirs in zip(report.images, expected):
        torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=0)
    base = monitor.base_references()
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(base, report.images)), "the LoRA changed nothing: the test would prove nothing"


def train(pipe, family, *, steps: int, monitor: LoraMonitor | None) -> dict[str, torch.Tensor]:
    """A tiny real training loop on the family's denoiser: its inputs as the pipeline prepares them (captured
    once), noised from the global RNG, LoRA dropout on, an optimizer step each time; the monitor between steps."""
    model = denoiser(pipe)
    captured = {}

    def capture(module, args, kwargs):
        captured.setdefault("call", (args, kwargs))

    handle = model.register_forward_pre_hook(capture, with_kwargs=True)
    spec = spec_for(family)
    pipe(prompt=[spec.prompts[0].prompt], num_inference_steps=1, width=spec.prompts[0].width, height=spec.prompts[0].height,
         generator=torch.Generator().manual_seed(0), output_type="latent", **get_family(family).call_arguments)
    handle.remove()
    args, kwargs = captured["call"]
    args = [a.detach() if torch.is_tensor(a) else a for a in args]
    kwargs = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
    sample_key = "sample" if "sample" in kwargs else "hidden_states"
    sample = kwargs.get(sample_key, args[0] if args else None)
    torch.manual_seed(1234)
    parameters = [p for n, p in model.named_parameters() if "lora_" in n]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(parameters, lr=1e-2)
    model.train()
    for step in range(1, steps + 1):
        noisy = sample + torch.randn_like(sample) * 0.1  # the global RNG, as a training loop's noise
        call_kwargs = dict(kwargs, **{sample_key: noisy}) if sample_key in kwargs else kwargs
        call_args = [noisy, *args[1:]] if sample_key not in kwargs else args
        output = model(*call_args, **call_kwargs)
        prediction = output[0] if isinstance(output, tuple) else output.sample
        loss = (prediction.float() - torch.randn_like(prediction.float())).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            monitor.on_step_end(step)
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("family", PARAMS)
def test_training_is_bit_identical_with_the_monitor_attached(family, saved_models, tmp_path):
    plain = train(load(saved_models, family, lora_dropout=0.1), family, steps=4, monitor=None)
    pipe = load(saved_models, family, lora_dropout=0.1)
    monitor = monitor_for(pipe, family, tmp_path, every_n_steps=2)
    monitored = train(pipe, family, steps=4, monitor=monitor)
    assert [r.epoch for r in monitor.policy.history] == [2, 4], "the monitor did not evaluate at steps 2 and 4"
    assert plain.keys() == monitored.keys() and plain
    for name, tensor in plain.items():
        assert torch.equal(tensor, monitored[name]), f"{name} differs with the monitor attached"
    assert denoiser(pipe).training, "the denoiser must be back in train mode"


@pytest.mark.parametrize("family", PARAMS)
def test_frozen_lora_parameters_stay_frozen_and_trainable_ones_trainable(family, saved_models, tmp_path):
    pipe = load(saved_models, family)
    model = denoiser(pipe)
    for name, parameter in model.named_parameters():
        if "lora_A" in name:
            parameter.requires_grad_(False)  # LoRA-FA: A frozen, B trained
    before = {name: p.requires_grad for name, p in model.named_parameters() if "lora_" in name}
    assert any(before.values()) and not all(before.values())
    monitor = monitor_for(pipe, family, tmp_path)
    monitor.base_references()  # a base render: every LoRA layer off, then on again
    after = {name: p.requires_grad for name, p in model.named_parameters() if "lora_" in name}
    assert after == before


def test_a_frozen_text_encoder_lora_stays_frozen_and_is_switched_off_for_the_base(saved_models, tmp_path):
    pipe = load(saved_models, "sd")
    add_text_encoder_lora(pipe.text_encoder, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["q_proj", "v_proj"]))
    for parameter in pipe.text_encoder.parameters():
        parameter.requires_grad_(False)
    monitor = monitor_for(pipe, "sd", tmp_path)
    assert monitor.renderer.live_encoders == ["text_encoder"]
    base = monitor.base_references()
    assert not any(p.requires_grad for p in pipe.text_encoder.parameters())
    nudge_lora(pipe.text_encoder, seed=3, scale=2.0)  # only the text encoder's LoRA moves
    report = monitor.on_epoch_end(1)
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(base, report.images)), "a text-encoder LoRA must be re-encoded"
    assert exporting.read_sidecar(tmp_path / "best")["epoch"] == 1
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "best" / "pytorch_lora_weights.safetensors")).keys()
    assert any(key.startswith("text_encoder.") for key in keys) and any(key.startswith("unet.") for key in keys)


@pytest.mark.parametrize("family", PARAMS)
def test_the_monitor_works_after_the_loop_deleted_its_text_encoders(family, saved_models, tmp_path):
    pipe = load(saved_models, family)
    entry = get_family(family)
    components = {name: getattr(pipe, name) for name in entry.components}
    monitor = LoraMonitor.from_modules(family, metrics=("ssim",), metric="ssim", spec=spec_for(family), output_dir=tmp_path, **components)
    encoders = [weakref.ref(components[name]) for name in entry.encoder_names if components.get(name) is not None]
    # what diffusers' Flux/SD3 DreamBooth scripts do after pre-computing their embeddings
    for name in entry.encoder_names:
        setattr(pipe, name, None)
    del components
    gc.collect()
    assert all(ref() is None for ref in encoders), "the monitor still holds a text encoder the loop deleted"
    nudge_lora(denoiser(pipe), seed=2)
    report = monitor.on_epoch_end(1)
    assert all(torch.isfinite(image).all() for image in report.images)
    assert monitor.has_base_references and (tmp_path / "best").is_dir()


def test_a_step_based_run_picks_exports_and_resumes_by_step(saved_models, tmp_path):
    family = "flux" if "flux" in AVAILABLE else "sd"
    scripted = iter([0.5, 0.8, 0.6, 0.7, 0.4])  # best at step 20; patience 2 stops at step 40

    class Scripted:
        name, higher_is_better, needs_reference = "score", True, False

        def __call__(self, images, reference=None):
            return torch.full((images.shape[0],), next(scripted))

    def build(output_dir, pipe):
        return monitor_for(pipe, family, output_dir, metrics=None, scorers=[Scripted()], metric="score", every_n_steps=10, patience=2)

    pipe = load(saved_models, family)
    monitor = build(tmp_path, pipe)
    assert monitor.on_epoch_end(1) is None, "a step-based monitor does not evaluate at epoch ends"
    for step in range(1, 21):
        nudge_lora(denoiser(pipe), seed=step, scale=0.01)
        monitor.on_step_end(step)
    assert monitor.best_epoch == 20 and monitor.policy.best_step == 20
    sidecar = exporting.read_sidecar(tmp_path / "best")
    assert (sidecar["step"], sidecar["policy"]["unit"]) == (20, "step")
    assert (tmp_path / "previews" / "step-0010").is_dir() and (tmp_path / "previews" / "step-0020").is_dir()
    state = monitor.state_dict()

    resumed = build(tmp_path, pipe)  # a restarted process: state from the checkpoint
    resumed.load_state_dict(state)
    stops = []
    for step in range(21, 51):
        report = resumed.on_step_end(step)
        if report is not None and report.should_stop:
            stops.append(step)
            break
    assert stops == [40] and resumed.best_epoch == 20
    assert "at step 40" in resumed.policy.stop_reason
    lines = read_scores(tmp_path)
    assert [(line["unit"], line["epoch"], line["step"]) for line in lines] == [("step", s, s) for s in (10, 20, 30, 40)]
    with pytest.raises(ValueError, match="every_n_steps"):
        monitor_for(pipe, family, tmp_path / "x").on_step_end(10)


# ----------------------------------------------------------------- build-time errors
def test_an_unknown_family_lists_the_supported_ones_and_suggests(saved_models, tmp_path):
    pipe = load(saved_models, "sd")
    with pytest.raises(ValueError, match=r"unknown model family 'flx'.*supported families: sd, sdxl, sd3, flux.*Did you mean 'flux'"):
        LoraMonitor.from_modules("flx", unet=pipe.unet, spec=spec_for("sd"), output_dir=tmp_path, metrics=("ssim",), metric="ssim")


@pytest.mark.parametrize("family", [p for p in PARAMS if p.values[0] != "sd"])
def test_a_half_given_family_names_what_is_missing(family, saved_models, tmp_path):
    pipe = load(saved_models, family)
    entry = get_family(family)
    components = {name: getattr(pipe, name) for name in entry.components}
    dropped = entry.text_encoders[-1][1] if family != "sd3" else "vae"  # a tokenizer (SD3's T5 is optional: drop the VAE)
    components[dropped] = None
    with pytest.raises(ValueError, match=rf"the '{family}' family \({entry.pipeline}\) renders with .*missing: {dropped}"):
        LoraMonitor.from_modules(family, spec=spec_for(family), output_dir=tmp_path, metrics=("ssim",), metric="ssim", **components)


def test_modules_of_another_family_or_a_wrong_sampler_are_refused(saved_models, tmp_path):
    sd = load(saved_models, "sd")
    options = dict(spec=spec_for("sd"), output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    with pytest.raises(ValueError, match=r"family='flux' expects a FluxTransformer2DModel as transformer, got UNet2DConditionModel"):
        LoraMonitor.from_modules("flux", transformer=sd.unet, vae=sd.vae, scheduler=sd.scheduler, text_encoder=sd.text_encoder,
                                 tokenizer=sd.tokenizer, text_encoder_2=sd.text_encoder, tokenizer_2=sd.tokenizer, **options)
    with pytest.raises(ValueError, match=r"not part of a StableDiffusionPipeline: transformer"):
        LoraMonitor(family="sd", transformer=sd.unet, unet=sd.unet, vae=sd.vae, scheduler=sd.scheduler, text_encoder=sd.text_encoder,
                    tokenizer=sd.tokenizer, **options)
    with pytest.raises(ValueError, match="pass either pipeline= or the modules"):
        LoraMonitor(pipeline=sd, unet=sd.unet, **options)
    with pytest.raises(ValueError, match=r"to render previews the monitor needs the denoiser: unet= .* or transformer="):
        LoraMonitor(vae=sd.vae, **options)
    if "flux" in AVAILABLE:
        flux = load(saved_models, "flux")
        with pytest.raises(ValueError, match=r"sampler='ddim' is a noise-prediction sampler, but the 'flux' family is trained with flow matching"):
            LoraMonitor(pipeline=flux, sampler="ddim", **dict(options, spec=spec_for("flux")))
    if "sdxl" in AVAILABLE:
        sdxl = load(saved_models, "sdxl")
        with pytest.raises(ValueError, match=r"it is an 'sdxl' UNet, not 'sd'; pass family='sdxl'"):
            LoraMonitor(family="sd", unet=sdxl.unet, vae=sdxl.vae, scheduler=sdxl.scheduler, text_encoder=sdxl.text_encoder,
                        tokenizer=sdxl.tokenizer, **options)


@pytest.mark.skipif("flux" not in AVAILABLE, reason="the installed diffusers has no FluxPipeline")
def test_a_flux_size_that_does_not_fit_the_latent_grid_is_refused_when_the_monitor_is_built(saved_models, tmp_path, monkeypatch):
    from diffusers.configuration_utils import FrozenDict

    flux = load(saved_models, "flux")
    # a real Flux VAE downsamples 8x (2 ** (4 blocks - 1)), the tiny one 2x: its config given 4 blocks, the pipeline the
    # monitor builds over it downsamples 8x, and its 2x2 patches make a preview divide by 16
    monkeypatch.setattr(flux.vae, "_internal_dict", FrozenDict({**flux.vae.config, "block_out_channels": [32] * 4}))
    options = dict(output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    with pytest.raises(ValueError, match=r"preview 0 \('a red circle'\) is 520x512; a 'flux' model needs width and height divisible by 16"):
        LoraMonitor(pipeline=flux, spec=spec_for("flux", width=520, height=512), **options)
    assert LoraMonitor(pipeline=flux, spec=spec_for("flux", width=512, height=512), **options).renderer.vae_scale_factor == 16


def test_a_family_newer_than_the_installed_diffusers_names_the_version(monkeypatch, saved_models, tmp_path):
    import diffusers

    pipe = load(saved_models, "sd")
    monkeypatch.setattr(diffusers, "__version__", "0.28.0")
    with pytest.raises(ValueError, match=r"the 'flux' family needs diffusers >= 0\.30\.0 \(FluxPipeline\); this environment has diffusers 0\.28\.0"):
        get_family("flux").pipeline_class()
    LoraMonitor(pipeline=pipe, spec=spec_for("sd"), output_dir=tmp_path, metrics=("ssim",), metric="ssim")  # SD still builds


# ----------------------------------------------------------------- guidance, memory
def test_flux_prompts_take_distilled_guidance_and_true_cfg_only_when_asked(saved_models, tmp_path):
    if "flux" not in AVAILABLE:
        pytest.skip("the installed diffusers has no FluxPipeline")
    pipe = load(saved_models, "flux")
    size = TINY_IMAGE_SIZE["flux"]
    spec = PreviewSpec((PreviewPrompt("a cat", seed=1, steps=2, width=size, height=size),
                        PreviewPrompt("a cat", "blurry", seed=1, steps=2, width=size, height=size, guidance_scale=3.0, distilled_guidance=2.0)))
    monitor = monitor_for(pipe, "flux", tmp_path, spec=spec)
    plain, true_cfg = (monitor.renderer.call_arguments(p) for p in spec.prompts)
    assert (plain["guidance_scale"], plain["true_cfg_scale"]) == (3.5, 1.0)
    assert (true_cfg["guidance_scale"], true_cfg["true_cfg_scale"]) == (2.0, 3.0)
    embeddings = monitor.renderer._prompt_embeddings(spec.prompts[1])
    assert "negative_prompt_embeds" in embeddings and "negative_prompt_embeds" not in monitor.renderer._prompt_embeddings(spec.prompts[0])


def test_a_batch_that_runs_out_of_memory_is_retried_in_halves(pipeline, small_spec, monkeypatch, recwarn):
    """A GPU running out of memory cannot happen here: the pipeline call raises torch's OOM error for batches
    above one image, as a full GPU would, and the renderer must finish with smaller batches."""
    from lora_monitor.render import OUT_OF_MEMORY, PreviewRenderer

    renderer = PreviewRenderer(unet=pipeline.unet, vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
                               scheduler=pipeline.scheduler, batch_size=4)
    expected = renderer.render(small_spec)
    call = type(renderer.pipeline).__call__
    sizes = []

    def tight(self, *args, **kwargs):
        batch = len(kwargs["generator"])
        sizes.append(batch)
        if batch > 1:
            raise OUT_OF_MEMORY[0]("CUDA out of memory (simulated)")
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(renderer.pipeline), "__call__", tight)
    images = renderer.render(small_spec)
    assert sizes == [2, 1, 1] and renderer.batch_size == 1
    for ours, theirs in zip(images, expected):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert any("ran out of device memory; retrying 1 at a time" in str(w.message) for w in recwarn)


def test_a_float16_vae_that_asks_for_upcasting_decodes_in_float32_one_image_at_a_time(pipeline, small_spec):
    from lora_monitor.render import PreviewRenderer

    renderer = PreviewRenderer(unet=pipeline.unet, vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
                               scheduler=pipeline.scheduler, batch_size=4)
    reference = renderer.render(small_spec)
    vae = pipeline.vae
    vae.to(torch.float16)
    weights = {name: p.detach().clone() for name, p in vae.named_parameters()}
    seen = []
    original = type(vae).decode

    def spy(self, latents, *args, **kwargs):
        seen.append((latents.shape[0], latents.dtype, next(self.parameters()).dtype))
        return original(self, latents, *args, **kwargs)

    type(vae).decode = spy
    try:
        images = renderer.render(small_spec)
    finally:
        type(vae).decode = original
    assert vae.config.force_upcast and seen and all(entry == (1, torch.float32, torch.float32) for entry in seen)
    assert all(p.dtype == torch.float16 and torch.equal(p, weights[name]) for name, p in vae.named_parameters()), "the VAE must be put back"
    for ours, theirs in zip(images, reference):
        torch.testing.assert_close(ours, theirs, atol=2e-2, rtol=0)


def test_base_renders_that_overflow_in_the_vae_say_it_is_the_vae(pipeline, small_spec, tmp_path):
    """A decoder whose first layer overflows (scaled by 1e38, as fp16 overflows past 65504) turns finite latents
    into inf/NaN pixels: the warning names the VAE and the fix, not 'training diverged'."""
    monitor = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    with torch.no_grad():
        pipeline.vae.decoder.conv_in.weight.mul_(1e38)
    with pytest.warns(RuntimeWarning, match=r"base preview\(s\) \[0, 1\] are not finite: the VAE decode in float32 turned finite latents into NaN/inf"):
        monitor.base_references()


def test_a_scorer_that_seeds_and_draws_leaves_the_random_states_as_they_were(pipeline, small_spec, tmp_path):
    import random

    import numpy as np

    class Seeding:
        name, higher_is_better, needs_reference = "seeding", True, False

        def __call__(self, images, reference=None):
            torch.manual_seed(123), np.random.seed(123), random.seed(123)
            return torch.rand(images.shape[0]) + float(np.random.rand()) + random.random()

    monitor = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=None, scorers=[Seeding()], metric="seeding")
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    monitor.on_epoch_end(1)
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], expected[0]) and np.array_equal(drawn[1], expected[1]) and drawn[2] == expected[2]


def test_a_preview_that_never_fits_skips_that_evaluation_and_training_goes_on(pipeline, small_spec, tmp_path, monkeypatch):
    """Simulated as above: every pipeline call raises torch's OOM error, as a GPU too full for even one preview would."""
    from lora_monitor.render import OUT_OF_MEMORY

    monitor = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    monitor.base_references()

    def full(self, *args, **kwargs):
        raise OUT_OF_MEMORY[0]("CUDA out of memory (simulated)")

    with monkeypatch.context() as patch:
        patch.setattr(type(monitor.renderer.pipeline), "__call__", full)
        with pytest.warns(RuntimeWarning, match=r"epoch 1 was not evaluated: rendering one 64x64 preview ran out of device memory.*training goes on"):
            assert monitor.on_epoch_end(1) is None
    assert monitor.policy.history == [] and not (tmp_path / "best").exists() and read_scores(tmp_path) == []
    assert monitor.on_epoch_end(2).is_best, "the next evaluation runs as usual"
