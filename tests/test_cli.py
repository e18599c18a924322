"""The lora-monitor command: help, errors as messages, score and models (the demo: test_demo.py)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from lora_monitor.cli import main


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


# ----------------------------------------------------------------------------------------- score


def _image(path, seed: int, size: int = 64):
    """A textured PNG (BRISQUE needs structure), saved through the record's writer."""
    import torch

    from lora_monitor.record import save_png_atomic

    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    image = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    save_png_atomic(image, path)
    return path


def _svr_file(path):
    """A small valid BRISQUE SVR model file: the command must not need the real one to show what it skips."""
    import torch

    from lora_monitor.scoring import brisque_model
    from lora_monitor.scoring.brisque import SVRModel

    generator = torch.Generator().manual_seed(0)
    sv = torch.rand(4, 36, generator=generator, dtype=torch.float64) * 2 - 1
    brisque_model.save_model(SVRModel(sv, torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64), 0.05, -10.0), path)
    return path


def test_score_skips_unreadable_images_names_them_and_scores_the_rest(tmp_path, capsys):
    import json

    folder = tmp_path / "previews"
    good = [_image(folder / "a.png", 1), _image(folder / "c.png", 3)]
    truncated = _image(folder / "b.png", 2)
    truncated.write_bytes(truncated.read_bytes()[:200])
    garbage = folder / "d.png"
    garbage.write_bytes(b"not an image at all")
    model = ["--model", str(_svr_file(tmp_path / "svr.safetensors"))]

    assert main(["score", str(folder), *model]) == 2
    captured = capsys.readouterr()
    rows = [line.split() for line in captured.out.splitlines()[1:]]
    assert [row[0] for row in rows] == [str(path) for path in good]
    assert f"lora-monitor score: skipped {truncated}: cannot be read as an image" in captured.err
    assert f"lora-monitor score: skipped {garbage}: cannot be read as an image" in captured.err
    assert f"2 of 4 image(s) skipped ({truncated}, {garbage})" in captured.err and "Traceback" not in captured.err

    assert main(["score", str(folder), *model, "--json"]) == 2
    captured = capsys.readouterr()
    assert [row["file"] for row in json.loads(captured.out)] == [str(path) for path in good]

    assert main(["score", str(truncated), str(garbage), *model]) == 2  # nothing left to score: an error, no table
    captured = capsys.readouterr()
    assert captured.out == "" and "lora-monitor score: error: none of the 2 image(s) could be scored" in captured.err

    references = tmp_path / "base"  # a reference missing for one file skips that file only
    _image(references / "a.png", 1)
    assert main(["score", *map(str, good), "--metric", "ssim", "--ref", str(references), "--json"]) == 2
    captured = capsys.readouterr()
    assert [(row["file"], row["score"]) for row in json.loads(captured.out)] == [(str(good[0]), pytest.approx(1.0, abs=1e-6))]
    assert f"skipped {good[1]}: no reference {references / 'c.png'}" in captured.err
