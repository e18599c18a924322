"""LoraMonitor end to end on the tiny model: export, record, base cache, top-k, state, bad input."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import nudge_lora
from PIL import Image

from lora_monitor import export as exporting
from lora_monitor.monitor import LoraMonitor
from lora_monitor.record import from_pil, read_scores
from lora_monitor.render import PreviewRenderer
from lora_monitor.scoring import get_scorer


def make_monitor(pipe, spec, output_dir, **kwargs) -> LoraMonitor:
    options = dict(metrics=("ssim",), metric="ssim", spec=spec, output_dir=output_dir)
    options.update(kwargs)
    return LoraMonitor.from_pipeline(pipe, **options)


class Lowest:
    """A scorer whose polarity is 'lower is better': the mean pixel value. Stands for BRISQUE in these tests."""

    name = "brightness"
    higher_is_better = False
    needs_reference = False

    def __call__(self, images, reference=None):
        return images.mean(dim=(1, 2, 3))


def test_previews_equal_a_fresh_pipeline_loading_the_exported_lora(pipeline, tiny_model, small_spec, tmp_path):
    from diffusers import StableDiffusionPipeline

    monitor = make_monitor(pipeline, small_spec, tmp_path)
    nudge_lora(pipeline.unet, seed=1)
    report = monitor.on_epoch_end(1, step=10)
    assert report.is_best and report.exported == tmp_path / "best"

    fresh = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    fresh.load_lora_weights(tmp_path / "best", weight_name="pytorch_lora_weights.safetensors")
    fresh_images = PreviewRenderer(
        unet=fresh.unet, vae=fresh.vae, text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer, scheduler=fresh.scheduler
    ).render(small_spec)
    for ours, theirs in zip(report.images, fresh_images):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)

    sidecar = exporting.read_sidecar(tmp_path / "best")
    assert sidecar["epoch"] == 1 and sidecar["step"] == 10
    assert sidecar["spec_fingerprint"] == small_spec.fingerprint()
    assert sidecar["policy"]["metric"] == "ssim" and sidecar["scores"]["ssim"] == report.scores["ssim"]


def test_record_holds_every_epoch_and_png_scores_equal_logged_scores(pipeline, small_spec, tmp_path):
    monitor = make_monitor(pipeline, small_spec, tmp_path)
    for epoch in (1, 2, 3):
        nudge_lora(pipeline.unet, seed=epoch)
        monitor.on_epoch_end(epoch, step=epoch * 5)
    lines = read_scores(tmp_path)
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    assert [line["best_epoch"] for line in lines][-1] == monitor.best_epoch
    for line in lines:
        previews = torch.stack([from_pil(Image.open(tmp_path / path)) for path in line["previews"]])
        base = torch.stack([from_pil(Image.open(p)) for p in sorted((tmp_path / "previews" / "base").glob("*.png"))])
        rescored = get_scorer("ssim")(previews, base).tolist()
        assert rescored == pytest.approx(line["scores"]["ssim"], abs=1e-6)


def test_best_follows_the_scorers_polarity_and_sidecar_tracks_it(pipeline, small_spec, tmp_path):
    monitor = make_monitor(pipeline, small_spec, tmp_path, metrics=None, scorers=[Lowest()], metric="brightness")
    assert monitor.policy.mode == "min"
    values = []
    for epoch in (1, 2, 3):
        nudge_lora(pipeline.unet, seed=epoch, scale=0.5)
        values.append(monitor.on_epoch_end(epoch).aggregates["brightness"])
    expected = 1 + min(range(3), key=lambda i: (values[i], i))
    assert monitor.best_epoch == expected
    assert exporting.read_sidecar(tmp_path / "best")["epoch"] == expected


def test_previews_are_scored_on_the_denoisers_device(pipeline, small_spec, tmp_path, monkeypatch):
    """On a GPU the previews and the base renders they are compared with are scored there, not on the CPU the render
    hands them to. This machine has one device, so the denoiser's device reads as 'meta' here, and a scorer sees
    where its batch went."""
    from lora_monitor.evaluation import Evaluation

    seen = []

    class Where(Lowest):
        needs_reference = True

        def __call__(self, images, reference=None):
            seen.append((images.device.type, reference.device.type))
            return torch.zeros(images.shape[0])

    monitor = make_monitor(pipeline, small_spec, tmp_path, metrics=None, scorers=[Where()], metric="brightness")
    monkeypatch.setattr(Evaluation, "scoring_device", property(lambda self: torch.device("meta")))
    monitor.on_epoch_end(1)
    assert len(seen) == 2 and set(seen) == {("meta", "meta")}  # the base renders' scores, then epoch 1's


def test_top_k_keeps_the_k_best_epochs(pipeline, small_spec, tmp_path):
    monitor = make_monitor(pipeline, small_spec, tmp_path, metrics=None, scorers=[Lowest()], metric="brightness", top_k=2)
    values = {}
    for epoch in (1, 2, 3, 4):
        nudge_lora(pipeline.unet, seed=epoch, scale=0.5)
        values[epoch] = monitor.on_epoch_end(epoch).aggregates["brightness"]
    best_two = sorted(values, key=lambda e: (values[e], e))[:2]
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "top_k").iterdir() if p.name.startswith("epoch-"))
    assert kept == sorted(best_two)
    for epoch in kept:
        assert exporting.read_sidecar(tmp_path / "top_k" / f"epoch-{epoch:04d}")["epoch"] == epoch


def test_base_references_are_cached_in_the_output_dir(pipeline, small_spec, tmp_path, monkeypatch):
    first = make_monitor(pipeline, small_spec, tmp_path)
    rendered = first.base_references()
    second = make_monitor(pipeline, small_spec, tmp_path)
    monkeypatch.setattr(second.renderer, "render_base", lambda *a, **k: pytest.fail("base rendered again despite the cache"))
    loaded = second.base_references()
    assert all(torch.equal(a, b) for a, b in zip(rendered, loaded))
    # another spec does not reuse them
    from lora_monitor.spec import PreviewSpec

    third = make_monitor(pipeline, PreviewSpec.from_prompts(["a red circle", "a blue square"], seed=8, steps=2, width=64, height=64), tmp_path)
    assert third.base_key() != first.base_key()


def test_a_failed_export_leaves_the_previous_best_loadable(pipeline, tiny_model, small_spec, tmp_path):
    from diffusers import StableDiffusionPipeline

    monitor = make_monitor(pipeline, small_spec, tmp_path, metrics=None, scorers=[Lowest()], metric="brightness")
    nudge_lora(pipeline.unet, seed=1)
    monitor.on_epoch_end(1)
    before = (tmp_path / "best" / "pytorch_lora_weights.safetensors").read_bytes()
    writer = monitor.write_weights

    def fails_half_way(folder):
        writer(folder)
        (folder / "pytorch_lora_weights.safetensors").write_bytes(b"\0" * 100)  # a torn file
        raise OSError("disk full")

    monitor.write_weights = fails_half_way
    monitor.policy.best_value = float("inf")  # make epoch 2 a new best, so export is attempted
    nudge_lora(pipeline.unet, seed=2)
    with pytest.raises(OSError, match="disk full"):
        monitor.on_epoch_end(2)
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert exporting.read_sidecar(tmp_path / "best")["epoch"] == 1
    assert not list(tmp_path.glob(".best.tmp-*")) and not (tmp_path / "best.previous").exists()
    fresh = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    fresh.load_lora_weights(tmp_path / "best", weight_name="pytorch_lora_weights.safetensors")  # loadable


def test_recover_finishes_an_interrupted_swap(tmp_path):
    best = tmp_path / "best"
    (tmp_path / "best.previous").mkdir()
    (tmp_path / "best.previous" / "lora_monitor.json").write_text("{}")
    exporting.recover(best)  # crash after old -> .previous, before new -> best
    assert (best / "lora_monitor.json").exists() and not (tmp_path / "best.previous").exists()


def test_nan_previews_score_worst_and_never_become_best(pipeline, small_spec, tmp_path):
    monitor = make_monitor(pipeline, small_spec, tmp_path, metrics=None, scorers=[Lowest()], metric="brightness")
    with torch.no_grad():
        for name, parameter in pipeline.unet.named_parameters():
            if "lora_B" in name:
                parameter.fill_(float("nan"))
    with pytest.warns(RuntimeWarning, match="NaN"):
        report = monitor.on_epoch_end(1)
    assert not report.is_best and monitor.best_epoch is None
    assert not (tmp_path / "best").exists()
    assert read_scores(tmp_path)[0]["aggregates"]["brightness"] == "inf"


def test_state_round_trips_through_accelerate_checkpoints(pipeline, small_spec, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    monitor = make_monitor(pipeline, small_spec, tmp_path / "run", patience=3).attach(accelerator)
    for epoch in (1, 2):
        nudge_lora(pipeline.unet, seed=epoch)
        monitor.on_epoch_end(epoch)
    accelerator.save_state(str(tmp_path / "state"))

    accelerator2 = Accelerator(cpu=True)
    resumed = make_monitor(pipeline, small_spec, tmp_path / "run", patience=3).attach(accelerator2)
    accelerator2.load_state(str(tmp_path / "state"))
    assert resumed.state_dict() == monitor.state_dict()
    assert resumed.best_epoch == monitor.best_epoch and resumed.policy.wait_count == monitor.policy.wait_count


def test_state_from_another_spec_is_refused(pipeline, small_spec, tmp_path):
    from lora_monitor.spec import PreviewSpec

    state = make_monitor(pipeline, small_spec, tmp_path).state_dict()
    other = make_monitor(pipeline, PreviewSpec.from_prompts(["x"], steps=2, width=64, height=64), tmp_path)
    with pytest.raises(ValueError, match="same prompts"):
        other.load_state_dict(state)


# --- bad input: each a clear error when the monitor is built, i.e. before training starts ---------------------


def prompt_file(tmp_path, text: str):
    path = tmp_path / "prompts.txt"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("make_options", "error", "pattern"),
    [
        (lambda p: {"spec": prompt_file(p, "a cat --w 64 --h 64\na dog --x 3\n")}, ValueError, r"prompts\.txt:2.*--x"),
        (lambda p: {"spec": prompt_file(p, "a cat --w abc\n")}, ValueError, r"prompts\.txt:1.*abc"),
        (lambda p: {"spec": prompt_file(p, "a cat --w 60 --h 64\n")}, ValueError, r"prompts\.txt:1.*multiple of 8, got 60"),
        (lambda p: {"spec": p / "missing.txt"}, FileNotFoundError, r"missing\.txt"),
        (lambda p: {"mode": "min"}, ValueError, r"contradicts.*ssim.*higher is better"),
        (lambda p: {"patience": 0}, ValueError, r"patience must be"),
        (lambda p: {"min_delta": -0.1}, ValueError, r"min_delta must be >= 0"),
        (lambda p: {"metric": "brisque"}, ValueError, r"metric='brisque' is not among the metrics"),
        (lambda p: {"metrics": ("ssim", "ssimm")}, ValueError, r"unknown metric 'ssimm'.*Did you mean 'ssim'"),
        (lambda p: {"bounds": {"lpips": (0, 1)}}, ValueError, r"bounds name the metric 'lpips'"),
        (lambda p: {"every_n_epochs": 0}, ValueError, r"every_n_epochs"),
    ],
    ids=["unknown-option", "malformed-value", "size-not-multiple-of-8", "missing-file", "mode-vs-polarity",
         "patience-0", "negative-min-delta", "metric-not-a-metric", "unknown-metric", "bound-not-a-metric", "every-0"],
)
def test_bad_settings_fail_when_the_monitor_is_built(pipeline, small_spec, tmp_path, make_options, error, pattern):
    """Refused before the monitor touches its output folder: one an earlier run's crash left mid-export (best/ moved to
    best.previous/) stays as it was, where a monitor that got built puts best/ back (test_export.py checks that part)."""
    options = make_options(tmp_path)
    out = tmp_path / "out"
    (out / "best.previous").mkdir(parents=True)
    (out / "best.previous" / "lora_monitor.json").write_text('{"epoch": 1}', encoding="utf-8")
    before = sorted(path.relative_to(out).as_posix() for path in out.rglob("*"))
    with pytest.raises(error, match=pattern):
        make_monitor(pipeline, options.pop("spec", small_spec), out, **options)
    assert sorted(path.relative_to(out).as_posix() for path in out.rglob("*")) == before


def test_size_that_does_not_fit_the_vae_is_refused_when_the_monitor_is_built(pipeline, tmp_path, monkeypatch):
    from diffusers.configuration_utils import FrozenDict

    from lora_monitor.spec import PreviewSpec

    # the tiny VAE downsamples 2x, which every multiple of 8 fits: its config given 5 blocks, the pipeline the monitor
    # builds over it downsamples 16x (2 ** (blocks - 1)), and 72 px does not divide
    monkeypatch.setattr(pipeline.vae, "_internal_dict", FrozenDict({**pipeline.vae.config, "block_out_channels": [32] * 5}))
    with pytest.raises(ValueError, match=r"preview 0 \('a'\) is 72x64; a 'sd' model needs width and height divisible by 16"):
        make_monitor(pipeline, PreviewSpec.from_prompts(["a"], steps=2, width=72, height=64), tmp_path / "refused")
    assert make_monitor(pipeline, PreviewSpec.from_prompts(["a"], steps=2, width=64, height=64), tmp_path).renderer.vae_scale_factor == 16


def test_metric_names_the_monitored_metric_and_monitor_is_its_deprecated_alias(pipeline, small_spec, tmp_path):
    assert make_monitor(pipeline, small_spec, tmp_path, metrics=("ssim", "brisque"), metric="brisque").policy.metric == "brisque"
    options = dict(metrics=("ssim", "brisque"), spec=small_spec, output_dir=tmp_path)
    with pytest.warns(DeprecationWarning, match=r"LoraMonitor\(monitor=\.\.\.\) is deprecated: name the monitored metric with metric="):
        assert LoraMonitor.from_pipeline(pipeline, monitor="brisque", **options).policy.metric == "brisque"
    with pytest.raises(ValueError, match=r"got metric='ssim' and monitor='brisque': monitor= is the deprecated old name of metric="):
        LoraMonitor.from_pipeline(pipeline, metric="ssim", monitor="brisque", **options)


def test_a_prompt_file_gives_the_same_steps_cfg_and_size_in_the_loop_and_in_the_kohya_launcher_and_watcher(pipeline, tmp_path):
    """A prompt file is kohya's format: what a prompt leaves out comes from kohya's sampler (sample_image_inference in
    sd-scripts' library/train_util.py: 30 steps, CFG 7.5, 512x512) wherever the file is loaded. The loop's spec leaves
    the CFG to the model family, whose renderer uses kohya's 7.5 for SD."""
    from lora_monitor.integrations import kohya
    from lora_monitor.spec import PreviewSpec

    path = prompt_file(tmp_path, "a red circle\na blue square --s 4 --l 5 --w 64 --h 96\n")
    kohya_defaults = [(30, 7.5, 512, 512), (4, 5.0, 64, 96)]
    monitor = make_monitor(pipeline, path, tmp_path / "monitor")

    def settings(spec, cfg=lambda prompt: prompt.guidance_scale):
        return [(prompt.steps, cfg(prompt), prompt.width, prompt.height) for prompt in spec.prompts]

    assert settings(PreviewSpec.load(path), monitor.renderer.cfg_scale) == kohya_defaults
    assert settings(monitor.spec, monitor.renderer.cfg_scale) == kohya_defaults
    _, launched, _ = kohya.fixed_seed_prompts(path, tmp_path / "kohya", defaults=kohya.prompt_defaults("sd"))
    assert settings(launched) == kohya_defaults  # the launcher's spec of the file kohya renders
    assert settings(PreviewSpec.load(path, **kohya.KOHYA_PROMPT_DEFAULTS)) == kohya_defaults  # the watcher's


def test_prompt_file_spec_loads_through_the_monitor(pipeline, tmp_path):
    spec_file = prompt_file(tmp_path, "# previews\na red circle --w 64 --h 64 --d 5 --s 2 --l 6.5 --n blurry\n")
    monitor = make_monitor(pipeline, spec_file, tmp_path / "out")
    prompt = monitor.spec.prompts[0]
    assert (prompt.prompt, prompt.seed, prompt.steps, prompt.guidance_scale, prompt.negative_prompt) == ("a red circle", 5, 2, 6.5, "blurry")
    assert json.loads(json.dumps(monitor.spec.to_dict())) == monitor.spec.to_dict()


@pytest.mark.parametrize(
    "bad,pattern",
    [
        (torch.rand(1, 64, 64), r"epoch 1, preview 0: shape \(1, 64, 64\); expected \(3, H, W\)"),
        (torch.rand(1, 3, 64, 64), r"epoch 1, preview 0: shape \(1, 3, 64, 64\); expected \(3, H, W\).*no batch dimension"),
        (torch.rand(3, 0, 64), r"epoch 1, preview 0: shape \(3, 0, 64\)"),
        (torch.randint(0, 255, (3, 64, 64), dtype=torch.int32), r"dtype torch.int32; expected floats in \[0, 1\] or uint8"),
        (torch.rand(3, 64, 64) * 2 - 1, r"values from -.* expected \[0, 1\] \(a \[-1, 1\] image\? pass \(image \+ 1\) / 2\)"),
        (torch.rand(3, 32, 32), r"epoch 1, preview 0: shape \(3, 32, 32\), but its base reference is \(3, 64, 64\)"),
    ],
)
def test_evaluate_refuses_bad_images_before_anything_changes(pipeline, small_spec, tmp_path, bad, pattern):
    monitor = make_monitor(pipeline, small_spec, tmp_path)
    monitor.base_references()
    good = torch.rand(3, 64, 64)
    with pytest.raises((ValueError, TypeError), match=pattern):
        monitor.evaluate(1, [bad, good])
    assert monitor.policy.history == [] and read_scores(tmp_path) == [] and not (tmp_path / "best").exists()
    assert not (tmp_path / "previews" / "epoch-0001").exists()


def test_evaluate_takes_uint8_images_as_0_to_255(pipeline, small_spec, tmp_path):
    monitor = make_monitor(pipeline, small_spec, tmp_path)
    base = monitor.base_references()
    as_uint8 = [torch.round(image * 255).to(torch.uint8) for image in base]
    report = monitor.evaluate(1, as_uint8)
    assert report.scores["ssim"] == pytest.approx([1.0, 1.0], abs=1e-6), "uint8 base images must score as the base itself"


@pytest.mark.parametrize("kind,stage,refused", [("FSDP", None, "FSDP"), ("DEEPSPEED", 3, "DeepSpeed ZeRO stage 3"), ("DEEPSPEED", 2, None)])
def test_attach_refuses_sharded_parameters(pipeline, small_spec, tmp_path, kind, stage, refused):
    """FSDP and ZeRO-3 cannot run on this CPU machine: a stand-in Accelerator says which one it would be."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    accelerator = SimpleNamespace(
        distributed_type=getattr(DistributedType, kind), state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)),
        autocast=None, register_for_checkpointing=lambda obj: None, is_main_process=True,
    )
    monitor = make_monitor(pipeline, small_spec, tmp_path)
    if refused:
        with pytest.raises(ValueError, match=rf"{refused} shards the model's parameters across ranks.*train the LoRA with DDP"):
            monitor.attach(accelerator)
        assert monitor.accelerator is None
    else:
        assert monitor.attach(accelerator).accelerator is accelerator


def test_a_failed_export_leaves_policy_best_and_record_in_agreement(pipeline, small_spec, tmp_path, monkeypatch):
    import errno

    from lora_monitor.monitor import RecordWriteError

    monitor = make_monitor(pipeline, small_spec, tmp_path, metrics=None, scorers=[Lowest()], metric="brightness")
    scripted = iter([0.5, 0.2, 0.2])  # epoch 2 would be the new best
    monkeypatch.setattr(Lowest, "__call__", lambda self, images, reference=None: torch.full((images.shape[0],), next(scripted)))
    assert monitor.on_epoch_end(1).is_best
    before = (tmp_path / "best" / "pytorch_lora_weights.safetensors").read_bytes()

    def full_disk(folder, write_weights, sidecar):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(exporting, "export_checkpoint", full_disk)
        with pytest.raises(RecordWriteError, match=r"epoch 2 was not recorded: OSError: .*No space left on device.*best/ still holds epoch 1"):
            monitor.on_epoch_end(2)
    assert [r.epoch for r in monitor.policy.history] == [1] and monitor.best_epoch == 1
    assert exporting.read_sidecar(tmp_path / "best")["epoch"] == 1
    assert (tmp_path / "best" / "pytorch_lora_weights.safetensors").read_bytes() == before
    assert [line["epoch"] for line in read_scores(tmp_path)] == [1]
    report = monitor.on_epoch_end(2)  # space freed: the same epoch again
    assert report.is_best and exporting.read_sidecar(tmp_path / "best")["epoch"] == 2
    assert [line["epoch"] for line in read_scores(tmp_path)] == [1, 2]
