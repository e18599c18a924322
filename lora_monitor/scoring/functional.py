"""Pure tensor functions for image scores. Inputs are (N, 3, H, W) float batches in [0, 1]."""
from __future__ import annotations

import torch


def check_image_batch(images: torch.Tensor, name: str = "images") -> None:
    """Reject anything that is not an (N, 3, H, W) floating batch with values in [0, 1].

    NaN values are allowed through (they score as NaN, the worst score); anything else out of
    range is a caller error.
    """
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, 3, H, W) in [0, 1], got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"{name} must have shape (N, 3, H, W) with values in [0, 1], got shape {tuple(images.shape)}; "
            "add a batch dimension with .unsqueeze(0) or convert grey images with .expand(-1, 3, -1, -1)"
        )
    if not images.is_floating_point():
        raise ValueError(f"{name} must be a floating tensor in [0, 1], got dtype {images.dtype}; divide uint8 images by 255")
    finite = images[torch.isfinite(images)]
    if finite.numel() and (finite.min() < -1e-6 or finite.max() > 1 + 1e-6):
        raise ValueError(
            f"{name} must hold values in [0, 1], got min {finite.min().item():.4g} and max {finite.max().item():.4g}; "
            "diffusers pipelines return [0, 1] with output_type='pt', decoded latents are in [-1, 1] ((x + 1) / 2)"
        )


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of colour images against their references, shape (N,).

    torchmetrics' SSIM with its defaults (11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) on
    all three channels with data_range 1.0, computed in float32; the per-image value is the mean
    over channels and positions. NaN inputs give NaN.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    check_image_batch(images, "images")
    check_image_batch(reference, "reference")
    if images.shape != reference.shape:
        raise ValueError(
            f"images and reference must have the same shape, got {tuple(images.shape)} and {tuple(reference.shape)}"
        )
    return structural_similarity_index_measure(
        images.float(), reference.float(), data_range=1.0, reduction="none"
    ).reshape(images.shape[0])
