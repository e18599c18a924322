"""TrackersListener with real accelerate trackers: the TensorBoard event file read back; the contact sheet;
the --report_to helper."""
from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from conftest import nudge_lora
from PIL import Image

from lora_monitor.integrations.trackers import ContactSheet, TrackersListener, caption, listeners_for
from lora_monitor.monitor import LoraMonitor
from lora_monitor.record import read_scores

pytest.importorskip("tensorboard")


def make_monitor(pipe, spec, output_dir, **kwargs) -> LoraMonitor:
    options = dict(metrics=("ssim",), metric="ssim", spec=spec, output_dir=output_dir)
    options.update(kwargs)
    return LoraMonitor.from_pipeline(pipe, **options)


class BrokenTracker:
    """A custom accelerate tracker (GeneralTracker subclass, defined lazily) whose every log fails."""

    @staticmethod
    def make():
        from accelerate.tracking import GeneralTracker

        class Broken(GeneralTracker):
            name = "broken"
            requires_logging_directory = False

            def __init__(self):
                super().__init__()
                self.calls = 0

            @property
            def tracker(self):
                return None

            def log(self, values, step=None, **kwargs):
                self.calls += 1
                raise OSError(28, "No space left on device")

        return Broken()


def test_tensorboard_event_file_holds_scalars_and_images_and_a_broken_tracker_warns_once(pipeline, small_spec, tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    broken = BrokenTracker.make()
    accelerator = Accelerator(
        log_with=["tensorboard", broken], project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs"))
    )
    accelerator.init_trackers("lm-tb")
    monitor = make_monitor(pipeline, small_spec, tmp_path / "out", listeners=[TrackersListener()]).attach(accelerator)
    reports = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in (1, 2):
            nudge_lora(pipeline.unet, seed=epoch)
            reports.append(monitor.on_epoch_end(epoch, step=epoch * 10))
    accelerator.end_training()

    failures = [w for w in caught if "'broken' tracker failed" in str(w.message)]
    assert len(failures) == 1 and broken.calls == 2 and "No space left" in str(failures[0].message)

    events = EventAccumulator(str(tmp_path / "logs" / "lm-tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    mean = events.Scalars("monitor/ssim_mean")
    assert [event.step for event in mean] == [10, 20]
    assert [event.value for event in mean] == pytest.approx([r.aggregates["ssim"] for r in reports])
    assert [event.value for event in events.Scalars("monitor/ssim/prompt_01")] == pytest.approx([r.scores["ssim"][1] for r in reports])
    assert [event.value for event in events.Scalars("monitor/epoch")] == [1, 2]
    assert [event.value for event in events.Scalars("monitor/best_epoch")] == [r.decision.best_epoch for r in reports]
    assert "monitor/prompts/text_summary" in tags["tensors"]

    assert set(tags["images"]) == {"monitor/preview/00", "monitor/preview/01", "monitor/base/00", "monitor/base/01", "monitor/contact_sheet"}
    previews = events.Images("monitor/preview/01")
    assert [event.step for event in previews] == [10, 20] and (previews[1].width, previews[1].height) == (64, 64)
    logged = np.asarray(Image.open(io.BytesIO(previews[1].encoded_image_string)).convert("RGB"), dtype=np.int16)
    local = np.asarray(Image.open(tmp_path / "out" / reports[1].preview_paths[1]).convert("RGB"), dtype=np.int16)
    assert np.abs(logged - local).max() <= 1  # TensorBoard truncates to 8 bits, the record rounds
    assert len(events.Images("monitor/base/00")) == 1
    sheets = events.Images("monitor/contact_sheet")
    assert [event.width for event in sheets] == [2 * 66 + 2, 3 * 66 + 2]  # base + one column per epoch
    assert [line["epoch"] for line in read_scores(tmp_path / "out")] == [1, 2]


def test_a_step_based_monitor_is_keyed_by_step_in_tensorboard(pipeline, small_spec, tmp_path):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accelerator = Accelerator(log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(tmp_path), logging_dir=str(tmp_path / "logs")))
    accelerator.init_trackers("lm-tb-steps")
    listener = TrackersListener()
    monitor = make_monitor(pipeline, small_spec, tmp_path / "out", every_n_steps=2, listeners=[listener]).attach(accelerator)
    assert monitor.unit == "step"
    reports = []
    for step in (1, 2, 3, 4):
        nudge_lora(pipeline.unet, seed=step)
        report = monitor.on_step_end(step)
        if report is not None:
            reports.append(report)
    accelerator.end_training()
    assert [(r.unit, r.epoch, r.step, r.label) for r in reports] == [("step", 2, 2, "step 2"), ("step", 4, 4, "step 4")]

    events = EventAccumulator(str(tmp_path / "logs" / "lm-tb-steps"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    scalar_tags = set(events.Tags()["scalars"])
    assert {"monitor/step", "monitor/best_step"} <= scalar_tags
    assert not {"monitor/epoch", "monitor/best_epoch"} & scalar_tags
    assert [(event.step, event.value) for event in events.Scalars("monitor/step")] == [(2, 2), (4, 4)]
    assert [event.value for event in events.Scalars("monitor/best_step")] == [r.decision.best_epoch for r in reports]
    assert [event.step for event in events.Scalars("monitor/ssim_mean")] == [2, 4]
    assert [event.step for event in events.Images("monitor/preview/00")] == [2, 4]
    assert [event.width for event in events.Images("monitor/contact_sheet")] == [2 * 66 + 2, 3 * 66 + 2]

    assert listener.sheet.columns == ["base", "step 2", "step 4"]
    assert caption(monitor, reports[1], 0).startswith("a red circle | seed 7 | step 4 | ssim ")
    lines = read_scores(tmp_path / "out")
    assert [(line["unit"], line["epoch"]) for line in lines] == [("step", 2), ("step", 4)]
    assert lines[1]["previews"][0].startswith("previews/step-0004/")


def solid(colour: tuple[int, int, int], size: int = 32) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.float32).div(255).view(3, 1, 1).expand(3, size, size).clone()


def test_contact_sheet_has_a_row_per_prompt_and_a_column_per_epoch_after_the_base():
    sheet = ContactSheet(thumbnail=16, max_epochs=2)
    colours = {None: [(10, 10, 10), (20, 20, 20)]}
    sheet.set_base([solid(c) for c in colours[None]])
    for epoch in (1, 2, 3):
        colours[epoch] = [(200, epoch * 40, 0), (0, epoch * 40, 200)]
        sheet.add(epoch, [solid(c) for c in colours[epoch]])
    assert sheet.columns == ["base", "epoch 2", "epoch 3"]  # only the newest max_epochs epochs
    image = sheet.render(best_epoch=2)
    assert image.size == (3 * 18 + 2, 14 + 2 * 18 + 2)
    for column, key in enumerate((None, 2, 3)):
        for row in (0, 1):
            centre = (2 + column * 18 + 8, 14 + 2 + row * 18 + 8)
            assert image.getpixel(centre) == colours[key][row], (column, row)
    steps = ContactSheet(thumbnail=16, unit="step")  # a step-based monitor's columns
    steps.add(400, [solid((1, 2, 3))])
    steps.add(800, [solid((4, 5, 6))], label="step 800")
    assert steps.columns == ["step 400", "step 800"]
    assert steps.render(best_epoch=800).size == (2 * 18 + 2, 14 + 18 + 2)
    with pytest.raises(ValueError, match="empty"):
        ContactSheet().render()
    with pytest.raises(ValueError, match="thumbnail"):
        ContactSheet(thumbnail=4)


def test_listeners_for_report_to():
    from lora_monitor.integrations.wandb_logger import WandbListener

    assert listeners_for(None) == [] and listeners_for("none") == []
    assert [type(listener) for listener in listeners_for("tensorboard")] == [TrackersListener]
    wandb_listeners = listeners_for("wandb", project="p", upload_checkpoints=False)
    assert [type(listener) for listener in wandb_listeners] == [WandbListener, TrackersListener]
    assert wandb_listeners[0].project == "p" and wandb_listeners[0].upload_checkpoints is False
    assert [type(listener) for listener in listeners_for("all")] == [WandbListener, TrackersListener]
    with pytest.raises(ValueError, match="report_to can be 'wandb', 'tensorboard', 'all', 'none'"):
        listeners_for("mlflow")
    with pytest.raises(ValueError, match="namespace"):
        TrackersListener(namespace="")
