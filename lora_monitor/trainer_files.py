"""What a trainer's file names say, and whether a file is completely written (issue 13, "watch any trainer").

The types the trainer layouts are made of (`RoundKey`, `SampleName`, `CheckpointName`, `TrainerLayout`,
`DisplayCut`) and the checks that tell a whole sample or checkpoint from one a trainer is still writing:
PNG, JPEG and WebP end as their formats end, an MP4's boxes tile the file and hold its index (`moov`, which
muxers write last), a .safetensors file is as long as its header says. No torch: names, headers and sizes.
The layouts themselves are in `trainer_entries`; `trainer_layouts` finds and reads them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

UNITS = ("step", "epoch")


class RoundKey(NamedTuple):
    """A sample round: the trainer's step or epoch counter in its names (number 0: before training)."""

    unit: str
    number: int

    def __str__(self) -> str:
        return f"{self.unit} {self.number}"


@dataclass(frozen=True)
class SampleName:
    """What a sample file's name (and its folder's) says."""

    path: Path
    key: RoundKey
    prompt: int | str  # the prompt's index in the trainer's list; SimpleTuner names a prompt by its shortname
    seed: int | None  # None: the name holds no seed
    video: bool
    stamp: str = ""  # the wall-clock time in the name ("" when none): orders re-renders of one round
    # which of the prompt's images of a round it is, when a trainer renders several under one prompt name
    # (SimpleTuner: f"{index}_{WxH}", index counting resolutions x images per resolution); "" otherwise
    variant: str = ""

    @property
    def slot(self) -> tuple[int | str, str]:
        """The sample's place in a round: its prompt and variant, the same in every round."""
        return self.prompt, self.variant


@dataclass(frozen=True)
class CheckpointName:
    """What a checkpoint's name says; `run_name` is the trainer's output or job name in it ("" when none)."""

    path: Path
    key: RoundKey
    run_name: str


class DisplayError(ValueError):
    """A saved image that is a display (a labelled composite), not a sample, and cannot be cut back to one."""


@dataclass(frozen=True)
class DisplayCut:
    """Where the sample lies in a saved display image: `box` (left, top, right, bottom) in pixels, and the rows
    (`blank_rows`: first, end) below it that the trainer fills with black, checked before cutting ((0, 0): none)."""

    box: tuple[int, int, int, int]
    blank_rows: tuple[int, int] = (0, 0)


@dataclass(frozen=True)
class TrainerLayout:
    """One trainer's output folder. Globs are relative to the folder the user points at (`folder` below)."""

    name: str
    title: str
    source: str  # "owner/repository@commit" that the citations in the entry refer to
    sample_globs: tuple[str, ...]  # () when the trainer writes no samples to disk
    parse_sample: Callable[[Path], SampleName | None]
    sample_example: str
    checkpoint_globs: tuple[str, ...]
    parse_checkpoint: Callable[[Path], CheckpointName | None]
    checkpoint_example: str
    checkpoint_file: str | None  # the LoRA file inside a checkpoint folder; None when a checkpoint is one file
    final_globs: tuple[str, ...]  # the file saved when training ends; () when it is not in the folder
    final_rounds: Callable[[Mapping[str, str]], tuple[RoundKey, ...]] | None  # rounds it holds, from its metadata
    base_key: RoundKey | None  # the key of the before-training round; None when the trainer renders none
    base_round: str | None  # how that round is named and when it is rendered
    base_globs: tuple[str, ...]  # base references kept apart from the rounds, and how to read their names
    parse_base: Callable[[Path], SampleName | None] | None
    stop: str | None  # how the trainer can be asked to stop; None when it cannot (short of killing it)
    video_formats: tuple[str, ...]
    temp_names: str | None  # the trainer's names for files it has not finished writing
    markers: tuple[str, ...] = ()  # globs only this trainer's folders hold
    notes: tuple[str, ...] = ()
    # where the sample lies in a saved file of (width, height) pixels; None: the file is the sample. Raises
    # DisplayError for a file that is a display the sample cannot be cut back out of.
    cut_sample: Callable[[SampleName, int, int], DisplayCut] | None = None
    # the slots of a round are known only once the trainer has moved on to the next round (SimpleTuner: prompts
    # by shortname, any number of images each); False: they are the prompt indices 0..n-1
    open_slots: bool = False


# ------------------------------------------------------------------------------------- file checks
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _mp4_finished(handle, size: int) -> bool:
    """ISO media boxes tile the file and a moov box is there (writers add it last)."""
    position, kinds = 0, set()
    while position < size:
        handle.seek(position)
        header = handle.read(8)
        if len(header) < 8:
            return False
        length, kind = int.from_bytes(header[:4], "big"), header[4:]
        if length == 1:
            length = int.from_bytes(handle.read(8), "big")
        elif length == 0:
            length = size - position
        if length < 8:
            return False
        kinds.add(kind)
        position += length
    return position == size and b"moov" in kinds


def is_finished(path: Path) -> bool:
    """Whether a sample file is whole: not empty, and PNG/JPEG/WebP/MP4 files end as their format ends."""
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        suffix = path.suffix.lower()
        with open(path, "rb") as handle:
            if suffix == ".png":
                handle.seek(max(0, size - len(_PNG_END)))
                return handle.read() == _PNG_END
            if suffix in (".jpg", ".jpeg"):
                start = handle.read(2)
                handle.seek(size - 2)
                return start == b"\xff\xd8" and handle.read(2) == b"\xff\xd9"
            if suffix == ".webp":
                head = handle.read(12)
                return head[:4] == b"RIFF" and head[8:] == b"WEBP" and int.from_bytes(head[4:8], "little") + 8 == size
            if suffix == ".mp4":
                return _mp4_finished(handle, size)
    except OSError:
        return False
    return True


def animated_webp(path: Path) -> bool:
    """A WebP whose VP8X header sets the animation flag."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(21)
    except OSError:
        return False
    return len(head) == 21 and head[:4] == b"RIFF" and head[12:16] == b"VP8X" and bool(head[20] & 0x02)


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a completely written .safetensors file ({} when it has none); None while incomplete."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= 100_000_000:
                return None
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        return dict(header.get("__metadata__") or {}) if path.stat().st_size == 8 + length + end else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def is_temporary(name: str) -> bool:
    """Names trainers give files and folders they are still writing (see each entry's temp_names)."""
    return name.startswith(".") or name.endswith(("-tmp", ".tmp", "~")) or ".tmp." in name
