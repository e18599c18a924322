"""The checks a watcher makes before it copies a trainer's network file into best/, and the copy itself.

Shared by the kohya watcher (kohya_watch.py) and the other trainers' (trainer_watch.py). A network file is
copied only from inside the output folder (links out of it are refused), and only when its contents check
out: a .safetensors header that parses and matches the file's length and lists tensors; a pickle (.ckpt, .pt)
only with allow_pickle, and then only if torch.load(weights_only=True) reads it. The checks run on the copy
itself, so what was checked is what was copied.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Mapping

from lora_monitor.integrations.kohya import CHECKPOINT_SUFFIXES
from lora_monitor.kohya_names import OutsideFolderError, inside_folder

MISSING_NOTE = "CHECKPOINT_MISSING.txt"
PICKLE_SUFFIXES = (".ckpt", ".pt")
#: A safetensors header longer than this is taken for a damaged file (kohya's LoRA headers are a few hundred KB).
MAX_HEADER_BYTES = 100 * 1024 * 1024


class CheckpointRefused(ValueError):
    """A network file the watcher will not copy into best/; the message names it and says why."""


def safetensors_header(path: Path) -> tuple[dict[str, str], int] | None:
    """(metadata, number of tensors) of a completely written .safetensors file whose header parses; None otherwise
    (still being written, damaged, or not a safetensors file)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(8)
            size = os.fstat(handle.fileno()).st_size
            if len(head) < 8:
                return None
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, MAX_HEADER_BYTES):
                return None
            header = json.loads(handle.read(length))
    except (OSError, ValueError, struct.error):
        return None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        return None
    ends = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and o >= 0 for o in offsets) and offsets[0] <= offsets[1]):
            return None
        ends.append(offsets[1])
    if size != 8 + length + max(ends, default=0):
        return None
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}, len(ends)


def safetensors_complete(path: Path) -> dict[str, str] | None:
    """The metadata of a completely written .safetensors file, or None while it is incomplete (or damaged)."""
    header = safetensors_header(path)
    return None if header is None else header[0]


def verify_checkpoint(path: Path, allow_pickle: bool, name: str | None = None) -> None:
    """Raise CheckpointRefused (naming `name`, else the file) unless `path` holds a network: a .safetensors whose header
    parses, matches the file's length and lists tensors; a pickle only with `allow_pickle`, read by torch.load(weights_only=True)."""
    name = name or str(path)
    if path.suffix == ".safetensors":
        header = safetensors_header(path)
        if header is None:
            raise CheckpointRefused(f"{name}: its safetensors header does not parse, or the file's length does not match it (damaged or truncated)")
        if header[1] == 0:
            raise CheckpointRefused(f"{name}: it holds no tensors (metadata only): it would load as no LoRA at all")
        return
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise CheckpointRefused(f"{name} is a pickle checkpoint ({path.suffix}): unpickling can run arbitrary code, so the watcher "
                                    "copies it only with --allow-pickle (and then only if torch.load(weights_only=True) reads it)")
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # anything torch.load raises means: not a plain tensor pickle
            raise CheckpointRefused(f"{name}: torch.load(weights_only=True) does not read it ({type(error).__name__}: {error})") from None
        if not isinstance(state, Mapping) or not state:
            raise CheckpointRefused(f"{name}: it holds {type(state).__name__}, not a dict of tensors")
        return
    raise CheckpointRefused(f"{name}: not a network file the watcher knows ({', '.join(CHECKPOINT_SUFFIXES)})")


def copy_checkpoint(source: Path, target: Path, folder: Path, allow_pickle: bool) -> None:
    """Copy the network file `source` to `target`: only from inside `folder` (its links followed, none out of it), and
    only contents that pass verify_checkpoint, checked on the copy itself (what is checked is what was copied)."""
    try:
        resolved = inside_folder(source, folder, "network file")
    except OutsideFolderError as error:
        raise CheckpointRefused(str(error)) from None
    descriptor = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(descriptor, "rb") as reader, open(target, "wb") as writer:
        shutil.copyfileobj(reader, writer, 1024 * 1024)
    try:
        shutil.copystat(resolved, target)
        verify_checkpoint(target, allow_pickle, name=str(source))
    except BaseException:
        target.unlink(missing_ok=True)
        raise
