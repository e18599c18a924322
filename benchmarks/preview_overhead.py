"""How much an epoch-end preview costs: lora-monitor against the two usual alternatives.

On the same model, prompts, seeds, steps and size this times three ways to get the previews of
one epoch:

  (a) monitor  LoraMonitor.on_epoch_end: batched render with the in-memory training modules, SSIM
               against the cached base renders, PNGs and a scores line written (export off).
  (b) example  what diffusers' examples/text_to_image/train_text_to_image_lora.py does in
               log_validation: DiffusionPipeline.from_pretrained(model, unet=training unet),
               .to(device), then one pipeline call per image with its own generator; del afterwards.
  (c) bare     one StableDiffusionPipeline call over the same in-memory modules per batch, a list
               of generators, output_type="pt" (the floor for batched rendering).

and the peak memory of a short training-like run (load, add a LoRA, a few optimiser steps per
epoch) without any preview, with the monitor, and with the example's validation, each in its own
child process so that the peaks do not mix.

The models are the offline random-weight pipelines of lora_monitor.tiny, saved to a temporary
folder and loaded with from_pretrained. This is a measurement, not a test: it prints figures.

    python benchmarks/preview_overhead.py                       # tiny@64 px and small@128 px
    python benchmarks/preview_overhead.py --models small --repeats 7
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

# Preview size per model: the tiny model at 64 px, the ~24M-parameter UNet at 128 px.
RESOLUTION = {"tiny": 64, "small": 128}
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
GUIDANCE_SCALE = 7.5


# --------------------------------------------------------------------------- model set-up
def quiet_libraries() -> None:
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def set_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


def load_training_modules(folder: str, device: str):
    """Load the model the way a diffusers LoRA training script does, with a peft LoRA (r=4) on the UNet."""
    from lora_monitor.demo import load_for_lora_training

    tokenizer, text_encoder, vae, unet, noise_scheduler = load_for_lora_training(folder, rank=4)
    for module in (unet, vae, text_encoder):
        module.to(device)
    return unet, vae, text_encoder, tokenizer, noise_scheduler


def nudge_lora(unet, seed: int = 0, scale: float = 0.05) -> None:
    """Give lora_B (zero at init) small values, as training would, so LoRA previews differ from the base."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(parameter.shape, generator=generator) * scale
                parameter.copy_(noise.to(parameter.device, parameter.dtype))


def preview_spec(prompts: int, steps: int, size: int):
    from lora_monitor.spec import PreviewSpec

    return PreviewSpec.from_prompts(
        PROMPTS[:prompts], seed=FIRST_SEED, steps=steps, guidance_scale=GUIDANCE_SCALE, width=size, height=size
    )


def build_monitor(modules, spec, output_dir: str, brisque: bool, batch_size: int):
    """The monitor over the training modules; BRISQUE joins when asked for and available."""
    from lora_monitor.monitor import LoraMonitor
    from lora_monitor.scoring import get_scorer

    unet, vae, text_encoder, tokenizer, noise_scheduler = modules
    metrics = ["ssim"]
    if brisque:
        try:
            get_scorer("brisque")
            metrics.append("brisque")
        except ValueError as error:
            print(f"note: --brisque asked for, but it is not available ({error}); timing SSIM only", file=sys.stderr)
    return LoraMonitor(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=noise_scheduler,
        spec=spec,
        output_dir=output_dir,
        metrics=tuple(metrics),
        monitor="ssim",
        batch_size=batch_size,
        export=False,
    ), metrics


def example_validation(folder: str, unet, spec, device: str):
    """diffusers' train_text_to_image_lora.py log_validation: reload the pipeline around the training
    UNet, move it to the device, render one image per call with its own generator, then drop it.
    (The example runs this under torch.autocast(device); here everything stays float32, like (a) and (c).)"""
    import torch
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder, unet=unet)
    pipeline = pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    images = []
    for prompt in spec.prompts:
        generator = torch.Generator(device=device).manual_seed(prompt.seed)
        images.append(
            pipeline(
                prompt.prompt,
                negative_prompt=prompt.negative_prompt,
                num_inference_steps=prompt.steps,
                guidance_scale=prompt.guidance_scale,
                width=prompt.width,
                height=prompt.height,
                generator=generator,
            ).images[0]
        )
    del pipeline
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return images


