"""Resuming: from a step checkpoint taken before an epoch's evaluation (diffusers' order), from a checkpoint
older than the last evaluation (best/, top_k/ and scores.jsonl of an abandoned branch), and what a loop
that forgets on_resume is told."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import nudge_lora
from safetensors.torch import load_file

from lora_monitor import export as exporting
from lora_monitor.demo import TrainConfig, train, write_synthetic_dataset
from lora_monitor.monitor import LoraMonitor
from lora_monitor.record import read_scores
from lora_monitor.spec import PreviewSpec


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(write_synthetic_dataset(tmp_path_factory.mktemp("data"), count=4, size=64))


# 32 px previews and training images keep whole runs quick on a 2-core CPU; 4 images in batches of 2: 2 steps an epoch.
# The bound makes the choice non-trivial ("best" is the epoch closest to the base that moved far enough from it): on the
# tiny model the run picks epoch 3 and stops at 6 with diffusers 0.42, epoch 2 and 5 with 0.32.1, both after the interruption.
MONITOR = dict(
    metrics=("ssim",), metric="ssim", patience=3, bounds={"ssim": (None, 0.965)}, top_k=2,
    spec=PreviewSpec.from_prompts(["a red circle", "a blue square"], steps=3, width=32, height=32),
)


def config(tiny_model, data_dir, output_dir, **kwargs) -> TrainConfig:
    options = dict(
        pretrained=tiny_model, train_data_dir=data_dir, output_dir=str(output_dir), epochs=8, batch_size=2, learning_rate=5e-2,
        resolution=32, monitor=MONITOR, checkpoint_every_n_steps=2,
    )
    options.update(kwargs)
    return TrainConfig(**options)


def test_resume_from_the_step_checkpoint_at_an_epoch_end_decides_as_the_uninterrupted_run(tiny_model, data_dir, tmp_path):
    """diffusers saves checkpoint-<step> inside the step loop, before the epoch's evaluation. The run below is
    interrupted after epoch 3 and resumed from checkpoint-4 (the end of epoch 2, whose monitor state has seen
    epoch 1 only): epoch 2 is evaluated at the resume, epoch 3 is evaluated again, and the run ends as if never
    interrupted, down to the last bit of the LoRA, best/, top_k/ and the scores as read back."""
    whole = train(config(tiny_model, data_dir, tmp_path / "whole"))
    first = train(config(tiny_model, data_dir, tmp_path / "split", stop_after_epoch=3))
    assert [r.epoch for r in first["monitor"].policy.history] == [1, 2, 3]
    checkpoint = tmp_path / "split" / "checkpoints" / "checkpoint-4"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train(config(tiny_model, data_dir, tmp_path / "split", resume_from=str(checkpoint)))
    a, b = whole["monitor"].policy, resumed["monitor"].policy
    assert a.stopped_epoch is not None and a.stopped_epoch > 3, "the uninterrupted run should stop early, after the interruption"
    assert (b.best_epoch, b.stopped_epoch) == (a.best_epoch, a.stopped_epoch)
    assert [(r.epoch, r.step, r.value, r.aggregates) for r in b.history] == [(r.epoch, r.step, r.value, r.aggregates) for r in a.history]
    assert whole["lora"].keys() == resumed["lora"].keys() and whole["lora"]
    for name, tensor in whole["lora"].items():
        assert torch.equal(resumed["lora"][name], tensor), f"{name} differs after the resume"

    whole_dir, split_dir = tmp_path / "whole" / "monitor", tmp_path / "split" / "monitor"
    lines = [(line["epoch"], line["scores"], line["is_best"]) for line in read_scores(split_dir)]
    assert lines == [(line["epoch"], line["scores"], line["is_best"]) for line in read_scores(whole_dir)]
    assert exporting.read_sidecar(split_dir / "best")["epoch"] == a.best_epoch
    assert sorted(p.name for p in (split_dir / "top_k").iterdir()) == sorted(p.name for p in (whole_dir / "top_k").iterdir())
    exported = [load_file(folder / "best" / "pytorch_lora_weights.safetensors") for folder in (whole_dir, split_dir)]
    assert exported[0].keys() == exported[1].keys() and all(torch.equal(exported[0][k], exported[1][k]) for k in exported[0])
    assert not [str(w.message) for w in caught if "never evaluated" in str(w.message)]


def test_a_loop_that_forgets_on_resume_is_told_which_epoch_was_skipped(pipeline, small_spec, tmp_path):
    monitor = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    nudge_lora(pipeline.unet, seed=1)
    monitor.on_epoch_end(1, step=10)
    state = monitor.state_dict()  # checkpoint-20 inside the step loop: before epoch 2's evaluation
    nudge_lora(pipeline.unet, seed=2)
    monitor.on_epoch_end(2, step=20)

    resumed = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    resumed.load_state_dict(state)
    nudge_lora(pipeline.unet, seed=3)
    with pytest.warns(RuntimeWarning, match=r"epoch\(s\) 2 never evaluated.*on_resume\(epoch, step\) right after accelerator\.load_state"):
        resumed.on_epoch_end(3, step=30)
    assert [r.epoch for r in resumed.policy.history] == [1, 3]


def test_a_mid_epoch_checkpoint_after_a_missed_evaluation_says_the_epoch_is_lost(pipeline, small_spec, tmp_path):
    monitor = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    monitor.on_epoch_end(1, step=10)
    state = monitor.state_dict()
    resumed = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="epoch 2 ended before the checkpoint but was never evaluated.*weights are gone"):
        assert resumed.on_resume(2, 25, mid_epoch=True) is None
    assert [r.epoch for r in resumed.policy.history] == [1]
    other = LoraMonitor.from_pipeline(pipeline, spec=small_spec, output_dir=tmp_path, metrics=("ssim",), metric="ssim")
    other.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="on_resume.epoch 0., but the restored monitor state has already seen epoch 1"):
        assert other.on_resume(0, 10) is None  # 0-based epochs given to a monitor the loop numbers from 1, say


def test_a_step_checkpoint_taken_before_on_step_end_is_evaluated_at_the_resume(pipeline, small_spec, tmp_path):
    options = dict(spec=small_spec, metrics=("ssim",), metric="ssim", every_n_steps=10)
    monitor = LoraMonitor.from_pipeline(pipeline, output_dir=tmp_path / "whole", **options)
    nudge_lora(pipeline.unet, seed=1)
    monitor.on_step_end(10)
    state = monitor.state_dict()  # checkpoint-20, saved in the step loop before on_step_end(20)
    nudge_lora(pipeline.unet, seed=2)
    expected = monitor.on_step_end(20)

    resumed = LoraMonitor.from_pipeline(pipeline, output_dir=tmp_path / "resumed", **options)
    resumed.load_state_dict(state)
    report = resumed.on_resume(step=20)  # the weights are step 20's
    assert report is not None and (report.epoch, report.step, report.unit) == (20, 20, "step")
    assert report.scores == expected.scores
    assert [r.epoch for r in resumed.policy.history] == [10, 20]
    assert resumed.on_step_end(21) is None  # the loop goes on with step 21: not due
    with pytest.raises(ValueError, match="on_resume needs step="):
        resumed.on_resume(2)


class Brightness:
    """Mean pixel value, higher is better: the scripted score of the tests below."""

    name = "brightness"
    higher_is_better = True
    needs_reference = False

    def __call__(self, images, reference=None):
        return images.mean(dim=(1, 2, 3))


def writer_of(label: list[str]):
    """A weights writer that writes whatever `label[0]` says, so each folder shows which evaluation it holds."""

    def write(folder):
        (folder / "weights.bin").write_text(label[0])

    return write


def scored_monitor(output_dir, label: list[str]) -> LoraMonitor:
    spec = PreviewSpec.from_prompts(["a", "b"], width=16, height=16)
    return LoraMonitor(
        spec=spec, output_dir=output_dir, metrics=None, scorers=[Brightness()], metric="brightness", top_k=2, write_weights=writer_of(label)
    )


def approx(value: float):
    return pytest.approx(value, abs=1 / 255)  # previews are scored as their 8-bit PNGs hold them


def evaluate(monitor: LoraMonitor, label: list[str], epoch: int, value: float, branch: str):
    label[0] = f"{branch}{epoch}"
    return monitor.evaluate(epoch, [torch.full((3, 16, 16), value)] * 2, step=epoch * 10)


def test_resume_from_a_checkpoint_older_than_the_last_evaluation_reconciles_the_disk(tmp_path):
    label = [""]
    monitor = scored_monitor(tmp_path, label)
    for epoch, value in ((1, 0.2), (2, 0.5)):
        evaluate(monitor, label, epoch, value, "A")
    state = json.loads(json.dumps(monitor.state_dict()))  # the checkpoint after epoch 2's evaluation
    for epoch, value in ((3, 0.3), (4, 0.9), (5, 0.4)):  # the abandoned branch: epoch 4 became best/, top_k holds 4 and 2
        evaluate(monitor, label, epoch, value, "A")
    assert sorted(p.name for p in (tmp_path / "top_k").iterdir()) == ["epoch-0002", "epoch-0004"]

    resumed = scored_monitor(tmp_path, label)
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning) as record:
        assert resumed.on_resume(2, 20) is None  # an epoch-end checkpoint: nothing was skipped
    messages = " | ".join(str(w.message) for w in record)
    assert "best/ holds epoch 4, evaluated after the checkpoint this run resumed from" in messages
    assert "the restored policy's best is epoch 2, whose weights were not kept" in messages
    assert "top_k/ lacks epoch(s) [1]" in messages
    sidecar = exporting.read_sidecar(tmp_path / "best")
    assert sidecar["epoch"] == 4 and sidecar["restored_policy_best"] == {"unit": "epoch", "epoch": 2}
    assert (tmp_path / "best" / "weights.bin").read_text() == "A4"  # the folder is what its sidecar says
    assert sorted(p.name for p in (tmp_path / "top_k").iterdir()) == ["epoch-0002"]  # the abandoned branch's epoch 4 is gone

    for epoch, value in ((3, 0.35), (4, 0.45)):  # the resumed branch: no new best, best/ stays (and says so)
        evaluate(resumed, label, epoch, value, "B")
    assert [(line["epoch"], line["aggregates"]["brightness"]) for line in read_scores(tmp_path)] == [
        (1, approx(0.2)), (2, approx(0.5)), (3, approx(0.35)), (4, approx(0.45))
    ]  # the abandoned epochs 3 to 5 no longer read back
    assert exporting.read_sidecar(tmp_path / "best")["restored_policy_best"]["epoch"] == 2
    evaluate(resumed, label, 5, 0.95, "B")  # a new best replaces best/ and its sidecar
    sidecar = exporting.read_sidecar(tmp_path / "best")
    assert sidecar["epoch"] == 5 and "restored_policy_best" not in sidecar and (tmp_path / "best" / "weights.bin").read_text() == "B5"
    assert sorted(p.name for p in (tmp_path / "top_k").iterdir()) == ["epoch-0002", "epoch-0005"]
    assert [line["epoch"] for line in read_scores(tmp_path)] == [1, 2, 3, 4, 5]


def test_without_on_resume_the_next_evaluation_reconciles_the_disk(tmp_path):
    label = [""]
    monitor = scored_monitor(tmp_path, label)
    evaluate(monitor, label, 1, 0.5, "A")
    state = monitor.state_dict()
    evaluate(monitor, label, 2, 0.9, "A")
    resumed = scored_monitor(tmp_path, label)
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="best/ holds epoch 2.*best is epoch 1"):
        evaluate(resumed, label, 2, 0.4, "B")
    assert sorted(p.name for p in (tmp_path / "top_k").iterdir()) == ["epoch-0001", "epoch-0002"]
    assert (tmp_path / "top_k" / "epoch-0002" / "weights.bin").read_text() == "B2"
