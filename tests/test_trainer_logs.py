"""The trainers' validation loss read back from real log files, written as each trainer writes them.

Each test writes what the cited function of a trainer writes, in its order: TensorBoard event files through
the same writer the trainer uses (torch's SummaryWriter for OneTrainer; accelerate's TensorBoard tracker for
kohya sd-scripts and SimpleTuner, in the folders their code gives it), with the trainer's tag names, step
axis, unrelated training tags, a resumed run's second file overlapping the first, and a half-written last
record; ai-toolkit's SQLite loss log and SimpleTuner's metrics lines as their loggers lay them out. Citations:
lora_monitor/trainer_logs.py, at each entry's `source` commit.
"""
from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from lora_monitor.trainer_layouts import LAYOUTS
from lora_monitor.trainer_logs import VALIDATION_TAGS, accumulation_steps, loss_for_round, read_scalars, validation_loss

pytest.importorskip("tensorboard")
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def approx(values: dict) -> dict:
    return {key: pytest.approx(value, rel=1e-6) for key, value in values.items()}  # TensorBoard keeps float32


def heard() -> tuple[list[str], Callable[[str], None]]:
    messages: list[str] = []
    return messages, messages.append


# -------------------------------------------------------------------------------------------- kohya
def kohya_launch(logging_dir: Path, prefix: str, stamp: str, first_epoch: int, epochs: int, steps_per_epoch: int, shift: float) -> None:
    """One launch of train_network.py NetworkTrainer.train() with --validation_split, --validate_every_n_steps 2
    and --log_prefix `prefix`: per step the training logs and, every 2nd step, the step validation at global_step;
    per epoch the epoch validation and loss/epoch_average at epoch + 1 (step_logging / epoch_logging)."""
    from accelerate import Accelerator

    # library/train_util.py prepare_accelerator(): f"{logging_dir}/{log_prefix}{%Y%m%d%H%M%S}"; init_trackers("network_train")
    accelerator = Accelerator(log_with="tensorboard", project_dir=str(logging_dir / f"{prefix}{stamp}"))
    accelerator.init_trackers("network_train")
    tracker = accelerator.get_tracker("tensorboard")
    global_step = first_epoch * steps_per_epoch
    for epoch in range(first_epoch, epochs):
        for _ in range(steps_per_epoch):
            global_step += 1
            tracker.log({"loss/current": 0.9, "loss/average": 0.8, "lr/unet": 1e-4}, step=global_step)
            if global_step % 2 == 0:
                step_loss = 0.5 - 0.01 * global_step + shift
                tracker.log({"loss/validation/step_average": step_loss, "loss/validation/step_divergence": step_loss - 0.8},
                            step=global_step)
        epoch_loss = 0.4 - 0.05 * (epoch + 1) + shift
        tracker.log({"loss/validation/epoch_average": epoch_loss, "loss/validation/epoch_divergence": epoch_loss - 0.8},
                    step=epoch + 1)
        tracker.log({"loss/epoch_average": 0.8}, step=epoch + 1)
    accelerator.end_training()


