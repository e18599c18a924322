"""The trainer layouts against each trainer's own file names, written in the order its code writes them.

Each test builds a trainer's output folder in tmp_path step by step, as the cited function of that
trainer writes it (real PNG/JPEG/WebP images, real .safetensors files with the trainer's metadata,
MP4 files as ISO media boxes in the order a muxer writes them), with the half-written files the
trainer leaves on the way, and checks detection, the rounds, the base round and the checkpoint of
each round at that moment. Commits: see each layout's `source`.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save as safetensors_bytes

from lora_monitor import trainer_layouts as tl
from lora_monitor.trainer_layouts import RoundKey

STEP, EPOCH = "step", "epoch"


# ------------------------------------------------------------------------------------------ files
def image(fmt: str, shade: int = 0, frames: int = 1) -> bytes:
    pictures = [Image.new("RGB", (16, 16), (shade, 40 * k % 256, 90)) for k in range(frames)]
    buffer = io.BytesIO()
    extra = dict(save_all=True, append_images=pictures[1:], duration=60, loop=0) if frames > 1 else {}
    pictures[0].save(buffer, format=fmt, **extra)
    return buffer.getvalue()


def box(kind: bytes, payload: bytes) -> bytes:
    return (8 + len(payload)).to_bytes(4, "big") + kind + payload


# an MP4 as av/ffmpeg write it: ftyp, the media data, and the moov index last, when the file is closed
MP4_WHOLE = box(b"ftyp", b"isom\x00\x00\x02\x00isomavc1") + box(b"mdat", bytes(200)) + box(b"moov", box(b"mvhd", bytes(96)))
MP4_HALF = MP4_WHOLE[: len(MP4_WHOLE) - 60]  # still writing: no moov yet


def lora(metadata: dict[str, str] | None = None, value: float = 1.0) -> bytes:
    return safetensors_bytes({"lora_down.weight": np.full((4, 4), value, np.float32)}, metadata=metadata)


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def names(rounds: dict) -> dict:
    """rounds with each path reduced to its name, for readable comparisons."""
    return {key: {prompt: [path.name for path in paths] for prompt, paths in prompts.items()} for key, prompts in rounds.items()}


# ------------------------------------------------------------------------------------------ checks
def test_file_checks_tell_whole_files_from_half_written_ones(tmp_path):
    for fmt, suffix in (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp")):
        whole = put(tmp_path / f"whole{suffix}", image(fmt))
        cut = put(tmp_path / f"cut{suffix}", half(image(fmt)))
        assert tl.is_finished(whole) and not tl.is_finished(cut), suffix
    assert not tl.is_finished(put(tmp_path / "empty.png", b""))
    assert tl.is_finished(put(tmp_path / "v.mp4", MP4_WHOLE)) and not tl.is_finished(put(tmp_path / "w.mp4", MP4_HALF))
    full = put(tmp_path / "a.safetensors", lora({"ss_epoch": "3"}))
    assert tl.safetensors_metadata(full) == {"ss_epoch": "3"}
    assert tl.safetensors_metadata(put(tmp_path / "b.safetensors", full.read_bytes()[:-10])) is None


# ------------------------------------------------------------------------------------- ai-toolkit
def test_ai_toolkit(tmp_path):
    # jobs/process/BaseTrainProcess.py: save_root = training_folder/job name; save_training_config() writes config.yaml
    out = tmp_path / "output" / "my_lora"
    put(out / "config.yaml", b"job: extension\nconfig:\n  name: my_lora\n")
    samples = out / "samples"

    def sample(ms: int, step: int, prompt: int, fmt: str = "JPEG", ext: str = "jpg", frames: int = 1) -> str:
        # GenerateImageConfig.save_image_atomic(): written under samples/.tmp, a thumbnail to samples/.thumbs,
        # then os.replace() into samples/ as f"{ms}__{step:09d}_{prompt}.{ext}" (BaseSDTrainProcess.sample())
        name = f"{ms}__{step:09d}_{prompt}.{ext}"
        put(samples / ".tmp" / name, image(fmt, prompt, frames))
        put(samples / ".thumbs" / f"{name}.jpg", image("JPEG"))
        os.replace(samples / ".tmp" / name, samples / name)
        return name

    # BaseSDTrainProcess.run(): "Generating baseline samples before training": sample(0)
    base = [sample(1787000000000 + i, 0, i) for i in range(2)]
    # step 250: save(250) then sample(250) (the loop's is_save_step / is_sample_step)
    put(out / "my_lora_000000250.safetensors", lora({"training_info": json.dumps({"step": 250, "epoch": 0})}))
    put(out / "optimizer.pt", b"\x80\x04}")
    mid = [sample(1787000100000 + i, 250, i) for i in range(2)]
    # after the loop: save() -> "my_lora.safetensors" (half-written for now), then sample(500)
    put(out / "my_lora.safetensors", half(lora({"training_info": json.dumps({"step": 500, "epoch": 1})}, 2.0)))
    last0 = sample(1787000200000, 500, 0)
    put(samples / ".tmp" / "1787000200001__000000500_1.jpg", half(image("JPEG")))  # prompt 1 still in .tmp

    said = []
    assert tl.detect_layout(out, say=said.append) is tl.AI_TOOLKIT
    assert "ostris/ai-toolkit" in said[0] and "samples" in said[0]
    rounds = tl.sample_rounds(out, tl.AI_TOOLKIT)
    assert names(rounds) == {
        RoundKey(STEP, 0): {0: [base[0]], 1: [base[1]]},
        RoundKey(STEP, 250): {0: [mid[0]], 1: [mid[1]]},
        RoundKey(STEP, 500): {0: [last0]},
    }
    assert {p: [x.name for x in v] for p, v in tl.base_references(out, tl.AI_TOOLKIT).items()} == {0: [base[0]], 1: [base[1]]}
    assert tl.checkpoint_for(out, tl.AI_TOOLKIT, RoundKey(STEP, 250)) == out / "my_lora_000000250.safetensors"
    assert tl.checkpoint_for(out, tl.AI_TOOLKIT, RoundKey(STEP, 0)) is None
    assert tl.checkpoint_for(out, tl.AI_TOOLKIT, RoundKey(STEP, 500)) is None  # the final file is half-written
    # the final file done, the last sample moved into place: the final file holds round 500 (its training_info)
    put(out / "my_lora.safetensors", lora({"training_info": json.dumps({"step": 500, "epoch": 1})}, 2.0))
    os.replace(put(samples / ".tmp" / "1787000200001__000000500_1.jpg", image("JPEG")), samples / "1787000200001__000000500_1.jpg")
    assert list(tl.sample_rounds(out, tl.AI_TOOLKIT)[RoundKey(STEP, 500)]) == [0, 1]
    assert tl.final_checkpoint(out, tl.AI_TOOLKIT) == out / "my_lora.safetensors"
    assert tl.checkpoint_for(out, tl.AI_TOOLKIT, RoundKey(STEP, 500)) == out / "my_lora.safetensors"
    assert tl.checkpoint_for(out, tl.AI_TOOLKIT, RoundKey(STEP, 750)) is None


def test_ai_toolkit_video_samples_are_animated_webp(tmp_path):
    # SampleConfig: num_frames > 1 turns the format to webp; GenerateImageConfig.save_image() saves all frames
    out = tmp_path / "vid"
    put(out / "samples" / "1787000000000__000000000_0.webp", image("WEBP", frames=3))
    put(out / "samples" / "1787000000001__000000000_1.webp", image("WEBP"))  # format: webp, one frame
    samples = {s.prompt: s.video for s in tl.list_samples(out, tl.AI_TOOLKIT)}
    assert samples == {0: True, 1: False}


# ------------------------------------------------------------------------------------- OneTrainer
def test_onetrainer_epoch_units(tmp_path):
    # workspace_dir; GenericTrainer.__sample_loop(): samples/f"{i} - {safe_prompt}"/f"{stamp}-training-sample-
    # {global_step}-{epoch}-{epoch_step}.jpg" (sample_image_format JPG); __save(): save/f"{stamp}-save-{...}.safetensors"
    ws = tmp_path / "workspace" / "run"
    folders = {0: "0 - a photo of sks dog", 2: "2 - red car"}  # prompt 1 is disabled: the index still counts it

    def sample(stamp: str, progress: str, prompt: int, no_ema: bool = False) -> str:
        name = f"{stamp}-training-sample-{progress}.jpg"
        put(ws / "samples" / (folders[prompt] + (" - no-ema" if no_ema else "")) / name, image("JPEG", prompt))
        return name

    # the first batch samples before training (repeating_action_needed(start_at_zero=True) at epoch 0, step 0);
    # with EMA on, a second pass writes the raw weights' samples into "... - no-ema" folders
    base = [sample("2026-08-19_12-00-00", "0-0-0", p) for p in (0, 2)]
    sample("2026-08-19_12-00-10", "0-0-0", 0, no_ema=True)
    # epoch 1's first batch: samples first, then the save, both named 20-1-0 (sample_after / save_every in EPOCH units)
    ep1 = [sample("2026-08-19_12-10-00", "20-1-0", p) for p in (0, 2)]
    put(ws / "save" / "2026-08-19_12-10-30-save-20-1-0.safetensors", lora())
    put(ws / "backup" / "2026-08-19_12-10-40-backup-20-1-0" / "onetrainer_config" / "args.json", b"{}")
    # epoch 2: one sample written, the other half-written, and an empty file from a crashed write
    ep2 = sample("2026-08-19_12-20-00", "40-2-0", 0)
    put(ws / "samples" / folders[2] / "2026-08-19_12-20-05-training-sample-40-2-0.jpg", half(image("JPEG")))
    put(ws / "samples" / "custom" / "2026-08-19_12-20-09-training-sample-40-2-0.jpg", image("JPEG"))  # a UI sample
    put(ws / "save" / "2026-08-19_12-20-30-save-40-2-0.safetensors", b"")
    # continued from the backup of 20-1-0, the run saves 20-1-0 again under a later stamp: the newer file wins
    newer = put(ws / "save" / "2026-08-19_14-00-00-save-20-1-0.safetensors", lora(value=3.0))
    os.utime(newer, (newer.stat().st_mtime + 60,) * 2)

    said = []
    assert tl.detect_layout(ws, say=said.append) is tl.ONETRAINER
    assert "Nerogar/OneTrainer" in said[0]
    rounds = tl.sample_rounds(ws, tl.ONETRAINER)
    assert names(rounds) == {
        RoundKey(STEP, 0): {0: [base[0]], 2: [base[1]]},
        RoundKey(STEP, 20): {0: [ep1[0]], 2: [ep1[1]]},
        RoundKey(STEP, 40): {0: [ep2]},
    }
    assert sorted(tl.base_references(ws, tl.ONETRAINER)) == [0, 2]
    assert tl.checkpoint_for(ws, tl.ONETRAINER, RoundKey(STEP, 20)) == newer
    assert tl.checkpoint_for(ws, tl.ONETRAINER, RoundKey(STEP, 40)) is None  # empty so far
    assert tl.checkpoint_for(ws, tl.ONETRAINER, RoundKey(STEP, 0)) is None
    assert tl.final_checkpoint(ws, tl.ONETRAINER) is None  # end() saves to output_model_destination, elsewhere


def test_onetrainer_step_units_save_one_step_before_the_round(tmp_path):
    # sample_after 10 STEP: global_step % 10 == 0; save_every 10 STEP: (global_step + 1) % 10 == 0; with
    # gradient_accumulation_steps 1 both run at once (has_gradient is False at every batch's top), each named with
    # the step it runs at: the save of step 9 holds the weights one optimizer step before the sample of step 10
    ws = tmp_path / "run"
    put(ws / "save" / "2026-08-19_11-59-50-save-9-0-9.safetensors", lora())
    put(ws / "samples" / "0 - cat" / "2026-08-19_12-00-00-training-sample-10-0-10.png", image("PNG"))
    assert list(tl.sample_rounds(ws, tl.ONETRAINER)) == [RoundKey(STEP, 10)]
    assert tl.checkpoint_for(ws, tl.ONETRAINER, RoundKey(STEP, 10)) is None


def test_onetrainer_with_accumulation_the_save_waits_for_the_samples_step(tmp_path):
    # gradient_accumulation_steps 2: the save asked for at the top of batch 9 waits while has_gradient (batch 8 made no
    # optimizer step) and runs at the top of batch 10, after that batch's samples, reading the same train_progress
    ws = tmp_path / "run"
    put(ws / "samples" / "0 - cat" / "2026-08-19_12-00-00-training-sample-10-0-10.png", image("PNG"))
    save = put(ws / "save" / "2026-08-19_12-00-05-save-10-0-10.safetensors", lora())
    assert tl.checkpoint_for(ws, tl.ONETRAINER, RoundKey(STEP, 10)) == save


# ------------------------------------------------------------------------------------ SimpleTuner
def test_simpletuner(tmp_path):
    out = tmp_path / "output" / "models"
    (out / "validation_images").mkdir(parents=True)  # Validation.__init__: os.makedirs(save_dir)
    shots = ("validation", "close_up_2")  # shortnames: --validation_prompt, and a prompt library key

    def validate(step: int, fmt: str = "PNG", ext: str = "png") -> list[str]:
        # validation_images.save_images(): f"step_{global_step}_{shortname}_{index}_{res}.{ext}"
        written = []
        for shade, shortname in enumerate(shots):
            for index in range(2):  # two resolutions
                name = f"step_{step}_{shortname}_{index}_{'1024x1024' if index == 0 else '832x1216'}.{ext}"
                put(out / "validation_images" / name, image(fmt, shade))
                written.append(name)
        return written

    def checkpoint(step: int) -> Path:
        # Trainer.checkpoint_state_save(): into checkpoint-<step>-tmp (save_model_hook writes the LoRA first, the
        # .guard last), then renamed
        tmp = out / f"checkpoint-{step}-tmp"
        put(tmp / "pytorch_lora_weights.safetensors", lora())
        put(tmp / "checkpoint_manifest.json", b"{}")
        put(tmp / ".guard", b"ok\n")
        return tmp

    # Trainer.init_benchmark_base_model(): run_validations(validation_type="base_model", step=0), then
    # Validation.save_benchmark(): benchmarks/base_model/f"{shortname}_{W}x{H}.png"
    base = validate(0)
    for shortname in shots:
        put(out / "benchmarks" / "base_model" / f"{shortname}_1024x1024.png", image("PNG"))
    os.rename(checkpoint(100), out / "checkpoint-100")
    step100 = validate(100)
    checkpoint(200)  # still being written: not renamed yet, and step 200 not validated
    put(out / "validation_images" / "step_200_validation_0_1024x1024.tmp.mp4", MP4_HALF)  # video muxing temp name

    said = []
    assert tl.detect_layout(out, say=said.append) is tl.SIMPLETUNER
    assert "validation_images" in said[0]
    rounds = tl.sample_rounds(out, tl.SIMPLETUNER)
    assert list(rounds) == [RoundKey(STEP, 0), RoundKey(STEP, 100)]
    assert names(rounds)[RoundKey(STEP, 100)] == {"validation": step100[:2], "close_up_2": step100[2:]}
    # a prompt's images are told apart by their index and resolution: the sample's slot in every round
    assert sorted(s.slot for s in tl.list_samples(out, tl.SIMPLETUNER) if s.key == RoundKey(STEP, 100)) == [
        ("close_up_2", "0_1024x1024"), ("close_up_2", "1_832x1216"), ("validation", "0_1024x1024"), ("validation", "1_832x1216")]
    assert {(b.prompt, b.variant) for b in tl.list_base_files(out, tl.SIMPLETUNER)} == {
        ("validation", "1024x1024"), ("close_up_2", "1024x1024")}  # a benchmark image names no index
    assert names(rounds)[RoundKey(STEP, 0)]["validation"] == base[:2]
    assert tl.checkpoint_for(out, tl.SIMPLETUNER, RoundKey(STEP, 100)) == out / "checkpoint-100" / "pytorch_lora_weights.safetensors"
    assert tl.checkpoint_for(out, tl.SIMPLETUNER, RoundKey(STEP, 200)) is None
    os.rename(out / "checkpoint-200-tmp", out / "checkpoint-200-rolling")  # a rolling save of the same step
    validate(200)
    assert tl.checkpoint_for(out, tl.SIMPLETUNER, RoundKey(STEP, 200)) == out / "checkpoint-200-rolling" / "pytorch_lora_weights.safetensors"
    # the end: save_lora_weights(output_dir); the final validation is skipped, so no round claims the final file
    put(out / "pytorch_lora_weights.safetensors", lora())
    assert tl.final_checkpoint(out, tl.SIMPLETUNER) == out / "pytorch_lora_weights.safetensors"
    assert tl.checkpoint_for(out, tl.SIMPLETUNER, RoundKey(STEP, 300)) is None
    # a resumed run keeps benchmarks/ but may have lost step 0's images: the benchmarks are the base then
    for name in base:
        (out / "validation_images" / name).unlink()
    assert {k: [p.name for p in v] for k, v in tl.base_references(out, tl.SIMPLETUNER).items()} == {
        "validation": ["validation_1024x1024.png"], "close_up_2": ["close_up_2_1024x1024.png"]}


def test_simpletuner_video_validation(tmp_path):
    out = tmp_path / "out"
    # validation_video.save_videos(): f"step_{step}_{shortname}_{index}_{res}.mp4"
    put(out / "validation_images" / "step_50_validation_0_768x512.mp4", MP4_WHOLE)
    put(out / "validation_images" / "step_100_validation_0_768x512.mp4", MP4_HALF)  # export_to_video not done
    [sample] = tl.list_samples(out, tl.SIMPLETUNER)
    assert (sample.key, sample.prompt, sample.video) == (RoundKey(STEP, 50), "validation", True)


def test_simpletuner_where_the_sample_lies_in_its_display(tmp_path):
    """validation.py: the pipeline renders at the name's resolution rounded to 16 (validate_prompt()); the saved image
    is that sample with a black footer under it (draw_text_on_image()), or a wider side-by-side display (stitching)."""
    def sample(name: str) -> tl.SampleName:
        return tl.SIMPLETUNER.parse_sample(tmp_path / "validation_images" / name)

    cut = tl.SIMPLETUNER.cut_sample
    assert cut(sample("step_100_validation_0_1000x600.png"), 992, 640) == tl.DisplayCut((0, 0, 992, 608), (611, 616))
    assert cut(sample("step_0_validation_0_1024x1024.png"), 1024, 1024) == tl.DisplayCut((0, 0, 1024, 1024), (1024, 1024))
    with pytest.raises(tl.DisplayError, match=r"is 2054x1057 pixels, but a 1024x1024 sample is rendered at 1024x1024: "
                                              r"SimpleTuner saved a side-by-side display.*--disable_benchmark"):
        cut(sample("step_100_validation_0_1024x1024.png"), 2054, 1057)
    with pytest.raises(tl.DisplayError, match="export_to_video"):  # a video's footer frames are rescaled by its writer
        cut(sample("step_100_validation_0_512x512.mp4"), 512, 560)
    assert cut(sample("step_0_validation_0_512x512.mp4"), 512, 512).box == (0, 0, 512, 512)  # the plain base round
    with pytest.raises(tl.DisplayError, match="no resolution"):
        cut(sample("step_100_validation_3_unknown.png"), 512, 560)
    assert tl.ONETRAINER.cut_sample is None and tl.AI_TOOLKIT.cut_sample is None  # their files are the samples


# ---------------------------------------------------------------------------------- musubi-tuner
def test_musubi_tuner(tmp_path):
    out = tmp_path / "output"
    sample_dir = out / "sample"

    def sample(num: str, prompt: int, stamp: str, seed: int | None, video: bool = False, data: bytes | None = None) -> str:
        # NetworkTrainer.sample_image_inference(): f"my_lora_{num}_{prompt:02d}_{stamp}{'_' + seed}", then
        # save_images_grid() adds "_000.png" (one frame), save_videos_grid() ".mp4"
        stem = f"my_lora_{num}_{prompt:02d}_{stamp}" + ("" if seed is None else f"_{seed}")
        name = stem + (".mp4" if video else "_000.png")
        put(sample_dir / name, data if data is not None else (MP4_WHOLE if video else image("PNG", prompt)))
        return name

    # --sample_at_first: _do_sample(0, global_step) -> e000000; prompt 0 seeded, prompt 1 a video without a seed
    base = [sample("e000000", 0, "20260624120000", 42), sample("e000000", 1, "20260624120010", None, video=True)]
    # --sample_every_n_steps 50 in the loop; --save_every_n_steps 50 saves right after
    step50 = [sample("000050", 0, "20260624121000", 42), sample("000050", 1, "20260624121010", None, video=True)]
    put(out / "my_lora-step00000050.safetensors", lora({"ss_steps": "50", "ss_epoch": "1"}))
    # end of epoch 1: get_epoch_ckpt_name() saved, then _do_sample(1, ...)
    put(out / "my_lora-000001.safetensors", lora({"ss_steps": "60", "ss_epoch": "1"}))
    ep1 = [sample("e000001", 0, "20260624121500", 42), sample("e000001", 1, "20260624121510", None, video=True)]
    # epoch 2 (the last): no epoch file; its samples, one image half-written and the video not closed yet
    sample("e000002", 0, "20260624122500", 42, data=half(image("PNG")))
    sample("e000002", 1, "20260624122510", None, video=True, data=MP4_HALF)
    put(sample_dir / "my_lora_e000002_00_20260624122520_42_000.png", b"")

    said = []
    assert tl.detect_layout(out, say=said.append) is tl.MUSUBI
    assert "musubi-tuner" in said[0]
    rounds = tl.sample_rounds(out, tl.MUSUBI)
    assert names(rounds) == {
        RoundKey(EPOCH, 0): {0: [base[0]], 1: [base[1]]},
        RoundKey(EPOCH, 1): {0: [ep1[0]], 1: [ep1[1]]},
        RoundKey(STEP, 50): {0: [step50[0]], 1: [step50[1]]},
    }
    parsed = {(s.key, s.prompt): (s.seed, s.video) for s in tl.list_samples(out, tl.MUSUBI)}
    assert parsed[(RoundKey(EPOCH, 0), 0)] == (42, False) and parsed[(RoundKey(EPOCH, 0), 1)] == (None, True)
    assert sorted(tl.base_references(out, tl.MUSUBI)) == [0, 1]
    assert tl.checkpoint_for(out, tl.MUSUBI, RoundKey(STEP, 50)) == out / "my_lora-step00000050.safetensors"
    assert tl.checkpoint_for(out, tl.MUSUBI, RoundKey(EPOCH, 1)) == out / "my_lora-000001.safetensors"
    assert tl.checkpoint_for(out, tl.MUSUBI, RoundKey(EPOCH, 2)) is None
    # the run ends: the files are finished, then get_last_ckpt_name() with ss_epoch = num_train_epochs
    sample("e000002", 0, "20260624122500", 42)
    sample("e000002", 1, "20260624122510", None, video=True)
    put(out / "my_lora.safetensors", lora({"ss_steps": "120", "ss_epoch": "2"}))
    assert list(tl.sample_rounds(out, tl.MUSUBI)[RoundKey(EPOCH, 2)]) == [0, 1]
    assert tl.checkpoint_for(out, tl.MUSUBI, RoundKey(EPOCH, 2)) == out / "my_lora.safetensors"
    assert tl.checkpoint_for(out, tl.MUSUBI, RoundKey(STEP, 120)) == out / "my_lora.safetensors"
    assert tl.checkpoint_for(out, tl.MUSUBI, RoundKey(STEP, 100)) is None


# ------------------------------------------------------------------------------------------ kohya
def test_kohya(tmp_path):
    out = tmp_path / "out"
    sample_dir = out / "sample"

    def sample(num: str, prompt: int, stamp: str, seed: int | None, data: bytes | None = None) -> str:
        # library/train_util.py sample_image_inference(): f"{output_name}_{num_suffix}_{i:02d}_{ts}{'_' + seed}.png"
        name = f"my_lora_{num}_{prompt:02d}_{stamp}" + ("" if seed is None else f"_{seed}") + ".png"
        put(sample_dir / name, data if data is not None else image("PNG", prompt))
        return name

    put(out / "sdxl_vae.safetensors", lora())  # a file the user keeps there: not taken for the final file below
    base = [sample("e000000", 0, "20260216120000", 123), sample("e000000", 1, "20260216120001", None)]  # --sample_at_first
    put(out / "my_lora-step00000050.safetensors", lora({"ss_steps": "50", "ss_epoch": "1"}))  # --save_every_n_steps
    step50 = [sample("000050", 0, "20260216121000", 123), sample("000050", 1, "20260216121001", None)]
    put(out / "my_lora-000001.safetensors", lora({"ss_steps": "60", "ss_epoch": "1"}))  # the epoch file, then samples
    ep1 = [sample("e000001", 0, "20260216121500", 123), sample("e000001", 1, "20260216121501", None)]
    sample("e000002", 0, "20260216122500", 123, data=half(image("PNG")))  # being written

    said = []
    assert tl.detect_layout(out, say=said.append) is tl.KOHYA  # a 3-digit seed is not musubi's _000 frame
    assert "kohya-ss/sd-scripts" in said[0]
    rounds = tl.sample_rounds(out, tl.KOHYA)
    assert names(rounds) == {
        RoundKey(EPOCH, 0): {0: [base[0]], 1: [base[1]]},
        RoundKey(EPOCH, 1): {0: [ep1[0]], 1: [ep1[1]]},
        RoundKey(STEP, 50): {0: [step50[0]], 1: [step50[1]]},
    }
    assert {s.seed for s in tl.list_samples(out, tl.KOHYA)} == {123, None}
    assert tl.checkpoint_for(out, tl.KOHYA, RoundKey(EPOCH, 1)) == out / "my_lora-000001.safetensors"
    assert tl.checkpoint_for(out, tl.KOHYA, RoundKey(STEP, 50)) == out / "my_lora-step00000050.safetensors"
    assert tl.checkpoint_for(out, tl.KOHYA, RoundKey(EPOCH, 2)) is None
    sample("e000002", 0, "20260216122500", 123)
    put(out / "my_lora.safetensors", lora({"ss_steps": "120", "ss_epoch": "2"}))  # get_last_ckpt_name()
    assert tl.final_checkpoint(out, tl.KOHYA) == out / "my_lora.safetensors"
    assert tl.checkpoint_for(out, tl.KOHYA, RoundKey(EPOCH, 2)) == out / "my_lora.safetensors"
    # resumed from epoch 1's state, kohya renders epoch 1 again: both files kept, oldest first
    again = sample("e000001", 0, "20260217090000", 123)
    assert names(tl.sample_rounds(out, tl.KOHYA))[RoundKey(EPOCH, 1)][0] == [ep1[0], again]
    # a musubi sample is not a kohya one, nor the reverse
    assert tl.KOHYA.parse_sample(sample_dir / "my_lora_e000001_00_20260216121500_000.png") is None
    assert tl.MUSUBI.parse_sample(sample_dir / ep1[0]) is None


def test_checkpoint_names_alone_cannot_tell_kohya_from_musubi(tmp_path):
    put(tmp_path / "my_lora-000001.safetensors", lora())
    said = []
    assert tl.detect_layout(tmp_path, say=said.append) is tl.KOHYA
    assert "also fits: musubi-tuner" in said[0]


# -------------------------------------------------------------------------------------- diffusers
def test_diffusers_examples(tmp_path):
    out = tmp_path / "lora-out"
    # train_dreambooth_lora_flux.py: accelerator.save_state(f"checkpoint-{global_step}") whose save_model_hook()
    # writes pytorch_lora_weights.safetensors, then accelerate's optimizer.bin, scheduler.bin, random_states_0.pkl
    for step in (500, 1000):
        put(out / f"checkpoint-{step}" / "pytorch_lora_weights.safetensors", lora())
        for other in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):
            put(out / f"checkpoint-{step}" / other, b"\x80\x04N.")
    put(out / "checkpoint-1500" / "pytorch_lora_weights.safetensors", half(lora()))  # being written
    said = []
    assert tl.detect_layout(out, say=said.append) is tl.DIFFUSERS
    assert tl.sample_rounds(out, tl.DIFFUSERS) == {} and tl.base_references(out, tl.DIFFUSERS) == {}
    assert tl.checkpoint_for(out, tl.DIFFUSERS, RoundKey(STEP, 500)) == out / "checkpoint-500" / "pytorch_lora_weights.safetensors"
    assert tl.checkpoint_for(out, tl.DIFFUSERS, RoundKey(STEP, 1500)) is None
    assert tl.final_checkpoint(out, tl.DIFFUSERS) is None
    put(out / "pytorch_lora_weights.safetensors", lora())  # after the loop: save_lora_weights(output_dir)
    assert tl.final_checkpoint(out, tl.DIFFUSERS) == out / "pytorch_lora_weights.safetensors"


# ------------------------------------------------------------------------------------- unknowns
def test_an_unknown_folder_lists_the_known_layouts(tmp_path):
    put(tmp_path / "notes.txt", b"hello")
    put(tmp_path / "images" / "cat.png", image("PNG"))
    with pytest.raises(ValueError) as caught:
        tl.detect_layout(tmp_path)
    message = str(caught.value)
    assert "no known trainer layout fits" in message
    for layout in tl.LAYOUTS.values():
        assert f"{layout.name} ({layout.title})" in message and layout.checkpoint_example in message
    with pytest.raises(ValueError, match="not a folder"):
        tl.detect_layout(tmp_path / "missing")


def test_get_layout_by_name_title_or_close_name():
    assert tl.get_layout("OneTrainer") is tl.ONETRAINER
    assert tl.get_layout("sd-scripts") is tl.KOHYA
    assert tl.get_layout("ostris/ai-toolkit") is tl.AI_TOOLKIT
    with pytest.raises(ValueError, match=r"Did you mean 'musubi-tuner'\?.*Known layouts: ai-toolkit, onetrainer"):
        tl.get_layout("musubi")
    with pytest.raises(ValueError, match="Known layouts") as caught:
        tl.get_layout("zzz")
    assert "Did you mean" not in str(caught.value)


def test_every_layout_states_its_unit_base_and_sources():
    for layout in tl.LAYOUTS.values():
        assert layout.source.startswith(layout.title.split(" ")[0] + "@") and len(layout.source.split("@")[1]) == 40
        assert (layout.base_key is None) == (layout.base_round is None)
        assert layout.base_key is None or layout.base_key.unit in tl.UNITS and layout.base_key.number == 0
