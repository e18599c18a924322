"""WandbListener with real wandb in offline mode, read back from what it wrote to disk; and the kohya launcher's
W&B logging, with the fake sd-scripts checkout (kohya_fake.py) logging to W&B as kohya does.

The offline run's transaction log (run-<id>.wandb: a leveldb-style log of wandb protobuf Records)
holds the config, history rows, summary updates, metric definitions and artifact records; the
run's files/media folder holds the images and table JSON; artifact files are staged under
WANDB_DATA_DIR.
"""
from __future__ import annotations

import json
import struct
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import nudge_lora
from kohya_fake import write_fake_checkout
from PIL import Image

from lora_monitor.cli import main
from lora_monitor.export import read_sidecar
from lora_monitor.monitor import LoraMonitor
from lora_monitor.record import read_scores

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402

from lora_monitor.integrations.trackers import TrackersListener  # noqa: E402
from lora_monitor.integrations.wandb_logger import WandbListener  # noqa: E402

SECRET = "lmtestsecret0123456789abcdef0123456789ab"  # a fake API key that must appear nowhere


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    """Offline W&B with every folder in tmp_path; finishes any run a test leaves open."""
    folders = {}
    for name in ("WANDB_DIR", "WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):
        folders[name] = tmp_path / name.lower()
        folders[name].mkdir()
        monkeypatch.setenv(name, str(folders[name]))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    yield folders
    if wandb.run is not None:
        wandb.run.finish()
    wandb.teardown()  # the next test's wandb.init reads its own WANDB_* folders


def close_wandb() -> None:
    """Shut the wandb service down: only then is the offline run's log complete on disk (measured:
    right after run.finish() the .wandb file can still be empty), and the settings singleton resets."""
    wandb.teardown()


def read_records(path: Path) -> list:
    """The protobuf Records of a .wandb file: a 7-byte header (':W&B', magic, version), then
    leveldb log records (crc32c, length, type FULL/FIRST/MIDDLE/LAST) in 32 KiB blocks."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if kind == 0:  # zero padding up to the end of the block
            position += left
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


class OfflineRun:
    """What one finished offline run left on disk."""

    def __init__(self, wandb_dir: Path) -> None:
        runs = sorted((wandb_dir / "wandb").glob("offline-run-*"))
        assert len(runs) == 1, f"expected one offline run, found {runs}"
        self.folder = runs[0]
        log = next(self.folder.glob("run-*.wandb"))
        deadline = time.monotonic() + 30
        while True:
            self.records = read_records(log)
            if (self.records and self.records[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert self.records[-1].WhichOneof("record_type") == "exit", f"{log} has no exit record: the run did not finish"

    def of(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def history(self) -> list[dict]:
        rows = []
        for history in self.of("history"):
            row: dict = {}
            for item in history.item:
                key = item.key or item.nested_key[0]
                if item.key or len(item.nested_key) == 1:
                    row[key] = json.loads(item.value_json)
                else:
                    row.setdefault(key, {})[item.nested_key[1]] = json.loads(item.value_json)
            rows.append(row)
        return rows

    @property
    def summary(self) -> dict:
        merged: dict = {}
        for summary in self.of("summary"):
            for item in summary.update:
                if item.key:
                    merged[item.key] = json.loads(item.value_json)
        return merged

    @property
    def config(self) -> dict:
        merged = {}
        for config in [self.of("run")[0].config, *self.of("config")]:  # at init, then each config.update
            merged.update({item.key: json.loads(item.value_json) for item in config.update})
        return merged

    def artifacts(self, type_: str) -> list:
        return [a for a in self.of("artifact") if a.type == type_]


def make_monitor(pipe, spec, output_dir, **kwargs) -> LoraMonitor:
    options = dict(metrics=("ssim",), metric="ssim", spec=spec, output_dir=output_dir)
    options.update(kwargs)
    return LoraMonitor.from_pipeline(pipe, **options)


def zero_lora(unet: torch.nn.Module) -> None:
    """LoRA B = 0: the adapter is a no-op, so the previews equal the base and SSIM is at its best."""
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.zero_()


def test_offline_run_holds_images_table_summary_and_best_artifacts(pipeline, small_spec, tmp_path, wandb_env):
    listener = WandbListener(project="lm-test", name="offline")
    monitor = make_monitor(pipeline, small_spec, tmp_path / "out", patience=1, listeners=[listener])
    nudge_lora(pipeline.unet, seed=1)
    first = monitor.on_epoch_end(1, step=10)  # first best
    zero_lora(pipeline.unet)
    second = monitor.on_epoch_end(2, step=20)  # better: equals the base
    nudge_lora(pipeline.unet, seed=3)
    third = monitor.on_epoch_end(3, step=30)  # worse: patience 1 runs out
    assert first.is_best and second.is_best and not third.is_best and third.should_stop
    assert listener.owns_run and listener.errors == []
    listener.finish()
    close_wandb()
    run = OfflineRun(wandb_env["WANDB_DIR"])

    # config: the monitor's settings
    config = run.config["lora_monitor"]
    assert config["spec_fingerprint"] == small_spec.fingerprint()
    assert config["policy"]["metric"] == "ssim" and config["policy"]["patience"] == 1
    assert [p["prompt"] for p in config["prompts"]] == ["a red circle", "a blue square"]

    # scalars against monitor/epoch
    metrics = run.of("metric")
    assert any(m.glob_name == "monitor/*" and m.step_metric == "monitor/epoch" for m in metrics)
    rows = [row for row in run.history if "monitor/epoch" in row]
    assert [row["monitor/epoch"] for row in rows] == [1, 2, 3]
    for row, report in zip(rows, (first, second, third)):
        assert row["monitor/ssim_mean"] == pytest.approx(report.aggregates["ssim"])
        assert row["monitor/ssim/prompt_01"] == pytest.approx(report.scores["ssim"][1])
        assert row["monitor/previews"]["count"] == 2
    assert [("monitor/base" in row) for row in rows] == [True, False, False]
    assert rows[0]["monitor/contact_sheet"]["width"] < rows[2]["monitor/contact_sheet"]["width"]  # a column per epoch

    # images and tables on disk
    media = run.folder / "files" / "media"
    previews = sorted((media / "images" / "monitor").glob("previews_*.png"))
    assert len(previews) == 6 and Image.open(previews[0]).size == (64, 64)
    sheets = sorted((media / "images" / "monitor").glob("contact_sheet_*.png"), key=lambda p: p.stat().st_mtime)
    assert len(sheets) == 3
    assert len(list((media / "table" / "monitor").glob("table_*.table.json"))) == 3
    tables = run.artifacts("run_table")  # offline, the full table (with image references) is staged as an artifact
    assert len(tables) == 3
    staged = {entry.path: Path(entry.local_path) for entry in tables[-1].manifest.contents}
    table = json.loads(staged["monitor/table.table.json"].read_text())
    assert table["columns"] == ["epoch", "index", "prompt", "seed", "preview", "base", "ssim"]
    assert [row[:4] for row in table["data"]] == [[3, 0, "a red circle", 7], [3, 1, "a blue square", 8]]
    assert [row[6] for row in table["data"]] == pytest.approx(third.scores["ssim"])
    for row in table["data"]:
        for cell in (row[4], row[5]):  # preview and base
            assert cell["_type"] == "image-file" and staged[cell["path"]].is_file()

    # summary
    summary = run.summary
    assert summary["monitor/best_epoch"] == 2
    assert summary["monitor/best_ssim"] == pytest.approx(second.aggregates["ssim"])
    assert summary["monitor/stop_epoch"] == 3
    assert summary["monitor/stop_reason"].startswith("Stopping at epoch 3")

    # best checkpoint artifacts: one per new best, never for epoch 3
    artifacts = run.artifacts("model")
    assert [sorted(a.aliases) for a in artifacts] == [["best", "epoch-1", "latest"], ["best", "epoch-2", "latest"]]
    metadata = json.loads(artifacts[1].metadata)
    assert metadata["epoch"] == 2 and metadata["spec_fingerprint"] == small_spec.fingerprint()
    assert metadata["policy"]["metric"] == "ssim" and metadata["scores"]["ssim"] == second.scores["ssim"]
    files = {entry.path: Path(entry.local_path) for entry in artifacts[1].manifest.contents}
    assert "pytorch_lora_weights.safetensors" in files
    staged = files["pytorch_lora_weights.safetensors"]
    assert staged.is_relative_to(wandb_env["WANDB_DATA_DIR"]) and staged.is_file()
    assert staged.read_bytes() == (tmp_path / "out" / "best" / "pytorch_lora_weights.safetensors").read_bytes()

    # the local record is the monitor's, complete, and no API key was written anywhere
    assert [line["epoch"] for line in read_scores(tmp_path / "out")] == [1, 2, 3]
    leaked = [path for path in tmp_path.rglob("*") if path.is_file() and SECRET.encode() in path.read_bytes()]
    assert leaked == []


def test_a_step_based_monitor_is_keyed_by_step_in_the_offline_run(pipeline, small_spec, tmp_path, wandb_env):
    listener = WandbListener(project="lm-test", name="offline-steps")
    monitor = make_monitor(pipeline, small_spec, tmp_path / "out", every_n_steps=2, patience=1, listeners=[listener])
    nudge_lora(pipeline.unet, seed=1)
    first = monitor.on_step_end(2)  # first best
    assert monitor.on_step_end(3) is None  # not due
    zero_lora(pipeline.unet)
    second = monitor.on_step_end(4)  # better: equals the base
    nudge_lora(pipeline.unet, seed=3)
    third = monitor.on_step_end(6)  # worse: patience 1 runs out
    assert first.is_best and second.is_best and not third.is_best and third.should_stop
    assert [r.label for r in (first, second, third)] == ["step 2", "step 4", "step 6"]
    assert listener.errors == []
    listener.finish()
    close_wandb()
    run = OfflineRun(wandb_env["WANDB_DIR"])

    config = run.config["lora_monitor"]
    assert config["unit"] == "step" and config["every_n_steps"] == 2 and config["policy"]["unit"] == "step"

    # scalars against monitor/step; no epoch keys anywhere
    metrics = run.of("metric")
    assert any(m.glob_name == "monitor/*" and m.step_metric == "monitor/step" for m in metrics)
    assert not any(m.step_metric == "monitor/epoch" or m.name == "monitor/epoch" for m in metrics)
    rows = [row for row in run.history if "monitor/ssim_mean" in row]
    assert [row["monitor/step"] for row in rows] == [2, 4, 6]
    assert [row["monitor/best_step"] for row in rows] == [2, 4, 4]
    assert not any(key.endswith("epoch") for row in rows for key in row)

    # the table's first column is the step; the contact sheet's columns are steps
    tables = run.artifacts("run_table")
    staged = {entry.path: Path(entry.local_path) for entry in tables[-1].manifest.contents}
    table = json.loads(staged["monitor/table.table.json"].read_text())
    assert table["columns"] == ["step", "index", "prompt", "seed", "preview", "base", "ssim"]
    assert [row[:2] for row in table["data"]] == [[6, 0], [6, 1]]
    assert listener.sheet.columns == ["base", "step 2", "step 4", "step 6"]

    # captions and the contact sheet's caption say "step N" (the previews' captions are in the run's media JSON)
    row = rows[2]
    assert row["monitor/contact_sheet"]["caption"] == "rows: prompts; columns: base, step 2, step 4, step 6"
    assert row["monitor/previews"]["captions"][0].startswith("a red circle | seed 7 | step 6 | ssim ")

    # summary keyed by step
    summary = run.summary
    assert summary["monitor/best_step"] == 4 and summary["monitor/stop_step"] == 6
    assert "monitor/best_epoch" not in summary and "monitor/stop_epoch" not in summary
    assert summary["monitor/stop_reason"].startswith("Stopping at step 6")

    # best checkpoint artifacts aliased by step
    artifacts = run.artifacts("model")
    assert [sorted(a.aliases) for a in artifacts] == [["best", "latest", "step-2"], ["best", "latest", "step-4"]]
    metadata = json.loads(artifacts[1].metadata)
    assert metadata["unit"] == "step" and metadata["epoch"] == 4 and metadata["step"] == 4

    lines = read_scores(tmp_path / "out")
    assert [(line["unit"], line["epoch"]) for line in lines] == [("step", 2), ("step", 4), ("step", 6)]


def test_logs_into_accelerates_wandb_run_and_trackers_listener_does_not_repeat_it(pipeline, small_spec, tmp_path, wandb_env):
    from accelerate import Accelerator

    accelerator = Accelerator(log_with="wandb")
    accelerator.init_trackers("lm-accelerate")
    user_run = accelerator.get_tracker("wandb", unwrap=True)
    listener = WandbListener(upload_checkpoints=False)
    monitor = make_monitor(pipeline, small_spec, tmp_path / "out", listeners=[listener, TrackersListener()]).attach(accelerator)
    for epoch in (1, 2):
        nudge_lora(pipeline.unet, seed=epoch)
        monitor.on_epoch_end(epoch, step=epoch * 5)
    assert listener.run is user_run and not listener.owns_run
    monitor.close()  # epoch 2's row waits for a row of its own (nobody logged since epoch 1's): committed now
    accelerator.end_training()
    close_wandb()
    run = OfflineRun(wandb_env["WANDB_DIR"])  # one run: the listener started none
    assert run.config["lora_monitor"]["metrics"] == ["ssim"]
    rows = [row for row in run.history if "monitor/ssim_mean" in row]
    assert [row["monitor/epoch"] for row in rows] == [1, 2]  # once per epoch: TrackersListener left W&B alone
    assert run.artifacts("model") == []  # uploads off
    assert run.summary["monitor/best_epoch"] == 1


def test_the_monitor_never_moves_the_step_past_the_users_so_none_of_their_rows_is_dropped(pipeline, small_spec, tmp_path, wandb_env):
    """A user logging with step=global_step (as accelerator.log does) before and after the monitor's evaluation at
    that step: every user value lands, each evaluation's scalars too. Two evaluations with no user log between:
    the second waits for the next row instead of committing the user's, so their later log at that step lands too;
    what still waits at the end is committed by monitor.close()."""
    run = wandb.init(project="lm-test")
    listener = WandbListener(upload_checkpoints=False)
    monitor = make_monitor(pipeline, small_spec, tmp_path / "out", listeners=[listener])
    reports = []
    for epoch, step in ((1, 10), (2, 20)):
        run.log({"loss": epoch / 10}, step=step)
        nudge_lora(pipeline.unet, seed=epoch)
        reports.append(monitor.on_epoch_end(epoch, step=step))
        run.log({"lr": step / 1000}, step=step)  # the user's own log at the same step, after the monitor's
    for epoch in (3, 4):  # the monitor alone, twice at step 20: its rows must not overwrite each other
        nudge_lora(pipeline.unet, seed=epoch)
        reports.append(monitor.on_epoch_end(epoch, step=20))
    run.log({"grad_norm": 2.0}, step=20)  # ... nor push the step past the user's next log at 20
    run.log({"loss": 0.3}, step=30)
    nudge_lora(pipeline.unet, seed=5)
    reports.append(monitor.on_epoch_end(5, step=30))
    run.log({"lr": 0.03}, step=30)
    monitor.close()  # before the run ends, as the README's loop does
    assert listener.errors == [] and not listener.owns_run
    run.finish()
    close_wandb()
    history = OfflineRun(wandb_env["WANDB_DIR"]).history

    user = {row["_step"]: {key: row[key] for key in ("loss", "lr", "grad_norm") if key in row} for row in history
            if {"loss", "lr", "grad_norm"} & set(row)}
    assert user == {10: {"loss": pytest.approx(0.1), "lr": pytest.approx(0.01)},
                    20: {"loss": pytest.approx(0.2), "lr": pytest.approx(0.02), "grad_norm": 2.0},
                    30: {"loss": pytest.approx(0.3), "lr": pytest.approx(0.03)}}
    ours = sorted((row for row in history if "monitor/epoch" in row), key=lambda row: row["monitor/epoch"])
    assert [row["monitor/epoch"] for row in ours] == [1, 2, 3, 4, 5]
    for row, report in zip(ours, reports):
        assert row["monitor/ssim_mean"] == pytest.approx(report.aggregates["ssim"])
    steps = [row["_step"] for row in ours]
    assert steps[:3] == [10, 20, 30]  # epoch 3 waited for the user's next row (30)
    assert len(set(steps)) == 5 and all(step > 30 for step in steps[3:])  # 4 and 5: committed by close(), a row each


def test_a_failing_log_warns_once_later_epochs_still_arrive_and_other_ranks_stay_silent(pipeline, small_spec, tmp_path, wandb_env, monkeypatch):
    run = wandb.init(project="lm-test")
    calls = {"n": 0}
    real_log = run.log

    def log_failing_once(data, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(28, "No space left on device")
        return real_log(data, *args, **kwargs)

    monkeypatch.setattr(run, "log", log_failing_once)
    listener = WandbListener()
    monitor = make_monitor(pipeline, small_spec, tmp_path / "out", listeners=[listener])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in (1, 2):
            nudge_lora(pipeline.unet, seed=epoch)
            report = monitor.on_epoch_end(epoch)
    ours = [w for w in caught if "W&B" in str(w.message)]
    assert len(ours) == 1 and "No space left on device" in str(ours[0].message)
    assert not listener.disabled and len(listener.errors) == 1

    # on any other process of a multi-process run, a listener never touches W&B
    rank_one = WandbListener()
    monitor.accelerator = SimpleNamespace(is_main_process=False, trackers=[])  # rank 1 (a fake: one process here)
    rank_one.on_base_references(monitor, report.images)
    rank_one.on_evaluation(monitor, report)
    assert rank_one.run is None and rank_one.errors == [] and calls["n"] == 2  # it did not even adopt wandb.run
    run.finish()
    close_wandb()
    rows = [row for row in OfflineRun(wandb_env["WANDB_DIR"]).history if "monitor/epoch" in row]
    assert [row["monitor/epoch"] for row in rows] == [2]
    assert len(read_scores(tmp_path / "out")) == 2


def test_wandb_init_raising_leaves_training_and_the_local_record_whole(tiny_model, small_spec, tmp_path, wandb_env, monkeypatch):
    from lora_monitor.demo import TrainConfig, train, write_synthetic_dataset

    calls = {"n": 0}

    def broken_init(*args, **kwargs):
        calls["n"] += 1
        raise wandb.errors.UsageError(f"api_key not configured (no-tty); tried key {SECRET}")

    monkeypatch.setattr(wandb, "init", broken_init)
    listener = WandbListener(project="lm-test")
    data = write_synthetic_dataset(tmp_path / "data", count=4)
    config = TrainConfig(
        pretrained=tiny_model, train_data_dir=str(data), output_dir=str(tmp_path / "run"), epochs=2, batch_size=2,
        monitor={"metrics": ("ssim",), "metric": "ssim", "spec": small_spec, "listeners": [listener]},
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(config)
    about_wandb = [w for w in caught if "W&B" in str(w.message) or "Wandb" in str(w.message)]
    assert len(about_wandb) == 1, [str(w.message) for w in about_wandb]
    message = str(about_wandb[0].message)
    assert "api_key not configured" in message and SECRET not in message
    assert calls["n"] == 1 and listener.disabled
    record = tmp_path / "run" / "monitor"
    lines = read_scores(record)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert all((record / path).is_file() for line in lines for path in line["previews"])
    assert (record / "best" / "pytorch_lora_weights.safetensors").is_file()
    assert result["monitor"].policy.history[-1].epoch == 2


def test_bad_settings_fail_at_construction():
    with pytest.raises(ValueError, match="namespace"):
        WandbListener(namespace="/monitor")
    with pytest.raises(ValueError, match="artifact_name"):
        WandbListener(artifact_name="best lora")


# ---------------------------------------------------------------------------------------- the kohya launcher
def test_the_kohya_launcher_gets_scores_previews_table_summary_and_best_artifact_into_kohyas_run(tiny_model, tmp_path, wandb_env):
    """`--log_with wandb`: kohya (the fake, in kohya's order) logs each step and epoch end to its W&B run with no step (each
    log a new row), its samples with commit=False and `{}` at step 0. Every epoch's scores, previews and table reach that
    run (logged at the step kohya's rows are at, none dropped), with the summary and the best checkpoint artifact;
    the launcher's base render (network multiplier 0) is not logged as kohya's sample_<i>."""
    checkout = write_fake_checkout(tmp_path / "sd-scripts", scripts=())
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 11\na blue square --w 64 --h 64 --s 2 --d 12\n", encoding="utf-8")
    out = tmp_path / "out"
    argv = ["kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", "--patience", "1", "--",
            "--pretrained_model_name_or_path", tiny_model, "--output_dir", str(out), "--output_name", "mylora",
            "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1", "--max_train_epochs", "4",
            "--fake_schedule", "0.05,0.5,1.0,1.0", "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--log_with", "wandb"]
    assert main(argv) == 0
    close_wandb()
    run = OfflineRun(wandb_env["WANDB_DIR"])  # one run: kohya's
    lines = read_scores(out)
    assert [line["epoch"] for line in lines] == [1, 2] and lines[-1]["should_stop"]

    history = run.history
    kohya_steps = [row for row in history if "loss/current" in row]
    assert [row["global_step"] for row in kohya_steps] == [1, 2, 3, 4]  # kohya's own rows all landed
    ours = [row for row in history if "monitor/epoch" in row]
    assert [row["monitor/epoch"] for row in ours] == [1, 2]
    for row, line in zip(ours, lines):
        assert row["monitor/ssim_mean"] == pytest.approx(line["aggregates"]["ssim"])
        assert row["monitor/previews"]["count"] == 2 and "monitor/contact_sheet" in row
    assert "monitor/base" in ours[0] and "monitor/base" not in ours[1]
    # kohya's samples of each epoch share the row with its scores; the base render logged no sample_<i>
    assert [row["_step"] for row in history if "sample_0" in row] == [row["_step"] for row in ours]
    assert all("sample_1" in row for row in ours)
    assert any(m.glob_name == "monitor/*" and m.step_metric == "monitor/epoch" for m in run.of("metric"))
    assert len(run.artifacts("run_table")) == 2
    assert run.config["lora_monitor"]["metrics"] == ["ssim"]

    summary = run.summary
    assert summary["monitor/best_epoch"] == 1 and summary["monitor/stop_epoch"] == 2
    assert summary["monitor/stop_reason"].startswith("Stopping at epoch 2")
    artifacts = run.artifacts("model")
    assert [sorted(a.aliases) for a in artifacts] == [["best", "epoch-1", "latest"]]
    files = {entry.path: Path(entry.local_path) for entry in artifacts[0].manifest.contents}
    assert files["mylora-000001.safetensors"].read_bytes() == (out / "best" / "mylora-000001.safetensors").read_bytes()
    assert json.loads(artifacts[0].metadata)["epoch"] == read_sidecar(out / "best")["epoch"] == 1
