"""Video samples: reading animated WebP, GIF and MP4 back frame for frame, sampling long clips, per-frame
scores against the scorers run directly, temporal SSIM of static, moving and flickering clips."""
from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import cached_brisque_model
import torch
from PIL import Image

from lora_monitor.policy import BestEpochPolicy
from lora_monitor.scoring import functional as F
from lora_monitor.scoring.scorers import BrisqueScorer, SSIMScorer
from lora_monitor.video import (
    INSTALL_HINT,
    TEMPORAL_SSIM,
    VIDEO_PRESET,
    evenly_spaced,
    read_video,
    score_video,
    score_videos,
    temporal_ssim,
    temporal_ssim_pairs,
)

HAS_AV = importlib.util.find_spec("av") is not None
needs_av = pytest.mark.skipif(not HAS_AV, reason=f"PyAV is not installed ({INSTALL_HINT}); MP4 is not tested")


# ---------------------------------------------------------------------------- clips


def moving_square(frames: int = 8, height: int = 32, width: int = 48, step: int = 3) -> np.ndarray:
    """(T, H, W, 3) uint8 in three colours: a red square sliding `step` pixels a frame over a two-tone background."""
    clip = np.zeros((frames, height, width, 3), np.uint8)
    clip[:, :, : width // 2] = (40, 60, 90)
    clip[:, :, width // 2 :] = (200, 190, 160)
    for t in range(frames):
        clip[t, 8:18, 2 + step * t : 12 + step * t] = (230, 30, 30)
    return clip


def static_clip(frames: int = 8) -> np.ndarray:
    return np.repeat(moving_square(1), frames, axis=0)


def flicker_clip(frames: int = 8, height: int = 32, width: int = 48, seed: int = 0) -> np.ndarray:
    """Fresh noise in every frame: nothing carries over from one frame to the next."""
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def textured_clip(frames: int = 8, size: int = 64, seed: int = 0) -> np.ndarray:
    """Blocky random texture drifting one pixel a frame; frame 5 (if any) with added noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.random((size // 8 + 2, size // 8 + frames, 3))
    big = np.kron(coarse, np.ones((8, 8, 1)))
    clip = np.stack([big[:size, t : t + size] for t in range(frames)])
    clip = 0.15 + 0.7 * clip + 0.04 * rng.standard_normal(clip.shape)
    if frames > 5:
        clip[5] += 0.25 * rng.standard_normal(clip[5].shape)
    return (np.clip(clip, 0, 1) * 255).round().astype(np.uint8)


def as_tensor(clip: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(clip.astype(np.float32) / 255.0).permute(0, 3, 1, 2).contiguous()


def write_pil(clip: np.ndarray, path: Path) -> Path:
    images = [Image.fromarray(frame) for frame in clip]
    options = {"lossless": True, "quality": 100} if path.suffix == ".webp" else {"optimize": False}
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0, **options)
    return path


def write_mp4(clip: np.ndarray, path: Path, faststart: bool = False) -> Path:
    """H.264 (MPEG-4 part 2 where the build lacks libx264) at near-lossless quality, 8 fps."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", options=options) as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = clip.shape[1:3]
        stream.pix_fmt = "yuv444p" if codec == "libx264" else "yuv420p"
        stream.options = {"crf": "0"} if codec == "libx264" else {"qscale": "1"}
        for frame in clip:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_clip(clip: np.ndarray, path: Path) -> Path:
    return write_mp4(clip, path) if path.suffix in (".mp4", ".mkv") else write_pil(clip, path)


FORMATS = ["webp", "gif", pytest.param("mp4", marks=needs_av)]
# Lossless formats give the pixels back; MP4 passes through YUV and the codec.
TOLERANCE = {"webp": 1e-6, "gif": 1e-6, "mp4": 6 / 255}


@pytest.fixture(scope="module")
def brisque_model():
    return cached_brisque_model()


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", FORMATS)
def test_clip_reads_back_frame_for_frame(tmp_path, suffix):
    clip = moving_square()
    frames = read_video(write_clip(clip, tmp_path / f"clip.{suffix}"))
    assert frames.shape == (8, 3, 32, 48)
    assert frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1
    error = (frames - as_tensor(clip)).abs()
    if suffix == "mp4":
        assert error.mean() < 2 / 255 and error.max() < 0.1  # the codec is close, not exact
    else:
        assert error.max() <= TOLERANCE[suffix]


def test_a_still_image_is_a_clip_of_one_frame(tmp_path):
    Image.fromarray(moving_square(1)[0]).save(tmp_path / "still.webp", lossless=True)
    frames = read_video(tmp_path / "still.webp")
    assert frames.shape == (1, 3, 32, 48)
    assert temporal_ssim(frames) == 1.0  # nothing changes
    assert score_video(frames, []).scores == {TEMPORAL_SSIM: 1.0}


@pytest.mark.parametrize("suffix", ["webp", "gif"])
def test_frames_the_writer_merged_come_back(tmp_path, suffix):
    square = moving_square(4)
    clip = square[[0, 0, 0, 1, 2, 2, 3]]  # GIF and WebP writers store runs of equal frames as one, held longer
    path = write_pil(clip, tmp_path / f"held.{suffix}")
    with Image.open(path) as image:
        assert image.n_frames == 4
    frames = read_video(path)
    assert frames.shape == (7, 3, 32, 48)
    assert (frames - as_tensor(clip)).abs().max() <= TOLERANCE[suffix]
    assert read_video(path, max_frames=3).tolist() == frames[[0, 3, 6]].tolist()


@pytest.mark.parametrize("suffix", ["webp", "gif"])
def test_a_clip_that_never_changes_is_stored_as_one_frame(tmp_path, suffix):
    frames = read_video(write_pil(static_clip(), tmp_path / f"static.{suffix}"))
    assert frames.shape == (1, 3, 32, 48)
    assert (frames[0] - as_tensor(static_clip(1))[0]).abs().max() <= TOLERANCE[suffix]


@pytest.mark.parametrize(
    ("total", "count", "expected"),
    [
        (10, 4, [0, 3, 6, 9]),
        (8, 3, [0, 4, 7]),
        (81, 5, [0, 20, 40, 60, 80]),
        (9, 1, [4]),
        (5, None, [0, 1, 2, 3, 4]),
        (5, 9, [0, 1, 2, 3, 4]),
        (5, 5, [0, 1, 2, 3, 4]),
    ],
)
def test_evenly_spaced_indices(total, count, expected):
    assert evenly_spaced(total, count) == expected


def test_evenly_spaced_is_increasing_and_spans_the_clip():
    for total in range(2, 40):
        for count in range(2, total):
            indices = evenly_spaced(total, count)
            assert len(indices) == count and indices[0] == 0 and indices[-1] == total - 1
            assert all(b > a for a, b in zip(indices, indices[1:])), (total, count)


@pytest.mark.parametrize("suffix", [*FORMATS, pytest.param("mkv", marks=needs_av)])  # MKV keeps no frame count
def test_max_frames_keeps_evenly_spaced_frames(tmp_path, suffix):
    # frame t is uniformly grey at level 20 t: the level says which frame came back
    levels = np.arange(10) * 20 + 30
    clip = np.broadcast_to(levels[:, None, None, None], (10, 32, 32, 3)).astype(np.uint8)
    frames = read_video(write_clip(clip, tmp_path / f"ramp.{suffix}"), max_frames=4)
    assert frames.shape == (4, 3, 32, 32)
    got = (frames.mean(dim=(1, 2, 3)) * 255).tolist()
    assert got == pytest.approx([levels[i] for i in (0, 3, 6, 9)], abs=2)


@pytest.mark.parametrize("max_frames", [0, -1, 2.5, True, "4"])
def test_max_frames_must_be_a_positive_integer(tmp_path, max_frames):
    path = write_pil(static_clip(2), tmp_path / "clip.gif")
    with pytest.raises(ValueError, match="max_frames must be an integer >= 1"):
        read_video(path, max_frames=max_frames)


@pytest.mark.parametrize("suffix", ["webp", "gif", pytest.param("mp4", marks=needs_av)])
@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_file_is_a_value_error_naming_it(tmp_path, suffix, keep):
    clip = flicker_clip(frames=6)
    whole = tmp_path / f"whole.{suffix}"
    if suffix == "mp4":
        write_mp4(clip, whole, faststart=True)  # the index first, then the frames: the cut loses frames
    else:
        write_pil(clip, whole)
    data = whole.read_bytes()
    cut = tmp_path / f"cut.{suffix}"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError) as raised:
        read_video(cut)
    assert str(cut) in str(raised.value)


