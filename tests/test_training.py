"""Whole training runs on the tiny model: the monitor changes nothing, and a resumed run decides the same."""
from __future__ import annotations

import pytest
import torch

from lora_monitor.demo import TrainConfig, train, write_synthetic_dataset
from lora_monitor.policy import DvarRule
from lora_monitor.spec import PreviewSpec


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
MONITOR = dict(metrics=("ssim",), monitor="ssim", spec=PreviewSpec.from_prompts(["a red circle", "a blue square"], steps=3, width=32, height=32))


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
