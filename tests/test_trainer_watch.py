"""`lora-monitor watch` on ai-toolkit, OneTrainer and musubi-tuner folders (integrations/trainer_watch.py).

Each folder is written as the trainer writes it (the names and order of trainer_layouts and its tests): real PNG
and animated WebP samples (PIL), real .safetensors checkpoints (safetensors.torch.save_file), OneTrainer's
TensorBoard events (torch.utils.tensorboard, as GenericTrainer writes them). Scoring is real: BRISQUE (the cached
LIVE model) and SSIM. Rounds get more noise as they go, so the scores differ from round to round.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_monitor.cli import main
from lora_monitor.export import read_sidecar
from lora_monitor.record import read_scores

SIZE = 64
PROMPTS = 2


def picture(prompt: int, noise: float, seed: int) -> Image.Image:
    """A smooth scene per prompt, plus noise of the given strength (the 'training' drifting away)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    base = np.stack([np.sin(3 * x + prompt) * 0.5 + 0.5, y, (x + y) / 2 + 0.1 * prompt], axis=2)
    noisy = base + np.random.default_rng(seed).normal(0, noise, base.shape)
    return Image.fromarray((np.clip(noisy, 0, 1) * 255).astype(np.uint8))


def save_picture(path, prompt: int, noise: float, seed: int, frames: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames == 1:
        picture(prompt, noise, seed).save(path)
        return
    # a slow pan (each frame the scene moved by a pixel): the base clip moves too, so it keeps its frames
    clip = [Image.fromarray(np.roll(np.asarray(picture(prompt, noise, seed * 10 + k)), k, axis=1)) for k in range(frames)]
    clip[0].save(path, format="WEBP", save_all=True, append_images=clip[1:], duration=60, loop=0, lossless=True)


def save_lora(path, value: float, metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_down.lora_down.weight": torch.full((4, 4), value)}, str(path), metadata=metadata)


# noise per round: round 2 is the cleanest after the base, so it is BRISQUE's likely best; the policy decides
NOISE = {0: 0.0, 1: 0.05, 2: 0.02, 3: 0.12}


def ai_toolkit_run(out, frames: int = 1, ext: str = "png", scale: float = 1.0) -> None:
    """BaseSDTrainProcess: baseline samples at step 0, then per 250 steps save() and sample() at the same step."""
    for round_, noise in NOISE.items():
        step = 250 * round_
        if step:
            save_lora(out / f"my_lora_{step:09d}.safetensors", float(round_))
        for prompt in range(PROMPTS):
            save_picture(out / "samples" / f"{1724680000000 + step + prompt}__{step:09d}_{prompt}.{ext}", prompt, noise * scale, round_, frames)
    save_lora(out / "my_lora.safetensors", 3.0, {"training_info": '{"step": 750, "epoch": 3}'})


def onetrainer_run(workspace) -> None:
    """GenericTrainer with EPOCH units: samples and save at the epoch's first batch under one progress name; the
    validation loss logged at global step S holds the weights of round S + 1."""
    from torch.utils.tensorboard import SummaryWriter

    losses = {1: 0.30, 2: 0.25, 3: 0.20}  # lowest at round 3, while BRISQUE likes round 2
    writer = SummaryWriter(str(workspace / "tensorboard" / "2026-08-19_12-00-00"))
    for round_, noise in NOISE.items():
        step = 50 * round_
        progress = f"{step}-{round_}-0"
        stamp = f"2026-08-19_12-0{round_}-00"
        for prompt in range(PROMPTS):
            save_picture(workspace / "samples" / f"{prompt} - prompt {prompt}" / f"{stamp}-training-sample-{progress}.png", prompt, noise, round_)
        if round_:
            save_lora(workspace / "save" / f"{stamp}-save-{progress}.safetensors", float(round_))
            writer.add_scalar("loss/validation_step/total_average", losses[round_], step - 1)
    writer.close()


def musubi_run(out) -> None:
    """NetworkTrainer with --sample_at_first: e000000 samples, then per epoch the epoch file before its samples."""
    for epoch, noise in NOISE.items():
        if epoch:
            save_lora(out / f"my_lora-{epoch:06d}.safetensors", float(epoch))
        for prompt in range(PROMPTS):
            save_picture(out / "sample" / f"my_lora_e{epoch:06d}_{prompt:02d}_2026062412000{epoch}_42_000.png", prompt, noise, epoch)


def watch(out, *extra: str) -> int:
    return main(["watch", str(out), "--once", "--interval", "0.1", *extra])


def best_by_rule(lines: list[dict], metric: str, higher_is_better: bool = False):
    """The policy's rule without bounds: the best aggregate, the earliest round on ties (NaN is the worst)."""
    finite = [line for line in lines if math.isfinite(line["aggregates"][metric])]
    return min(finite, key=lambda line: ((-1 if higher_is_better else 1) * line["aggregates"][metric], line["epoch"]))["epoch"]


def checks(out, unit: str, rounds: list[int], best_file: str, metric: str = "brisque") -> dict:
    lines = read_scores(out)
    assert [(line["unit"], line["epoch"]) for line in lines] == [(unit, r) for r in rounds]
    best = best_by_rule(lines, metric)
    assert read_sidecar(out / "best")["epoch"] == best
    copied = out / "best" / best_file.format(best)
    assert copied.read_bytes() == next(out.rglob(best_file.format(best))).read_bytes()
    assert load_file(copied)["lora_unet_down.lora_down.weight"][0, 0].item() == rounds.index(best) + 1
    return {"lines": lines, "best": best}


def test_ai_toolkit_rounds_by_step_best_copied(tmp_path, capsys):
    out = tmp_path / "my_lora"
    ai_toolkit_run(out)
    assert watch(out) == 0
    said = capsys.readouterr().out
    assert "detected" in said and "ostris/ai-toolkit" in said and "rounds by step" in said
    assert "base references: the step 0 round" in said
    result = checks(out, "step", [250, 500, 750], "my_lora_{:09d}.safetensors")
    assert set(result["lines"][0]["scores"]) == {"brisque", "ssim"}
    assert [p.name for p in sorted((out / "previews").glob("step-*"))] == ["step-0250", "step-0500", "step-0750"]
    assert "finished" in said  # the final file holds step 750, which is scored


def test_onetrainer_validation_loss_is_a_metric(tmp_path, capsys):
    workspace = tmp_path / "workspace"
    onetrainer_run(workspace)
    assert watch(workspace, "--metric", "trainer_val_loss", "--metrics", "brisque") == 0
    said = capsys.readouterr().out
    assert "Nerogar/OneTrainer" in said
    lines = read_scores(workspace)
    assert [line["epoch"] for line in lines] == [50, 100, 150]
    assert [line["aggregates"]["trainer_val_loss"] for line in lines] == pytest.approx([0.30, 0.25, 0.20])
    assert best_by_rule(lines, "trainer_val_loss") == 150 == read_sidecar(workspace / "best")["epoch"]
    copied = next((workspace / "best").glob("*-save-150-3-0.safetensors"))
    assert copied.read_bytes() == (workspace / "save" / copied.name).read_bytes()


def test_onetrainer_logs_the_loss_beside_image_scores_by_default(tmp_path, capsys):
    workspace = tmp_path / "workspace"
    onetrainer_run(workspace)
    assert watch(workspace, "--trainer", "onetrainer") == 0
    lines = read_scores(workspace)
    assert "trainer_val_loss" in lines[0]["scores"] and "brisque" in lines[0]["scores"]
    assert read_sidecar(workspace / "best")["epoch"] == best_by_rule(lines, "brisque")


def test_musubi_rounds_by_epoch(tmp_path, capsys):
    out = tmp_path / "out"
    musubi_run(out)
    assert watch(out) == 0
    said = capsys.readouterr().out
    assert "kohya-ss/musubi-tuner" in said and "rounds by epoch" in said
    checks(out, "epoch", [1, 2, 3], "my_lora-{:06d}.safetensors")


def test_no_base_round_switches_ssim_off_and_stop_names_the_hand_stop(tmp_path, capsys):
    out = tmp_path / "my_lora"
    ai_toolkit_run(out)
    for path in (out / "samples").glob("*__000000000_*"):
        path.unlink()
    assert watch(out, "--patience", "1") == 0
    said = capsys.readouterr().out
    assert "ssim switched off" in said
    lines = read_scores(out)
    assert set(lines[0]["scores"]) == {"brisque"}
    # BRISQUE: step 500 best, step 750 worse: with patience 1 the policy stops at 750
    assert [line["should_stop"] for line in lines] == [False, False, True]
    stop = (out / "STOP").read_text()
    assert "after step 750" in stop and "best step: 500" in stop
    assert "stopped by hand" in stop and "SQLite" in stop  # ai-toolkit's UI stop button sets stop = 1 in its database
    assert "STOP written" in said
    # a restart continues from the saved state: nothing scored twice
    assert watch(out, "--patience", "1") == 0
    assert "already scored" in capsys.readouterr().out
    assert [line["epoch"] for line in read_scores(out)] == [250, 500, 750]


def test_a_best_round_without_its_checkpoint_is_noted(tmp_path, capsys):
    """OneTrainer with STEP units names a save one step before the round of the same interval (other weights):
    no file holds the round's weights, and best/ says so."""
    workspace = tmp_path / "workspace"
    onetrainer_run(workspace)
    for path in (workspace / "save").glob("*.safetensors"):
        path.rename(path.with_name(path.name.replace("-save-50-", "-save-49-").replace("-save-100-", "-save-99-")
                                   .replace("-save-150-", "-save-149-")))
    assert watch(workspace, "--metrics", "brisque") == 0
    assert "not there (yet)" in capsys.readouterr().out
    assert (workspace / "best" / "CHECKPOINT_MISSING.txt").is_file()
    assert not list((workspace / "best").glob("*.safetensors"))


def test_video_rounds_are_scored_with_temporal_ssim(tmp_path, capsys):
    out = tmp_path / "wan_lora"
    ai_toolkit_run(out, frames=3, ext="webp", scale=0.1)  # flicker small enough for some rounds to pass the bound
    assert watch(out) == 0
    said = capsys.readouterr().out
    assert "video" in said
    lines = read_scores(out)
    assert [line["epoch"] for line in lines] == [250, 500, 750]
    assert {"brisque", "brisque_worst", "temporal_ssim"} <= set(lines[0]["scores"])
    assert all(0 < value <= 1 for line in lines for value in line["scores"]["temporal_ssim"])
    # VIDEO_PRESET's rule: the lowest BRISQUE among rounds whose temporal SSIM is at least 0.9x the base clip's
    base = json.loads((out / "base_scores.json").read_text())["aggregates"]["temporal_ssim"]
    eligible = [line for line in lines if line["aggregates"]["temporal_ssim"] >= 0.9 * base]
    assert eligible, "the test's clips should leave some round eligible"
    assert read_sidecar(out / "best")["epoch"] == best_by_rule(eligible, "brisque")


def test_an_unknown_folder_exits_2_listing_the_layouts(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("hello")
    assert watch(tmp_path) == 2
    error = capsys.readouterr().err
    assert "no known trainer layout fits" in error
    for name in ("ai-toolkit", "onetrainer", "simpletuner", "musubi-tuner", "kohya", "diffusers"):
        assert name in error
    assert watch(tmp_path, "--trainer", "axolotl") == 2
    assert "Known layouts" in capsys.readouterr().err


def test_simpletuner_is_refused_with_the_reason(tmp_path, capsys):
    save_picture(tmp_path / "validation_images" / "step_100_validation_0_64x64.png", 0, 0.1, 1)
    assert watch(tmp_path) == 2
    assert "side by side" in capsys.readouterr().err
