"""What the two watchers share: the folder's lock, the stop request, the best copy that waits for its file, the
summary, the state file's reading, and the values a watcher computes for a round itself (issue 13).

`FolderWatcher` is the base of `KohyaWatcher` (kohya_watch.py) and `TrainerWatcher` (trainer_watch.py): one
watcher a folder (it holds <output_dir>/lora_monitor.lock, kohya_names.FolderLock, from construction until
close()), sentences said once, OUT/STOP and OUT/STOP.json written atomically when the policy says stop (no
trainer reads it: it says how to stop that trainer by hand), and a best round whose LoRA file was missing
when it was scored copied into best/ once the file appears.

Round values: a watcher has no model, but some values of a round come from elsewhere: the trainer's own
validation loss from its logs (`ValidationLosses`, the metric `trainer_val_loss`), a video's per-frame scores.
`RoundValues` is a whole-set scorer the monitor asks for them as for any signal; `RoundBoard` holds them for
the round being scored and for the base round.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from lora_monitor import trainer_logs
from lora_monitor.export import export_checkpoint, read_sidecar, write_json_atomic
from lora_monitor.integrations.kohya import decision_text
from lora_monitor.integrations.watch_checkpoints import CheckpointRefused, copy_checkpoint
from lora_monitor.kohya_names import FolderLock, OutsideFolderError, inside_folder

STATE_FILE = "lora_monitor_watch.json"
STOP_FILE = "STOP"
TRAINER_VAL_LOSS = "trainer_val_loss"


def write_stop_file(output_dir: Path, text: str, say: Callable[[str], None]) -> None:
    """Write OUTPUT_DIR/STOP atomically (a trainer or script polling for it never sees half a file) and say so."""
    temporary = output_dir / f".{STOP_FILE}.{os.getpid()}.tmp"
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, output_dir / STOP_FILE)
    finally:
        temporary.unlink(missing_ok=True)
    say(f"lora-monitor watch: STOP written to {output_dir / STOP_FILE}:\n  " + text.strip().replace("\n", "\n  "))


def sample_inside(path: Path, output_dir: Path, say_once: Callable[[Any, str], None]) -> bool:
    """Whether sample `path` may be read: not a link that leads out of the output folder (said once if it does)."""
    if path.is_symlink():
        try:
            inside_folder(path, output_dir, "sample")
        except OutsideFolderError as error:
            say_once(("outside", path), f"lora-monitor watch: {error}")
            return False
    return True


def read_state_file(path: Path, output_dir: Path) -> Any | None:
    """The watcher's state file as JSON (None when there is none); a link out of the folder or an unreadable file
    is a ValueError naming it."""
    if not (path.is_file() or path.is_symlink()):
        return None
    inside_folder(path, output_dir, "the watcher's state file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable as the watcher's state ({type(error).__name__}: {error}); move it away to "
                         "start afresh") from None


# ------------------------------------------------------------------------------------ round values
class RoundBoard:
    """The round values of the round being scored, and of the base round, told apart by the images asked about: the
    monitor scores its stored base references (`base_images`: LoraMonitor.base_references()) once, at the first
    evaluation. A round whose previews equal the base's bit for bit gets the base's values."""

    def __init__(self) -> None:
        self.current: dict[str, list[float]] = {}
        self.base: dict[str, list[float]] = {}
        self.base_images: list[torch.Tensor] | None = None

    def values(self, name: str, images: Sequence[torch.Tensor]) -> list[float]:
        is_base = self.base_images is not None and len(images) == len(self.base_images) and all(
            image.shape == base.shape and torch.allclose(image, base, atol=1e-6, equal_nan=True)
            for image, base in zip(images, self.base_images))
        table = self.base if is_base else self.current
        return list(table.get(name) or [math.nan] * len(images))


class RoundValues:
    """A whole-set scorer whose values the watcher computed for the round (its trainer's validation loss, a
    video's scores): the monitor asks for them as for any signal, and records and monitors them alike."""

    whole_set = True
    needs_reference = False

    def __init__(self, name: str, higher_is_better: bool, board: RoundBoard) -> None:
        self.name, self.higher_is_better, self.board = name, higher_is_better, board

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        raise TypeError(f"{self.name} is computed by the watcher for a whole round, not per image")

    def score_set(self, images: Sequence[torch.Tensor], groups: Sequence[int]) -> list[float]:
        return self.board.values(self.name, images)


class ValidationLosses:
    """The trainer's own validation loss for each round, read from its logs when asked (trainer_logs): the metric
    trainer_val_loss, lower is better, NaN for a round it logged no value for (the worst: never best by it)."""

    def __init__(self, output_dir: Path, trainer: str, logging_dir: str | os.PathLike | None, say: Callable[[str], None]) -> None:
        self.output_dir, self.trainer = output_dir, trainer
        self.logging_dir = Path(logging_dir) if logging_dir else None
        self.spec = trainer_logs.get_tag_spec(trainer)
        self.say = say
        self._accumulation: int | None = None

    @property
    def logged(self) -> bool:
        """Whether the trainer logs one at all (its entry has tags)."""
        return bool(self.spec.tags)

    def values(self, axis: str | None = None, say: Callable[[str], None] | None = None) -> dict[int, float]:
        """{step or epoch: loss} as logged ({} when none); `say` hears why there is none."""
        return trainer_logs.validation_loss(self.output_dir, self.trainer, self.logging_dir,
                                            axis=axis if axis in self.spec.tags else None, say=say) if self.logged else {}

    def for_round(self, number: int, axis: str | None) -> float:
        """The loss computed on round `number`'s weights (its `axis`: step or epoch), NaN when none was logged."""
        if self._accumulation is None:
            self._accumulation = trainer_logs.accumulation_steps(self.output_dir, self.trainer, self.say)
        return trainer_logs.loss_for_round(self.values(axis), number, self.trainer, self._accumulation)


# ---------------------------------------------------------------------------------------- the base
class FolderWatcher:
    """The parts of a watcher that do not depend on the trainer (module docstring). A subclass sets output_dir,
    then calls _hold_folder(say, setup); it keeps `monitor`, `unit`, `pending`, `stop_written` and
    `allow_pickle`, and saves its state in `_save_state()`."""

    output_dir: Path
    monitor: Any
    unit: str | None
    pending: int | None
    stop_written: bool
    allow_pickle: bool

    def _hold_folder(self, say: Callable[[str], None], setup: Callable[[], None]) -> None:
        self.say = say
        self._said: set[Any] = set()
        self._refused: dict[str, str] = {}  # network file name -> why it was not copied
        self.lock: FolderLock | None = FolderLock(self.output_dir, "lora-monitor watch", say=say).acquire()
        try:
            setup()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Finish the monitor's listeners and release the folder's lock (again: nothing)."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None and self.lock is not None:
            monitor.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _save_state(self) -> None:
        raise NotImplementedError

    def _say_once(self, key: Any, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(message)

    # ------------------------------------------------------------------ after an evaluation
    def _tell(self, report, stopped_before: int | None, how_to_stop: str) -> None:
        """Say the round's values and the policy's decision; write STOP when the policy says stop (once)."""
        label = f"{self.unit} {report.epoch}"
        values = ", ".join(f"{name} {value:.4f}" for name, value in report.aggregates.items())
        self.say(f"lora-monitor watch: {label}: {values}{'  (best)' if report.is_best else ''}; "
                 f"{decision_text(report, self.monitor.policy, stopped_before)}")
        if report.is_best:
            where = "its checkpoint copied to" if self.pending is None else "its checkpoint is not there (yet): noted in"
            self.say(f"lora-monitor watch: {label} is the best so far: {where} {self.output_dir / 'best'}")
        if report.should_stop and not self.stop_written:
            self._write_stop(how_to_stop)

    def _write_stop(self, how_to_stop: str) -> None:
        policy, unit = self.monitor.policy, self.unit
        text = (f"lora-monitor asks to stop this run after {unit} {policy.stopped_epoch}: {policy.stop_reason}\n"
                f"best {unit}: {policy.best_epoch} ({self.output_dir / 'best'})\n"
                f"The watcher does not stop the trainer, which must be stopped by hand. {how_to_stop}\n")
        write_json_atomic(self.output_dir / (STOP_FILE + ".json"), {
            "unit": unit, unit: policy.stopped_epoch, "reason": policy.stop_reason, "best": policy.best_epoch,
            "how_to_stop": how_to_stop})
        write_stop_file(self.output_dir, text, self.say)
        self.stop_written = True

    def _summary(self) -> None:
        policy = self.monitor.policy if getattr(self, "monitor", None) is not None else None
        unit = self.unit or "round"
        if policy is None or not policy.history:
            self.say(f"lora-monitor watch: no {unit} scored yet")
            return
        if policy.best_epoch is None:
            self.say(f"lora-monitor watch: {len(policy.history)} {unit}(s) scored, none eligible under the policy's bounds "
                     f"(see {self.monitor.record.scores_path}): nothing in best/")
            return
        self.say(f"lora-monitor watch: best {unit} {policy.best_epoch} ({policy.metric} {policy.best_value:.4f}): "
                 f"{self.output_dir / 'best'}; scores: {self.monitor.record.scores_path}"
                 + (f"; STOP written: {policy.stop_reason}" if self.stop_written else ""))

    # ------------------------------------------------------------------ the best round's network file
    def _refuse(self, path: Path, why: str) -> None:
        self._refused[path.name] = why
        self._say_once(("refused", why), f"lora-monitor watch: not copied: {why}")

    def _copy_best(self, folder: Path, number: int, source: Path | None, name: str) -> bool:
        """The export's weights: `source` copied into `folder` as `name`. False (the round then pending) when there is
        no source, it went away just now (rotated), or it was refused."""
        if source is not None:
            try:
                copy_checkpoint(source, folder / name, self.output_dir, self.allow_pickle)
                self.pending = None
                return True
            except FileNotFoundError:  # rotated away just now
                pass
            except CheckpointRefused as error:
                self._refuse(source, str(error))
        self.pending = number
        return False

    def _copy_when_it_appears(self, number: int, source: Path | None, name: str) -> None:
        """The pending best round's file `source` appeared: copy it into best/ as `name` (through the atomic export),
        when best/ still holds that round."""
        best = self.output_dir / "best"
        if source is None or best.is_symlink() or not best.is_dir():  # a linked best/ is replaced at the next export, never read
            return
        try:
            sidecar = read_sidecar(best)
        except (OSError, ValueError) as error:
            self._say_once(("sidecar", str(error)), f"lora-monitor watch: {best / 'lora_monitor.json'} does not read ({error}); "
                           f"{self.unit} {number}'s network file is not copied there")
            return
        if not isinstance(sidecar, dict) or sidecar.get("epoch") != number:
            return
        try:
            export_checkpoint(best, lambda folder: copy_checkpoint(source, folder / name, self.output_dir, self.allow_pickle),
                              {**sidecar, "checkpoint_source": source.name})
        except CheckpointRefused as error:
            self._refuse(source, str(error))
            return
        except FileNotFoundError:  # rotated away between the look and the copy
            return
        self.pending = None
        self._save_state()
        self.say(f"lora-monitor watch: the best {self.unit} {number}'s network file appeared ({source.name}): copied to {best / name}")
