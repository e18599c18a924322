"""Follow a kohya-ss output folder and score its samples as they appear, without touching the trainer.

For runs the launcher cannot wrap (the kohya_ss GUI, a remote box): `KohyaWatcher` polls
<output_dir>/sample/, groups the epoch samples by epoch and prompt index from their names, and when
an epoch's samples are all there and finished (same size across two looks, and the PNG decodes)
it scores them through a LoraMonitor: the same record (previews/, scores.jsonl), the same best
copy (<output_dir>/best/, from kohya's own epoch file) and the same policy. When the policy says
stop it writes <output_dir>/STOP and prints it; it never signals the trainer.

Restarts: its state (the monitor's state_dict, the output name, a pending best copy) is saved in
<output_dir>/lora_monitor_watch.json after every epoch, so a restarted watcher goes on where it was.
Checkpoints: kohya saves an epoch's file before sampling it, and may delete it an epoch later
(--save_last_n_epochs); the last epoch's file is written after the loop as <output_name>.safetensors.
An epoch that is best while its file is missing is recorded in best/ with a note, and its weights
are copied when the final file of that epoch appears.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from lora_monitor.export import export_checkpoint, read_sidecar, write_json_atomic
from lora_monitor.integrations.kohya import (
    CHECKPOINT_SUFFIXES,
    KOHYA_PROMPT_DEFAULTS,
    SAMPLE_DIR,
    check_seed_groups,
    describe_base,
    images_in_order,
    monitor_metrics,
)
from lora_monitor.kohya_names import (
    SampleFile,
    epoch_checkpoint_name,
    group_by_epoch,
    last_checkpoint_name,
    list_samples,
    parse_sample_name,
)
from lora_monitor.monitor import LoraMonitor
from lora_monitor.record import read_image
from lora_monitor.spec import SUFFIXES, PreviewSpec

STATE_FILE = "lora_monitor_watch.json"
STOP_FILE = "STOP"
MISSING_NOTE = "CHECKPOINT_MISSING.txt"


def safetensors_complete(path: Path) -> dict[str, str] | None:
    """The metadata of a completely written .safetensors file, or None while it is incomplete."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        size = path.stat().st_size
    except (OSError, ValueError, struct.error):
        return None
    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    return dict(header.get("__metadata__") or {}) if size == 8 + length + end else None


