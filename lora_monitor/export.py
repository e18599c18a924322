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


def diffusers_lora_writer(unet, text_encoder=None) -> WeightsWriter:
    """Save the peft LoRA layers of `unet` (and `text_encoder` if it has any) in diffusers' save_lora_weights
    format: pytorch_lora_weights.safetensors, loadable with pipeline.load_lora_weights."""

    def write(folder: Path) -> None:
        import inspect

        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        kwargs: dict[str, Any] = {
            "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        }
        if text_encoder is not None and _has_lora(text_encoder):
            kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        # Newer diffusers store the adapter config (rank, alpha) beside the weights, so a LoRA with
        # lora_alpha != rank loads back at the right scale. Older ones (e.g. 0.32) have no such field.
        if "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionPipeline.save_lora_weights).parameters:
            configs = getattr(unet, "peft_config", {})
            if configs:
                kwargs["unet_lora_adapter_metadata"] = next(iter(configs.values())).to_dict()
        StableDiffusionPipeline.save_lora_weights(folder, safe_serialization=True, **kwargs)

    return write


def _has_lora(module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(sub, BaseTunerLayer) for sub in module.modules())


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
