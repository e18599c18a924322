"""Atomic export of the best LoRA checkpoint (and optional top-k) with a JSON sidecar.

A checkpoint folder is written complete under a temporary name and then renamed into place, so a
write that fails half-way leaves the previous folder as it was. Replacing an existing folder takes
two renames (old -> .previous, new -> final); `recover` undoes a crash between them.
"""
from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

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
    """Finish or undo an interrupted replacement of `folder` (see module docstring), then remove stale
    temporary folders. A symbolic link in the way (`folder`, `<folder>.previous`, a stale temporary name)
    is itself removed or renamed, never followed: whatever it points at is left alone. Removing leftovers
    is best-effort: what cannot be removed is named in one RuntimeWarning and left for the next call."""
    folder = Path(folder)
    previous = _previous(folder)
    leftovers = []
    if _present(previous):
        if _present(folder):
            leftovers.append(previous)  # crash after new -> folder: the old one is garbage
        else:
            previous.rename(folder)  # crash between the renames: put the old one back (a link moves as a link)
    _remove_best_effort(leftovers + _stale(folder))


def recover_exports(best: Path, top_dir: Path) -> None:
    """`recover` best/ and every entry of top_dir/ (top_k/epoch-0003, ...) that an interrupted export left
    as a `.previous` folder or a temporary one: what a monitor does when it is built or its state is loaded."""
    recover(Path(best))
    top_dir = Path(top_dir)
    if top_dir.is_dir():
        names = {path.name[: -len(".previous")] for path in top_dir.glob("*.previous")}
        names |= {match.group(1) for path in top_dir.glob(".*.tmp-*") if (match := re.fullmatch(r"\.(.+)\.tmp-.*", path.name))}
        for name in sorted(names):
            recover(top_dir / name)


def reconcile_exports(
    best: Path, top_dir: Path | None, *, unit: str, best_epoch: int | None, top_k_epochs: Sequence[int] = ()
) -> list[str]:
    """Bring best/ and top_k/ in line with a restored state, after a resume from a checkpoint older than the
    last evaluation (the evaluations after it belong to an abandoned branch of the run). Returns one sentence
    for each disagreement that is left.

    top_dir/ entries of `unit` that `top_k_epochs` does not list are removed (pass top_dir=None to leave
    top_dir/ alone). best/ cannot be written again, the restored best's weights are gone: when it holds
    another evaluation, its sidecar gains "restored_policy_best" (what the restored policy says) and a "note"
    (unless best/ is a symbolic link), and the sentence names both; the next new best replaces the folder."""
    messages = []
    best = Path(best)
    if _present(best):
        try:
            sidecar = read_sidecar(best)
            held = (sidecar.get("unit", "epoch"), sidecar["epoch"])
        except (OSError, ValueError, KeyError, TypeError) as error:
            sidecar, held = None, None
            messages.append(f"{best} has no readable sidecar ({type(error).__name__}: {error}); which {unit} it holds is unknown")
        if sidecar is not None and held != (unit, best_epoch):
            said = f"the restored policy's best is {unit} {best_epoch}" if best_epoch is not None else "the restored policy has no best yet"
            note = (
                f"{best.name}/ holds {held[0]} {held[1]}, evaluated after the checkpoint this run resumed from (an abandoned branch "
                f"of the run); {said}, whose weights were not kept. {best.name}/ is replaced at the resumed run's next new best"
            )
            if not best.is_symlink():  # a link's target is the user's: never written to
                write_json_atomic(best / SIDECAR, {**sidecar, "restored_policy_best": {"unit": unit, "epoch": best_epoch}, "note": note})
            messages.append(note)
    if top_dir is not None and Path(top_dir).is_dir():
        kept = set(top_k_epochs)
        on_disk = {}
        for path in Path(top_dir).iterdir():
            match = re.fullmatch(rf"{re.escape(unit)}-(\d+)", path.name)
            if match:
                on_disk[int(match.group(1))] = path
        for key, path in sorted(on_disk.items()):
            if key not in kept:
                remove_checkpoint(path)
        missing = sorted(key for key in kept if key not in on_disk)
        if missing:
            messages.append(
                f"{Path(top_dir).name}/ lacks {unit}(s) {missing} of the restored top-k list (removed by the abandoned branch "
                "of the run); their weights are gone"
            )
    return messages


