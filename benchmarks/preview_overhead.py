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
is a measurement, not a test: it prints figures. The model set-up and the three ways to render are in
benchmarks/_overhead_paths.py, the memory children in benchmarks/_overhead_memory.py; this script times
and reports.

    python benchmarks/preview_overhead.py                       # SD: tiny@64 px and small@128 px
    python benchmarks/preview_overhead.py --models small --repeats 7
    python benchmarks/preview_overhead.py --family flux --models small --steps 2
    python benchmarks/preview_overhead.py --family sdxl --models large --device cuda --dtype bfloat16 --steps 20
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import tempfile
import time
from pathlib import Path

import common
from _overhead_memory import measure_memory, memory_child
from _overhead_paths import (
    DTYPES,
    FAMILY_CHOICES,
    GUIDANCE_SCALE,
    PROMPTS,
    RESOLUTION,
    bare_pipeline,
    bare_render,
    build_monitor,
    example_reload,
    example_validation,
    load_training_modules,
    nudge_lora,
    precision,
    preview_spec,
    quiet_libraries,
    resolution_of,
    save_model,
    set_threads,
    torch_dtype,
)

common.offline_environment()


# --------------------------------------------------------------------------- timing
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
    warm_base_s, report = common.timed(args.device, run_monitor)
    _, bare_images = common.timed(args.device, paths["bare"])
    common.timed(args.device, paths["example"])
    same = max((a - c).abs().max().item() for a, c in zip(report.images, bare_images))

    times: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths)
    for round_index in range(args.repeats):
        rotated = order[round_index % 3 :] + order[: round_index % 3]
        for name in rotated:
            seconds, _ = common.timed(args.device, paths[name])
            times[name].append(seconds)
    # Where the time goes, each measured `repeats` times after the rounds: (b)'s reload alone, and
    # the monitor's own work on top of rendering (scoring; writing the PNGs).
    images, references = report.images, monitor.base_references()
    seeds = [p.seed for p in spec.prompts]
    parts = {
        "example_load": lambda: example_reload(folder, family, modules, args.device, dtype),
        "monitor_score": lambda: monitor.score(images, references),
        "monitor_save": lambda: monitor.record.save_previews(0, images, seeds),
    }
    part_times = {name: median([common.timed(args.device, fn)[0] for _ in range(args.repeats)]) for name, fn in parts.items()}

    monitor = bare = modules = denoiser = None  # let go of the model before the next one loads
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
    common.use_checkout()  # run from a checkout without installing: here and in the memory children
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
