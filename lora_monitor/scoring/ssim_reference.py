"""SSIM as Wang et al.'s original MATLAB script (ssim_index.m) computes it, batched.

Z. Wang, A. C. Bovik, H. R. Sheikh, E. P. Simoncelli, "Image Quality Assessment: From Error
Visibility to Structural Similarity", IEEE TIP 13(4), 2004. On MATLAB ``rgb2gray`` of the
uint8 images (0..255): 11x11 Gaussian window (sigma 1.5, normalised), K1 = 0.01, K2 = 0.03,
L = 255, statistics over the 'valid' region only (no padding), no downsampling; the score is
the mean of the SSIM map. This is the number published as the "official" SSIM; our default
colour SSIM (functional.ssim, torchmetrics) differs from it (three channels, data range 1,
border handling) and is the one the monitor uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as torch_f

from lora_monitor.scoring.brisque import rgb_to_grey
from lora_monitor.scoring.functional import check_image_batch

WINDOW = 11
SIGMA = 1.5
K1, K2, DYNAMIC_RANGE = 0.01, 0.03, 255.0


def _gaussian_1d(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    x = torch.arange(WINDOW, dtype=torch.float64) - (WINDOW - 1) / 2
    g = torch.exp(-(x * x) / (2 * SIGMA**2))
    return (g / g.sum()).to(device=device, dtype=dtype)


def _filter_valid(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian over (N, H, W), 'valid' region: (N, H-10, W-10)."""
    y = torch_f.conv2d(x.unsqueeze(1), g.view(1, 1, WINDOW, 1))
    return torch_f.conv2d(y, g.view(1, 1, 1, WINDOW)).squeeze(1)


def ssim_grey_wang(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of rgb2gray(images) against rgb2gray(reference), (N,) float64, like ssim_index.m."""
    check_image_batch(images, "images")
    check_image_batch(reference, "reference")
    if images.shape != reference.shape:
        raise ValueError(
            f"images and reference must have the same shape, got {tuple(images.shape)} and {tuple(reference.shape)}"
        )
    if images.shape[2] < WINDOW or images.shape[3] < WINDOW:
        raise ValueError(f"SSIM needs images of at least {WINDOW}x{WINDOW} pixels, got {images.shape[2]}x{images.shape[3]}")
    x, y = rgb_to_grey(images), rgb_to_grey(reference)  # float64, 0..255
    g = _gaussian_1d(torch.float64, x.device)
    mu_x, mu_y = _filter_valid(x, g), _filter_valid(y, g)
    sigma_xx = _filter_valid(x * x, g) - mu_x * mu_x
    sigma_yy = _filter_valid(y * y, g) - mu_y * mu_y
    sigma_xy = _filter_valid(x * y, g) - mu_x * mu_y
    c1, c2 = (K1 * DYNAMIC_RANGE) ** 2, (K2 * DYNAMIC_RANGE) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / (
        (mu_x * mu_x + mu_y * mu_y + c1) * (sigma_xx + sigma_yy + c2)
    )
    return ssim_map.mean(dim=(1, 2))
