"""The HTML report: self-contained, every image shown, the best outlined, opened in a real headless Chromium."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_monitor import posthoc
from lora_monitor.monitor import quantize
from lora_monitor.record import save_png_atomic
from lora_monitor.report import write_report


def _image(seed: int, size: int = 64) -> torch.Tensor:
    """A smooth random picture (BRISQUE needs structure, not flat colour)."""
    generator = torch.Generator().manual_seed(seed)
    small = torch.rand(3, 8, 8, generator=generator)
    return torch.nn.functional.interpolate(small[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def _analysis(folder: Path, kind: str = "epochs"):
    if kind == "epochs":
        for epoch in (1, 2, 3):
            for prompt in (0, 1):
                save_png_atomic(quantize(_image(10 * epoch + prompt)), folder / f"run_e{epoch:06d}_{prompt:02d}_20260101000000_{prompt}.png")
        for prompt in (0, 1):
            save_png_atomic(quantize(_image(prompt)), folder / f"run_e000000_{prompt:02d}_20260101000000_{prompt}.png")
        pattern = None
    else:
        for epoch in (1, 2):
            for strength in (0.5, 1.0):
                save_png_atomic(quantize(_image(int(epoch * 10 + strength * 2))), folder / f"e{epoch}_s{strength}_0.png")
        save_png_atomic(quantize(_image(0)), folder / "base.png")
        pattern = "e{epoch}_s{strength}_{prompt}.png"
    found = posthoc.collect_images(folder, kind, pattern=pattern, references=folder / "base.png" if kind == "grid" else None)
    scorers, _ = posthoc.make_scorers(["brisque", "ssim"], True, "brisque")
    policy = posthoc.build_policy(scorers, "brisque", min_delta=0.01, bounds={"ssim": (None, 0.99)})
    analysis = posthoc.analyse(kind, found.candidates, found.references, scorers, policy, prompts=found.prompts, reference_files=found.reference_files)
    analysis.source = str(folder)
    return analysis


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.links: list[str] = []
        self.best_cells = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.links.append(attrs["href"])
        if tag in ("td", "th") and "best" in (attrs.get("class") or "").split():
            self.best_cells += 1


@pytest.mark.parametrize("kind", ["epochs", "grid"])
def test_report_is_self_contained(tmp_path, kind):
    analysis = _analysis(tmp_path / "images", kind)
    page = write_report(analysis, tmp_path / "report")
    text = page.read_text(encoding="utf-8")
    parsed = _Links()
    parsed.feed(text)
    for src in parsed.images:
        assert src.startswith("data:image/png;base64,") or (page.parent / src).is_file(), src
    assert "curves.png" in parsed.images
    for href in parsed.links:
        assert not re.match(r"^[a-z]+://|^/", href) and (page.parent / href).is_file(), href
    best = analysis.best
    assert best is not None and f"Best: {best.candidate.label}" in text
    assert parsed.best_cells >= len(analysis.prompts) + 1  # the column head, its thumbnails, its score row
    assert "min_delta" in text and "ties within it go to" in text and "brisque" in text
    assert analysis.explanation()[:40].replace("'", "&#x27;") in text
    # the report folder stands alone: moved elsewhere, every link still resolves
    moved = shutil.move(str(page.parent), str(tmp_path / "moved"))
    assert all(src.startswith("data:") or (Path(moved) / src).is_file() for src in parsed.images)


def test_report_states_the_rule_in_words_and_resolves_relative_bounds(tmp_path):
    """Without a preset the rule is the monitored metric and the bounds in words; a bound relative to the base is shown
    with the base model's value it multiplies, which the base row and the curves show too."""
    import html as html_module

    _analysis(tmp_path / "images")  # writes the kohya samples, epoch 0 the base model's
    found = posthoc.collect_images(tmp_path / "images", "epochs")
    scorers, _ = posthoc.make_scorers(["brisque", "ssim"], True, "brisque")
    policy = posthoc.build_policy(scorers, "brisque", bounds={"brisque": ("0.5x", "1.5x")})
    analysis = posthoc.analyse("epochs", found.candidates, found.references, scorers, policy, prompts=found.prompts, reference_files=found.reference_files)
    base = analysis.base_aggregates["brisque"]
    assert base == pytest.approx(float(np.mean(analysis.base_scores["brisque"])))
    page = write_report(analysis, tmp_path / "report").read_text(encoding="utf-8")
    rule = analysis.rule
    assert rule.startswith("best = lowest mean brisque over the previews") and "0.5x base" in rule and "1.5x base" in rule
    assert html_module.escape(rule, quote=True) in page
    text = analysis.bound_texts()["brisque"]
    assert text.startswith("brisque in [0.5x base (") and f"{0.5 * base:.6g}" in text and f"{1.5 * base:.6g}" in text
    assert html_module.escape(text, quote=True) in page
    assert f"<tr><th>base model</th><td class='scores'>{base:.4g}</td>" in page


def _chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    """Chromium from Debian's packages: found on PATH, else installed when we are root with apt-get; else skip."""
    found = _chromium()
    if found is None and os.geteuid() == 0 and shutil.which("apt-get") and os.environ.get("LORA_MONITOR_NO_APT") != "1":
        try:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=300, check=False)
            subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired):
            pass
        found = _chromium()
    if found is None:
        pytest.skip(
            "no headless browser: chromium is not on PATH and could not be installed (needs root and apt-get with access "
            "to Debian's packages: apt-get install chromium; or set CHROMIUM=/path/to/chrome)"
        )
    return found


def _browser(binary: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--allow-file-access-from-files",
               "--virtual-time-budget=5000", f"--user-data-dir={cwd / 'profile'}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd)


def test_report_opens_in_headless_chromium(tmp_path, chromium):
    from PIL import Image

    analysis = _analysis(tmp_path / "images")
    page = write_report(analysis, tmp_path / "report")
    dumped = _browser(chromium, "--dump-dom", page.resolve().as_uri(), cwd=tmp_path)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    count = len(_Links_of(page.read_text(encoding="utf-8")))
    assert f'data-image-count="{count}"' in dumped.stdout, dumped.stdout[:500]
    assert 'data-images-loaded="all"' in dumped.stdout, "some <img> did not load: " + re.findall(r'data-images-loaded="[^"]*"', dumped.stdout).__repr__()
    shot = tmp_path / "shot.png"
    taken = _browser(chromium, f"--screenshot={shot}", "--window-size=1280,1600", page.resolve().as_uri(), cwd=tmp_path)
    assert shot.is_file(), taken.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float64)
    assert pixels.shape == (1600, 1280)
    assert pixels.std() > 10, f"the screenshot looks blank (grey-level std {pixels.std():.2f})"
    assert (pixels < 128).mean() > 0.01  # text and thumbnails, not an empty white page


def _Links_of(text: str) -> list[str]:
    parsed = _Links()
    parsed.feed(text)
    return parsed.images
