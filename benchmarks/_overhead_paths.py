"""The parts of benchmarks/preview_overhead.py that set up a model and render one epoch's previews three ways.

  (a) monitor  `build_monitor`: LoraMonitor over the in-memory training modules (`load_training_modules`).
  (b) example  `example_validation`: what diffusers' example training script of the family does (EXAMPLES).
  (c) bare     `bare_pipeline` and `bare_render`: one pipeline call per batch over the same modules.

Also the benchmark's prompts, seeds and sizes, and the precision every render and training step runs in. torch,
diffusers and lora_monitor are imported inside the functions, after the script has set up its environment.
"""
from __future__ import annotations

import contextlib
import gc
import json
import sys
from dataclasses import dataclass
from pathlib import Path

# Preview size per model: the tiny model at 64 px, the ~24M-parameter UNet at 128 px; "large" (real
# widths, for a GPU) at the family's own resolution (realistic_models.RESOLUTION).
RESOLUTION = {"tiny": 64, "small": 128, "large": 512}
PROMPTS = [
    "a red apple on a wooden table",
    "a lighthouse on a cliff at dusk",
    "portrait of an old sailor, oil painting",
    "a small cabin in a snowy forest",
    "a bowl of ramen, studio photo",
    "a city street in the rain at night",
    "a watercolor of a fox in a meadow",
    "a vintage car parked by the sea",
]
FIRST_SEED = 1234
GUIDANCE_SCALE = 7.5  # SD's CFG scale; the other families render with their own defaults (families.py)
FAMILY_CHOICES = ("sd", "sdxl", "flux")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Example:
    """How a diffusers example training script of the family builds its validation pipeline."""

    script: str
    passes: tuple[str, ...]  # training modules it hands to from_pretrained (the rest reload from the folder)
    # The loop frees the frozen text encoders once the training prompts are encoded, and the
    # validation loads them again (train_dreambooth_lora_flux.py without --train_text_encoder).
    reloads_encoders: bool = False


EXAMPLES = {
    # log_validation: DiffusionPipeline.from_pretrained(model, unet=unwrap_model(unet), torch_dtype=weight_dtype)
    "sd": Example("examples/text_to_image/train_text_to_image_lora.py", ("unet",)),
    # StableDiffusionXLPipeline.from_pretrained(model, vae=vae, text_encoder=..., text_encoder_2=..., unet=...)
    "sdxl": Example("examples/text_to_image/train_text_to_image_lora_sdxl.py", ("unet", "vae", "text_encoder", "text_encoder_2")),
    # load_text_encoders(...), then FluxPipeline.from_pretrained(model, vae=vae, text_encoder=..., text_encoder_2=..., transformer=...)
    "flux": Example(
        "examples/dreambooth/train_dreambooth_lora_flux.py", ("transformer", "vae", "text_encoder", "text_encoder_2"), reloads_encoders=True
    ),
}


# --------------------------------------------------------------------------- model set-up
def quiet_libraries() -> None:
    import warnings

    import diffusers
    import transformers

    # diffusers 0.42 renames from_pretrained's torch_dtype to dtype; the examples (and older releases) say torch_dtype
    warnings.filterwarnings("ignore", message=r".*torch_dtype.* is deprecated", category=FutureWarning)

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def torch_dtype(args):
    import torch

    return getattr(torch, args.dtype)


def precision(args):
    """The context every render and training step runs in: nothing in float32, else autocast to the dtype
    (what an Accelerator with mixed precision gives the loop, and the monitor through attach())."""
    import torch

    if args.dtype == "float32":
        return contextlib.nullcontext
    device_type = torch.device(args.device).type
    return lambda: torch.autocast(device_type=device_type, dtype=torch_dtype(args))


def resolution_of(size_name: str, args) -> int:
    if args.resolution:
        return args.resolution
    if size_name == "large":
        from realistic_models import RESOLUTION as LARGE

        return LARGE[args.family]
    return RESOLUTION[size_name]


def save_model(size_name: str, family: str, work_dir: Path, args) -> str:
    if size_name == "large":
        from realistic_models import save_realistic_pipeline

        return str(save_realistic_pipeline(work_dir / f"{size_name}-{family}", family, device=args.device, dtype=torch_dtype(args)))
    from lora_monitor.tiny import save_tiny_pipeline

    return str(save_tiny_pipeline(work_dir / f"{size_name}-{family}", size=size_name, family=family))


