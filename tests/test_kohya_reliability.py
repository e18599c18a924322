"""The kohya watcher and launcher when things go wrong (issue 12): hostile or damaged files, two processes on
one folder, samples that never decode, leftovers of a failed start, errors inside kohya's training.

Each test drives the real command (lora_monitor.cli.main) and checks what a user sees: the message, the exit
code, and that best/ (its sidecar and weights), scores.jsonl and the policy's saved state agree afterwards.
The watcher's samples come from test_kohya_watch's renders (our tiny pipeline); the launcher runs the fake
sd-scripts checkout (kohya_fake.py).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kohya_fake import write_fake_checkout
from lora_monitor.cli import main
from lora_monitor.export import read_sidecar
from lora_monitor.integrations import kohya, kohya_samples
from lora_monitor.integrations.kohya_watch import MISSING_NOTE, STATE_FILE, STOP_FILE, KohyaWatcher
from lora_monitor.kohya_names import LOCK_FILE, FolderLock
from lora_monitor.record import read_image, read_scores
from test_kohya_watch import SEEDS, STAMP, render_epochs, run_dir, write_network, write_samples


# ---------------------------------------------------------------------------------------- helpers
def watch(out: Path, prompts: Path | None, *extra: str) -> int:
    argv = ["watch", str(out), "--metrics", "ssim", "--once", "--interval", "0.05", *extra]
    return main(argv + (["--prompts", str(prompts)] if prompts else []))


def sample_path(out: Path, epoch: int, index: int) -> Path:
    return out / "sample" / f"mylora_e{epoch:06d}_{index:02d}_{STAMP}_{SEEDS[index]}.png"


def assert_agree(out: Path, policy: dict, *, weights: str | None) -> None:
    """best/'s sidecar, its weights (`weights`: the file it holds; None: the missing-checkpoint note), scores.jsonl
    and the saved policy name the same best epoch, and the scores file has one line per evaluation of the policy."""
    lines = read_scores(out)
    assert [line["epoch"] for line in lines] == [entry["epoch"] for entry in policy["history"]]
    best = policy["best_epoch"]
    assert lines[-1]["best_epoch"] == best and [line["epoch"] for line in lines if line["is_best"]][-1] == best
    assert read_sidecar(out / "best")["epoch"] == best
    held = sorted(p.name for p in (out / "best").iterdir())
    assert held == sorted(["lora_monitor.json", weights if weights is not None else MISSING_NOTE])


def watcher_policy(out: Path) -> dict:
    return json.loads((out / STATE_FILE).read_text())["monitor"]["policy"]


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture(scope="module")
def renders(tiny_model) -> dict[int, list[bytes]]:
    """PNG bytes per epoch, as test_kohya_watch renders them: 0 = base (LoRA off), 1 closest to it, 3 farthest."""
    return render_epochs(tiny_model)


@pytest.fixture
def run(renders, tmp_path):
    """A watcher's output folder with epoch 0 (the base) and epoch 1 written; (out, prompts)."""
    out, prompts = run_dir(tmp_path)
    write_samples(out, 0, renders[0])
    write_samples(out, 1, renders[1])
    return out, prompts


# ---------------------------------------------------------------------------------------- 1. network files
def test_a_checkpoint_linked_from_outside_the_folder_is_refused_and_the_real_file_is_copied_later(run, tmp_path, capsys):
    out, prompts = run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    write_network(elsewhere / "secret.safetensors", 99)
    link = out / "mylora-000001.safetensors"
    link.symlink_to(elsewhere / "secret.safetensors")
    assert watch(out, prompts) == 0
    said = capsys.readouterr().out
    assert f"not copied: network file {link} (a symbolic link) leads to {elsewhere / 'secret.safetensors'}, outside" in said
    assert_agree(out, watcher_policy(out), weights=None)  # best is epoch 1, noted as missing, nothing from outside
    assert "Not copied: network file" in (out / "best" / MISSING_NOTE).read_text()
    link.unlink()
    write_network(link, 1)
    assert watch(out, prompts) == 0
    assert "the best epoch 1's network file appeared" in capsys.readouterr().out
    assert_agree(out, watcher_policy(out), weights="mylora-000001.safetensors")


