"""Model families as data: the only place that knows SD from SDXL from Flux.

One `Family` entry per diffusers pipeline family says which modules the pipeline takes, which of
them can carry a LoRA, how the pipeline's `encode_prompt` output maps onto its call arguments,
how guidance is spelled (classifier-free, distilled as in Flux, `true_cfg_scale`), which sampler
previews use, and which diffusers release brought the pipeline. The renderer, the exporter and
the post-hoc commands read these entries; adding a family is adding an entry (and its tiny test
model in `lora_monitor.tiny`).

No torch at import time: the table must be readable before any model is built.
"""
from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from typing import Any, Mapping

__all__ = ["Family", "FAMILIES", "get_family", "detect_family", "check_components", "diffusers_version_ok"]


@dataclass(frozen=True)
class Family:
    """What differs between model families, as data.

    Attributes:
        name: the short name users pass as `family=`.
        title: the name people know the models by (for help texts).
        pipeline: the diffusers pipeline class name.
        denoiser: the pipeline's denoiser attribute, "unet" or "transformer".
        denoiser_classes: denoiser class names that identify the family (detection).
        text_encoders: (encoder, tokenizer) attribute pairs the pipeline takes, in its order.
        optional_encoders: encoders the pipeline can run without (SD3's T5).
        lora_modules: the modules `save_lora_weights` takes `<module>_lora_layers` for
            (diffusers' `_lora_loadable_modules` of the pipeline).
        encode_outputs: the names of `encode_prompt`'s returned tuple as call arguments of the
            pipeline; None drops a value the call recomputes itself (Flux's text_ids).
        negative_outputs: when `encode_prompt` does not encode the negative prompt, the names of its
            outputs for a second call on the negative prompt (None: negatives come with encode_outputs).
        cfg_argument: the call argument that takes the classifier-free guidance scale.
        cfg_default: the CFG scale for prompts that set none (kohya `--l`).
        distilled_argument: the call argument of a guidance-distilled model (Flux's embedded guidance).
        distilled_default: that value for prompts that set none (kohya `--g`).
        cfg_needs_negative: CFG runs only when negative embeddings are passed (true CFG: Flux, Qwen).
        latent_patch: the side of the latent patches the denoiser turns into tokens (2x2 for the
            MMDiT/Flux-style transformers): preview sizes must divide by it times the VAE's factor.
        flow_matching: the family is trained with flow matching; previews keep its flow-matching
            scheduler (a DDIM made from a flow-matching config samples nonsense).
        flow_timestep_scale: what the pipeline multiplies the noise level sigma in [0, 1] by before
            feeding it to the transformer as its timestep (SD3, Sana: 1000; Flux, Chroma, Qwen: 1), times the
            transformer config's `timestep_scale` where it has one (Sana's pipeline applies it).
        flow_reversed: the transformer counts time from noise to image (Lumina 2: fed 1 - sigma, and it
            predicts image minus noise, which its pipeline negates).
        video_vae: the VAE is a video VAE that takes images as one-frame clips (B, C, 1, H, W) (Qwen-Image).
        min_diffusers: the first diffusers release with this pipeline.
        extra_components: pipeline constructor arguments with fixed values (no safety checker...).
        call_arguments: pipeline call arguments with fixed values (Sana: render at the asked size,
            not at its aspect-ratio bin).
        unet_config_marker: for UNet families, a (config key, value) that tells them apart.
        single_file_marker: a tensor-name fragment only this family's original single-file
            checkpoints hold (e.g. SDXL's second text encoder), to tell such a file's family.
    """

    name: str
    title: str
    pipeline: str
    denoiser: str
    denoiser_classes: tuple[str, ...]
    text_encoders: tuple[tuple[str, str], ...]
    lora_modules: tuple[str, ...]
    encode_outputs: tuple[str | None, ...]
    negative_outputs: tuple[str | None, ...] | None = None
    cfg_argument: str = "guidance_scale"
    cfg_default: float = 7.5
    distilled_argument: str | None = None
    distilled_default: float | None = None
    cfg_needs_negative: bool = False
    flow_matching: bool = False
    flow_timestep_scale: float = 1000.0
    flow_reversed: bool = False
    video_vae: bool = False
    latent_patch: int = 1
    optional_encoders: tuple[str, ...] = ()
    min_diffusers: str = "0.27.0"
    extra_components: Mapping[str, Any] = field(default_factory=dict)
    call_arguments: Mapping[str, Any] = field(default_factory=dict)
    unet_config_marker: tuple[str, Any] | None = None
    single_file_marker: str | None = None

    @property
    def components(self) -> tuple[str, ...]:
        """Every module the monitor needs to render this family."""
        names = [self.denoiser, "vae", "scheduler"]
        for encoder, tokenizer in self.text_encoders:
            names += [encoder, tokenizer]
        return tuple(names)

    @property
    def encoder_names(self) -> tuple[str, ...]:
        return tuple(encoder for encoder, _ in self.text_encoders)

    @property
    def tokenizer_names(self) -> tuple[str, ...]:
        return tuple(tokenizer for _, tokenizer in self.text_encoders)

    def pipeline_class(self):
        """The diffusers pipeline class; a clear error when the installed diffusers predates it."""
        import diffusers

        if not diffusers_version_ok(self.min_diffusers) or not hasattr(diffusers, self.pipeline):
            raise ValueError(
                f"the {self.name!r} family needs diffusers >= {self.min_diffusers} ({self.pipeline}); "
                f"this environment has diffusers {diffusers.__version__}: pip install -U 'diffusers>={self.min_diffusers}'"
            )
        return getattr(diffusers, self.pipeline)