def test_kohya_epoch_and_step_validation_across_a_resumed_launch(tmp_path):
    output, logs = tmp_path / "model", tmp_path / "log"
    output.mkdir()
    kohya_launch(logs, "my_lora_", "20260216120000", first_epoch=0, epochs=3, steps_per_epoch=4, shift=0.0)
    # resumed from the epoch-2 state: a second timestamped folder (its prefix sorts first: files are ordered by
    # their first event's time, not by name), epochs 3 and 4 again and new
    kohya_launch(logs, "again_", "20260216130000", first_epoch=2, epochs=4, steps_per_epoch=4, shift=0.1)
    assert len(list(logs.rglob("events.out.tfevents.*"))) >= 2

    by_epoch = validation_loss(output, "kohya", logging_dir=logs)
    assert by_epoch == approx({1: 0.35, 2: 0.30, 3: 0.35, 4: 0.30})  # epochs 1-2 of the first launch, 3-4 of the second
    by_step = validation_loss(output, "kohya", logging_dir=logs, axis="step")
    assert by_step == approx({2: 0.48, 4: 0.46, 6: 0.44, 8: 0.42, 10: 0.50, 12: 0.48, 14: 0.46, 16: 0.44})

    # the divergence tags and the training tags stay out; read_scalars gives each matching tag by step
    scalars = read_scalars(logs, r"loss/validation/.*")
    assert set(scalars) == {"loss/validation/epoch_average", "loss/validation/epoch_divergence",
                            "loss/validation/step_average", "loss/validation/step_divergence"}
    assert [step for step, _ in scalars["loss/validation/epoch_average"]] == [1, 2, 3, 4]

    # kohya's --logging_dir is anywhere: without it the output folder is searched, and says what it looked for
    messages, say = heard()
    assert validation_loss(output, "kohya", say=say) == {}
    assert "--validation_split" in messages[0] and str(output) in messages[0]
    # its folder as the output folder works too (searched below)
    assert validation_loss(logs, "sd-scripts") == approx({1: 0.35, 2: 0.30, 3: 0.35, 4: 0.30})
    with pytest.raises(ValueError, match="'epoch' or 'step', not 'second'"):
        validation_loss(output, "kohya", logging_dir=logs, axis="second")


# ---------------------------------------------------------------------------------------- OneTrainer
def onetrainer_run(workspace: Path, started: str, concepts: dict[str, int], steps: list[int], shift: float) -> Path:
    """GenericTrainer: SummaryWriter(workspace/tensorboard/<prefix><timestamp>); per step loss/train_step and
    smooth_loss/train_step; __validate() per concept loss/validation_step/<label> (the concept's mean) and, with
    more than one concept, loss/validation_step/total_average (the mean over all samples), at global_step."""
    folder = workspace / "tensorboard" / started
    writer = SummaryWriter(str(folder))
    for step in steps:
        writer.add_scalar("loss/train_step", 0.9, step)
        writer.add_scalar("smooth_loss/train_step", 0.85, step)
        total, count = 0.0, 0
        for index, (label, samples) in enumerate(concepts.items()):
            concept_mean = 0.3 + 0.1 * index - 0.001 * step + shift
            writer.add_scalar(f"loss/validation_step/{label}", concept_mean, step)
            total, count = total + concept_mean * samples, count + samples
        if len(concepts) > 1:
            writer.add_scalar("loss/validation_step/total_average", total / count, step)
    writer.close()
    return folder


def test_onetrainer_prefers_total_average_and_a_restart_wins_its_steps(tmp_path):
    workspace = tmp_path / "workspace" / "run"
    concepts = {"dogs": 3, "cats": 1}  # weighted: total_average = (3 dogs + 1 cats) / 4, not their plain mean
    onetrainer_run(workspace, "2026-08-19_12-00-00", concepts, [0, 10, 20, 30], shift=0.0)
    onetrainer_run(workspace, "2026-08-19_13-00-00", concepts, [20, 30, 40], shift=0.2)  # resumed from a backup at 20
    expected = {step: 0.3 + 0.1 * 0.25 - 0.001 * step + (0.2 if step >= 20 else 0.0) for step in (0, 10, 20, 30, 40)}
    assert validation_loss(workspace, "onetrainer") == approx(expected)
    assert VALIDATION_TAGS["onetrainer"].round_offset == 1  # logged after the batch: the weights of round S + 1

    scalars = read_scalars(workspace / "tensorboard", r"loss/validation_step/.+")
    assert set(scalars) == {"loss/validation_step/dogs", "loss/validation_step/cats", "loss/validation_step/total_average"}
    assert scalars["loss/validation_step/dogs"] == [(0, pytest.approx(0.3)), (10, pytest.approx(0.29)),
                                                     (20, pytest.approx(0.48)), (30, pytest.approx(0.47)), (40, pytest.approx(0.46))]


