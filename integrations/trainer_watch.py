"""Follow the output folder of ai-toolkit, OneTrainer, musubi-tuner or SimpleTuner and score its samples as they
appear (issue 13).

The kohya watcher (kohya_watch.py) knows sd-scripts' folder by heart; this one reads any folder through
`lora_monitor.trainer_layouts`: the layout says where the samples are, which round (step or epoch) and slot
(prompt, and for SimpleTuner the image of that prompt) each belongs to, which round was rendered before
training (the base references), where the sample lies in a display image the trainer saves instead of it
(SimpleTuner), and which LoRA file holds a round's weights. Each complete round goes to a LoraMonitor keyed by
the trainer's own unit (`every_n_steps=1` for step rounds), so the record (previews/, scores.jsonl), the best
copy (OUT/best/, the round's own checkpoint copied through the atomic export) and the policy are the library's.
What the watcher adds comes in as round values (watch_common.RoundValues), computed here for the round:

- `trainer_val_loss`: the trainer's own validation loss from its logs (watch_common.ValidationLosses), lower is
  better, a metric like any other (`--metric trainer_val_loss`); NaN for a round it has no value for.
- video rounds (animated WebP, MP4): each clip scored with `video.score_videos` (per-image metrics as mean and
  `_worst` over frames, and `temporal_ssim`); the middle frame is the preview.

A round's slots: prompt indices 0..n-1 (n from --prompts, else the first round); for SimpleTuner, whose prompts
are shortnames with any number of images each, the slots of its first round, fixed once the next round begins.
Not watched: the diffusers example scripts (no samples on disk). None of these trainers reads a stop file:
when the policy says stop, OUT/STOP is written and the way to stop that trainer by hand is printed.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

from lora_monitor import trainer_layouts
from lora_monitor.export import write_json_atomic
from lora_monitor.integrations.kohya import UnreadableSampleError
from lora_monitor.integrations.trainer_watch_monitor import RoundMonitor
from lora_monitor.integrations.watch_checkpoints import MISSING_NOTE
from lora_monitor.integrations.watch_common import STATE_FILE, TRAINER_VAL_LOSS, FolderWatcher, read_state_file, sample_inside
from lora_monitor.trainer_layouts import RoundKey, SampleName, TrainerLayout

__all__ = ["TrainerWatcher", "UNWATCHABLE", "STATE_FILE", "TRAINER_VAL_LOSS", "hand_stop"]

#: Layouts this watcher refuses, and why.
UNWATCHABLE = {
    "diffusers": ("the diffusers example scripts send their validation images to TensorBoard/W&B only (log_validation()): "
                  "nothing on disk to watch. Put a LoraMonitor into the script instead (README: 'Where the lines go in "
                  "diffusers' example scripts', and examples/train_text_to_image_lora.py, that script with the monitor in it)"),
}
Slot = tuple[Any, str]  # (prompt index or shortname, variant): SampleName.slot


def hand_stop(layout: TrainerLayout) -> str:
    """How `layout`'s trainer is stopped by hand (none of the watched ones reads a stop file)."""
    if layout.stop is None:
        return f"{layout.title} reads no stop file: stop it with Ctrl-C in its console (it saves nothing then)"
    return f"{layout.title}: {layout.stop}"


