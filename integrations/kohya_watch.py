"""Follow a kohya-ss output folder and score its samples as they appear, without touching the trainer.

For runs the launcher cannot wrap (the kohya_ss GUI, a remote box): `KohyaWatcher` polls
<output_dir>/sample/, groups the epoch samples by epoch and prompt index from their names, and when
an epoch's samples are all there and finished (same size across two looks, and the PNG decodes)
it scores them through a LoraMonitor: the same record (previews/, scores.jsonl), the same best
copy (<output_dir>/best/, from kohya's own epoch file) and the same policy. When the policy says
stop it writes <output_dir>/STOP and prints it; it never signals the trainer.

One watcher a folder: it holds <output_dir>/lora_monitor.lock (kohya_names.FolderLock) while it runs;
a second one exits with the holder's pid and host.

Restarts: its state (the monitor's state_dict, the output name, a pending best copy) is saved in
<output_dir>/lora_monitor_watch.json after every epoch, so a restarted watcher goes on where it was.
Every value read back from it is checked (an output name is a plain file name); a state that scored
nothing and does not fit this start (a start that failed early) is replaced with a note.
Checkpoints: kohya saves an epoch's file before sampling it, and may delete it an epoch later
(--save_last_n_epochs); the last epoch's file is written after the loop as <output_name>.safetensors.
An epoch that is best while its file is missing is recorded in best/ with a note, and its weights
are copied when the final file of that epoch appears. A network file is copied only from inside the
output folder (links out of it are refused), and only when its contents check out: a .safetensors
header that parses and matches the file's length; a pickle (.ckpt, .pt) only with allow_pickle, and
then only if torch.load(weights_only=True) reads it.
Unreadable samples: a sample that does not decode is named once; once the run's final file is written
(kohya has finished sampling) an epoch still incomplete or unreadable is given up with a message.
kohya's own validation loss: with --validation_split sd-scripts logs loss/validation/epoch_average to TensorBoard
under --logging_dir (trainer_logs.KOHYA_TAGS), at the 1-based epoch of that epoch's samples and file. When its
logs hold it at the first scored epoch (or it is asked for), it is recorded beside the image scores as the metric
trainer_val_loss (lower is better; --metric trainer_val_loss picks by it), as for the other trainers.
The parts shared with the other trainers' watcher (lock, STOP, the best copy, checkpoint checks) are in
watch_common.py and watch_checkpoints.py; the state file's checks in kohya_watch_state.py.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from lora_monitor.export import write_json_atomic
from lora_monitor.integrations.kohya import (
    CHECKPOINT_SUFFIXES,
    KOHYA_PROMPT_DEFAULTS,
    SAMPLE_DIR,
    check_seed_groups,
    describe_base,
    monitor_metrics,
)
from lora_monitor.integrations.kohya_watch_samples import BEING_WRITTEN, EpochSamples
from lora_monitor.integrations.kohya_watch_state import checked_state
from lora_monitor.integrations.watch_checkpoints import (
    MISSING_NOTE,
    PICKLE_SUFFIXES,
    CheckpointRefused,
    copy_checkpoint,
    safetensors_complete,
    verify_checkpoint,
)
from lora_monitor.integrations.watch_common import (
    STATE_FILE,
    STOP_FILE,
    TRAINER_VAL_LOSS,
    FolderWatcher,
    RoundBoard,
    RoundValues,
    ValidationLosses,
    read_state_file,
    sample_inside,
    write_stop_file,
)
from lora_monitor.kohya_names import (
    OutsideFolderError,
    SampleFile,
    check_output_name,
    epoch_checkpoint_name,
    group_by_epoch,
    inside_folder,
    last_checkpoint_name,
)
from lora_monitor.monitor import LoraMonitor
from lora_monitor.spec import PreviewSpec

# names other modules and tests import from here (some live in watch_common and watch_checkpoints now)
__all__ = ["KohyaWatcher", "MISSING_NOTE", "STATE_FILE", "STOP_FILE", "CheckpointRefused", "copy_checkpoint",
           "sample_inside", "write_stop_file", "checked_state"]

#: How kohya is stopped by hand: it reads no stop file and has no signal handler.
HOW_TO_STOP = "kohya reads no stop file: use the kohya_ss GUI's stop button, or Ctrl-C in kohya's console (it saves nothing then)."


class KohyaWatcher(EpochSamples, FolderWatcher):
    """Scores the epochs of a kohya output folder as their samples appear (see the module docstring).
    It holds the folder's lock from construction until `close()` (run() closes it)."""

    unit = "epoch"

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        prompts: str | os.PathLike | None = None,
        output_name: str | None = None,
        base: str | os.PathLike | None = None,
        monitor_options: Mapping[str, Any] | None = None,
        preview_seed: int = 0,
        allow_pickle: bool = False,
        logging_dir: str | os.PathLike | None = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.output_dir = Path(output_dir)
        if not self.output_dir.is_dir():
            raise FileNotFoundError(f"kohya output folder not found: {self.output_dir} (give the run's --output_dir)")
        self._hold_folder(say, lambda: self._setup(prompts, output_name, base, monitor_options, preview_seed, allow_pickle, logging_dir))

    def _setup(self, prompts, output_name, base, monitor_options, preview_seed, allow_pickle, logging_dir) -> None:
        self.sample_dir = self.output_dir / SAMPLE_DIR
        self.allow_pickle = allow_pickle
        self.prompts = Path(prompts) if prompts else self._find_prompts()
        self.spec = PreviewSpec.load(self.prompts, seed=preview_seed, **KOHYA_PROMPT_DEFAULTS)
        self.base = Path(base) if base else None
        if self.base is not None and not self.base.is_dir():
            raise FileNotFoundError(f"--base folder not found: {self.base}")
        self.options = dict(monitor_options or {})
        check_seed_groups(self.spec, self._metrics(), self.prompts)
        self.losses = ValidationLosses(self.output_dir, "kohya", logging_dir, say=self.say)
        self.board = RoundBoard()
        self.with_loss = TRAINER_VAL_LOSS in self._metrics()
        self.monitor = self._new_monitor()
        self.output_name = None if output_name is None else check_output_name(output_name, "--output-name")
        self.name_known = output_name is not None
        self.pending: int | None = None  # best epoch whose checkpoint is not copied yet
        self.stop_written = False
        self.skipped: set[int] = set()
        self.current_epoch: int | None = None
        self._looks: dict[Path, tuple[int, int]] = {}
        self._stable: set[Path] = set()
        self._said_base = False
        self._base: tuple[list, str] | None = None  # the base references read, and where from; set before an evaluation
        self._waiting: dict[int, str] = {}  # epoch -> what it waits for (the last look's)
        self._gave_up: dict[int, str] = {}  # epochs skipped by this watcher -> why
        self._final_seen = False  # the run's final file was there at the last look
        self._load_state()

    # ------------------------------------------------------------------ the loop
    def run(self, interval: float = 10.0, once: bool = False, timeout: float | None = None) -> int:
        """Poll until the run is finished (its final network file is written and every epoch scored),
        `timeout` seconds pass, or Ctrl-C. `once`: two looks (a file must be seen twice to count as
        finished), then stop and list what was not scored. The folder's lock is released at the end."""
        if interval <= 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval}")
        started = time.monotonic()
        looks = 0
        try:
            while True:
                self.poll()
                looks += 1
                if self.finished():
                    self._resolve_pending()
                    self.say(f"lora-monitor watch: the run is finished ({self._final_checkpoint()} written) and every epoch is scored")
                    break
                if (once and looks >= 2) or (timeout is not None and time.monotonic() - started >= timeout):
                    break
                time.sleep(min(interval, 1.0) if once else interval)
        except KeyboardInterrupt:
            self.say("lora-monitor watch: stopped watching (Ctrl-C); run it again to continue")
        finally:
            self.close()
        if once:
            self._say_unscored()
        self._summary()
        return 0

    def poll(self) -> list[int]:
        """One look at the folder: score every epoch whose samples are complete; returns the epochs scored."""
        samples = self._samples()
        self._observe([s.path for s in samples])
        self._resolve_pending()
        final_before, self._final_seen = self._final_seen, self.name_known and self._final_checkpoint() is not None
        if not samples:
            self._say_once("waiting", f"lora-monitor watch: no samples yet in {self.sample_dir}: waiting (kohya writes them at each sample point)")
            return []
        if not self.name_known:
            names = sorted({str(s.output_name) for s in samples})
            if len(names) > 1:
                raise ValueError(f"{self.sample_dir} holds samples of several output names ({', '.join(names)}); choose one with --output-name")
            self.output_name, self.name_known = samples[0].output_name, True
        groups = group_by_epoch(s for s in samples if s.output_name == self.output_name)
        if self.monitor.needs_references and self._base is None:
            if not self._load_base(groups, final_before):
                return []
        scored = {result.epoch for result in self.monitor.policy.history}
        last = max(scored, default=0)
        done = []
        for epoch in sorted(e for e in groups if e > last and e not in self.skipped):
            images = self._read_epoch(epoch, groups[epoch])
            if images is None:
                waiting = self._waiting[epoch]
                if any(later > epoch and self._ready(groups[later]) for later in groups):
                    self._give_up(epoch, f"{waiting}, and a later epoch is complete")
                    continue
                if final_before and not waiting.endswith(BEING_WRITTEN):
                    final = self._final_checkpoint()
                    name = final.name if final is not None else last_checkpoint_name(self.output_name)
                    self._give_up(epoch, f"{waiting}, and the run's final file {name} is written: kohya has finished sampling")
                    continue
                break
            self._evaluate(epoch, images, groups[epoch])
            done.append(epoch)
        return done

    def finished(self) -> bool:
        """The final network file is written, and no epoch with samples waits to be scored."""
        if not self.name_known or self._final_checkpoint() is None:
            return False
        scored = {r.epoch for r in self.monitor.policy.history} | self.skipped
        groups = group_by_epoch(s for s in self._samples() if s.output_name == self.output_name)
        return all(epoch in scored or epoch <= max(scored, default=0) for epoch in groups if epoch > 0)

    # ------------------------------------------------------------------ scoring
    def _evaluate(self, epoch: int, images: list, by_index: Mapping[int, SampleFile]) -> None:
        unseeded = [i for i, s in sorted(by_index.items()) if s.seed is None]
        if unseeded:
            self._say_once("unseeded", f"lora-monitor watch: prompts {unseeded} have no --d seed: kohya draws a random seed for them at every "
                           "epoch, so their scores change with the seed too; add --d N to those prompts")
        odd = [i for i, s in sorted(by_index.items()) if s.seed is not None and s.seed != self.spec.prompts[i].seed]
        if odd:
            self._say_once("seeds", f"lora-monitor watch: the seeds in the sample names of prompts {odd} differ from {self.prompts}: is it the run's prompt file?")
        self.current_epoch = epoch
        if not self.monitor.policy.history and not self.with_loss:
            self._add_loss_if_logged()
        if self._base is not None and not self.monitor.has_base_references:
            base_images, source = self._base
            self.monitor.set_base_references(base_images)
            self.board.base_images = self.monitor.base_references()
            self.say(f"lora-monitor watch: base references: {source}")
        if self.with_loss:  # kohya validates no epoch 0: the base value stays NaN
            self.board.current = {TRAINER_VAL_LOSS: [self.losses.for_round(epoch, "epoch")] * len(self.spec)}
        stopped_before = self.monitor.policy.stopped_epoch
        report = self.monitor.evaluate(epoch, images)
        if self.monitor.policy.base and not self._said_base:
            self._said_base = True
            self.say(f"lora-monitor watch: base model (LoRA off): {describe_base(self.monitor.policy)}")
        self._tell(report, stopped_before, HOW_TO_STOP)
        self._save_state()

    # ------------------------------------------------------------------ the monitor
    def _metrics(self) -> list[str]:
        return monitor_metrics(self.options)

    def _new_monitor(self) -> LoraMonitor:
        """The monitor over the options' metrics; with `with_loss` the trainer's validation loss beside them, a round
        value (watch_common.RoundValues) computed from kohya's logs."""
        options = dict(self.options)
        if not self.with_loss:
            return LoraMonitor(spec=self.spec, output_dir=self.output_dir, write_weights=self._write_checkpoint, **options)
        from lora_monitor.scoring.scorers import get_scorer
        from lora_monitor.scoring.signals import SignalOptions

        metrics = list(dict.fromkeys([*self._metrics(), TRAINER_VAL_LOSS]))
        signal = {name: options[name] for name in ("references", "clip_model", "dino_model", "strip_words") if name in options}
        scorers = [get_scorer(name, options=SignalOptions(**signal)) for name in metrics if name != TRAINER_VAL_LOSS]
        options["metrics"] = tuple(metrics)
        return LoraMonitor(spec=self.spec, output_dir=self.output_dir, write_weights=self._write_checkpoint,
                           scorers=[*scorers, RoundValues(TRAINER_VAL_LOSS, False, self.board)], **options)

    def _add_loss_if_logged(self) -> None:
        """Before the first evaluation: when kohya's logs hold its epoch validation loss, the monitor is built again
        with it (nothing was scored or told to a listener yet)."""
        tell = self.say if self.losses.logging_dir is not None else None
        if self.losses.values("epoch", say=tell):
            self.with_loss = True
            self.monitor = self._new_monitor()
            self.say(f"lora-monitor watch: kohya logs its validation loss (loss/validation/epoch_average): recorded as "
                     f"{TRAINER_VAL_LOSS} (--metric {TRAINER_VAL_LOSS} picks by it)")

    # ------------------------------------------------------------------ checkpoints
    def _usable(self, path: Path) -> bool:
        """Whether the network file `path` may be read: inside the output folder, and a pickle only with allow_pickle."""
        try:
            inside_folder(path, self.output_dir, "network file")
            if path.suffix in PICKLE_SUFFIXES and not self.allow_pickle:
                verify_checkpoint(path, allow_pickle=False)
        except (OutsideFolderError, CheckpointRefused) as error:
            self._refuse(path, str(error))
            return False
        return True

    def _existing(self, name: str) -> Path | None:
        path = self.output_dir / name
        if not (path.is_file() or path.is_symlink()) or not self._usable(path):
            return None
        return None if path.suffix == ".safetensors" and safetensors_complete(path) is None else path

    def _checkpoint(self, epoch: int) -> Path | None:
        """The finished network file of `epoch`: kohya's epoch file, or the final file when it is that epoch's."""
        for suffix in CHECKPOINT_SUFFIXES:
            path = self._existing(epoch_checkpoint_name(self.output_name, epoch, suffix))
            if path is not None:
                return path
        final = self._final_checkpoint()
        if final is not None:
            metadata = safetensors_complete(final) if final.suffix == ".safetensors" else None
            final_epoch = metadata.get("ss_epoch") if metadata else None
            newest = max((r.epoch for r in self.monitor.policy.history), default=None)
            if (final_epoch is not None and final_epoch == str(epoch)) or (final_epoch is None and epoch == newest):
                return final
        return None

    def _final_checkpoint(self) -> Path | None:
        for suffix in CHECKPOINT_SUFFIXES:
            path = self._existing(last_checkpoint_name(self.output_name, suffix))
            if path is not None:
                return path
        return None

    def _write_checkpoint(self, folder: Path) -> None:
        epoch = self.current_epoch
        source = self._checkpoint(epoch)
        name = epoch_checkpoint_name(self.output_name, epoch, source.suffix if source is not None else ".safetensors")
        if self._copy_best(folder, epoch, source, name):
            return
        names = [epoch_checkpoint_name(self.output_name, epoch, suffix) for suffix in CHECKPOINT_SUFFIXES]
        names += [last_checkpoint_name(self.output_name, suffix) for suffix in CHECKPOINT_SUFFIXES]
        refused = [self._refused[name] for name in names if name in self._refused]
        (folder / MISSING_NOTE).write_text(
            f"Epoch {epoch} is the best, but its network file was not in {self.output_dir} when it was scored: "
            f"it was not saved at this epoch (--save_every_n_epochs), was deleted by --save_last_n_epochs before the "
            f"watcher saw it, or is the last epoch's file, which kohya writes after training. The watcher copies it "
            f"here if it appears while it runs.\n" + "".join(f"Not copied: {why}\n" for why in refused), encoding="utf-8")

    def _resolve_pending(self) -> None:
        if self.pending is None or not self.name_known:
            return
        source = self._checkpoint(self.pending)
        if source is not None:
            self._copy_when_it_appears(self.pending, source, epoch_checkpoint_name(self.output_name, self.pending, source.suffix))

    # ------------------------------------------------------------------ state
    def _save_state(self) -> None:
        write_json_atomic(self.output_dir / STATE_FILE, {
            "monitor": self.monitor.state_dict(), "output_name": self.output_name, "name_known": self.name_known,
            "pending": self.pending, "stop_written": self.stop_written, "skipped": sorted(self.skipped), "prompts": str(self.prompts),
            TRAINER_VAL_LOSS: self.with_loss})

    def _load_state(self) -> None:
        """Continue from the state file: every value checked first (ValueError naming the file, the key and the value).
        One that scored nothing and does not fit this start is replaced with a note; one that scored epochs and does not
        fit is an error, as its scores would be lost."""
        path = self.output_dir / STATE_FILE
        state = read_state_file(path, self.output_dir)
        if state is None:
            return
        state, scored = checked_state(state, path)
        misfit = None
        if self.name_known and state["name_known"] and state["output_name"] != self.output_name:
            misfit = f"it is for output name {state['output_name']!r}, but --output-name {self.output_name!r} was given"
        else:
            if state[TRAINER_VAL_LOSS] and not self.with_loss:  # it recorded kohya's validation loss: go on recording it
                self.with_loss = True
                self.monitor = self._new_monitor()
            try:
                self.monitor.load_state_dict(state["monitor"])  # refuses another prompt file (spec fingerprint)
            except (ValueError, KeyError, TypeError) as error:
                misfit = f"{type(error).__name__}: {error}" if not isinstance(error, ValueError) else str(error)
        if misfit is not None:
            if not scored and not state["skipped"]:
                self.say(f"lora-monitor watch: ignoring {path}, left by a start that scored nothing: {misfit}; it is replaced at the first epoch")
                return
            raise ValueError(f"{path} (epochs {scored} scored) does not fit this start: {misfit}. Give the options of that run, or move "
                             f"{path.name}, scores.jsonl and best/ away to start afresh")
        if not self.name_known and state["name_known"]:
            self.output_name, self.name_known = state["output_name"], True
        self.pending = state["pending"]
        self.stop_written = state["stop_written"]
        self.skipped = set(state["skipped"])
        self.say(f"lora-monitor watch: continuing from {path}: epochs {scored} already scored, best epoch {self.monitor.best_epoch}")
