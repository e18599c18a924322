"""Opt-in: README's lines in diffusers' real example scripts, run on the CPU on tiny random models.

Skipped unless DIFFUSERS_EXAMPLES_DIR points at the `examples/` folder of a diffusers checkout. For each
script README.md's section "Where the lines go in diffusers' example scripts" covers, the test copies the
script from that checkout into tmp_path, inserts README's lines at the places README names (found by the
quoted code; a missing anchor fails naming it: the script changed), and trains with `accelerate launch --cpu`
on a tiny random model of the family (lora_monitor.tiny), 32 px images, rank 4, a checkpoint every 2 steps:
  - train_dreambooth_lora_flux.py (every 2 steps): scores at steps 2, 4, 6; best/ equals the script's own
    checkpoint-<best step> weights bit for bit (the monitor runs before the checkpoint save); a fresh FluxPipeline
    renders the saved previews again after load_lora_weights(best/); with --cache_latents the script deletes its
    VAE and text encoders, the monitor keeps working. Also: the early stop (patience 1) mid-epoch with the
    script's validation on; --train_text_encoder (the CLIP LoRA is exported and re-rendered); resuming from
    checkpoint-4 with --resume_from_checkpoint latest.
  - train_dreambooth_lora_sd3.py (every 2 steps), as Flux's first run.
  - train_text_to_image_lora_sdxl.py (every 2 steps, an imagefolder dataset with metadata.jsonl): 3 epochs;
    and resuming from the checkpoint at the end of epoch 2 keeps the best step.
The scripts need torchvision (and datasets, sentencepiece, ...), which the project's venv lacks: a separate
venv is built once at DIFFUSERS_SCRIPTS_VENV (default .venv-scripts) with DIFFUSERS_SCRIPTS_TORCH_SPEC
(default "torch==2.14.1 torchvision==0.29.1"), lora-monitor editable and the released diffusers it brings,
then the scripts' requirements files (what is missing; pins on packages already there, such as
requirements_sd3.txt's peft==0.11.1, are left and printed). diffusers' main-branch scripts call
check_min_version("0.NN.0.dev0"): a release of that minor version or newer passes it; with an older one the
call is commented out in the copy, and the test prints that. DIFFUSERS_SCRIPTS_PIP_EXTRA (pip arguments) is
installed into that venv last: transformers 5.24's add_adapter (the scripts' --train_text_encoder) asks for a
peft >= 0.22.0, newer than any released, so the --train_text_encoder test is skipped with that reason unless e.g.
DIFFUSERS_SCRIPTS_PIP_EXTRA="transformers==5.23.0" (which asks for peft >= 0.20.0).
About 5 minutes on 2 CPU cores once the venv exists (building it: 3-5 minutes, ~6 GB of disk).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import diffusers_scripts as ds

EXAMPLES = os.environ.get("DIFFUSERS_EXAMPLES_DIR")
pytestmark = [
    pytest.mark.skipif(not EXAMPLES, reason="set DIFFUSERS_EXAMPLES_DIR to a diffusers checkout's examples/ folder to run README's lines in the real scripts"),
    pytest.mark.timeout(3600),
]

PROMPTS = "a photo of sks shape --w 32 --h 32 --s 2 --d 1\nsks shape on a table --w 32 --h 32 --s 2 --d 2\n"
INSTANCE_PROMPT = "a photo of sks shape"
LAUNCH = ["launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu"]
SCRIPT_TIMEOUT = 900


@dataclass
class Setup:
    examples: Path
    venv: Path
    versions: dict[str, str]
    models: dict[str, Path] = field(default_factory=dict)

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def model(self, family: str, folder: Path) -> Path:
        if family not in self.models:
            path = folder / f"tiny-{family}"
            code = f"from lora_monitor.tiny import save_tiny_pipeline; save_tiny_pipeline({str(path)!r}, family={family!r})"
            ds.run([str(self.python), "-c", code], env=ds.script_env())
            self.models[family] = path
        return self.models[family]


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    examples = Path(EXAMPLES).expanduser().resolve()
    missing = [rel for rel, _ in ds.SCRIPTS.values() if not (examples / rel).is_file()]
    if missing:
        pytest.fail(f"DIFFUSERS_EXAMPLES_DIR={EXAMPLES} lacks {', '.join(missing)}: point it at the examples/ folder of a diffusers checkout")
    venv = Path(os.environ.get("DIFFUSERS_SCRIPTS_VENV") or ds.REPO / ".venv-scripts")
    started = time.monotonic()
    ds.build_venv(venv, examples, list(ds.SCRIPTS), os.environ.get("DIFFUSERS_SCRIPTS_TORCH_SPEC", "torch==2.14.1 torchvision==0.29.1"),
                  extra=os.environ.get("DIFFUSERS_SCRIPTS_PIP_EXTRA", ""))
    python = venv / "bin" / "python"
    where = ds.run([str(python), "-c", "import lora_monitor; print(lora_monitor.__file__)"]).stdout.strip()
    if not Path(where).resolve().is_relative_to(ds.REPO):  # a venv made from another checkout: install this one
        ds.run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ds.REPO)])
    versions = ds.freeze(python)
    print(f"\n--- scripts venv {venv} ready after {time.monotonic() - started:.0f} s: "
          + ", ".join(f"{name} {versions.get(name)}" for name in ("torch", "torchvision", "diffusers", "transformers", "accelerate", "peft", "datasets")))
    return Setup(examples, venv, versions)


@dataclass
class Run:
    family: str
    out: Path
    script: Path
    returncode: int
    seconds: float
    log: str
    notes: list[str]

    @property
    def monitor(self) -> Path:
        return self.out / "monitor"

    def scores(self) -> list[dict]:
        path = self.monitor / "scores.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []

    def diagnostics(self) -> str:
        return (f"{self.script.name}: exit {self.returncode} after {self.seconds:.0f} s; patched copy {self.script}\n"
                f"insertions: {self.notes}\nscores.jsonl: {[(s['unit'], s['epoch'], s['is_best']) for s in self.scores()]}\n"
                f"--- log tail ---\n{ds.tail(self.log.replace(chr(13), chr(10)), 60)}")


def train(setup: Setup, family: str, tmp_path: Path, arguments: list[str], settings: dict, out: Path | None = None) -> Run:
    """Patch the family's script with README's lines and run it with accelerate launch on the CPU."""
    relative, _ = ds.SCRIPTS[family]
    source = (setup.examples / relative).read_text()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS)
    patcher = ds.patch_script(family, source, relative, prompts, settings)
    note = ds.relax_min_version(patcher, setup.versions["diffusers"])
    if note:
        print(f"\n--- {note}")
    script = tmp_path / Path(relative).name
    script.write_text(patcher.source)
    out = out or tmp_path / "out"
    command = [str(setup.venv / "bin" / "accelerate"), *LAUNCH, str(script), "--output_dir", str(out), *arguments]
    env = {**ds.script_env(), "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    started = time.monotonic()
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=SCRIPT_TIMEOUT)
        returncode, log = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        returncode, log = -1, f"timed out after {SCRIPT_TIMEOUT} s\n{error.stdout or ''}{error.stderr or ''}"
    run = Run(family, out, script, returncode, time.monotonic() - started, log, patcher.notes)
    print(f"\n--- {Path(relative).name}: exit {returncode} after {run.seconds:.0f} s; "
          f"evaluations {[(s['unit'], s['epoch'], round(s['aggregates']['ssim'], 6), s['is_best']) for s in run.scores()]}")
    (tmp_path / "script.log").write_text(log)
    return run


def verify_best(setup: Setup, run: Run, model: Path, tmp_path: Path) -> dict:
    """A fresh pipeline of the family, load_lora_weights(best/): it renders the saved previews again."""
    result = ds.run([str(setup.python), "-c", ds.VERIFY, run.family, str(model), str(run.monitor), str(tmp_path / "prompts.txt")], env=ds.script_env())
    line = next(line for line in result.stdout.splitlines() if line.startswith("VERIFY "))
    found = json.loads(line[len("VERIFY "):])
    print(f"--- fresh {run.family} pipeline + load_lora_weights(best/): {found}")
    return found


def assert_scores(run: Run, unit: str, keys: list[int], steps: list[int]) -> list[dict]:
    lines = run.scores()
    assert [(line["unit"], line["epoch"], line["step"]) for line in lines] == [(unit, k, s) for k, s in zip(keys, steps)], run.diagnostics()
    for line in lines:
        assert len(line["scores"]["ssim"]) == 2, line
        label = f"{unit}-{line['epoch']:04d}"
        assert line["previews"] == [f"previews/{label}/00_seed1.png", f"previews/{label}/01_seed2.png"], line
        assert all((run.monitor / preview).is_file() for preview in line["previews"]), line
    assert (run.monitor / "previews" / "base" / "00_seed1.png").is_file()
    return lines


def assert_best_is_checkpoint(run: Run, lines: list[dict]) -> int:
    """best/ holds the evaluation the policy chose, and equals the script's checkpoint-<its step> LoRA bit for bit."""
    chosen = lines[-1]["best_epoch"]
    sidecar = json.loads((run.monitor / "best" / "lora_monitor.json").read_text())
    assert sidecar["epoch"] == chosen, (sidecar, lines[-1])
    best = run.monitor / "best" / "pytorch_lora_weights.safetensors"
    checkpoint = run.out / f"checkpoint-{sidecar['step']}" / "pytorch_lora_weights.safetensors"
    assert best.is_file() and checkpoint.is_file(), run.diagnostics()
    difference = ds.weights_differences(best, checkpoint)
    assert difference["max_abs"] == 0.0 and not difference["only_first"] and not difference["only_second"], (
        f"best/ (step {sidecar['step']}) differs from the script's checkpoint-{sidecar['step']}: {difference}")
    assert (run.out / f"checkpoint-{sidecar['step']}" / "custom_checkpoint_0.pkl").is_file(), "the monitor's state is not in the checkpoint"
    return sidecar["step"]


