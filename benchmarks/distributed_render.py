"""Epoch-end preview time with 1 and 2 processes on the same previews: what splitting them buys.

Each setting runs in fresh child processes: the same offline random-weight model (lora_monitor.tiny),
a LoRA on its UNet, the same prompts, seeds, steps and size, and LoraMonitor.on_epoch_end timed over
a few epochs after a warm-up epoch (base references rendered then, so they are not timed). With 2
processes the script is started by `accelerate launch --multi_gpu --num_processes 2` and builds
Accelerator(cpu=True); each rank renders and scores its share, rank 0 gathers, decides and writes
the PNGs and the scores line. Export is off (writing the LoRA is not what is measured here).

Settings:
  1 proc x 1 thread    one process on one core: the baseline (one device)
  2 procs x 1 thread   the previews split over two processes with one core each (two devices)
  1 proc x N threads   one process using all N cores, for comparison on a CPU

On a CPU the 2-process figure shows the split (each process renders half the previews); it is not a
GPU speed-up. On GPUs each process renders its share on its own device.

    python benchmarks/distributed_render.py                      # tiny model, 8 prompts at 64 px, 4 steps
    python benchmarks/distributed_render.py --model small --size 128 --prompts 8 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

common.offline_environment()

PROMPTS = ("a red circle", "a blue square", "a yellow circle on grey", "a green square", "a red square", "a blue circle", "a grey field", "a green circle")


def worker(args: argparse.Namespace) -> None:
    """One process of a setting: time on_epoch_end over `repeats` epochs; rank 0 writes the figures."""
    import torch
    from accelerate import Accelerator
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    from lora_monitor.distributed import shard_indices
    from lora_monitor.monitor import LoraMonitor
    from lora_monitor.spec import PreviewSpec

    torch.set_num_threads(args.threads)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(args.model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    spec = PreviewSpec.from_prompts(prompts, seed=7, steps=args.steps, width=args.size, height=args.size)
    monitor = LoraMonitor.from_pipeline(
        pipe, spec=spec, output_dir=Path(args.output_dir) / f"rank{accelerator.process_index}", metrics=("ssim",), metric="ssim",
        export=False, batch_size=args.batch_size,
    )
    monitor.attach(accelerator)

    render_times: list[float] = []
    original_render = monitor.renderer.render

    def timed_render(spec, indices=None):
        start = time.perf_counter()
        try:
            return original_render(spec, indices)
        finally:
            render_times.append(time.perf_counter() - start)

    monitor.renderer.render = timed_render
    monitor.on_epoch_end(1)  # warm-up; renders the base references too
    epoch_times = []
    for epoch in range(2, args.repeats + 2):
        accelerator.wait_for_everyone()
        start = time.perf_counter()
        monitor.on_epoch_end(epoch)
        epoch_times.append(time.perf_counter() - start)
    own_render = render_times[-args.repeats:]
    if accelerator.is_main_process:
        figures = {
            "processes": accelerator.num_processes,
            "threads": args.threads,
            "epoch_s": epoch_times,
            "rank0_render_s": own_render,
            "rank0_previews": len(shard_indices(spec, 0, accelerator.num_processes)),
        }
        Path(args.result).write_text(json.dumps(figures), encoding="utf-8")
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_setting(args: argparse.Namespace, model_dir: Path, work: Path, processes: int, threads: int) -> dict:
    result = work / f"result-{processes}x{threads}.json"
    worker_args = [
        str(Path(__file__).resolve()), "--worker", "--model-dir", str(model_dir), "--output-dir", str(work / f"out-{processes}x{threads}"),
        "--result", str(result), "--threads", str(threads), "--prompts", str(args.prompts), "--size", str(args.size),
        "--steps", str(args.steps), "--repeats", str(args.repeats), "--batch-size", str(args.batch_size),
    ]
    if processes == 1:
        command = [sys.executable, *worker_args]
    else:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), *worker_args]
    # PYTHONPATH names the checkout (common.use_checkout in main)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"the {processes}-process setting failed:\n{done.stderr[-4000:]}")
    return json.loads(result.read_text(encoding="utf-8"))


def main() -> None:
    parser = argparse.ArgumentParser(description="Epoch-end preview time with 1 and 2 processes on the same previews.")
    parser.add_argument("--model", choices=("tiny", "small"), default="tiny")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed epochs after the warm-up")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the 1-process comparison row")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    common.use_checkout()
    if args.worker:
        worker(args)
        return

    from lora_monitor.tiny import save_tiny_pipeline

    settings = [(1, 1), (2, 1)] + ([(1, args.threads)] if args.threads > 1 else [])
    print(f"model {args.model}, {args.prompts} prompts at {args.size} px, {args.steps} steps, batch size {args.batch_size}, "
          f"{args.repeats} timed epochs; {os.cpu_count()} CPU cores")
    with tempfile.TemporaryDirectory(prefix="lora-monitor-bench-") as tmp:
        work = Path(tmp)
        model_dir = save_tiny_pipeline(work / "model", size=args.model)
        rows = []
        for processes, threads in settings:
            figures = run_setting(args, model_dir, work, processes, threads)
            rows.append(figures)
    baseline = statistics.median(rows[0]["epoch_s"])
    print(f"{'setting':<22}{'epoch (median)':>16}{'range':>18}{'rank 0 render':>15}{'rank 0 previews':>17}{'vs 1x1':>9}")
    for figures in rows:
        median = statistics.median(figures["epoch_s"])
        label = f"{figures['processes']} proc x {figures['threads']} thread"
        spread = f"{min(figures['epoch_s']):.2f}-{max(figures['epoch_s']):.2f} s"
        render = statistics.median(figures["rank0_render_s"])
        print(f"{label:<22}{median:>14.2f} s{spread:>18}{render:>13.2f} s{figures['rank0_previews']:>17}{median / baseline:>8.2f}x")
    two = statistics.median(rows[1]["epoch_s"])
    print(f"2 processes / 1 process (one core each): {two / baseline:.2f} (ideal 0.50; on a CPU this shows the split, not a GPU speed-up)")


if __name__ == "__main__":
    main()