def load_training_modules(folder: str, family, device: str, dtype=None) -> dict:
    """Load the model the way a diffusers LoRA training script does, with a peft LoRA (r=4) on the denoiser.

    Returns the pipeline's modules by name; "scheduler" is the training noise scheduler (DDPM for the
    UNet families, the model's flow-matching scheduler for Flux). In a dtype other than float32 the frozen
    weights are cast to it and the LoRA stays float32 (the examples' weight_dtype and cast_training_params)."""
    import torch

    if family.name == "sd":
        from lora_monitor.demo import load_for_lora_training

        tokenizer, text_encoder, vae, unet, noise_scheduler = load_for_lora_training(folder, rank=4)
        modules = {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": noise_scheduler}
    else:
        from diffusers import DDPMScheduler
        from peft import LoraConfig

        from lora_monitor.tiny import LORA_TARGET_MODULES

        load_dtype = {} if dtype in (None, torch.float32) else {"torch_dtype": dtype}
        pipeline = family.pipeline_class().from_pretrained(folder, **family.extra_components, **load_dtype)
        modules = {name: getattr(pipeline, name) for name in family.components}
        scheduler = modules["scheduler"]
        modules["scheduler"] = (type(scheduler) if family.flow_matching else DDPMScheduler).from_config(scheduler.config)
        del pipeline
        for name in family.components:
            if isinstance(modules[name], torch.nn.Module):
                modules[name].requires_grad_(False)
        modules[family.denoiser].add_adapter(
            LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES[family.name])
        )
    for module in modules.values():
        if isinstance(module, torch.nn.Module):
            if dtype in (None, torch.float32):
                module.to(device)
            else:
                module.to(device, dtype)
    for parameter in modules[family.denoiser].parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.float()
    return modules


def nudge_lora(denoiser, seed: int = 0, scale: float = 0.05) -> None:
    """Give lora_B (zero at init) small values, as training would, so LoRA previews differ from the base."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in denoiser.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator) * scale
                parameter.copy_(noise.to(parameter.device, parameter.dtype))


def preview_spec(prompts: int, steps: int, size: int, family: str = "sd"):
    """SD previews at CFG 7.5 (as this benchmark always used); the others at their family's defaults
    (SDXL CFG 5; Flux distilled guidance 3.5 and no CFG, like its example's pipeline call)."""
    from lora_monitor.spec import PreviewSpec

    guidance = GUIDANCE_SCALE if family == "sd" else None
    return PreviewSpec.from_prompts(PROMPTS[:prompts], seed=FIRST_SEED, steps=steps, guidance_scale=guidance, width=size, height=size)


def components_of(modules: dict, family) -> dict:
    return {name: modules.get(name) for name in family.components}


def build_monitor(modules, family, spec, output_dir: str, brisque: bool, batch_size: int, autocast=None):
    """The monitor over the training modules; BRISQUE joins when asked for and available."""
    from lora_monitor.monitor import LoraMonitor
    from lora_monitor.scoring import get_scorer

    metrics = ["ssim"]
    if brisque:
        try:
            get_scorer("brisque")
            metrics.append("brisque")
        except ValueError as error:
            print(f"note: --brisque asked for, but it is not available ({error}); timing SSIM only", file=sys.stderr)
    monitor = LoraMonitor.from_modules(
        family.name,
        **components_of(modules, family),
        spec=spec,
        output_dir=output_dir,
        metrics=tuple(metrics),
        metric="ssim",
        batch_size=batch_size,
        export=False,
    )
    if autocast is not None:
        monitor.renderer.autocast = autocast  # what attach(accelerator) does with accelerator.autocast
    return monitor, metrics


def call_arguments(family, batch, *, single: bool = False) -> dict:
    """The pipeline call's arguments for a batch of prompts that share their settings (as the monitor's renderer
    sets them: CFG where the family has it, Flux's distilled guidance; no negative text leaves the pipeline's
    default, so SDXL uses its zero embeddings); `single` passes one prompt as a string."""
    first = batch[0]
    cfg = family.cfg_default if first.guidance_scale is None else first.guidance_scale
    arguments = {"prompt": [p.prompt for p in batch]}
    if (not family.cfg_needs_negative or cfg > 1) and any(p.negative_prompt for p in batch):
        arguments["negative_prompt"] = [p.negative_prompt for p in batch]
    arguments.update(num_inference_steps=first.steps)
    arguments[family.cfg_argument] = cfg
    arguments.update(width=first.width, height=first.height)
    if family.distilled_argument:
        arguments[family.distilled_argument] = family.distilled_default if first.distilled_guidance is None else first.distilled_guidance
    arguments.update(family.call_arguments)
    if single:
        arguments.update({name: arguments[name][0] for name in ("prompt", "negative_prompt") if name in arguments})
    return arguments


def encoder_class(folder: str, name: str):
    """The text encoder class model_index.json names (the example's import_model_class_from_model_name_or_path)."""
    import importlib

    library, class_name = json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))[name]
    return getattr(importlib.import_module(library), class_name)