def test_not_a_video_is_a_value_error_naming_it(tmp_path):
    path = tmp_path / "notes.webp"
    path.write_text("not a video")
    with pytest.raises(ValueError, match="notes.webp"):
        read_video(path)


def test_unknown_suffix_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"unknown video type '\.avi'.*\.mp4"):
        read_video(tmp_path / "clip.avi")
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        read_video(tmp_path / "missing.mp4")


def test_mp4_without_pyav_names_the_extra(tmp_path, monkeypatch):
    path = tmp_path / "clip.mp4"
    path.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    with pytest.raises(ImportError) as raised:
        read_video(path)
    assert "pip install 'lora-monitor[video]'" in str(raised.value)


# ---------------------------------------------------------------------------- temporal SSIM


@pytest.mark.parametrize("suffix", ["webp", "gif"])
def test_static_clip_has_temporal_ssim_one(tmp_path, suffix):
    frames = read_video(write_pil(static_clip(), tmp_path / f"static.{suffix}"))
    assert temporal_ssim(frames) == pytest.approx(1.0, abs=1e-6)
    # the frames themselves, with flat regions where float32 SSIM gives about 0.9999
    frames = as_tensor(static_clip())
    assert temporal_ssim_pairs(frames).tolist() == pytest.approx([1.0] * 7, abs=1e-6)


