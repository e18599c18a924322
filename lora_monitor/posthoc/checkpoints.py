"""Render LoRA checkpoints as candidates: find them, load each into the base model, render at each strength.

Checkpoints are kohya .safetensors files (per epoch, per step, or the final one) or diffusers LoRA
folders; pickles (.ckpt/.pt/.pth/.bin) are refused unless asked for, and then read with
torch.load(weights_only=True). The base model is any family of the family table (families.py):
loaded with diffusers' DiffusionPipeline, its family detected from the pipeline class (or forced).
Checkpoints load with the pipeline's own `load_lora_weights` (diffusers' per-family loaders, which
also read kohya-format files), and rendering uses the in-training PreviewRenderer over the base
pipeline's modules.
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
from lora_monitor.families import FAMILIES, Family, check_components, detect_family, get_family
from lora_monitor.kohya_names import CHECKPOINT_NAME
from lora_monitor.posthoc.candidates import Candidate, PosthocError, format_strength
from lora_monitor.render import PreviewRenderer
from lora_monitor.spec import PreviewSpec

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_CHECKPOINT = CHECKPOINT_NAME
# kohya sd-scripts' --save_every_n_steps files: {output_name}-step{step:08d}.safetensors
KOHYA_STEP_CHECKPOINT = re.compile(r"^(?P<name>.+)-step(?P<step>\d+)\.safetensors$")
UNITS = ("epoch", "step")


@dataclass
class Checkpoint:
    path: Path
    epoch: int | None  # the epoch, or the step when unit is "step"
    kind: str  # "kohya", "diffusers" or "pickle"
    unit: str = "epoch"

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
    """LoRA checkpoints in files and folders: kohya `{name}-{epoch:06d}.safetensors`, kohya step saves
    `{name}-step{step:08d}.safetensors` and the final `{name}.safetensors` (its epoch from its ss_epoch
    metadata or `final_epoch`; in a run saved by step, its step from ss_steps), diffusers LoRA folders
    (pytorch_lora_weights.safetensors; epoch or step from lora_monitor.json, else the folder name's
    trailing number, a step for step-NNNN folders) and, only with allow_pickle, .ckpt/.pt/.pth/.bin files.
    One ranking holds epochs or steps, not both. A .safetensors file that holds no tensors (metadata
    only) is skipped: it would render as the base model. Returns (checkpoints, skipped with reasons)."""
    found: list[Checkpoint] = []
    skipped: list[tuple[str, str]] = []
    entries: list[Path] = []
    final_steps: dict[Path, int | None] = {}
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
                number, unit = _folder_epoch(path)
                found.append(Checkpoint(path, number, "diffusers", unit))
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
            step = KOHYA_STEP_CHECKPOINT.match(path.name)
            if match:
                found.append(Checkpoint(path, int(match.group("epoch")), "kohya"))
            elif step:
                found.append(Checkpoint(path, int(step.group("step")), "kohya", "step"))
            else:
                epoch, steps = _metadata_numbers(path)
                final_steps[path] = steps
                found.append(Checkpoint(path, epoch if epoch is not None else final_epoch, "kohya"))
    if name is not None:
        found = [c for c in found if c.kind != "kohya" or c.path.name.startswith(name)]
    for checkpoint in list(found):
        empty = _no_tensors(checkpoint)
        if empty is not None:  # it would load as nothing and rank as the base model
            skipped.append((str(checkpoint.path), empty))
            found.remove(checkpoint)
    names = {_kohya_run_name(c.path) for c in found if c.kind == "kohya"}
    if len(names) > 1:
        raise PosthocError(f"checkpoints of several runs in one folder ({', '.join(sorted(names))}); choose one with --name")
    if need_epoch and any(c.unit == "step" for c in found):
        # a run saved by step: its final file counts in steps too (kohya writes the last step as ss_steps)
        for checkpoint in found:
            if checkpoint.path in final_steps and final_steps[checkpoint.path] is not None:
                checkpoint.epoch, checkpoint.unit = final_steps[checkpoint.path], "step"
        units = {c.unit for c in found if c.epoch is not None}
        if len(units) > 1:
            by_unit = {unit: ", ".join(c.path.name for c in found if c.unit == unit) for unit in UNITS}
            raise PosthocError(
                f"epoch checkpoints ({by_unit['epoch']}) and step checkpoints ({by_unit['step']}) cannot be ranked together; "
                "pass the files of one kind (e.g. output/name-step*.safetensors, or output/name-0*.safetensors)"
            )
    complete = []
    for checkpoint in found:
        if checkpoint.epoch is None and need_epoch:
            skipped.append((str(checkpoint.path), "its epoch is unknown (no number in the name, no ss_epoch metadata); pass --final-epoch N to include it"))
        else:
            complete.append(checkpoint)
    if not complete:
        looked = ", ".join(str(p) for p in paths)
        raise PosthocError(
            f"no LoRA checkpoints found in {looked}: looked for kohya name-000003.safetensors (or name-step00000500) files, diffusers LoRA "
            f"folders ({DIFFUSERS_LORA_FILE}) and, with --allow-pickle, .ckpt/.pt files"
            + ("; skipped: " + "; ".join(f"{p}: {why}" for p, why in skipped) if skipped else "")
        )
    complete.sort(key=lambda c: (c.epoch is not None, c.epoch or 0))
    epochs = [c.epoch for c in complete]
    if need_epoch and len(set(epochs)) != len(epochs):
        raise PosthocError(
            f"several checkpoints for one {complete[0].unit}: " + ", ".join(f"{c.path.name} ({c.unit} {c.epoch})" for c in complete)
        )
    return complete, skipped


def _trailing_number(text: str) -> int | None:
    match = re.search(r"(\d+)$", text)
    return int(match.group(1)) if match else None


def _kohya_run_name(path: Path) -> str:
    """The kohya output name of an epoch, step or final checkpoint file."""
    for pattern in (KOHYA_CHECKPOINT, KOHYA_STEP_CHECKPOINT):
        match = pattern.match(path.name)
        if match:
            return match.group("name")
    return path.name.removesuffix(".safetensors")


def _folder_epoch(folder: Path) -> tuple[int | None, str]:
    """(number, unit) of a diffusers LoRA folder: the monitor's sidecar says which ("unit": "step" means
    its "epoch" holds the optimizer step); without one, the folder name's trailing number, a step when
    the name starts with "step" (the monitor's top_k/step-0020)."""
    sidecar = folder / SIDECAR
    if sidecar.is_file():
        try:
            data = json.loads(sidecar.read_text(encoding="utf-8"))
            unit = data.get("unit", "epoch") if data.get("unit", "epoch") in UNITS else "epoch"
            number = data.get("epoch")
            if not _is_int(number) and unit == "step":
                number = data.get("step")
            if _is_int(number):
                return number, unit
        except (OSError, ValueError, AttributeError):
            pass
    return _trailing_number(folder.name), "step" if folder.name.lower().startswith("step") else "epoch"


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _metadata_numbers(path: Path) -> tuple[int | None, int | None]:
    """(ss_epoch, ss_steps) from a kohya file's metadata; None for what is missing or unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception:  # an unreadable header is reported when the file is loaded
        return None, None
    numbers = []
    for key in ("ss_epoch", "ss_steps"):
        try:
            numbers.append(int(metadata[key]) if metadata.get(key) is not None else None)
        except ValueError:
            numbers.append(None)
    return numbers[0], numbers[1]


def _no_tensors(checkpoint: Checkpoint) -> str | None:
    """Why a .safetensors checkpoint (a kohya file, a diffusers folder's weights) is no LoRA: it holds no
    tensors; None for one that does, for pickles, and for an unreadable header (reported when it is loaded)."""
    from safetensors import safe_open

    if checkpoint.kind == "pickle":
        return None
    path = checkpoint.path / DIFFUSERS_LORA_FILE if checkpoint.kind == "diffusers" else checkpoint.path
    try:
        with safe_open(str(path), framework="pt") as handle:
            count, metadata = len(list(handle.keys())), handle.metadata() or {}
    except Exception:
        return None
    if count:
        return None
    what = f"its {DIFFUSERS_LORA_FILE} holds" if checkpoint.kind == "diffusers" else "holds"
    held = f"only {len(metadata)} metadata entries" if metadata else "nothing at all"
    return f"{what} no tensors ({held}): not a LoRA checkpoint, it would render as the base model"


def _metadata_epoch(path: Path) -> int | None:
    return _metadata_numbers(path)[0]


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
    if not state:
        raise PosthocError(f"{checkpoint.path}: holds no tensors: not a LoRA checkpoint, it would render as the base model")
    return state


@contextlib.contextmanager
def lora_scale(modules: Sequence[torch.nn.Module | None], scale: float) -> Iterator[None]:
    """Multiply every peft LoRA layer's scaling in `modules` by `scale` and restore the exact values on exit;
    0 is the base model. Over the denoiser and every text encoder that carries a LoRA (`lora_modules`), this
    is diffusers' LoRA scale: what cross_attention_kwargs={"scale": s} (SD, SDXL) or joint_attention_kwargs=
    {"scale": s} (SD3, Flux, ...) does to the denoiser and lora_scale to the text encoders."""
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


def lora_modules(pipeline, family: Family | str | None = None) -> list[torch.nn.Module]:
    """The pipeline's denoiser and every text encoder of its family that carries a peft LoRA: what a strength scales."""
    from lora_monitor.render import has_lora

    family = get_family(family) if family is not None else detect_family(pipeline=pipeline)
    denoiser = getattr(pipeline, family.denoiser)
    return [denoiser] + [module for name in family.encoder_names if has_lora(module := getattr(pipeline, name, None))]


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def families_help() -> str:
    """The families --base takes, one line each, with the diffusers release each needs (for --help)."""
    return "\n".join(
        f"  {key:<10} {family.title:<11} {family.pipeline:<26} diffusers >= {family.min_diffusers}"
        for key, family in FAMILIES.items()
    )


@contextlib.contextmanager
def _loading_bars(enabled: bool) -> Iterator[None]:
    """diffusers' and transformers' loading progress bars off (when not `enabled`) while a base model loads, then as they were."""
    if enabled:
        yield
        return
    import diffusers.utils.logging as diffusers_logging

    loggers = [diffusers_logging]
    with contextlib.suppress(ImportError):
        import transformers.utils.logging as transformers_logging

        loggers.append(transformers_logging)
    were = [logger.is_progress_bar_enabled() for logger in loggers]
    for logger in loggers:
        logger.disable_progress_bar()
    try:
        yield
    finally:
        for logger, was in zip(loggers, were):
            if was:
                logger.enable_progress_bar()


def load_base_pipeline(
    base: str, *, device: str = "cpu", dtype: str = "float32", family: Family | str | None = None, progress: bool = True
):
    """The base model as a diffusers pipeline of any family in the family table.

    A diffusers folder or hub id loads with `DiffusionPipeline.from_pretrained` (the class its
    model_index.json names); a single .safetensors/.ckpt file with the family pipeline's
    `from_single_file` (the family from `family`, else guessed from the file's keys: SD 1.x/2.x
    unless it looks like SDXL, SD3 or Flux). `family` forces the family: the base then loads with
    that family's pipeline class. A family whose pipeline the installed diffusers lacks is the
    family table's error (it names the diffusers release needed). `progress` False keeps diffusers'
    and transformers' loading bars quiet."""
    with _loading_bars(progress):
        return _load_base_pipeline(base, device=device, dtype=dtype, family=family)


def _load_base_pipeline(base: str, *, device: str, dtype: str, family: Family | str | None):
    forced = get_family(family) if family is not None else None
    if dtype not in TORCH_DTYPES:
        raise PosthocError(f"--dtype {dtype!r}: choose one of {', '.join(TORCH_DTYPES)}")
    torch_dtype = TORCH_DTYPES[dtype]
    path = Path(base)
    if path.is_file():
        entry = forced or _single_file_family(path)
        pipeline_class = entry.pipeline_class()  # the clear error when this diffusers lacks the family
        try:
            pipeline = pipeline_class.from_single_file(str(path), torch_dtype=torch_dtype, **_load_arguments(entry, pipeline_class))
        except (OSError, ValueError, TypeError, KeyError, RuntimeError) as error:
            raise PosthocError(
                f"--base {base}: cannot load a single-file {entry.name!r} model with {pipeline_class.__name__}.from_single_file ({error}); "
                "pass --family if that is the wrong family, or use a diffusers model folder"
            ) from None
    else:
        from diffusers import DiffusionPipeline

        declared = _declared_family(base)
        entry = forced or declared
        # before loading: the family table's error when this diffusers lacks the family's pipeline
        pipeline_class = forced.pipeline_class() if forced is not None else DiffusionPipeline
        arguments = _load_arguments(entry, entry.pipeline_class()) if entry is not None else {}
        try:
            pipeline = pipeline_class.from_pretrained(base, torch_dtype=torch_dtype, **arguments)
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as error:
            what = f"a {forced.pipeline}" if forced is not None else "a diffusers pipeline"
            raise PosthocError(f"--base {base}: cannot load {what} ({type(error).__name__}: {error})") from None
    _check_base(base, pipeline, base_family(pipeline, forced))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def base_family(pipeline, family: Family | str | None = None) -> Family:
    """The family of a loaded base pipeline (`family` forces it); a clear error when it is none of the table's."""
    if family is not None:
        return get_family(family)
    try:
        return detect_family(pipeline=pipeline)
    except ValueError as error:
        raise PosthocError(
            f"--base: a {type(pipeline).__name__} is none of the supported families ({error}); "
            f"pass --family NAME if it is one of: {', '.join(FAMILIES)}"
        ) from None


def _check_base(base: str, pipeline, family: Family) -> None:
    """A base that lacks modules its family renders with, or whose denoiser is another family's (a wrong
    --family, a folder without text encoders): the family table's message, naming the base."""
    try:
        check_components(family, {name: getattr(pipeline, name, None) for name in family.components})
    except ValueError as error:
        raise PosthocError(f"--base {base}: {error}".replace("family=", "--family ")) from None


def _declared_family(base: str) -> Family | None:
    """The family of the pipeline class a diffusers folder or hub id declares (model_index.json's _class_name)."""
    try:
        folder = Path(base)
        if (folder / "model_index.json").is_file():
            config = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
        else:
            from diffusers import DiffusionPipeline

            config = DiffusionPipeline.load_config(base)
        name = config.get("_class_name")
    except Exception:  # from_pretrained reports what is wrong with the folder or id
        return None
    return next((f for f in FAMILIES.values() if f.pipeline == name), None)


def _load_arguments(family: Family, pipeline_class) -> dict:
    """from_pretrained/from_single_file arguments that keep what previews do not need out (SD's safety
    checker, SDXL's watermarker): the family's fixed constructor values the class takes."""
    if pipeline_class is None:
        return {}
    from lora_monitor.families import pipeline_arguments

    accepted = pipeline_arguments(pipeline_class)
    return {name: value for name, value in family.extra_components.items() if name in accepted}


def _single_file_family(path: Path) -> Family:
    """A single-file checkpoint's family from its tensor names (safetensors header only), by each family's
    single_file_marker (SDXL's second text encoder, SD3's joint blocks, Flux's double blocks); otherwise SD 1.x/2.x."""
    keys: list[str] = []
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                keys = list(handle.keys())
        except Exception:
            keys = []
    for family in FAMILIES.values():
        if family.single_file_marker and any(family.single_file_marker in key for key in keys):
            return family
    return FAMILIES["sd"]


def _lora_layer_count(modules: Sequence[torch.nn.Module | None]) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(isinstance(sub, BaseTunerLayer) for module in modules if module is not None for sub in module.modules())


def render_checkpoints(
    pipeline,
    spec: PreviewSpec,
    checkpoints: Sequence[Checkpoint],
    strengths: Sequence[float] | None,
    *,
    family: Family | str | None = None,
    sampler: str | None = None,
    batch_size: int = 4,
    with_epoch: bool = True,
    progress: bool = False,
) -> tuple[list[torch.Tensor], list[Candidate]]:
    """Base references (no LoRA loaded) and every checkpoint's previews (at every strength, if given),
    rendered with the in-training PreviewRenderer over the pipeline's modules.

    `family` is detected from the pipeline when left out; `sampler` None is the family's default (DDIM for
    SD 1.x/2.x and SDXL, the model's own flow-matching scheduler for SD3, Flux, ...). Each checkpoint is
    loaded with the pipeline's `load_lora_weights` and unloaded after; a strength scales the LoRA of the
    denoiser and of every text encoder the checkpoint carries one for."""
    from tqdm.auto import tqdm

    entry = base_family(pipeline, family)
    components = {name: getattr(pipeline, name, None) for name in entry.components}
    renderer = PreviewRenderer(family=entry, sampler=sampler, batch_size=batch_size, **components)
    renderer.check_spec(spec)
    modules = [getattr(pipeline, name, None) for name in (entry.denoiser, *entry.encoder_names)]
    if _lora_layer_count(modules):
        raise PosthocError("the base model already carries a LoRA (peft layers): load a clean base model with --base")
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
            with _loading_bars(progress):
                pipeline.load_lora_weights(source, adapter_name="posthoc", **extra)
        except Exception as error:
            with contextlib.suppress(Exception):  # take off whatever a failed load left
                pipeline.unload_lora_weights()
            raise PosthocError(
                f"{checkpoint.path}: diffusers cannot load it as a LoRA for this {entry.name!r} base model ({type(error).__name__}: {error})"
            ) from None
        try:
            if not _lora_layer_count(modules):
                raise PosthocError(
                    f"{checkpoint.path}: no LoRA layer was loaded: none of its keys names a module of this {entry.name!r} base model "
                    "(a LoRA for another model family?)"
                )
            for scale in scales:
                if scale == 0.0:  # scale 0 is the base model: reuse the references
                    images = [image.clone() for image in references]
                else:
                    bar.set_postfix_str(f"{checkpoint.name}" + ("" if scale is None else f" @ {format_strength(scale)}"))
                    with lora_scale(lora_modules(pipeline, entry), 1.0 if scale is None else scale):
                        images = renderer.render(spec)
                    bar.update(len(spec))
                candidates.append(
                    Candidate(checkpoint.epoch if with_epoch else None, scale, images, [None] * len(spec), unit=checkpoint.unit)
                )
        finally:
            pipeline.unload_lora_weights()
        if _lora_layer_count(modules):  # the next checkpoint and the references must see the base model
            raise PosthocError(f"{checkpoint.path}: unloading its LoRA left LoRA layers in the base model")
    bar.close()
    return references, candidates