@pytest.mark.parametrize("kind", ["no tensors", "pickle without the flag", "hostile pickle", "pickle with the flag"])
def test_checkpoint_contents_are_checked_before_they_are_copied(run, tmp_path, capsys, kind):
    out, prompts = run
    flags: list[str] = []
    if kind == "no tensors":
        name = "mylora-000001.safetensors"
        save_file({}, str(out / name), metadata={"ss_epoch": "1"})
        expected = "it holds no tensors"
    else:
        name = "mylora-000001.ckpt"
        if kind == "hostile pickle":
            (out / name).write_bytes(b"cos\nsystem\n(S'echo hi'\ntR.")  # unpickles into os.system("echo hi")
            flags, expected = ["--allow-pickle"], "torch.load(weights_only=True) does not read it"
        else:
            torch.save({"lora_up": torch.ones(2, 2)}, out / name)
            flags, expected = (["--allow-pickle"], None) if kind == "pickle with the flag" else ([], "only with --allow-pickle")
    assert watch(out, prompts, *flags) == 0
    said = capsys.readouterr().out
    if expected is None:
        assert "not copied" not in said
        assert_agree(out, watcher_policy(out), weights=name)
        assert torch.equal(torch.load(out / "best" / name, weights_only=True)["lora_up"], torch.ones(2, 2))
    else:
        assert f"not copied: {out / name}" in said and expected in said
        assert_agree(out, watcher_policy(out), weights=None)


# ---------------------------------------------------------------------------------------- 2. names and paths read from files
@pytest.mark.parametrize("key, value, message", [
    ("output_name", "../../victim", r"output_name\): output name '\.\./\.\./victim' is not a plain file name"),
    ("pending", "1; rm -rf", r"pending is '1; rm -rf', expected an epoch number"),
    ("skipped", ["x"], r"skipped is \['x'\], expected a list of epoch numbers"),
])
def test_values_read_from_the_state_file_are_checked(run, tmp_path, capsys, key, value, message):
    out, prompts = run
    assert watch(out, prompts) == 0
    state = json.loads((out / STATE_FILE).read_text())
    state[key] = value
    (out / STATE_FILE).write_text(json.dumps(state))
    write_samples(out, 2, [b"not a png"] * 2)
    write_network(tmp_path / "victim.safetensors", 7)
    before = (tmp_path / "victim.safetensors").read_bytes()
    capsys.readouterr()
    assert watch(out, prompts) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"lora-monitor watch: error: {out / STATE_FILE}") and __import__("re").search(message, error)
    assert (tmp_path / "victim.safetensors").read_bytes() == before  # nothing outside the folder was touched
    assert not (out / LOCK_FILE).exists()  # the failed start let go of the folder
    assert_agree(out, state["monitor"]["policy"], weights=None)


def test_an_output_name_or_a_found_prompt_file_that_leads_out_of_the_folder_is_refused(run, tmp_path, capsys):
    out, prompts = run
    assert watch(out, prompts, "--output-name", "../mylora") == 2
    assert "--output-name: output name '../mylora' is not a plain file name" in capsys.readouterr().err
    (out / "sample" / "prompt.txt").symlink_to(prompts)  # outside the output folder
    assert watch(out, None) == 2
    assert f"the prompt file {out / 'sample' / 'prompt.txt'} (a symbolic link) leads to {prompts}, outside" in capsys.readouterr().err
    assert not (out / STATE_FILE).exists() and not (out / LOCK_FILE).exists() and not (out / "best").exists()


def test_samples_linked_from_outside_the_folder_are_not_read(run, renders, tmp_path, capsys):
    out, prompts = run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "picture.png").write_bytes(renders[2][1])
    write_samples(out, 2, renders[2][:1])
    link = sample_path(out, 2, 1)
    link.symlink_to(elsewhere / "picture.png")
    assert watch(out, prompts) == 0
    said = capsys.readouterr().out
    assert f"sample {link} (a symbolic link) leads to {elsewhere / 'picture.png'}, outside" in said
    assert "--once: not scored yet epoch 2 (no sample yet for prompt(s) [1])" in said
    assert_agree(out, watcher_policy(out), weights=None)
    moved = tmp_path / "moved"  # a sample folder that is itself a link out of the output folder
    moved.mkdir()
    (moved / "sample").symlink_to(out / "sample")
    assert watch(moved, prompts) == 2
    assert f"the sample folder {moved / 'sample'} (a symbolic link) leads to {out / 'sample'}, outside {moved}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- 3. one watcher a folder
