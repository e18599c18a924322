"""The monitor's state in kohya's state folders, so that sd-scripts' --save_state and --resume carry it.

kohya (train_network.py, NetworkTrainer.train) saves a state folder with accelerator.save_state:
    <output_name>-<epoch:06d>-state     at an epoch end (train_util.save_and_remove_state_on_epoch_end),
                                        BEFORE that epoch's samples, so before the launcher scores them;
    <output_name>-step<step:08d>-state  every --save_every_n_steps (train_util.save_and_remove_state_stepwise);
    <output_name>-state                 after the loop (train_util.save_state_on_train_end), after the last samples;
and loads one with accelerator.load_state (train_util.resume_from_local_or_hf_if_specified) before its
first sample point. Nothing of the monitor is registered with accelerate (register_for_checkpointing):
a folder holding a custom checkpoint is one that plain sd-scripts, which registers none, refuses to load.
Instead, through accelerate's save_state pre-hook (kohya's own way of adding its train_state.json),
each state folder gets STATE_FILE: the monitor's state_dict() at the save, and "owes", the epoch end it
was saved at when that epoch's evaluation was still to come. Once that epoch is scored, the file of
every folder saved for it is written again with the evaluation in it. A run stopped in between (Ctrl-C
while kohya renders the samples) leaves "owes" in the file, and the resumed run has kohya render that
epoch again from the loaded weights before it trains on (KohyaSession's catch-up).

A resume continues from the state saved with the folder kohya loads, not the newest one: resumed from
an older folder, the monitor's history, best and patience are that folder's, best/ and top_k/ are
brought in line with them (LoraMonitor.load_state_dict) and scores.jsonl reads as the resumed history.
LAUNCHER_STATE in the output folder holds the monitor's latest state after every evaluation; a resume
from a folder without STATE_FILE (saved by sd-scripts alone) continues from it.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from lora_monitor.export import write_json_atomic
from lora_monitor.integrations.kohya_samples import sample_point
from lora_monitor.monitor import LoraMonitor

#: In each kohya state folder: the monitor's state saved with it.
STATE_FILE = "lora_monitor_state.json"
#: In the output folder: the monitor's latest state, written after every evaluation.
LAUNCHER_STATE = "lora_monitor_kohya_state.json"
STATE_FORMAT = "lora-monitor kohya state 1"
#: accelerate's name for an object registered for checkpointing (Accelerator.save_state/load_state).
CUSTOM_CHECKPOINT = re.compile(r"^custom_checkpoint_\d+\.pkl$")


@dataclass(frozen=True)
class Owed:
    """The epoch-end evaluation a state folder was saved before: the epoch and kohya's global step at its sample point."""

    epoch: int
    step: int


def epoch_state_epoch(folder: Path, args: Any, train_util: Any) -> int | None:
    """The epoch of a state folder named as kohya names an epoch end's (train_util.EPOCH_STATE_NAME, "{}-{:06d}-state",
    with --output_name or train_util.DEFAULT_EPOCH_NAME); None for any other folder (a step's, the train end's)."""
    pattern = getattr(train_util, "EPOCH_STATE_NAME", None)
    name = args.output_name if getattr(args, "output_name", None) is not None else getattr(train_util, "DEFAULT_EPOCH_NAME", "epoch")
    match = re.fullmatch(re.escape(name) + r"-(\d+)-state", folder.name)
    if pattern is None or match is None:
        return None
    epoch = int(match.group(1))
    return epoch if pattern.format(name, epoch) == folder.name else None


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


