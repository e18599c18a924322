"""Video samples: read a clip as frames, score it per frame, and measure how consistent it is over time.

Video trainers (musubi-tuner for HunyuanVideo and Wan, ai-toolkit for Wan and LTX-2, SimpleTuner)
render their samples as animated WebP or MP4. `read_video` turns one into a (T, 3, H, W) float
tensor in [0, 1]; `score_video` scores its frames with any per-image scorer and sums them up:

- `<metric>`: the mean over frames (e.g. `brisque`, the mean BRISQUE of the frames);
- `<metric>_worst`: the worst frame (the highest BRISQUE, the lowest of a higher-is-better metric),
  which catches a clip that is clean except for a few broken frames;
- `temporal_ssim`: the mean SSIM of each frame with the next one. It says how much the picture changes
  from one frame to the next: a static clip scores 1, flicker (colours, texture or noise jumping
  between frames) lowers it, and so does large or fast motion. It cannot tell a frozen clip from a
  smooth one, nor a LoRA that adds intended motion from one that adds flicker: compare it with the
  base model's clips of the same prompts and seeds, never across prompts.

A NaN (a black, flat or NaN frame that BRISQUE cannot score) makes the mean and the worst NaN, the
worst score, as for images: such a frame is nearly always a broken sample.

Frames are the frames the clip shows. GIF and WebP writers store a run of identical frames as one frame
shown for their summed duration; `read_video` repeats it by its duration over the shortest frame's, so the
run counts as the frames it stood for. A clip that never changes is stored as one frame and reads as one;
a clip of one frame shows no change, so its temporal_ssim is 1.

What "best" means for video (the `VIDEO_PRESET` rule, for the README):
    The best epoch is the one with the lowest mean BRISQUE, averaged over the frames of each sample
    clip and then over the prompts, among the epochs whose temporal SSIM is at least 0.9x the base
    model's: a LoRA may not buy cleaner frames with flicker. The bound needs a sample of the base model
    (musubi-tuner's `--sample_at_first`, ai-toolkit's first sample unless `skip_first_sample`); without
    one, leave it out and the rule is the image rule on frames. Temporal SSIM also drops with motion, so
    for a LoRA that teaches motion, loosen the bound (e.g. "0.8x") or drop it; and since a clip that
    stops moving scores higher, an upper bound (e.g. `--bound temporal_ssim=0.9x:1.05x`) keeps "best" from
    being a LoRA that froze the video. `brisque_worst` is recorded to look at, not monitored.

MP4 (and MOV, MKV, WebM) needs PyAV, the optional extra `video` (its wheels bundle FFmpeg, so no
system FFmpeg is needed); animated WebP and GIF are read with Pillow.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from lora_monitor.policy import PolicyPreset
from lora_monitor.record import from_pil
from lora_monitor.scoring import functional as F
from lora_monitor.scoring.brisque import has_float64
from lora_monitor.scoring.scorers import Scorer, score_images

__all__ = [
    "FFMPEG_SUFFIXES",
    "PIL_SUFFIXES",
    "TEMPORAL_SSIM",
    "VIDEO_PRESET",
    "VideoScores",
    "evenly_spaced",
    "read_video",
    "score_video",
    "score_videos",
    "temporal_ssim",
    "temporal_ssim_pairs",
    "video_polarity",
]

#: Read with Pillow: animated WebP and GIF (and APNG); a still image of these kinds is a clip of one frame.
PIL_SUFFIXES = (".webp", ".gif", ".png", ".apng")
#: Read with PyAV (the `video` extra).
FFMPEG_SUFFIXES = (".mp4", ".mov", ".m4v", ".mkv", ".webm")

#: The temporal-consistency metric's name; higher is better (smoother).
TEMPORAL_SSIM = "temporal_ssim"
#: Suffix of a metric's worst-frame value: `brisque_worst`.
WORST_SUFFIX = "_worst"

INSTALL_HINT = "pip install 'lora-monitor[video]'"

VIDEO_PRESET = PolicyPreset(
    "video",
    ("brisque", "brisque" + WORST_SUFFIX, TEMPORAL_SSIM),
    "brisque",
    "best = lowest mean BRISQUE (over the frames of each clip, then over the prompts), among epochs whose temporal "
    "SSIM (mean SSIM of consecutive frames) is at least 0.9x the base model's, so that cleaner frames are not "
    "bought with flicker.",
    bounds={TEMPORAL_SSIM: ("0.9x", None)},
    needs="a sample of the base model (the trainer's sample before training)",
)


# ------------------------------------------------------------------------------------------ reading


def evenly_spaced(total: int, count: int | None) -> list[int]:
    """`count` frame indices spread evenly over `total` frames, first and last included (one frame: the
    middle one); all of them when `count` is None or at least `total`."""
    if count is None or count >= total:
        return list(range(total))
    if count == 1:
        return [(total - 1) // 2]
    # round(i * (total - 1) / (count - 1)) in integers, halves up; distinct since the step is > 1
    return [(2 * i * (total - 1) + count - 1) // (2 * (count - 1)) for i in range(count)]


def _check_max_frames(max_frames: Any) -> int | None:
    if max_frames is None:
        return None
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(f"max_frames must be an integer >= 1 or None (every frame), got {max_frames!r}")
    return max_frames


def read_video(path: str | os.PathLike, max_frames: int | None = None) -> torch.Tensor:
    """A video file's frames as (T, 3, H, W) float32 in [0, 1].

    Animated WebP, GIF and APNG are read with Pillow; MP4, MOV, M4V, MKV and WebM with PyAV (the `video`
    extra). `max_frames` keeps that many frames, evenly spaced from the first to the last (`evenly_spaced`),
    for long clips. A truncated or unreadable file raises a ValueError naming it; a missing one
    FileNotFoundError. A truncated MKV or WebM whose remaining frames decode cleanly cannot be told from a
    shorter clip (those containers do not record a frame count).
    """
    max_frames = _check_max_frames(max_frames)
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in PIL_SUFFIXES + FFMPEG_SUFFIXES:
        raise ValueError(
            f"{path}: unknown video type {suffix or '(no suffix)'!r}; readable: {', '.join(PIL_SUFFIXES + FFMPEG_SUFFIXES)}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such video file")
    if suffix in PIL_SUFFIXES:
        frames = _read_with_pil(path, max_frames)
    else:
        frames = _read_with_pyav(path, max_frames)
    if not frames:
        raise ValueError(f"{path}: the video holds no frames")
    return torch.stack(frames)


def _read_with_pil(path: Path, max_frames: int | None) -> list[torch.Tensor]:
    try:
        with Image.open(path) as image:
            stored: list[Image.Image] = []
            durations: list[float] = []
            for index in range(getattr(image, "n_frames", 1)):
                image.seek(index)
                image.load()  # decodes the frame (a truncated file fails here) and reads its duration
                stored.append(image.copy())
                durations.append(float(image.info.get("duration") or 0))
    except Image.DecompressionBombError as error:
        raise ValueError(f"{path}: refused as a decompression bomb ({error})") from None
    except (OSError, EOFError, SyntaxError, ValueError) as error:
        raise ValueError(f"{path}: cannot read the video, it is truncated or not a valid {path.suffix} file ({error})") from None
    timeline = [index for index, repeats in enumerate(_frame_repeats(durations)) for _ in range(repeats)]
    return [from_pil(stored[timeline[i]]) for i in evenly_spaced(len(timeline), max_frames)]


def _frame_repeats(durations: Sequence[float]) -> list[int]:
    """How many frames each stored frame stands for. GIF and WebP writers merge a run of identical frames into
    one frame showing for the sum of their durations; its duration over the shortest frame's gives the run back."""
    shortest = min((duration for duration in durations if duration > 0), default=0)
    if not shortest:
        return [1] * len(durations)
    return [max(1, round(duration / shortest)) for duration in durations]


