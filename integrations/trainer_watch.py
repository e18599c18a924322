"""Follow the output folder of ai-toolkit, OneTrainer or musubi-tuner and score its samples as they appear (issue 13).

The kohya watcher (kohya_watch.py) knows sd-scripts' folder by heart; this one reads any folder through
`lora_monitor.trainer_layouts`: the layout says where the samples are, which round (step or epoch) and
prompt each belongs to, which round was rendered before training (the base references), and which
LoRA file holds a round's weights. Each complete round goes to a LoraMonitor keyed by the trainer's
own unit (`every_n_steps=1` for step rounds), so the record (previews/, scores.jsonl), the best copy
(OUT/best/, the round's own checkpoint copied through the atomic export) and the policy are the
library's. What the watcher adds comes in as "round values", whole-set scorers fed with values
computed here for the round:

- `trainer_val_loss`: the trainer's own validation loss from its logs (`trainer_logs.validation_loss`),
  lower is better, a metric like any other (`--metric trainer_val_loss`); NaN for a round it has no
  value for (the worst, so such a round is never best by it).
- video rounds (animated WebP, MP4): each clip scored with `video.score_videos` (per-image metrics as
  mean and `_worst` over frames, and `temporal_ssim`); the middle frame is the preview.

Not watched: SimpleTuner (its saved validation images are display images: [base | this step] side by
side with labels and a "Prompt: ..." footer, trainer_layouts' notes; scoring them would score the
labels), and the diffusers example scripts (no samples on disk). None of these trainers reads a stop
file: when the policy says stop, OUT/STOP is written and the way to stop that trainer by hand is printed.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lora_monitor import trainer_layouts, trainer_logs
from lora_monitor.export import export_checkpoint, read_sidecar, write_json_atomic
from lora_monitor.integrations.kohya import UnreadableSampleError, decision_text, read_sample
from lora_monitor.integrations.kohya_watch import MISSING_NOTE, STOP_FILE, CheckpointRefused, copy_checkpoint, sample_inside, write_stop_file
from lora_monitor.kohya_names import FolderLock, inside_folder
from lora_monitor.monitor import LoraMonitor, quantize
from lora_monitor.scoring.scorers import get_scorer
from lora_monitor.spec import PreviewPrompt, PreviewSpec
from lora_monitor.trainer_layouts import RoundKey, TrainerLayout

TRAINER_VAL_LOSS = "trainer_val_loss"
STATE_FILE = "lora_monitor_watch.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: Layouts this watcher refuses, and why (taken from trainer_layouts' entries).
UNWATCHABLE = {
    "simpletuner": ("SimpleTuner's saved validation images are display images, not the raw samples: past the base round "
                    "[base model | this step] side by side with labels, and a 'Prompt: ...' footer whenever a font loads "
                    "(trainer_layouts SIMPLETUNER notes; validation.py Validation.validate_prompt()). Scoring them would "
                    "score the labels and the base half, and cropping them depends on the font; it is not watched"),
    "diffusers": "the diffusers example scripts send their validation images to TensorBoard/W&B only: nothing on disk to watch",
}
VIDEO_METRIC_SUFFIX = "_worst"


class RoundValues:
    """A whole-set scorer whose values the watcher computed for the round (its trainer's validation loss, a
    video's scores): the monitor asks for them as for any signal, and records and monitors them alike."""

    whole_set = True
    needs_reference = False

    def __init__(self, name: str, higher_is_better: bool, board: "_Board") -> None:
        self.name, self.higher_is_better, self.board = name, higher_is_better, board

    def __call__(self, images: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        raise TypeError(f"{self.name} is computed by the watcher for a whole round, not per image")

    def score_set(self, images: Sequence[torch.Tensor], groups: Sequence[int]) -> list[float]:
        return self.board.values(self.name, images)


class _Board:
    """The round values of the round being scored, and of the base round (told apart by the images asked about:
    the monitor scores the base references once, at the first evaluation)."""

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


def _frames_like(reference: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """The base clip with the clip's frame count (frames spread evenly): writers store a still clip as one frame
    (video.read_video), and a trainer may render the base with another length. Another frame size is an error."""
    if reference.shape[1:] != clip.shape[1:]:
        raise ValueError(f"a base clip's frames are {tuple(reference.shape[2:])}, the round's {tuple(clip.shape[2:])}: "
                         "the base references must be rendered at the samples' size")
    count, total = clip.shape[0], reference.shape[0]
    if count == total:
        return reference
    return reference[[round(i * (total - 1) / max(count - 1, 1)) for i in range(count)]]


def hand_stop(layout: TrainerLayout) -> str:
    """How `layout`'s trainer is stopped by hand (none of the watched ones reads a stop file)."""
    if layout.stop is None:
        return f"{layout.title} reads no stop file: stop it with Ctrl-C in its console (it saves nothing then)"
    return f"{layout.title}: {layout.stop}"


class TrainerWatcher:
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
        self.say = say
        self.lock: FolderLock | None = FolderLock(self.output_dir, "lora-monitor watch", say=say).acquire()
        try:
            self._setup(prompts, base_samples, monitor_options, logging_dir, allow_pickle)
        except BaseException:
            self.close()
            raise

    def _setup(self, prompts, base_samples, monitor_options, logging_dir, allow_pickle) -> None:
        self.prompts = Path(prompts) if prompts else None
        self.prompt_spec = PreviewSpec.load(self.prompts) if self.prompts else None
        self.base_samples = Path(base_samples) if base_samples else None
        if self.base_samples is not None and not self.base_samples.is_dir():
            raise FileNotFoundError(f"--base-samples folder not found: {self.base_samples}")
        self.options = dict(monitor_options or {})
        self.logging_dir = Path(logging_dir) if logging_dir else None
        self.allow_pickle = allow_pickle
        self.tags = trainer_logs.get_tag_spec(self.layout.name)
        if TRAINER_VAL_LOSS in self._wanted_metrics() and not self.tags.tags:
            raise ValueError(f"the metric {TRAINER_VAL_LOSS!r} is the trainer's own validation loss, but {self.tags.missing}")
        self.board = _Board()
        self.monitor: LoraMonitor | None = None
        self.unit: str | None = None
        self.count: int | None = None
        self.video = False
        self.pending: int | None = None
        self.stop_written = False
        self.current: int | None = None
        self._said: set[Any] = set()
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

    def close(self) -> None:
        """Finish the monitor's listeners and release the folder's lock (again: nothing)."""
        if self.monitor is not None and self.lock is not None:
            self.monitor.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def poll(self) -> list[int]:
        """One look: score every complete round after the last scored one; returns the rounds scored."""
        rounds = self._rounds()
        self._resolve_pending()
        if not rounds:
            self._say_once("waiting", f"lora-monitor watch: no {self.layout.title} samples yet in {self.output_dir}: waiting")
            return []
        if self.monitor is None and not self._build(rounds):
            return []
        scored = {result.epoch for result in self.monitor.policy.history}
        last = max(scored, default=-1)
        done = []
        for key in sorted(k for k in rounds if k.unit == self.unit and k.number > last and k != self.layout.base_key):
            if not self._complete(rounds[key]):
                later = [k for k in rounds if k.unit == self.unit and k.number > key.number and self._complete(rounds[k])]
                if later:
                    self._say_once(("skip", key), f"lora-monitor watch: {key} skipped: samples of prompt(s) "
                                   f"{self._missing(rounds[key])} missing, and {later[0]} is complete")
                    continue
                self._say_once(("wait", key), f"lora-monitor watch: {key}: waiting for prompt(s) {self._missing(rounds[key])}")
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
    def _rounds(self) -> dict[RoundKey, dict[int, Path]]:
        """round -> prompt index -> its newest finished sample, links out of the folder left out (named once)."""
        found: dict[RoundKey, dict[int, Path]] = {}
        samples = trainer_layouts.list_samples(self.output_dir, self.layout)
        self._videos = {sample.path for sample in samples if sample.video}
        for sample in sorted(samples, key=lambda s: (s.key, s.stamp, s.path.name)):  # a re-render after a restart: the newest wins
            if sample_inside(sample.path, self.output_dir, self._say_once):
                found.setdefault(sample.key, {})[int(sample.prompt)] = sample.path
        return found

    def _complete(self, by_prompt: Mapping[int, Path]) -> bool:
        return sorted(by_prompt) == list(range(self.count))

    def _missing(self, by_prompt: Mapping[int, Path]) -> list[int]:
        return [i for i in range(self.count) if i not in by_prompt]

    def _is_video(self, by_prompt: Mapping[int, Path]) -> bool:
        return any(path in self._videos for path in by_prompt.values())

    # ------------------------------------------------------------------ the monitor
    def _wanted_metrics(self) -> list[str]:
        return [self.options.get("monitor"), *self.options.get("metrics", ()), *(self.options.get("bounds") or {})]

    def _build(self, rounds: Mapping[RoundKey, Mapping[int, Path]], state: Mapping[str, Any] | None = None) -> bool:
        """The monitor, at the first round (the prompt count, the unit and images or video are known then)."""
        base_key = self.layout.base_key
        if state is None:
            trained = [k for k in rounds if k != base_key]
            if not trained:
                return False
            units = {unit: sum(k.unit == unit for k in trained) for unit in trainer_layouts.UNITS}
            self.unit = max(units, key=lambda unit: (units[unit], unit == "epoch"))
            if all(units.values()):
                other = next(u for u in units if u != self.unit)
                self.say(f"lora-monitor watch: the folder holds {self.unit} and {other} rounds; {self.unit} rounds are scored, "
                         f"{other} rounds are left out")
            first = rounds[min(k for k in trained if k.unit == self.unit)]
            self.count = len(self.prompt_spec) if self.prompt_spec is not None else max(first) + 1
            self.video = self._is_video(first)
        base_paths = {int(p): paths[-1] for p, paths in trainer_layouts.base_references(self.output_dir, self.layout).items()}
        if base_paths and not self._complete(base_paths):
            base_paths = {}
        spec = self.prompt_spec or PreviewSpec(tuple(
            PreviewPrompt(prompt=f"prompt {i} (text unknown: give --prompts FILE)", seed=i) for i in range(self.count)))
        if self.prompt_spec is None:
            self._say_once("placeholders", f"lora-monitor watch: no --prompts: prompts 0..{self.count - 1} get placeholder texts; "
                           "metrics that read the prompt (adherence) cannot be used")
        options = dict(self.options)
        signal = {name: options.pop(name) for name in ("references", "clip_model", "dino_model", "strip_words") if name in options}
        from lora_monitor.scoring.signals import SignalOptions

        signal_options = SignalOptions(**signal)
        metrics = list(dict.fromkeys(name for name in self._wanted_metrics() if name)) or ["brisque", "ssim"]
        monitor = options.get("monitor") or metrics[0]
        if self.prompt_spec is None and any(getattr(get_scorer(n, options=signal_options), "needs_prompts", False)
                                            for n in metrics if n != TRAINER_VAL_LOSS and not self._video_only(n)):
            raise ValueError("the metric(s) need each sample's prompt (e.g. adherence), but no --prompts FILE was given: "
                             "give the run's prompts, one a line in the trainer's order")
        references = base_paths or self._base_folder_paths()
        if not references:
            dropped = [n for n in metrics if n != TRAINER_VAL_LOSS and not self._video_only(n) and get_scorer(n, options=signal_options).needs_reference]
            if monitor in dropped:
                raise ValueError(f"the monitored metric {monitor!r} compares with the base model's samples, but {self.output_dir} has no "
                                 f"before-training round ({self.layout.base_round}) and no --base-samples DIR was given")
            if dropped:
                self._say_once("nobase", f"lora-monitor watch: no base references (no {base_key} round and no --base-samples DIR): "
                               f"{', '.join(dropped)} switched off")
            metrics = [n for n in metrics if n not in dropped]
        val_losses = trainer_logs.validation_loss(self.output_dir, self.layout.name, self.logging_dir) if self.tags.tags else {}
        if val_losses and TRAINER_VAL_LOSS not in metrics:
            metrics.append(TRAINER_VAL_LOSS)
        scorers: list = []
        image_scorers = [get_scorer(n, options=signal_options) for n in metrics if n != TRAINER_VAL_LOSS and not self._video_only(n)]
        bounds = dict(options.pop("bounds", None) or {})
        if self.video:
            from lora_monitor.video import VIDEO_PRESET, video_polarity

            self.video_scorers = [s for s in image_scorers if not getattr(s, "whole_set", False)]
            polarity = video_polarity(self.video_scorers)
            scorers = [RoundValues(name, better, self.board) for name, better in polarity.items()]
            if references and not bounds:
                bounds = dict(VIDEO_PRESET.bounds)
            metrics = [*polarity, *(n for n in metrics if n not in polarity)]
        else:
            scorers = image_scorers
        if TRAINER_VAL_LOSS in metrics:
            scorers.append(RoundValues(TRAINER_VAL_LOSS, False, self.board))
        options.pop("metrics", None)
        options.pop("monitor", None)
        self.monitor = LoraMonitor(
            spec=spec, output_dir=self.output_dir, every_n_steps=1 if self.unit == "step" else None,
            write_weights=self._write_checkpoint, scorers=scorers, metrics=metrics, monitor=monitor, bounds=bounds or None, **options)
        if state is not None:
            self.monitor.load_state_dict(state)
        self.say(f"lora-monitor watch: {self.layout.title}: rounds by {self.unit}, {self.count} prompt(s), "
                 f"{'video' if self.video else 'images'}; metrics {', '.join(s.name for s in self.monitor.scorers)}; best by {monitor}")
        if references:
            self._set_base(references, f"the {base_key} round" if base_paths else f"--base-samples {self.base_samples}")
        return True

    def _video_only(self, name: str) -> bool:
        return name == "temporal_ssim" or name.endswith(VIDEO_METRIC_SUFFIX)

    def _base_folder_paths(self) -> dict[int, Path]:
        if self.base_samples is None:
            return {}
        files = sorted(p for p in self.base_samples.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (".mp4",))
        if len(files) != self.count:
            raise ValueError(f"--base-samples {self.base_samples}: expected {self.count} files (one per prompt index, in order by name), "
                             f"found {len(files)}")
        return dict(enumerate(files))

    def _set_base(self, paths: Mapping[int, Path], source: str) -> None:
        if self.video:
            from lora_monitor.video import read_video

            self.base_clips = [read_video(paths[i]) for i in range(self.count)]
            images = [clip[(clip.shape[0] - 1) // 2] for clip in self.base_clips]
            self.board.base = self._video_scores(self.base_clips, self.base_clips)
        else:
            self.base_clips = None
            images = [read_sample(paths[i]) for i in range(self.count)]
            self.board.base = {}
        if TRAINER_VAL_LOSS in {s.name for s in self.monitor.scorers}:
            self.board.base[TRAINER_VAL_LOSS] = [self._val_loss(self.layout.base_key.number)] * self.count
        self.monitor.set_base_references(images)
        self.board.base_images = [quantize(image) for image in images]
        self.say(f"lora-monitor watch: base references: {source}")

    def _video_scores(self, clips: list[torch.Tensor], references: list[torch.Tensor] | None) -> dict[str, list[float]]:
        from lora_monitor.video import score_videos

        uses_reference = any(s.needs_reference for s in self.video_scorers)
        if uses_reference and references is not None:
            references = [_frames_like(reference, clip) for reference, clip in zip(references, clips)]
        return score_videos(self.video_scorers, clips, references if uses_reference else None,
                            [p.prompt for p in self.monitor.spec.prompts])

    def _val_loss(self, number: int) -> float:
        """The trainer's validation loss computed on round `number`'s weights (NaN when it logged none)."""
        losses = trainer_logs.validation_loss(self.output_dir, self.layout.name, self.logging_dir, axis=self.unit
                                              if self.unit in self.tags.tags else None)
        return float(losses.get(number - self.tags.round_offset, math.nan))

    # ------------------------------------------------------------------ scoring
    def _evaluate(self, key: RoundKey, by_prompt: Mapping[int, Path]) -> None:
        self.board.current = {}
        if self.video:
            from lora_monitor.video import read_video

            try:
                clips = [read_video(by_prompt[i]) for i in range(self.count)]
            except (OSError, ValueError) as error:
                raise UnreadableSampleError(by_prompt[0], str(error)) from error
            images = [clip[(clip.shape[0] - 1) // 2] for clip in clips]
            self.board.current = self._video_scores(clips, self.base_clips)
        else:
            images = [read_sample(by_prompt[i]) for i in range(self.count)]
        if TRAINER_VAL_LOSS in {s.name for s in self.monitor.scorers}:
            self.board.current[TRAINER_VAL_LOSS] = [self._val_loss(key.number)] * self.count
        self.current = key.number
        policy = self.monitor.policy
        stopped_before = policy.stopped_epoch
        report = self.monitor.evaluate(key.number, images, step=key.number if key.unit == "step" else None)
        values = ", ".join(f"{name} {value:.4f}" for name, value in report.aggregates.items())
        self.say(f"lora-monitor watch: {key}: {values}{'  (best)' if report.is_best else ''}; "
                 f"{decision_text(report, policy, stopped_before)}")
        if report.is_best:
            where = "its checkpoint copied to" if self.pending is None else "its checkpoint is not there (yet): noted in"
            self.say(f"lora-monitor watch: {key} is the best so far: {where} {self.output_dir / 'best'}")
        if report.should_stop and not self.stop_written:
            self._write_stop()
        self._save_state()

    def _write_stop(self) -> None:
        policy = self.monitor.policy
        how = hand_stop(self.layout)
        text = (f"lora-monitor asks to stop this run after {self.unit} {policy.stopped_epoch}: {policy.stop_reason}\n"
                f"best {self.unit}: {policy.best_epoch} ({self.output_dir / 'best'})\n"
                f"The watcher does not stop the trainer, which must be stopped by hand. {how}\n")
        write_json_atomic(self.output_dir / (STOP_FILE + ".json"), {
            "unit": self.unit, self.unit: policy.stopped_epoch, "reason": policy.stop_reason, "best": policy.best_epoch, "how_to_stop": how})
        write_stop_file(self.output_dir, text, self.say)
        self.stop_written = True

    # ------------------------------------------------------------------ checkpoints
    def _write_checkpoint(self, folder: Path) -> None:
        key = RoundKey(self.unit, self.current)
        source = trainer_layouts.checkpoint_for(self.output_dir, self.layout, key)
        refused = ""
        if source is not None:
            try:
                copy_checkpoint(source, folder / source.name, self.output_dir, self.allow_pickle)
                self.pending = None
                return
            except FileNotFoundError:  # rotated away just now
                pass
            except CheckpointRefused as error:
                refused = f"Not copied: {error}\n"
                self._say_once(("refused", str(error)), f"lora-monitor watch: not copied: {error}")
        self.pending = self.current
        (folder / MISSING_NOTE).write_text(
            f"{key} is the best, but no LoRA file holding its weights was in {self.output_dir} when it was scored "
            f"({self.layout.checkpoint_example}; {'; '.join(self.layout.notes[:1])}). The watcher copies it here if it "
            f"appears while it runs.\n{refused}", encoding="utf-8")

    def _resolve_pending(self) -> None:
        if self.pending is None or self.monitor is None:
            return
        source = trainer_layouts.checkpoint_for(self.output_dir, self.layout, RoundKey(self.unit, self.pending))
        best = self.output_dir / "best"
        if source is None or best.is_symlink() or not best.is_dir():
            return
        try:
            sidecar = read_sidecar(best)
        except (OSError, ValueError):
            return
        if not isinstance(sidecar, dict) or sidecar.get("epoch") != self.pending:
            return
        try:
            export_checkpoint(best, lambda folder: copy_checkpoint(source, folder / source.name, self.output_dir, self.allow_pickle),
                              {**sidecar, "checkpoint_source": source.name})
        except CheckpointRefused as error:
            self._say_once(("refused", str(error)), f"lora-monitor watch: not copied: {error}")
            return
        except FileNotFoundError:
            return
        self.say(f"lora-monitor watch: the best {self.unit} {self.pending}'s LoRA file appeared ({source.name}): copied to {best}")
        self.pending = None
        self._save_state()

    # ------------------------------------------------------------------ state
    def _save_state(self) -> None:
        write_json_atomic(self.output_dir / STATE_FILE, {
            "trainer": self.layout.name, "unit": self.unit, "count": self.count, "video": self.video,
            "monitor": self.monitor.state_dict(), "pending": self.pending, "stop_written": self.stop_written})

    def _load_state(self) -> None:
        """Continue from the state file; every value is checked (ValueError naming the file and the key)."""
        path = self.output_dir / STATE_FILE
        if not path.is_file():
            return
        inside_folder(path, self.output_dir, "the watcher's state file")
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise ValueError(f"{path}: not readable as the watcher's state ({error}); move it away to start afresh") from None

        def check(name: str, ok: bool, expected: str) -> None:
            if not ok:
                raise ValueError(f"{path}: {name} is {state.get(name)!r} (expected {expected}); move it away to start afresh")

        check("trainer", isinstance(state, dict) and state.get("trainer") == self.layout.name, f"{self.layout.name!r}, this folder's trainer")
        check("unit", state.get("unit") in trainer_layouts.UNITS, "step or epoch")
        check("count", type(state.get("count")) is int and state["count"] >= 1, "a prompt count")
        check("video", isinstance(state.get("video"), bool), "true or false")
        check("pending", state.get("pending") is None or type(state.get("pending")) is int, "a round number or null")
        check("stop_written", isinstance(state.get("stop_written"), bool), "true or false")
        check("monitor", isinstance(state.get("monitor"), dict), "a monitor state")
        if self.prompt_spec is not None and len(self.prompt_spec) != state["count"]:
            raise ValueError(f"{path}: scored with {state['count']} prompts, but {self.prompts} has {len(self.prompt_spec)}")
        self.unit, self.count, self.video = state["unit"], state["count"], state["video"]
        self._build({}, state=state["monitor"])
        self.pending, self.stop_written = state["pending"], state["stop_written"]
        scored = [r.epoch for r in self.monitor.policy.history]
        self.say(f"lora-monitor watch: continuing from {path}: {self.unit}s {scored} already scored, best {self.monitor.best_epoch}")

    def _summary(self) -> None:
        policy = self.monitor.policy if self.monitor is not None else None
        if policy is None or not policy.history:
            self.say(f"lora-monitor watch: no {self.unit or 'round'} scored yet")
            return
        if policy.best_epoch is None:
            self.say(f"lora-monitor watch: {len(policy.history)} {self.unit}(s) scored, none eligible under the policy's bounds "
                     f"(see {self.monitor.record.scores_path}): nothing in best/")
            return
        self.say(f"lora-monitor watch: best {self.unit} {policy.best_epoch} ({policy.metric} {policy.best_value:.4f}): "
                 f"{self.output_dir / 'best'}; scores: {self.monitor.record.scores_path}"
                 + (f"; STOP written: {policy.stop_reason}" if self.stop_written else ""))

    def _say_once(self, key: Any, message: str) -> None:
        if key not in self._said:
            self._said.add(key)
            self.say(message)
