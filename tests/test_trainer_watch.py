"""`lora-monitor watch` on ai-toolkit, OneTrainer, musubi-tuner and SimpleTuner folders (integrations/trainer_watch.py).

Each folder is written as the trainer writes it (the names and order of trainer_layouts and its tests): real PNG
and animated WebP samples (PIL), MP4 clips muxed with PyAV as musubi-tuner's save_videos_grid() muxes them,
SimpleTuner's display images (the sample with its prompt footer, or side by side with the base model's, as
validation.py composes them), real .safetensors checkpoints (safetensors.torch.save_file), OneTrainer's
TensorBoard events (torch.utils.tensorboard, as GenericTrainer writes them) and saved config, SimpleTuner's
metrics lines. Scoring is real: BRISQUE (the cached LIVE model), SSIM and temporal SSIM. Rounds get more noise as
they go, so the scores differ from round to round.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file

from lora_monitor.cli import main
from lora_monitor.export import read_sidecar
from lora_monitor.record import read_scores

SIZE = 64
PROMPTS = 2


def picture(prompt: int, noise: float, seed: int, size: int = SIZE) -> Image.Image:
    """A smooth scene per prompt, plus noise of the given strength (the 'training' drifting away)."""
    y, x = np.mgrid[0:size, 0:size] / size
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


def clip_frames(prompt: int, noise: float, seed: int, frames: int) -> list[np.ndarray]:
    """A slow pan (each frame the scene moved by a pixel) with noise drawn afresh per frame: flicker grows with it."""
    return [np.roll(np.asarray(picture(prompt, noise, seed * 10 + k)), k, axis=1) for k in range(frames)]


def mp4_writer(path, fps: int = 24):
    """musubi-tuner hv_generate_video.py save_videos_grid(): av.open(path, "w"), a libx264 stream at `fps` in yuv420p
    at 4 Mbit/s, each frame encoded and muxed as it comes; the file is whole (its moov index written) on close()."""
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    container = av.open(str(path), mode="w")
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt, stream.bit_rate = SIZE, SIZE, "yuv420p", 4_000_000

    def write(frames: list[np.ndarray]) -> None:
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)

    return container, write


def save_mp4(path, frames: list[np.ndarray]) -> None:
    container, write = mp4_writer(path)
    write(frames)
    container.close()


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


def onetrainer_run(workspace, accumulation: int = 2) -> None:
    """GenericTrainer with STEP units: sample_after, save_every and validate_after 50 steps, gradient_accumulation_steps
    `accumulation` (saved by start() in config/<timestamp>.json). Samples run at the top of batch S (S % 50 == 0), the
    save at the top of batch S - 1 ((S - 1 + 1) % 50 == 0), but only once no accumulation step is pending: with 1 it
    runs at S - 1 and is named so; with 2 it waits for S, where the sample runs too (both named S). __validate() runs
    after a batch trains: the value logged at G holds the weights of the top of batch G + 1, and with 2 accumulation
    steps those of G too when batch G makes no optimizer step ((G + 1) % 2 != 0)."""
    from torch.utils.tensorboard import SummaryWriter

    (workspace / "config").mkdir(parents=True)
    (workspace / "config" / "2026-08-19_12-00-00.json").write_text(json.dumps({"gradient_accumulation_steps": accumulation}))
    losses = {1: 0.30, 2: 0.25, 3: 0.20}  # lowest at round 3, while BRISQUE likes round 2
    writer = SummaryWriter(str(workspace / "tensorboard" / "2026-08-19_12-00-00"))
    for round_, noise in NOISE.items():
        step = 50 * round_
        stamp = f"2026-08-19_12-0{round_}-00"
        if round_ and accumulation == 1:
            save_lora(workspace / "save" / f"{stamp}-save-{step - 1}-0-{step - 1}.safetensors", float(round_))
        for prompt in range(PROMPTS):
            save_picture(workspace / "samples" / f"{prompt} - prompt {prompt}" / f"{stamp}-training-sample-{step}-0-{step}.png",
                         prompt, noise, round_)
        if round_ and accumulation > 1:
            save_lora(workspace / "save" / f"{stamp}-save-{step}-0-{step}.safetensors", float(round_))
        if round_:
            if accumulation == 1:  # validate_after 1 STEP: G = S - 1 holds round S, G = S already the next weights
                writer.add_scalar("loss/validation_step/total_average", losses[round_], step - 1)
                writer.add_scalar("loss/validation_step/total_average", 0.9, step)
            else:  # G = S makes no optimizer step: round S's weights
                writer.add_scalar("loss/validation_step/total_average", losses[round_], step)
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
    """Two accumulation steps: a save and a sample of one name hold the same weights, and so does the validation
    logged at that step: the loss of each round is the one logged at its step."""
    workspace = tmp_path / "workspace"
    onetrainer_run(workspace, accumulation=2)
    assert watch(workspace, "--metric", "trainer_val_loss", "--metrics", "brisque") == 0
    said = capsys.readouterr().out
    assert "Nerogar/OneTrainer" in said
    lines = read_scores(workspace)
    assert [line["epoch"] for line in lines] == [50, 100, 150]
    assert [line["aggregates"]["trainer_val_loss"] for line in lines] == pytest.approx([0.30, 0.25, 0.20])
    assert best_by_rule(lines, "trainer_val_loss") == 150 == read_sidecar(workspace / "best")["epoch"]
    copied = next((workspace / "best").glob("*-save-150-0-150.safetensors"))
    assert copied.read_bytes() == (workspace / "save" / copied.name).read_bytes()


def test_onetrainer_logs_the_loss_beside_image_scores_by_default(tmp_path, capsys):
    workspace = tmp_path / "workspace"
    onetrainer_run(workspace)
    assert watch(workspace, "--trainer", "onetrainer") == 0
    lines = read_scores(workspace)
    assert "trainer_val_loss" in lines[0]["scores"] and "brisque" in lines[0]["scores"]
    assert read_sidecar(workspace / "best")["epoch"] == best_by_rule(lines, "brisque")


def test_onetrainer_without_accumulation_saves_a_step_early_and_validates_a_step_late(tmp_path, capsys):
    """One accumulation step: each save is named (and holds the weights of) the step before its round, so best/ gets a
    note instead of another step's weights; the loss of round S is the one logged at S - 1, not the one at S."""
    workspace = tmp_path / "workspace"
    onetrainer_run(workspace, accumulation=1)
    assert watch(workspace, "--metric", "trainer_val_loss", "--metrics", "brisque") == 0
    assert "not there (yet)" in capsys.readouterr().out
    lines = read_scores(workspace)
    assert [line["aggregates"]["trainer_val_loss"] for line in lines] == pytest.approx([0.30, 0.25, 0.20])
    assert read_sidecar(workspace / "best")["epoch"] == 150
    assert (workspace / "best" / "CHECKPOINT_MISSING.txt").is_file()
    assert not list((workspace / "best").glob("*.safetensors"))


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