def test_onetrainer_round_of_a_logged_value_depends_on_gradient_accumulation(tmp_path):
    """GenericTrainer: __validate() after batch G holds the weights of the top of batch G + 1; with A accumulation steps
    batches G with (G + 1) % A != 0 make no optimizer step, so the values at S - 1 .. S + A - 2 hold round S's weights.
    A comes from the config GenericTrainer.start() saves in workspace/config/<timestamp>.json."""
    workspace = tmp_path / "workspace"
    assert accumulation_steps(workspace, "onetrainer") == 1  # no saved config: taken as 1
    (workspace / "config").mkdir(parents=True)
    (workspace / "config" / "2026-08-19_12-00-00.json").write_text(json.dumps({"gradient_accumulation_steps": 1}))
    (workspace / "config" / "2026-08-19_13-00-00.json").write_text(json.dumps({"gradient_accumulation_steps": 4}))
    assert accumulation_steps(workspace, "onetrainer") == 4  # the newest start's
    losses = {9: 0.5, 10: 0.4, 12: 0.3, 13: 0.2}
    assert loss_for_round(losses, 10, "onetrainer") == 0.5  # A = 1: only G = S - 1
    assert math.isnan(loss_for_round({10: 0.4}, 10, "onetrainer"))  # the value at S holds round S + 1's weights
    assert loss_for_round(losses, 10, "onetrainer", accumulation=4) == 0.3  # G = 9 .. 12: the latest logged
    assert loss_for_round(losses, 10, "ai-toolkit", accumulation=4) == 0.4  # no accumulation window: its step only
    assert accumulation_steps(workspace, "ai-toolkit") == 1
    messages, say = heard()
    (workspace / "config" / "2026-08-19_14-00-00.json").write_text("{not json")
    assert accumulation_steps(workspace, "onetrainer", say=say) == 4 and "not readable" in messages[0]


def test_onetrainer_single_concept_and_a_half_written_last_record(tmp_path):
    workspace = tmp_path / "workspace"
    folder = onetrainer_run(workspace, "2026-08-19_12-00-00", {"my concept": 5}, [0, 10, 20, 30], shift=0.0)
    event_file = next(folder.glob("events.out.tfevents.*"))
    data = event_file.read_bytes()
    event_file.write_bytes(data[:-9])  # the step-30 validation record cut short, as a crash mid-write leaves it
    assert validation_loss(workspace, "OneTrainer") == approx({0: 0.3, 10: 0.29, 20: 0.28})
    assert read_scalars(event_file, "loss/train_step") == {"loss/train_step": [(0, pytest.approx(0.9)), (10, pytest.approx(0.9)),
                                                                               (20, pytest.approx(0.9)), (30, pytest.approx(0.9))]}


