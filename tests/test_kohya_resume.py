"""sd-scripts' --save_state and --resume under the kohya launcher (issue 12), with the fake checkout (kohya_fake.py),
which saves and loads accelerate states in kohya's order: load_state before the first sample point, an epoch end's
state saved before that epoch's samples, the train end's after the last samples.

A monitored run must leave states that the launcher and plain sd-scripts both resume, and a resumed run must end as
the uninterrupted one: same scores per epoch, best epoch, best/ weights and stop, with scores.jsonl reading each epoch
once. Each run of the fake takes a few seconds; the uninterrupted run is made once for the module.
"""
from __future__ import annotations

import contextlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kohya_fake import write_fake_checkout
from lora_monitor.cli import main
from lora_monitor.export import read_sidecar
from lora_monitor.integrations import kohya
from lora_monitor.record import SCORES_FILE, read_scores

#: SSIM to the base falls with the LoRA's size: epoch 3 is the best, 4 and 5 do not improve, patience 2 stops after 5 of 6.
SCHEDULE = "1.0,0.5,0.05,0.5,1.0,1.0"
EPOCHS = 6


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return write_fake_checkout(tmp_path_factory.mktemp("sd-scripts"), scripts=())


def write_prompts(folder: Path, seeds: tuple[int, int] = (11, 12)) -> Path:
    path = folder / "prompts.txt"
    path.write_text(f"a red circle --w 64 --h 64 --s 2 --d {seeds[0]}\na blue square --w 64 --h 64 --s 2 --d {seeds[1]}\n", encoding="utf-8")
    return path


def trainer_args(model: str, prompts: Path, out: Path, epochs: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--output_dir", str(out), "--output_name", "mylora", "--sample_prompts", str(prompts),
            "--sample_every_n_epochs", "1", "--save_every_n_epochs", "1", "--save_state", "--fake_schedule", SCHEDULE,
            "--max_train_epochs", str(epochs), *extra]


def launch(checkout: Path, model: str, prompts: Path, out: Path, epochs: int, *extra: str) -> int:
    return main(["kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", "--patience", "2", "--",
                 *trainer_args(model, prompts, out, epochs, *extra)])


def saved_state(folder: Path) -> dict:
    return json.loads((folder / kohya.STATE_FILE).read_text())


