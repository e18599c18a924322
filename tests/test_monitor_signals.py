"""The embedding signals inside LoraMonitor: the `likeness` preset on the tiny SD pipeline with tiny random-weight
CLIP/DINOv2 models, bounds relative to the base renders, the record, TensorBoard, and errors at build time."""
from __future__ import annotations

import json
import math

import pytest
import torch

import test_wandb
from conftest import nudge_lora
from test_wandb import OfflineRun, close_wandb
from lora_monitor.monitor import LoraMonitor
from lora_monitor.record import read_scores
from lora_monitor.spec import PreviewSpec

wandb_env = test_wandb.wandb_env  # the fixture, for the W&B test below

SIGNALS = ("likeness", "adherence", "diversity", "memorization")


@pytest.fixture
def spec():
    return PreviewSpec.from_prompts(["a red circle", "a blue square"], seed=3, steps=2, width=32, height=32, seeds_per_prompt=2)


@pytest.fixture
def references():
    generator = torch.Generator().manual_seed(5)
    return [torch.rand(3, 32, 32, generator=generator) for _ in range(3)]


def likeness_monitor(pipeline, spec, references, tiny_embedders, output_dir, **kwargs) -> LoraMonitor:
    options = dict(
        pipeline=pipeline, spec=spec, output_dir=output_dir, preset="likeness", references=references,
        clip_model=tiny_embedders["clip"], dino_model=tiny_embedders["dino"], export=False,
    )
    return LoraMonitor(**{**options, **kwargs})


def test_likeness_preset_scores_every_signal_and_bounds_against_the_base(pipeline, spec, references, tiny_embedders, tmp_path):
    monitor = likeness_monitor(pipeline, spec, references, tiny_embedders, tmp_path, metrics=(*SIGNALS, "ssim"))
    assert monitor.policy.metric == "likeness" and monitor.policy.bounds == {"adherence": ("0.9x", None), "diversity": ("0.8x", None)}
    nudge_lora(pipeline.unet, seed=1)
    report = monitor.on_epoch_end(1)
    for name in SIGNALS:
        assert len(report.scores[name]) == len(spec) and all(math.isfinite(v) for v in report.scores[name]), name
    # the two seeds of one prompt share one diversity value; the likeness is a cosine
    assert report.scores["diversity"][0] == report.scores["diversity"][1] and report.scores["diversity"][2] == report.scores["diversity"][3]
    assert all(-1 <= v <= 1 + 1e-6 for v in report.scores["likeness"])
    # the base renders were scored with the same scorers, and the policy multiplies those values
    base = json.loads((tmp_path / "base_scores.json").read_text())
    assert base["aggregates"]["ssim"] == pytest.approx(1.0)
    assert set(base["aggregates"]) == {*SIGNALS, "ssim"}
    assert monitor.policy.base == pytest.approx({name: value for name, value in base["aggregates"].items()})
    base_images = monitor.base_references()
    rescored = monitor.score(base_images, base_images)["likeness"]
    assert base["scores"]["likeness"] == pytest.approx(rescored)
    adherence, diversity = report.aggregates["adherence"], report.aggregates["diversity"]
    base_adherence, base_diversity = base["aggregates"]["adherence"], base["aggregates"]["diversity"]
    # F x base for a positive base, the same distance below it for a negative one (random CLIP cosines can be)
    eligible = adherence >= base_adherence - 0.1 * abs(base_adherence) and diversity >= base_diversity - 0.2 * abs(base_diversity)
    assert report.is_best == eligible
    line = read_scores(tmp_path)[-1]
    assert set(line["scores"]) == {*SIGNALS, "ssim"}


def test_a_relative_bound_no_epoch_can_meet_is_explained_with_its_value(pipeline, spec, references, tiny_embedders, tmp_path):
    monitor = likeness_monitor(
        pipeline, spec, references, tiny_embedders, tmp_path, preset="quality", metric="likeness", metrics=("likeness", "diversity"),
        bounds={"diversity": ("100x", None)},  # diversity (1 - cosine) is positive: 100x the base cannot be met
    )
    nudge_lora(pipeline.unet, seed=2)
    report = monitor.on_epoch_end(1)
    limit = 100 * monitor.policy.base["diversity"]
    assert limit > 0 and not report.is_best and monitor.best_epoch is None
    assert f"below the lower bound 100x base ({monitor.policy.base['diversity']:.6g}) = {limit:.6g}" in report.decision.reason


