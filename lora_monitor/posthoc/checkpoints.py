"""Render LoRA checkpoints as candidates: find them, load each into the base model, render at each strength.

Checkpoints are kohya .safetensors files or diffusers LoRA folders; pickles (.ckpt/.pt/.pth/.bin)
are refused unless asked for, and then read with torch.load(weights_only=True). Rendering uses the
in-training PreviewRenderer over the base pipeline's modules.
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch

from lora_monitor.export import SIDECAR
from lora_monitor.kohya_names import CHECKPOINT_NAME
from lora_monitor.posthoc.candidates import Candidate, PosthocError, format_strength
from lora_monitor.render import PreviewRenderer
from lora_monitor.spec import PreviewSpec

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_CHECKPOINT = CHECKPOINT_NAME


@dataclass
class Checkpoint:
    path: Path
    epoch: int | None
    kind: str  # "kohya", "diffusers" or "pickle"

    @property
    def name(self) -> str:
        return self.path.name


def find_checkpoints(
    paths: Sequence[str | Path],
    *,
    allow_pickle: bool = False,
    final_epoch: int | None = None,
    name: str | None = None,
    need_epoch: bool = True,
) -> tuple[list[Checkpoint], list[tuple[str, str]]]:
    """LoRA checkpoints in files and folders: kohya `{name}-{epoch:06d}.safetensors` (and the final
    `{name}.safetensors`, whose epoch comes from its ss_epoch metadata or `final_epoch`), diffusers
    LoRA folders (pytorch_lora_weights.safetensors; epoch from lora_monitor.json or the folder
    name's trailing number) and, only with allow_pickle, .ckpt/.pt/.pth/.bin files.
    Returns (checkpoints, skipped with reasons)."""
    found: list[Checkpoint] = []
    skipped: list[tuple[str, str]] = []
    entries: list[Path] = []
    for item in map(Path, paths):
        if not item.exists():
            raise PosthocError(f"{item}: no such checkpoint file or folder")
        if item.is_dir() and not (item / DIFFUSERS_LORA_FILE).is_file():
            entries += sorted(item.iterdir())
        else:
            entries.append(item)
    for path in entries:
        if path.is_dir():
            if (path / DIFFUSERS_LORA_FILE).is_file():
                found.append(Checkpoint(path, _folder_epoch(path), "diffusers"))
            continue
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            if not allow_pickle:
                raise PosthocError(
                    f"{path} is a pickle checkpoint ({suffix}): unpickling can run arbitrary code. Convert it to "
                    f".safetensors, or pass --allow-pickle to load it with torch.load(weights_only=True)"
                )
            found.append(Checkpoint(path, _trailing_number(path.stem), "pickle"))
        elif suffix == ".safetensors":
            match = KOHYA_CHECKPOINT.match(path.name)
            if match:
                found.append(Checkpoint(path, int(match.group("epoch")), "kohya"))
            else:
                epoch = _metadata_epoch(path)
                found.append(Checkpoint(path, epoch if epoch is not None else final_epoch, "kohya"))
    if name is not None:
        found = [c for c in found if c.kind != "kohya" or c.path.name.startswith(name)]
    names = {KOHYA_CHECKPOINT.sub(r"\g<name>", c.path.name).removesuffix(".safetensors") for c in found if c.kind == "kohya"}
    if len(names) > 1:
        raise PosthocError(f"checkpoints of several runs in one folder ({', '.join(sorted(names))}); choose one with --name")
    complete = []
    for checkpoint in found:
        if checkpoint.epoch is None and need_epoch:
            skipped.append((str(checkpoint.path), "its epoch is unknown (no number in the name, no ss_epoch metadata); pass --final-epoch N to include it"))
        else:
            complete.append(checkpoint)
    if not complete:
        looked = ", ".join(str(p) for p in paths)
        raise PosthocError(
            f"no LoRA checkpoints found in {looked}: looked for kohya name-000003.safetensors files, diffusers LoRA "
            f"folders ({DIFFUSERS_LORA_FILE}) and, with --allow-pickle, .ckpt/.pt files"
            + ("; skipped: " + "; ".join(f"{p}: {why}" for p, why in skipped) if skipped else "")
        )
    complete.sort(key=lambda c: (c.epoch is not None, c.epoch or 0))
    epochs = [c.epoch for c in complete]
    if need_epoch and len(set(epochs)) != len(epochs):
        raise PosthocError("several checkpoints for one epoch: " + ", ".join(f"{c.path.name} (epoch {c.epoch})" for c in complete))
    return complete, skipped


def _trailing_number(text: str) -> int | None:
    match = re.search(r"(\d+)$", text)
    return int(match.group(1)) if match else None


def _folder_epoch(folder: Path) -> int | None:
    sidecar = folder / SIDECAR
    if sidecar.is_file():
        try:
            epoch = json.loads(sidecar.read_text(encoding="utf-8")).get("epoch")
            if isinstance(epoch, int):
                return epoch
        except (OSError, ValueError):
            pass
    return _trailing_number(folder.name)


def _metadata_epoch(path: Path) -> int | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            value = (handle.metadata() or {}).get("ss_epoch")
        return int(value) if value is not None else None
    except Exception:  # an unreadable header is reported when the file is loaded
        return None


def load_lora_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors; pickles only through torch.load(weights_only=True)."""
    from safetensors.torch import load_file

    try:
        if checkpoint.kind == "diffusers":
            return load_file(str(checkpoint.path / DIFFUSERS_LORA_FILE))
        if checkpoint.kind == "kohya":
            return load_file(str(checkpoint.path))
        state = torch.load(str(checkpoint.path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise PosthocError(f"{checkpoint.path}: cannot be loaded as a LoRA checkpoint ({type(error).__name__}: {error})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PosthocError(f"{checkpoint.path}: expected a dict of tensors (a LoRA state dict), got {type(state).__name__}")
    return state


@contextlib.contextmanager
def lora_scale(modules: Sequence[torch.nn.Module], scale: float) -> Iterator[None]:
    """Multiply every peft LoRA layer's scaling by `scale` (what diffusers' cross_attention_kwargs={"scale": s}
    does to the UNet and lora_scale to the text encoder) and restore the exact values on exit; 0 is the base model."""
    from peft.tuners.lora import LoraLayer

    layers = [sub for module in modules if module is not None for sub in module.modules() if isinstance(sub, LoraLayer)]
    saved = [dict(layer.scaling) for layer in layers]
    try:
        for layer in layers:
            for adapter in layer.scaling:
                layer.scaling[adapter] = layer.scaling[adapter] * scale
        yield
    finally:
        for layer, scaling in zip(layers, saved):
            layer.scaling.clear()
            layer.scaling.update(scaling)


def load_base_pipeline(base: str, *, device: str = "cpu", dtype: str = "float32"):
    """A Stable Diffusion 1.x/2.x pipeline from a diffusers folder (or hub id), or a single .safetensors/.ckpt file."""
    from diffusers import StableDiffusionPipeline

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    path = Path(base)
    try:
        if path.is_file():
            pipeline = StableDiffusionPipeline.from_single_file(str(path), torch_dtype=torch_dtype, safety_checker=None)
        else:
            pipeline = StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch_dtype, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError) as error:
        raise PosthocError(f"--base {base}: cannot load a Stable Diffusion pipeline ({error})") from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def render_checkpoints(
    pipeline,
    spec: PreviewSpec,
    checkpoints: Sequence[Checkpoint],
    strengths: Sequence[float] | None,
    *,
    sampler: str = "ddim",
    batch_size: int = 4,
    with_epoch: bool = True,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[Candidate]]:
    """Base references (no LoRA loaded) and every checkpoint's previews (at every strength, if given),
    rendered with the in-training PreviewRenderer over the pipeline's modules."""
    from tqdm.auto import tqdm

    renderer = PreviewRenderer(
        unet=pipeline.unet, vae=pipeline.vae, text_encoder=pipeline.text_encoder, tokenizer=pipeline.tokenizer,
        scheduler=pipeline.scheduler, sampler=sampler, batch_size=batch_size,
    )
    renderer.check_spec(spec)
    scales = list(strengths) if strengths is not None else [None]
    jobs = 1 + len(checkpoints) * sum(1 for s in scales if s != 0.0)
    bar = tqdm(total=jobs * len(spec), desc="rendering", unit="image", disable=not progress, leave=False)
    bar.set_postfix_str("base model")
    references = renderer.render(spec)  # nothing loaded yet: the base model, same as render_base
    bar.update(len(spec))
    candidates = []
    for checkpoint in checkpoints:
        # a diffusers folder is loaded by path, so that newer diffusers read the rank/alpha kept in its header
        source = str(checkpoint.path) if checkpoint.kind == "diffusers" else load_lora_state_dict(checkpoint)
        extra = {"weight_name": DIFFUSERS_LORA_FILE} if checkpoint.kind == "diffusers" else {}
        try:
            pipeline.load_lora_weights(source, adapter_name="posthoc", **extra)
        except Exception as error:
            raise PosthocError(f"{checkpoint.path}: diffusers cannot load it as a LoRA for this base model ({error})") from None
        try:
            for scale in scales:
                if scale == 0.0:  # scale 0 is the base model: reuse the references
                    images = [image.clone() for image in references]
                else:
                    bar.set_postfix_str(f"{checkpoint.name}" + ("" if scale is None else f" @ {format_strength(scale)}"))
                    with lora_scale([pipeline.unet, pipeline.text_encoder], 1.0 if scale is None else scale):
                        images = renderer.render(spec)
                    bar.update(len(spec))
                candidates.append(Candidate(checkpoint.epoch if with_epoch else None, scale, images, [None] * len(spec)))
        finally:
            pipeline.unload_lora_weights()
    bar.close()
    return references, candidates