_CLIP = ("text_encoder", "tokenizer")
_CLIP_2 = ("text_encoder_2", "tokenizer_2")
_SD_OUTPUTS = ("prompt_embeds", "negative_prompt_embeds")
_POOLED_OUTPUTS = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds")
_MASKED_OUTPUTS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")

FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            name="sd",
            title="SD 1.x/2.x",
            pipeline="StableDiffusionPipeline",
            denoiser="unet",
            denoiser_classes=("UNet2DConditionModel",),
            text_encoders=(_CLIP,),
            lora_modules=("unet", "text_encoder"),
            encode_outputs=_SD_OUTPUTS,
            extra_components={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
        ),
        Family(
            name="sdxl",
            title="SDXL",
            pipeline="StableDiffusionXLPipeline",
            denoiser="unet",
            denoiser_classes=("UNet2DConditionModel",),
            text_encoders=(_CLIP, _CLIP_2),
            lora_modules=("unet", "text_encoder", "text_encoder_2"),
            encode_outputs=_POOLED_OUTPUTS,
            cfg_default=5.0,
            extra_components={"add_watermarker": False},
            unet_config_marker=("addition_embed_type", "text_time"),
            single_file_marker="conditioner.embedders.1.",
        ),
        Family(
            name="sd3",
            title="SD3/3.5",
            pipeline="StableDiffusion3Pipeline",
            denoiser="transformer",
            denoiser_classes=("SD3Transformer2DModel",),
            text_encoders=(_CLIP, _CLIP_2, ("text_encoder_3", "tokenizer_3")),
            optional_encoders=("text_encoder_3",),
            lora_modules=("transformer", "text_encoder", "text_encoder_2"),
            encode_outputs=_POOLED_OUTPUTS,
            cfg_default=7.0,
            flow_matching=True,
            latent_patch=2,
            min_diffusers="0.29.0",
            single_file_marker="joint_blocks.",
        ),
        Family(
            name="flux",
            title="Flux.1",
            pipeline="FluxPipeline",
            denoiser="transformer",
            denoiser_classes=("FluxTransformer2DModel",),
            text_encoders=(_CLIP, _CLIP_2),
            lora_modules=("transformer", "text_encoder"),
            encode_outputs=("prompt_embeds", "pooled_prompt_embeds", None),
            negative_outputs=("negative_prompt_embeds", "negative_pooled_prompt_embeds", None),
            cfg_argument="true_cfg_scale",
            cfg_default=1.0,
            cfg_needs_negative=True,
            distilled_argument="guidance_scale",
            distilled_default=3.5,
            flow_matching=True,
            flow_timestep_scale=1.0,
            latent_patch=2,
            min_diffusers="0.30.0",
            single_file_marker="double_blocks.",
        ),
        Family(
            name="sana",
            title="Sana",
            pipeline="SanaPipeline",
            denoiser="transformer",
            denoiser_classes=("SanaTransformer2DModel",),
            text_encoders=(_CLIP,),
            lora_modules=("transformer",),
            encode_outputs=_MASKED_OUTPUTS,
            cfg_default=4.5,
            flow_matching=True,
            min_diffusers="0.32.0",
            # previews at the asked size, not its aspect-ratio bin; no caption cleaning (0.32 turns it on and wants bs4/ftfy)
            call_arguments={"use_resolution_binning": False, "clean_caption": False},
        ),
        Family(
            name="lumina2",
            title="Lumina 2",
            pipeline="Lumina2Pipeline",
            denoiser="transformer",
            denoiser_classes=("Lumina2Transformer2DModel",),
            text_encoders=(_CLIP,),
            lora_modules=("transformer",),
            encode_outputs=_MASKED_OUTPUTS,
            cfg_default=4.0,
            flow_matching=True,
            flow_timestep_scale=1.0,
            flow_reversed=True,
            latent_patch=2,
            min_diffusers="0.33.0",
        ),
        Family(
            name="chroma",
            title="Chroma",
            pipeline="ChromaPipeline",
            denoiser="transformer",
            denoiser_classes=("ChromaTransformer2DModel",),
            text_encoders=(_CLIP,),
            lora_modules=("transformer", "text_encoder"),
            encode_outputs=(
                "prompt_embeds", None, "prompt_attention_mask", "negative_prompt_embeds", None, "negative_prompt_attention_mask"
            ),
            cfg_default=4.0,
            flow_matching=True,
            flow_timestep_scale=1.0,
            latent_patch=2,
            min_diffusers="0.34.0",
        ),
        Family(
            name="qwenimage",
            title="Qwen-Image",
            pipeline="QwenImagePipeline",
            denoiser="transformer",
            denoiser_classes=("QwenImageTransformer2DModel",),
            text_encoders=(_CLIP,),
            lora_modules=("transformer",),
            encode_outputs=("prompt_embeds", "prompt_embeds_mask"),
            negative_outputs=("negative_prompt_embeds", "negative_prompt_embeds_mask"),
            cfg_argument="true_cfg_scale",
            cfg_default=4.0,
            cfg_needs_negative=True,
            flow_matching=True,
            flow_timestep_scale=1.0,
            video_vae=True,
            latent_patch=2,
            min_diffusers="0.35.0",
        ),
    )
}


