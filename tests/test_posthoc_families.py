"""Post-hoc `strength` and `epochs --base` on base models of other families (SDXL, Flux), tiny and random.

The base loads with DiffusionPipeline and its family is detected from the pipeline class; checkpoints
are kohya-format files (named the way sd-scripts names SDXL and Flux LoRAs, text encoders included)
and diffusers-format folders (the monitor's exports, keyed by step). Every rendered candidate must
equal what the same pipeline renders after diffusers' own load_lora_weights at that scale; scale 0 is
the base model; the best is the in-training monitor's choice on those images.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from lora_monitor.families import FAMILIES, get_family
from lora_monitor.monitor import LoraMonitor
from lora_monitor.cli import main
from lora_monitor.spec import PreviewSpec
from lora_monitor.tiny import LORA_TARGET_MODULES, TINY_IMAGE_SIZE, available_tiny_families, denoiser

AVAILABLE = available_tiny_families()
PROMPTS = ["a red circle", "a blue square on grass"]
RANK, ALPHA = 4, 2  # alpha != rank: kohya's alpha must reach the loaded LoRA


def family_param(name: str):
    reason = f"the installed diffusers has no {FAMILIES[name].pipeline} (needs >= {FAMILIES[name].min_diffusers})"
    return pytest.param(name, marks=[] if name in AVAILABLE else pytest.mark.skip(reason=reason))


FAMILY_PARAMS = [family_param("sdxl"), family_param("flux")]


# ----------------------------------------------------------------------------------- kohya-format files
def _random(shape, generator, scale=0.3) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * scale).contiguous()


def _kohya_module(state, key, down_shape, up_shape, generator, alpha=ALPHA) -> None:
    state[f"{key}.lora_down.weight"] = _random(down_shape, generator)
    state[f"{key}.lora_up.weight"] = _random(up_shape, generator)
    state[f"{key}.alpha"] = torch.tensor(float(alpha))


def _kohya_text_encoder(state, text_encoder, prefix, generator) -> None:
    """sd-scripts' text-encoder names: lora_te1_text_model_encoder_layers_0_self_attn_q_proj (transformers 4's module
    path; transformers 5's CLIPTextModel drops the text_model level, kohya's files keep it)."""
    for name, module in text_encoder.named_modules():
        if re.search(r"self_attn\.(q|k|v|out)_proj$", name):
            path = name if name.startswith("text_model.") else "text_model." + name
            _kohya_module(state, prefix + path.replace(".", "_"), (RANK, module.in_features), (module.out_features, RANK), generator)


def _sgm_name(name: str, layers_per_block: int) -> str | None:
    """A diffusers SDXL UNet attention path in the original (SGM) naming kohya's SDXL UNet uses."""
    step = layers_per_block + 1
    if match := re.match(r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"input_blocks.{1 + int(match[1]) * step + int(match[2])}.1.{match[3]}"
    if match := re.match(r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.*)", name):
        return f"output_blocks.{int(match[1]) * step + int(match[2])}.1.{match[3]}"
    if match := re.match(r"mid_block\.attentions\.0\.(.*)", name):
        return f"middle_block.1.{match[1]}"
    return None


def kohya_sdxl_lora(pipe, seed: int) -> dict[str, torch.Tensor]:
    """An SDXL LoRA as sdxl_train_network.py saves it: lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    (SGM block numbers), lora_te1_... (CLIP ViT-L) and lora_te2_... (OpenCLIP bigG), each with lora_down/lora_up/alpha."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, module in pipe.unet.named_modules():
        if re.search(r"attn[12]\.(to_q|to_k|to_v|to_out\.0)$", name):
            key = "lora_unet_" + _sgm_name(name, pipe.unet.config.layers_per_block).replace(".", "_")
            _kohya_module(state, key, (RANK, module.in_features), (module.out_features, RANK), generator)
    _kohya_text_encoder(state, pipe.text_encoder, "lora_te1_", generator)
    _kohya_text_encoder(state, pipe.text_encoder_2, "lora_te2_", generator)
    return state


def kohya_flux_lora(pipe, seed: int) -> dict[str, torch.Tensor]:
    """A Flux LoRA as flux_train_network.py saves it: the original (BFL) module names, q/k/v as one fused
    lora_unet_double_blocks_0_img_attn_qkv (rank r down, 3 x dim up), img_attn_proj, txt_attn_qkv, and lora_te1_
    for CLIP. (Single blocks' fused linear1 is left out: diffusers splits it at Flux.1's real sizes, 3072/12288.)"""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for index, block in enumerate(pipe.transformer.transformer_blocks):
        attention = block.attn
        dim_in, dim_out = attention.to_q.in_features, attention.to_q.out_features
        _kohya_module(state, f"lora_unet_double_blocks_{index}_img_attn_qkv", (RANK, dim_in), (3 * dim_out, RANK), generator)
        _kohya_module(state, f"lora_unet_double_blocks_{index}_img_attn_proj", (RANK, dim_out), (attention.to_out[0].out_features, RANK), generator)
        context_in = attention.add_q_proj.in_features
        _kohya_module(state, f"lora_unet_double_blocks_{index}_txt_attn_qkv", (RANK, context_in), (3 * attention.add_q_proj.out_features, RANK), generator)
    _kohya_text_encoder(state, pipe.text_encoder, "lora_te1_", generator)
    return state


KOHYA_WRITERS = {"sdxl": kohya_sdxl_lora, "flux": kohya_flux_lora}


# ----------------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def bases(family_models):
    """family -> a saved tiny base model folder (conftest's family_models)."""
    return family_models


def load(base: str):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def prompt_file(tmp_path, family: str):
    size = TINY_IMAGE_SIZE[family]
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"{text} --d {7 + i} --s 2 --w {size} --h {size}" for i, text in enumerate(PROMPTS)) + "\n", encoding="utf-8")
    return path


