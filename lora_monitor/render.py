"""Render preview images with the modules already in memory, without disturbing training.

The renderer wraps the training denoiser (UNet or transformer), VAE, text encoders and tokenizers in
the diffusers pipeline of their family (see families.py): a pipeline holds references to its
modules, so nothing is loaded or copied. Only the sampler is its own (a new scheduler from the
training scheduler's config), so rendering never changes the scheduler the training loop uses.
Every render runs in eval mode under no_grad, with one CPU torch.Generator per image, and puts
back the modules' train/eval flags, the grad mode and the global RNG states (python, numpy,
torch CPU and CUDA) afterwards.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import random
import warnings
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from lora_monitor.families import Family, check_components, detect_family, get_family, pipeline_arguments
from lora_monitor.spec import PreviewPrompt, PreviewSpec

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
    """Turn every peft LoRA layer in `modules` off (the base model) and restore each layer's state on exit.

    peft's enable_adapters(True) marks every active adapter weight trainable; each parameter's own
    requires_grad is put back, so a frozen lora_A (LoRA-FA) or a frozen text-encoder LoRA stays frozen.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [sub for module in modules for sub in module.modules() if isinstance(sub, BaseTunerLayer)]
    if not layers:
        raise ValueError(
            "no peft LoRA layers found in the denoiser or text encoders: add the adapter (e.g. unet.add_adapter(LoraConfig(...)) "
            "or transformer.add_adapter(...)) before building the monitor, or pass base_references= rendered from the base model"
        )
    states = [(layer, layer.disable_adapters) for layer in layers]
    grads = [(parameter, parameter.requires_grad) for layer in layers for parameter in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer, disabled in states:
            layer.enable_adapters(not disabled)
        for parameter, requires_grad in grads:
            parameter.requires_grad_(requires_grad)


def has_lora(module: torch.nn.Module | None) -> bool:
    """Whether `module` holds any peft LoRA layer."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return module is not None and any(isinstance(sub, BaseTunerLayer) for sub in module.modules())


@contextlib.contextmanager
def guarded_vae_decode(vae: torch.nn.Module, report: dict[str, Any]) -> Iterator[None]:
    """Decode one image at a time (peak memory of one image, not the batch) and, where the VAE sits in
    float16 and its config asks for upcasting (fp16 decodes overflow into NaN), in float32 with autocast
    off. The VAE's weights go back to their dtype on exit (fp16 -> fp32 -> fp16 is exact). Sets
    report["vae_overflow"] when finite latents decode to non-finite pixels."""
    decode = vae.decode
    dtype = next(vae.parameters()).dtype
    upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))

    def one_at_a_time(latents: torch.Tensor, *args, **kwargs):
        decode_dtype = next(vae.parameters()).dtype
        outputs = []
        with torch.autocast(latents.device.type, enabled=False) if upcast else contextlib.nullcontext():
            for latent in latents.split(1):
                output = decode(latent.to(decode_dtype), *args, **kwargs)
                outputs.append(output[0] if isinstance(output, tuple) else output.sample)
        sample = torch.cat(outputs)
        if torch.isfinite(latents).all() and not torch.isfinite(sample).all():
            report["vae_overflow"] = str(decode_dtype).replace("torch.", "")
        sample = sample.to(latents.dtype) if upcast else sample
        if kwargs.get("return_dict", True) is False:
            return (sample,)
        from diffusers.models.autoencoders.vae import DecoderOutput

        return DecoderOutput(sample=sample)

    own = vae.__dict__.get("decode")  # a decode set on the instance before us is put back as it was
    vae.decode = one_at_a_time
    if upcast:
        vae.to(torch.float32)
    try:
        yield
    finally:
        if own is None:
            del vae.decode
        else:
            vae.decode = own
        if upcast:
            vae.to(dtype)


def make_sampler(scheduler, sampler: str, family: Family):
    """A fresh scheduler for previews, never the training loop's own object.

    "default" is a new instance of the training scheduler's class from its config. Flow-matching
    families accept only that: a DDIM or Euler sampler built from a flow-matching config samples nonsense.
    """
    import diffusers

    if sampler == "default":
        return type(scheduler).from_config(scheduler.config)
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of default, {', '.join(SAMPLERS)}")
    if family.flow_matching:
        raise ValueError(
            f"sampler={sampler!r} is a noise-prediction sampler, but the {family.name!r} family is trained with flow matching: "
            f"previews use its own {type(scheduler).__name__}; pass sampler='default' (or leave it out)"
        )
    return getattr(diffusers, SAMPLERS[sampler]).from_config(scheduler.config)


def default_sampler(family: Family) -> str:
    """SD-style UNets render with DDIM (as they always have here); flow-matching families with their own scheduler."""
    return "default" if family.flow_matching else "ddim"


class PreviewRenderer:
    """Renders a PreviewSpec with in-memory diffusers modules of any family; returns (3, H, W) float32 in [0, 1] on the CPU.

    `components` are the pipeline's modules by name (unet= or transformer=, vae=, scheduler=, text_encoder=,
    tokenizer=, text_encoder_2=, ...), the training modules themselves (unwrapped from DDP/accelerate): the
    renderer keeps references, never copies. `family` is detected from the denoiser when left out.

    Prompt embeddings: when no text encoder carries a LoRA, each preview prompt is encoded once and reused;
    `encode(spec, release=True)` then lets go of the text encoders, so a loop may delete them to free memory.
    A text encoder with a LoRA is encoded again at each render (with the LoRA off for base renders).
    `autocast` is a context factory (e.g. accelerator.autocast) for mixed-precision training.
    """

    def __init__(
        self,
        *,
        family: Family | str | None = None,
        sampler: str | None = None,
        batch_size: int = 4,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        progress: bool = False,
        **components: Any,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        components = {name: module for name, module in components.items() if module is not None}
        self.family = get_family(family) if family is not None else detect_family(components=components)
        check_components(self.family, components)
        pipeline_class = self.family.pipeline_class()
        self.sampler = sampler or default_sampler(self.family)
        self.batch_size = batch_size
        self.autocast = autocast or contextlib.nullcontext
        self.progress = progress
        arguments = pipeline_arguments(pipeline_class)
        build = {name: components.get(name) for name in self.family.components}
        build["scheduler"] = make_sampler(components["scheduler"], self.sampler, self.family)
        build.update(self.family.extra_components)
        self.pipeline = pipeline_class(**{name: value for name, value in build.items() if name in arguments})
        self.pipeline.set_progress_bar_config(disable=True)
        self._call_parameters = set(inspect.signature(self.pipeline.__call__).parameters)
        self._embeddings: dict[tuple[str, str, bool], dict[str, torch.Tensor]] = {}
        self.vae_report: dict[str, Any] = {}

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipeline, self.family.denoiser)

    @property
    def unet(self) -> torch.nn.Module:  # the SD name, kept for callers that know only SD
        return self.denoiser

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return [module for name in self.family.encoder_names if (module := getattr(self.pipeline, name, None)) is not None]

    @property
    def live_encoders(self) -> list[str]:
        """Text encoders that carry a LoRA (trained, or loaded later): encoded at every render, never cached."""
        return [name for name in self.family.encoder_names if has_lora(getattr(self.pipeline, name, None))]

    @property
    def lora_modules(self) -> list[torch.nn.Module]:
        """The denoiser and every text encoder that carries a LoRA: what a base render switches off."""
        return [self.denoiser] + [getattr(self.pipeline, name) for name in self.live_encoders]

    @property
    def vae_scale_factor(self) -> int:
        """What preview sizes must divide by: the VAE's downsampling times the denoiser's latent patch."""
        return getattr(self.pipeline, "vae_scale_factor", 8) * self.family.latent_patch

    def check_spec(self, spec: PreviewSpec) -> None:
        """Fail before training when a preview size does not fit this model's latent grid."""
        factor = self.vae_scale_factor
        for index, prompt in enumerate(spec.prompts):
            if prompt.width % factor or prompt.height % factor:
                raise ValueError(
                    f"preview {index} ({prompt.prompt!r}) is {prompt.width}x{prompt.height}; a {self.family.name!r} model needs "
                    f"width and height divisible by {factor}"
                )

    # ----------------------------------------------------------------- prompt embeddings
    def cfg_scale(self, prompt: PreviewPrompt) -> float:
        return self.family.cfg_default if prompt.guidance_scale is None else prompt.guidance_scale

    def _needs_negative(self, prompt: PreviewPrompt) -> bool:
        return not self.family.cfg_needs_negative or self.cfg_scale(prompt) > 1

    def _encode_call(self, texts: list[str], negatives: list[str] | None) -> dict[str, torch.Tensor]:
        """pipeline.encode_prompt on `texts` with the call's own defaults (sequence length, system prompt...),
        its tuple named by the family entry."""
        pipeline = self.pipeline
        encode_parameters = inspect.signature(pipeline.encode_prompt).parameters
        call_parameters = inspect.signature(pipeline.__call__).parameters
        kwargs: dict[str, Any] = {
            name: call_parameters[name].default
            for name in encode_parameters
            if name in call_parameters and call_parameters[name].default is not inspect.Parameter.empty
            and not name.startswith(("prompt", "negative_")) and name not in ("lora_scale", "device", "dtype")
        }
        kwargs.update({name: value for name, value in self.family.call_arguments.items() if name in encode_parameters})
        device = self.text_encoders[0].device  # where the encoders are; the embeddings move to the denoiser when rendered
        wanted = {"prompt": texts, "device": device, "num_images_per_prompt": 1, "do_classifier_free_guidance": negatives is not None}
        if negatives is not None and self.family.negative_outputs is None:
            # no negative text is what a plain pipe(prompt) call passes (its default: None for SD/SDXL/SD3, "" for
            # Sana): SDXL then uses zero embeddings (force_zeros_for_empty_prompt) where "" would be encoded
            parameter = call_parameters.get("negative_prompt")
            default = None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default
            wanted["negative_prompt"] = negatives if any(negatives) else default
        # prompt_2, prompt_3, negative_prompt_2...: None means "the same text" to every pipeline (SD3 has no default)
        wanted.update({name: None for name in encode_parameters if name.startswith(("prompt_", "negative_prompt_")) and name[-1].isdigit()})
        kwargs.update({name: value for name, value in wanted.items() if name in encode_parameters})
        outputs = pipeline.encode_prompt(**kwargs)
        result = dict(zip(self.family.encode_outputs, outputs))
        if negatives is not None and self.family.negative_outputs is not None:
            negative = self._encode_call(negatives, None)
            result.update({neg: negative.get(pos) for pos, neg in zip(self.family.encode_outputs, self.family.negative_outputs)})
        return {name: value for name, value in result.items() if name is not None}

    def _prompt_embeddings(self, prompt: PreviewPrompt) -> dict[str, torch.Tensor]:
        key = (prompt.prompt, prompt.negative_prompt, self._needs_negative(prompt))
        if key in self._embeddings and not self.live_encoders:
            return self._embeddings[key]
        if not self.text_encoders:
            raise RuntimeError(
                f"preview prompt {prompt.prompt!r} was not encoded before the text encoders were released; "
                "give the monitor every preview prompt when it is built"
            )
        negatives = [prompt.negative_prompt] if self._needs_negative(prompt) else None
        embeddings = {name: tensor if tensor is None else tensor.detach() for name, tensor in self._encode_call([prompt.prompt], negatives).items()}
        if not self.live_encoders:
            self._embeddings[key] = embeddings
        return embeddings

    def encode(self, spec: PreviewSpec, *, release: bool = False) -> None:
        """Encode every preview prompt now (frozen text encoders only) and, with `release`, drop this renderer's
        references to the text encoders so that the training loop can free them."""
        if self.live_encoders:
            return
        with preserved_rng_state(), eval_mode(*self.text_encoders), torch.no_grad(), self.autocast():
            for prompt in spec.prompts:
                self._prompt_embeddings(prompt)
        if release:
            for name in self.family.encoder_names:
                setattr(self.pipeline, name, None)

    def embeddings_digest(self) -> str:
        """A digest of the cached prompt embeddings (what the frozen text encoders contribute to a render)."""
        digest = hashlib.sha256()
        for key in sorted(self._embeddings):
            digest.update(repr(key).encode())
            for name, tensor in sorted((name, tensor) for name, tensor in self._embeddings[key].items() if tensor is not None):
                digest.update(f"{name}:{tensor.to('cpu', torch.float64).sum().item():.10e}".encode())
        return digest.hexdigest()

    def _batch_embeddings(self, batch: Sequence[int], spec: PreviewSpec) -> dict[str, torch.Tensor]:
        """The batch's embeddings side by side. Sequences of different lengths (Qwen trims to the text) are
        zero-padded at the end; a mask an encoder left out (all tokens valid) is all ones."""
        per_prompt = [self._prompt_embeddings(spec.prompts[i]) for i in batch]
        device = self.denoiser.device
        merged = {}
        for name in per_prompt[0]:
            tensors = [embeddings[name] for embeddings in per_prompt]
            if name.endswith("mask"):  # a mask an encoder left out (every token valid) is all ones: pipelines need it to pad
                embeds = name.replace("_attention_mask", "_embeds").replace("_embeds_mask", "_embeds")
                tensors = [
                    torch.ones(embeddings[embeds].shape[:2], dtype=torch.long, device=embeddings[embeds].device)
                    if tensor is None and embeddings.get(embeds) is not None else tensor
                    for tensor, embeddings in zip(tensors, per_prompt)
                ]
            if any(tensor is None for tensor in tensors):
                continue
            if tensors[0].dim() >= 2 and len({t.shape[1] for t in tensors}) > 1:
                length = max(t.shape[1] for t in tensors)
                tensors = [torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, length - t.shape[1])) for t in tensors]
            merged[name] = torch.cat(tensors).to(device)
        return merged

    # ----------------------------------------------------------------- rendering
    def call_arguments(self, prompt: PreviewPrompt) -> dict[str, Any]:
        """The pipeline call's arguments for `prompt` besides prompts/embeddings and generators."""
        family = self.family
        arguments = {
            **family.call_arguments,
            "num_inference_steps": prompt.steps,
            "width": prompt.width,
            "height": prompt.height,
            family.cfg_argument: self.cfg_scale(prompt),
            "output_type": "pt",
        }
        if "negative_prompt" in self._call_parameters:  # embeddings go in; a default negative text would clash (Sana's is "")
            arguments["negative_prompt"] = None
        if family.distilled_argument:
            arguments[family.distilled_argument] = (
                family.distilled_default if prompt.distilled_guidance is None else prompt.distilled_guidance
            )
        return arguments

    def render(self, spec: PreviewSpec, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Render the previews at `indices` (all by default), in batches of prompts that share a size and settings.

        Returns one (3, H, W) tensor per requested index, in the order of `indices`. A batch that runs out of
        device memory is tried again in halves (and later batches keep the smaller size), with one warning.
        """
        wanted = list(range(len(spec))) if indices is None else list(indices)
        wanted_set = set(wanted)
        images: dict[int, torch.Tensor] = {}
        modules = [self.denoiser, self.pipeline.vae, *self.text_encoders]
        bar = _progress(len(wanted), "previews", self.progress)
        with preserved_rng_state(), eval_mode(*modules), torch.no_grad(), self.autocast(), guarded_vae_decode(self.pipeline.vae, self.vae_report):
            pending = [[i for i in batch if i in wanted_set] for batch in spec.batches(len(spec))]
            pending = [batch for batch in pending if batch]
            while pending:
                group = pending.pop(0)
                batch, rest = group[: self.batch_size], group[self.batch_size :]
                if rest:
                    pending.insert(0, rest)
                try:
                    for i, image in zip(batch, self._render_batch(spec, batch)):
                        images[i] = image
                except OUT_OF_MEMORY as error:
                    if len(batch) == 1:
                        raise PreviewOutOfMemoryError(
                            f"rendering one {spec.prompts[batch[0]].width}x{spec.prompts[batch[0]].height} preview ran out of device "
                            "memory; use smaller or fewer-step previews, or render less often"
                        ) from error
                    self.batch_size = max(1, len(batch) // 2)
                    empty_device_cache()
                    warnings.warn(
                        f"rendering {len(batch)} previews at once ran out of device memory; retrying {self.batch_size} at a time",
                        RuntimeWarning,
                        stacklevel=2,
                    )
                    pending.insert(0, batch)
                    continue
                bar.update(len(batch))
        bar.close()
        empty_device_cache()
        return [images[i] for i in wanted]

    def _render_batch(self, spec: PreviewSpec, batch: Sequence[int]) -> list[torch.Tensor]:
        first = spec.prompts[batch[0]]
        output = self.pipeline(
            **self._batch_embeddings(batch, spec),
            **self.call_arguments(first),
            generator=[torch.Generator(device="cpu").manual_seed(spec.prompts[i].seed) for i in batch],
        )
        return [image.detach().float().cpu() for image in output.images]

    def render_base(self, spec: PreviewSpec, indices: Sequence[int] | None = None) -> list[torch.Tensor]:
        """Render the same previews with every LoRA layer switched off (denoiser and text encoders): the base model's images."""
        with lora_disabled(*self.lora_modules):
            return self.render(spec, indices)


OUT_OF_MEMORY = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


class PreviewOutOfMemoryError(RuntimeError):
    """Even one preview at a time does not fit in device memory (the monitor then skips that evaluation)."""


def empty_device_cache() -> None:
    """Hand cached device memory back after rendering, so training gets it back."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _progress(total: int, unit: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc="rendering", disable=not enabled, leave=False)
