"""Validation loss: the family's own training objective on held-out images, at fixed noise.

Preview scores judge what a LoRA draws; the loss on images it never trained on says when it starts
to memorise its training set instead. Each image is noised at fixed levels with noise fixed per
(image, level), so two evaluations differ only through the weights, whatever the batch size or device.

The objective is the family's: DDPM noising with epsilon, v or sample targets for SD/SDXL; rectified
flow (x_t = (1 - sigma) x0 + sigma noise, target noise - x0) for SD3, Flux, Sana, Lumina 2, Chroma and
Qwen-Image, with the timestep in the units each pipeline feeds its transformer (families.py). The
denoiser's conditioning (text embeddings, SDXL's time ids, Flux's position ids, masks, Qwen's image
shapes) comes from the family's own pipeline: a call per caption stops at the denoiser's first
forward and keeps its arguments, so no pipeline is restated here; latents and timestep are our own.
Conditioning is what that call gives without guidance: the caption alone, Flux's default distilled
guidance, SDXL's size conditioning at the validation size uncropped.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from lora_monitor.record import read_image
from lora_monitor.render import empty_device_cache, eval_mode, lora_disabled, preserved_rng_state

__all__ = ["IMAGE_EXTENSIONS", "DEFAULT_LEVELS", "ValidationSet", "ValidationLoss"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# noise levels as fractions of the way from image (0) to pure noise (1): DDPM timestep round(f * 1000), flow sigma f
DEFAULT_LEVELS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass
class ValidationSet:
    """Held-out images, (3, H, W) float tensors in [0, 1], with one caption each ('' for none).

    `names` label the images in error messages (file names when read from a folder).
    """

    images: list[torch.Tensor]
    captions: list[str]
    names: list[str] | None = None

    def __post_init__(self) -> None:
        self.images, self.captions = list(self.images), list(self.captions)
        if not self.images:
            raise ValueError("a validation set needs at least one image")
        if len(self.images) != len(self.captions):
            raise ValueError(
                f"a validation set has {len(self.images)} images but {len(self.captions)} captions; give one caption per image ('' for none)"
            )
        self.names = list(self.names) if self.names is not None else [f"image {index}" for index in range(len(self.images))]
        if len(self.names) != len(self.images):
            raise ValueError(f"{len(self.names)} names for {len(self.images)} validation images")
        for image, caption, name in zip(self.images, self.captions, self.names):
            if not isinstance(caption, str):
                raise ValueError(f"the caption of validation {name} must be a string, got {caption!r}")
            if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
                shown = f"{tuple(image.shape)} {image.dtype}" if torch.is_tensor(image) else type(image).__name__
                raise ValueError(f"validation {name} must be a (3, H, W) float tensor in [0, 1], got {shown}")
            if not torch.isfinite(image).all() or image.min() < 0 or image.max() > 1:
                raise ValueError(f"validation {name} has values outside [0, 1] (or NaN): give (3, H, W) in [0, 1], not [-1, 1] or 0..255")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, size: int | tuple[int, int], caption_extension: str = ".txt") -> ValidationSet:
        """Every image in `path` (png/jpg/jpeg/webp/bmp, sorted by name) with its caption from the same-stem text file
        (kohya's and diffusers' convention), scaled so the shorter side fits and centre-cropped to `size` (h, w).

        A missing caption file means an empty caption (kohya trains such images unconditioned), with one warning
        naming how many lack one. The size must also fit the model's latent grid; ValidationLoss checks that.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"validation folder {folder} does not exist or is not a folder")
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        if not all(isinstance(side, int) and side > 0 for side in (height, width)):
            raise ValueError(f"size must be a positive int or (height, width) of positive ints, got {size!r}")
        extension = caption_extension if caption_extension.startswith(".") else "." + caption_extension
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in validation folder {folder}")
        captions, missing = [], []
        for file in files:
            caption_file = file.with_suffix(extension)
            if not caption_file.is_file():
                missing.append(file.name)
            captions.append(caption_file.read_text(encoding="utf-8").strip() if caption_file.is_file() else "")
        if missing:
            warnings.warn(
                f"{len(missing)} of {len(files)} validation images in {folder} have no {extension} caption (e.g. {missing[0]}); "
                "they are validated with an empty caption", UserWarning, stacklevel=2,
            )
        images = [_fit(read_image(file), height, width) for file in files]
        return cls(images=images, captions=captions, names=[file.name for file in files])