def diffusers_version_ok(minimum: str) -> bool:
    """Whether the installed diffusers is at least `minimum` (dev and rc builds count as their release)."""
    import diffusers
    from packaging.version import Version

    return Version(Version(diffusers.__version__).base_version) >= Version(minimum)


def get_family(name: str) -> Family:
    """The entry for `name`; an unknown name is an error that lists the families and suggests close ones."""
    if isinstance(name, Family):
        return name
    key = str(name).lower().replace("-", "").replace("_", "").replace(".", "")
    aliases = {"sd15": "sd", "sd1": "sd", "sd2": "sd", "sd21": "sd", "sd35": "sd3", "flux1": "flux", "qwen": "qwenimage"}
    key = aliases.get(key, key)
    if key in FAMILIES:
        return FAMILIES[key]
    close = difflib.get_close_matches(str(name).lower(), FAMILIES, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown model family {name!r}; supported families: {', '.join(FAMILIES)}.{hint}")


def detect_family(*, pipeline=None, components: Mapping[str, Any] | None = None) -> Family:
    """The family of a diffusers pipeline object, else of the denoiser among `components`."""
    if pipeline is not None:
        for cls in type(pipeline).__mro__:
            for family in FAMILIES.values():
                if cls.__name__ == family.pipeline:
                    return family
        components = {name: getattr(pipeline, name, None) for name in ("unet", "transformer")}
    components = components or {}
    for attribute in ("unet", "transformer"):
        module = components.get(attribute)
        if module is None:
            continue
        class_names = {cls.__name__ for cls in type(module).__mro__}
        matches = [f for f in FAMILIES.values() if f.denoiser == attribute and class_names & set(f.denoiser_classes)]
        config = getattr(module, "config", {})
        marked = [f for f in matches if f.unet_config_marker and config.get(f.unet_config_marker[0]) == f.unet_config_marker[1]]
        if marked:
            return marked[0]
        unmarked = [f for f in matches if not f.unet_config_marker]
        if unmarked:
            return unmarked[0]
        raise ValueError(
            f"cannot tell the model family of a {type(module).__name__} {attribute}; pass family= one of: {', '.join(FAMILIES)}"
        )
    raise ValueError(
        "to render previews the monitor needs the denoiser: unet= (SD 1.x/2.x, SDXL) or transformer= (SD3, Flux, Sana, ...), "
        f"or pipeline=; supported families: {', '.join(FAMILIES)}"
    )


def check_components(family: Family, components: Mapping[str, Any]) -> None:
    """Refuse a half-given family at build time: name what is missing, what is unexpected, and what to do."""
    optional = set(family.optional_encoders)
    optional |= {tokenizer for encoder, tokenizer in family.text_encoders if encoder in optional and components.get(encoder) is None}
    missing = [name for name in family.components if components.get(name) is None and name not in optional]
    unexpected = [name for name, module in components.items() if module is not None and name not in family.components]
    denoiser = components.get(family.denoiser)
    mismatch = _denoiser_mismatch(family, denoiser) if denoiser is not None else None
    problems = []
    if missing:
        encoders_gone = [name for name in missing if name in family.encoder_names]
        hint = (
            " Build the monitor before the loop deletes its text encoders: it encodes the preview prompts once and lets them go."
            if encoders_gone and not mismatch
            else ""
        )
        problems.append(f"missing: {', '.join(missing)}.{hint}")
    if unexpected:
        problems.append(f"not part of a {family.pipeline}: {', '.join(unexpected)} (wrong family=?)")
    if mismatch:
        problems.append(mismatch)
    if problems:
        raise ValueError(
            f"the {family.name!r} family ({family.pipeline}) renders with {', '.join(family.components)}; "
            + " ".join(problems)
        )


def _denoiser_mismatch(family: Family, denoiser: Any) -> str | None:
    """Why `denoiser` is not this family's (its class, or the config marker of another UNet family), or None."""
    class_names = {cls.__name__ for cls in type(denoiser).__mro__}
    if not class_names & set(family.denoiser_classes):
        return (
            f"family={family.name!r} expects a {' or '.join(family.denoiser_classes)} as {family.denoiser}, "
            f"got {type(denoiser).__name__}; leave family= out to detect it, or pass the right one."
        )
    config = getattr(denoiser, "config", {})
    if family.unet_config_marker:
        key, value = family.unet_config_marker
        if config.get(key) != value:
            return f"family={family.name!r} expects a UNet with {key}={value!r} (got {config.get(key)!r}): it is an 'sd' UNet; pass family='sd'."
    for other in FAMILIES.values():
        if other is not family and other.denoiser == family.denoiser and other.unet_config_marker:
            key, value = other.unet_config_marker
            if config.get(key) == value:
                return f"This UNet has {key}={value!r}: it is an {other.name!r} UNet, not {family.name!r}; pass family={other.name!r}."
    return None


def pipeline_arguments(pipeline_class) -> set[str]:
    """The names a pipeline class's constructor takes."""
    return set(inspect.signature(pipeline_class.__init__).parameters) - {"self"}
