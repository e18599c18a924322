"""Scorer objects and the registry that names them.

A scorer's metadata is data: its name, whether higher is better, and whether it needs a
reference image. The policy reads the polarity from here instead of asking the user.
"""
from __future__ import annotations

import difflib
from typing import Callable, Protocol, runtime_checkable

import torch

from lora_monitor.scoring import functional as F


@runtime_checkable
class Scorer(Protocol):
    """Scores a batch of images: (N, 3, H, W) in [0, 1] -> (N,) float tensor.

    NaN or +inf marks an image that could not be scored (black, flat, NaN input); the policy
    treats it as the worst score.
    """

    name: str
    higher_is_better: bool
    needs_reference: bool

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor: ...


class SSIMScorer:
    """Colour SSIM against the base model's render of the same prompt and seed (torchmetrics)."""

    name = "ssim"
    higher_is_better = True
    needs_reference = True

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        if reference is None:
            raise ValueError("the ssim scorer needs reference images (the base model's renders)")
        return F.ssim(images, reference)


_REGISTRY: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str, factory: Callable[..., Scorer]) -> None:
    """Make `get_scorer(name)` build a scorer with `factory(**kwargs)`."""
    _REGISTRY[name] = factory


def available_scorers() -> list[str]:
    return sorted(_REGISTRY)


def get_scorer(name: str, **kwargs) -> Scorer:
    """Build the scorer registered under `name`; an unknown name is answered with the close ones."""
    if name in _REGISTRY:
        return _REGISTRY[name](**kwargs)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown metric {name!r}; available: {', '.join(available_scorers())}.{hint}")


register_scorer("ssim", SSIMScorer)
