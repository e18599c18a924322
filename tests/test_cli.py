"""The lora-monitor command: help, errors as messages, and the demo."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lora_monitor.cli import main
from lora_monitor.record import read_scores


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "score", "models", "epochs", "strength", "grid", "kohya", "watch"):
        assert re.search(rf"^\s+{command}\s", out, re.MULTILINE), f"{command} missing from --help"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: lora-monitor" in capsys.readouterr().out


def test_bad_input_is_a_message_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lora_monitor.cli", "score", str(tmp_path / "missing.png")], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "missing.png" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_demo_trains_prints_a_table_and_exports_the_best(tmp_path, capsys):
    assert main(["demo", "--output-dir", str(tmp_path), "--epochs", "3", "--patience", "1", "--preset", "quality"]) == 0
    out = capsys.readouterr().out
    header = re.search(r"^epoch\s+(.+?)\s+best$", out, re.MULTILINE).group(1).split()
    assert header[:2] == ["brisque", "ssim"] and {"likeness", "adherence", "diversity", "memorization", "val_loss"} <= set(header)
    rows = re.findall(r"^\s+(\d+|base)\s+([-\d. ]+?)\s*(\*?)$", out, re.MULTILINE)
    lines = read_scores(tmp_path / "run" / "monitor")
    assert [r[0] for r in rows] == ["base"] + [str(line["epoch"]) for line in lines]
    for (epoch, values, _), line in zip(rows[1:], lines):
        assert [float(v) for v in values.split()] == pytest.approx([line["aggregates"][name] for name in header], abs=1e-4)
    best = lines[-1]["best_epoch"]
    assert [int(r[0]) for r in rows if r[2] == "*"][-1] == best
    assert f"best epoch {best}" in out and "policy 'quality': best = lowest mean BRISQUE" in out
    assert (tmp_path / "run" / "monitor" / "best" / "pytorch_lora_weights.safetensors").is_file()