def test_a_second_watcher_exits_2_naming_the_first(run, capsys):
    out, prompts = run
    first = KohyaWatcher(out, prompts=prompts, monitor_options={"metrics": ("ssim",), "metric": "ssim"}, say=lambda message: None)
    assert watch(out, prompts) == 2
    error = capsys.readouterr().err
    assert f"is already being scored by lora-monitor watch (pid {os.getpid()} on host {socket.gethostname()}, started" in error
    assert f"if it is no longer running, delete {out / LOCK_FILE}" in error
    assert not (out / "scores.jsonl").exists()  # the second one scored nothing
    # the launcher is refused the same way, before anything is written
    checkout = write_fake_checkout(out.parent / "sd-scripts")
    argv = ["kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", "--", "--output_dir", str(out), "--output_name", "mylora",
            "--sample_prompts", str(prompts), "--pretrained_model_name_or_path", "none"]
    assert main(argv) == 2
    assert "already being scored by lora-monitor watch" in capsys.readouterr().err
    assert not (out / "lora_monitor_prompts.txt").exists()
    first.close()
    assert not (out / LOCK_FILE).exists()
    assert watch(out, prompts) == 0
    assert_agree(out, watcher_policy(out), weights=None)


@pytest.mark.parametrize("holder, code, message", [
    ("dead", 0, "replaced a stale lock"),
    ("this pid, not ours", 0, "replaced a stale lock"),
    ("other host", 2, "(it cannot be checked from here: another host)"),
    ("unreadable", 0, "it does not name a holder"),
])
def test_a_stale_lock_is_replaced_and_another_hosts_is_respected(run, capsys, holder, code, message):
    out, prompts = run
    lock = out / LOCK_FILE
    content = {"pid": dead_pid(), "host": socket.gethostname(), "command": "lora-monitor watch", "started": "yesterday", "token": "x"}
    if holder == "this pid, not ours":  # a restarted container whose watcher had the pid we have now
        content["pid"] = os.getpid()
    if holder == "other host":
        content["host"] = "another-machine"
    lock.write_text("{" if holder == "unreadable" else json.dumps(content))
    if holder == "unreadable":
        os.utime(lock, (1, 1))  # long ago: not one being written right now
    assert watch(out, prompts) == code
    captured = capsys.readouterr()
    assert message in (captured.out if code == 0 else captured.err)
    assert lock.exists() == (code == 2)  # a replaced lock is released at the end; another host's is left alone


# ---------------------------------------------------------------------------------------- 4, 5. samples that do not decode
def test_a_sample_that_never_decodes_is_named_once_and_given_up_when_the_run_is_finished(run, renders, capsys):
    out, prompts = run
    write_network(out / "mylora-000001.safetensors", 1)
    write_samples(out, 2, [renders[2][0], b"\x89PNG\r\n\x1a\n" + b"\x00" * 200])
    broken = sample_path(out, 2, 1).name
    watcher = KohyaWatcher(out, prompts=prompts, monitor_options={"metrics": ("ssim",), "metric": "ssim"})
    assert watcher.run(interval=0.05, timeout=1.0) == 0  # about 20 looks
    said = capsys.readouterr().out
    assert said.count(f"waiting for {broken} to decode: UnidentifiedImageError") == 1  # one line, not one a look
    assert "skipped" not in said
    assert watch(out, prompts) == 0
    said = capsys.readouterr().out
    assert f"--once: not scored yet epoch 2 ({broken} does not decode (UnidentifiedImageError" in said
    write_network(out / "mylora.safetensors", 2)  # kohya's final file: sampling is over
    assert watch(out, prompts) == 0
    said = capsys.readouterr().out
    assert f"epoch 2 skipped: {broken} does not decode" in said and "the run's final file mylora.safetensors is written" in said
    assert "--once: skipped epoch 2" in said and "the run is finished" in said
    assert json.loads((out / STATE_FILE).read_text())["skipped"] == [2]
    assert_agree(out, watcher_policy(out), weights="mylora-000001.safetensors")