class MonitorStates:
    """Keeps the monitor's state in each kohya state folder and reads it back on resume (see the module docstring).

    The session sets `step` (kohya's global_step) at every sample_images call, calls `hook(accelerator)` once it
    has kohya's accelerator (before load_state), `resume(folder)` for a local --resume folder before training, and
    `after_evaluation(epoch, step)` on the main process after each evaluation. `owed` is the evaluation the loaded
    state was saved before, for the session to catch up."""

    def __init__(self, monitor: LoraMonitor, args: Any, train_util: Any, *, main_rank: bool, say: Callable[[str], None]) -> None:
        self.monitor = monitor
        self.args = args
        self.train_util = train_util
        self.main_rank = main_rank
        self.say = say
        self.step = 0
        self.owed: Owed | None = None
        self.loaded: Path | None = None  # the state folder the monitor's state came from
        self.hooked = False
        self._saved: list[tuple[Path, int | None, int | None]] = []  # since the last evaluation: (folder, step, epoch it owes)

    # -- kohya's accelerator
    def hook(self, accelerator: Any) -> None:
        """Join kohya's accelerator's save_state and load_state through their pre-hooks (once)."""
        if self.hooked:
            return
        accelerator.register_save_state_pre_hook(self._on_save)
        accelerator.register_load_state_pre_hook(self._on_load)
        self.hooked = True

    def _on_save(self, models: list, weights: list, output_dir: str) -> None:
        if not self.main_rank:
            return
        folder = Path(output_dir)
        epoch = epoch_state_epoch(folder, self.args, self.train_util)
        history = self.monitor.policy.history
        owed = None
        if epoch is not None and self.step > 0 and sample_point(self.args, epoch, self.step) and (not history or epoch > history[-1].epoch):
            owed = Owed(epoch, self.step)
        self._write(folder, owed)
        self._saved.append((folder, self.step, owed.epoch if owed else None))

    def _on_load(self, models: list, input_dir: str) -> None:
        folder = Path(input_dir)
        if self.loaded is None or folder.resolve() != self.loaded:  # one resume() did not read first (sd-scripts' --resume_from_huggingface)
            self.resume(folder)

    def _write(self, folder: Path, owed: Owed | None) -> None:
        owes = None if owed is None else {"epoch": owed.epoch, "step": owed.step}
        write_json_atomic(folder / STATE_FILE, {"format": STATE_FORMAT, "monitor": self.monitor.state_dict(), "owes": owes})

    def after_evaluation(self, epoch: int, step: int) -> None:
        """Main process: the folders saved for this evaluation (at its step, or owing its epoch) now hold it; LAUNCHER_STATE too."""
        for folder, saved_step, owed_epoch in self._saved:
            if (owed_epoch == epoch or saved_step == step) and (folder / STATE_FILE).is_file():  # kohya may have rotated it away
                self._write(folder, None)
        self._saved.clear()
        write_json_atomic(Path(self.args.output_dir) / LAUNCHER_STATE, self.monitor.state_dict())

    # -- resuming
    def resume(self, folder: Path) -> None:
        """Continue the monitor from the state saved with kohya's state folder `folder`. A folder without one (saved by
        sd-scripts alone) continues from the latest state in the output folder; one holding accelerate custom checkpoints
        (saved by lora-monitor 0.x, which registered the monitor) is an error saying how to resume it."""
        self.loaded = folder.resolve()
        path = folder / STATE_FILE
        if path.is_file():
            self._load(path)
            return
        legacy = sorted(p.name for p in folder.iterdir() if CUSTOM_CHECKPOINT.match(p.name)) if folder.is_dir() else []
        if legacy:
            raise ValueError(
                f"{folder} holds {', '.join(legacy)}: an object registered for checkpointing by an earlier lora-monitor, which "
                f"sd-scripts cannot load (it registers none). Move {legacy[0]} out of the folder and resume again: the monitor then "
                f"continues from {Path(self.args.output_dir) / LAUNCHER_STATE}"
            )
        latest = Path(self.args.output_dir) / LAUNCHER_STATE
        if latest.is_file():
            self.say(f"lora-monitor: {folder} holds no monitor state (saved by sd-scripts without lora-monitor?): the monitor "
                     f"continues from its latest state, {latest}")
            self._load_latest(latest)

    def _load(self, path: Path) -> None:
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("format") != STATE_FORMAT:
                raise ValueError(f"format {saved.get('format')!r}, expected {STATE_FORMAT!r}")
            state, owes = saved["monitor"], saved.get("owes")
            owed = None if owes is None else Owed(_count(owes["epoch"], "owes.epoch"), _count(owes["step"], "owes.step"))
            scored = [entry["epoch"] for entry in state["policy"]["history"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a lora-monitor state ({type(error).__name__}: {error}); move it out of the folder to "
                             f"resume with the monitor's latest state ({LAUNCHER_STATE}) instead") from None
        try:
            self.monitor.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path} (epochs {scored} scored) cannot be continued: {error}. Resume with the prompts and metrics "
                             "it was saved with") from None
        if owed is not None and scored and owed.epoch <= scored[-1]:
            owed = None
        self.owed = owed
        if owed is not None:
            self._saved.append((path.parent, None, owed.epoch))
        best = self.monitor.best_epoch
        self.say(f"lora-monitor: resumed the monitor's state saved with {path.parent.name}: epochs {scored} scored, best epoch {best}"
                 + (f"; epoch {owed.epoch} ended before it was saved and is scored first" if owed is not None else ""))

    def _load_latest(self, path: Path) -> None:
        """The monitor's latest state: one that scored nothing and does not fit (a start that failed early) is replaced
        with a note, one that scored epochs and does not fit is an error naming it."""
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            scored = [entry.get("epoch") for entry in state["policy"]["history"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a lora-monitor launcher state ({type(error).__name__}: {error}); move it away to start the monitor afresh") from None
        try:
            self.monitor.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as error:
            if not scored:
                self.say(f"lora-monitor: ignoring {path}: it scored no epoch and does not fit this run ({error}); it is replaced at the first epoch")
                return
            raise ValueError(f"{path} (epochs {scored} scored) cannot be continued: {error}. Move it away (with scores.jsonl and best/) to start "
                             "the monitor afresh") from None
        self.say(f"lora-monitor: resumed the monitor's state from {path} (best epoch so far: {self.monitor.best_epoch})")
