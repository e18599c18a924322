"""Hostile and odd command-line input gets a clear message and exit code 2, never a traceback or a hang."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lora_monitor import posthoc
from lora_monitor.cli import main
from lora_monitor.posthoc import parse_strengths
from lora_monitor.posthoc.candidates import MAX_STRENGTHS
from lora_monitor.cli.flags import available_devices, check_device


@pytest.fixture
def cpu_only(monkeypatch):
    """A machine without CUDA or MPS, whatever this one has."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fail the test if a command gets as far as loading a base model."""

    def refuse(*args, **kwargs):
        raise AssertionError("the base model was loaded before the arguments were checked")

    monkeypatch.setattr(posthoc, "load_base_pipeline", refuse)


# ----------------------------------------------------------------------------------------- --strengths


@pytest.mark.parametrize("command", ["strength", "grid"])
def test_huge_strength_range_is_refused_at_once(command, tmp_path, capsys, nothing_loads):
    argv = [command, str(tmp_path), "--base", str(tmp_path / "model"), "--prompt", "a cat", "--no-progress"]
    assert main([*argv, "--strengths", "0:1e9:1e-9"]) == 2
    err = capsys.readouterr().err
    assert f"lora-monitor {command}: error: --strengths '0:1e9:1e-9'" in err
    assert f"at most {MAX_STRENGTHS}" in err and "Traceback" not in err


@pytest.mark.parametrize("text", ["0:inf:1", "0:1:nan", "-inf:0:1", "0,inf", "nan", "0,0.5,-inf"])
def test_non_finite_strengths_are_refused(text, tmp_path, capsys, nothing_loads):
    argv = ["strength", str(tmp_path), "--base", str(tmp_path / "model"), "--prompt", "a cat", "--no-progress"]
    assert main([*argv, f"--strengths={text}"]) == 2
    err = capsys.readouterr().err
    assert f"--strengths {text!r}: every value must be a finite number" in err


def test_strength_count_limit_is_inclusive_and_in_the_help(capsys):
    assert len(parse_strengths(f"0:{MAX_STRENGTHS - 1}:1")) == MAX_STRENGTHS
    with pytest.raises(ValueError, match=f"{MAX_STRENGTHS + 1} strengths, at most {MAX_STRENGTHS}"):
        parse_strengths(f"0:{MAX_STRENGTHS}:1")
    with pytest.raises(ValueError, match="too many strengths"):
        parse_strengths("-1e308:1e308:1e-308")  # the count itself overflows
    with pytest.raises(ValueError, match=f"at most {MAX_STRENGTHS}"):
        parse_strengths(",".join(str(i) for i in range(MAX_STRENGTHS + 1)))
    assert parse_strengths("0:1.5:0.1") == posthoc.parse_strengths("0:1.5:0.1")
    with pytest.raises(SystemExit):
        main(["strength", "--help"])
    assert f"at most {MAX_STRENGTHS}" in " ".join(capsys.readouterr().out.split())


# ----------------------------------------------------------------------------------------- demo


@pytest.mark.parametrize("epochs", ["0", "-3", "two"])
def test_demo_needs_at_least_one_epoch(epochs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--output-dir", str(tmp_path / "out"), "--epochs", epochs])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --epochs" in err and "at least 1" in err
    assert not (tmp_path / "out").exists()


def test_demo_output_dir_that_is_a_file(tmp_path, capsys):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    assert main(["demo", "--output-dir", str(existing)]) == 2
    err = capsys.readouterr().err
    assert f"lora-monitor demo: error: --output-dir {existing} is a file, not a directory" in err
    assert existing.read_text() == "keep me"
    assert main(["demo", "--output-dir", str(existing / "sub")]) == 2
    assert f"{existing} is a file" in capsys.readouterr().err


def test_demo_output_dir_file_without_a_traceback(tmp_path):
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me")
    result = subprocess.run(
        [sys.executable, "-m", "lora_monitor.cli", "demo", "--output-dir", str(existing)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "is a file, not a directory" in result.stderr and "Traceback" not in result.stderr


# ----------------------------------------------------------------------------------------- --device


def test_available_devices(cpu_only):
    assert available_devices() == ["cpu"]
    assert check_device("cpu") == "cpu"


def test_score_on_cuda_without_cuda(tmp_path, capsys, cpu_only):
    assert main(["score", str(tmp_path / "missing.png"), "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "lora-monitor score: error: --device 'cuda': CUDA is not available on this machine; available here: cpu" in err
    assert "missing.png" not in err  # the device is checked first, before any file is read


@pytest.mark.parametrize("device", ["bogus", "cuda:x", "mps", "meta"])
def test_score_on_a_device_this_machine_lacks(device, tmp_path, capsys, cpu_only):
    assert main(["score", str(tmp_path), "--device", device]) == 2
    err = capsys.readouterr().err
    assert f"lora-monitor score: error: --device {device!r}:" in err and "available here: cpu" in err
    assert "Traceback" not in err


def test_cuda_index_past_the_last_gpu(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"--device 'cuda:3': this machine has 1 CUDA device\(s\)"):
        check_device("cuda:3")
    assert check_device("cuda:0") == "cuda:0" and check_device("cuda") == "cuda"


@pytest.mark.parametrize("command", ["epochs", "strength", "grid"])
def test_posthoc_device_is_checked_before_loading(command, tmp_path, capsys, cpu_only, nothing_loads):
    argv = [command, str(tmp_path), "--base", str(tmp_path / "model"), "--prompt", "a cat", "--no-progress"]
    assert main([*argv, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert f"lora-monitor {command}: error: --device 'cuda': CUDA is not available on this machine; available here: cpu" in err
    assert main([*argv, "--device", "bogus"]) == 2
    assert "--device 'bogus': not a torch device; available here: cpu" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- preview size and steps


@pytest.mark.parametrize("flags, message", [
    (["--size", "100000"], "width must be at most 4096 pixels, got 100000"),
    (["--steps", "1000000000"], "steps must be at most 1000, got 1000000000"),
])
def test_huge_preview_sizes_and_steps_are_refused_before_anything_loads(flags, message, tmp_path, capsys, nothing_loads, monkeypatch):
    monkeypatch.delenv("LORA_MONITOR_MAX_PREVIEW_SIZE", raising=False)
    monkeypatch.delenv("LORA_MONITOR_MAX_STEPS", raising=False)
    argv = ["epochs", str(tmp_path), "--base", str(tmp_path / "model"), "--prompt", "a cat", "--no-progress", *flags]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-monitor epochs: error: ") and message in err and "Traceback" not in err
    assert "LORA_MONITOR_MAX_" in err  # how to raise the limit


def test_a_huge_size_in_a_prompt_file_names_file_and_line(tmp_path, capsys, nothing_loads, monkeypatch):
    monkeypatch.delenv("LORA_MONITOR_MAX_PREVIEW_SIZE", raising=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --w 512\na dog --w 100000 --h 512\n", encoding="utf-8")
    argv = ["grid", str(tmp_path), "--base", str(tmp_path / "model"), "--prompts", str(prompts), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{prompts}:2: --w: width must be at most 4096 pixels, got 100000" in err
    assert "LORA_MONITOR_MAX_PREVIEW_SIZE=100000" in err