# ---------------------------------------------------------------------------------------- video in MP4
def musubi_video_run(out, last_half_written: bool):
    """musubi-tuner NetworkTrainer with --sample_at_first and a video model: e000000 clips, then per epoch the epoch
    file before its clips (sample_image_inference() -> save_videos_grid() -> f"{name}.mp4"); the last epoch has no
    epoch file. With `last_half_written` the last epoch's second clip is still open in the muxer: (container, write)."""
    frames = 5
    for epoch, noise in NOISE.items():
        if 0 < epoch < 3:
            save_lora(out / f"my_lora-{epoch:06d}.safetensors", float(epoch))
        for prompt in range(PROMPTS):
            path = out / "sample" / f"my_lora_e{epoch:06d}_{prompt:02d}_2026062412000{epoch}_42.mp4"
            clip = clip_frames(prompt, noise * 0.2, epoch, frames)
            if epoch == 3 and prompt == 1 and last_half_written:
                container, write = mp4_writer(path)
                write(clip)  # muxed, not closed: no moov index yet
                return container
            save_mp4(path, clip)
    return None


def test_mp4_rounds_are_scored_per_frame_and_the_best_epoch_file_copied(tmp_path, capsys):
    from lora_monitor.video import read_video, temporal_ssim

    out = tmp_path / "out"
    open_clip = musubi_video_run(out, last_half_written=True)
    assert watch(out) == 0
    said = capsys.readouterr().out
    assert "kohya-ss/musubi-tuner" in said and "rounds by epoch" in said and "video" in said
    assert "epoch 3: waiting for prompt(s) [1]" in said  # the clip being written is not read
    assert [line["epoch"] for line in read_scores(out)] == [1, 2]
    open_clip.close()  # the muxer finishes the file; then the trainer saves its final file
    save_lora(out / "my_lora.safetensors", 3.0, {"ss_epoch": "3", "ss_steps": "30"})
    assert watch(out) == 0
    said = capsys.readouterr().out
    assert "continuing from" in said and "the run is finished" in said
    lines = read_scores(out)
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert {"brisque", "brisque_worst", "ssim", "ssim_worst", "temporal_ssim"} <= set(lines[0]["scores"])
    for line in lines:
        assert all(worst >= mean for worst, mean in zip(line["scores"]["brisque_worst"], line["scores"]["brisque"]))
        for prompt in range(PROMPTS):  # each clip's own temporal SSIM, read back from the MP4 frame by frame
            clip = read_video(next((out / "sample").glob(f"my_lora_e{line['epoch']:06d}_{prompt:02d}_*.mp4")))
            assert clip.shape[0] == 5
            assert line["scores"]["temporal_ssim"][prompt] == pytest.approx(temporal_ssim(clip), abs=1e-6)
    base = json.loads((out / "base_scores.json").read_text())["aggregates"]["temporal_ssim"]
    eligible = [line for line in lines if line["aggregates"]["temporal_ssim"] >= 0.9 * base]
    assert eligible, "the test's clips should leave some round eligible"
    # epoch 3's frames score best on their own, but it flickers below 0.9x the base clip's temporal SSIM: not eligible
    assert best_by_rule(lines, "brisque") == 3 and 3 not in [line["epoch"] for line in eligible]
    best = best_by_rule(eligible, "brisque")
    assert read_sidecar(out / "best")["epoch"] == best
    name = f"my_lora-{best:06d}.safetensors" if best < 3 else "my_lora.safetensors"  # the final file holds epoch 3
    assert load_file(out / "best" / name)["lora_unet_down.lora_down.weight"][0, 0].item() == best