@needs_av
def test_static_mp4_is_nearly_one(tmp_path):
    frames = read_video(write_mp4(static_clip(), tmp_path / "static.mp4"))
    assert temporal_ssim(frames) > 0.99


@pytest.mark.parametrize("suffix", FORMATS)
def test_flicker_scores_far_below_smooth_motion(tmp_path, suffix):
    moving = temporal_ssim(read_video(write_clip(moving_square(), tmp_path / f"moving.{suffix}")))
    flicker = temporal_ssim(read_video(write_clip(flicker_clip(), tmp_path / f"flicker.{suffix}")))
    assert moving < 0.99  # motion lowers it too
    assert moving > 0.6
    assert flicker < 0.1
    assert flicker < moving - 0.5


def test_faster_motion_lowers_temporal_ssim():
    slow = temporal_ssim(as_tensor(moving_square(step=1, width=64)))
    fast = temporal_ssim(as_tensor(moving_square(step=6, width=64)))
    assert fast < slow < 1


def test_temporal_pairs_are_the_ssim_of_consecutive_frames():
    frames = as_tensor(textured_clip(frames=7, size=32))
    pairs = temporal_ssim_pairs(frames, batch_size=2)  # batches of pairs give the same numbers
    assert pairs.shape == (6,) and pairs.dtype == torch.float64
    torch.testing.assert_close(pairs, temporal_ssim_pairs(frames, batch_size=16), rtol=0, atol=1e-12)
    direct = F.ssim(frames[1:], frames[:-1]).double()  # the project's SSIM, in float32
    torch.testing.assert_close(pairs, direct, rtol=0, atol=1e-4)
    assert pairs[4] < pairs[0] and pairs[5] < pairs[0]  # the two pairs that touch the noisy frame 5


# ---------------------------------------------------------------------------- per-frame scores


def test_brisque_mean_and_worst_match_brisque_of_the_frames(tmp_path, brisque_model):
    from lora_monitor.scoring.brisque import brisque

    frames = read_video(write_pil(textured_clip(), tmp_path / "clip.webp"))
    direct = brisque(frames, brisque_model).tolist()
    result = score_video(frames, [BrisqueScorer(model=brisque_model)], batch_size=3)
    assert result.per_frame["brisque"] == pytest.approx(direct, abs=1e-9)
    assert result.scores["brisque"] == pytest.approx(sum(direct) / len(direct), abs=1e-9)
    assert result.scores["brisque_worst"] == pytest.approx(max(direct), abs=1e-9)  # lower is better: worst is max
    assert result.scores["brisque_worst"] > result.scores["brisque"] + 1
    assert result.scores[TEMPORAL_SSIM] == pytest.approx(temporal_ssim(frames), abs=1e-9)
    assert result.higher_is_better == {"brisque": False, "brisque_worst": False, TEMPORAL_SSIM: True}


