"""How the kohya watcher reads an epoch's samples: complete, finished, decodable (kohya_watch.py).

kohya writes an epoch's sample PNGs one by one into <output_dir>/sample/ straight to their final names, so an
epoch counts as ready when a sample of every prompt index is there, each unchanged (size and mtime) across two
looks, and each decodes. What an epoch still waits for is kept (`_waiting`) and said once; once a later epoch is
complete, or the run's final file is written (kohya has finished sampling), an epoch that never got ready is
given up with a message. The base references come from --base or the epoch-0 samples (--sample_at_first).
`EpochSamples` is a part of KohyaWatcher, split out for reading; it uses the watcher's attributes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

from lora_monitor.integrations.kohya import SAMPLE_DIR, UnreadableSampleError, images_in_order, read_sample
from lora_monitor.integrations.watch_common import sample_inside
from lora_monitor.kohya_names import SampleFile, group_by_epoch, inside_folder, list_samples, parse_sample_name
from lora_monitor.spec import SUFFIXES

#: How a wait for a file that changed between two looks ends: no reason to give it up, something writes it.
BEING_WRITTEN = "still being written (it changed since the last look)"
NOT_WRITTEN = "no sample yet"


class EpochSamples:
    """The sample-reading half of KohyaWatcher (module docstring)."""

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
        if self.monitor.needs_references and self._base is None:
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
        """Base references from --base, else from the run's epoch-0 (--sample_at_first) samples; False while waiting."""
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
        self._base = (images, source)  # given to the monitor just before the next evaluation (_evaluate)
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

