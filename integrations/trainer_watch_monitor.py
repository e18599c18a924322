"""The monitor half of the other trainers' watcher (trainer_watch.py): a round's slots, the prompt spec, the
scorers (image, video, round values), the base references, and each round's images.

`RoundMonitor` is a part of TrainerWatcher, split out for reading; it uses the watcher's attributes (layout,
output_dir, say, _rounds(), _write_checkpoint). The monitor is built at the first round, when the unit (step or
epoch), the slots and images or video are known, or from the state file of an earlier start.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from lora_monitor import trainer_layouts
from lora_monitor.integrations.watch_common import TRAINER_VAL_LOSS, RoundBoard, RoundValues, ValidationLosses
from lora_monitor.integrations.watch_samples import frames_like, middle_frames, read_plain_file, read_sample_file
from lora_monitor.monitor import LoraMonitor
from lora_monitor.scoring.scorers import get_scorer
from lora_monitor.spec import PreviewPrompt, PreviewSpec
from lora_monitor.trainer_layouts import RoundKey, SampleName

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
VIDEO_METRIC_SUFFIX = "_worst"
Slot = tuple[Any, str]
BaseSource = tuple[Path, SampleName | None]  # a base file, and its sample name when it is one of the trainer's rounds


def _natural(slot: Slot) -> tuple:
    """Slots in a stable, human order: shortname, then the image's index as a number ('10_...' after '2_...')."""
    return (str(slot[0]), [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", slot[1])])


class RoundMonitor:
    """The monitor of TrainerWatcher (module docstring)."""

    def _setup_monitor(self, prompts, base_samples, monitor_options, logging_dir) -> None:
        self.prompts = Path(prompts) if prompts else None
        self.prompt_spec = None
        if self.prompts is not None and self.layout.open_slots:
            self.say(f"lora-monitor watch: note: {self.layout.title} names its prompts by shortname, not by a line of a file: "
                     f"--prompts {self.prompts} is not used (metrics that read the prompt, adherence, cannot be used)")
            self.prompts = None
        elif self.prompts is not None:
            self.prompt_spec = PreviewSpec.load(self.prompts)
        self.base_samples = Path(base_samples) if base_samples else None
        if self.base_samples is not None and not self.base_samples.is_dir():
            raise FileNotFoundError(f"--base-samples folder not found: {self.base_samples}")
        self.options = dict(monitor_options or {})
        self.losses = ValidationLosses(self.output_dir, self.layout.name, logging_dir, self.say)
        if TRAINER_VAL_LOSS in self._wanted_metrics() and not self.losses.logged:
            raise ValueError(f"the metric {TRAINER_VAL_LOSS!r} is the trainer's own validation loss, but {self.losses.spec.missing}")
        self.board = RoundBoard()
        self.monitor: LoraMonitor | None = None
        self.unit: str | None = None
        self.slots: list[Slot] = []
        self.video = False
        self.with_loss = False
        self.base_clips: list[torch.Tensor] | None = None

    def _wanted_metrics(self) -> list[str]:
        return [self.options.get("metric"), *self.options.get("metrics", ()), *(self.options.get("bounds") or {})]

    # ------------------------------------------------------------------ the first round
    def _first_round(self, rounds: Mapping[RoundKey, Mapping[Slot, SampleName]]) -> bool:
        """The unit, the slots and images or video, from the first round; False while they cannot be known yet."""
        base_key = self.layout.base_key
        trained = [k for k in rounds if k != base_key]
        if not trained:
            return False
        units = {unit: sum(k.unit == unit for k in trained) for unit in trainer_layouts.UNITS}
        unit = max(units, key=lambda name: (units[name], name == "epoch"))
        first = min(k for k in trained if k.unit == unit)
        if self.layout.open_slots:
            origin = min(k for k in rounds if k.unit == unit)  # the base round when there is one
            if origin == first and max(k for k in rounds if k.unit == unit) == first and \
                    trainer_layouts.final_checkpoint(self.output_dir, self.layout) is None:
                self._say_once(("slots", first), f"lora-monitor watch: {first}: {self.layout.title} renders any number of images "
                               "per prompt, so a round is known complete when the next one begins (or the run ends): waiting")
                return False
            slots = sorted(rounds[origin], key=_natural)
        else:
            count = len(self.prompt_spec) if self.prompt_spec is not None else max(prompt for prompt, _ in rounds[first]) + 1
            slots = [(index, "") for index in range(count)]
        if all(units.values()):
            other = next(name for name in units if name != unit)
            self.say(f"lora-monitor watch: the folder holds {unit} and {other} rounds; {unit} rounds are scored, {other} rounds are left out")
        self.unit, self.slots = unit, slots
        self.video = any(sample.video for sample in rounds[first].values())
        return True

    def _spec(self) -> PreviewSpec:
        if self.prompt_spec is not None:
            return self.prompt_spec
        if self.layout.open_slots:
            texts = [f"{prompt} image {variant} ({self.layout.title} shortname; text unknown)" for prompt, variant in self.slots]
            self._say_once("placeholders", f"lora-monitor watch: {self.layout.title} prompts are known by shortname only: metrics "
                           "that read the prompt (adherence) cannot be used")
        else:
            texts = [f"prompt {prompt} (text unknown: give --prompts FILE)" for prompt, _ in self.slots]
            self._say_once("placeholders", f"lora-monitor watch: no --prompts: prompts 0..{len(self.slots) - 1} get placeholder "
                           "texts; metrics that read the prompt (adherence) cannot be used")
        return PreviewSpec(tuple(PreviewPrompt(prompt=text, seed=index) for index, text in enumerate(texts)))

    # ------------------------------------------------------------------ the monitor
    def _build(self, rounds: Mapping[RoundKey, Mapping[Slot, SampleName]], state: Mapping[str, Any] | None = None,
               with_loss: bool | None = None) -> bool:
        """The monitor, at the first round, or from an earlier start's `state` (its unit and slots already set)."""
        if state is None and not self._first_round(rounds):
            return False
        options = dict(self.options)
        signal = {name: options.pop(name) for name in ("references", "clip_model", "dino_model", "strip_words") if name in options}
        from lora_monitor.scoring.signals import SignalOptions

        signal_options = SignalOptions(**signal)
        metrics = list(dict.fromkeys(name for name in self._wanted_metrics() if name)) or ["brisque", "ssim"]
        monitor = options.pop("metric", None) or metrics[0]
        image_names = [n for n in metrics if n != TRAINER_VAL_LOSS and not self._video_only(n)]
        if self.prompt_spec is None and any(getattr(get_scorer(n, options=signal_options), "needs_prompts", False) for n in image_names):
            raise ValueError("the metric(s) need each sample's prompt (e.g. adherence), but no --prompts FILE was given: "
                             "give the run's prompts, one a line in the trainer's order" + (
                                 f" ({self.layout.title} names its prompts by shortname: not possible there)" if self.layout.open_slots else ""))
        base, source = self._base_sources()
        if not base:
            dropped = [n for n in image_names if get_scorer(n, options=signal_options).needs_reference]
            if monitor in dropped:
                raise ValueError(f"the monitored metric {monitor!r} compares with the base model's samples, but {self.output_dir} has no "
                                 f"before-training round ({self.layout.base_round}) and no --base-samples DIR was given")
            if dropped:
                self._say_once("nobase", f"lora-monitor watch: no base references (no {self.layout.base_key} round and no --base-samples "
                               f"DIR): {', '.join(dropped)} switched off")
            metrics = [n for n in metrics if n not in dropped]
        self.with_loss = with_loss if with_loss is not None else bool(self.losses.values(self.unit)) or TRAINER_VAL_LOSS in metrics
        if self.with_loss and TRAINER_VAL_LOSS not in metrics:
            metrics.append(TRAINER_VAL_LOSS)
        image_scorers = [get_scorer(n, options=signal_options) for n in metrics if n != TRAINER_VAL_LOSS and not self._video_only(n)]
        bounds = dict(options.pop("bounds", None) or {})
        if self.video:
            from lora_monitor.video import VIDEO_PRESET, video_polarity

            self.video_scorers = [s for s in image_scorers if not getattr(s, "whole_set", False)]
            polarity = video_polarity(self.video_scorers)
            scorers = [RoundValues(name, better, self.board) for name, better in polarity.items()]
            if base and not bounds:
                bounds = dict(VIDEO_PRESET.bounds)
            metrics = [*polarity, *(n for n in metrics if n not in polarity)]
        else:
            scorers = image_scorers
        if self.with_loss:
            scorers.append(RoundValues(TRAINER_VAL_LOSS, False, self.board))
        options.pop("metrics", None)
        self.monitor = LoraMonitor(
            spec=self._spec(), output_dir=self.output_dir, every_n_steps=1 if self.unit == "step" else None,
            write_weights=self._write_checkpoint, scorers=scorers, metrics=metrics, metric=monitor, bounds=bounds or None, **options)
        if state is not None:
            self.monitor.load_state_dict(state)
        self.say(f"lora-monitor watch: {self.layout.title}: rounds by {self.unit}, {len(self.slots)} sample(s) a round, "
                 f"{'video' if self.video else 'images'}; metrics {', '.join(s.name for s in self.monitor.scorers)}; best by {monitor}")
        if base:
            self._set_base(base, source)
        return True

    def _video_only(self, name: str) -> bool:
        return name == "temporal_ssim" or name.endswith(VIDEO_METRIC_SUFFIX)

    # ------------------------------------------------------------------ base references
    def _base_sources(self) -> tuple[dict[Slot, BaseSource], str]:
        """slot -> its base file: the trainer's before-training round when complete, else the base files it keeps apart
        (SimpleTuner's benchmarks/base_model) when each slot has one, else --base-samples DIR; ({}, "") when none."""
        key = self.layout.base_key
        if key is not None:
            by_slot = self._rounds().get(key, {})
            if all(slot in by_slot for slot in self.slots):
                return {slot: (by_slot[slot].path, by_slot[slot]) for slot in self.slots}, f"the {key} round"
            kept = self._kept_base_files()
            if kept:
                return kept, f"{self.layout.title}'s base files ({', '.join(self.layout.base_globs)})"
        if self.base_samples is None:
            return {}, ""
        files = sorted(p for p in self.base_samples.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + (".mp4",))
        if len(files) != len(self.slots):
            raise ValueError(f"--base-samples {self.base_samples}: expected {len(self.slots)} files (one per "
                             f"{'prompt index' if not self.layout.open_slots else 'sample of a round, in the order of ' + str(self.slots)}"
                             f", in order by name), found {len(files)}")
        return {slot: (path, None) for slot, path in zip(self.slots, files)}, f"--base-samples {self.base_samples}"

    def _kept_base_files(self) -> dict[Slot, BaseSource]:
        """The layout's separate base files matched to the slots: by prompt and variant, or by prompt and resolution
        when one slot of that prompt has it (a SimpleTuner benchmark image names no index); {} unless all match."""
        kept = trainer_layouts.list_base_files(self.output_dir, self.layout)
        matched: dict[Slot, BaseSource] = {}
        for prompt, variant in self.slots:
            same = [(p, v) for p, v in self.slots if p == prompt]
            found = [b for b in kept if b.prompt == prompt and (b.variant == variant or (
                variant.endswith("_" + b.variant) and sum(v.endswith("_" + b.variant) for _, v in same) == 1))]
            if len(found) != 1:
                return {}
            matched[(prompt, variant)] = (found[0].path, None)  # saved plain (Validation.save_benchmark())
        return matched

    def _set_base(self, sources: Mapping[Slot, BaseSource], description: str) -> None:
        def read(path: Path, sample: SampleName | None) -> torch.Tensor:
            return read_sample_file(self.layout, sample, self.video) if sample is not None else read_plain_file(path, self.video)

        pixels = [read(*sources[slot]) for slot in self.slots]
        if self.video:
            self.base_clips = pixels
            images = middle_frames(pixels)
            self.board.base = self._video_scores(pixels, pixels)
        else:
            images = pixels
            self.board.base = {}
        if self.with_loss:
            number = self.layout.base_key.number if self.layout.base_key is not None else 0
            self.board.base[TRAINER_VAL_LOSS] = [self.losses.for_round(number, self.unit)] * len(self.slots)
        self.monitor.set_base_references(images)
        self.board.base_images = self.monitor.base_references()
        self.say(f"lora-monitor watch: base references: {description}")

    # ------------------------------------------------------------------ a round
    def _round_images(self, key: RoundKey, by_slot: Mapping[Slot, SampleName]) -> list[torch.Tensor]:
        """The round's images in slot order (a clip's middle frame for video), its round values put on the board."""
        self.board.current = {}
        if self.video:
            clips = [read_sample_file(self.layout, by_slot[slot], True) for slot in self.slots]
            images = middle_frames(clips)
            self.board.current = self._video_scores(clips, self.base_clips)
        else:
            images = [read_sample_file(self.layout, by_slot[slot], False) for slot in self.slots]
        if self.with_loss:
            self.board.current[TRAINER_VAL_LOSS] = [self.losses.for_round(key.number, self.unit)] * len(self.slots)
        return images

    def _video_scores(self, clips: list[torch.Tensor], references: list[torch.Tensor] | None) -> dict[str, list[float]]:
        from lora_monitor.video import score_videos

        uses_reference = any(s.needs_reference for s in self.video_scorers)
        if uses_reference and references is not None:
            references = [frames_like(reference, clip) for reference, clip in zip(references, clips)]
        return score_videos(self.video_scorers, clips, references if uses_reference else None,
                            [p.prompt for p in self.monitor.spec.prompts])