def bare_pipeline(modules):
    """A StableDiffusionPipeline over the in-memory modules with a DDIM sampler from the training scheduler's config."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, vae, text_encoder, tokenizer, noise_scheduler = modules
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def bare_render(pipeline, spec, batch_size: int):
    import torch

    images = []
    for start in range(0, len(spec), batch_size):
        batch = spec.prompts[start : start + batch_size]
        first = batch[0]
        output = pipeline(
            prompt=[p.prompt for p in batch],
            negative_prompt=[p.negative_prompt for p in batch],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            width=first.width,
            height=first.height,
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

    resolution = RESOLUTION[size_name]
    spec = preview_spec(args.prompts, args.steps, resolution)
    modules = load_training_modules(folder, args.device)
    nudge_lora(modules[0])
    unet_params = sum(p.numel() for n, p in modules[0].named_parameters() if "lora_" not in n)
    monitor, metrics = build_monitor(modules, spec, str(work_dir / f"monitor-{size_name}"), args.brisque, args.batch_size)
    bare = bare_pipeline(modules)

    epoch = 0

    def run_monitor():
        nonlocal epoch
        epoch += 1
        return monitor.on_epoch_end(epoch, step=epoch * 10)

    paths = {
        "monitor": run_monitor,
        "example": lambda: example_validation(folder, modules[0], spec, args.device),
        "bare": lambda: bare_render(bare, spec, args.batch_size),
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
        "example_load": lambda: _load_only(folder, modules[0], args.device),
        "monitor_score": lambda: monitor.score(images, references),
        "monitor_save": lambda: monitor.record.save_previews(0, images, seeds),
    }
    part_times = {name: median([timed(args.device, fn)[0] for _ in range(args.repeats)]) for name, fn in parts.items()}

    del monitor, bare, modules
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return {
        "model": size_name,
        "unet_params": unet_params,
        "resolution": resolution,
        "metrics": metrics,
        "times": times,
        "first_call_s": warm_base_s,
        "parts": part_times,
        "a_vs_c_max_abs_diff": same,
    }


def _load_only(folder: str, unet, device: str) -> None:
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(folder, unet=unet).to(device)
    del pipeline


# --------------------------------------------------------------------------- memory (child processes)
def rss_now_kib() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def memory_child(args) -> None:
    """A short training-like run: load, add a LoRA, `train_steps` AdamW steps per epoch for
    `epochs` epochs, and at each epoch end nothing / the monitor / the example's validation.
    Prints one JSON line with the peaks."""
    import torch
    import torch.nn.functional as F

    quiet_libraries()
    set_threads(args.threads)
    device = args.device
    after_import_kib = rss_now_kib()
    folder = args.child_model_dir
    resolution = RESOLUTION[args.child_size]
    modules = load_training_modules(folder, device)
    unet, vae, text_encoder, tokenizer, noise_scheduler = modules
    spec = preview_spec(args.prompts, args.steps, resolution)
    monitor = None
    if args.child_mode == "monitor":
        monitor, _ = build_monitor(modules, spec, args.child_output_dir, args.brisque, args.batch_size)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    after_load_kib = rss_now_kib()

    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = args.train_batch_size
    images = (torch.rand(batch, 3, resolution, resolution, generator=generator) * 2 - 1).to(device)
    ids = tokenizer(
        PROMPTS[:batch], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)
    unet.train()
    train_peak_cuda = 0
    for epoch in range(1, args.child_epochs + 1):
        for _ in range(args.child_train_steps):
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor
                encoder_states = text_encoder(ids)[0]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            prediction = unet(noisy, timesteps, encoder_states).sample
            loss = F.mse_loss(prediction.float(), noise.float())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            train_peak_cuda = max(train_peak_cuda, torch.cuda.max_memory_allocated())
        if args.child_mode == "monitor":
            monitor.on_epoch_end(epoch, step=epoch * args.child_train_steps)
        elif args.child_mode == "example":
            example_validation(folder, unet, spec, device)
    result = {
        "mode": args.child_mode,
        "after_import_kib": after_import_kib,
        "after_load_kib": after_load_kib,
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
    }
    if device.startswith("cuda"):
        result["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    print("RESULT " + json.dumps(result), flush=True)


def measure_memory(size_name: str, folder: str, work_dir: Path, args) -> dict:
    modes = ["none", "monitor"] + (["example"] if args.memory_example else [])
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_index in range(args.memory_repeats):
        rotated = modes[round_index % len(modes) :] + modes[: round_index % len(modes)]
        for mode in rotated:
            command = [
                sys.executable, os.path.abspath(__file__), "--device", args.device,
                "--prompts", str(args.prompts), "--steps", str(args.memory_steps), "--batch-size", str(args.batch_size),
                "--train-batch-size", str(args.train_batch_size), "--threads", str(args.threads),
                "--child-mode", mode, "--child-size", size_name, "--child-model-dir", folder,
                "--child-output-dir", str(work_dir / f"memory-{size_name}-{mode}-{round_index}"),
                "--child-epochs", str(args.child_epochs), "--child-train-steps", str(args.child_train_steps),
            ] + (["--brisque"] if args.brisque else [])  # fmt: skip
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                raise RuntimeError(f"memory child ({size_name}, {mode}) failed with code {completed.returncode}:\n{completed.stderr[-3000:]}")
            runs[mode].append(json.loads(lines[-1][len("RESULT ") :]))
    return {"model": size_name, "runs": runs}


# --------------------------------------------------------------------------- report
def median(values):
    return statistics.median(values)


def print_timing(results: list[dict], args) -> None:
    print()
    print(
        f"Seconds per evaluation ({args.prompts} prompts, {args.steps} DDIM steps, CFG {GUIDANCE_SCALE}, batch {args.batch_size}, "
        f"device {args.device}); median of {args.repeats} interleaved rounds after one warm call each [min-max]"
    )
    header = f"{'model':<6} {'UNet':>6} {'px':>4} | {'(a) monitor':>20} {'(b) example':>20} {'(c) bare':>20} | {'a/b':>5} {'a/c':>5}"
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
    print(
        f"Peak memory of a training-like child process ({args.child_epochs} epochs x {args.child_train_steps} AdamW steps, "
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
    parser.add_argument("--models", default="tiny,small", help="comma-separated, from: " + ", ".join(RESOLUTION))
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
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    args.model_list = models
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child_mode:
        memory_child(args)
        return
    import torch

    # Run from a checkout without installing: make `lora_monitor` importable from the repository root.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
    quiet_libraries()
    set_threads(args.threads)
    from lora_monitor.tiny import save_tiny_pipeline

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}", flush=True)
    timing, memory = [], []
    with tempfile.TemporaryDirectory(prefix="preview-overhead-") as tmp:
        work_dir = Path(tmp)
        for size_name in args.model_list:
            folder = str(save_tiny_pipeline(work_dir / f"{size_name}-sd", size=size_name))
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
