"""The calibration images and their published scores, shipped with the tests (tests/data/calibration)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

CALIBRATION = Path(__file__).resolve().parent / "data" / "calibration"


def rows() -> list[dict]:
    """reference.csv's rows: image, brisque_official, brisque_pyiqa, ssim_official."""
    with open(CALIBRATION / "reference.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def load_rgb(folder: str, image: str) -> torch.Tensor:
    """`folder`/`image` (a reference.csv name such as I03.bmp, stored as I03.png) as (3, H, W) float64 in [0, 1]."""
    from PIL import Image

    with Image.open(CALIBRATION / folder / Path(image).with_suffix(".png").name) as picture:
        rgb = np.asarray(picture.convert("RGB"))
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).to(torch.float64) / 255
