"""Scorers on image and text embeddings: likeness to the training images, memorization, prompt
adherence (CLIP-T) and seed diversity.

They answer what the pixel metrics cannot: does the LoRA render its subject (likeness), does it copy
a training image (memorization), does it still follow the prompt (adherence), has it collapsed to one
image whatever the seed (diversity). All share embedding models through load_embedding_model, so a
DINOv2 or CLIP model is loaded once and a batch is embedded once however many scorers read it.
"""
from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Sequence

import torch

from lora_monitor.scoring.embeddings import DEFAULT_CLIP, DEFAULT_DINO, EmbeddingModel, load_embedding_model
from lora_monitor.scoring.scorers import register_scorer

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class SignalOptions:
    """Settings shared by the embedding scorers.

    references: the training images, as a folder or a list of (3, H, W) tensors in [0, 1] (likeness,
    likeness_clip and memorization need them). strip_words: trigger words removed from prompts before
    CLIP-T, since a made-up token like "sks" means nothing to CLIP and only adds noise.
    """

    references: str | os.PathLike | Sequence[torch.Tensor] | None = None
    clip_model: str = DEFAULT_CLIP
    dino_model: str = DEFAULT_DINO
    top_k: int = 3
    strip_words: tuple[str, ...] = ()
    device: str | torch.device | None = None
    batch_size: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.strip_words, str):
            self.strip_words = (self.strip_words,)
        self.strip_words = tuple(self.strip_words)
        for field, value in (("top_k", self.top_k), ("batch_size", self.batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SignalOptions.{field} must be a whole number >= 1, got {value!r}")


def _resolve_options(options: SignalOptions | None, overrides: dict) -> SignalOptions:
    if options is not None and not isinstance(options, SignalOptions):
        raise TypeError(f"options must be a SignalOptions, got {type(options).__name__}")
    allowed = [field.name for field in fields(SignalOptions)]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
    return replace(options or SignalOptions(), **overrides)


def strip_trigger_words(text: str, words: Sequence[str]) -> str:
    """`text` without the whole words in `words` (case-insensitive), whitespace collapsed."""
    for word in words:
        if word.strip():
            text = re.sub(rf"(?<!\w){re.escape(word.strip())}(?!\w)", " ", text, flags=re.IGNORECASE)
    return " ".join(text.split())


def load_references(source, metric: str = "likeness") -> list[torch.Tensor]:
    """Reference images as (3, H, W) tensors in [0, 1]: every image file of a folder (sorted), or the given tensors."""
    from lora_monitor.record import read_image

    if source is None:
        raise ValueError(
            f"the {metric} metric compares previews with the training images: give them as "
            "SignalOptions(references='path/to/training/images') or a list of (3, H, W) tensors"
        )
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if not folder.is_dir():
            raise ValueError(f"references folder {folder} does not exist (or is not a folder)")
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in REFERENCE_SUFFIXES)
        if not files:
            raise ValueError(f"references folder {folder} holds no images ({', '.join(REFERENCE_SUFFIXES)})")
        return [read_image(path) for path in files]
    images = list(source)
    if not images:
        raise ValueError(f"the {metric} metric got an empty list of reference images")
    for index, image in enumerate(images):
        if not isinstance(image, torch.Tensor) or image.dim() != 3 or image.shape[0] != 3:
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ValueError(f"reference image {index} must be a (3, H, W) tensor in [0, 1], got {shape}")
        if not torch.isfinite(image).all():
            raise ValueError(f"reference image {index} has NaN or infinite pixels")
    return images


class EmbeddingScorer:
    """The shared part: options, and the embedding model of `kind` loaded in prepare()."""

    name = ""
    kind = "dino"
    higher_is_better = True
    needs_reference = False  # never the base model's render: references here are training images
    describe = ""

    def __init__(self, options: SignalOptions | None = None, **overrides) -> None:
        self.options = _resolve_options(options, overrides)
        self._model: EmbeddingModel | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    @property
    def model(self) -> EmbeddingModel:
        if self._model is None:
            name = self.options.clip_model if self.kind == "clip" else self.options.dino_model
            self._model = load_embedding_model(name, self.kind, device=self.options.device)
            self._model.batch_size = self.options.batch_size
        return self._model

    def prepare(self) -> None:
        """Load the model now (before training), so a model that is not available fails early."""
        self.model.load()


class ReferenceScorer(EmbeddingScorer):
    """Compares each preview with the training images, embedded once in prepare()."""

    def __init__(self, options: SignalOptions | None = None, **overrides) -> None:
        super().__init__(options, **overrides)
        self.reference_embeddings: torch.Tensor | None = None

    def prepare(self) -> None:
        if self.reference_embeddings is None:
            images = load_references(self.options.references, self.name)
            self.reference_embeddings = self.model.embed_image_list(images)

    def similarities(self, images: torch.Tensor) -> torch.Tensor:
        """(N, R) cosine similarities of the previews to the references; NaN rows for unscorable previews."""
        self.prepare()
        return self.model.embed_images(images) @ self.reference_embeddings.T

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        similarities = self.similarities(images)
        top_k = min(self.options.top_k, similarities.shape[1])
        return similarities.topk(top_k, dim=1).values.mean(dim=1).cpu()


class LikenessScorer(ReferenceScorer):
    """Likeness to the training subject: mean DINOv2 cosine similarity to the top_k closest training images."""

    name = "likeness"
    describe = "DINOv2 cosine similarity to the closest training images (mean of top_k); 1 = same image, higher is better"


class ClipLikenessScorer(ReferenceScorer):
    """Likeness measured in CLIP's image space, which weighs content and style over exact appearance."""

    name = "likeness_clip"
    kind = "clip"
    describe = "CLIP image cosine similarity to the closest training images (mean of top_k); higher is better"


class MemorizationScorer(ReferenceScorer):
    """The highest DINOv2 similarity to any single training image: it rises when a LoRA copies one."""

    name = "memorization"
    higher_is_better = False
    describe = "highest DINOv2 cosine similarity to any one training image; near 1 = a copy, lower is better"

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        return self.similarities(images).max(dim=1).values.cpu()


class AdherenceScorer(EmbeddingScorer):
    """CLIP-T: how well a preview matches its prompt, trigger words removed (a LoRA that overfits ignores prompts)."""

    name = "adherence"
    kind = "clip"
    needs_prompts = True
    describe = "CLIP-T: cosine between the preview's CLIP image embedding and its prompt's; higher is better"

    def __init__(self, options: SignalOptions | None = None, **overrides) -> None:
        super().__init__(options, **overrides)
        self.text_embeddings: dict[str, torch.Tensor] = {}  # by the text embedded (trigger words stripped)

    def __call__(
        self, images: torch.Tensor, reference: torch.Tensor | None = None, prompts: Sequence[str] | None = None
    ) -> torch.Tensor:
        if prompts is None or isinstance(prompts, str) or len(prompts) != images.shape[0]:
            count = "none" if prompts is None else (1 if isinstance(prompts, str) else len(prompts))
            raise ValueError(f"the adherence metric needs one prompt per image: {images.shape[0]} images, {count} prompts")
        texts = [strip_trigger_words(prompt, self.options.strip_words) for prompt in prompts]
        new = [text for text in dict.fromkeys(texts) if text not in self.text_embeddings]
        if new:
            self.text_embeddings.update(zip(new, self.model.embed_texts(new)))
        text_embeddings = torch.stack([self.text_embeddings[text] for text in texts])
        return (self.model.embed_images(images) * text_embeddings).sum(dim=1).cpu()


class DiversityScorer(EmbeddingScorer):
    """Seed diversity: mean pairwise DINOv2 cosine distance among the seeds of one prompt.

    It falls when a LoRA collapses to one image whatever the seed. Scored on the whole evaluation at
    once (whole_set), since it compares previews of different seeds.
    """

    name = "diversity"
    whole_set = True
    describe = "mean pairwise DINOv2 cosine distance (1 - cos) among the seeds of a prompt; 0 = identical, higher is better"

    def check_groups(self, groups: Sequence[int]) -> None:
        """Every prompt (group) needs 2+ previews, else there is nothing to compare."""
        counts = Counter(groups)
        if not counts:
            raise ValueError("the diversity metric needs previews to compare; got none")
        single = sorted(group for group, count in counts.items() if count < 2)
        if single:
            raise ValueError(
                "the diversity metric compares the seeds of each prompt, but prompt(s) "
                f"{', '.join(map(str, single))} have a single preview; ask for several seeds per prompt "
                "(seeds_per_prompt=N with N >= 2)"
            )

    def score_set(self, images: Sequence[torch.Tensor], groups: Sequence[int]) -> list[float]:
        """One score per image: its group's diversity (NaN for the whole group if one member cannot be scored)."""
        if len(images) != len(groups):
            raise ValueError(f"score_set needs one group per image: {len(images)} images, {len(groups)} groups")
        self.check_groups(groups)
        embeddings = self.model.embed_image_list(images)
        scores = [math.nan] * len(images)
        for group in dict.fromkeys(groups):
            members = [index for index, other in enumerate(groups) if other == group]
            group_embeddings = embeddings[members]
            pairs = torch.triu_indices(len(members), len(members), offset=1, device=group_embeddings.device)
            distances = (1 - group_embeddings @ group_embeddings.T)[pairs[0], pairs[1]].clamp(min=0)
            for index in members:
                scores[index] = float(distances.mean())
        return scores

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The diversity of the whole batch, as one group (e.g. a folder of previews of one prompt)."""
        return torch.tensor(self.score_set(list(images), [0] * images.shape[0]))


for _scorer in (LikenessScorer, ClipLikenessScorer, MemorizationScorer, AdherenceScorer, DiversityScorer):
    register_scorer(_scorer.name, _scorer)
