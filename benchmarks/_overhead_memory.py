"""The peak-memory part of benchmarks/preview_overhead.py: a short training-like run in a child process of the
script (`memory_child`, started by `measure_memory` with --child-mode), with nothing, the monitor or the example's
validation at each epoch end, so that the peaks of the three do not mix.
"""
from __future__ import annotations

import gc
import inspect
import json
import resource
import subprocess
import sys
from pathlib import Path

from _overhead_paths import (
    EXAMPLES,
    PROMPTS,
    bare_pipeline,
    build_monitor,
    example_validation,
    load_training_modules,
    precision,
    preview_spec,
    quiet_libraries,
    resolution_of,
    set_threads,
    torch_dtype,
)

#: The script the children run (with --child-mode).
SCRIPT = Path(__file__).resolve().with_name("preview_overhead.py")


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
                sys.executable, str(SCRIPT), "--device", args.device, "--family", args.family, "--dtype", args.dtype,
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