def _fit(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Scale so that the image covers (height, width), then crop the middle: the aspect ratio is kept."""
    h, w = image.shape[1:]
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = torch.nn.functional.interpolate(image[None], size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)[0]
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return image[:, top : top + height, left : left + width].clamp(0, 1).contiguous()


@dataclass
class _Conditioning:
    """The denoiser's arguments as the pipeline passed them for one caption and size (latents and timestep left blank)."""

    signature: inspect.Signature
    arguments: dict[str, Any]
    sample_name: str
    sample_shape: tuple[int, ...]
    sample_dtype: torch.dtype
    timestep_dtype: torch.dtype

    @property
    def packed(self) -> bool:  # Flux, Chroma, Qwen: (B, tokens, C * 4), 2x2 latent patches packed by the pipeline
        return len(self.sample_shape) == 3


class _Captured(Exception):
    """Raised by the pre-hook to stop the pipeline at its denoiser's first call, carrying that call's arguments."""


class ValidationLoss:
    """Mean over fixed noise levels of the family's training loss on each validation image (lower is better).

    `renderer` is the monitor's PreviewRenderer (its pipeline supplies the conditioning); `timesteps` are noise
    levels in (0, 1] (DDPM timestep round(level * num_train_timesteps), flow sigma = level); `batch_size`
    counts (image, level) pairs per denoiser forward. Call `prepare()` while the text encoders exist (the
    monitor does, before it releases them); then each call returns one loss per image (`base=True`: with every
    LoRA off). Training state is left as it was: RNG states, train/eval flags, requires_grad.
    """

    name = "val_loss"
    higher_is_better = False

    def __init__(
        self, renderer, data: ValidationSet, *, timesteps: Sequence[float] = DEFAULT_LEVELS, seed: int = 0, batch_size: int = 4
    ) -> None:
        if not isinstance(data, ValidationSet):
            raise TypeError(f"data must be a ValidationSet (from_folder(...) or ValidationSet(images=, captions=)), got {type(data).__name__}")
        levels = tuple(float(level) for level in timesteps)
        if not levels or not all(0 < level <= 1 for level in levels):
            raise ValueError(f"timesteps must be noise levels in (0, 1] (0.5: DDPM timestep 500, flow sigma 0.5), got {tuple(timesteps)!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        family, grid = renderer.family, renderer.vae_scale_factor
        for image, name in zip(data.images, data.names):
            if image.shape[1] % grid or image.shape[2] % grid:
                raise ValueError(
                    f"validation {name} is {image.shape[2]}x{image.shape[1]}; a {family.name!r} model needs width and height divisible by "
                    f"{grid} (its VAE's downsampling times its latent patch): pass ValidationSet.from_folder a size= multiple of {grid}"
                )
        self.renderer, self.data, self.timesteps, self.seed, self.batch_size = renderer, data, levels, seed, batch_size
        self.family = family
        self.latents: list[torch.Tensor] | None = None  # after prepare(): each image's normalised (C, h, w) latent, CPU float32
        self._conditioning: dict[tuple[str, int, int], _Conditioning] = {}
        if family.flow_matching:
            self._timestep_scale = family.flow_timestep_scale * float(renderer.denoiser.config.get("timestep_scale", 1.0))
        else:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler.from_config(renderer.pipeline.scheduler.config)  # our own instance: no training state touched
            self._alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
            self._prediction_type = scheduler.config.prediction_type
            if self._prediction_type not in ("epsilon", "v_prediction", "sample"):
                raise ValueError(f"unknown prediction_type {self._prediction_type!r} in the scheduler config; expected epsilon, v_prediction, sample")

    # ----------------------------------------------------------------- preparation
    def prepare(self) -> None:
        """Encode every image through the VAE once and capture each caption's conditioning; call it before the
        loop frees its text encoders (captions with a LoRA'd text encoder are re-encoded at every evaluation)."""
        vae = self.renderer.pipeline.vae
        with preserved_rng_state(), eval_mode(vae), torch.no_grad(), self.renderer.autocast():
            self.latents = [self._encode_image(image) for image in self.data.images]
        self._conditioning = self._capture_all()

    def _encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """The latent the denoiser sees in training: the distribution's mode (no sampling noise), normalised as the
        pipeline un-normalises before decoding. Kept on the CPU in float32."""
        vae = self.renderer.pipeline.vae
        weight = next(vae.parameters())
        pixels = (image * 2 - 1)[None].to(weight.device, weight.dtype)
        output = vae.encode(pixels[:, :, None] if self.family.video_vae else pixels)
        latent = output.latent_dist.mode() if hasattr(output, "latent_dist") else output.latent  # Sana's DC-AE has no distribution
        latent = latent[:, :, 0] if self.family.video_vae else latent
        config = vae.config
        mean, std, scale = config.get("latents_mean"), config.get("latents_std"), config.get("scaling_factor") or 1.0
        latent = latent.float().cpu()
        if mean is not None and std is not None:  # SDXL-style per-channel statistics; Qwen's (no scaling factor)
            view = (1, -1, 1, 1)
            return ((latent - torch.tensor(mean).view(view)) * scale / torch.tensor(std).view(view))[0]
        return ((latent - (config.get("shift_factor") or 0.0)) * scale)[0]

    def _key(self, index: int) -> tuple[str, int, int]:
        image = self.data.images[index]
        return self.data.captions[index], image.shape[1], image.shape[2]

    def _capture_all(self) -> dict[tuple[str, int, int], _Conditioning]:
        renderer = self.renderer
        if not renderer.text_encoders:
            raise RuntimeError(
                "the validation captions cannot be encoded: the text encoders were released before ValidationLoss.prepare() ran; "
                "prepare it before renderer.encode(..., release=True) (the monitor does when given the validation set at build time)"
            )
        captured = {}
        with preserved_rng_state(), eval_mode(renderer.denoiser, *renderer.text_encoders), torch.no_grad(), renderer.autocast():
            for index in range(len(self.data)):
                key = self._key(index)
                if key not in captured:
                    captured[key] = self._capture(*key)
                expected = self.latents[index][None]
                expected = _pack(expected) if captured[key].packed else expected
                if tuple(expected.shape) != captured[key].sample_shape:
                    raise RuntimeError(
                        f"the {renderer.family.pipeline} makes {captured[key].sample_shape} latents for a {key[2]}x{key[1]} image, but its VAE "
                        f"encodes validation {self.data.names[index]} to {tuple(self.latents[index].shape)}"
                    )
        return captured

    def _capture(self, caption: str, height: int, width: int) -> _Conditioning:
        """Run the pipeline for `caption` without guidance (what training conditions on) up to its denoiser's first call."""
        renderer, family = self.renderer, self.family
        denoiser = renderer.denoiser
        embeddings = {name: value.to(denoiser.device) for name, value in renderer._encode_call([caption], None).items() if value is not None}
        for name in family.encode_outputs:  # a mask the encoder left out (every token valid) is all ones, as in renders
            embeds = (name or "").replace("_attention_mask", "_embeds").replace("_embeds_mask", "_embeds")
            if name and name.endswith("mask") and name not in embeddings and embeds in embeddings:
                embeddings[name] = torch.ones(embeddings[embeds].shape[:2], dtype=torch.long, device=denoiser.device)
        arguments = {**family.call_arguments, "num_inference_steps": 1, "height": height, "width": width, "output_type": "latent"}
        arguments[family.cfg_argument] = 1.0  # no guidance: training conditions on the caption alone
        if family.distilled_argument:  # guidance-distilled (Flux dev): trained at its default embedded guidance, as kohya does
            arguments[family.distilled_argument] = family.distilled_default
        if "negative_prompt" in renderer._call_parameters:
            arguments["negative_prompt"] = None

        def stop(module, args, kwargs):
            raise _Captured(args, kwargs)

        handle = denoiser.register_forward_pre_hook(stop, with_kwargs=True)
        try:
            renderer.pipeline(**embeddings, **arguments, generator=torch.Generator().manual_seed(0))
        except _Captured as captured:
            args, kwargs = captured.args
        else:
            raise RuntimeError(f"the {family.pipeline} returned without calling its {family.denoiser}")
        finally:
            handle.remove()
        signature = inspect.signature(denoiser.forward)
        bound = signature.bind(*args, **kwargs)
        sample_name = next(iter(signature.parameters))
        sample, timestep = bound.arguments[sample_name], bound.arguments["timestep"]
        bound.arguments[sample_name] = bound.arguments["timestep"] = None  # ours go in at each call
        return _Conditioning(
            signature=signature,
            arguments=_to(dict(bound.arguments), "cpu"),
            sample_name=sample_name,
            sample_shape=tuple(sample.shape),
            sample_dtype=sample.dtype,
            timestep_dtype=timestep.dtype if torch.is_tensor(timestep) else torch.float32,
        )

    # ----------------------------------------------------------------- the objective
    def noised(self, latents: torch.Tensor, noise: torch.Tensor, levels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The family's training objective at noise `levels` in (0, 1], one per latent: (noisy latents, regression
        target, the timestep the denoiser is fed), for (B, C, H, W) latents and noise on the CPU."""
        family, levels = self.family, levels.to(torch.float64)
        if family.flow_matching:
            sigma = levels.float().view(-1, 1, 1, 1)
            noisy = (1 - sigma) * latents + sigma * noise
            target = latents - noise if family.flow_reversed else noise - latents
            fed = (1 - levels if family.flow_reversed else levels) * self._timestep_scale
            return noisy, target, fed.float()
        steps = len(self._alphas_cumprod)
        timestep = (levels * steps).round().clamp(max=steps - 1).long()
        alpha = self._alphas_cumprod[timestep].view(-1, 1, 1, 1)
        signal, spread = alpha.sqrt().float(), (1 - alpha).sqrt().float()
        noisy = signal * latents + spread * noise
        target = {"epsilon": noise, "v_prediction": signal * noise - spread * latents, "sample": latents}[self._prediction_type]
        return noisy, target, timestep

    def item_losses(self, indices: Sequence[int], levels: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The MSE of the denoiser's prediction for validation images `indices` at noise `levels` with `noise`
        (B, C, H, W), one per item, in the caller's grad and train/eval mode: the objective itself, for reuse."""
        if self.latents is None or not self._conditioning:
            raise RuntimeError("call ValidationLoss.prepare() first")
        conditions = [self._conditioning[self._key(index)] for index in indices]
        first, denoiser = conditions[0], self.renderer.denoiser
        latents = torch.stack([self.latents[index] for index in indices])
        noisy, target, timestep = self.noised(latents, noise.float().cpu(), levels)
        if first.packed:
            noisy, target = _pack(noisy), _pack(target)
        arguments = _to(_merge([condition.arguments for condition in conditions]), denoiser.device)
        arguments[first.sample_name] = noisy.to(denoiser.device, first.sample_dtype)
        arguments["timestep"] = timestep.to(denoiser.device, first.timestep_dtype)
        bound = inspect.BoundArguments(first.signature, arguments)
        output = denoiser(*bound.args, **bound.kwargs)
        prediction = (output[0] if isinstance(output, (tuple, list)) else output.sample).float()
        if prediction.dim() == 4 and prediction.shape[1] == 2 * target.shape[1]:  # learned variance: the mean is the first half
            prediction = prediction[:, : target.shape[1]]
        if prediction.shape != target.shape:
            raise RuntimeError(f"the {self.family.denoiser} predicted {tuple(prediction.shape)} for a {tuple(target.shape)} target")
        return (prediction - target.to(prediction.device)).square().flatten(1).mean(1)

    def _noise(self, index: int, level: int) -> torch.Tensor:
        """Noise fixed by (seed, image, level) alone: the same whatever the batch, order or device."""
        digest = hashlib.sha256(f"{self.seed}/{index}/{level}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return torch.randn(self.latents[index].shape, generator=generator)

    # ----------------------------------------------------------------- evaluation
    def __call__(self, *, base: bool = False) -> list[float]:
        """One loss per validation image, the mean over the noise levels; with `base`, every LoRA switched off."""
        if self.latents is None:
            self.prepare()
        renderer = self.renderer
        switch = lora_disabled(*renderer.lora_modules) if base else contextlib.nullcontext()
        totals = [0.0] * len(self.data)
        modules = (renderer.denoiser, *renderer.text_encoders)
        with preserved_rng_state(), eval_mode(*modules), torch.no_grad(), renderer.autocast(), switch:
            if renderer.live_encoders:  # a text encoder with a LoRA: its captions change with it (and with base)
                self._conditioning = self._capture_all()
            items = [(index, level) for index in range(len(self.data)) for level in range(len(self.timesteps))]
            for batch in self._batches(items):
                levels = torch.tensor([self.timesteps[level] for _, level in batch], dtype=torch.float64)
                noise = torch.stack([self._noise(index, level) for index, level in batch])
                losses = self.item_losses([index for index, _ in batch], levels, noise).tolist()
                for (index, _), value in zip(batch, losses):
                    totals[index] += value
        empty_device_cache()
        return [total / len(self.timesteps) for total in totals]

    def _batches(self, items: list[tuple[int, int]]) -> Iterator[list[tuple[int, int]]]:
        """Consecutive items, batch_size at most, whose conditionings stack (same shapes; shared values equal)."""
        batch: list[tuple[int, int]] = []
        for item in items:
            if batch and (len(batch) == self.batch_size or not self._stackable(batch[0][0], item[0])):
                yield batch
                batch = []
            batch.append(item)
        if batch:
            yield batch

    def _stackable(self, first: int, other: int) -> bool:
        a, b = self._key(first), self._key(other)
        return a == b or (
            self.latents[first].shape == self.latents[other].shape
            and _compatible(self._conditioning[a].arguments, self._conditioning[b].arguments)
        )


# --------------------------------------------------------------------- helpers
def _pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C * 4): 2x2 latent patches as tokens, channels before the patch position,
    the order Flux, Chroma and Qwen-Image pipelines pack in."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def _batched(value: Any) -> bool:
    """A captured argument with the batch's one row (captured for one caption); others are shared (position ids...)."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == 1


def _to(value: Any, device) -> Any:
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(item, device) for item in value)
    return value


def _compatible(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_compatible(a[key], b[key]) for key in a)
    if torch.is_tensor(a):
        if not torch.is_tensor(b) or a.dtype != b.dtype or _batched(a) != _batched(b):
            return False
        return a.shape[1:] == b.shape[1:] if _batched(a) else a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, list) and len(a) == 1:  # per-row lists (Qwen's img_shapes, txt_seq_lens)
        return isinstance(b, list) and len(b) == 1
    try:
        return bool(a == b)
    except Exception:  # values that do not compare (tuples of tensors...) are never stacked
        return False


def _merge(values: list[Any]) -> Any:
    """Stack per-caption arguments along the batch: one-row tensors and lists concatenated, shared values once."""
    first = values[0]
    if isinstance(first, dict):
        return {key: _merge([value[key] for value in values]) for key in first}
    if _batched(first):
        return torch.cat(values)
    if isinstance(first, list) and len(first) == 1:
        return [item for value in values for item in value]
    return first