def test_a_sample_that_is_never_written_is_named_once_and_given_up_when_the_run_is_finished(run, renders, capsys):
    out, prompts = run
    write_samples(out, 2, renders[2][:1])  # prompt 1's sample never comes (kohya was stopped while sampling)
    watcher = KohyaWatcher(out, prompts=prompts, monitor_options={"metrics": ("ssim",), "metric": "ssim"})
    assert watcher.run(interval=0.05, timeout=1.0) == 0
    assert capsys.readouterr().out.count("epoch 2: waiting for the samples of prompt(s) [1]") == 1
    write_network(out / "mylora.safetensors", 2)
    assert watch(out, prompts) == 0
    said = capsys.readouterr().out
    assert "epoch 2 skipped: no sample yet for prompt(s) [1], and the run's final file mylora.safetensors is written" in said
    assert_agree(out, watcher_policy(out), weights=None)


@pytest.mark.parametrize("error", [ValueError("cannot unpack 7 values"), Image.DecompressionBombError("too many pixels"), SyntaxError("broken PNG")])
def test_any_decoder_error_counts_as_unreadable_and_names_the_file(run, renders, monkeypatch, capsys, error):
    out, prompts = run
    write_samples(out, 2, renders[2])
    broken = sample_path(out, 2, 0)

    def read(path):
        if Path(path) == broken:
            raise error
        return read_image(path)

    monkeypatch.setattr(kohya_samples, "read_image", read)  # read_sample's decoder
    assert watch(out, prompts) == 0
    said = capsys.readouterr().out
    assert f"epoch 2: waiting for {broken.name} to decode: {type(error).__name__}: {error}" in said
    assert "not scored yet epoch 2" in said
    assert_agree(out, watcher_policy(out), weights=None)


# ---------------------------------------------------------------------------------------- 6. after a stop; leftovers
def test_epochs_after_the_stop_say_it_stopped_already(run, renders, capsys):
    out, prompts = run
    write_samples(out, 2, renders[3])  # far from the base: worse
    write_samples(out, 3, renders[2])  # worse than epoch 1 too
    assert watch(out, prompts, "--patience", "1") == 0
    said = capsys.readouterr().out
    assert "1 of 1 evaluation(s) without improvement. Stopping at epoch 2" in said
    assert "2 of 1" not in said
    line = next(text for text in said.splitlines() if text.startswith("lora-monitor watch: epoch 3:"))
    assert "not better than the best, epoch 1 (ssim " in line and line.endswith("already stopped at epoch 2 (the trainer went on past the stop)")
    assert (out / STOP_FILE).is_file()
    policy = watcher_policy(out)
    assert policy["stopped_epoch"] == 2
    assert_agree(out, policy, weights=None)


def test_a_leftover_state_that_scored_nothing_is_replaced_one_that_scored_is_kept(run, tmp_path, capsys):
    out, prompts = run
    other = tmp_path / "other.txt"
    other.write_text("a green field --w 64 --h 64 --s 2 --d 11\na blue square --w 64 --h 64 --s 2 --d 12\n")
    leftover = KohyaWatcher(out, prompts=other, monitor_options={"metrics": ("ssim",), "metric": "ssim"}, say=lambda message: None)
    leftover.output_name, leftover.name_known = "mylora", True
    leftover._save_state()  # what a start that failed before scoring left behind (older versions wrote it early)
    leftover.close()
    assert watch(out, prompts) == 0
    said = capsys.readouterr().out
    assert f"ignoring {out / STATE_FILE}, left by a start that scored nothing: the saved monitor state belongs to preview spec" in said
    assert_agree(out, watcher_policy(out), weights=None)
    assert watch(out, other) == 2  # now it holds epoch 1's scores: not thrown away for another prompt file
    error = capsys.readouterr().err
    assert f"{out / STATE_FILE} (epochs [1] scored) does not fit this start" in error and "move lora_monitor_watch.json" in error
    assert_agree(out, watcher_policy(out), weights=None)


