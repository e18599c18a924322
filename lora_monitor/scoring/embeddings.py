"""CLIP and DINOv2 image (and CLIP text) embeddings, loaded through transformers by hub name or folder.

Preprocessing runs in torch on the model's device (resize, centre crop, normalise with the numbers of
the model's preprocessor_config.json), so a batch of previews never round-trips through PIL.
transformers is imported only in `load`, so importing this module stays light.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # MIT licence, ~150M parameters
DEFAULT_DINO = "facebook/dinov2-small"  # Apache-2.0 licence, 22M parameters
KINDS = ("clip", "dino")
KNOWN_LICENCES = {DEFAULT_CLIP: "MIT", DEFAULT_DINO: "Apache-2.0"}

# Used when a model comes without a preprocessor_config.json.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class ModelNotAvailableError(RuntimeError):
    """An embedding model is neither in the Hugging Face cache nor a loadable local folder."""


@dataclass(frozen=True)
class Preprocessing:
    """What the model's image processor would do: resize (shortest edge, or exact (h, w)), crop, normalise."""

    resize: int | tuple[int, int] | None
    crop: tuple[int, int] | None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_config(cls, config: dict | None, image_size: int, kind: str) -> "Preprocessing":
        """Read a preprocessor_config.json dict (int or dict sizes, as CLIP and DINOv2 write them); None = defaults."""
        mean, std = (CLIP_MEAN, CLIP_STD) if kind == "clip" else (IMAGENET_MEAN, IMAGENET_STD)
        if config is None:
            return cls(image_size, (image_size, image_size), mean, std)
        size = config.get("size", image_size)
        if isinstance(size, dict):
            size = size["shortest_edge"] if "shortest_edge" in size else (size["height"], size["width"])
        crop = config.get("crop_size", size if isinstance(size, int) else None)
        if isinstance(crop, dict):
            crop = (crop["height"], crop["width"])
        elif isinstance(crop, int):
            crop = (crop, crop)
        if not config.get("do_normalize", True):
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        return cls(
            size if config.get("do_resize", True) else None,
            crop if config.get("do_center_crop", crop is not None) else None,
            tuple(config.get("image_mean", mean)), tuple(config.get("image_std", std)),
        )

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> the model's pixel_values (float32, same device)."""
        images = images.float()
        height, width = images.shape[-2:]
        if isinstance(self.resize, int):
            short, long = min(height, width), max(height, width)
            long = int(self.resize * long / short)
            target = (self.resize, long) if height <= width else (long, self.resize)
        else:
            target = self.resize
        if target is not None and tuple(target) != (height, width):
            images = F.interpolate(images, size=tuple(target), mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
        if self.crop is not None:
            height, width = images.shape[-2:]
            pad_h, pad_w = max(self.crop[0] - height, 0), max(self.crop[1] - width, 0)
            if pad_h or pad_w:  # smaller than the crop: centre it on black, as the image processors do
                images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
                height, width = images.shape[-2:]
            top, left = (height - self.crop[0]) // 2, (width - self.crop[1]) // 2
            images = images[..., top : top + self.crop[0], left : left + self.crop[1]]
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images - mean) / std


