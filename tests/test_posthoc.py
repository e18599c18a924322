"""Post-hoc `epochs`, `strength` and `grid`: folders made by the tiny pipeline in every naming scheme,
the older tools' rules, the in-training monitor's choice, rendering checkpoints, and bad input."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from conftest import LORA_TARGETS, nudge_lora
from lora_monitor import posthoc
from lora_monitor.monitor import LoraMonitor, quantize
from lora_monitor.policy import BestEpochPolicy
from lora_monitor.cli import main
from lora_monitor.record import save_png_atomic
from lora_monitor.scoring import get_scorer
from lora_monitor.spec import PreviewSpec

PROMPTS = ["a red circle", "a blue square"]
EPOCHS = (1, 2, 3)
RANK, ALPHA = 4, 8  # alpha != rank: the kohya alpha must reach the loaded LoRA


def kohya_state_dict(unet: torch.nn.Module, alpha: float) -> dict[str, torch.Tensor]:
    """The UNet's peft LoRA in kohya sd-scripts' key format: lora_unet_<module path with _>.lora_down/lora_up/alpha."""
    from peft.utils import get_peft_model_state_dict

    state = {}
    for key, value in get_peft_model_state_dict(unet).items():
        module, _, rest = key.rpartition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        state[f"{name}.{'lora_down' if rest.startswith('A') else 'lora_up'}.weight"] = value.detach().clone().contiguous()
        state[f"{name}.alpha"] = torch.tensor(float(alpha))
    return state



@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """One tiny "training run": base renders, three epochs' renders and their kohya checkpoints."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from safetensors.torch import save_file

    from lora_monitor.render import PreviewRenderer

    folder = tmp_path_factory.mktemp("run")
    spec = PreviewSpec.from_prompts(PROMPTS, seed=7, steps=2, width=64, height=64)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)  # the LoRA's random init (so every image here) must not depend on which tests ran before
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    renderer = PreviewRenderer(unet=pipe.unet, vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, scheduler=pipe.scheduler)
    base = renderer.render_base(spec)
    epochs, checkpoints = {}, {}
    for epoch in EPOCHS:
        nudge_lora(pipe.unet, seed=epoch, scale=0.4)
        epochs[epoch] = renderer.render(spec)
        checkpoints[epoch] = kohya_state_dict(pipe.unet, ALPHA)
        name = f"tiny-{epoch:06d}.safetensors" if epoch != EPOCHS[-1] else "tiny.safetensors"  # kohya: last epoch unnumbered
        save_file(checkpoints[epoch], str(folder / name), metadata={"ss_epoch": str(epoch)})
    return {"spec": spec, "base": base, "epochs": epochs, "checkpoints": folder, "pipe": pipe, "renderer": renderer, "model": tiny_model}