def fake_events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "fake_events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(checkout, tiny_model, tmp_path_factory) -> Path:
    """The run without interruption: scored epochs 1-5, best 3, stopped after 5."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    out = folder / "out"
    assert launch(checkout, tiny_model, write_prompts(folder), out, EPOCHS) == 0
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    """`out` ended as the uninterrupted `reference`: the same scores per epoch (read once each), best, best/ weights, stop."""
    lines, expected = read_scores(out), read_scores(reference)
    assert [line["epoch"] for line in lines] == [line["epoch"] for line in expected] == [1, 2, 3, 4, 5]
    for line, reference_line in zip(lines, expected):
        assert line["aggregates"]["ssim"] == pytest.approx(reference_line["aggregates"]["ssim"], abs=1e-6)
        assert (line["is_best"], line["best_epoch"], line["should_stop"]) == (reference_line["is_best"], reference_line["best_epoch"],
                                                                            reference_line["should_stop"])
    policy = json.loads((out / kohya.LAUNCHER_STATE).read_text())["policy"]
    assert (policy["best_epoch"], policy["stopped_epoch"], policy["wait_count"]) == (3, 5, 2)
    assert [entry["epoch"] for entry in policy["history"]] == [1, 2, 3, 4, 5]
    sidecar, reference_sidecar = read_sidecar(out / "best"), read_sidecar(reference / "best")
    assert sidecar["epoch"] == reference_sidecar["epoch"] == 3 and "note" not in sidecar
    assert sidecar["scores"]["ssim"] == pytest.approx(reference_sidecar["scores"]["ssim"], abs=1e-6)
    assert sorted(p.name for p in (out / "best").iterdir()) == sorted(p.name for p in (reference / "best").iterdir())
    weights, reference_weights = load_file(out / "best" / "mylora-000003.safetensors"), load_file(reference / "best" / "mylora-000003.safetensors")
    assert weights.keys() == reference_weights.keys() and all(torch.equal(weights[k], reference_weights[k]) for k in weights)


def test_the_uninterrupted_run_leaves_states_that_hold_each_epochs_evaluation(uninterrupted):
    """Each epoch end's state was saved before that epoch's samples; once they were scored its monitor state holds them.
    Nothing is registered with accelerate: no custom checkpoint in any state folder."""
    states = sorted(uninterrupted.glob("mylora-*-state"))
    assert [p.name for p in states] == [f"mylora-{epoch:06d}-state" for epoch in range(1, 6)]
    for epoch, folder in enumerate(states, start=1):
        saved = saved_state(folder)
        assert saved["owes"] is None
        assert [entry["epoch"] for entry in saved["monitor"]["policy"]["history"]] == list(range(1, epoch + 1))
        assert not list(folder.glob("custom_checkpoint_*"))


@pytest.mark.parametrize("interruption", ["train end", "stopped while sampling", "older state", "a step's state"])
def test_a_resumed_run_ends_as_the_uninterrupted_one(checkout, tiny_model, uninterrupted, tmp_path, capsys, interruption):
    """train end: 2 epochs, then --resume <name>-state with 6. stopped while sampling: the run fails at epoch 4's end after
    its state was saved, before its samples; the resumed run has kohya render epoch 4 again from the loaded weights and
    scores it first (the patience carried: the stop comes after 5). older state: a whole run, then --resume of epoch 2's
    state: the monitor continues from that state's history (not the newest), best/ and scores.jsonl follow it. a step's
    state: --save_every_n_steps 3 saves mid-epoch 2 (before it is scored; kohya trains epoch 2 again from there) and at
    epoch 3's last step (before epoch 3's samples: its state holds epoch 3 once scored); resumed from the first."""
    prompts, out = write_prompts(tmp_path), tmp_path / "out"
    if interruption == "train end":
        assert launch(checkout, tiny_model, prompts, out, 2) == 0
        state = out / "mylora-state"
    elif interruption == "stopped while sampling":
        assert launch(checkout, tiny_model, prompts, out, EPOCHS, "--fake_fail_at_epoch", "4") == 1
        state = out / "mylora-000004-state"
        saved = saved_state(state)
        assert saved["owes"] == {"epoch": 4, "step": 8}  # kohya's global step at epoch 4's sample point
        assert [entry["epoch"] for entry in saved["monitor"]["policy"]["history"]] == [1, 2, 3]
    elif interruption == "older state":
        assert launch(checkout, tiny_model, prompts, out, EPOCHS) == 0
        state = out / "mylora-000002-state"
    else:
        assert launch(checkout, tiny_model, prompts, out, 3, "--save_every_n_steps", "3") == 0
        history = {step: [entry["epoch"] for entry in saved_state(out / f"mylora-step{step:08d}-state")["monitor"]["policy"]["history"]]
                   for step in (3, 6)}
        assert history == {3: [1], 6: [1, 2, 3]}
        state = out / "mylora-step00000003-state"
    capsys.readouterr()
    # resumed from before epoch 3 was scored: best/ holds epoch 3 of the run resumed from, said until epoch 3 is scored again
    abandoned = interruption in ("older state", "a step's state")
    with pytest.warns(RuntimeWarning, match="best/ holds epoch 3, evaluated after the checkpoint") if abandoned else contextlib.nullcontext():
        assert launch(checkout, tiny_model, prompts, out, EPOCHS, "--resume", str(state)) == 0
    said = capsys.readouterr().out
    assert f"resumed the monitor's state saved with {state.name}" in said
    assert "stopped early after epoch 5" in said
    assert {"event": "load_state", "folder": state.name} in fake_events(out)
    assert_same_run(out, uninterrupted)
    raw = [json.loads(line)["epoch"] for line in (out / SCORES_FILE).read_text().splitlines()]
    if interruption == "older state":
        assert raw == [1, 2, 3, 4, 5, 3, 4, 5]  # appended; read_scores reads the resumed history, each epoch once
    elif interruption == "a step's state":
        assert raw == [1, 2, 3, 2, 3, 4, 5]
    else:
        assert raw == [1, 2, 3, 4, 5]
    if interruption == "stopped while sampling":
        assert "mylora-000004-state was saved at the end of epoch 4, before its samples were scored" in said
        assert saved_state(state)["owes"] is None  # epoch 4 is in it now: a second resume from it needs no catch-up
        assert [entry["epoch"] for entry in saved_state(state)["monitor"]["policy"]["history"]] == [1, 2, 3, 4]


def test_a_monitored_state_loads_in_plain_sd_scripts(checkout, tiny_model, tmp_path, capsys):
    """A state saved by a monitored run resumes in sd-scripts run without the launcher: nothing was registered for
    checkpointing. (The state plain sd-scripts saves after that resume counts its steps from the resume, as kohya does:
    resuming it sends kohya back to an epoch the monitor has scored, which the launcher says in those words.)"""
    prompts, out = write_prompts(tmp_path), tmp_path / "out"
    assert launch(checkout, tiny_model, prompts, out, 2) == 0
    plain = subprocess.run([sys.executable, str(checkout / "train_network.py"),
                            *trainer_args(tiny_model, out / "lora_monitor_prompts.txt", out, 3, "--resume", str(out / "mylora-state"))],
                           cwd=checkout, capture_output=True, text=True, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert {"event": "load_state", "folder": "mylora-state"} in fake_events(out)
    samples = [json.loads(line) for line in (out / "fake_samples.jsonl").read_text().splitlines()]
    assert [(record["epoch"], record["steps"]) for record in samples[-2:]] == [(3, 2), (3, 2)]  # epoch 3, its steps counted from 0
    capsys.readouterr()
    assert launch(checkout, tiny_model, prompts, out, 4, "--resume", str(out / "mylora-state")) == 1
    assert (f"kohya is at epoch 2, but the monitor has scored epochs up to 2 (its state came with {out / 'mylora-state'}). A state "
            "saved after a --resume does this: kohya counts a resumed start's steps from 0") in capsys.readouterr().err


@pytest.mark.parametrize("case", ["other prompts", "registered by an earlier lora-monitor", "not a state"])
def test_a_state_that_cannot_be_continued_is_refused_before_training(checkout, tiny_model, tmp_path, capsys, case):
    prompts, out = write_prompts(tmp_path), tmp_path / "out"
    assert launch(checkout, tiny_model, prompts, out, 1) == 0
    state = out / "mylora-state"
    if case == "other prompts":
        prompts = write_prompts(tmp_path, seeds=(5, 6))
        message = f"{state / kohya.STATE_FILE} (epochs [1] scored) cannot be continued: the saved monitor state belongs to preview spec"
    elif case == "registered by an earlier lora-monitor":
        (state / kohya.STATE_FILE).unlink()
        with open(state / "custom_checkpoint_0.pkl", "wb") as file:
            pickle.dump({"version": 1}, file)
        message = (f"{state} holds custom_checkpoint_0.pkl: an object registered for checkpointing by an earlier lora-monitor, which "
                   f"sd-scripts cannot load (it registers none). Move custom_checkpoint_0.pkl out of the folder")
    else:
        (state / kohya.STATE_FILE).write_text(json.dumps({"format": kohya.STATE_FILE, "monitor": {}}))
        message = f"{state / kohya.STATE_FILE}: not a lora-monitor state (ValueError: format"
    samples = sorted((out / "sample").iterdir())
    assert launch(checkout, tiny_model, prompts, out, 2, "--resume", str(state)) == 2
    assert message in capsys.readouterr().err
    assert sorted((out / "sample").iterdir()) == samples  # refused before kohya loaded a model or sampled
