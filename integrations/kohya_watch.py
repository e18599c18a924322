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
    UnreadableSampleError,
    check_seed_groups,
    decision_text,
    describe_base,
    images_in_order,
    monitor_metrics,
    read_sample,
)
from lora_monitor.kohya_names import (
    FolderLock,
    OutsideFolderError,
    SampleFile,
    check_output_name,
    epoch_checkpoint_name,
    group_by_epoch,
    inside_folder,
    last_checkpoint_name,
    list_samples,
    parse_sample_name,
)
from lora_monitor.monitor import LoraMonitor
from lora_monitor.spec import SUFFIXES, PreviewSpec

STATE_FILE = "lora_monitor_watch.json"
STOP_FILE = "STOP"
MISSING_NOTE = "CHECKPOINT_MISSING.txt"
PICKLE_SUFFIXES = (".ckpt", ".pt")
#: A safetensors header longer than this is taken for a damaged file (kohya's LoRA headers are a few hundred KB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
#: How a wait for a file that changed between two looks ends: no reason to give it up, something writes it.
BEING_WRITTEN = "still being written (it changed since the last look)"
NOT_WRITTEN = "no sample yet"



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


class KohyaWatcher:
    """Scores the epochs of a kohya output folder as their samples appear (see the module docstring).
    It holds the folder's lock from construction until `close()` (run() closes it)."""

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
        say: Callable[[str], None] = print,
    ) -> None:
        self.output_dir = Path(output_dir)
        if not self.output_dir.is_dir():
            raise FileNotFoundError(f"kohya output folder not found: {self.output_dir} (give the run's --output_dir)")
        self.say = say
        self.lock: FolderLock | None = FolderLock(self.output_dir, "lora-monitor watch", say=say).acquire()
        try:
            self._setup(prompts, output_name, base, monitor_options, preview_seed, allow_pickle)
        except BaseException:
            self.close()
            raise

    def _setup(self, prompts, output_name, base, monitor_options, preview_seed, allow_pickle) -> None:
        self.sample_dir = self.output_dir / SAMPLE_DIR
        self.allow_pickle = allow_pickle
        self.prompts = Path(prompts) if prompts else self._find_prompts()
        self.spec = PreviewSpec.load(self.prompts, seed=preview_seed, **KOHYA_PROMPT_DEFAULTS)
        self.base = Path(base) if base else None
        if self.base is not None and not self.base.is_dir():
            raise FileNotFoundError(f"--base folder not found: {self.base}")
        monitor_options = dict(monitor_options or {})
        check_seed_groups(self.spec, monitor_metrics(monitor_options), self.prompts)
        self.monitor = LoraMonitor(spec=self.spec, output_dir=self.output_dir, write_weights=self._write_checkpoint, **monitor_options)
        self.output_name = None if output_name is None else check_output_name(output_name, "--output-name")
        self.name_known = output_name is not None
        self.pending: int | None = None  # best epoch whose checkpoint is not copied yet
        self.stop_written = False
        self.skipped: set[int] = set()
        self.current_epoch: int | None = None
        self._looks: dict[Path, tuple[int, int]] = {}
        self._stable: set[Path] = set()
        self._said: set[Any] = set()
        self._said_base = False
        self._waiting: dict[int, str] = {}  # epoch -> what it waits for (the last look's)
        self._gave_up: dict[int, str] = {}  # epochs skipped by this watcher -> why
        self._refused: dict[str, str] = {}  # network file name -> why it was not copied
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

    def close(self) -> None:
        """Finish the monitor's listeners and release the folder's lock (again: nothing)."""
        monitor = getattr(self, "monitor", None)
        if monitor is not None and self.lock is not None:
            monitor.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

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
        if self.monitor.needs_references and not self.monitor.has_base_references:
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

    # ------------------------------------------------------------------ samples
    def _samples(self) -> list[SampleFile]:
        """The epoch samples in the sample folder, less links that lead out of the output folder (each named once)."""
        if self.sample_dir.is_symlink():
            inside_folder(self.sample_dir, self.output_dir, "the sample folder")
        return [sample for sample in list_samples(self.sample_dir) if sample_inside(sample.path, self.output_dir, self._say_once)]

    def _read_epoch(self, epoch: int, by_index: Mapping[int, SampleFile]) -> list | None:
        """The epoch's images in prompt order, or None with what it waits for in self._waiting[epoch]. A sample that
        does not decode, whatever the decoder raises, is named once and counts as not there yet."""
        count = len(self.spec)
        extra = sorted(i for i in by_index if i >= count)
        if extra:
            raise ValueError(f"epoch {epoch} has samples for prompt indices {extra} ({by_index[extra[0]].path.name}), but {self.prompts} "
                             f"has {count} prompts: is it the run's prompt file? (give it with --prompts)")
        missing = [i for i in range(count) if i not in by_index]
        writing = [by_index[i].path.name for i in sorted(by_index) if by_index[i].path not in self._stable]
        waiting = None
        if missing:
            waiting = f"{NOT_WRITTEN} for prompt(s) {missing}"
            if self._waiting.get(epoch, "").startswith(NOT_WRITTEN):  # at two looks in a row: say so, once an epoch
                self._say_once(("missing", epoch), f"lora-monitor watch: epoch {epoch}: waiting for the samples of prompt(s) {missing}")
        elif writing:
            waiting = f"{', '.join(writing)} {BEING_WRITTEN}"
        else:
            images, problems = [], []
            for index in range(count):
                try:
                    images.append(read_sample(by_index[index].path))
                except UnreadableSampleError as error:
                    problems.append(error)
            for error in problems:
                self._say_once(("unreadable", str(error)), f"lora-monitor watch: epoch {epoch}: waiting for {error.path.name} to decode: "
                               f"{error.why}. It is given up once the run's final file is written")
            if not problems:
                self._waiting.pop(epoch, None)
                return images
            waiting = "; ".join(f"{error.path.name} does not decode ({error.why})" for error in problems)
        self._waiting[epoch] = waiting
        return None

    def _give_up(self, epoch: int, why: str) -> None:
        self.skipped.add(epoch)
        self._gave_up[epoch] = why
        self._waiting.pop(epoch, None)
        self.say(f"lora-monitor watch: epoch {epoch} skipped: {why}")
        self._save_state()

    def _say_unscored(self) -> None:
        """--once: the epochs that were seen but not scored, and why."""
        if not self.name_known:
            return
        scored = {r.epoch for r in self.monitor.policy.history}
        groups = group_by_epoch(s for s in self._samples() if s.output_name == self.output_name)
        if self.monitor.needs_references and not self.monitor.has_base_references:
            default = f"no base references yet: epoch 0 (--sample_at_first): {self._waiting.get(0, NOT_WRITTEN)}"
        else:
            default = "not looked at: an earlier epoch is not complete"
        left = {epoch: self._waiting.get(epoch, default)
                for epoch in sorted(groups) if epoch > 0 and epoch not in scored and epoch not in self.skipped}
        if self._gave_up:
            self.say("lora-monitor watch: --once: skipped " + "; ".join(f"epoch {e} ({why})" for e, why in sorted(self._gave_up.items())))
        if left:
            self.say("lora-monitor watch: --once: not scored yet " + "; ".join(f"epoch {e} ({why})" for e, why in left.items())
                     + "; run it again to score them once they are complete")

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
        stopped_before = self.monitor.policy.stopped_epoch
        report = self.monitor.evaluate(epoch, images)
        if self.monitor.policy.base and not self._said_base:
            self._said_base = True
            self.say(f"lora-monitor watch: base model (LoRA off): {describe_base(self.monitor.policy)}")
        values = ", ".join(f"{name} {value:.4f}" for name, value in report.aggregates.items())
        text = decision_text(report, self.monitor.policy, stopped_before)
        self.say(f"lora-monitor watch: epoch {epoch}: {values}{'  (best)' if report.is_best else ''}; {text}")
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
        write_stop_file(self.output_dir, text, self.say)
        self.stop_written = True

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

    def _refuse(self, path: Path, why: str) -> None:
        self._refused[path.name] = why
        self._say_once(("refused", why), f"lora-monitor watch: not copied: {why}")

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
        if source is not None:
            try:
                copy_checkpoint(source, folder / epoch_checkpoint_name(self.output_name, epoch, source.suffix), self.output_dir, self.allow_pickle)
                self.pending = None
                return
            except FileNotFoundError:  # kohya rotated it away just now
                pass
            except CheckpointRefused as error:
                self._refuse(source, str(error))
        self.pending = epoch
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
        epoch = self.pending
        source = self._checkpoint(epoch)
        best = self.output_dir / "best"
        if source is None or best.is_symlink() or not best.is_dir():  # a linked best/ is replaced at the next export, never read
            return
        try:
            sidecar = read_sidecar(best)
        except (OSError, ValueError) as error:
            self._say_once(("sidecar", str(error)), f"lora-monitor watch: {best / 'lora_monitor.json'} does not read ({error}); "
                           f"epoch {epoch}'s network file is not copied there")
            return
        if not isinstance(sidecar, dict) or sidecar.get("epoch") != epoch:
            return
        name = epoch_checkpoint_name(self.output_name, epoch, source.suffix)
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

    def _load_base(self, groups: Mapping[int, Mapping[int, SampleFile]], final_before: bool) -> bool:
        """Base references from --base, else from the run's epoch-0 (--sample_at_first) samples."""
        if self.base is not None:
            images = self._read_base_folder(self.base)
            source = str(self.base)
        elif 0 in groups:
            images = self._read_epoch(0, groups[0])
            if images is None:
                if final_before and not self._waiting[0].endswith(BEING_WRITTEN):
                    raise ValueError(f"the epoch-0 samples (--sample_at_first) in {self.sample_dir} are the base references, but "
                                     f"{self._waiting[0]}, and the run is finished; give --base DIR with base-model renders of the prompts")
                self._say_once("base", "lora-monitor watch: waiting for the epoch-0 samples (--sample_at_first) to use as base references")
                return False
            source = f"the run's epoch-0 samples (--sample_at_first) in {self.sample_dir}"
        elif any(epoch > 0 for epoch in groups):
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
                return [read_sample(p) for p in files]
        raise ValueError(f"--base {folder}: expected {len(self.spec)} PNGs (one per prompt, in prompt order by name, or kohya-named), "
                         f"found {len(list(folder.glob('*.png')))}")

    def _find_prompts(self) -> Path:
        looked = [self.sample_dir / f"prompt{suffix}" for suffix in SUFFIXES]
        for path in looked:
            if path.is_file():
                inside_folder(path, self.output_dir, "the prompt file")
                return path
        raise ValueError(f"no prompt file: give --prompts FILE (the run's --sample_prompts); looked for {', '.join(str(p) for p in looked)}")

    # ------------------------------------------------------------------ state
    def _save_state(self) -> None:
        write_json_atomic(self.output_dir / STATE_FILE, {
            "monitor": self.monitor.state_dict(), "output_name": self.output_name, "name_known": self.name_known,
            "pending": self.pending, "stop_written": self.stop_written, "skipped": sorted(self.skipped), "prompts": str(self.prompts)})

    def _load_state(self) -> None:
        """Continue from the state file: every value checked first (ValueError naming the file, the key and the value).
        One that scored nothing and does not fit this start is replaced with a note; one that scored epochs and does not
        fit is an error, as its scores would be lost."""
        path = self.output_dir / STATE_FILE
        if not (path.is_file() or path.is_symlink()):
            return
        inside_folder(path, self.output_dir, "the watcher's state file")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not readable as the watcher's state ({type(error).__name__}: {error}); move it away to start afresh") from None
        state, scored = checked_state(state, path)
        misfit = None
        if self.name_known and state["name_known"] and state["output_name"] != self.output_name:
            misfit = f"it is for output name {state['output_name']!r}, but --output-name {self.output_name!r} was given"
        else:
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

    def _summary(self) -> None:
        policy = self.monitor.policy
        if policy.best_epoch is None:
            self.say("lora-monitor watch: no epoch scored yet")
            return
        self.say(f"lora-monitor watch: best epoch {policy.best_epoch} ({policy.metric} {policy.best_value:.4f}): {self.output_dir / 'best'}; "
                 f"scores: {self.monitor.record.scores_path}" + (f"; STOP written: {policy.stop_reason}" if self.stop_written else ""))

    def _say_once(self, key: Any, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(message)


def checked_state(state: Any, path: Path) -> tuple[dict[str, Any], list[int]]:
    """The watcher's state as read from `path`, each value checked (a ValueError names the file, the key and the value),
    and the epochs it scored."""
    def bad(key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{path}: {key} is {value!r}, expected {expected}; the file was damaged or edited: move it away to start afresh")

    if not isinstance(state, dict):
        raise bad("the content", type(state).__name__, "a JSON object")
    monitor = state.get("monitor")
    history = monitor.get("policy", {}).get("history") if isinstance(monitor, dict) and isinstance(monitor.get("policy"), dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) and type(entry.get("epoch")) is int for entry in history):
        raise bad("monitor.policy.history", history, "a list of scored epochs (a lora-monitor monitor state)")
    name_known = state.get("name_known", False)
    if not isinstance(name_known, bool):
        raise bad("name_known", name_known, "true or false")
    name = state.get("output_name")
    if name is not None:
        check_output_name(name, f"{path} (output_name)")
    pending = state.get("pending")
    if pending is not None and (type(pending) is not int or pending < 0):
        raise bad("pending", pending, "an epoch number or null")
    skipped = state.get("skipped", [])
    if not isinstance(skipped, list) or not all(type(epoch) is int and epoch >= 0 for epoch in skipped):
        raise bad("skipped", skipped, "a list of epoch numbers")
    stop_written = state.get("stop_written", False)
    if not isinstance(stop_written, bool):
        raise bad("stop_written", stop_written, "true or false")
    prompts = state.get("prompts")
    if prompts is not None and not isinstance(prompts, str):
        raise bad("prompts", prompts, "the prompt file's name")
    checked = dict(monitor=monitor, output_name=name, name_known=name_known, pending=pending, skipped=skipped, stop_written=stop_written)
    return checked, [entry["epoch"] for entry in history]