def _import_av():
    try:
        import av
    except ImportError:
        raise ImportError(
            f"reading MP4/MOV/MKV/WebM video needs PyAV: {INSTALL_HINT} (animated WebP and GIF need nothing extra)"
        ) from None
    return av


def _read_with_pyav(path: Path, max_frames: int | None) -> list[torch.Tensor]:
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path}: the file has no video stream")
            stream = container.streams.video[0]
            listed = stream.frames  # from the container's index (MP4, MOV); 0 where it keeps none (MKV, WebM)
        total = listed or _count_packets(av, path)
        wanted = set(evenly_spaced(total, max_frames))
        frames: list[torch.Tensor] = []
        decoded = 0
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                if decoded in wanted:
                    array = frame.to_ndarray(format="rgb24")
                    frames.append(torch.from_numpy(array.astype(np.float32) / 255.0).permute(2, 0, 1).contiguous())
                decoded += 1
    except av.error.FFmpegError as error:
        raise ValueError(f"{path}: cannot read the video, it is truncated or not a valid {path.suffix} file ({error})") from None
    if listed and decoded < listed:
        raise ValueError(f"{path}: the video is truncated: its index lists {listed} frames, only {decoded} decode")
    return frames


def _count_packets(av, path: Path) -> int:
    """Frames of the first video stream, counted from its packets without decoding them."""
    with av.open(str(path)) as container:
        return sum(1 for packet in container.demux(video=0) if packet.size)


