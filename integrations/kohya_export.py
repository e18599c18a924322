"""The best epoch's network file for best/: kohya's own file of the epoch when it exists, else the network saved
at the epoch's sample point; and, when the best epoch is the last, kohya's final file (written after the loop,
with kohya's full metadata) adopted in its place.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from lora_monitor.export import export_checkpoint, read_sidecar
from lora_monitor.kohya_names import last_checkpoint_name


def write_epoch_file(folder: Path, args: Any, train_util: Any, network: Any, epoch: int, step: int) -> bool:
    """Fill an export folder with epoch `epoch`'s network file: kohya's own file when it exists (it was saved
    just before sampling), else (the last epoch, or one save_every_n_epochs skips) the network saved now through
    its own save_weights, in kohya's save precision. Returns whether the network was saved (not kohya's file copied)."""
    name = train_util.get_epoch_ckpt_name(args, "." + args.save_model_as, epoch)
    source = Path(args.output_dir) / name
    if source.is_file():
        shutil.copy2(source, folder / name)
        return False
    if network is None or not hasattr(network, "save_weights"):
        raise RuntimeError(f"cannot export epoch {epoch}: {source} does not exist and the trainer gave no network object to save")
    _, save_dtype = train_util.prepare_dtype(args)
    metadata = {"ss_epoch": str(epoch), "ss_steps": str(step), "ss_output_name": str(args.output_name), "lora_monitor": "saved by lora-monitor at the epoch's sample point"}
    network.save_weights(str(folder / name), save_dtype, metadata)
    return True


def adopt_final_file(best: Path, args: Any, train_util: Any, epoch: int, say: Callable[[str], None]) -> bool:
    """best/ holds the last epoch `epoch`, saved from the network at its sample point with a few metadata keys;
    kohya's final file holds the same weights with kohya's full metadata. best/ takes kohya's file instead when
    it is that epoch's (checked: same epoch in its metadata, same tensors, best/'s sidecar names the epoch).
    Returns whether it did; says why not otherwise."""
    suffix = "." + args.save_model_as
    last_name = getattr(train_util, "get_last_ckpt_name", None)
    final = Path(args.output_dir) / (last_name(args, suffix) if last_name else last_checkpoint_name(args.output_name, suffix))
    ours = best / train_util.get_epoch_ckpt_name(args, suffix, epoch)
    why = final_differs(final, ours, epoch)
    if why is None:
        try:
            sidecar = read_sidecar(best)
        except (OSError, ValueError) as error:
            why = f"{best} has no readable sidecar ({error})"
        else:
            why = None if sidecar.get("epoch") == epoch else f"{best} holds epoch {sidecar.get('epoch')!r}"
    if why is not None:
        say(f"lora-monitor: best/ keeps the network saved at epoch {epoch}'s sample point: {why}")
        return False
    export_checkpoint(best, lambda folder: shutil.copy2(final, folder / final.name), {**sidecar, "checkpoint_source": final.name})
    say(f"lora-monitor: the best epoch {epoch} is the last: {best} holds kohya's final {final.name}, with its full metadata")
    return True


def final_differs(final: Path, ours: Path, epoch: int) -> str | None:
    """Why kohya's final file cannot stand for epoch `epoch`'s export `ours`; None when it can."""
    if not final.is_file():
        return f"kohya's final {final.name} was not written"
    if final.suffix != ".safetensors" or ours.suffix != ".safetensors" or not ours.is_file():
        return f"only .safetensors files are compared ({final.name})"
    from safetensors import safe_open

    try:
        with safe_open(str(final), "pt") as theirs, safe_open(str(ours), "pt") as mine:
            final_epoch = (theirs.metadata() or {}).get("ss_epoch")
            if final_epoch is not None and str(final_epoch) != str(epoch):
                return f"kohya's final {final.name} is epoch {final_epoch}"
            if set(theirs.keys()) != set(mine.keys()) or any(not torch.equal(theirs.get_tensor(k), mine.get_tensor(k)) for k in mine.keys()):
                return f"kohya's final {final.name} holds other weights than epoch {epoch}'s"
    except Exception as error:  # a damaged final file: keep what best/ holds
        return f"kohya's final {final.name} does not read ({type(error).__name__}: {error})"
    return None
