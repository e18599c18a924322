"""How much an epoch-end preview costs: lora-monitor against the two usual alternatives.

On the same model, prompts, seeds, steps and size this times three ways to get the previews of
one epoch:

  (a) monitor  LoraMonitor.on_epoch_end: batched render with the in-memory training modules, SSIM
               against the cached base renders, PNGs and a scores line written (export off).
  (b) example  what diffusers' example training script of the family does in its validation
               (EXAMPLES below): reload the pipeline with from_pretrained around the training modules
               it passes (the SD example passes only the UNet, so the VAE and text encoder reload; the
               Flux example first reloads the text encoders it freed after encoding), .to(device),
               then one pipeline call per image with its own generator; del afterwards.
  (c) bare     one pipeline call of the family over the same in-memory modules per batch, a list of
               generators, output_type="pt" (the floor for batched rendering).

and the peak memory of a short training-like run (load, add a LoRA, a few optimiser steps per
epoch) without any preview, with the monitor, and with the example's validation, each in its own
child process so that the peaks do not mix.

Families (--family): sd (default), sdxl, flux. The models are the offline random-weight pipelines
of lora_monitor.tiny ("tiny", "small"), or ("large", for a GPU) the real models' widths built by
benchmarks/realistic_models.py; saved to a temporary folder and loaded with from_pretrained. This
is a measurement, not a test: it prints figures.

    python benchmarks/preview_overhead.py                       # SD: tiny@64 px and small@128 px
    python benchmarks/preview_overhead.py --models small --repeats 7
    python benchmarks/preview_overhead.py --family flux --models small --steps 2
    python benchmarks/preview_overhead.py --family sdxl --models large --device cuda --dtype bfloat16 --steps 20
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

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
        monitor="ssim",
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


# --------------------------------------------------------------------------- timing
def timed(device: str, fn):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def time_model(size_name: str, folder: str, work_dir: Path, args) -> dict:
    """Seconds per evaluation of (a), (b), (c) on one model: one untimed warm call each, then
    `repeats` rounds with the order rotated every round so drift hits the three paths alike."""
    import torch

    from lora_monitor.families import get_family

    family = get_family(args.family)
    dtype, autocast = torch_dtype(args), precision(args)
    resolution = resolution_of(size_name, args)
    spec = preview_spec(args.prompts, args.steps, resolution, family.name)
    modules = load_training_modules(folder, family, args.device, dtype)
    denoiser = modules[family.denoiser]
    nudge_lora(denoiser)
    denoiser_params = sum(p.numel() for n, p in denoiser.named_parameters() if "lora_" not in n)
    monitor, metrics = build_monitor(
        modules, family, spec, str(work_dir / f"monitor-{size_name}"), args.brisque, args.batch_size, autocast=None if args.dtype == "float32" else autocast
    )
    bare = bare_pipeline(modules, family)

    epoch = 0

    def run_monitor():
        nonlocal epoch
        epoch += 1
        return monitor.on_epoch_end(epoch, step=epoch * 10)

    paths = {
        "monitor": run_monitor,
        "example": lambda: example_validation(folder, family, modules, spec, args.device, dtype, autocast),
        "bare": lambda: bare_render(bare, family, spec, args.batch_size, autocast),
    }

    # Warm-up (untimed): the monitor's first call also renders and caches the base references.
    warm_base_s, report = timed(args.device, run_monitor)
    _, bare_images = timed(args.device, paths["bare"])
    timed(args.device, paths["example"])
    same = max((a - c).abs().max().item() for a, c in zip(report.images, bare_images))

    times: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for round_index in range(args.repeats):
        rotated = order[round_index % 3 :] + order[: round_index % 3]
        for name in rotated:
            seconds, _ = timed(args.device, paths[name])
            times[name].append(seconds)
    # Where the time goes, each measured `repeats` times after the rounds: (b)'s reload alone, and
    # the monitor's own work on top of rendering (scoring; writing the PNGs).
    images, references = report.images, monitor.base_references()
    seeds = [p.seed for p in spec.prompts]
    parts = {
        "example_load": lambda: _load_only(folder, family, modules, args.device, dtype),
        "monitor_score": lambda: monitor.score(images, references),
        "monitor_save": lambda: monitor.record.save_previews(0, images, seeds),
    }
    part_times = {name: median([timed(args.device, fn)[0] for _ in range(args.repeats)]) for name, fn in parts.items()}

    del monitor, bare, modules, denoiser
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "model": size_name,
        "unet_params": denoiser_params,
        "resolution": resolution,
        "metrics": metrics,
        "times": times,
        "first_call_s": warm_base_s,
        "parts": part_times,
        "a_vs_c_max_abs_diff": same,
    }


def _load_only(folder: str, family, modules: dict, device: str, dtype=None) -> None:
    pipeline = example_pipeline(folder, family, modules, device, dtype)
    del pipeline


# --------------------------------------------------------------------------- memory (child processes)
def rss_now_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def encode_training_prompts(helper, family, prompts: list[str], device: str) -> dict:
    """The training prompts through the family pipeline's encode_prompt (what the examples' own
    encode_prompt computes), without CFG; Flux's text ids are zeros of the text length."""
    import torch

    parameters = inspect.signature(helper.encode_prompt).parameters
    wanted = {"prompt": prompts, "prompt_2": None, "device": device, "num_images_per_prompt": 1, "do_classifier_free_guidance": False}
    with torch.no_grad():
        outputs = helper.encode_prompt(**{name: value for name, value in wanted.items() if name in parameters})
    encoded = {name: value for name, value in zip(family.encode_outputs, outputs) if name is not None}
    if family.name == "flux":
        encoded["text_ids"] = torch.zeros(encoded["prompt_embeds"].shape[1], 3, device=device, dtype=encoded["prompt_embeds"].dtype)
    return encoded