def assert_reproduced(found: dict, text_encoder: bool = False) -> None:
    # PNGs are 8-bit: one level of rounding either way is the most a float32 re-render may differ
    assert found["fresh_base_vs_previews_base"] <= 1.0, found
    assert found["fresh_lora_vs_previews_best"] <= 1.0, found
    assert found["fresh_lora_vs_fresh_base"] >= 2.0, f"the LoRA barely changes the renders, the comparison proves little: {found}"
    if text_encoder:
        assert "text_encoder" in found["adapters"], found


def dreambooth_arguments(setup: Setup, family: str, tmp_path: Path, *extra: str, images: int = 4) -> list[str]:
    model = setup.model(family, tmp_path.parent)
    instance = ds.write_instance_images(tmp_path / "instance", count=images)
    return [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(instance), "--instance_prompt", INSTANCE_PROMPT,
        "--resolution", "32", "--train_batch_size", "1", "--checkpointing_steps", "2", "--rank", "4",
        "--learning_rate", "1e-2", "--seed", "0", "--mixed_precision", "no", "--report_to", "tensorboard",
        "--dataloader_num_workers", "0", *extra,
    ]


# ------------------------------------------------------------------------------------------ Flux
def test_flux_every_2_steps_best_equals_checkpoint(setup, tmp_path):
    """README's lines in train_dreambooth_lora_flux.py; --cache_latents without --validation_prompt: the script
    deletes its VAE and (after encoding the instance prompt) its text encoders; the monitor keeps working."""
    arguments = dreambooth_arguments(setup, "flux", tmp_path, "--max_train_steps", "6", "--cache_latents")
    run = train(setup, "flux", tmp_path, arguments, dict(metrics=("ssim",), metric="ssim", patience=3))
    assert run.returncode == 0, run.diagnostics()
    lines = assert_scores(run, "step", [2, 4, 6], [2, 4, 6])
    assert not any(line["should_stop"] for line in lines)
    assert_best_is_checkpoint(run, lines)
    final = ds.weights_differences(run.out / "pytorch_lora_weights.safetensors", run.out / "checkpoint-6" / "pytorch_lora_weights.safetensors")
    assert final["max_abs"] == 0.0, final
    assert_reproduced(verify_best(setup, run, setup.models["flux"], tmp_path))


