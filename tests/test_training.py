"""Whole training runs on the tiny model: the monitor changes nothing, and a resumed run decides the same; a UNet
compiled in place renders through its compiled forward; a loop that calls the monitor on the main process only
fails fast instead of hanging (this file is also the script those 2-process runs launch)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lora_monitor.demo import TrainConfig, load_for_lora_training, train, write_synthetic_dataset
from lora_monitor.policy import DvarRule
from lora_monitor.spec import PreviewSpec


# whole trainings compared bit for bit: meaningful on a GPU only with deterministic kernels (conftest)
pytestmark = pytest.mark.usefixtures("deterministic_algorithms")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_synthetic_dataset(tmp_path_factory.mktemp("data"), count=4, size=64))


def config(tiny_model, data_dir, output_dir, **kwargs) -> TrainConfig:
    options = dict(
        pretrained=tiny_model, train_data_dir=data_dir, output_dir=str(output_dir), epochs=2, batch_size=2, learning_rate=5e-2, resolution=32
    )
    options.update(kwargs)
    return TrainConfig(**options)


# 32 px previews and training images keep these whole runs quick on a 2-core CPU
MONITOR = dict(metrics=("ssim",), metric="ssim", spec=PreviewSpec.from_prompts(["a red circle", "a blue square"], steps=3, width=32, height=32))


def test_trained_lora_is_bit_identical_with_and_without_the_monitor(tiny_model, data_dir, tmp_path):
    plain = train(config(tiny_model, data_dir, tmp_path / "plain", monitor=None))
    monitored = train(config(tiny_model, data_dir, tmp_path / "monitored", monitor=MONITOR))
    assert monitored["monitor"].policy.history, "the monitor did not evaluate"
    assert plain["lora"].keys() == monitored["lora"].keys() and plain["lora"]
    for name, tensor in plain["lora"].items():
        assert torch.equal(tensor, monitored["lora"][name]), f"{name} differs with the monitor attached"
    assert monitored["unet"].training, "the UNet must be back in train mode"


def test_trained_lora_is_bit_identical_with_every_signal_switched_on(tiny_model, data_dir, tmp_path, tiny_embedders):
    """Likeness, memorization, adherence, diversity (two seeds per prompt) and the validation loss, on top of BRISQUE
    and SSIM, with the DVAR rule armed: the LoRA trained beside them is the LoRA trained without the monitor."""
    spec = PreviewSpec.from_prompts(["a red circle", "a blue square"], steps=2, width=32, height=32, seeds_per_prompt=2)
    monitor = dict(
        spec=spec, preset="likeness", metrics=("likeness", "likeness_clip", "memorization", "adherence", "diversity", "val_loss", "brisque", "ssim"),
        references=data_dir, validation=data_dir, clip_model=tiny_embedders["clip"], dino_model=tiny_embedders["dino"],
        dvar=DvarRule(window=2, threshold=0.5),
    )
    plain = train(config(tiny_model, data_dir, tmp_path / "plain", epochs=3, monitor=None))
    monitored = train(config(tiny_model, data_dir, tmp_path / "monitored", epochs=3, monitor=monitor))
    history = monitored["monitor"].policy.history
    assert len(history) == 3 and set(history[0].aggregates) == set(monitor["metrics"])
    for name, tensor in plain["lora"].items():
        assert torch.equal(tensor, monitored["lora"][name]), f"{name} differs with every signal switched on"
    assert monitored["unet"].training


def test_monitor_renders_with_the_unet_that_trains(tiny_model, data_dir, tmp_path):
    result = train(config(tiny_model, data_dir, tmp_path, epochs=1, monitor=MONITOR))
    assert result["monitor"].renderer.unet is result["unet"]


def test_resumed_run_reaches_the_same_best_and_stop_epoch(tiny_model, data_dir, tmp_path):
    # bounds make the choice non-trivial: "best" is the epoch closest to the base that moved far enough from it
    monitor = dict(MONITOR, patience=2, bounds={"ssim": (None, 0.9995)})
    whole = train(config(tiny_model, data_dir, tmp_path / "whole", epochs=6, monitor=monitor))
    first = train(config(tiny_model, data_dir, tmp_path / "split", epochs=6, monitor=monitor, save_state_each_epoch=True, stop_after_epoch=2))
    assert first["monitor"].policy.history[-1].epoch == 2
    resumed = train(
        config(tiny_model, data_dir, tmp_path / "split", epochs=6, monitor=monitor, resume_from=str(tmp_path / "split" / "checkpoints" / "epoch-2"))
    )
    a, b = whole["monitor"].policy, resumed["monitor"].policy
    assert a.stopped_epoch is not None, "the uninterrupted run should stop early for this test to mean something"
    assert (b.best_epoch, b.stopped_epoch) == (a.best_epoch, a.stopped_epoch)
    assert [r.value for r in b.history] == pytest.approx([r.value for r in a.history], abs=1e-6)
    for name, tensor in whole["lora"].items():
        torch.testing.assert_close(resumed["lora"][name], tensor)


@pytest.mark.parametrize("backend", ["eager", pytest.param("inductor", marks=pytest.mark.slow)])  # inductor: ~100 s on 2 cores
def test_monitor_renders_through_a_unet_compiled_in_place(pipeline, small_spec, tmp_path, backend):
    """torch >= 2.2's unet.compile() compiles in place (no _orig_mod wrapper): the monitor keeps that very module and
    its previews go through the compiled forward, equal to the eager ones. dynamo's 'eager' backend needs no C compiler;
    the default one, inductor, compiles C++ (a slow test). A counter around the backend shows the compiled path ran."""
    from lora_monitor.monitor import LoraMonitor

    monitor = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    eager = monitor.renderer.render(small_spec)
    graphs = []

    def counting_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.lookup_backend(backend)(graph_module, example_inputs)

    torch._dynamo.reset()
    pipeline.unet.compile(backend=counting_backend)
    try:
        assert monitor.unet is pipeline.unet and not hasattr(pipeline.unet, "_orig_mod")
        report = monitor.on_epoch_end(1, step=10)
        assert graphs, "the previews did not run through the compiled forward"
        for compiled, reference in zip(report.images, eager):
            torch.testing.assert_close(compiled, reference, atol=1e-4, rtol=0)
        assert report.exported == tmp_path / "best"  # the LoRA of the compiled module exports as usual
    finally:
        torch._dynamo.reset()


# --- several processes: the monitor called on the main process only (the diffusers-script habit) --------------------
SYNC_TIMEOUT_S = 3


def main_only_loop(model: str, output_dir: str) -> None:
    """Run on 2 processes by the test below. First the ranks call on_epoch_end for different epochs (both must raise and
    go on); then one epoch end where only the main process calls the monitor, as with `if accelerator.is_main_process:`
    around it, while the other rank goes on to the next step's gradient all-reduce (here a barrier)."""
    from accelerate import Accelerator

    from lora_monitor.distributed import RanksOutOfStepError
    from lora_monitor.monitor import LoraMonitor

    accelerator = Accelerator(cpu=True)
    rank_dir = Path(output_dir) / f"rank{accelerator.process_index}"
    rank_dir.mkdir(parents=True, exist_ok=True)
    tokenizer, text_encoder, vae, unet, scheduler = load_for_lora_training(model)
    monitor = LoraMonitor(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        output_dir=rank_dir / "monitor", sync_timeout_s=SYNC_TIMEOUT_S, **MONITOR,
    )
    unet = accelerator.prepare(unet)
    monitor.attach(accelerator)
    try:
        monitor.on_epoch_end(1 + accelerator.process_index, step=2)
    except RanksOutOfStepError as error:
        (rank_dir / "mismatch.txt").write_text(str(error), encoding="utf-8")
    try:
        if accelerator.is_main_process:
            monitor.on_epoch_end(1, step=2)
        accelerator.wait_for_everyone()
    except RanksOutOfStepError as error:
        (rank_dir / "error.txt").write_text(str(error), encoding="utf-8")
        raise


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_monitor_called_on_the_main_process_only_fails_fast_with_the_fix(tiny_model, tmp_path):
    """With `if accelerator.is_main_process:` around on_epoch_end rank 0 would wait in the gathers forever; it raises
    after sync_timeout_s instead, saying what to change, and the launcher ends the other rank."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
        __file__, "--main-only", tiny_model, str(tmp_path),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the 2-process run hung instead of failing fast; output:\n{expired.output}\n{expired.stderr}")
    seconds = time.perf_counter() - start
    assert done.returncode != 0
    message = (tmp_path / "rank0" / "error.txt").read_text()
    assert message.startswith(f"rank 0 of 2 reached epoch 1's evaluation, but rank(s) 1 did not within {SYNC_TIMEOUT_S} s")
    assert "on every process" in message and "`if accelerator.is_main_process:`" in message and "sync_timeout_s=" in message
    assert not (tmp_path / "rank0" / "monitor" / "scores.jsonl").exists()  # nothing was gathered, decided or written
    for rank in (0, 1):  # before that, ranks at different epochs: both said so at once, neither waited
        mismatch = (tmp_path / f"rank{rank}" / "mismatch.txt").read_text()
        assert mismatch.startswith("the ranks reached different evaluations (rank 0: epoch 1's evaluation; rank 1: epoch 2's evaluation)")
    print(f"main-process-only run failed in {seconds:.1f} s")
    assert seconds < 60


if __name__ == "__main__" and sys.argv[1:2] == ["--main-only"]:
    main_only_loop(*sys.argv[2:4])