# ------------------------------------------------------------------------------------------ scoring


def temporal_ssim_pairs(frames: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """SSIM of each frame with the next, shape (T - 1,), float64: 1 where nothing changed, lower for change
    (flicker or motion). `frames` is (T, 3, H, W) in [0, 1]; `batch_size` pairs are scored at once.

    The SSIM of `functional.ssim` (torchmetrics, 11x11 Gaussian, colour, data range 1) but in float64 (float32
    on a device without it): in float32, flat regions leave variance residues that torchmetrics clamps on
    one side only, and identical frames score about 0.9999 instead of 1."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    F.check_image_batch(frames, "frames")
    _check_batch_size(batch_size)
    dtype = torch.float64 if has_float64(frames.device) else torch.float32
    pairs = frames.shape[0] - 1
    values = [torch.empty(0, dtype=dtype, device=frames.device)]
    for start in range(0, pairs, batch_size):
        end = min(start + batch_size, pairs)
        later, earlier = frames[start + 1 : end + 1].to(dtype), frames[start:end].to(dtype)
        values.append(structural_similarity_index_measure(later, earlier, data_range=1.0, reduction="none").reshape(-1))
    return torch.cat(values)


def temporal_ssim(frames: torch.Tensor, batch_size: int = 16) -> float:
    """Mean SSIM of consecutive frames (higher = smoother). A clip of one frame shows no change: 1."""
    pairs = temporal_ssim_pairs(frames, batch_size)
    return float(pairs.mean()) if pairs.numel() else 1.0


def _check_batch_size(batch_size: Any) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def video_polarity(scorers: Sequence[Scorer]) -> dict[str, bool]:
    """Whether higher is better, for every metric `score_video` reports with these scorers."""
    polarity = {TEMPORAL_SSIM: True}
    for scorer in scorers:
        polarity[scorer.name] = bool(scorer.higher_is_better)
        polarity[scorer.name + WORST_SUFFIX] = bool(scorer.higher_is_better)
    return polarity


def _mean_and_worst(values: Sequence[float], higher_is_better: bool) -> tuple[float, float]:
    """The mean and the worst of per-frame values; any non-finite value makes both the worst possible (NaN)."""
    if not values or not all(math.isfinite(value) for value in values):
        return math.nan, math.nan
    return math.fsum(values) / len(values), (min(values) if higher_is_better else max(values))


@dataclass(frozen=True)
class VideoScores:
    """One clip's scores: `scores` holds `<metric>` (mean over frames), `<metric>_worst` and `temporal_ssim`;
    `per_frame` the values behind them (`temporal_ssim`: one per consecutive pair); `higher_is_better` the
    polarity of every name in `scores`."""

    scores: dict[str, float]
    per_frame: dict[str, list[float]] = field(default_factory=dict)
    higher_is_better: dict[str, bool] = field(default_factory=dict)


def score_video(
    frames: torch.Tensor,
    scorers: Sequence[Scorer],
    reference: torch.Tensor | None = None,
    prompt: str | None = None,
    batch_size: int = 8,
    warn: Callable[[str, str], None] | None = None,
) -> VideoScores:
    """Score every frame of one clip ((T, 3, H, W) in [0, 1]) with per-image scorers and sum it up (module
    docstring): mean and worst frame per metric, and temporal_ssim.

    `reference`: the base model's clip of the same prompt and seed, same shape, for scorers that need one
    (SSIM to the base, frame by frame). `prompt` goes to scorers that need prompts. Frames are scored
    `batch_size` at a time (BRISQUE on many large frames at once needs much memory). `warn` as in
    `score_images`: a failing scorer gives NaN and a call of `warn` instead of an exception.
    """
    F.check_image_batch(frames, "frames")
    _check_batch_size(batch_size)
    for scorer in scorers:
        if getattr(scorer, "whole_set", False):
            raise ValueError(
                f"the {scorer.name} scorer compares the previews of different seeds as a set, not the frames of one "
                "clip; score it on one frame per clip with score_sets instead"
            )
        if scorer.needs_reference and reference is None:
            raise ValueError(f"the {scorer.name} scorer needs the base model's clip as reference (reference=)")
        if getattr(scorer, "needs_prompts", False) and prompt is None:
            raise ValueError(f"the {scorer.name} scorer needs the clip's prompt (prompt=)")
    if reference is not None:
        F.check_image_batch(reference, "reference")
        if reference.shape != frames.shape:
            raise ValueError(
                f"reference must have the frames' shape {tuple(frames.shape)}, got {tuple(reference.shape)}; "
                "read both clips with the same max_frames"
            )
    per_frame: dict[str, list[float]] = {scorer.name: [] for scorer in scorers}
    for start in range(0, frames.shape[0], batch_size):
        chunk = list(frames[start : start + batch_size])
        references = list(reference[start : start + batch_size]) if reference is not None else None
        prompts = [prompt] * len(chunk) if prompt is not None else None
        for name, values in score_images(scorers, chunk, references, warn=warn, prompts=prompts).items():
            per_frame[name].extend(values)
    polarity = video_polarity(scorers)
    scores: dict[str, float] = {}
    for scorer in scorers:
        scores[scorer.name], scores[scorer.name + WORST_SUFFIX] = _mean_and_worst(
            per_frame[scorer.name], polarity[scorer.name]
        )
    pairs = temporal_ssim_pairs(frames, batch_size)
    per_frame[TEMPORAL_SSIM] = [float(value) for value in pairs]
    scores[TEMPORAL_SSIM] = float(pairs.mean()) if pairs.numel() else 1.0
    return VideoScores(scores=scores, per_frame=per_frame, higher_is_better=polarity)


def score_videos(
    scorers: Sequence[Scorer],
    videos: Sequence[torch.Tensor],
    references: Sequence[torch.Tensor] | None = None,
    prompts: Sequence[str] | None = None,
    batch_size: int = 8,
    warn: Callable[[str, str], None] | None = None,
) -> dict[str, list[float]]:
    """`score_video` on each clip of an evaluation: {metric: one value per clip}, the shape `score_images`
    gives for images, ready for the policy (which then aggregates over prompts)."""
    if references is not None and len(references) != len(videos):
        raise ValueError(f"give one reference clip per clip: {len(videos)} clips, {len(references)} references")
    if prompts is not None and len(prompts) != len(videos):
        raise ValueError(f"give one prompt per clip: {len(videos)} clips, {len(prompts)} prompts")
    table: dict[str, list[float]] = {}
    for index, frames in enumerate(videos):
        result = score_video(
            frames,
            scorers,
            reference=references[index] if references is not None else None,
            prompt=prompts[index] if prompts is not None else None,
            batch_size=batch_size,
            warn=warn,
        )
        for name, value in result.scores.items():
            table.setdefault(name, []).append(value)
    return table
