"""The watcher against kohya's file contract: sample PNGs and network files appear over time.

The samples are rendered by our tiny pipeline (base = LoRA off, then the LoRA at a scripted size
per epoch, so the best epoch is known) and written under kohya's names, in kohya's order (epoch
file, rotation, samples; the final file after the last epoch), some half-written first. kohya's own
validation loss is written as train_network.py logs it: accelerate's TensorBoard tracker under
--logging_dir, with kohya's tag names, at the 1-based epoch.
"""
from __future__ import annotations

import argparse
import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_monitor.export import read_sidecar
from lora_monitor.cli import flags, watch as watch_command
from lora_monitor.integrations.kohya_watch import MISSING_NOTE, STOP_FILE, KohyaWatcher
from lora_monitor.record import read_scores

PROMPTS = "a red circle --w 64 --h 64 --s 2 --d 11\na blue square --w 64 --h 64 --s 2 --d 12\n"
SEEDS = (11, 12)
STAMP = "20260216120000"



@pytest.fixture(scope="module")
def renders(tiny_model) -> dict[int, list[bytes]]:
    return render_epochs(tiny_model)


def render_epochs(tiny_model: str) -> dict[int, list[bytes]]:
    """PNG bytes per epoch: 0 = base (LoRA off); epoch e = LoRA at SCALES[e]."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    scales = {0: 0.0, 1: 0.05, 2: 0.5, 3: 1.0, 4: 0.02}
    result = {}
    for epoch, scale in scales.items():
        generator = torch.Generator().manual_seed(epoch)
        with torch.no_grad():
            for name, parameter in pipe.unet.named_parameters():
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        images = []
        for prompt, seed in zip(["a red circle", "a blue square"], SEEDS):
            image = pipe(prompt, num_inference_steps=2, width=64, height=64, generator=torch.Generator().manual_seed(seed)).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            images.append(buffer.getvalue())
        result[epoch] = images
    return result


def run_dir(tmp_path: Path) -> tuple[Path, Path]:
    out = tmp_path / "out"
    (out / "sample").mkdir(parents=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    return out, prompts


def write_samples(out: Path, epoch: int, images: list[bytes], half_pause: float = 0.0) -> None:
    for index, (data, seed) in enumerate(zip(images, SEEDS)):
        path = out / "sample" / f"mylora_e{epoch:06d}_{index:02d}_{STAMP}_{seed}.png"
        with open(path, "wb") as handle:
            if half_pause:
                handle.write(data[: len(data) // 2])
                handle.flush()
                time.sleep(half_pause)
            handle.write(data[len(data) // 2 :] if half_pause else data)


def write_network(path: Path, epoch: int) -> None:
    save_file({"lora_up": torch.full((4, 4), float(epoch))}, str(path), metadata={"ss_epoch": str(epoch)})


def kohya_run(out: Path, renders, epochs: int, save_last_n: int | None, pause: float) -> None:
    """What kohya writes, in its order: e000000 samples; per epoch: the epoch file (not the last),
    rotation of older ones, the samples (the first of each epoch half-written for a while); the final file."""
    time.sleep(pause)
    write_samples(out, 0, renders[0])
    for epoch in range(1, epochs + 1):
        # an epoch of training takes longer than scoring one: wait for the watcher (this CPU is shared)
        deadline = time.monotonic() + 60
        while epoch > 1 and len(read_scores(out)) < epoch - 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(pause)
        if epoch < epochs:
            write_network(out / f"mylora-{epoch:06d}.safetensors", epoch)
            if save_last_n is not None and epoch - save_last_n > 0:
                (out / f"mylora-{epoch - save_last_n:06d}.safetensors").unlink(missing_ok=True)
        write_samples(out, epoch, renders[epoch], half_pause=0.4)
    time.sleep(pause)
    write_network(out / "mylora.safetensors", epochs)


def watch(out: Path, prompts: Path, *extra: str, say=None) -> KohyaWatcher:
    parser = argparse.ArgumentParser()
    watch_command.register(parser.add_subparsers())
    args = parser.parse_args(["watch", str(out), "--prompts", str(prompts), "--metrics", "ssim", *extra])
    return KohyaWatcher(args.output_dir, prompts=args.prompts, base=args.base, monitor_options=flags.monitor_options(args, "watch"),
                        logging_dir=args.logging_dir, say=say or print)


def test_watches_a_run_as_it_happens(renders, tmp_path, capsys):
    out, prompts = run_dir(tmp_path)
    writer = threading.Thread(target=kohya_run, args=(out, renders, 3, 1, 0.3), daemon=True)
    writer.start()
    watcher = watch(out, prompts, "--patience", "1")
    assert watcher.run(interval=0.1, timeout=90) == 0
    writer.join(timeout=10)
    said = capsys.readouterr().out
    assert "no samples yet" in said and "waiting" in said
    assert [line["epoch"] for line in read_scores(out)] == [1, 2, 3]  # every epoch, none twice, none torn
    # epoch 1 is best (closest to the base); its file was copied before kohya rotated it away
    assert not (out / "mylora-000001.safetensors").exists()
    assert load_file(out / "best" / "mylora-000001.safetensors")["lora_up"][0, 0].item() == 1.0
    assert read_sidecar(out / "best")["epoch"] == 1
    # the stop request: a file and a message; the trainer (the writer) was not stopped
    stop = (out / STOP_FILE).read_text()
    assert "after epoch 2" in stop and "best epoch: 1" in stop
    assert "STOP written" in said
    assert (out / "mylora.safetensors").exists()
    assert len(list((out / "previews").glob("epoch-*"))) == 3


def test_restart_continues_and_the_last_epoch_file_is_copied_when_it_appears(renders, tmp_path, capsys):
    out, prompts = run_dir(tmp_path)
    write_samples(out, 0, renders[0])
    write_network(out / "mylora-000001.safetensors", 1)
    write_samples(out, 1, renders[3])  # far from the base
    assert watch(out, prompts).run(interval=0.05, once=True) == 0
    assert [line["epoch"] for line in read_scores(out)] == [1]
    # the last epoch: its samples, no numbered file (kohya writes mylora.safetensors after the loop)
    write_samples(out, 2, renders[4])  # close to the base: best
    second = watch(out, prompts)
    assert "continuing from" in capsys.readouterr().out
    second.run(interval=0.05, once=True)
    assert [line["epoch"] for line in read_scores(out)] == [1, 2]
    assert read_sidecar(out / "best")["epoch"] == 2 and (out / "best" / MISSING_NOTE).exists()
    write_network(out / "mylora.safetensors", 2)
    watch(out, prompts).run(interval=0.05, once=True)
    said = capsys.readouterr().out
    assert "appeared" in said and "the run is finished" in said
    assert load_file(out / "best" / "mylora-000002.safetensors")["lora_up"][0, 0].item() == 2.0
    assert not (out / "best" / MISSING_NOTE).exists()
    assert read_sidecar(out / "best")["epoch"] == 2
    assert [line["epoch"] for line in read_scores(out)] == [1, 2]


def test_base_references_from_a_folder(renders, tmp_path):
    out, prompts = run_dir(tmp_path)
    base = tmp_path / "base"
    base.mkdir()
    for index, data in enumerate(renders[0]):
        (base / f"{index:02d}_seed{SEEDS[index]}.png").write_bytes(data)
    write_samples(out, 1, renders[1])
    watch(out, prompts, "--base", str(base)).run(interval=0.05, once=True)
    (line,) = read_scores(out)
    assert line["epoch"] == 1 and line["aggregates"]["ssim"] > 0.5


def test_no_base_references_is_a_clear_error(renders, tmp_path):
    out, prompts = run_dir(tmp_path)
    write_samples(out, 1, renders[1])
    with pytest.raises(ValueError, match=r"no epoch-0 samples \(kohya's --sample_at_first\) and no --base DIR"):
        watch(out, prompts).run(interval=0.05, once=True)


def test_no_prompt_file_and_missing_folder(tmp_path):
    out, _ = run_dir(tmp_path)
    with pytest.raises(ValueError, match=r"give --prompts FILE .*looked for .*sample/prompt.txt"):
        KohyaWatcher(out, monitor_options={"metrics": ("ssim",), "metric": "ssim"})
    with pytest.raises(FileNotFoundError, match="kohya output folder not found"):
        KohyaWatcher(tmp_path / "nowhere")


def test_waits_when_there_are_no_samples(tmp_path, capsys):
    out, prompts = run_dir(tmp_path)
    assert watch(out, prompts).run(interval=0.05, once=True) == 0
    said = capsys.readouterr().out
    assert said.count("no samples yet") == 1 and "no epoch scored yet" in said


def test_a_flux_json_prompt_file_reads_as_kohya_reads_it(tmp_path):
    """kohya's .json entries spell --l "scale" (CFG) and --g "guidance_scale" (FLUX's distilled guidance): a
    FLUX prompt file setting both loads, each value in its place (the kohya_ss GUI writes such files)."""
    out, _ = run_dir(tmp_path)
    prompts = out / "sample" / "prompt.json"
    prompts.write_text('[{"prompt": "a red circle", "scale": 1.0, "guidance_scale": 3.5, "seed": 11}, "a blue square --g 4 --l 1 --d 12"]')
    watcher = KohyaWatcher(out, monitor_options={"metrics": ("ssim",), "metric": "ssim"})
    assert watcher.prompts == prompts
    assert [(p.guidance_scale, p.distilled_guidance, p.seed) for p in watcher.spec.prompts] == [(1.0, 3.5, 11), (1.0, 4.0, 12)]


def kohya_validation_log(logging_dir: Path, stamp: str, losses: dict[int, float]) -> None:
    """train_network.py NetworkTrainer.train() with --validation_split and --logging_dir: prepare_accelerator() gives
    accelerate's TensorBoard tracker <logging_dir>/<timestamp> and init_trackers() the run name network_train; per step
    step_logging() at global_step, per epoch the EPOCH VALIDATION's epoch_logging() at epoch + 1 (the 1-based epoch of
    that epoch's file and samples), then loss/epoch_average. `losses`: 1-based epoch -> its validation loss."""
    from accelerate import Accelerator

    accelerator = Accelerator(log_with="tensorboard", project_dir=str(logging_dir / stamp))
    accelerator.init_trackers("network_train")
    tracker = accelerator.get_tracker("tensorboard")
    for epoch, loss in losses.items():
        for step in range(10 * (epoch - 1) + 1, 10 * epoch + 1):
            tracker.log({"loss/current": 0.9, "loss/average": 0.85}, step=step)
        tracker.log({"loss/validation/epoch_average": loss, "loss/validation/epoch_divergence": loss - 0.85}, step=epoch)
        tracker.log({"loss/epoch_average": 0.85}, step=epoch)
    accelerator.end_training()