def export_checkpoint(folder: Path, write_weights: WeightsWriter, sidecar: dict[str, Any]) -> Path:
    """Write a checkpoint folder atomically: `write_weights(tmp)` fills a temporary folder, the sidecar is
    added, then the folder replaces `folder`. If anything fails, `folder` is left untouched.

    If `folder` is a symbolic link, the link is replaced by a real folder; its target is not touched.
    Once the new folder is in place, the export has succeeded: removing the old one is best-effort and
    warns (RuntimeWarning) rather than raising."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover(folder)
    previous = _previous(folder)
    if _present(previous):  # recover could not remove it: move it out of the way so the swap can proceed
        _set_aside(previous, folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        write_weights(tmp)
        write_json_atomic(tmp / SIDECAR, sidecar)
        _fsync_tree(tmp)
        if _present(folder):
            folder.rename(previous)  # rename moves a symbolic link itself, not its target
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        recover(folder)
        raise
    _fsync_dir(folder.parent)  # make both renames durable
    _remove_best_effort([previous] + _stale(folder))
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
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir() and not path.is_symlink():
            _fsync_dir(path)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    """fsync a folder, so renames and new entries in it survive a power loss. Skipped where the platform
    cannot open or fsync a folder (Windows, some file systems); any other failure is a RuntimeWarning."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # a folder cannot be opened here (e.g. Windows)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in _FSYNC_UNSUPPORTED:
            warnings.warn(f"lora-monitor could not fsync folder {folder}: {error}", RuntimeWarning, stacklevel=3)
    finally:
        os.close(fd)


_FSYNC_UNSUPPORTED = {errno.EINVAL, errno.EBADF, errno.EACCES, errno.EPERM, errno.EISDIR,
                      getattr(errno, "ENOTSUP", errno.EINVAL), getattr(errno, "EOPNOTSUPP", errno.EINVAL)}


def remove_checkpoint(folder: Path) -> None:
    """Delete an exported folder (a top-k entry pushed out by a better epoch). A symbolic link is removed
    itself; its target is not touched. Once the folder is out of the way (renamed to a temporary name),
    deleting its contents is best-effort: a failure is a RuntimeWarning, not an error."""
    folder = Path(folder)
    if folder.is_symlink():
        folder.unlink()
        _fsync_dir(folder.parent)
    elif _present(folder):
        trash = _set_aside(folder, folder)
        _fsync_dir(folder.parent)
        _remove_best_effort([trash])


def _previous(folder: Path) -> Path:
    return folder.with_name(folder.name + ".previous")


def _stale(folder: Path) -> list[Path]:
    return sorted(folder.parent.glob(f".{folder.name}.tmp-*"))


def _present(path: Path) -> bool:
    """True for anything at `path`, a dangling symbolic link included (`Path.exists` follows links)."""
    return os.path.lexists(path)


def _set_aside(path: Path, folder: Path) -> Path:
    """Rename `path` into a new temporary folder beside `folder` (a name `recover` cleans up); returns that folder."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        path.rename(trash / path.name)
    except BaseException:
        trash.rmdir()
        raise
    return trash


def _delete(path: Path) -> None:
    """Remove `path`: a symbolic link (to a folder, or dangling) or a file is unlinked, never followed;
    a real folder is removed with its contents. Nothing there is not an error."""
    if path.is_symlink() or (_present(path) and not path.is_dir()):
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def _remove_best_effort(paths: list[Path]) -> None:
    """Delete each of `paths`; what cannot be deleted is named, with the reason, in one RuntimeWarning."""
    failures = []
    for path in paths:
        try:
            _delete(path)
        except OSError as error:
            failures.append(f"{path} ({error})")
    if failures:
        warnings.warn("lora-monitor could not remove " + "; ".join(failures)
                      + "; left in place, the next export retries", RuntimeWarning, stacklevel=3)
