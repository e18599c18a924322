"""The README's example script runs as written on the tiny model."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from lora_monitor.demo import write_synthetic_dataset
from lora_monitor.export import read_sidecar
from lora_monitor.record import read_scores

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_text_to_image_lora.py"


def load_example():
    spec = importlib.util.spec_from_file_location("train_text_to_image_lora", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_script_trains_scores_and_exports(tiny_model, tmp_path, capsys):
    data = write_synthetic_dataset(tmp_path / "data", count=4, size=32)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# previews\na red circle --d 1 --s 3\na blue square --d 2 --s 3 --n blurry\n", encoding="utf-8")
    out = tmp_path / "out"
    load_example().main([
        "--pretrained_model_name_or_path", tiny_model, "--train_data_dir", str(data), "--resolution", "32",
        "--num_train_epochs", "2", "--train_batch_size", "2", "--learning_rate", "1e-2", "--output_dir", str(out),
        "--preview_prompts", str(prompts), "--checkpointing_epochs", "1",
    ])
    lines = read_scores(out / "monitor")
    assert [line["epoch"] for line in lines] == [1, 2]
    assert set(lines[0]["scores"]) == {"brisque", "ssim"} and len(lines[0]["scores"]["brisque"]) == 2
    best = read_sidecar(out / "monitor" / "best")
    assert best["epoch"] == lines[-1]["best_epoch"] and best["seeds"] == [1, 2]
    assert (out / "last" / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "checkpoint-2").is_dir()
    assert f"best epoch: {best['epoch']}" in capsys.readouterr().out
    assert json.loads((out / "monitor" / "previews" / "base" / "base.json").read_text())["spec_fingerprint"] == best["spec_fingerprint"]


def test_example_script_with_the_likeness_preset_and_a_validation_folder(tiny_model, tmp_path, tiny_embedders):
    data = write_synthetic_dataset(tmp_path / "data", count=4, size=32)
    held_out = write_synthetic_dataset(tmp_path / "held-out", count=2, size=32, seed=1)
    out = tmp_path / "out"
    load_example().main([
        "--pretrained_model_name_or_path", tiny_model, "--train_data_dir", str(data), "--resolution", "32",
        "--num_train_epochs", "2", "--train_batch_size", "2", "--learning_rate", "1e-2", "--output_dir", str(out),
        "--validation_prompt", "a red circle", "--validation_prompt", "a blue square", "--preview_steps", "2",
        "--preset", "likeness", "--seeds_per_prompt", "2", "--validation_dir", str(held_out), "--strip_words", "red",
        "--clip_model", tiny_embedders["clip"], "--dino_model", tiny_embedders["dino"],
    ])
    lines = read_scores(out / "monitor")
    assert [line["epoch"] for line in lines] == [1, 2]
    assert set(lines[0]["scores"]) == {"likeness", "adherence", "diversity", "memorization", "brisque", "ssim", "val_loss"}
    assert len(lines[0]["scores"]["likeness"]) == 4 and len(lines[0]["scores"]["val_loss"]) == 2
    base = json.loads((out / "monitor" / "base_scores.json").read_text())["aggregates"]
    for line in lines:  # the likeness preset's bounds, relative to the base renders' values
        eligible = all(
            line["aggregates"][name] >= base[name] + (factor - 1) * abs(base[name]) for name, factor in (("adherence", 0.9), ("diversity", 0.8))
        )
        assert eligible == ("is not eligible" not in line["reason"])