def training_step(family, modules: dict, images, resolution: int, ids=None, helper=None, encoded=None):
    """One training-like forward pass of the denoiser with its loss, as the family's example computes it:
    noise prediction against DDPM noise for the UNets, flow matching (target noise - latents) for Flux."""
    import torch
    import torch.nn.functional as F

    vae, denoiser, noise_scheduler = modules["vae"], modules[family.denoiser], modules["scheduler"]
    batch, device = images.shape[0], images.device
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.sample()
        if family.flow_matching:
            latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        else:
            latents = latents * vae.config.scaling_factor
        if family.name == "sd":
            condition = {"encoder_hidden_states": modules["text_encoder"](ids)[0]}
        elif family.name == "sdxl":  # the SDXL example encodes every batch with both (frozen) text encoders
            encoded = encode_training_prompts(helper, family, PROMPTS[:batch], device)
            time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * batch, device=device)
            condition = {
                "encoder_hidden_states": encoded["prompt_embeds"],
                "added_cond_kwargs": {"text_embeds": encoded["pooled_prompt_embeds"], "time_ids": time_ids.to(encoded["prompt_embeds"].dtype)},
            }
    noise = torch.randn_like(latents)
    if family.name == "flux":
        from diffusers import FluxPipeline

        _, channels, height, width = latents.shape
        sigmas = torch.rand(batch, device=device)
        noisy = (1.0 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        guidance = torch.full((batch,), 3.5, device=device) if denoiser.config.guidance_embeds else None
        prediction = denoiser(
            hidden_states=FluxPipeline._pack_latents(noisy, batch, channels, height, width),
            timestep=sigmas,
            guidance=guidance,
            pooled_projections=encoded["pooled_prompt_embeds"],
            encoder_hidden_states=encoded["prompt_embeds"],
            txt_ids=encoded["text_ids"],
            img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, device, latents.dtype),
            return_dict=False,
        )[0]
        target = FluxPipeline._pack_latents(noise - latents, batch, channels, height, width)
    else:
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = denoiser(noisy, timesteps, **condition).sample
        target = noise
    return F.mse_loss(prediction.float(), target.float())