def test_a_failed_start_leaves_no_state_and_no_lock(run, renders, capsys):
    out, prompts = run
    for index, data in enumerate(renders[1]):
        (out / "sample" / f"other_e000001_{index:02d}_{STAMP}_{SEEDS[index]}.png").write_bytes(data)
    assert watch(out, prompts) == 2
    assert "holds samples of several output names (mylora, other); choose one with --output-name" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["sample"]  # no state, no lock, no record to confuse the next start
    assert watch(out, prompts, "--output-name", "mylora") == 0
    assert_agree(out, watcher_policy(out), weights=None)


# ---------------------------------------------------------------------------------------- the launcher
@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return write_fake_checkout(tmp_path_factory.mktemp("sd-scripts"))


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle --w 64 --h 64 --s 2 --d 11\na blue square --w 64 --h 64 --s 2 --d 12\n", encoding="utf-8")
    return path


def launch(checkout: Path, model: str, prompts: Path, out: Path, *extra: str, monitor: tuple[str, ...] = ()) -> int:
    argv = ["kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", *monitor, "--",
            "--pretrained_model_name_or_path", model, "--output_dir", str(out), "--output_name", "mylora",
            "--sample_prompts", str(prompts), *extra]
    return main(argv)


def launcher_policy(out: Path) -> dict:
    return json.loads((out / kohya.LAUNCHER_STATE).read_text())["policy"]


def fake_log(folder: Path) -> list[dict]:
    path = folder / "fake_samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def test_the_sample_folder_is_read_only_at_sample_points(checkout, tiny_model, prompts_file, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    scans = []
    real = kohya.list_samples

    def counting(folder, *arguments):
        scans.append(Path(folder))
        return real(folder, *arguments)

    monkeypatch.setattr(kohya, "list_samples", counting)
    # 3 epochs of 2 steps: sample_images is called 1 + 6 + 3 times; kohya samples at the end of epoch 2 only
    assert launch(checkout, tiny_model, prompts_file, out, "--max_train_epochs", "3", "--sample_every_n_epochs", "2") == 0
    assert scans.count(out / "sample") == 2  # before and after epoch 2's samples
    assert scans.count(out / kohya.BASE_DIR / "sample") == 2  # before and after the base renders
    assert [line["epoch"] for line in read_scores(out)] == [2]
    # epoch 2 has no numbered file (no --save_every_n_epochs): saved from the network; kohya's final file is epoch 3's
    assert "best/ keeps the network saved at epoch 2's sample point: kohya's final mylora.safetensors is epoch 3" in capsys.readouterr().out
    assert_agree(out, launcher_policy(out), weights="mylora-000002.safetensors")


