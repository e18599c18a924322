"""Scorer objects and the registry that names them.

A scorer's metadata is data: its name, whether higher is better, and whether it needs a
reference image. The policy reads the polarity from here instead of asking the user.
"""
from __future__ import annotations

import difflib
import inspect
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from lora_monitor.scoring import functional as F


@runtime_checkable
class Scorer(Protocol):
    """Scores a batch of images: (N, 3, H, W) in [0, 1] -> (N,) float tensor.

    NaN or +inf marks an image that could not be scored (black, flat, NaN input); the policy
    treats it as the worst score. Optional hooks the monitor calls before training starts:
    `check_size(height, width)` raises for a preview size the scorer cannot take, and
    `prepare()` loads what the scorer needs (e.g. a model file), so problems surface early.

    Optional attributes for signals that need more than pixels:
    - `needs_prompts = True`: called as `scorer(images, reference, prompts=[prompt text per image])`.
    - `whole_set = True`: scores an evaluation's previews together, with `score_set(images, groups)`
      (a list of (3, H, W) images and their seed groups: equal numbers are one prompt under several
      seeds) instead of `__call__`; `check_groups(groups)` may refuse a spec at build time.
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


class BrisqueScorer:
    """BRISQUE (no reference; lower is better) with the LIVE-trained SVR model, batched.

    The model is resolved on the first call (see brisque_model.resolve_brisque_model) unless
    one is given. `dtype` is the working precision: float64 reproduces the official MATLAB
    numbers, float32 is faster on GPUs and drifts by tenths on some images.
    """

    name = "brisque"
    higher_is_better = False
    needs_reference = False

    def __init__(self, model=None, model_path: str | None = None, dtype: torch.dtype = torch.float64) -> None:
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.model = model
        self.model_path = model_path
        self.dtype = dtype

    def prepare(self) -> None:
        """Resolve the SVR model now (the monitor calls this before training, so a missing model fails early)."""
        from lora_monitor.scoring.brisque_model import resolve_brisque_model

        if self.model is None:
            self.model = resolve_brisque_model(self.model_path)

    def check_size(self, height: int, width: int) -> None:
        from lora_monitor.scoring.brisque import check_brisque_size

        check_brisque_size(height, width)

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        from lora_monitor.scoring.brisque import brisque

        self.prepare()
        return brisque(images, self.model, dtype=self.dtype)


class PyiqaScorer:
    """Any pyiqa metric, for users who installed the optional `pyiqa` extra (non-commercial licence).

    Polarity comes from pyiqa's `lower_better`, the need for a reference from its metric mode.
    pyiqa is imported here, only when such a scorer is asked for.
    """

    def __init__(self, metric: str, device: str | torch.device | None = None, **metric_kwargs) -> None:
        try:
            import pyiqa
        except ImportError:
            raise ImportError(
                f"the scorer 'pyiqa:{metric}' needs pyiqa: pip install 'lora-monitor[pyiqa]' "
                "(pyiqa has a non-commercial licence and pulls torchvision)"
            ) from None
        available = list(pyiqa.list_models())
        if metric not in available:
            close = difflib.get_close_matches(metric, available, n=3, cutoff=0.5)
            hint = f" Did you mean {', '.join(f'pyiqa:{c}' for c in close)}?" if close else ""
            raise ValueError(f"unknown pyiqa metric {metric!r}.{hint}")
        self._metric = pyiqa.create_metric(metric, device=torch.device(device or "cpu"), **metric_kwargs)
        self.name = f"pyiqa:{metric}"
        self.higher_is_better = not bool(self._metric.lower_better)
        self.needs_reference = str(getattr(self._metric, "metric_mode", "NR")).upper() == "FR"

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        F.check_image_batch(images, "images")
        if self.needs_reference:
            if reference is None:
                raise ValueError(f"the {self.name} scorer needs reference images")
            F.check_image_batch(reference, "reference")
            scores = self._metric(images, reference)
        else:
            scores = self._metric(images)
        return torch.as_tensor(scores).detach().reshape(images.shape[0])


_REGISTRY: dict[str, Callable[..., Scorer]] = {}
# Families of scorers named "prefix:rest", built with factory(rest, **kwargs).
_FAMILIES: dict[str, Callable[..., Scorer]] = {"pyiqa": PyiqaScorer}


def register_scorer(name: str, factory: Callable[..., Scorer]) -> None:
    """Make `get_scorer(name)` build a scorer with `factory(**kwargs)`."""
    _REGISTRY[name] = factory


def available_scorers() -> list[str]:
    return sorted(_REGISTRY)


def get_scorer(name: str, options=None, **kwargs) -> Scorer:
    """Build the scorer registered under `name`; an unknown name is answered with the close ones. `options`
    (lora_monitor.scoring.signals.SignalOptions: references, embedding models, ...) goes to the factories that take it."""
    if name in _REGISTRY:
        factory = _REGISTRY[name]
        if options is not None and "options" in inspect.signature(factory).parameters:
            kwargs["options"] = options
        return factory(**kwargs)
    prefix, sep, rest = name.partition(":")
    if sep and prefix in _FAMILIES and rest:
        return _FAMILIES[prefix](rest, **kwargs)
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    families = ", ".join(f"{family}:<metric>" for family in sorted(_FAMILIES))
    raise ValueError(f"unknown metric {name!r}; available: {', '.join(available_scorers())}, {families}.{hint}")


register_scorer("ssim", SSIMScorer)
register_scorer("brisque", BrisqueScorer)


def score_images(
    scorers: Sequence[Scorer],
    images: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor] | None = None,
    warn: Callable[[str, str], None] | None = None,
    prompts: Sequence[str] | None = None,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Every per-image scorer on every image ((3, H, W) in [0, 1]), batched by image size: {name: one score per
    image}. Whole-set scorers are left to `score_sets`. `prompts` (one per image) go to scorers that need them.
    With `device`, each batch and its references are moved there first (the monitor scores on the training GPU); a
    scorer that runs out of device memory there scores that batch where it was given (the CPU, for the monitor).

    A scorer that raises gives NaN (the worst score) for that batch and a call of `warn(key, message)`,
    so scoring never stops a training run; without `warn` the error propagates.
    """
    scorers = [scorer for scorer in scorers if not getattr(scorer, "whole_set", False)]
    by_size: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        by_size.setdefault(tuple(image.shape), []).append(index)
    scores = {scorer.name: [float("nan")] * len(images) for scorer in scorers}
    for indices in by_size.values():
        given = torch.stack([images[i] for i in indices])
        given_reference = torch.stack([references[i] for i in indices]) if references is not None else None
        batch = given.to(device)
        reference = given_reference.to(device) if given_reference is not None else None
        for scorer in scorers:
            try:
                if getattr(scorer, "needs_prompts", False) and prompts is None:
                    raise ValueError(f"the {scorer.name} scorer needs the prompt of each image")
                try:
                    values = _call(scorer, batch, reference, prompts, indices)
                except torch.cuda.OutOfMemoryError:
                    if batch is given:  # not moved: nowhere else to score it
                        raise
                    # the training run holds the device's memory: this scorer scores the batch where it was given
                    values = _call(scorer, given, given_reference, prompts, indices)
            except Exception as error:
                if warn is None:
                    raise
                warn(f"scorer:{scorer.name}", f"scorer {scorer.name!r} failed ({error}); its scores are NaN (the worst)")
                continue
            for i, value in zip(indices, values.tolist()):
                scores[scorer.name][i] = float(value)
    return scores


def _call(scorer: Scorer, batch: torch.Tensor, reference: torch.Tensor | None, prompts, indices) -> torch.Tensor:
    """One scorer on one batch, with the reference and prompts it asks for."""
    reference = reference if scorer.needs_reference else None
    if getattr(scorer, "needs_prompts", False):
        return scorer(batch, reference, prompts=[prompts[i] for i in indices])
    return scorer(batch, reference)


def score_sets(
    scorers: Sequence[Scorer],
    images: Sequence[torch.Tensor],
    groups: Sequence[int],
    warn: Callable[[str, str], None] | None = None,
) -> dict[str, list[float]]:
    """The whole-set scorers (e.g. diversity across seeds) on all of an evaluation's images at once; a scorer
    that raises gives NaN for every image and a call of `warn`, like `score_images`."""
    scores = {}
    for scorer in scorers:
        if not getattr(scorer, "whole_set", False):
            continue
        try:
            values = [float(value) for value in scorer.score_set(list(images), list(groups))]
        except Exception as error:
            if warn is None:
                raise
            warn(f"scorer:{scorer.name}", f"scorer {scorer.name!r} failed ({error}); its scores are NaN (the worst)")
            values = [float("nan")] * len(images)
        scores[scorer.name] = values
    return scores