# -------------------------------------------------------------------------------------- SimpleTuner
def simpletuner_run(output: Path, eval_steps: list[int], losses: dict[str, float], shift: float) -> None:
    """Trainer.train(): accelerator.log(wandb_logs, step=global_step) with the step's training values and, at eval
    steps, Evaluation.generate_tracker_table()'s loss/val/<dataset>; the tracker from cmd_args.py's
    ProjectConfiguration(project_dir=output_dir, logging_dir=output_dir/logs) and init_trackers('simpletuner-training')."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    config = ProjectConfiguration(project_dir=str(output), logging_dir=str(output / "logs"))
    accelerator = Accelerator(log_with="tensorboard", project_config=config)
    accelerator.init_trackers("simpletuner-training")
    for step in range(eval_steps[0] - 1, eval_steps[-1] + 1):
        logs = {"train_loss": 0.7, "optimization_loss": 0.7, "learning_rate": 1e-4, "epoch": 1}
        if step in eval_steps:
            logs.update({f"loss/val/{name}": value - 0.001 * step + shift for name, value in losses.items()})
        accelerator.log(logs, step=step)
    accelerator.end_training()


def test_simpletuner_per_dataset_losses_average_and_pooled_wins(tmp_path):
    output = tmp_path / "output"
    simpletuner_run(output, [100, 200, 300], {"eval-faces": 0.30, "eval-hands": 0.50}, shift=0.0)
    simpletuner_run(output, [300, 400], {"eval-faces": 0.30, "eval-hands": 0.50}, shift=0.1)  # resumed at 200
    assert len(list((output / "logs" / "simpletuner-training").glob("events.out.tfevents.*"))) == 2
    expected = {step: 0.40 - 0.001 * step + (0.1 if step >= 300 else 0.0) for step in (100, 200, 300, 400)}
    assert validation_loss(output, "simpletuner") == approx(expected)

    pooled = tmp_path / "pooled"
    simpletuner_run(pooled, [50, 100], {"pooled": 0.25}, shift=0.0)  # --eval_dataset_pooling
    assert validation_loss(pooled, "bghira/SimpleTuner") == approx({50: 0.2, 100: 0.15})


def simpletuner_metrics_line(step: int, metrics: dict) -> str:
    """local_metrics.py LocalMetricsTracker.log(): one JSON object a line, sorted keys, compact separators."""
    record = {"schema_version": 1, "timestamp": "2026-08-22T12:00:00+00:00", "step": step, "metrics": metrics}
    return json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n"


def test_simpletuner_local_metrics_file_with_a_resume_and_a_torn_last_line(tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    lines = [simpletuner_metrics_line(step, {"train_loss": 0.7}) for step in (1, 2)]
    lines += [simpletuner_metrics_line(100, {"train_loss": 0.7, "loss/val/eval": 0.31}),
              simpletuner_metrics_line(200, {"train_loss": 0.7, "loss/val/eval": 0.29}),
              simpletuner_metrics_line(200, {"train_loss": 0.7, "loss/val/eval": 0.27})]  # resumed: 200 again
    torn = simpletuner_metrics_line(300, {"loss/val/eval": 0.2})[:-15]
    (output / "training_metrics.jsonl").write_text("".join(lines) + torn, encoding="utf-8")
    assert validation_loss(output, "simpletuner") == {100: 0.31, 200: 0.27}

    (output / "training_metrics.jsonl").write_text("".join(lines) + "{not json}\n" + lines[0], encoding="utf-8")
    with pytest.raises(ValueError, match=r"training_metrics.jsonl:6: not a SimpleTuner metrics line"):
        validation_loss(output, "simpletuner")


# --------------------------------------------------------------------------------------- ai-toolkit
def aitk_database(path: Path) -> sqlite3.Connection:
    """toolkit/logging_aitk.py UILogger.start()/_init_schema(): WAL; steps, metric_keys and metrics(step, key,
    value_real, value_text) with one row per (step, key)."""
    connection = sqlite3.connect(path, isolation_level=None)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("CREATE TABLE steps (step INTEGER PRIMARY KEY, wall_time REAL NOT NULL)")
    connection.execute("CREATE TABLE metric_keys (key TEXT PRIMARY KEY, first_seen_step INTEGER, last_seen_step INTEGER)")
    connection.execute("CREATE TABLE metrics (step INTEGER NOT NULL, key TEXT NOT NULL, value_real REAL, value_text TEXT,"
                       " PRIMARY KEY (step, key))")
    return connection


def aitk_commit(connection: sqlite3.Connection, step: int, logs: dict) -> None:
    """UILogger.commit(step=step_num) + _flush(): upsert the step and each key's value."""
    connection.execute("INSERT INTO steps VALUES (?, 0) ON CONFLICT(step) DO UPDATE SET wall_time = 0", (step,))
    for key, value in logs.items():
        connection.execute("INSERT INTO metrics VALUES (?, ?, ?, NULL) ON CONFLICT(step, key) DO UPDATE SET "
                           "value_real = excluded.value_real", (step, key, value))