def _features(output) -> torch.Tensor:
    """get_image_features / get_text_features give a tensor in transformers 4 and an output object in 5."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class EmbeddingModel:
    """A CLIP or DINOv2 model that turns images (and, for CLIP, texts) into L2-normalised embeddings.

    Loaded lazily by `load()`; frozen and in eval mode. The embeddings of the last image batch are
    memoised (keyed on the tensor object and its version counter) so several scorers on one batch
    run the model once.
    """

    def __init__(
        self,
        name_or_path: str,
        kind: str,
        device: str | torch.device | None = None,
        dtype: torch.dtype = torch.float32,
        batch_size: int = 16,
        cache_dir: str | Path | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"embedding model kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.name = str(name_or_path)
        self.kind = kind
        self.device = torch.device(device or _default_device())
        self.dtype = dtype
        self.batch_size = batch_size
        self.cache_dir = cache_dir
        self.model = None
        self.tokenizer = None
        self.preprocess: Preprocessing | None = None
        self._memo: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def __repr__(self) -> str:
        return f"EmbeddingModel({self.name!r}, {self.kind!r}, device={str(self.device)!r}, loaded={self.model is not None})"

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self, local_files_only: bool = True) -> "EmbeddingModel":
        """Load model, tokenizer (CLIP) and preprocessing; a ModelNotAvailableError says how to get the model."""
        if self.model is not None:
            return self
        # fork_rng: transformers 4 draws from torch's global RNG while loading; a training run's must not move
        with torch.random.fork_rng(devices=[]):
            model, tokenizer, image_size, config_file = self._from_pretrained(local_files_only)
        config = json.loads(Path(config_file).read_text(encoding="utf-8")) if config_file else None
        self.preprocess = Preprocessing.from_config(config, image_size, self.kind)
        model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.model, self.tokenizer = model, tokenizer
        return self

    def _from_pretrained(self, local_files_only: bool) -> tuple:
        import transformers

        kwargs = dict(cache_dir=self.cache_dir, local_files_only=local_files_only)
        try:
            model_type = transformers.AutoConfig.from_pretrained(self.name, **kwargs).model_type
            if model_type != self.kind and not (self.kind == "dino" and model_type.startswith("dinov2")):
                # transformers 4 would load a CLIPModel from any folder, with random weights
                raise ValueError(f"it holds a {model_type!r} model")
            if self.kind == "clip":
                model = transformers.CLIPModel.from_pretrained(self.name, **kwargs)
                tokenizer = transformers.AutoTokenizer.from_pretrained(self.name, **kwargs)
                image_size = model.config.vision_config.image_size
            else:
                model = transformers.AutoModel.from_pretrained(self.name, **kwargs)
                tokenizer, image_size = None, model.config.image_size
            config_file = transformers.utils.cached_file(
                self.name, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False, **kwargs,
            )
        except (OSError, ValueError, KeyError) as error:
            raise ModelNotAvailableError(self._unavailable_message(error, local_files_only)) from error
        return model, tokenizer, image_size, config_file

    def _unavailable_message(self, error: Exception, local_files_only: bool) -> str:
        label = "CLIP" if self.kind == "clip" else "DINOv2"
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if Path(self.name).exists():
            return f"{self.name}: this folder does not hold a {label} model saved with save_pretrained ({reason})"
        if not local_files_only:
            return (
                f"the {label} model {self.name!r} is not in the Hugging Face cache and could not be downloaded "
                f"({reason}). Check the name and the connection (with HF_HUB_OFFLINE=1 nothing is downloaded), "
                "or give a local model folder."
            )
        command = f"lora-monitor models {self.kind}" + ("" if self.name in (DEFAULT_CLIP, DEFAULT_DINO) else f" --name {self.name}")
        return (
            f"the {label} model {self.name!r} is not in the Hugging Face cache (scorers do not download). "
            f"Fetch it once with `{command}`, or point {self.kind}_model (--{self.kind}-model) at a local model folder. ({reason})"
        )

    def unload(self) -> None:
        """Drop the weights and the memo (frees their memory); a later `load()` brings them back."""
        self.model = self.tokenizer = self.preprocess = None
        self._memo = None

    def _require(self) -> None:
        if self.model is None:
            self.load()

    @torch.no_grad()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0, 1] -> (N, D) unit vectors (float32, model device); NaN rows for non-finite images."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        memo = self._memo
        if memo is not None and memo[0] is images and memo[1] == images._version:
            return memo[2]
        self._require()
        finite = torch.isfinite(images).flatten(1).all(1).to(self.device)
        pixels = torch.nan_to_num(images.to(self.device), nan=0.0, posinf=1.0, neginf=0.0).clamp(0, 1)
        chunks = []
        for start in range(0, pixels.shape[0], self.batch_size):
            values = self.preprocess(pixels[start : start + self.batch_size]).to(self.dtype)
            if self.kind == "clip":
                chunks.append(_features(self.model.get_image_features(pixel_values=values)))
            else:  # the CLS token, as DreamBooth's DINO metric uses
                chunks.append(self.model(pixel_values=values).last_hidden_state[:, 0])
        embeddings = F.normalize(torch.cat(chunks).float(), dim=-1) if chunks else torch.zeros(0, 0, device=self.device)
        embeddings[~finite] = float("nan")
        self._memo = (images, images._version, embeddings)
        return embeddings

    def embed_image_list(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """(3, H, W) images of any sizes -> (N, D), batched by size, in the given order."""
        by_size: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            by_size.setdefault(tuple(image.shape), []).append(index)
        rows: list[torch.Tensor | None] = [None] * len(images)
        for indices in by_size.values():
            for index, row in zip(indices, self.embed_images(torch.stack([images[i] for i in indices]))):
                rows[index] = row
        return torch.stack(rows)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Texts -> (N, D) unit vectors (CLIP only), truncated to what the text encoder takes."""
        if self.kind != "clip":
            raise ValueError(f"{self.name} is a {self.kind} model; only CLIP embeds texts")
        self._require()
        max_length = min(self.tokenizer.model_max_length, self.model.config.text_config.max_position_embeddings)
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
            ).to(self.device)
            chunks.append(_features(self.model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)))
        return F.normalize(torch.cat(chunks).float(), dim=-1)


_SHARED: dict[tuple, EmbeddingModel] = {}


def load_embedding_model(
    name: str,
    kind: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    local_files_only: bool = True,
    cache_dir: str | Path | None = None,
) -> EmbeddingModel:
    """The process-wide, loaded EmbeddingModel for (name, kind, device, dtype): scorers share one copy."""
    key = (str(name), kind, str(torch.device(device or _default_device())), dtype, str(cache_dir))
    if key not in _SHARED:
        _SHARED[key] = EmbeddingModel(name, kind, device=device, dtype=dtype, cache_dir=cache_dir)
    return _SHARED[key].load(local_files_only=local_files_only)


def release_embedding_models() -> None:
    """Unload every shared embedding model (e.g. after training, to give their memory back)."""
    for model in _SHARED.values():
        model.unload()
    _SHARED.clear()