def spec_for(family: str) -> PreviewSpec:
    size = TINY_IMAGE_SIZE[family]
    return PreviewSpec.from_prompts(PROMPTS, seed=7, steps=2, width=size, height=size)


def reference_render(pipe, family: str, scale: float | None = None) -> list[torch.Tensor]:
    """What the pipeline itself renders from the prompt strings, with diffusers' own LoRA scale (None: not passed).
    SD-style UNets preview with DDIM made from the model's scheduler config; flow-matching families with their own."""
    from diffusers import DDIMScheduler

    entry = get_family(family)
    spec = spec_for(family)
    if not entry.flow_matching:
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    arguments = dict(
        prompt=[p.prompt for p in spec.prompts], num_inference_steps=2, width=spec.prompts[0].width, height=spec.prompts[0].height,
        output_type="pt", generator=[torch.Generator().manual_seed(p.seed) for p in spec.prompts],
    )
    arguments[entry.cfg_argument] = entry.cfg_default
    if entry.distilled_argument:
        arguments[entry.distilled_argument] = entry.distilled_default
    if not entry.cfg_needs_negative and any(p.negative_prompt for p in spec.prompts):
        arguments["negative_prompt"] = [p.negative_prompt for p in spec.prompts]  # none given: the plain call's default
    if scale is not None:
        key = "joint_attention_kwargs" if entry.denoiser == "transformer" else "cross_attention_kwargs"
        arguments[key] = {"scale": scale}
    with torch.no_grad():
        return [image.float().cpu() for image in pipe(**arguments).images]


def assert_images_equal(ours, theirs, what) -> None:
    assert len(ours) == len(theirs), what
    for index, (a, b) in enumerate(zip(ours, theirs)):
        assert a.shape == b.shape, (what, index, a.shape, b.shape)
        assert torch.allclose(a, b, atol=1e-5), (what, index, float((a - b).abs().max()))