def test_ai_toolkit_sqlite_log_while_written_and_after(tmp_path):
    output = tmp_path / "output" / "my_lora"  # {training_folder}/{job name}
    output.mkdir(parents=True)
    messages, say = heard()
    assert validation_loss(output, "ai-toolkit", say=say) == {}  # no loss_log.db yet
    assert "use_ui_logger" in messages[0]

    connection = aitk_database(output / "loss_log.db")
    assert validation_loss(output, "ai-toolkit") == {}  # tables, no rows
    # run(): every step commits learning_rate and loss/<key>; val/loss joins on log_every steps (100)
    for step in range(0, 301, 50):
        logs = {"learning_rate": 1e-4, "loss/loss": 0.6}
        if step % 100 == 0:
            logs["val/loss"] = 0.5 - 0.0005 * step
        aitk_commit(connection, step, logs)
    assert validation_loss(output, "ai-toolkit") == {0: 0.5, 100: 0.45, 200: 0.4, 300: 0.35}  # read beside the writer
    connection.close()
    left = sorted(path.name for path in output.iterdir())
    assert validation_loss(output, "ai-toolkit") == {0: 0.5, 100: 0.45, 200: 0.4, 300: 0.35}
    assert sorted(path.name for path in output.iterdir()) == left == ["loss_log.db"]  # nothing added to its folder

    # its TensorBoard files never hold val/loss: a logging_dir is not read, and says so
    messages, say = heard()
    assert validation_loss(output, "ai-toolkit", logging_dir=tmp_path / "tb", say=say) == approx({0: 0.5, 100: 0.45, 200: 0.4, 300: 0.35})
    (output / "loss_log.db").unlink()
    assert validation_loss(output, "ai-toolkit", logging_dir=tmp_path / "tb", say=say) == {}
    assert "is not read" in messages[0]


# ------------------------------------------------------------------------ trainers without one, errors
@pytest.mark.parametrize("trainer, folder", [("musubi-tuner", "log/20260624120000/network_train"), ("diffusers", "logs/dreambooth-lora")])
def test_trainers_without_validation_loss_return_nothing_and_say_why(tmp_path, trainer, folder):
    writer = SummaryWriter(str(tmp_path / folder))
    for step in range(1, 4):
        writer.add_scalar("loss/current" if trainer == "musubi-tuner" else "loss", 0.5, step)
    writer.close()
    messages, say = heard()
    assert validation_loss(tmp_path, trainer, logging_dir=tmp_path / folder, say=say) == {}
    assert "no validation loss" in messages[0]
    assert VALIDATION_TAGS[trainer].tags == {} and VALIDATION_TAGS[trainer].missing


def test_the_table_covers_every_layout_and_names_are_checked(tmp_path):
    assert set(VALIDATION_TAGS) == set(LAYOUTS)
    for spec in VALIDATION_TAGS.values():
        assert set(spec.tags) <= {"step", "epoch"} and (spec.default_axis in spec.tags or not spec.tags)
        assert spec.source == LAYOUTS[spec.trainer].source
    with pytest.raises(ValueError, match="Did you mean 'onetrainer'"):
        validation_loss(tmp_path, "onetrainr")


def test_read_scalars_no_match_missing_folder_and_bad_pattern(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run"))
    writer.add_scalar("loss/train_step", 0.5, 1)
    writer.close()
    assert read_scalars(tmp_path, r"loss/validation_step/.+") == {}
    assert read_scalars(tmp_path, "loss") == {}  # a whole-name match, not a prefix
    (tmp_path / "empty").mkdir()
    assert read_scalars(tmp_path / "empty", "loss/train_step") == {}  # a folder with no event file yet
    with pytest.raises(FileNotFoundError, match="no such folder"):
        read_scalars(tmp_path / "nowhere", "loss")
    with pytest.raises(ValueError, match="not a regular expression"):
        read_scalars(tmp_path, "loss/(")


def test_without_tensorboard_the_error_names_the_install_and_other_logs_still_read(tmp_path):
    writer = SummaryWriter(str(tmp_path / "output" / "tensorboard" / "run"))
    writer.add_scalar("loss/validation_step/total_average", 0.5, 1)
    writer.close()
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "training_metrics.jsonl").write_text(simpletuner_metrics_line(10, {"loss/val/eval": 0.25}))
    # tensorboard made unimportable in a fresh interpreter (None in sys.modules stops its import)
    script = (
        "import sys; sys.modules['tensorboard'] = None\n"
        "from lora_monitor.trainer_logs import validation_loss\n"
        "print('torch' in sys.modules)\n"
        f"print(validation_loss({str(tmp_path / 'st')!r}, 'simpletuner'))\n"
        f"validation_loss({str(tmp_path / 'output')!r}, 'onetrainer')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert result.stdout.split() == ["False", "{10:", "0.25}"]  # no torch imported; SimpleTuner's own file read
    assert "ImportError: reading TensorBoard event files needs the tensorboard package" in result.stderr
    assert "pip install tensorboard" in result.stderr
