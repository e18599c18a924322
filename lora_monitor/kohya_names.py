"""kohya-ss sd-scripts' file contract: how it names epoch samples and network files.

Shared by the post-hoc commands and the kohya launcher and watcher; names only, no sd-scripts code.
Samples go to {output_dir}/sample/{output_name}_e{epoch:06d}_{i:02d}_{YYYYmmddHHMMSS}_{seed}.png;
an epoch's network is {output_name}-{epoch:06d}.safetensors, the last one {output_name}.safetensors.

Names and paths read from files (a state file, a sidecar, a prompt file) are checked before they are
used: an output name is one file-name stem (`check_output_name`), and a file the watcher reads or
copies must lie inside the output folder once its links are followed (`inside_folder`).

One lora-monitor process scores an output folder at a time: `FolderLock` holds
<output_dir>/lora_monitor.lock (created exclusively, with the holder's pid and host) while a watcher
or the launcher runs; a lock whose process is gone from this host is stale and replaced with a note.
"""
from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from lora_monitor.spec import PREVIEW_DEFAULTS

#: An epoch sample: {output_name}_e{epoch:06d}_{prompt index:02d}_{YYYYmmddHHMMSS}_{seed}.png (seed optional).
SAMPLE_NAME = re.compile(
    r"^(?:(?P<name>.+)_)?e(?P<epoch>\d{6})_(?P<prompt>\d{2,})_(?P<timestamp>\d{14})(?:_(?P<seed>\d+))?\.png$"
)
#: An epoch's network file: {output_name}-{epoch:06d}.safetensors.
CHECKPOINT_NAME = re.compile(r"^(?P<name>.+)-(?P<epoch>\d{6})\.safetensors$")
_ANY = object()
#: Characters an output name may not hold: it is joined to the output folder as one file name.
_NAME_FORBIDDEN = {"/", "\\", "\0"} | ({":"} if os.name == "nt" else set())


def check_output_name(value: Any, source: str) -> str:
    """`value` (an output name read from `source`: a state file, a sidecar, a command-line flag) when it is one
    file-name stem kohya could have written; a ValueError naming `source` and the value otherwise."""
    if not isinstance(value, str) or not value or value in (".", "..") or value.startswith("..") or _NAME_FORBIDDEN & set(value):
        raise ValueError(
            f"{source}: output name {value!r} is not a plain file name (no path separators, no '..', not empty); "
            "lora-monitor joins it to the output folder and refuses anything that could point elsewhere"
        )
    return value


class OutsideFolderError(ValueError):
    """A path that leads outside the folder it was read from once its links are followed."""


def inside_folder(path: str | os.PathLike, folder: str | os.PathLike, what: str) -> Path:
    """`path` with its links followed, when that lies inside `folder` (itself resolved); an OutsideFolderError
    naming `what` and the link otherwise. Files are never read or copied from outside the output folder."""
    path, root = Path(path), Path(folder).resolve()
    resolved = path.resolve()
    if resolved != root and root not in resolved.parents:
        link = " (a symbolic link)" if path.is_symlink() else ""
        raise OutsideFolderError(f"{what} {path}{link} leads to {resolved}, outside {root}: refused (lora-monitor never follows "
                                 "links out of the output folder; put the file itself there)")
    return resolved


@dataclass(frozen=True)
class SampleFile:
    """One sample PNG of an epoch, as kohya names it."""

    path: Path
    output_name: str | None
    epoch: int
    index: int
    stamp: str
    seed: int | None


def parse_sample_name(path: str | os.PathLike) -> SampleFile | None:
    """The parts of a kohya epoch-sample file name; None for any other file (step samples included)."""
    path = Path(path)
    match = SAMPLE_NAME.match(path.name)
    if match is None:
        return None
    seed = match["seed"]
    return SampleFile(path, match["name"], int(match["epoch"]), int(match["prompt"]), match["timestamp"], None if seed is None else int(seed))