VAL_LOSSES = {1: 0.30, 2: 0.20, 3: 0.25}  # lowest at epoch 2, while SSIM likes epoch 1 (closest to the base)


def test_kohyas_validation_loss_is_recorded_beside_the_image_scores(renders, tmp_path, capsys):
    """--logging_dir inside the output folder: found without --logging-dir; a restart goes on recording it."""
    out, prompts = run_dir(tmp_path)
    write_samples(out, 0, renders[0])
    for epoch in (1, 2):
        write_network(out / f"mylora-{epoch:06d}.safetensors", epoch)
        write_samples(out, epoch, renders[epoch])
    kohya_validation_log(out / "log", "20260216120000", {1: VAL_LOSSES[1], 2: VAL_LOSSES[2]})
    assert watch(out, prompts).run(interval=0.05, once=True) == 0
    said = capsys.readouterr().out
    assert "kohya logs its validation loss (loss/validation/epoch_average): recorded as trainer_val_loss" in said
    write_samples(out, 3, renders[3])
    kohya_validation_log(out / "log", "20260216130000", {3: VAL_LOSSES[3]})  # a resumed launch: a second folder
    assert watch(out, prompts).run(interval=0.05, once=True) == 0
    assert "continuing from" in capsys.readouterr().out
    lines = read_scores(out)
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert [line["aggregates"]["trainer_val_loss"] for line in lines] == pytest.approx([0.30, 0.20, 0.25])
    assert all(len(line["scores"]["trainer_val_loss"]) == 2 for line in lines)  # one value a preview, as for any metric
    assert read_sidecar(out / "best")["epoch"] == 1  # still picked by SSIM: the loss is recorded beside it
    assert json.loads((out / "base_scores.json").read_text())["aggregates"]["trainer_val_loss"] is None  # no epoch 0 validation


def test_metric_trainer_val_loss_picks_the_epoch_with_kohyas_lowest_validation_loss(renders, tmp_path, capsys):
    """--logging_dir elsewhere, given to the watcher; --metric trainer_val_loss: the best epoch is the one kohya's own
    validation found lowest, and its epoch file is copied."""
    out, prompts = run_dir(tmp_path)
    logs = tmp_path / "kohya_logs"
    write_samples(out, 0, renders[0])
    kohya_validation_log(logs, "20260216120000", VAL_LOSSES)
    for epoch in (1, 2, 3):
        write_network(out / f"mylora-{epoch:06d}.safetensors", epoch)
        write_samples(out, epoch, renders[epoch])
    watcher = watch(out, prompts, "--metric", "trainer_val_loss", "--logging-dir", str(logs))
    assert watcher.run(interval=0.05, once=True) == 0
    lines = read_scores(out)
    assert [line["aggregates"]["trainer_val_loss"] for line in lines] == pytest.approx([0.30, 0.20, 0.25])
    assert "ssim" in lines[0]["aggregates"]
    assert read_sidecar(out / "best")["epoch"] == 2
    assert load_file(out / "best" / "mylora-000002.safetensors")["lora_up"][0, 0].item() == 2.0
