"""Opt-in: the launcher with the real sd-scripts train_network.py, on the CPU.

Skipped unless SD_SCRIPTS_DIR points at a kohya-ss/sd-scripts checkout. It takes 25-40 minutes
(15 without building the venv, on 2 cores) and about 10 GB of memory and 6 GB of disk here:
  1. builds a venv with sd-scripts' requirements (its pins: diffusers 0.32.1, transformers 4.54.1,
     accelerate 1.6.0, ...), plus torch and torchvision (KOHYA_TORCH_SPEC, default
     "torch==2.14.1 torchvision==0.29.1"; sd-scripts imports torchvision without listing it);
  2. installs lora-monitor with `pip install -c <pip freeze of that venv>`, and checks no pin moved;
  3. saves a random-weight SD1.5-architecture model (sd-scripts' UNet has the fixed SD1.5 layout)
     and a CLIP tokenizer built in code at <cache>/openai_clip-vit-large-patch14 (no download);
  4. runs `lora-monitor kohya` for at most 3 epochs with --save_last_n_epochs 1 and asserts: scores
     for every epoch trained, the best export, the early stop with exit code 0, and the best
     epoch's file surviving in best/ after kohya deleted it;
  5. runs it for 2 epochs with --save_state, resumes the state with the launcher for a third, and
     resumes an epoch's state with sd-scripts alone (train_network.py without the launcher).
KOHYA_VENV reuses a venv folder between runs (it is built when missing).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

SD_SCRIPTS = os.environ.get("SD_SCRIPTS_DIR")
pytestmark = pytest.mark.skipif(not SD_SCRIPTS, reason="set SD_SCRIPTS_DIR to an sd-scripts checkout to run the real kohya test")

REPO = Path(__file__).resolve().parents[1]
PINNED = ("diffusers", "transformers", "accelerate", "huggingface-hub", "safetensors")

BUILD_MODEL = """
import sys, torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel
from lora_monitor.tiny import build_tokenizer

target, tokenizer_dir = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
tokenizer = build_tokenizer(max_length=77)
tokenizer.save_pretrained(tokenizer_dir)
unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # SD1.5 layout
vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, sample_size=512, layers_per_block=2)
text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                            num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"))
with torch.no_grad():  # sd-scripts' sampler divides by the mean of the text embeddings: keep it off zero
    text_encoder.text_model.final_layer_norm.bias.normal_(0.0, 0.5)
scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
pipe.to(torch.float16).save_pretrained(target)
"""


def run(command: list[str], check_rc: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0 and check_rc:
        raise AssertionError(f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def freeze(python: Path) -> dict[str, str]:
    lines = run([str(python), "-m", "pip", "freeze"]).stdout.splitlines()
    return {name.lower(): version for name, _, version in (line.partition("==") for line in lines if "==" in line)}


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("KOHYA_VENV") or tmp_path_factory.mktemp("kohya-venv"))
    python = folder / "bin" / "python"
    if not (folder / ".lora-monitor-installed").exists():
        run([sys.executable, "-m", "venv", str(folder)])
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        run(pip + os.environ.get("KOHYA_TORCH_SPEC", "torch==2.14.1 torchvision==0.29.1").split())
        requirements = [line for line in (Path(SD_SCRIPTS) / "requirements.txt").read_text().splitlines() if not line.strip().startswith("-e")]
        filtered = folder / "sd-scripts-requirements.txt"
        filtered.write_text("\n".join(requirements) + "\n")
        run(pip + ["-r", str(filtered)])
        before = freeze(python)
        constraints = folder / "freeze.txt"
        constraints.write_text("".join(f"{name}=={version}\n" for name, version in before.items()))
        run(pip + ["-c", str(constraints), str(REPO)])  # must succeed without moving any of sd-scripts' pins
        after = freeze(python)
        moved = {name: (before.get(name), after.get(name)) for name in PINNED if before.get(name) != after.get(name)}
        assert not moved, f"installing lora-monitor moved sd-scripts' pins: {moved}"
        (folder / ".lora-monitor-installed").write_text("")
    else:  # a reused venv: install this checkout's lora-monitor again (pip installs a copy, not a link)
        before = freeze(python)
        run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--force-reinstall", str(REPO)])
        moved = {name: (before.get(name), version) for name, version in freeze(python).items() if name != "lora-monitor" and before.get(name) != version}
        assert not moved, f"reinstalling lora-monitor moved packages: {moved}"
    return folder


@pytest.fixture(scope="module")
def inputs(venv, tmp_path_factory) -> dict[str, Path]:
    """The random-weight SD1.5 model, its tokenizer, 4 training images with captions and a prompt file."""
    python = venv / "bin" / "python"
    versions = freeze(python)
    assert versions["diffusers"] == "0.32.1" and versions["accelerate"] == "1.6.0"
    folder = tmp_path_factory.mktemp("kohya-inputs")
    model, tokenizers = folder / "sd15-random", folder / "tokenizers"
    run([str(python), "-c", BUILD_MODEL, str(model), str(tokenizers / "openai_clip-vit-large-patch14")])
    data = folder / "data" / "1_shape"
    data.mkdir(parents=True)
    from PIL import Image, ImageDraw

    for index, colour in enumerate(["red", "blue", "green", "yellow"]):
        image = Image.new("RGB", (128, 128), "white")
        ImageDraw.Draw(image).ellipse((20 + 8 * index, 20, 100, 100), fill=colour)
        image.save(data / f"{index}.png")
        (data / f"{index}.txt").write_text(f"a {colour} shape")
    prompts = folder / "prompts.txt"
    prompts.write_text("a red shape --w 64 --h 64 --s 4 --d 5\na blue shape --w 64 --h 64 --s 4\n")
    return {"model": model, "tokenizers": tokenizers, "data": data.parent, "prompts": prompts}


def trainer_args(inputs: dict[str, Path], out: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(inputs["model"]), "--tokenizer_cache_dir", str(inputs["tokenizers"]),
        "--train_data_dir", str(inputs["data"]), "--caption_extension", ".txt", "--output_dir", str(out), "--output_name", "real",
        "--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "4",
        "--resolution", "64", "--enable_bucket", "--min_bucket_reso", "64", "--max_bucket_reso", "64", "--train_batch_size", "1",
        "--max_train_epochs", str(epochs), "--save_every_n_epochs", "1", "--save_model_as", "safetensors",
        "--sample_prompts", str(inputs["prompts"]), "--sample_every_n_epochs", "1", "--sample_sampler", "ddim",
        "--learning_rate", "1e-4", "--optimizer_type", "AdamW", "--mixed_precision", "no", "--seed", "0",
        "--max_data_loader_n_workers", "0", *extra,
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def launcher(venv: Path, cwd: Path, monitor: list[str], args: list[str]) -> subprocess.CompletedProcess:
    """`lora-monitor kohya` with the venv's lora-monitor; prints its lora-monitor lines, the time and the peak memory."""
    started = time.monotonic()
    result = run([str(venv / "bin" / "lora-monitor"), "kohya", "--sd-scripts", SD_SCRIPTS, *monitor, "--", *args], cwd=cwd, env=ENV, check_rc=False)
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB on Linux; any child so far
    print(f"\n--- lora-monitor kohya: exit {result.returncode} after {time.monotonic() - started:.0f} s, peak RSS of a child {peak_gb:.1f} GB ---")
    print("\n".join(line for line in result.stdout.splitlines() if line.startswith("lora-monitor:")))
    return result