# ------------------------------------------------------------------------------------------ SimpleTuner
ST_SIZE = 128
ST_PROMPTS = ("close_up", "validation")  # shortnames: a prompt library key, and --validation_prompt's


def with_footer(sample: Image.Image, prompt: str) -> Image.Image:
    """validation.py draw_text_on_image(): the sample pasted at the top of a black image as much taller as the prompt's
    text plus 2 x 10 pixels, the text in white with a black stroke 10 pixels under the sample, centred."""
    from PIL import ImageFont

    font = ImageFont.load_default()
    text = f"Prompt: {prompt}"
    left, top, right, bottom = ImageDraw.Draw(sample).textbbox((0, 0), text, font=font)
    display = Image.new("RGB", (sample.width, sample.height + bottom - top + 20), (0, 0, 0))
    display.paste(sample, (0, 0))
    ImageDraw.Draw(display).text(((sample.width - (right - left)) // 2, sample.height + 10), text, fill=(255, 255, 255),
                                 font=font, stroke_width=2, stroke_fill=(0, 0, 0))
    return display


def side_by_side(base: Image.Image, sample: Image.Image, step: int) -> Image.Image:
    """Validation._stitch_single_images(): [base model | 5 grey pixels | this step] on white, a pixel added to a side
    not divisible by 16, and the labels 'base model' and 'step N' drawn over the two images at (10, 10)."""
    width, height = base.width + 5 + sample.width, max(base.height, sample.height)
    display = Image.new("RGB", (width + (width % 16 != 0), height + (height % 16 != 0)), "white")
    display.paste(base, (0, 0))
    display.paste(sample, (base.width + 5, 0))
    draw = ImageDraw.Draw(display)
    for x in range(base.width, base.width + 5):
        draw.line([(x, 0), (x, display.height)], fill=(200, 200, 200))
    draw.text((10, 10), "base model", fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    draw.text((base.width + 15, 10), f"step {step}", fill=(255, 255, 255), stroke_width=2, stroke_fill=(0, 0, 0))
    return display


def simpletuner_sample(prompt: int, round_: int) -> Image.Image:
    return picture(prompt, NOISE[round_], round_, size=ST_SIZE)


def simpletuner_validation(out, step: int, round_: int, display, shortnames=ST_PROMPTS) -> None:
    """validation_images.save_images(): f"step_{step}_{shortname}_{index}_{WxH}.png", one image at one resolution."""
    for prompt, shortname in enumerate(shortnames):
        path = out / "validation_images" / f"step_{step}_{shortname}_0_{ST_SIZE}x{ST_SIZE}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        display(simpletuner_sample(prompt, round_), shortname).save(path)


def simpletuner_checkpoint(out, step: int, value: float) -> None:
    """Trainer.checkpoint_state_save(): checkpoint-<step>-tmp (the LoRA by save_lora_weights(), the .guard last), renamed."""
    save_lora(out / f"checkpoint-{step}-tmp" / "pytorch_lora_weights.safetensors", value)
    (out / f"checkpoint-{step}-tmp" / ".guard").write_text("ok\n")
    (out / f"checkpoint-{step}-tmp").rename(out / f"checkpoint-{step}")


def test_simpletuner_without_benchmark_the_samples_are_cut_out_of_their_displays(tmp_path, capsys):
    """--disable_benchmark and --validation_on_startup: step 0 before training and every 100 steps, each image the
    sample with its prompt footer; the checkpoint of a step before its validation; eval losses in the metrics file."""
    out = tmp_path / "output" / "models"
    simpletuner_validation(out, 0, 0, lambda image, name: with_footer(image, name))  # Trainer.run_startup_validation()
    simpletuner_checkpoint(out, 100, 1.0)
    simpletuner_validation(out, 100, 1, lambda image, name: with_footer(image, name), shortnames=ST_PROMPTS[:1])
    assert watch(out) == 0
    said = capsys.readouterr().out
    assert "bghira/SimpleTuner" in said and "step 100: waiting for 'validation' image 0_128x128" in said
    simpletuner_validation(out, 100, 1, lambda image, name: with_footer(image, name))
    metrics = []
    for round_, loss in ((2, 0.25), (3, 0.20)):
        simpletuner_checkpoint(out, 100 * round_, float(round_))
        simpletuner_validation(out, 100 * round_, round_, lambda image, name: with_footer(image, name))
    for step, loss in ((100, 0.30), (200, 0.25), (300, 0.20)):  # LocalMetricsTracker.log() lines
        metrics.append(json.dumps({"step": step, "metrics": {"train_loss": 0.7, "loss/val/eval": loss}}) + "\n")
    (out / "training_metrics.jsonl").write_text("".join(metrics))
    save_lora(out / "pytorch_lora_weights.safetensors", 3.0)  # the end: save_lora_weights(output_dir)
    assert watch(out) == 0
    said = capsys.readouterr().out
    assert "2 sample(s) a round" in said and "base references: the step 0 round" in said and "the run is finished" in said
    lines = read_scores(out)
    assert [(line["unit"], line["epoch"]) for line in lines] == [("step", 100), ("step", 200), ("step", 300)]
    assert [line["aggregates"]["trainer_val_loss"] for line in lines] == pytest.approx([0.30, 0.25, 0.20])
    assert {"brisque", "ssim"} <= set(lines[0]["scores"])
    # what was scored is the sample, pixel for pixel, without the footer
    for round_, step in ((1, 100), (3, 300)):
        for prompt in range(2):
            preview = next((out / "previews" / f"step-{step:04d}").glob(f"{prompt:02d}_*.png"))
            assert np.array_equal(np.asarray(Image.open(preview).convert("RGB")), np.asarray(simpletuner_sample(prompt, round_)))
    best = best_by_rule(lines, "brisque")
    assert read_sidecar(out / "best")["epoch"] == best
    assert (out / "best" / "pytorch_lora_weights.safetensors").read_bytes() == \
        (out / f"checkpoint-{best}" / "pytorch_lora_weights.safetensors").read_bytes()


def test_simpletuner_side_by_side_displays_are_refused_naming_the_fix(tmp_path, capsys):
    """The default: the base model benchmark at step 0 (saved plain, and to benchmarks/base_model), then every
    validation stitched as [base model | step N] with labels drawn over the samples: nothing can be cut out."""
    out = tmp_path / "output"
    simpletuner_validation(out, 0, 0, lambda image, name: image)  # validation_type base_model: plain
    for prompt, shortname in enumerate(ST_PROMPTS):  # Validation.save_benchmark()
        (out / "benchmarks" / "base_model").mkdir(parents=True, exist_ok=True)
        simpletuner_sample(prompt, 0).save(out / "benchmarks" / "base_model" / f"{shortname}_{ST_SIZE}x{ST_SIZE}.png")
    simpletuner_checkpoint(out, 100, 1.0)
    simpletuner_validation(out, 100, 1, lambda image, name: with_footer(side_by_side(
        simpletuner_sample(ST_PROMPTS.index(name), 0), image, 100), name))
    simpletuner_validation(out, 200, 2, lambda image, name: with_footer(side_by_side(
        simpletuner_sample(ST_PROMPTS.index(name), 0), image, 200), name))
    assert watch(out) == 2
    error = capsys.readouterr().err
    assert "side-by-side display" in error and "--disable_benchmark" in error and "step_100_close_up_0_128x128.png" in error
    assert not (out / "scores.jsonl").exists()


def test_the_diffusers_scripts_are_refused_pointing_to_the_python_api(tmp_path, capsys):
    save_lora(tmp_path / "checkpoint-500" / "pytorch_lora_weights.safetensors", 1.0)
    assert watch(tmp_path) == 2
    error = capsys.readouterr().err
    assert "TensorBoard/W&B only" in error and "LoraMonitor" in error


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_a_simpletuner_display_in_each_image_format_cuts_back_to_its_sample(tmp_path, fmt, ext):
    """save_validation_image(): png, or jpeg/webp at validation_image_quality 90. The footer check holds through
    lossy compression, and the cut is the sample: exact in PNG, close to the sample saved alone otherwise."""
    from lora_monitor.integrations.watch_samples import read_sample_file
    from lora_monitor.trainer_layouts import SIMPLETUNER

    path = tmp_path / "validation_images" / f"step_100_validation_0_{ST_SIZE}x{ST_SIZE}.{ext}"
    path.parent.mkdir(parents=True)
    original = simpletuner_sample(1, 3)
    with_footer(original, "a photo of a red circle").save(path, format=fmt, **({} if fmt == "PNG" else {"quality": 90}))
    pixels = read_sample_file(SIMPLETUNER, SIMPLETUNER.parse_sample(path), video=False)
    alone = tmp_path / f"alone.{ext}"  # the same sample saved on its own, as the codec would have kept it
    original.save(alone, format=fmt, **({} if fmt == "PNG" else {"quality": 90}))
    expected = torch.from_numpy(np.asarray(Image.open(alone).convert("RGB")).astype(np.float32) / 255).permute(2, 0, 1)
    assert pixels.shape == (3, ST_SIZE, ST_SIZE)
    # WebP adapts its quantisation to the whole picture, footer included: a little further from the lone file
    assert float((pixels - expected).abs().mean()) == (0.0 if fmt == "PNG" else pytest.approx(0, abs=0.02))
