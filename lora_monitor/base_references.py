"""The base model's previews (LoRA off): what SSIM compares each epoch's previews with and relative bounds
('0.9x') multiply.

`BaseReferences` is the part of LoraMonitor (lora_monitor/monitor.py) that renders them once, keys them
(`base_key`: spec, family, sampler, base weights), caches them as PNGs in the output folder with that key
(previews/base/ and base.json, so a restarted run does not render them again), takes them from outside
(`set_base_references`) and scores them once (base_scores.json). Not a class to use alone: it reads the
monitor's spec, renderer, record, policy and scorers.
"""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Sequence

import torch

from lora_monitor import distributed
from lora_monitor import export as exporting
from lora_monitor.evaluation import quantize
from lora_monitor.policy import AGGREGATES
from lora_monitor.record import from_pil, json_number, save_png_atomic


class BaseReferences:
    """LoraMonitor's base renders: rendered or read from the cache, set from outside, scored once."""

    def base_key(self) -> str:
        """Identifies the base renders: the spec, the family, the sampler and its config, the base weights
        (LoRA parameters excluded) of the denoiser, the VAE and any live text encoder with their dtypes, and
        the cached prompt embeddings of frozen ones."""
        if self.renderer is None:
            raise ValueError("base_key() needs the diffusers modules; without them base renders come from set_base_references()")
        renderer = self.renderer
        digest = hashlib.sha256()
        digest.update(self.spec.fingerprint().encode())
        digest.update(f"{self.family.name}:{renderer.sampler}:{renderer.pipeline.scheduler.config}".encode())
        digest.update(renderer.embeddings_digest().encode())
        with torch.no_grad():
            for module in (renderer.denoiser, renderer.pipeline.vae, *renderer.text_encoders):
                for name, parameter in module.named_parameters():
                    if "lora_" not in name:
                        # MPS has no float64: sum there in float32 (the key only has to be stable on one machine)
                        total = parameter.sum(dtype=torch.float32 if parameter.device.type == "mps" else torch.float64)
                        digest.update(f"{name}:{parameter.dtype}:{total.item():.10e}".encode())
        return digest.hexdigest()[:16]

    def base_references(self) -> list[torch.Tensor]:
        """The base model's previews (LoRA off): from memory, else from the output dir when the key matches, else
        rendered (with several processes: each renders its share, all get the whole set, the main process saves)."""
        if self._base_images is not None:
            return self._base_images
        if self.renderer is None:
            raise ValueError(
                "no base references: this monitor has no diffusers modules to render them; "
                "call set_base_references(images) with the base model's renders first"
            )
        key = self.base_key()
        paths = self.record.preview_paths(None, [p.seed for p in self.spec.prompts])
        key_file = self.record.preview_dir(None) / "base.json"
        images = distributed.broadcast_checked(lambda: self._cached_base(key, paths, key_file), what="reading the cached base previews")
        if images is None:
            indices = self._share()
            images = distributed.gather_images(
                indices, lambda: self.renderer.render_base(self.spec, indices), len(self.spec), what="rendering the base previews"
            )

            def save() -> None:
                for image, path in zip(images, paths):
                    save_png_atomic(image, path)
                exporting.write_json_atomic(key_file, {"key": key, "spec_fingerprint": self.spec.fingerprint()})

            distributed.broadcast_checked(save, what="writing the base previews")
            self._warn_non_finite_base(images)
        self.set_base_references(images)
        return self._base_images

    def _cached_base(self, key: str, paths: Sequence[Path], key_file: Path) -> list[torch.Tensor] | None:
        """The base renders saved in the output dir when their key matches, else None."""
        if key_file.is_file() and all(path.is_file() for path in paths):
            if json.loads(key_file.read_text(encoding="utf-8")).get("key") == key:
                from PIL import Image

                return [from_pil(Image.open(path)) for path in paths]
        return None

    def set_base_references(self, images: Sequence[torch.Tensor]) -> None:
        """Use these base-model renders (LoRA off; one per prompt, same seeds) as the references."""
        if len(images) != len(self.spec):
            raise ValueError(f"got {len(images)} base images for {len(self.spec)} preview prompts")
        self._base_images = [quantize(image) for image in images]
        if self.is_main_process:
            self._notify("on_base_references", self._base_images)

    @property
    def has_base_references(self) -> bool:
        """Whether the base renders are in memory (rendered, loaded from the cache, or set)."""
        return self._base_images is not None

    @property
    def needs_references(self) -> bool:
        """Whether evaluations need the base renders: a scorer compares with them, or a bound is relative to the base."""
        return any(scorer.needs_reference for scorer in self.scorers) or self.policy.needs_base

    def _warn_non_finite_base(self, images: Sequence[torch.Tensor]) -> None:
        broken = [i for i, image in enumerate(images) if not torch.isfinite(image).all()]
        if not broken:
            return
        overflow = self.renderer.vae_report.get("vae_overflow")
        cause = (
            f"the VAE decode in {overflow} turned finite latents into NaN/inf: keep the VAE in float32 (vae.to(torch.float32)) "
            "or use a VAE made for half precision (for SDXL, madebyollin/sdxl-vae-fp16-fix)"
            if overflow
            else "the base model itself produced NaN/inf (check its dtype and weights)"
        )
        self._warn_once("base-non-finite", f"base preview(s) {broken} are not finite: {cause}; scores against them are NaN (the worst)")

    def _measure_base(self) -> None:
        """Score the base renders once (every signal, LoRA off): the values bounds like '0.9x' multiply, also
        written to base_scores.json and shown beside the epochs' scores."""
        if self.base_scores is not None or self._base_images is None:
            return
        base = self._base_images
        scores = self.score(base, base)
        scores.update(self._signals(base, base=True))
        self.base_scores = scores
        aggregate = AGGREGATES[self.policy.aggregate]
        self.policy.set_base({
            name: float(aggregate(values)) if all(math.isfinite(value) for value in values) else math.nan
            for name, values in scores.items()
        })
        if self.is_main_process:
            exporting.write_json_atomic(self.output_dir / "base_scores.json", {
                "scores": scores, "aggregates": {name: json_number(value) for name, value in self.policy.base.items()},
                "aggregate": self.policy.aggregate, "spec_fingerprint": self.spec.fingerprint(),
            })