def shown(result: subprocess.CompletedProcess) -> str:
    return textwrap.shorten(result.stdout[-3000:] + result.stderr[-3000:], 6000)


@pytest.mark.timeout(3600)
def test_real_train_network_early_stop_and_best_survives_rotation(venv, inputs, tmp_path):
    out = tmp_path / "out"
    # min_delta 1 > any SSIM gain: epoch 1 stays best whatever training does, so the stop comes after epoch 2
    result = launcher(venv, tmp_path, ["--metrics", "ssim", "--patience", "1", "--min-delta", "1.0"],
                      trainer_args(inputs, out, 3, "--save_last_n_epochs", "1", "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs")))
    log = shown(result)
    assert result.returncode == 0, log
    assert "stopped early after epoch 2" in result.stdout, log
    lines = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2], log
    assert all(len(line["scores"]["ssim"]) == 2 for line in lines)
    sidecar = json.loads((out / "best" / "lora_monitor.json").read_text())
    assert sidecar["epoch"] == 1
    assert (out / "best" / "real-000001.safetensors").is_file()
    assert not (out / "real-000001.safetensors").exists()  # deleted by --save_last_n_epochs 1 at epoch 2
    assert (out / "real-000002.safetensors").is_file() and not (out / "real.safetensors").exists()
    assert "--d 1" in (out / "lora_monitor_prompts.txt").read_text()  # the prompt without a seed got seed 0 + 1
    events = b"".join(path.read_bytes() for path in (tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert b"monitor/ssim_mean" in events and b"monitor/best_epoch" in events, "the scores did not reach kohya's TensorBoard tracker"


@pytest.mark.timeout(3600)
def test_real_train_network_states_resume_in_the_launcher_and_in_plain_sd_scripts(venv, inputs, tmp_path):
    """--save_state under the launcher (issue 12): no custom checkpoint in kohya's state folders, the monitor's state beside
    kohya's own train_state.json; the launcher resumes the train end's state with the monitor's history and scores the next
    epoch, and sd-scripts' own train_network.py, run without the launcher, resumes an epoch end's state."""
    out = tmp_path / "out"
    first = launcher(venv, tmp_path, ["--metrics", "ssim"], trainer_args(inputs, out, 2, "--save_state"))
    assert first.returncode == 0, shown(first)
    for state in (out / "real-000001-state", out / "real-state"):
        assert (state / "lora_monitor_state.json").is_file() and (state / "train_state.json").is_file()
        assert not list(state.glob("custom_checkpoint_*"))
    epoch_end = json.loads((out / "real-000001-state" / "lora_monitor_state.json").read_text())
    assert epoch_end["owes"] is None and [entry["epoch"] for entry in epoch_end["monitor"]["policy"]["history"]] == [1]
    resumed = launcher(venv, tmp_path, ["--metrics", "ssim"], trainer_args(inputs, out, 3, "--save_state", "--resume", str(out / "real-state")))
    assert resumed.returncode == 0, shown(resumed)
    assert "resumed the monitor's state saved with real-state: epochs [1, 2] scored" in resumed.stdout
    assert [json.loads(line)["epoch"] for line in (out / "scores.jsonl").read_text().splitlines()] == [1, 2, 3]
    plain = run([str(venv / "bin" / "python"), str(Path(SD_SCRIPTS) / "train_network.py"),
                 *trainer_args(inputs, tmp_path / "plain", 2, "--resume", str(out / "real-000001-state"))],
                cwd=SD_SCRIPTS, env=ENV, check_rc=False)
    assert plain.returncode == 0, shown(plain)
    assert [path.name.split("_")[1] for path in (tmp_path / "plain" / "sample").glob("*.png")] == ["e000002"] * 2