def example_pipeline(folder: str, family, modules: dict, device: str, dtype=None):
    """The example's validation pipeline: from_pretrained around the training modules it passes, .to(device)."""
    import torch
    from diffusers import DiffusionPipeline

    example = EXAMPLES[family.name]
    passed = {name: modules[name] for name in example.passes if modules.get(name) is not None}
    load_dtype = {} if dtype in (None, torch.float32) else {"torch_dtype": dtype}
    if example.reloads_encoders:
        for name in family.encoder_names:
            passed[name] = encoder_class(folder, name).from_pretrained(folder, subfolder=name, **load_dtype)
    pipeline_class = DiffusionPipeline if family.name == "sd" else family.pipeline_class()
    pipeline = pipeline_class.from_pretrained(folder, **passed, **load_dtype)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def example_validation(folder: str, family, modules: dict, spec, device: str, dtype=None, autocast=contextlib.nullcontext):
    """diffusers' example log_validation: reload the pipeline around the training modules, move it to the device,
    render one image per call with its own generator, then drop it. The examples run this under torch.autocast
    (SD, SDXL) or not at all (Flux); here it runs in the same precision as (a) and (c)."""
    import torch

    pipeline = example_pipeline(folder, family, modules, device, dtype)
    images = []
    with autocast():
        for prompt in spec.prompts:
            generator = torch.Generator(device=device).manual_seed(prompt.seed)
            images.append(pipeline(**call_arguments(family, [prompt], single=True), generator=generator).images[0])
    del pipeline
    if EXAMPLES[family.name].reloads_encoders:  # the example's `del text_encoder_one, text_encoder_two; free_memory()`
        gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return images


def bare_pipeline(modules: dict, family):
    """The family's pipeline over the in-memory modules, with the monitor's sampler made from the training scheduler's
    config (DDIM for the UNet families, the model's own flow-matching scheduler for Flux)."""
    from lora_monitor.families import pipeline_arguments
    from lora_monitor.render import default_sampler, make_sampler

    pipeline_class = family.pipeline_class()
    build = {name: modules.get(name) for name in family.components}
    build["scheduler"] = make_sampler(modules["scheduler"], default_sampler(family), family)
    build.update(family.extra_components)
    accepted = pipeline_arguments(pipeline_class)
    pipeline = pipeline_class(**{name: value for name, value in build.items() if name in accepted})
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def bare_render(pipeline, family, spec, batch_size: int, autocast=contextlib.nullcontext):
    import torch

    images = []
    with autocast():
        for start in range(0, len(spec), batch_size):
            batch = spec.prompts[start : start + batch_size]
            output = pipeline(
                **call_arguments(family, batch),
                generator=[torch.Generator(device="cpu").manual_seed(p.seed) for p in batch],
                output_type="pt",
            )
            images.extend(output.images.float().cpu())
    return images



def example_reload(folder: str, family, modules: dict, device: str, dtype=None) -> None:
    """(b)'s reload alone: the example's pipeline built and dropped, nothing rendered."""
    pipeline = example_pipeline(folder, family, modules, device, dtype)
    del pipeline
