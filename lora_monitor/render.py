"""Render preview images with the modules already in memory, without disturbing training.

The renderer wraps the training UNet, VAE, text encoder and tokenizer in a StableDiffusionPipeline
object: a pipeline holds references to its modules, so nothing is loaded or copied. Only the
sampler is its own (built from the training scheduler's config), so rendering never changes the
scheduler the training loop uses. Every render runs in eval mode under no_grad, with one CPU
torch.Generator per image, and puts back the modules' train/eval flags, the grad mode and the
global RNG states (python, numpy, torch CPU and CUDA) afterwards.
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from lora_monitor.spec import PreviewSpec

SAMPLERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "pndm": "PNDMScheduler",
}


@contextlib.contextmanager
def preserved_rng_state() -> Iterator[None]:
    """Put back the python, numpy, torch CPU and CUDA random states on exit."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def eval_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Switch modules to eval mode and restore every submodule's own train/eval flag on exit."""
    flags = [(sub, sub.training) for module in modules for sub in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for sub, training in flags:
            sub.training = training


@contextlib.contextmanager
def lora_disabled(*modules: torch.nn.Module) -> Iterator[None]:
    """Turn every peft LoRA layer in `modules` off (the base model) and restore each layer's state on exit."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [sub for module in modules for sub in module.modules() if isinstance(sub, BaseTunerLayer)]
    if not layers:
        raise ValueError(
            "no peft LoRA layers found in the UNet or text encoder: add the adapter (unet.add_adapter(LoraConfig(...))) "
            "before building the monitor, or pass base_references= rendered from the base model"
        )
    states = [(layer, layer.disable_adapters) for layer in layers]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in states:
            layer.enable_adapters(not disabled)


def make_sampler(scheduler_config, sampler: str):
    """A fresh scheduler of the chosen kind from the training scheduler's config."""
    import diffusers

    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    return getattr(diffusers, SAMPLERS[sampler]).from_config(scheduler_config)


class PreviewRenderer:
    """Renders a PreviewSpec with in-memory diffusers modules; returns (N, 3, H, W) float32 in [0, 1] on the CPU.

    `unet` must be the training UNet itself (unwrapped from DDP/accelerate); the renderer keeps a
    reference, never a copy. `autocast` is a context factory (e.g. accelerator.autocast) for
    mixed-precision training where the frozen modules sit in half precision.
    """

    def __init__(
        self,
        *,
        unet: torch.nn.Module,
        vae: torch.nn.Module,
        text_encoder: torch.nn.Module,
        tokenizer,
        scheduler,
        sampler: str = "ddim",
        batch_size: int = 4,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        progress: bool = False,
    ) -> None:
        from diffusers import StableDiffusionPipeline

        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.sampler = sampler
        self.batch_size = batch_size
        self.autocast = autocast or contextlib.nullcontext
        self.progress = progress
        self.pipeline = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=make_sampler(scheduler.config, sampler),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipeline.set_progress_bar_config(disable=True)

    @property
    def unet(self) -> torch.nn.Module:
        return self.pipeline.unet

    @property
    def vae_scale_factor(self) -> int:
        return self.pipeline.vae_scale_factor

    def check_spec(self, spec: PreviewSpec) -> None:
        """Fail before training when a preview size does not fit this model's latent grid."""
        factor = self.vae_scale_factor
        for index, prompt in enumerate(spec.prompts):
            if prompt.width % factor or prompt.height % factor:
                raise ValueError(
                    f"preview {index} ({prompt.prompt!r}) is {prompt.width}x{prompt.height}; this model needs width and "
                    f"height divisible by {factor} (its VAE scale factor)"
                )

    def render(self, spec: PreviewSpec, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Render the previews at `indices` (all by default), in batches of prompts that share a size and settings.

        Returns one (3, H, W) tensor per requested index, in the order of `indices`.
        """
        wanted = list(range(len(spec))) if indices is None else list(indices)
        wanted_set = set(wanted)
        images: dict[int, torch.Tensor] = {}
        modules = [self.pipeline.unet, self.pipeline.vae, self.pipeline.text_encoder]
        batches = [[i for i in batch if i in wanted_set] for batch in spec.batches(self.batch_size)]
        batches = [batch for batch in batches if batch]
        bar = _progress(len(wanted), "previews", self.progress)
        with preserved_rng_state(), eval_mode(*modules), torch.no_grad(), self.autocast():
            for batch in batches:
                first = spec.prompts[batch[0]]
                output = self.pipeline(
                    prompt=[spec.prompts[i].prompt for i in batch],
                    negative_prompt=[spec.prompts[i].negative_prompt for i in batch],
                    num_inference_steps=first.steps,
                    guidance_scale=first.guidance_scale,
                    width=first.width,
                    height=first.height,
                    generator=[torch.Generator(device="cpu").manual_seed(spec.prompts[i].seed) for i in batch],
                    output_type="pt",
                )
                for i, image in zip(batch, output.images):
                    images[i] = image.detach().float().cpu()
                bar.update(len(batch))
        bar.close()
        return [images[i] for i in wanted]

    def render_base(self, spec: PreviewSpec, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Render the same previews with every LoRA layer switched off: the base model's images."""
        with lora_disabled(self.pipeline.unet, self.pipeline.text_encoder):
            return self.render(spec, indices)


def _progress(total: int, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc="rendering", disable=not enabled, leave=False)