def run_json(capsys, *argv) -> dict:
    code = main([*argv, "--json", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def save(image: torch.Tensor, path) -> None:
    save_png_atomic(quantize(image), path)


def monitor_choice(spec, base, epochs, tmp_path, **policy) -> LoraMonitor:
    """What the in-training monitor decides on the same images."""
    monitor = LoraMonitor(spec=spec, output_dir=tmp_path / "monitor", metrics=("brisque", "ssim"), export=False, **policy)
    monitor.set_base_references(base)
    for epoch in sorted(epochs):
        monitor.evaluate(epoch, epochs[epoch])
    return monitor


def old_rule(values: dict[float, float], tolerance: float = 0.01) -> float:
    """The older tools' rule: lowest BRISQUE; among those within `tolerance` of it, the earliest (lowest key)."""
    lowest = min(values.values())
    return min(key for key, value in values.items() if value <= lowest + tolerance)


def brisque_of(path) -> float:
    return float(get_scorer("brisque")(posthoc.read_image(path).unsqueeze(0))[0])


# ----------------------------------------------------------------------------------------- images on disk


def test_kohya_samples_give_the_monitors_choice(run, tmp_path, capsys):
    sample = tmp_path / "output" / "sample"
    for epoch, images in [(0, run["base"]), *run["epochs"].items()]:
        for index, image in enumerate(images):
            save(image, sample / f"tiny_e{epoch:06d}_{index:02d}_20260216120000_{7 + index}.png")
    # a rerun left an older sample of epoch 2 prompt 0: the newer timestamp wins
    save(run["epochs"][1][0], sample / "tiny_e000002_00_20260101000000_7.png")
    result = run_json(capsys, "epochs", str(tmp_path / "output"))  # the kohya output dir: sample/ is found
    monitor = monitor_choice(run["spec"], run["base"], run["epochs"], tmp_path)
    assert result["best"]["epoch"] == monitor.best_epoch
    by_epoch = {c["epoch"]: c for c in result["candidates"]}
    assert sorted(by_epoch) == list(EPOCHS)
    for entry in monitor.policy.history:
        assert by_epoch[entry.epoch]["aggregates"] == pytest.approx(entry.aggregates, abs=0)
    assert any("epoch-0 samples" in note for note in result["notes"])
    assert any("replaces" in note for note in result["notes"])


@pytest.mark.parametrize("controls", ["per-epoch", "single"])
def test_older_epoch_layout_follows_their_rule(run, tmp_path, capsys, controls):
    folder = tmp_path / "old"
    for epoch, images in run["epochs"].items():
        save(images[0], folder / f"epoch_{epoch:02d}.png")
        if controls == "per-epoch":
            save(run["base"][0], folder / f"control_{epoch:02d}.png")
    if controls == "single":
        save(run["base"][0], folder / "control.png")
    values = {epoch: brisque_of(folder / f"epoch_{epoch:02d}.png") for epoch in EPOCHS}
    best = min(values, key=values.get)
    shutil.copy(folder / f"epoch_{best:02d}.png", folder / "epoch_04.png")  # an exact tie, later
    if controls == "per-epoch":
        shutil.copy(folder / "control_01.png", folder / "control_04.png")
    values[4] = values[best]
    result = run_json(capsys, "epochs", str(folder), "--min-delta", "0.01")
    assert result["best"]["epoch"] == old_rule(values) == best
    assert {c["epoch"]: c["aggregates"]["brisque"] for c in result["candidates"]} == pytest.approx(values, abs=1e-9)
    assert "ssim" in result["metrics"]


def test_near_tie_within_min_delta_goes_to_the_earlier_epoch(run, tmp_path, capsys):
    """A later epoch better by less than 0.01 does not win, as in the older tools."""
    folder = tmp_path / "near"
    save(run["epochs"][3][0], folder / "epoch_01.png")
    first = brisque_of(folder / "epoch_01.png")
    image = posthoc.read_image(folder / "epoch_01.png")
    found = None
    for position in range(200):  # nudge one pixel by one level until BRISQUE drops by a hair
        y, x, c = (position * 7) % 64, (position * 13) % 64, position % 3
        candidate = image.clone()
        candidate[c, y, x] = min(1.0, candidate[c, y, x] + 1 / 255) if candidate[c, y, x] < 0.5 else candidate[c, y, x] - 1 / 255
        save(candidate, folder / "epoch_02.png")
        value = brisque_of(folder / "epoch_02.png")
        if first - 0.01 < value < first:
            found = value
            break
    assert found is not None, "no one-pixel change lowered BRISQUE by less than 0.01"
    assert old_rule({1: first, 2: found}) == 1
    assert run_json(capsys, "epochs", str(folder), "--min-delta", "0.01")["best"]["epoch"] == 1
    assert run_json(capsys, "epochs", str(folder))["best"]["epoch"] == 2  # min_delta 0: strictly lower wins


def test_min_delta_is_sequential_not_a_global_tolerance():
    """Documented difference: with a chain of near-ties the policy (like the in-training monitor) decides online."""
    policy = BestEpochPolicy("brisque", higher_is_better=False, min_delta=0.01)
    for epoch, value in [(1, 10.0), (2, 9.995), (3, 9.989)]:
        policy.update(epoch, {"brisque": [value]})
    assert policy.best_epoch == 3  # beats the best so far (epoch 1) by 0.011
    assert old_rule({1: 10.0, 2: 9.995, 3: 9.989}) == 2  # a global "within 0.01 of the lowest" rule differs


def test_older_strength_layout_follows_their_rule(run, tmp_path, capsys):
    folder = tmp_path / "strength"
    pipe, renderer, spec = run["pipe"], run["renderer"], run["spec"]
    strengths = [0.25, 0.5, 1.0]
    for strength in strengths:
        with posthoc.lora_scale([pipe.unet], strength):
            save(renderer.render(spec, [0])[0], folder / f"strength_{strength}.png")
    save(run["base"][0], folder / "control_base.png")
    values = {s: brisque_of(folder / f"strength_{s}.png") for s in strengths}
    best = min(values, key=values.get)
    shutil.copy(folder / f"strength_{best}.png", folder / "strength_1.5.png")
    values[1.5] = values[best]
    result = run_json(capsys, "strength", str(folder), "--min-delta", "0.01")
    assert result["best"]["strength"] == old_rule(values) == best
    assert result["references"] == [str(folder / "control_base.png")]
    assert "strength" in result["explanation"].lower()


def test_user_pattern_and_reference_folder(run, tmp_path, capsys):
    folder, refs = tmp_path / "mine", tmp_path / "refs"
    for epoch, images in run["epochs"].items():
        for index, image in enumerate(images):
            save(image, folder / f"lora_ep{epoch}_p{index}.png")
    for index, image in enumerate(run["base"]):
        save(image, refs / f"base_{index}.png")
    result = run_json(capsys, "epochs", str(folder), "--pattern", "lora_ep{epoch}_p{prompt}.png", "--references", str(refs), "--prompts", str(_prompt_file(tmp_path)))
    monitor = monitor_choice(run["spec"], run["base"], run["epochs"], tmp_path)
    assert result["best"]["epoch"] == monitor.best_epoch
    assert result["prompts"] == PROMPTS


def _prompt_file(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(f"{text} --d {7 + i} --s 2 --w 64 --h 64" for i, text in enumerate(PROMPTS)) + "\n", encoding="utf-8")
    return path


def test_table_csv_and_progress(run, tmp_path, capsys):
    folder = tmp_path / "old"
    for epoch, images in run["epochs"].items():
        save(images[0], folder / f"epoch_{epoch:02d}.png")
    assert main(["epochs", str(folder), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "brisque_mean" in out and "*" in out and "Best: epoch" in out
    assert main(["epochs", str(folder), "--csv", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("epoch,strength,prompt_index,prompt,file,brisque")
    assert len(lines) == 1 + len(EPOCHS)
    found = posthoc.collect_images(folder, "epochs")
    scorers, _ = posthoc.make_scorers(["brisque"], False, "brisque")
    posthoc.analyse("epochs", found.candidates, None, scorers, posthoc.build_policy(scorers, "brisque"), prompts=found.prompts, progress=True)
    assert "scoring" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- checkpoints


def test_kohya_checkpoints_render_and_rank_like_the_monitor(run, tmp_path, capsys):
    argv = ["epochs", str(run["checkpoints"]), "--base", run["model"], "--prompts", str(_prompt_file(tmp_path))]
    result = run_json(capsys, *argv)
    monitor = monitor_choice(run["spec"], run["base"], run["epochs"], tmp_path)
    assert result["best"]["epoch"] == monitor.best_epoch
    by_epoch = {c["epoch"]: c for c in result["candidates"]}
    assert sorted(by_epoch) == list(EPOCHS)  # the unnumbered final file took its epoch from ss_epoch
    for entry in monitor.policy.history:
        assert by_epoch[entry.epoch]["aggregates"]["brisque"] == pytest.approx(entry.aggregates["brisque"], abs=1e-3)
        assert by_epoch[entry.epoch]["aggregates"]["ssim"] == pytest.approx(entry.aggregates["ssim"], abs=1e-4)


def test_diffusers_lora_folders(run, tmp_path, capsys):
    from lora_monitor.export import diffusers_lora_writer

    pipe = run["pipe"]
    folders = tmp_path / "best"
    for epoch in (1, 3):  # the fixture's LoRA is at epoch 3; write it under two names, both load
        target = folders / f"epoch-{epoch:04d}"
        target.mkdir(parents=True)
        diffusers_lora_writer(pipe.unet)(target)
    result = run_json(capsys, "epochs", str(folders), "--base", run["model"], "--prompts", str(_prompt_file(tmp_path)), "--metrics", "brisque")
    values = [c["aggregates"]["brisque"] for c in result["candidates"]]
    assert [c["epoch"] for c in result["candidates"]] == [1, 3]
    assert values[0] == pytest.approx(values[1], abs=1e-9)
    assert result["best"]["epoch"] == 1  # an exact tie goes to the earlier epoch


def test_strength_sweep_matches_diffusers_lora_scale(run, tmp_path):
    """Our scale is diffusers' scale: pipeline(..., cross_attention_kwargs={'scale': s}); 0 is the base model."""
    import argparse

    from lora_monitor.cli.posthoc import analyse_args, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["strength", str(run["checkpoints"] / "tiny.safetensors"), "--base", run["model"], "--prompts", str(_prompt_file(tmp_path)),
         "--strengths", "0,0.5,1", "--no-progress"]
    )
    analysis = analyse_args(args)
    assert [r.candidate.strength for r in analysis.results] == [0.0, 0.5, 1.0]
    assert all(r.candidate.epoch is None for r in analysis.results)
    pipe, spec = run["pipe"], run["spec"]  # the in-memory LoRA is epoch 3, the file's weights
    for result in analysis.results:  # the same batch as the renderer's: both prompts, one generator each
        expected = pipe(
            [p.prompt for p in spec.prompts], num_inference_steps=2, guidance_scale=run["renderer"].cfg_scale(spec.prompts[0]), width=64, height=64,
            generator=[torch.Generator().manual_seed(p.seed) for p in spec.prompts], output_type="pt",
            cross_attention_kwargs={"scale": result.candidate.strength},
        ).images
        for image, want in zip(result.candidate.images, expected):
            assert torch.allclose(image, want, atol=1e-5), (result.candidate.strength, (image - want).abs().max())
    assert torch.allclose(analysis.results[0].candidate.images[0], run["base"][0], atol=1e-5)


def test_grid_ranks_epoch_strength_pairs(run, tmp_path, capsys):
    result = run_json(
        capsys, "grid", str(run["checkpoints"]), "--base", run["model"], "--prompt", PROMPTS[0], "--steps", "2", "--size", "64",
        "--seed", "7", "--strengths", "0.5,1", "--metrics", "brisque",
    )
    pairs = [(c["epoch"], c["strength"]) for c in result["candidates"]]
    assert pairs == [(e, s) for e in EPOCHS for s in (0.5, 1.0)]
    policy = BestEpochPolicy("brisque", higher_is_better=False)
    for position, candidate in enumerate(result["candidates"]):
        policy.update(position, {"brisque": candidate["scores"]["brisque"]})
    assert pairs[policy.best_epoch] == (result["best"]["epoch"], result["best"]["strength"])


# ----------------------------------------------------------------------------------------- bad input


def test_empty_folder_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["epochs", str(tmp_path / "empty"), "--no-progress"]) == 2
    assert "no image files" in capsys.readouterr().err


def test_unnamed_images_say_what_was_looked_for(run, tmp_path, capsys):
    save(run["base"][0], tmp_path / "imgs" / "whatever.png")
    assert main(["epochs", str(tmp_path / "imgs"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "epoch_01.png" in err and "--pattern" in err


def test_mixed_sizes_are_resized_and_listed(run, tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "mixed"
    for epoch, images in run["epochs"].items():
        save(images[0], folder / f"epoch_{epoch:02d}.png")
    Image.open(folder / "epoch_02.png").resize((80, 72)).save(folder / "epoch_02.png")
    save(run["base"][0], folder / "control.png")
    result = run_json(capsys, "epochs", str(folder))
    assert any("resized" in note and "epoch_02.png" in note and "80x72 to 64x64" in note for note in result["notes"])
    assert len(result["candidates"]) == 3


def test_unreadable_and_truncated_images_are_skipped_and_listed(run, tmp_path, capsys):
    folder = tmp_path / "broken"
    for epoch, images in run["epochs"].items():
        save(images[0], folder / f"epoch_{epoch:02d}.png")
    data = (folder / "epoch_02.png").read_bytes()
    (folder / "epoch_02.png").write_bytes(data[: len(data) // 2])  # truncated
    (folder / "epoch_04.png").write_bytes(b"not an image at all")
    assert main(["epochs", str(folder), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "skipped" in out and "epoch_02.png" in out and "epoch_04.png" in out
    result = run_json(capsys, "epochs", str(folder))
    assert [c["epoch"] for c in result["candidates"]] == [1, 3]
    assert {s["file"] for s in result["skipped"]} >= {str(folder / "epoch_02.png"), str(folder / "epoch_04.png"), "epoch 2", "epoch 4"}


def test_pickle_checkpoints_need_the_flag_and_load_weights_only(run, tmp_path, capsys):
    folder = tmp_path / "pickles"
    folder.mkdir()
    torch.save(run_checkpoint(run), folder / "tiny-000001.pt")
    argv = ["epochs", str(folder), "--base", run["model"], "--prompts", str(_prompt_file(tmp_path)), "--metrics", "brisque", "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "pickle" in err and "--allow-pickle" in err
    assert main([*argv, "--allow-pickle", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["best"]["epoch"] == 1

    torch.save({"payload": NotWeights()}, folder / "tiny-000001.pt")
    assert main([*argv, "--allow-pickle"]) == 2
    assert "cannot be loaded" in capsys.readouterr().err


def test_a_checkpoint_without_tensors_is_skipped_and_named_not_ranked_as_the_base(run, tmp_path, capsys):
    """A metadata-only .safetensors loads as no LoRA at all: ranked, it would score exactly like the base model."""
    from safetensors.torch import save_file

    folder = tmp_path / "with-empty"
    folder.mkdir()
    shutil.copy(run["checkpoints"] / "tiny-000001.safetensors", folder)
    empty = folder / "tiny-000002.safetensors"
    save_file({}, str(empty), metadata={"ss_epoch": "2", "ss_network_dim": "4"})
    argv = ["epochs", str(folder), "--base", run["model"], "--prompts", str(_prompt_file(tmp_path)), "--metrics", "brisque"]
    result = run_json(capsys, *argv)
    assert [c["epoch"] for c in result["candidates"]] == [1]
    assert result["skipped"] == [{"file": str(empty), "reason": "holds no tensors (only 2 metadata entries): not a LoRA checkpoint, "
                                                               "it would render as the base model"}]
    assert main([*argv, "--no-progress"]) == 0
    assert f"skipped {empty}: holds no tensors" in capsys.readouterr().out

    # the only checkpoint given: an error that names it, before the base model is loaded
    argv = ["strength", str(empty), "--base", str(tmp_path / "no-model"), "--prompts", str(_prompt_file(tmp_path)), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "lora-monitor strength: error: no LoRA checkpoints found" in err and f"{empty}: holds no tensors" in err

    # a diffusers LoRA folder whose weights file is empty, and an empty pickle, say the same
    lora_folder = tmp_path / "epoch-0003"
    lora_folder.mkdir()
    save_file({}, str(lora_folder / posthoc.DIFFUSERS_LORA_FILE))
    _, skipped = posthoc.find_checkpoints([folder, lora_folder])
    assert (str(lora_folder), f"its {posthoc.DIFFUSERS_LORA_FILE} holds no tensors (nothing at all): not a LoRA "
                                          "checkpoint, it would render as the base model") in skipped
    torch.save({}, tmp_path / "tiny-000004.pt")
    pickled = posthoc.Checkpoint(tmp_path / "tiny-000004.pt", 4, "pickle")
    with pytest.raises(posthoc.PosthocError, match=r"tiny-000004.pt: holds no tensors"):
        posthoc.load_lora_state_dict(pickled)


class NotWeights:
    """Anything but tensors and plain containers is refused by torch.load(weights_only=True)."""


def run_checkpoint(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run["checkpoints"] / "tiny-000001.safetensors"))


def test_help_states_the_resize_rule(capsys):
    for command in ("epochs", "strength", "grid"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "resized to that size with Lanczos" in text
        assert "--allow-pickle" in text and "--report" in text


def test_strengths_parse():
    assert posthoc.parse_strengths("0:1.5:0.1")[-1] == 1.5 and len(posthoc.parse_strengths("0:1.5:0.1")) == 16
    assert posthoc.parse_strengths("1,0.5, 0") == [0.0, 0.5, 1.0]
    for bad in ("1:0:0.1", "0:1:0", "a,b", ""):
        with pytest.raises(ValueError, match="--strengths"):
            posthoc.parse_strengths(bad)
    assert not math.isnan(posthoc.parse_strengths("0.3")[0])


# ----------------------------------------------------------------------------------------- step-based runs


def _tiny_lora_file(path, **metadata) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, str(path), metadata={k: str(v) for k, v in metadata.items()} or None)


def _diffusers_folder(path, sidecar=None) -> None:
    _tiny_lora_file(path / posthoc.DIFFUSERS_LORA_FILE)
    if sidecar is not None:
        (path / "lora_monitor.json").write_text(json.dumps(sidecar), encoding="utf-8")


def test_step_keyed_checkpoints_are_found_as_steps(tmp_path):
    """The monitor's step-based exports (sidecar "unit": "step", where "epoch" holds the step; top_k/step-0020)
    and kohya's name-step00000010 files are steps, not epochs; the final kohya file of such a run takes ss_steps."""
    exports = tmp_path / "exports"
    _diffusers_folder(exports / "best", {"epoch": 30, "unit": "step", "step": 30})
    _diffusers_folder(exports / "step-0020")  # no sidecar: the folder name says step
    _diffusers_folder(exports / "other", {"unit": "step", "step": 10})  # no "epoch" key: its step
    found, _ = posthoc.find_checkpoints([exports])
    assert [(c.epoch, c.unit) for c in found] == [(10, "step"), (20, "step"), (30, "step")]

    kohya = tmp_path / "kohya"
    _tiny_lora_file(kohya / "tiny-step00000010.safetensors", ss_epoch=1, ss_steps=10)
    _tiny_lora_file(kohya / "tiny-step00000020.safetensors", ss_epoch=1, ss_steps=20)
    _tiny_lora_file(kohya / "tiny.safetensors", ss_epoch=2, ss_steps=25)
    found, _ = posthoc.find_checkpoints([kohya])
    assert [(c.path.name, c.epoch, c.unit) for c in found] == [
        ("tiny-step00000010.safetensors", 10, "step"), ("tiny-step00000020.safetensors", 20, "step"), ("tiny.safetensors", 25, "step"),
    ]
    epochs = tmp_path / "epochs"
    _diffusers_folder(epochs / "epoch-0003")
    _diffusers_folder(epochs / "best", {"epoch": 5, "unit": "epoch"})
    _diffusers_folder(epochs / "old", {"epoch": 4})  # sidecars written before step-based runs
    found, _ = posthoc.find_checkpoints([epochs])
    assert [(c.epoch, c.unit) for c in found] == [(3, "epoch"), (4, "epoch"), (5, "epoch")]


def test_epochs_and_steps_are_not_ranked_together(tmp_path):
    folder = tmp_path / "mixed"
    _tiny_lora_file(folder / "tiny-000001.safetensors")
    _tiny_lora_file(folder / "tiny-step00000500.safetensors")
    with pytest.raises(posthoc.PosthocError, match=r"epoch checkpoints \(tiny-000001.safetensors\) and step checkpoints "
                                                   r"\(tiny-step00000500.safetensors\) cannot be ranked together"):
        posthoc.find_checkpoints([folder])
    found, _ = posthoc.find_checkpoints([folder / "tiny-step00000500.safetensors"])  # the files of one kind
    assert [(c.epoch, c.unit) for c in found] == [(500, "step")]


def test_step_candidates_are_labelled_and_reported_as_steps(run, tmp_path):
    """Labels, the policy's sentences, the table and the report say "step N" for a step-based run."""
    from lora_monitor.posthoc.tables import table, to_csv
    from lora_monitor.report import write_report

    candidates = [posthoc.Candidate(step, None, images, [None] * len(images), unit="step") for step, images in zip((10, 20, 30), run["epochs"].values())]
    scorers, _ = posthoc.make_scorers(["brisque", "ssim"], True, "brisque")
    policy = posthoc.build_policy(scorers, "brisque", unit="step")
    analysis = posthoc.analyse("epochs", candidates, run["base"], scorers, policy, prompts=PROMPTS)
    assert [r.candidate.label for r in analysis.results] == ["step 10", "step 20", "step 30"]
    assert analysis.unit == "step" and analysis.to_dict()["unit"] == "step"
    assert "epoch" not in analysis.explanation() and f"Best: step {analysis.best.candidate.epoch}" in analysis.explanation()
    assert table(analysis).lstrip().startswith("step") and to_csv(analysis).startswith("step,strength,")
    html = (write_report(analysis, tmp_path / "report")).read_text(encoding="utf-8")
    assert "which step?" in html and "the earlier step" in html and "step 20" in html
    with pytest.raises(posthoc.PosthocError, match="by epoch and by step cannot be ranked together"):
        posthoc.analyse("epochs", [*candidates[:2], posthoc.Candidate(40, None, run["base"], [None, None])], None, scorers[:1],
                        posthoc.build_policy(scorers[:1], "brisque"), prompts=PROMPTS)