def list_samples(folder: str | os.PathLike, output_name: Any = _ANY) -> list[SampleFile]:
    """The epoch samples in `folder` (kohya's <output_dir>/sample), optionally of one output name only."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [parse_sample_name(path) for path in folder.iterdir() if path.suffix == ".png"]
    return [s for s in found if s is not None and (output_name is _ANY or s.output_name == output_name)]


def group_by_epoch(samples: Iterable[SampleFile]) -> dict[int, dict[int, SampleFile]]:
    """epoch -> prompt index -> sample; when a run was restarted the newest file of each pair wins."""
    groups: dict[int, dict[int, SampleFile]] = {}
    for sample in sorted(samples, key=lambda s: (s.stamp, s.path.name)):
        groups.setdefault(sample.epoch, {})[sample.index] = sample
    return groups


def epoch_checkpoint_name(output_name: str | None, epoch: int, suffix: str = ".safetensors") -> str:
    """kohya's name for an epoch's network file (output name "epoch" when none is given)."""
    return f"{output_name or 'epoch'}-{epoch:06d}{suffix}"


def last_checkpoint_name(output_name: str | None, suffix: str = ".safetensors") -> str:
    """kohya's name for the network saved after the last epoch (output name "last" when none is given)."""
    return f"{output_name or 'last'}{suffix}"


# ------------------------------------------------------------------------------------ the trainers
@dataclass(frozen=True)
class KohyaTrainer:
    """One of sd-scripts' LoRA trainer scripts: its file, its NetworkTrainer subclass and its sampler's defaults.

    `family` is the launcher's --family name; `model_family` the lora_monitor.families name of the
    same architecture. `sample_defaults` are what kohya's sampler uses for a prompt that does not set
    them (PreviewSpec.load keywords), read from the sampler named by `sampler`. `since` is the first
    sd-scripts release holding the script. `min_seed` is the smallest seed kohya's sampler accepts.
    """

    family: str
    script: str
    trainer_class: str
    model_family: str
    sampler: str
    sample_defaults: dict[str, Any]
    since: str
    min_seed: int = 0


#: What sample_image_inference (library/train_util.py for SD and SDXL, library/sd3_train_utils.py for SD3) uses for
#: a prompt that does not set them: 30 steps at 512x512, which are lora_monitor.spec.PREVIEW_DEFAULTS (our defaults
#: are kohya's, so a prompt file renders alike everywhere), and CFG 7.5, which PREVIEW_DEFAULTS leaves to the family.
TRAIN_UTIL_SAMPLE_DEFAULTS: dict[str, Any] = {**PREVIEW_DEFAULTS, "guidance_scale": 7.5}

#: The trainers the launcher knows, by --family name. All subclass train_network.NetworkTrainer,
#: keep its training loop (so its checkpoint names) and override
#: sample_images(self, accelerator, args, epoch, global_step, device, vae|ae, tokenizer(s), text_encoder, unet|mmdit|flux|lumina).
KOHYA_TRAINERS: dict[str, KohyaTrainer] = {
    trainer.family: trainer
    for trainer in (
        KohyaTrainer("sd", "train_network.py", "NetworkTrainer", "sd", "library/train_util.py sample_image_inference",
                     dict(TRAIN_UTIL_SAMPLE_DEFAULTS), "v0.2.0"),
        KohyaTrainer("sdxl", "sdxl_train_network.py", "SdxlNetworkTrainer", "sdxl", "library/train_util.py sample_image_inference",
                     dict(TRAIN_UTIL_SAMPLE_DEFAULTS), "v0.7.0"),
        KohyaTrainer("sd3", "sd3_train_network.py", "Sd3NetworkTrainer", "sd3", "library/sd3_train_utils.py sample_image_inference",
                     dict(TRAIN_UTIL_SAMPLE_DEFAULTS), "v0.10.0"),
        # FLUX.1: --l is a true CFG scale (1.0: none), --g the distilled guidance (3.5 when not given)
        KohyaTrainer("flux", "flux_train_network.py", "FluxNetworkTrainer", "flux", "library/flux_train_utils.py sample_image_inference",
                     dict(steps=20, guidance_scale=1.0, width=512, height=512), "v0.10.0"),
        # Lumina Image 2.0: its sampler asserts seed > 0
        KohyaTrainer("lumina", "lumina_train_network.py", "LuminaNetworkTrainer", "lumina2", "library/lumina_train_util.py sample_image_inference",
                     dict(steps=36, guidance_scale=3.5, width=1024, height=1024), "v0.10.0", min_seed=1),
    )
}


def family_of_script(script: str | os.PathLike) -> str | None:
    """The --family whose trainer script has this file name; None for any other script."""
    name = Path(script).name
    return next((t.family for t in KOHYA_TRAINERS.values() if t.script == name), None)