def run_analysis(argv):
    """The command's Analysis (images included), through the CLI's own argument parsing."""
    import argparse

    from lora_monitor.cli.posthoc import analyse_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    return analyse_args(parser.parse_args([*argv, "--no-progress"]))


def monitor_best(spec, base, candidates: dict[int, list[torch.Tensor]], tmp_path) -> int:
    """The in-training monitor's choice on the same images (keys in increasing order)."""
    monitor = LoraMonitor(spec=spec, output_dir=tmp_path / "monitor", metrics=("brisque", "ssim"), export=False)
    monitor.set_base_references(base)
    for key in sorted(candidates):
        monitor.evaluate(key, candidates[key])
    return monitor.best_epoch


def lora_layers(pipe, family: str) -> dict[str, int]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    entry = get_family(family)
    return {
        name: sum(isinstance(sub, BaseTunerLayer) for sub in getattr(pipe, name).modules())
        for name in (entry.denoiser, *entry.encoder_names)
        if getattr(pipe, name, None) is not None
    }


# ----------------------------------------------------------------------------------- strength
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_strength_of_a_kohya_lora_matches_diffusers_lora_scale(family, bases, tmp_path):
    from safetensors.torch import load_file, save_file

    base = bases(family)
    pipe = load(base)
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(KOHYA_WRITERS[family](pipe, seed=1), str(checkpoint), metadata={"ss_epoch": "4"})
    strengths = [0.0, 0.5, 1.0]
    analysis = run_analysis(
        ["strength", str(checkpoint), "--base", base, "--prompts", str(prompt_file(tmp_path, family)), "--strengths", "0,0.5,1"]
    )
    assert analysis.source.endswith(f"({family})")
    assert [r.candidate.strength for r in analysis.results] == strengths
    assert all(r.candidate.epoch is None for r in analysis.results)

    base_images = reference_render(pipe, family)  # nothing loaded: the base model
    pipe.load_lora_weights(load_file(str(checkpoint)), adapter_name="kohya")
    loaded = lora_layers(pipe, family)
    # every kohya module reached the model: the denoiser and each text encoder the file names
    kohya_modules = {key.split(".")[0] for key in load_file(str(checkpoint)) if key.endswith("lora_down.weight")}
    expected_layers = {
        "sdxl": {"unet": sum(k.startswith("lora_unet_") for k in kohya_modules), "text_encoder": sum(k.startswith("lora_te1_") for k in kohya_modules),
                 "text_encoder_2": sum(k.startswith("lora_te2_") for k in kohya_modules)},
        # each fused q/k/v module of kohya's Flux is three diffusers layers
        "flux": {"transformer": sum(3 if k.endswith("_qkv") else 1 for k in kohya_modules if k.startswith("lora_unet_")),
                 "text_encoder": sum(k.startswith("lora_te1_") for k in kohya_modules), "text_encoder_2": 0},
    }[family]
    assert loaded == expected_layers
    rendered = {}
    for result in analysis.results:
        scale = result.candidate.strength
        rendered[scale] = reference_render(pipe, family, scale=scale)
        assert_images_equal(result.candidate.images, rendered[scale], f"{family} strength {scale}")
    assert_images_equal(analysis.results[0].candidate.images, base_images, "strength 0 is the base model")
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(rendered[1.0], base_images)), "the LoRA changed nothing"
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(rendered[0.5], rendered[1.0])), "the scale changed nothing"

    best = monitor_best(spec_for(family), base_images, {i + 1: rendered[s] for i, s in enumerate(strengths)}, tmp_path)
    assert analysis.best.candidate.strength == strengths[best - 1]


def _quantized(images):
    from lora_monitor.monitor import quantize

    return [quantize(image) for image in images]