class TrainerWatcher(RoundMonitor, FolderWatcher):
    """Scores the rounds of a trainer's output folder as their samples appear (module docstring). It holds the
    folder's lock (lora_monitor.lock) from construction until `close()` (run() closes it)."""

    def __init__(
        self,
        output_dir: str | os.PathLike,
        layout: TrainerLayout | str,
        *,
        prompts: str | os.PathLike | None = None,
        base_samples: str | os.PathLike | None = None,
        monitor_options: Mapping[str, Any] | None = None,
        logging_dir: str | os.PathLike | None = None,
        allow_pickle: bool = False,
        say: Callable[[str], None] = print,
    ) -> None:
        self.layout = trainer_layouts.get_layout(layout) if isinstance(layout, str) else layout
        if self.layout.name in UNWATCHABLE:
            raise ValueError(f"{self.layout.title}: {UNWATCHABLE[self.layout.name]}")
        if self.layout.name == "kohya":
            raise ValueError("kohya folders are watched by KohyaWatcher (integrations/kohya_watch.py)")
        self.output_dir = Path(output_dir)
        if not self.output_dir.is_dir():
            raise FileNotFoundError(f"{self.layout.title} output folder not found: {self.output_dir}")
        self._hold_folder(say, lambda: self._setup(prompts, base_samples, monitor_options, logging_dir, allow_pickle))

    def _setup(self, prompts, base_samples, monitor_options, logging_dir, allow_pickle) -> None:
        self.pending: int | None = None
        self.stop_written = False
        self.current: int | None = None
        self.allow_pickle = allow_pickle
        self._setup_monitor(prompts, base_samples, monitor_options, logging_dir)
        self._load_state()

    # ------------------------------------------------------------------ the loop
    def run(self, interval: float = 10.0, once: bool = False, timeout: float | None = None) -> int:
        """Poll until the trainer's final file is written and every round is scored, `timeout` seconds pass, or
        Ctrl-C; `once`: one look (the layout's file checks tell a half-written sample), then stop."""
        if interval <= 0:
            raise ValueError(f"interval must be a positive number of seconds, got {interval}")
        started = time.monotonic()
        try:
            while True:
                self.poll()
                if self.finished():
                    self.say(f"lora-monitor watch: the run is finished and every {self.unit or 'round'} is scored")
                    break
                if once or (timeout is not None and time.monotonic() - started >= timeout):
                    break
                time.sleep(interval)
        except KeyboardInterrupt:
            self.say("lora-monitor watch: stopped watching (Ctrl-C); run it again to continue")
        finally:
            self.close()
        self._summary()
        return 0

    def poll(self) -> list[int]:
        """One look: score every complete round after the last scored one; returns the rounds scored."""
        rounds = self._rounds()
        self._resolve_pending()
        if not rounds:
            self._say_once("waiting", f"lora-monitor watch: no {self.layout.title} samples yet in {self.output_dir}: waiting")
            return []
        if self.monitor is None and not self._build(rounds):
            return []
        last = max((result.epoch for result in self.monitor.policy.history), default=-1)
        done = []
        for key in sorted(k for k in rounds if k.unit == self.unit and k.number > last and k != self.layout.base_key):
            if not self._complete(key, rounds[key]):
                later = [k for k in rounds if k.unit == self.unit and k.number > key.number and self._complete(k, rounds[k])]
                if later:
                    self._say_once(("skip", key), f"lora-monitor watch: {key} skipped: samples of {self._missing(rounds[key])} "
                                   f"missing, and {later[0]} is complete")
                    continue
                self._say_once(("wait", key), f"lora-monitor watch: {key}: waiting for {self._missing(rounds[key])}")
                break
            try:
                self._evaluate(key, rounds[key])
            except UnreadableSampleError as error:
                self._say_once(("unreadable", str(error)), f"lora-monitor watch: {key}: waiting for {error.path.name} to decode ({error.why})")
                break
            done.append(key.number)
        return done

    def finished(self) -> bool:
        """The trainer's final file is written and no round with samples waits to be scored."""
        if trainer_layouts.final_checkpoint(self.output_dir, self.layout) is None or self.monitor is None:
            return False
        last = max((r.epoch for r in self.monitor.policy.history), default=-1)
        return all(k.number <= last for k in self._rounds() if k.unit == self.unit and k != self.layout.base_key)

    # ------------------------------------------------------------------ rounds
    def _rounds(self) -> dict[RoundKey, dict[Slot, SampleName]]:
        """round -> slot -> its newest finished sample, links out of the folder left out (named once)."""
        found: dict[RoundKey, dict[Slot, SampleName]] = {}
        samples = trainer_layouts.list_samples(self.output_dir, self.layout)
        for sample in sorted(samples, key=lambda s: (s.key, s.stamp, s.path.name)):  # a re-render after a restart: the newest wins
            if sample_inside(sample.path, self.output_dir, self._say_once):
                found.setdefault(sample.key, {})[sample.slot] = sample
        return found

    def _complete(self, key: RoundKey, by_slot: Mapping[Slot, SampleName]) -> bool:
        extra = sorted(set(by_slot) - set(self.slots), key=str)
        if extra:
            self._say_once(("extra", key), f"lora-monitor watch: {key} has samples of {self._names(extra)}, which the first round "
                           "did not have: left out")
        return all(slot in by_slot for slot in self.slots)

    def _missing(self, by_slot: Mapping[Slot, SampleName]) -> str:
        return self._names([slot for slot in self.slots if slot not in by_slot])

    @staticmethod
    def _names(slots: list[Slot]) -> str:
        if all(variant == "" for _, variant in slots):
            return f"prompt(s) {[prompt for prompt, _ in slots]}"
        return ", ".join(f"{prompt!r} image {variant}" for prompt, variant in slots)

    # ------------------------------------------------------------------ scoring
    def _evaluate(self, key: RoundKey, by_slot: Mapping[Slot, SampleName]) -> None:
        images = self._round_images(key, by_slot)
        self.current = key.number
        policy = self.monitor.policy
        stopped_before = policy.stopped_epoch
        report = self.monitor.evaluate(key.number, images, step=key.number if key.unit == "step" else None)
        self._tell(report, stopped_before, hand_stop(self.layout))
        self._save_state()

    # ------------------------------------------------------------------ checkpoints
    def _write_checkpoint(self, folder: Path) -> None:
        key = RoundKey(self.unit, self.current)
        source = trainer_layouts.checkpoint_for(self.output_dir, self.layout, key)
        if self._copy_best(folder, self.current, source, source.name if source is not None else ""):
            return
        refused = "".join(f"Not copied: {why}\n" for name, why in self._refused.items() if source is not None and name == source.name)
        (folder / MISSING_NOTE).write_text(
            f"{key} is the best, but no LoRA file holding its weights was in {self.output_dir} when it was scored "
            f"({self.layout.checkpoint_example}; {'; '.join(self.layout.notes[:1])}). The watcher copies it here if it "
            f"appears while it runs.\n{refused}", encoding="utf-8")

    def _resolve_pending(self) -> None:
        if self.pending is None or self.monitor is None:
            return
        source = trainer_layouts.checkpoint_for(self.output_dir, self.layout, RoundKey(self.unit, self.pending))
        if source is not None:
            self._copy_when_it_appears(self.pending, source, source.name)

    # ------------------------------------------------------------------ state
    def _save_state(self) -> None:
        write_json_atomic(self.output_dir / STATE_FILE, {
            "trainer": self.layout.name, "unit": self.unit, "slots": [list(slot) for slot in self.slots], "video": self.video,
            "monitor": self.monitor.state_dict(), "pending": self.pending, "stop_written": self.stop_written,
            TRAINER_VAL_LOSS: self.with_loss})

    def _load_state(self) -> None:
        """Continue from the state file; every value is checked (ValueError naming the file and the key)."""
        path = self.output_dir / STATE_FILE
        state = read_state_file(path, self.output_dir)
        if state is None:
            return

        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"{path}: {name} is {state.get(name)!r} (expected {expected}); move it away to start afresh")

        check("trainer", isinstance(state, dict) and state.get("trainer") == self.layout.name, f"{self.layout.name!r}, this folder's trainer")
        check("unit", state.get("unit") in trainer_layouts.UNITS, "step or epoch")
        if "slots" not in state and type(state.get("count")) is int and state["count"] >= 1:  # written before slots
            state["slots"] = [[index, ""] for index in range(state["count"])]
        slots = state.get("slots")
        check("slots", isinstance(slots, list) and bool(slots) and all(
            isinstance(slot, list) and len(slot) == 2 and type(slot[0]) in (int, str) and isinstance(slot[1], str) for slot in slots),
            "a list of [prompt, variant] pairs")
        check("video", isinstance(state.get("video"), bool), "true or false")
        check("pending", state.get("pending") is None or type(state.get("pending")) is int, "a round number or null")
        check("stop_written", isinstance(state.get("stop_written"), bool), "true or false")
        check(TRAINER_VAL_LOSS, isinstance(state.get(TRAINER_VAL_LOSS, False), bool), "true or false")
        check("monitor", isinstance(state.get("monitor"), dict), "a monitor state")
        if self.prompt_spec is not None and len(self.prompt_spec) != len(slots):
            raise ValueError(f"{path}: scored with {len(slots)} prompts, but {self.prompts} has {len(self.prompt_spec)}")
        self.unit, self.video = state["unit"], state["video"]
        self.slots = [(prompt, variant) for prompt, variant in slots]
        self._build({}, state=state["monitor"], with_loss=state.get(TRAINER_VAL_LOSS))
        self.pending, self.stop_written = state["pending"], state["stop_written"]
        scored = [r.epoch for r in self.monitor.policy.history]
        self.say(f"lora-monitor watch: continuing from {path}: {self.unit}s {scored} already scored, best {self.monitor.best_epoch}")