class KohyaWatcher:
    """Scores the epochs of a kohya output folder as their samples appear (see the module docstring)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        *,
        prompts: str | os.PathLike | None = None,
        output_name: str | None = None,
        base: str | os.PathLike | None = None,
        monitor_options: Mapping[str, Any] | None = None,
        preview_seed: int = 0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.output_dir = Path(output_dir)
        if not self.output_dir.is_dir():
            raise FileNotFoundError(f"kohya output folder not found: {self.output_dir} (give the run's --output_dir)")
        self.sample_dir = self.output_dir / SAMPLE_DIR
        self.say = say
        self.prompts = Path(prompts) if prompts else self._find_prompts()
        self.spec = PreviewSpec.load(self.prompts, seed=preview_seed, **KOHYA_PROMPT_DEFAULTS)
        self.base = Path(base) if base else None
        if self.base is not None and not self.base.is_dir():
            raise FileNotFoundError(f"--base folder not found: {self.base}")
        monitor_options = dict(monitor_options or {})
        check_seed_groups(self.spec, monitor_metrics(monitor_options), self.prompts)
        self.monitor = LoraMonitor(spec=self.spec, output_dir=self.output_dir, write_weights=self._write_checkpoint, **monitor_options)
        self.output_name = output_name
        self.name_known = output_name is not None
        self.pending: int | None = None  # best epoch whose checkpoint is not copied yet
        self.stop_written = False
        self.skipped: set[int] = set()
        self.current_epoch: int | None = None
        self._looks: dict[Path, tuple[int, int]] = {}
        self._stable: set[Path] = set()
        self._said: set[str] = set()
        self._said_base = False
        self._load_state()

    # ------------------------------------------------------------------ the loop
    def run(self, interval: float = 10.0, once: bool = False, timeout: float | None = None) -> int:
        """Poll until the run is finished (its final network file is written and every epoch scored),
        `timeout` seconds pass, or Ctrl-C. `once`: two looks (a file must be seen twice to count as
        finished), then stop."""
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
        self.monitor.close()
        self._summary()
        return 0

    def poll(self) -> list[int]:
        """One look at the folder: score every epoch whose samples are complete; returns the epochs scored."""
        samples = list_samples(self.sample_dir)
        self._observe([s.path for s in samples])
        self._resolve_pending()
        if not samples:
            self._say_once("waiting", f"lora-monitor watch: no samples yet in {self.sample_dir}: waiting (kohya writes them at each sample point)")
            return []
        if not self.name_known:
            names = sorted({str(s.output_name) for s in samples})
            if len(names) > 1:
                raise ValueError(f"{self.sample_dir} holds samples of several output names ({', '.join(names)}); choose one with --output-name")
            self.output_name, self.name_known = samples[0].output_name, True
            self._save_state()
        groups = group_by_epoch(s for s in samples if s.output_name == self.output_name)
        if self.monitor.needs_references and not self.monitor.has_base_references:
            if not self._load_base(groups):
                return []
        scored = {result.epoch for result in self.monitor.policy.history}
        last = max(scored, default=0)
        done = []
        for epoch in sorted(e for e in groups if e > last and e not in self.skipped):
            by_index = groups[epoch]
            if not self._ready(by_index):
                if any(later > epoch and self._ready(groups[later]) for later in groups):
                    self.skipped.add(epoch)
                    self.say(f"lora-monitor watch: epoch {epoch}: samples incomplete ({sorted(by_index)}) and a later epoch is complete: skipped")
                    continue
                break
            try:
                images = images_in_order(by_index, len(self.spec), f"epoch {epoch} samples in {self.sample_dir}")
            except (OSError, SyntaxError):  # decodes badly although its size held still: still being written
                self._stable.difference_update(s.path for s in by_index.values())
                break
            self._evaluate(epoch, images, by_index)
            done.append(epoch)
        return done

    def finished(self) -> bool:
        """The final network file is written, and no epoch with samples waits to be scored."""
        if not self.name_known or self._final_checkpoint() is None:
            return False
        scored = {r.epoch for r in self.monitor.policy.history} | self.skipped
        groups = group_by_epoch(list_samples(self.sample_dir, self.output_name))
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
        report = self.monitor.evaluate(epoch, images)
        if self.monitor.policy.base and not self._said_base:
            self._said_base = True
            self.say(f"lora-monitor watch: base model (LoRA off): {describe_base(self.monitor.policy)}")
        values = ", ".join(f"{name} {value:.4f}" for name, value in report.aggregates.items())
        self.say(f"lora-monitor watch: epoch {epoch}: {values}{'  (best)' if report.is_best else ''}; {report.decision.reason}")
        if report.is_best:
            where = "its checkpoint copied to" if self.pending is None else "its checkpoint is not there (yet): noted in"
            self.say(f"lora-monitor watch: epoch {epoch} is the best so far: {where} {self.output_dir / 'best'}")
        if report.should_stop and not self.stop_written:
            self._write_stop(report)
        self._save_state()

    def _write_stop(self, report) -> None:
        policy = self.monitor.policy
        text = (f"lora-monitor asks to stop this run after epoch {policy.stopped_epoch}: {policy.stop_reason}\n"
                f"best epoch: {policy.best_epoch} ({self.output_dir / 'best'})\n"
                "The watcher does not stop the trainer: stop it yourself (the GUI's stop button, or Ctrl-C).\n")
        write_json_atomic(self.output_dir / (STOP_FILE + ".json"), {"epoch": policy.stopped_epoch, "reason": policy.stop_reason, "best_epoch": policy.best_epoch})
        temporary = self.output_dir / f".{STOP_FILE}.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, self.output_dir / STOP_FILE)
        self.stop_written = True
        self.say(f"lora-monitor watch: STOP written to {self.output_dir / STOP_FILE}:\n  " + text.strip().replace("\n", "\n  "))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint(self, epoch: int) -> Path | None:
        """The finished network file of `epoch`: kohya's epoch file, or the final file when it is that epoch's."""
        for suffix in CHECKPOINT_SUFFIXES:
            path = self.output_dir / epoch_checkpoint_name(self.output_name, epoch, suffix)
            if path.is_file() and (suffix != ".safetensors" or safetensors_complete(path) is not None):
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
            path = self.output_dir / last_checkpoint_name(self.output_name, suffix)
            if path.is_file() and (suffix != ".safetensors" or safetensors_complete(path) is not None):
                return path
        return None

    def _write_checkpoint(self, folder: Path) -> None:
        epoch = self.current_epoch
        source = self._checkpoint(epoch)
        if source is not None:
            try:
                shutil.copy2(source, folder / epoch_checkpoint_name(self.output_name, epoch, source.suffix))
                self.pending = None
                return
            except FileNotFoundError:  # kohya rotated it away just now
                pass
        self.pending = epoch
        (folder / MISSING_NOTE).write_text(
            f"Epoch {epoch} is the best, but its network file was not in {self.output_dir} when it was scored: "
            f"it was not saved at this epoch (--save_every_n_epochs), was deleted by --save_last_n_epochs before the "
            f"watcher saw it, or is the last epoch's file, which kohya writes after training. The watcher copies it "
            f"here if it appears while it runs.\n", encoding="utf-8")

    def _resolve_pending(self) -> None:
        if self.pending is None or not self.name_known:
            return
        epoch = self.pending
        source = self._checkpoint(epoch)
        best = self.output_dir / "best"
        if source is None or not best.is_dir() or read_sidecar(best).get("epoch") != epoch:
            return
        name = epoch_checkpoint_name(self.output_name, epoch, source.suffix)
        export_checkpoint(best, lambda folder: shutil.copy2(source, folder / name), {**read_sidecar(best), "checkpoint_source": source.name})
        self.pending = None
        self._save_state()
        self.say(f"lora-monitor watch: the best epoch {epoch}'s network file appeared ({source.name}): copied to {best / name}")

    # ------------------------------------------------------------------ files
    def _observe(self, paths: list[Path]) -> None:
        """A file is stable once its size and mtime are the same at two looks in a row."""
        looks = {}
        for path in paths:
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            looks[path] = (stat.st_size, stat.st_mtime_ns)
            if stat.st_size > 0 and self._looks.get(path) == looks[path]:
                self._stable.add(path)
            else:
                self._stable.discard(path)
        self._looks = looks

    def _ready(self, by_index: Mapping[int, SampleFile]) -> bool:
        return sorted(by_index) == list(range(len(self.spec))) and all(s.path in self._stable for s in by_index.values())

    def _load_base(self, groups: Mapping[int, Mapping[int, SampleFile]]) -> bool:
        """Base references from --base, else from the run's epoch-0 (--sample_at_first) samples."""
        if self.base is not None:
            images = self._read_base_folder(self.base)
            source = str(self.base)
        elif 0 in groups and self._ready(groups[0]):
            images = images_in_order(groups[0], len(self.spec), f"epoch 0 samples in {self.sample_dir}")
            source = f"the run's epoch-0 samples (--sample_at_first) in {self.sample_dir}"
        elif any(epoch > 0 for epoch in groups) and 0 not in groups:
            raise ValueError(
                f"no base references for {', '.join(s.name for s in self.monitor.scorers if s.needs_reference)}: "
                f"{self.sample_dir} has no epoch-0 samples (kohya's --sample_at_first) and no --base DIR was given; "
                "give --base, or score without them (e.g. --metrics brisque)")
        else:
            self._say_once("base", "lora-monitor watch: waiting for the epoch-0 samples (--sample_at_first) to use as base references")
            return False
        self.monitor.set_base_references(images)
        self.say(f"lora-monitor watch: base references: {source}")
        return True

    def _read_base_folder(self, folder: Path) -> list:
        for candidate in (folder, folder / SAMPLE_DIR):
            files = sorted(p for p in candidate.glob("*.png")) if candidate.is_dir() else []
            parsed = [parse_sample_name(p) for p in files]
            if files and all(parsed):
                groups = group_by_epoch(parsed)
                return images_in_order(groups[min(groups)], len(self.spec), f"base renders in {candidate}")
            if len(files) == len(self.spec):
                return [read_image(p) for p in files]
        raise ValueError(f"--base {folder}: expected {len(self.spec)} PNGs (one per prompt, in prompt order by name, or kohya-named), "
                         f"found {len(list(folder.glob('*.png')))}")

    def _find_prompts(self) -> Path:
        looked = [self.sample_dir / f"prompt{suffix}" for suffix in SUFFIXES]
        for path in looked:
            if path.is_file():
                return path
        raise ValueError(f"no prompt file: give --prompts FILE (the run's --sample_prompts); looked for {', '.join(str(p) for p in looked)}")

    # ------------------------------------------------------------------ state
    def _save_state(self) -> None:
        write_json_atomic(self.output_dir / STATE_FILE, {
            "monitor": self.monitor.state_dict(), "output_name": self.output_name, "name_known": self.name_known,
            "pending": self.pending, "stop_written": self.stop_written, "skipped": sorted(self.skipped), "prompts": str(self.prompts)})

    def _load_state(self) -> None:
        path = self.output_dir / STATE_FILE
        if not path.is_file():
            return
        state = json.loads(path.read_text(encoding="utf-8"))
        self.monitor.load_state_dict(state["monitor"])  # refuses another prompt file (spec fingerprint)
        if not self.name_known and state.get("name_known"):
            self.output_name, self.name_known = state["output_name"], True
        self.pending = state.get("pending")
        self.stop_written = bool(state.get("stop_written"))
        self.skipped = set(state.get("skipped", []))
        epochs = [r.epoch for r in self.monitor.policy.history]
        self.say(f"lora-monitor watch: continuing from {path}: epochs {epochs} already scored, best epoch {self.monitor.best_epoch}")

    def _summary(self) -> None:
        policy = self.monitor.policy
        if policy.best_epoch is None:
            self.say("lora-monitor watch: no epoch scored yet")
            return
        self.say(f"lora-monitor watch: best epoch {policy.best_epoch} ({policy.metric} {policy.best_value:.4f}): {self.output_dir / 'best'}; "
                 f"scores: {self.monitor.record.scores_path}" + (f"; STOP written: {policy.stop_reason}" if self.stop_written else ""))

    def _say_once(self, key: str, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(message)