# ----------------------------------------------------------------------------------- epochs
@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_epochs_of_kohya_checkpoints_rank_like_the_monitor(family, bases, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    base = bases(family)
    pipe = load(base)
    folder = tmp_path / "output"
    folder.mkdir()
    for epoch in (1, 2):
        save_file(KOHYA_WRITERS[family](pipe, seed=10 + epoch), str(folder / f"tiny-{epoch:06d}.safetensors"), metadata={"ss_epoch": str(epoch)})
    save_file(KOHYA_WRITERS[family](pipe, seed=13), str(folder / "tiny.safetensors"), metadata={"ss_epoch": "3"})  # the final one
    code = main(["epochs", str(folder), "--base", base, "--prompts", str(prompt_file(tmp_path, family)), "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert [c["epoch"] for c in result["candidates"]] == [1, 2, 3] and result["unit"] == "epoch"

    analysis = run_analysis(["epochs", str(folder), "--base", base, "--prompts", str(prompt_file(tmp_path, family))])
    base_images = reference_render(pipe, family)
    expected = {}
    for epoch, name in ((1, "tiny-000001"), (2, "tiny-000002"), (3, "tiny")):
        pipe.load_lora_weights(load_file(str(folder / f"{name}.safetensors")), adapter_name=f"epoch{epoch}")
        expected[epoch] = reference_render(pipe, family)
        pipe.unload_lora_weights()
    for r in analysis.results:
        assert_images_equal(r.candidate.images, expected[r.candidate.epoch], f"{family} epoch {r.candidate.epoch}")
    for ours, theirs in zip(analysis.references, _quantized(base_images)):  # the references are the base model, rounded to 8 bits
        assert torch.allclose(ours.float(), theirs.float(), atol=1 / 255 + 1e-6)
    best = monitor_best(spec_for(family), base_images, expected, tmp_path)
    assert result["best"]["epoch"] == analysis.best.candidate.epoch == best


@pytest.mark.parametrize("family", FAMILY_PARAMS)
def test_epochs_of_step_keyed_diffusers_exports(family, bases, tmp_path, capsys):
    """The monitor's exports of a step-based run (diffusers format, sidecar "unit": "step") are ranked by step."""
    from peft import LoraConfig

    from lora_monitor import export as exporting

    base = bases(family)
    pipe = load(base)
    torch.manual_seed(0)
    model = denoiser(pipe)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES[family]))
    entry = get_family(family)
    folder = tmp_path / "top_k"
    for step in (10, 20):
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "lora_B" in name:
                    parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
        exporting.export_checkpoint(
            folder / f"run-{step:04d}", exporting.lora_writer(family, {entry.denoiser: model}), {"epoch": step, "unit": "step", "step": step}
        )
    argv = ["epochs", str(folder), "--base", base, "--prompts", str(prompt_file(tmp_path, family))]
    assert main([*argv, "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert table.lstrip().startswith("step") and "Best: step" in table
    analysis = run_analysis(argv)
    assert [r.candidate.label for r in analysis.results] == ["step 10", "step 20"]
    assert analysis.to_dict()["unit"] == "step" and "epoch" not in analysis.explanation()

    fresh = load(base)
    base_images = reference_render(fresh, family)
    expected = {}
    for step in (10, 20):
        fresh.load_lora_weights(str(folder / f"run-{step:04d}"), weight_name="pytorch_lora_weights.safetensors", adapter_name=f"s{step}")
        expected[step] = reference_render(fresh, family)
        fresh.unload_lora_weights()
    for r in analysis.results:
        assert_images_equal(r.candidate.images, expected[r.candidate.epoch], f"{family} step {r.candidate.epoch}")
    assert analysis.best.candidate.epoch == monitor_best(spec_for(family), base_images, expected, tmp_path)


# ----------------------------------------------------------------------------------- family errors
def test_an_unknown_family_is_a_cli_error_listing_the_families(tiny_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["strength", str(tmp_path), "--base", tiny_model, "--family", "flx", "--prompt", "a cat"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --family: unknown model family 'flx'; supported families: sd, sdxl, sd3, flux" in err
    assert "Did you mean 'flux'?" in err and "Traceback" not in err


def test_the_wrong_family_or_family_without_base_is_a_clear_error(tiny_model, tmp_path, capsys):
    (tmp_path / "ckpt").mkdir()
    argv = ["epochs", str(tmp_path / "ckpt"), "--prompt", "a cat", "--steps", "2", "--size", "64", "--no-progress"]
    (tmp_path / "ckpt" / "tiny-000001.safetensors").write_bytes(b"")
    assert main([*argv, "--base", tiny_model, "--family", "sdxl"]) == 2  # an SD 1.x folder forced to SDXL
    err = capsys.readouterr().err
    assert "the 'sdxl' family (StableDiffusionXLPipeline) renders with" in err and "missing: text_encoder_2, tokenizer_2." in err
    assert "it is an 'sd' UNet; pass --family 'sd'" in err and "Traceback" not in err
    assert main([*argv, "--family", "sdxl"]) == 2
    assert "--family chooses the family of the --base model" in capsys.readouterr().err


def test_a_family_newer_than_the_installed_diffusers_names_the_release(tmp_path, capsys, monkeypatch):
    """A base whose pipeline this diffusers lacks (model_index.json names it, or --family asks for it): the family table's error."""
    import diffusers

    if hasattr(diffusers, "QwenImagePipeline"):
        monkeypatch.setattr(diffusers, "__version__", "0.34.0")
    base = tmp_path / "qwen"
    base.mkdir()
    (base / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline", "_diffusers_version": "0.35.0"}))
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "tiny-000001.safetensors").write_bytes(b"")
    argv = ["epochs", str(tmp_path / "ckpt"), "--prompt", "a cat", "--no-progress"]
    for extra in ([], ["--family", "qwen"]):
        assert main([*argv, "--base", str(base), *extra]) == 2
        err = capsys.readouterr().err
        assert "the 'qwenimage' family needs diffusers >= 0.35.0 (QwenImagePipeline); this environment has diffusers" in err, err


@pytest.mark.skipif("flux" not in AVAILABLE, reason="the installed diffusers has no FluxPipeline")
def test_a_noise_prediction_sampler_is_refused_for_flux(bases, tmp_path, capsys):
    from safetensors.torch import save_file

    base = bases("flux")
    checkpoint = tmp_path / "tiny.safetensors"
    save_file(kohya_flux_lora(load(base), seed=1), str(checkpoint))
    argv = ["strength", str(checkpoint), "--base", base, "--prompts", str(prompt_file(tmp_path, "flux")), "--strengths", "1", "--no-progress"]
    assert main([*argv, "--sampler", "ddim"]) == 2
    err = capsys.readouterr().err
    assert "sampler='ddim' is a noise-prediction sampler, but the 'flux' family is trained with flow matching" in err


@pytest.mark.skipif("sdxl" not in AVAILABLE, reason="the installed diffusers has no StableDiffusionXLPipeline")
def test_a_lora_of_another_family_is_refused(bases, tiny_model, tmp_path, capsys):
    from safetensors.torch import save_file

    checkpoint = tmp_path / "tiny.safetensors"
    save_file(kohya_sdxl_lora(load(bases("sdxl")), seed=1), str(checkpoint))
    argv = ["strength", str(checkpoint), "--base", tiny_model, "--prompt", "a cat", "--steps", "2", "--size", "64", "--strengths", "1", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert str(checkpoint) in err and "'sd' base model" in err and "Traceback" not in err


def test_help_names_the_families_and_the_family_flag(capsys):
    for command in ("epochs", "strength", "grid"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--family NAME" in text and "detected from the pipeline class" in text
        for name, family in FAMILIES.items():
            assert f"{name} " in text and family.pipeline in text and f"diffusers >= {family.min_diffusers}" in text