def test_the_signals_reach_tensorboard_with_the_base_values(pipeline, spec, references, tiny_embedders, tmp_path):
    pytest.importorskip("tensorboard")
    from accelerate import Accelerator
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lora_monitor.integrations.trackers import TrackersListener

    accelerator = Accelerator(log_with="tensorboard", project_dir=str(tmp_path / "tb"))
    accelerator.init_trackers("signals")
    monitor = likeness_monitor(pipeline, spec, references, tiny_embedders, tmp_path / "run", listeners=[TrackersListener()])
    monitor.attach(accelerator)
    nudge_lora(pipeline.unet, seed=3)
    report = monitor.on_epoch_end(1)
    accelerator.end_training()
    events = EventAccumulator(str(next((tmp_path / "tb").rglob("events.out.tfevents*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for name in SIGNALS:
        assert f"monitor/{name}_mean" in tags and f"monitor/base_{name}" in tags
        assert events.Scalars(f"monitor/{name}_mean")[-1].value == pytest.approx(report.aggregates[name], rel=1e-5)


def test_signals_need_their_inputs_before_training_starts(pipeline, small_spec, references, tiny_embedders, tmp_path):
    two_seeds = small_spec.with_seeds(2)
    with pytest.raises(ValueError, match=r"likeness.*reference"):
        likeness_monitor(pipeline, two_seeds, None, tiny_embedders, tmp_path)
    with pytest.raises(ValueError, match=r"seeds_per_prompt"):
        likeness_monitor(pipeline, small_spec, references, tiny_embedders, tmp_path)


def test_missing_embedding_weights_offline_fail_when_the_monitor_is_built(pipeline, small_spec, references, tmp_path, empty_hf_cache):
    from lora_monitor.scoring.embeddings import ModelNotAvailableError

    with pytest.raises(ModelNotAvailableError, match=r"lora-monitor models (clip|dino)"):
        LoraMonitor(pipeline=pipeline, spec=small_spec.with_seeds(2), output_dir=tmp_path, preset="likeness", references=references, export=False)


def test_the_signals_reach_wandb_as_scalars_and_table_columns(pipeline, spec, references, tiny_embedders, tmp_path, wandb_env):
    from lora_monitor.integrations.wandb_logger import WandbListener

    listener = WandbListener(project="lm-test", name="signals", log_images=False)
    monitor = likeness_monitor(pipeline, spec, references, tiny_embedders, tmp_path / "out", listeners=[listener])
    nudge_lora(pipeline.unet, seed=4)
    report = monitor.on_epoch_end(1)
    listener.finish()
    close_wandb()
    run = OfflineRun(wandb_env["WANDB_DIR"])
    row = next(row for row in run.history if "monitor/epoch" in row)
    for name in SIGNALS:
        assert row[f"monitor/{name}_mean"] == pytest.approx(report.aggregates[name])
        assert row[f"monitor/base_{name}"] == pytest.approx(monitor.policy.base[name])
        assert row[f"monitor/{name}/prompt_03"] == pytest.approx(report.scores[name][3])
    table = json.loads(next((run.folder / "files" / "media" / "table" / "monitor").glob("table_*.table.json")).read_text())
    columns = table["columns"]
    assert columns[:6] == ["epoch", "index", "prompt", "seed", "preview", "base"] and set(columns[6:]) == {*SIGNALS, "brisque", "ssim"}
    likeness = columns.index("likeness")
    assert [line[likeness] for line in table["data"]] == pytest.approx(report.scores["likeness"])


def test_loss_preset_scores_each_held_out_image_and_the_base(pipeline, small_spec, tmp_path):
    from lora_monitor.validation import ValidationSet

    generator = torch.Generator().manual_seed(9)
    held_out = ValidationSet([torch.rand(3, 64, 64, generator=generator) for _ in range(3)], ["a red circle", "a blue square", ""])
    monitor = LoraMonitor(pipeline=pipeline, spec=small_spec, output_dir=tmp_path, preset="loss", validation=held_out, export=False)
    assert monitor.policy.metric == "val_loss" and monitor.policy.dvar is not None
    nudge_lora(pipeline.unet, seed=5)
    report = monitor.on_epoch_end(1)
    assert len(report.scores["val_loss"]) == 3 and len(report.scores["brisque"]) == len(small_spec)
    assert report.aggregates["val_loss"] == pytest.approx(monitor.validation_loss())
    assert monitor.policy.base["val_loss"] == pytest.approx(monitor.validation_loss(base=True))
    assert monitor.policy.base["val_loss"] != pytest.approx(report.aggregates["val_loss"], rel=1e-6)  # the LoRA moved it
    assert set(report.preview_scores) == {"brisque", "ssim"}
    line = read_scores(tmp_path)[-1]
    assert line["scores"]["val_loss"] == pytest.approx(report.scores["val_loss"])


def test_validation_folder_and_missing_validation_are_checked_when_built(pipeline, small_spec, tmp_path):
    from lora_monitor.demo import write_synthetic_dataset

    with pytest.raises(ValueError, match=r"val_loss.*needs held-out images.*validation="):
        LoraMonitor(pipeline=pipeline, spec=small_spec, output_dir=tmp_path, preset="loss", export=False)
    with pytest.raises(ValueError, match=r"validation= was given but 'val_loss' is not among the metrics"):
        LoraMonitor(pipeline=pipeline, spec=small_spec, output_dir=tmp_path, validation=str(tmp_path), export=False)
    folder = write_synthetic_dataset(tmp_path / "held-out", count=2, size=80)
    monitor = LoraMonitor(pipeline=pipeline, spec=small_spec, output_dir=tmp_path / "run", preset="loss", validation=str(folder), export=False)
    assert [tuple(image.shape) for image in monitor.validation.data.images] == [(3, 64, 64)] * 2  # cropped to the previews' size
    assert monitor.validation.data.captions[0] == (folder / "000.txt").read_text()


def test_signal_models_can_be_let_go_after_each_evaluation(pipeline, spec, references, tiny_embedders, tmp_path):
    from lora_monitor.scoring import embeddings

    def loaded() -> list[str]:
        return sorted(model.kind for model in embeddings._SHARED.values() if model.model is not None)

    embeddings.release_embedding_models()  # whatever earlier tests left shared in this process
    kept = likeness_monitor(pipeline, spec, references, tiny_embedders, tmp_path / "kept")
    nudge_lora(pipeline.unet, seed=6)
    first = kept.on_epoch_end(1)
    assert loaded() == ["clip", "dino"]
    freed = likeness_monitor(pipeline, spec, references, tiny_embedders, tmp_path / "freed", keep_signal_models=False)
    second = freed.on_epoch_end(1)
    assert loaded() == []  # released after the evaluation ...
    for name in SIGNALS:  # ... and loaded again to give the same scores
        assert second.scores[name] == pytest.approx(first.scores[name], abs=1e-6)