def test_sample_at_first_samples_are_the_base_references(checkout, tiny_model, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert launch(checkout, tiny_model, prompts_file, out, "--max_train_epochs", "2", "--sample_at_first", "--save_every_n_epochs", "1",
                  "--fake_schedule", "0.05,1.0") == 0
    assert "lora-monitor: kohya's own --sample_at_first samples (network multiplier 0)" in capsys.readouterr().out
    first = [record for record in fake_log(out) if record["steps"] == 0]
    assert [(r["epoch"], r["multiplier"]) for r in first] == [(0, 0.0)] * 2  # one round at step 0, the network off
    assert not (out / kohya.BASE_DIR).exists()  # no second, identical round
    samples = sorted((out / "sample").glob("mylora_e000000_*.png"))
    base = sorted((out / "previews" / "base").glob("*.png"))
    assert len(samples) == len(base) == 2
    for sample, preview in zip(samples, base):
        assert torch.equal(read_image(sample), read_image(preview))
    assert_agree(out, launcher_policy(out), weights="mylora-000001.safetensors")


def test_with_network_weights_the_first_samples_are_not_the_base(checkout, tiny_model, prompts_file, tmp_path):
    out = tmp_path / "out"
    assert launch(checkout, tiny_model, prompts_file, out, "--max_train_epochs", "1", "--sample_at_first", "--network_weights", "w.safetensors") == 0
    assert [r["multiplier"] for r in fake_log(out) if r["steps"] == 0] == [1.0, 1.0]  # the user's own samples, as kohya makes them
    assert [r["multiplier"] for r in fake_log(out / kohya.BASE_DIR)] == [0.0, 0.0]  # the base, rendered apart


def test_a_failure_while_rank_0_scores_ends_the_run_with_its_message(checkout, tiny_model, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    code = launch(checkout, tiny_model, prompts_file, out, "--max_train_epochs", "3", "--save_every_n_epochs", "1",
                  "--fake_schedule", "0.05,0.5,1.0", "--fake_corrupt_sample", "2:1")
    assert code == 1
    error = capsys.readouterr().err
    broken = next((out / "sample").glob("mylora_e000002_01_*.png"))
    assert "Traceback (most recent call last)" in error
    assert f"lora-monitor kohya: error: train_network.py failed during training: UnreadableSampleError: {broken} does not decode" in error
    assert "(epoch 2 samples in" in error
    assert_agree(out, launcher_policy(out), weights="mylora-000001.safetensors")
    assert not (out / LOCK_FILE).exists()
    assert (out / "lora_monitor_prompts.txt").is_file()  # epoch 1 was scored from it: it stays with the record


def test_on_two_processes_a_failure_on_rank_0_ends_both_ranks_with_its_message(checkout, tiny_model, prompts_file, tmp_path):
    """accelerate launch, 2 CPU processes: kohya's sampler splits the prompts between them; rank 0 reads, scores and exports.
    A sample it cannot read ends rank 1 too (RankFailedError naming rank 0 and the file) instead of leaving it waiting."""
    from test_distributed import LAUNCH_TIMEOUT_S, child_env, free_port

    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
               "--module", "lora_monitor.cli", "kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", "--",
               "--pretrained_model_name_or_path", tiny_model, "--output_dir", str(out), "--output_name", "mylora",
               "--sample_prompts", str(prompts_file), "--max_train_epochs", "3", "--save_every_n_epochs", "1",
               "--fake_schedule", "0.05,0.5,1.0", "--fake_cpu", "--fake_corrupt_sample", "2:1"]
    try:
        done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as expired:
        pytest.fail(f"the 2-process launch did not end within {LAUNCH_TIMEOUT_S} s (a hang?): {expired.stdout}\n{expired.stderr}")
    said = done.stdout + done.stderr
    assert done.returncode != 0
    broken = next((out / "sample").glob("mylora_e000002_01_*.png"))
    assert {r["file"] for r in fake_log(out) if r["epoch"] == 2} == {broken.name, next((out / "sample").glob("mylora_e000002_00_*.png")).name}
    assert (f"lora-monitor kohya: error: train_network.py failed during training: RankFailedError: scoring epoch 2's samples (read, "
            f"scored and exported by rank 0) failed on rank 0 of 2: UnreadableSampleError: {broken} does not decode") in said
    assert_agree(out, launcher_policy(out), weights="mylora-000001.safetensors")


def test_an_error_inside_kohyas_training_keeps_its_traceback(checkout, tiny_model, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    assert launch(checkout, tiny_model, prompts_file, out, "--max_train_epochs", "3", "--save_every_n_epochs", "1",
                  "--fake_schedule", "0.05,0.5,1.0", "--fake_fail_at_epoch", "2") == 1
    error = capsys.readouterr().err
    assert "Traceback (most recent call last)" in error and f"{checkout / 'train_network.py'}\", line" in error
    assert "ValueError: fake failure inside kohya's training loop at epoch 2" in error
    assert error.rstrip().endswith("lora-monitor kohya: error: train_network.py failed during training: ValueError: fake failure "
                                   "inside kohya's training loop at epoch 2 (its traceback is above)")
    assert_agree(out, launcher_policy(out), weights="mylora-000001.safetensors")


def test_the_trainers_own_argument_errors_say_they_are_the_trainers(checkout, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["kohya", "--sd-scripts", str(checkout), "--", "--output_dir", str(tmp_path / "out"), "--no_such_option"])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "usage: train_network.py" in error and "train_network.py: error: unrecognized arguments: --no_such_option" in error
    assert "usage: lora-monitor" not in error and "lora-monitor: error" not in error
    assert f"lora-monitor kohya: the error above is train_network.py's (from {checkout}), about the trainer arguments after `--`" in error
    assert not (tmp_path / "out").exists()


def test_a_failed_launcher_start_removes_its_prompt_file_and_lock(checkout, prompts_file, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "lora_monitor_prompts.json").write_text("[]")  # left by an earlier start from a .toml file
    prompts_file.write_text("a cat --d 0\na dog\n")  # kohya's Lumina sampler refuses seed 0: refused in prepare, after the prompt file
    argv = ["kohya", "--sd-scripts", str(checkout), "--family", "lumina", "--metrics", "ssim", "--", "--output_dir", str(out),
            "--sample_prompts", str(prompts_file), "--pretrained_model_name_or_path", "none"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "refuses seeds below 1" in captured.err
    assert f"removed {out / 'lora_monitor_prompts.json'}, left by an earlier start from another prompt file" in captured.out
    assert sorted(p.name for p in out.iterdir()) == []  # no prompt file, no lock: nothing to confuse the next start


def test_a_resumed_launcher_replaces_a_leftover_state_and_keeps_one_that_scored(checkout, tiny_model, prompts_file, tmp_path, capsys):
    """--resume of a state sd-scripts saved without the launcher (no monitor state in it): the monitor continues from its
    latest state in the output folder, a leftover of a start that scored nothing is replaced, one that scored is kept."""
    from lora_monitor.monitor import LoraMonitor
    from lora_monitor.spec import PreviewSpec

    plain = tmp_path / "plain"  # one epoch of sd-scripts alone, its state saved at the end
    done = subprocess.run([sys.executable, str(checkout / "train_network.py"), "--pretrained_model_name_or_path", tiny_model,
                           "--output_dir", str(plain), "--output_name", "mylora", "--max_train_epochs", "1", "--save_state"],
                          cwd=checkout, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    state = plain / "mylora-state"
    assert not (state / kohya.STATE_FILE).exists()
    out = tmp_path / "out"
    out.mkdir()
    other = PreviewSpec.from_prompts(["a green field"], steps=2, width=64, height=64)
    leftover = LoraMonitor(spec=other, output_dir=tmp_path / "elsewhere", write_weights=lambda folder: None, metrics=("ssim",), metric="ssim")
    (out / kohya.LAUNCHER_STATE).write_text(json.dumps(leftover.state_dict()))  # a start for other prompts that scored nothing
    extra = ("--max_train_epochs", "2", "--resume", str(state))
    assert launch(checkout, tiny_model, prompts_file, out, *extra) == 0
    said = capsys.readouterr().out
    assert f"{state} holds no monitor state (saved by sd-scripts without lora-monitor?): the monitor continues from its latest state" in said
    assert f"ignoring {out / kohya.LAUNCHER_STATE}: it scored no epoch and does not fit this run" in said
    assert [line["epoch"] for line in read_scores(out)] == [2]  # kohya went on from the state's epoch 1
    assert_agree(out, launcher_policy(out), weights="mylora.safetensors")
    kept = (out / "lora_monitor_prompts.txt").read_bytes()
    changed = tmp_path / "changed.txt"
    changed.write_text("a red circle --w 64 --h 64 --s 2 --d 5\na blue square --w 64 --h 64 --s 2 --d 6\n")
    assert launch(checkout, tiny_model, changed, out, *extra) == 2
    error = capsys.readouterr().err
    assert f"{out / kohya.LAUNCHER_STATE} (epochs [2] scored) cannot be continued: the saved monitor state belongs to preview spec" in error
    assert (out / "lora_monitor_prompts.txt").read_bytes() == kept  # the failed start put back the file epoch 2 was scored from
    assert_agree(out, launcher_policy(out), weights="mylora.safetensors")
    assert not (out / LOCK_FILE).exists()


def test_a_lock_is_released_by_its_holder_only(tmp_path):
    first = FolderLock(tmp_path, "lora-monitor watch").acquire()
    (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "token": "theirs"}))  # replaced behind its back
    first.release()
    assert (tmp_path / LOCK_FILE).exists()  # not ours any more: left alone