def test_worst_of_a_higher_is_better_metric_is_its_minimum():
    frames = as_tensor(textured_clip(frames=6, size=32))
    reference = as_tensor(textured_clip(frames=6, size=32, seed=1))
    result = score_video(frames, [SSIMScorer()], reference=reference, batch_size=4)
    direct = F.ssim(frames, reference).tolist()
    assert result.scores["ssim"] == pytest.approx(sum(direct) / len(direct), abs=1e-6)
    assert result.scores["ssim_worst"] == pytest.approx(min(direct), abs=1e-6)
    assert result.scores["ssim_worst"] < result.scores["ssim"]


def test_an_unscorable_frame_makes_mean_and_worst_nan(brisque_model):
    frames = as_tensor(textured_clip(frames=4, size=32))
    frames[2] = 0.0  # a black frame: BRISQUE is undefined
    result = score_video(frames, [BrisqueScorer(model=brisque_model)])
    assert math.isnan(result.per_frame["brisque"][2]) and math.isfinite(result.per_frame["brisque"][0])
    assert math.isnan(result.scores["brisque"]) and math.isnan(result.scores["brisque_worst"])


def test_scorer_needs_and_whole_set_scorers_are_refused():
    frames = as_tensor(static_clip(3))
    with pytest.raises(ValueError, match="needs the base model's clip"):
        score_video(frames, [SSIMScorer()])
    with pytest.raises(ValueError, match="same max_frames"):
        score_video(frames, [SSIMScorer()], reference=frames[:2])

    class SetScorer:
        name, higher_is_better, needs_reference, whole_set = "diversity", True, False, True

    with pytest.raises(ValueError, match="diversity.*score_sets"):
        score_video(frames, [SetScorer()])


def test_a_failing_scorer_warns_and_scores_nan():
    class Broken:
        name, higher_is_better, needs_reference = "broken", True, False

        def __call__(self, images, reference=None):
            raise RuntimeError("out of memory")

    warnings = []
    result = score_video(as_tensor(static_clip(3)), [Broken()], warn=lambda key, message: warnings.append(message))
    assert math.isnan(result.scores["broken"]) and math.isnan(result.scores["broken_worst"])
    assert warnings and "out of memory" in warnings[0]
    assert result.scores[TEMPORAL_SSIM] == pytest.approx(1.0, abs=1e-6)


def test_score_videos_gives_one_value_per_clip_for_the_policy():
    """Two epochs of two prompts each: the cleaner epoch flickers and loses to the bound of VIDEO_PRESET."""
    smooth = [as_tensor(moving_square()), as_tensor(moving_square(step=2))]
    flickering = [as_tensor(flicker_clip(seed=1)), as_tensor(flicker_clip(seed=2))]
    reference = [as_tensor(moving_square()), as_tensor(moving_square(step=2))]

    class Contrast:
        """Stands in for BRISQUE: busier frames score "cleaner" here, as frames of a flickering LoRA might."""

        name, higher_is_better, needs_reference = "brisque", False, False

        def __call__(self, images, reference=None):
            return 100 - 100 * images.std(dim=(1, 2, 3))

    quality = Contrast()

    base = score_videos([quality], reference)
    epoch_smooth = score_videos([quality], smooth)
    epoch_flicker = score_videos([quality], flickering)
    assert set(epoch_smooth) == {"brisque", "brisque_worst", TEMPORAL_SSIM}
    assert all(len(values) == 2 for values in epoch_smooth.values())
    assert sum(epoch_flicker["brisque"]) < sum(epoch_smooth["brisque"])  # the flicker epoch "looks" cleaner

    policy = BestEpochPolicy(VIDEO_PRESET.metric, higher_is_better=False, bounds=VIDEO_PRESET.bounds)
    policy.set_base({TEMPORAL_SSIM: sum(base[TEMPORAL_SSIM]) / 2})
    policy.update(1, epoch_smooth)
    decision = policy.update(2, epoch_flicker)
    assert not decision.is_best and policy.best_epoch == 1
    with pytest.raises(ValueError, match="one prompt per clip"):
        score_videos([quality], smooth, prompts=["a"])
