"""SSIM checked like BRISQUE: Wang's MATLAB SSIM on rgb2gray against the published numbers."""
from __future__ import annotations


import calibration
import pytest
import torch

from lora_monitor.scoring.functional import ssim
from lora_monitor.scoring.ssim_reference import ssim_grey_wang

@pytest.fixture(scope="module")
def pairs() -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    return {
        row["image"]: (calibration.load_rgb("brisque", row["image"]).unsqueeze(0),
                       calibration.load_rgb("ssim_ref", row["image"]).unsqueeze(0), float(row["ssim_official"]))
        for row in calibration.rows()
    }


@pytest.mark.parametrize("image", ["I03.bmp", "I04.bmp", "I06.bmp", "I08.bmp", "I19.bmp"])
def test_grey_ssim_matches_wang_matlab(pairs, image):
    distorted, pristine, official = pairs[image]
    assert ssim_grey_wang(distorted, pristine).item() == pytest.approx(official, abs=0.001)


def test_batched_grey_ssim_equals_per_pair(pairs):
    distorted = torch.cat([d for d, _, _ in pairs.values()])
    pristine = torch.cat([p for _, p, _ in pairs.values()])
    together = ssim_grey_wang(distorted, pristine)
    one_by_one = torch.cat([ssim_grey_wang(d, p) for d, p, _ in pairs.values()])
    torch.testing.assert_close(together, one_by_one, atol=1e-10, rtol=0)


def test_identical_images_score_one_and_colour_ssim_is_a_different_number(pairs):
    distorted, pristine, official = pairs["I04.bmp"]
    assert ssim_grey_wang(pristine, pristine).item() == pytest.approx(1.0, abs=1e-12)
    # The monitor's default colour SSIM (torchmetrics, three channels, data range 1) is its own
    # number: for I04 it gives about 0.93 where the grey MATLAB SSIM gives 0.998.
    colour = ssim(distorted.float(), pristine.float()).item()
    assert 0 < colour < 1 and abs(colour - official) > 0.01


def test_shape_mismatch_and_tiny_images_are_errors():
    with pytest.raises(ValueError, match="same shape"):
        ssim_grey_wang(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 33))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim_grey_wang(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
