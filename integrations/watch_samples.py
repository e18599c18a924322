"""Reading a trainer's sample file as the sample it holds: an image or a clip, cut out of a display image where
the trainer saves one (SimpleTuner), and a base clip matched to a round's clip (trainer_watch.py).

A layout whose `cut_sample` is set saves displays, not samples: `read_sample_file` asks it where the sample
lies, checks the rows the trainer fills with black under it, and returns only the sample's pixels; a display
it cannot be cut back out of raises DisplayError (a ValueError) naming the file and why.
"""
from __future__ import annotations

from pathlib import Path

import torch

from lora_monitor.integrations.kohya import UnreadableSampleError, read_sample
from lora_monitor.trainer_layouts import DisplayError, SampleName, TrainerLayout

#: The brightest value the footer rows under a SimpleTuner sample may hold (black, less the codec's noise).
BLANK_LEVEL = 0.1


def cut_display(layout: TrainerLayout, sample: SampleName, pixels: torch.Tensor) -> torch.Tensor:
    """The sample's pixels in `pixels` ((3, H, W), or (T, 3, H, W) for a clip) as the layout places it; as is when
    the layout saves plain samples."""
    if layout.cut_sample is None:
        return pixels
    height, width = pixels.shape[-2:]
    cut = layout.cut_sample(sample, width, height)
    first, end = cut.blank_rows
    if end > first and float(pixels[..., first:end, :].max()) > BLANK_LEVEL:
        raise DisplayError(f"{sample.path.name}: rows {first}..{end - 1}, under where the sample ends, are not the black "
                           f"footer {layout.title} draws there: not a display layout the watcher knows, so it is not cut")
    left, top, right, bottom = cut.box
    return pixels[..., top:bottom, left:right]


def read_sample_file(layout: TrainerLayout, sample: SampleName, video: bool) -> torch.Tensor:
    """The sample in `sample`'s file: an image (3, H, W), or with `video` a clip (T, 3, H, W) (a still image is a
    clip of one frame). A file that does not decode raises UnreadableSampleError; a display that cannot be cut,
    DisplayError."""
    if video:
        from lora_monitor.video import read_video

        try:
            pixels = read_video(sample.path)
        except (OSError, ValueError) as error:
            raise UnreadableSampleError(sample.path, str(error)) from error
    else:
        pixels = read_sample(sample.path)
    return cut_display(layout, sample, pixels)


def read_plain_file(path: Path, video: bool) -> torch.Tensor:
    """A base reference the user or the trainer saved as a plain file (--base-samples, SimpleTuner's benchmarks)."""
    if not video:
        return read_sample(path)
    from lora_monitor.video import read_video

    return read_video(path)


def frames_like(reference: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """The base clip with the clip's frame count (frames spread evenly): writers store a still clip as one frame
    (video.read_video), and a trainer may render the base with another length. Another frame size is an error."""
    if reference.shape[1:] != clip.shape[1:]:
        raise ValueError(f"a base clip's frames are {tuple(reference.shape[2:])}, the round's {tuple(clip.shape[2:])}: "
                         "the base references must be rendered at the samples' size")
    count, total = clip.shape[0], reference.shape[0]
    if count == total:
        return reference
    return reference[[round(i * (total - 1) / max(count - 1, 1)) for i in range(count)]]


def middle_frames(clips: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each clip's middle frame: the preview of a video round."""
    return [clip[(clip.shape[0] - 1) // 2] for clip in clips]