def test_flux_early_stop_mid_epoch_with_validation(setup, tmp_path):
    """patience 1 and min_delta 1 (more than any SSIM gain): step 2 stays best, the stop comes at step 4, in the
    middle of the first epoch (6 images, batch 1); the script's validation of that epoch still runs, then no step
    trains any more: the script's final LoRA equals checkpoint-4 and there is no checkpoint-6."""
    arguments = dreambooth_arguments(setup, "flux", tmp_path, "--max_train_steps", "12", "--validation_prompt", "a sks shape",
                                     "--num_validation_images", "1", "--validation_epochs", "1", images=6)
    run = train(setup, "flux", tmp_path, arguments, dict(metrics=("ssim",), metric="ssim", patience=1, min_delta=1.0))
    assert run.returncode == 0, run.diagnostics()
    lines = assert_scores(run, "step", [2, 4], [2, 4])
    assert lines[-1]["should_stop"] and lines[-1]["best_epoch"] == 2, lines[-1]
    assert assert_best_is_checkpoint(run, lines) == 2
    assert (run.out / "checkpoint-4").is_dir() and not (run.out / "checkpoint-6").exists(), sorted(p.name for p in run.out.iterdir())
    final = ds.weights_differences(run.out / "pytorch_lora_weights.safetensors", run.out / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    assert final["max_abs"] == 0.0, f"training went on after the stop at step 4: {final}"
    assert run.log.count("Running validation...") >= 1, run.diagnostics()


def test_flux_train_text_encoder(setup, tmp_path):
    """--train_text_encoder: the monitor is built after the CLIP encoder's add_adapter too; best/ carries its LoRA."""
    reason = ds.peft_too_old_for_transformers(setup.python)
    if reason:
        pytest.skip(f"the script's text_encoder_one.add_adapter cannot run: {reason} (DIFFUSERS_SCRIPTS_PIP_EXTRA="
                    f"'transformers==5.23.0' installs one that accepts peft 0.21)")
    arguments = dreambooth_arguments(setup, "flux", tmp_path, "--max_train_steps", "4", "--train_text_encoder")
    run = train(setup, "flux", tmp_path, arguments, dict(metrics=("ssim",), metric="ssim", patience=3))
    assert run.returncode == 0, run.diagnostics()
    lines = assert_scores(run, "step", [2, 4], [2, 4])
    assert_best_is_checkpoint(run, lines)
    from safetensors.torch import load_file

    keys = load_file(str(run.monitor / "best" / "pytorch_lora_weights.safetensors"))
    assert any(key.startswith("text_encoder.") for key in keys), sorted(keys)[:5]
    assert_reproduced(verify_best(setup, run, setup.models["flux"], tmp_path), text_encoder=True)


def test_flux_resume_from_checkpoint(setup, tmp_path):
    """4 steps, then --resume_from_checkpoint latest up to 6: the monitor's history comes back from checkpoint-4
    (accelerate's register_for_checkpointing) and step 6 is judged against it."""
    out = tmp_path / "out"
    arguments = dreambooth_arguments(setup, "flux", tmp_path)
    settings = dict(metrics=("ssim",), metric="ssim", patience=3)
    first = train(setup, "flux", tmp_path, arguments + ["--max_train_steps", "4"], settings, out=out)
    assert first.returncode == 0, first.diagnostics()
    assert_scores(first, "step", [2, 4], [2, 4])
    second = train(setup, "flux", tmp_path, arguments + ["--max_train_steps", "6", "--resume_from_checkpoint", "latest"], settings, out=out)
    assert second.returncode == 0, second.diagnostics()
    assert "Resuming from checkpoint checkpoint-4" in second.log, second.diagnostics()
    lines = assert_scores(second, "step", [2, 4, 6], [2, 4, 6])
    before = max(lines[:2], key=lambda line: (line["aggregates"]["ssim"], -line["epoch"]))
    if lines[2]["aggregates"]["ssim"] > before["aggregates"]["ssim"]:
        assert lines[2]["is_best"] and lines[2]["best_epoch"] == 6, lines[2]
    else:
        assert not lines[2]["is_best"] and lines[2]["best_epoch"] == before["epoch"], (lines[2], "the resumed monitor forgot steps 2 and 4")
    assert_best_is_checkpoint(second, lines)


# ------------------------------------------------------------------------------------------ SD3
def test_sd3_every_2_steps_best_equals_checkpoint(setup, tmp_path):
    arguments = dreambooth_arguments(setup, "sd3", tmp_path, "--max_train_steps", "6", "--cache_latents")
    run = train(setup, "sd3", tmp_path, arguments, dict(metrics=("ssim",), metric="ssim", patience=3))
    assert run.returncode == 0, run.diagnostics()
    lines = assert_scores(run, "step", [2, 4, 6], [2, 4, 6])
    assert_best_is_checkpoint(run, lines)
    assert_reproduced(verify_best(setup, run, setup.models["sd3"], tmp_path))


# ------------------------------------------------------------------------------------------ SDXL
def sdxl_arguments(setup: Setup, tmp_path: Path, *extra: str) -> list[str]:
    """train_text_to_image_lora_sdxl.py on 4 captioned 32 px images, batch 2, a checkpoint every 2 steps."""
    model = setup.model("sdxl", tmp_path.parent)
    data = ds.write_imagefolder(tmp_path / "data")
    return [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--caption_column", "text",
        "--resolution", "32", "--train_batch_size", "2", "--checkpointing_steps", "2", "--rank", "4",
        "--learning_rate", "1e-2", "--seed", "0", "--mixed_precision", "no", "--report_to", "tensorboard",
        "--dataloader_num_workers", "0", *extra,
    ]


def test_sdxl_every_2_steps(setup, tmp_path):
    """train_text_to_image_lora_sdxl.py: 4 captioned images, batch 2, 3 epochs; on_step_end right after
    `global_step += 1`, before the script saves checkpoint-<step>."""
    arguments = sdxl_arguments(setup, tmp_path, "--num_train_epochs", "3")
    run = train(setup, "sdxl", tmp_path, arguments, dict(metrics=("ssim",), metric="ssim", patience=3))
    assert run.returncode == 0, run.diagnostics()
    lines = assert_scores(run, "step", [2, 4, 6], [2, 4, 6])
    assert_best_is_checkpoint(run, lines)
    assert_reproduced(verify_best(setup, run, setup.models["sdxl"], tmp_path))


def test_sdxl_resume_keeps_the_best_epoch(setup, tmp_path):
    """2 epochs (steps 2, 4), then --resume_from_checkpoint latest up to 3 epochs, with an upper SSIM bound that
    makes step 2 (too close to the base) ineligible: step 4 is best and step 6 (lower SSIM) is not. The evaluation
    at step 4 runs before the script saves checkpoint-4, so the resumed run knows it."""
    out = tmp_path / "out"
    arguments = sdxl_arguments(setup, tmp_path)
    settings = dict(metrics=("ssim",), metric="ssim", patience=3, bounds={"ssim": (None, 0.9)})
    first = train(setup, "sdxl", tmp_path, arguments + ["--num_train_epochs", "2"], settings, out=out)
    assert first.returncode == 0, first.diagnostics()
    lines = assert_scores(first, "step", [2, 4], [2, 4])
    if lines[0]["aggregates"]["ssim"] <= 0.9 or lines[1]["aggregates"]["ssim"] > 0.9:
        pytest.skip(f"the tiny run's SSIM did not fall as this test needs (step 2 > 0.9 >= step 4): {[l['aggregates'] for l in lines]}")
    second = train(setup, "sdxl", tmp_path, arguments + ["--num_train_epochs", "3", "--resume_from_checkpoint", "latest"], settings, out=out)
    assert second.returncode == 0, second.diagnostics()
    lines = assert_scores(second, "step", [2, 4, 6], [2, 4, 6])
    if lines[2]["aggregates"]["ssim"] >= lines[1]["aggregates"]["ssim"]:
        pytest.skip("step 6 scored at least as well as step 4: the test cannot tell a lost step 4")
    assert lines[2]["best_epoch"] == 4, f"after the resume, step 6 was judged without step 4: {lines[2]['reason']}"