def family_of_trainer_class(cls: type) -> str | None:
    """The --family of a trainer class: that of the nearest class in its MRO named like one of KOHYA_TRAINERS'.
    NetworkTrainer itself counts only for itself: every trainer derives from it (sd-scripts' other
    trainers, e.g. HunyuanImageNetworkTrainer or AnimaNetworkTrainer, are of no family here)."""
    by_class = {t.trainer_class: t.family for t in KOHYA_TRAINERS.values()}
    base = KOHYA_TRAINERS["sd"].trainer_class
    if cls.__name__ == base:
        return "sd"
    return next((by_class[c.__name__] for c in cls.__mro__ if c.__name__ in by_class and c.__name__ != base), None)


# ------------------------------------------------------------------------------------ the folder lock
LOCK_FILE = "lora_monitor.lock"
#: A lock file that does not parse is taken for one being written for this long, then for a leftover.
UNREADABLE_LOCK_GRACE_S = 10.0
_held_here: set[str] = set()  # the tokens of the locks this process holds


class FolderLockedError(RuntimeError):
    """Another lora-monitor process holds the output folder's lock; the message says which."""


def _process_alive(pid: int) -> bool | None:
    """Whether process `pid` runs on this host; None where that cannot be told (Windows, whose os.kill ends processes)."""
    if os.name == "nt":
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return None
    return True


class FolderLock:
    """<folder>/lora_monitor.lock while a watcher or the launcher scores the folder (see the module docstring).

    `acquire` creates it with O_EXCL; when it exists, a holder on this host whose pid is gone (or is this
    process's pid without this process holding it: a restarted container) is stale: the file is set aside and
    `say` gets a note. Any other holder raises FolderLockedError naming its pid, host, command and start time."""

    def __init__(self, folder: str | os.PathLike, command: str, say=print) -> None:
        self.path = Path(folder) / LOCK_FILE
        self.command = command
        self.say = say
        self.token: str | None = None

    def acquire(self) -> "FolderLock":
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "token": uuid.uuid4().hex}
        for _ in range(3):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._break_if_stale()
                continue
            with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
                json.dump(holder, handle)
            self.token = holder["token"]
            _held_here.add(self.token)
            return self
        raise FolderLockedError(f"could not take {self.path}: it was replaced while being checked; try again")

    def release(self) -> None:
        """Remove the lock file if it is still this lock's (never another process's)."""
        if self.token is None:
            return
        if self._read().get("token") == self.token:
            self.path.unlink(missing_ok=True)
        _held_here.discard(self.token)
        self.token = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()

    def _read(self) -> dict[str, Any]:
        return self._read_at(self.path)

    def _break_if_stale(self) -> None:
        holder = self._read()
        pid, host = holder.get("pid"), holder.get("host")
        if not isinstance(pid, int) or not isinstance(host, str):
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return
            if age < UNREADABLE_LOCK_GRACE_S:  # another process may be writing it just now
                raise FolderLockedError(f"{self.path} is being taken by another lora-monitor process; try again in a few seconds")
            why = "it does not name a holder (a leftover of a crash while it was written)"
        else:
            here = host == socket.gethostname()
            alive = _process_alive(pid) if here else None
            if pid == os.getpid() and here and holder.get("token") not in _held_here:
                alive = False  # our pid, but not our lock: left by an earlier process that had this pid
            who = f"{holder.get('command', 'lora-monitor')} (pid {pid} on host {host}, started {holder.get('started', 'at an unknown time')})"
            if alive is not False:
                checked = "" if here and alive else (" (it cannot be checked from here" + (": another host)" if not here else ")"))
                raise FolderLockedError(
                    f"{self.path.parent} is already being scored by {who}{checked}: two processes scoring one folder "
                    f"would overwrite each other's best/ and scores. Wait for it or stop it; if it is no longer running, delete {self.path}")
            why = f"its holder, {who}, is no longer running"
        aside = self.path.with_name(f".{LOCK_FILE}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:  # another process broke it first
            return
        if self._read_at(aside) != holder:  # it was replaced after we read it: put the live lock back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return
        aside.unlink(missing_ok=True)
        self.say(f"lora-monitor: replaced a stale lock {self.path}: {why}")

    @staticmethod
    def _read_at(path: Path) -> dict[str, Any]:
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}