def memory_child(args) -> None:
    """A short training-like run: load, add a LoRA, `train_steps` AdamW steps per epoch for
    `epochs` epochs, and at each epoch end nothing / the monitor / the example's validation.
    Prints one JSON line with the peaks."""
    import torch

    from lora_monitor.families import get_family

    quiet_libraries()
    set_threads(args.threads)
    family = get_family(args.family)
    device, dtype, autocast = args.device, torch_dtype(args), precision(args)
    after_import_kib = rss_now_kib()
    folder = args.child_model_dir
    resolution = resolution_of(args.child_size, args)
    modules = load_training_modules(folder, family, device, dtype)
    spec = preview_spec(args.prompts, args.steps, resolution, family.name)
    monitor = None
    if args.child_mode == "monitor":
        monitor, _ = build_monitor(
            modules, family, spec, args.child_output_dir, args.brisque, args.batch_size, autocast=None if args.dtype == "float32" else autocast
        )
    batch = args.train_batch_size
    ids = helper = encoded = None
    if family.name == "sd":
        tokenizer = modules["tokenizer"]
        ids = tokenizer(
            PROMPTS[:batch], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
    else:
        helper = bare_pipeline(modules, family)
        if EXAMPLES[family.name].reloads_encoders:  # encode the training prompts once, then free the text encoders
            with autocast():
                encoded = encode_training_prompts(helper, family, PROMPTS[:batch], device)
            for name in family.encoder_names:
                modules[name] = None
            helper = None
            gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    after_load_kib = rss_now_kib()

    denoiser = modules[family.denoiser]
    trainable = [p for p in denoiser.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device, modules["vae"].dtype)
    denoiser.train()
    train_peak_cuda = 0
    for epoch in range(1, args.child_epochs + 1):
        for _ in range(args.child_train_steps):
            with autocast():
                loss = training_step(family, modules, images, resolution, ids=ids, helper=helper, encoded=encoded)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            train_peak_cuda = max(train_peak_cuda, torch.cuda.max_memory_allocated())
        if args.child_mode == "monitor":
            monitor.on_epoch_end(epoch, step=epoch * args.child_train_steps)
        elif args.child_mode == "example":
            example_validation(folder, family, modules, spec, device, dtype, autocast)
    result = {
        "mode": args.child_mode,
        "after_import_kib": after_import_kib,
        "after_load_kib": after_load_kib,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
    }
    if device.startswith("cuda"):
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        result["train_peak_cuda_bytes"] = train_peak_cuda
    print("RESULT " + json.dumps(result), flush=True)


def measure_memory(size_name: str, folder: str, work_dir: Path, args) -> dict:
    modes = ["none", "monitor"] + (["example"] if args.memory_example else [])
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_index in range(args.memory_repeats):
        rotated = modes[round_index % len(modes) :] + modes[: round_index % len(modes)]
        for mode in rotated:
            command = [
                sys.executable, os.path.abspath(__file__), "--device", args.device, "--family", args.family, "--dtype", args.dtype,
                "--prompts", str(args.prompts), "--steps", str(args.memory_steps), "--batch-size", str(args.batch_size),
                "--train-batch-size", str(args.train_batch_size), "--threads", str(args.threads),
                "--child-mode", mode, "--child-size", size_name, "--child-model-dir", folder,
                "--child-output-dir", str(work_dir / f"memory-{size_name}-{mode}-{round_index}"),
                "--child-epochs", str(args.child_epochs), "--child-train-steps", str(args.child_train_steps),
            ] + (["--brisque"] if args.brisque else []) + (["--resolution", str(args.resolution)] if args.resolution else [])  # fmt: skip
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                raise RuntimeError(f"memory child ({size_name}, {mode}) failed with code {completed.returncode}:\n{completed.stderr[-3000:]}")
            runs[mode].append(json.loads(lines[-1][len("RESULT ") :]))
    return {"model": size_name, "runs": runs}


# --------------------------------------------------------------------------- report
def median(values):
    return statistics.median(values)


def settings_text(args) -> str:
    """The render settings in the tables' titles; SD's read as they always have."""
    from lora_monitor.families import get_family
    from lora_monitor.render import default_sampler

    family = get_family(args.family)
    if family.name == "sd":
        text = f"{args.prompts} prompts, {args.steps} DDIM steps, CFG {GUIDANCE_SCALE}"
    else:
        sampler = "DDIM" if default_sampler(family) == "ddim" else "flow-matching Euler"
        guidance = f"CFG {family.cfg_default}" if not family.cfg_needs_negative else "no CFG"
        if family.distilled_argument:
            guidance = f"distilled guidance {family.distilled_default}, {guidance}"
        text = f"{family.name}, {args.prompts} prompts, {args.steps} {sampler} steps, {guidance}"
    return text + ("" if args.dtype == "float32" else f", {args.dtype}")


def print_timing(results: list[dict], args) -> None:
    print()
    print(
        f"Seconds per evaluation ({settings_text(args)}, batch {args.batch_size}, "
        f"device {args.device}); median of {args.repeats} interleaved rounds after one warm call each [min-max]"
    )
    label = "UNet" if args.family in ("sd", "sdxl") else "DiT"
    header = f"{'model':<6} {label:>6} {'px':>4} | {'(a) monitor':>20} {'(b) example':>20} {'(c) bare':>20} | {'a/b':>5} {'a/c':>5}"
    print(header)
    print("-" * len(header))
    for result in results:
        t = result["times"]
        cells = []
        for name in ("monitor", "example", "bare"):
            values = t[name]
            cells.append(f"{median(values):6.3f} [{min(values):.2f}-{max(values):.2f}]")
        a, b, c = (median(t[n]) for n in ("monitor", "example", "bare"))
        print(
            f"{result['model']:<6} {result['unet_params'] / 1e6:5.1f}M {result['resolution']:>4} | "
            f"{cells[0]:>20} {cells[1]:>20} {cells[2]:>20} | {a / b:5.2f} {a / c:5.2f}"
        )
    print()
    for result in results:
        t = result["times"]
        a, b, c = (median(t[n]) for n in ("monitor", "example", "bare"))
        parts = result["parts"]
        paired_ac = median([x / y for x, y in zip(t["monitor"], t["bare"])])
        paired_ab = median([x / y for x, y in zip(t["monitor"], t["example"])])
        print(
            f"{result['model']}: metrics {'+'.join(result['metrics'])}; (a) vs (c) images max |diff| "
            f"{result['a_vs_c_max_abs_diff']:.1e}; first monitor call (renders the base references too) {result['first_call_s']:.2f} s"
        )
        print(
            f"  parts (median): (b)'s reload alone {parts['example_load']:.3f} s; (a)'s scoring {parts['monitor_score'] * 1e3:.0f} ms "
            f"and PNG writing {parts['monitor_save'] * 1e3:.0f} ms = {(parts['monitor_score'] + parts['monitor_save']) / c * 100:.1f}% of (c)"
        )
        fastest = {n: min(t[n]) for n in t}
        print(
            f"  other estimators: median of per-round ratios (three calls back to back) a/b {paired_ab:.2f}, a/c {paired_ac:.3f}; "
            f"fastest call of each a/b {fastest['monitor'] / fastest['example']:.2f}, a/c {fastest['monitor'] / fastest['bare']:.3f}"
        )
        verdict_c = "met" if a <= 1.10 * c else "NOT met"
        verdict_b = "met" if a < b else "NOT met"
        print(f"  targets: a within 1.10x of c: {verdict_c} ({a / c:.3f}x); a faster than b: {verdict_b} (b/a = {b / a:.2f}x)")


def print_memory(results: list[dict], args) -> None:
    print()
    family = "" if args.family == "sd" else f"{args.family}, "
    print(
        f"Peak memory of a training-like child process ({family}{args.child_epochs} epochs x {args.child_train_steps} AdamW steps, "
        f"train batch {args.train_batch_size}, evaluation of the same {args.prompts} previews at {args.memory_steps} step(s) at each "
        f"epoch end); median of {args.memory_repeats} run(s)"
    )
    print("ratio: against the same run with nothing at epoch end; 'above import' subtracts the RSS after importing torch/diffusers")
    cuda = args.device.startswith("cuda")
    header = f"{'model':<6} {'epoch-end':<9} | {'pre-train RSS MiB':>17} | {'peak RSS MiB':>12} {'ratio':>6} | {'above import MiB':>16} {'ratio':>6}"
    if cuda:
        header += f" | {'CUDA peak MiB':>13} {'ratio':>6}"
    print(header)
    print("-" * len(header))
    for result in results:
        runs = result["runs"]
        peak = {m: median([r["peak_rss_kib"] for r in runs[m]]) / 1024 for m in runs}
        loaded = {m: median([r["after_load_kib"] for r in runs[m]]) / 1024 for m in runs}
        above = {m: median([r["peak_rss_kib"] - r["after_import_kib"] for r in runs[m]]) / 1024 for m in runs}
        gpu = {m: median([r.get("peak_cuda_bytes", 0) for r in runs[m]]) / 2**20 for m in runs} if cuda else {}
        for mode in runs:
            line = (
                f"{result['model']:<6} {mode:<9} | {loaded[mode]:17.0f} | {peak[mode]:12.0f} {peak[mode] / peak['none']:6.3f} | "
                f"{above[mode]:16.0f} {above[mode] / above['none']:6.3f}"
            )
            if cuda:
                line += f" | {gpu[mode]:13.1f} {gpu[mode] / gpu['none']:6.3f}"
            print(line)
        ratio = (gpu["monitor"] / gpu["none"]) if cuda else (peak["monitor"] / peak["none"])
        print(f"  target: monitor peak at most 1.10x of none: {'met' if ratio <= 1.10 else 'NOT met'} ({ratio:.3f}x)")


def parse_args(argv=None):
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--family", default="sd", choices=FAMILY_CHOICES, help="model family (default sd)")
    parser.add_argument(
        "--dtype", default="float32", choices=DTYPES,
        help="weights of the frozen modules (the LoRA stays float32) and autocast of every render and training step; "
        "default float32, bfloat16 as the examples train on a GPU",
    )  # fmt: skip
    parser.add_argument(
        "--models", default="tiny,small",
        help="comma-separated, from: tiny, small (lora_monitor.tiny), large (real widths, benchmarks/realistic_models.py; for a GPU)",
    )  # fmt: skip
    parser.add_argument("--resolution", type=int, default=None, help="preview side in px (default: tiny 64, small 128, large the family's own)")
    parser.add_argument("--work-dir", default=None, help="where the temporary model folders go (default: the system's temporary folder)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per path (median reported)")
    parser.add_argument("--prompts", type=int, default=4, help=f"number of preview prompts (at most {len(PROMPTS)})")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps per preview in the timings")
    parser.add_argument("--batch-size", type=int, default=4, help="render batch size of (a) and (c)")
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch CPU threads; 0 keeps torch's default. Default: 1 on CPU (a machine shared with other work gives "
        "far steadier figures with one thread), torch's default on CUDA",
    )  # fmt: skip
    parser.add_argument("--brisque", action="store_true", help="also score BRISQUE in (a) if lora_monitor has it")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--memory-example", action="store_true", help="also measure the peak with the example's validation")
    parser.add_argument("--memory-repeats", type=int, default=1, help="child runs per mode (median reported)")
    parser.add_argument(
        "--memory-steps", type=int, default=1,
        help="denoising steps per preview in the memory children (a render's peak does not grow with the steps)",
    )  # fmt: skip
    parser.add_argument("--train-batch-size", type=int, default=2, help="batch of the training-like steps in the memory children")
    parser.add_argument("--child-epochs", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-train-steps", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--child-mode", choices=["none", "monitor", "example"], help=argparse.SUPPRESS)
    parser.add_argument("--child-size", help=argparse.SUPPRESS)
    parser.add_argument("--child-model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--child-output-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for model in models:
        if model not in RESOLUTION:
            parser.error(f"unknown model {model!r} in --models; choose from {', '.join(RESOLUTION)}")
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be between 1 and {len(PROMPTS)}, got {args.prompts}")
    for name in ("repeats", "steps", "batch_size", "memory_repeats", "memory_steps", "train_batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.train_batch_size > len(PROMPTS):
        parser.error(f"--train-batch-size must be at most {len(PROMPTS)}, got {args.train_batch_size}")
    if args.resolution is not None and args.resolution < 8:
        parser.error(f"--resolution must be at least 8, got {args.resolution}")
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    args.model_list = models
    return args


def main(argv=None) -> None:
    # Run from a checkout without installing: make `lora_monitor` importable from the repository root
    # (and benchmarks/realistic_models.py from here), in this process and in the memory children.
    root, here = Path(__file__).resolve().parents[1], Path(__file__).resolve().parent
    for path in (str(here), str(root)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    args = parse_args(argv)
    if args.child_mode:
        memory_child(args)
        return
    import torch

    quiet_libraries()
    set_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    timing, memory = [], []
    with tempfile.TemporaryDirectory(prefix="preview-overhead-", dir=args.work_dir) as tmp:
        work_dir = Path(tmp)
        for size_name in args.model_list:
            started = time.perf_counter()
            folder = save_model(size_name, args.family, work_dir, args)
            if size_name == "large":
                print(f"built {size_name} {args.family} in {time.perf_counter() - started:.0f} s", flush=True)
            started = time.perf_counter()
            timing.append(time_model(size_name, folder, work_dir, args))
            print(f"timed {size_name} in {time.perf_counter() - started:.0f} s", flush=True)
            if not args.no_memory:
                started = time.perf_counter()
                memory.append(measure_memory(size_name, folder, work_dir, args))
                print(f"measured {size_name} memory in {time.perf_counter() - started:.0f} s", flush=True)
    print_timing(timing, args)
    if memory:
        print_memory(memory, args)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
