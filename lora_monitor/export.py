"""Atomic export of the best LoRA checkpoint (and optional top-k) with a JSON sidecar.

A checkpoint folder is written complete under a temporary name and then renamed into place, so a
write that fails half-way leaves the previous folder as it was. Replacing an existing folder takes
two renames (old -> .previous, new -> final); `recover` undoes a crash between them.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

SIDECAR = "lora_monitor.json"
WeightsWriter = Callable[[Path], None]


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(json_safe(data), handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """Floats that JSON cannot hold (NaN, inf) become strings; tuples become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def recover(folder: Path) -> None:
    """Finish or undo an interrupted replacement of `folder` (see module docstring)."""
    previous = folder.with_name(folder.name + ".previous")
    if previous.exists():
        if folder.exists():
            shutil.rmtree(previous)
        else:
            previous.rename(folder)
    for stale in folder.parent.glob(f".{folder.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def export_checkpoint(folder: Path, write_weights: WeightsWriter, sidecar: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically: `write_weights(tmp)` fills a temporary folder, the sidecar is
    added, then the folder replaces `folder`. If anything fails, `folder` is left untouched."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write_weights(tmp)
        write_json_atomic(tmp / SIDECAR, sidecar)
        _fsync_tree(tmp)
        previous = folder.with_name(folder.name + ".previous")
        if folder.exists():
            folder.rename(previous)
        tmp.rename(folder)
        if previous.exists():
            shutil.rmtree(previous)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(folder)
        raise
    return folder


def read_sidecar(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / SIDECAR).read_text(encoding="utf-8"))


def lora_writer(family, modules: dict[str, Any]) -> WeightsWriter:
    """Save the peft LoRA layers of `modules` ({"unet" or "transformer": denoiser, "text_encoder": ..., ...})
    with the family's `<PipelineClass>.save_lora_weights` (one `<module>_lora_layers` argument per module
    that carries a LoRA): pytorch_lora_weights.safetensors, loadable with that family's load_lora_weights."""
    from lora_monitor.families import get_family

    family = get_family(family)

    def write(folder: Path) -> None:
        import inspect

        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from lora_monitor.render import has_lora

        pipeline_class = family.pipeline_class()
        accepted = inspect.signature(pipeline_class.save_lora_weights).parameters
        kwargs: dict[str, Any] = {}
        for name, module in modules.items():
            if not has_lora(module) or f"{name}_lora_layers" not in accepted:
                continue
            state = get_peft_model_state_dict(module)
            # diffusers' own scripts convert UNet and text-encoder keys to its naming; transformers save peft keys
            kwargs[f"{name}_lora_layers"] = state if name.startswith("transformer") else convert_state_dict_to_diffusers(state)
            # Newer diffusers store the adapter config (rank, alpha) beside the weights, so a LoRA with
            # lora_alpha != rank loads back at the right scale. Older ones (e.g. 0.32) have no such field.
            configs = getattr(module, "peft_config", {})
            if f"{name}_lora_adapter_metadata" in accepted and configs:
                kwargs[f"{name}_lora_adapter_metadata"] = next(iter(configs.values())).to_dict()
        if not kwargs:
            raise ValueError(f"nothing to export: none of {', '.join(modules)} carries a peft LoRA")
        pipeline_class.save_lora_weights(folder, safe_serialization=True, **kwargs)

    return write


def diffusers_lora_writer(unet, text_encoder=None) -> WeightsWriter:
    """The SD 1.x/2.x writer: `lora_writer("sd", ...)` for a UNet and, if it carries one, the text encoder's LoRA."""
    return lora_writer("sd", {"unet": unet, "text_encoder": text_encoder})


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def remove_checkpoint(folder: Path) -> None:
    """Delete an exported folder (a top-k entry pushed out by a better epoch)."""
    if folder.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
        folder.rename(trash / folder.name)
        shutil.rmtree(trash)
