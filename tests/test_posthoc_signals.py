"""Post-hoc `epochs` with the embedding signals (likeness, adherence, diversity, memorization) on tiny random-weight
CLIP and DINOv2 folders: presets, bounds relative to the base model's values, seeds from file names and from
--seeds-per-prompt, the JSON/CSV/table/report outputs, and bad input refused before anything is rendered."""
from __future__ import annotations

import contextlib
import csv
import html
import io
import json
import math
import re

import pytest
import torch
from conftest import shape_image

from conftest import nudge_lora
from lora_monitor.monitor import quantize
from lora_monitor.cli import main
from lora_monitor.record import read_image, save_png_atomic
from lora_monitor.scoring import get_scorer
from lora_monitor.scoring.signals import SignalOptions

PATTERN = "ep{epoch}_p{prompt}_s{seed}.png"
PROMPTS = ["a photo of sks toy on a table", "sks toy, watercolour painting"]
SEEDS = (1, 2)
SIGNALS = ["likeness", "adherence", "diversity", "memorization"]


def picture(kind: str, *, shift: int = 0, seed: int = 0, size: int = 64) -> torch.Tensor:
    """A shape on a smooth random background (conftest.shape_image)."""
    return shape_image(kind, size=size, shift=shift, seed=seed)


@pytest.fixture(scope="module")
def likeness_run(tmp_path_factory, tiny_embedders):
    """Training images (discs), base images (squares and stripes, two seeds a prompt) and three epochs:
    1 still the base's shapes, 2 a disc and a base shape per prompt, 3 a copy of one training image for every seed
    (the highest likeness, no variety left)."""
    root = tmp_path_factory.mktemp("likeness")
    refs, base, images = root / "refs", root / "base", root / "images"
    training = [picture("disc", shift=shift, seed=100 + index) for index, shift in enumerate((-4, 0, 4))]
    for index, image in enumerate(training):
        save_png_atomic(quantize(image), refs / f"train_{index}.png")
    shapes = {0: ("square", "stripe"), 1: ("stripe", "square")}
    for prompt in (0, 1):
        for position, seed in enumerate(SEEDS):
            kind = shapes[prompt][position]
            save_png_atomic(quantize(picture(kind, seed=10 * prompt + seed)), base / f"ep0_p{prompt}_s{seed}.png")
            save_png_atomic(quantize(picture(kind, shift=3, seed=20 + 10 * prompt + seed)), images / f"ep1_p{prompt}_s{seed}.png")
            second = "disc" if position == 0 else kind
            save_png_atomic(quantize(picture(second, shift=6, seed=40 + 10 * prompt + seed)), images / f"ep2_p{prompt}_s{seed}.png")
            save_png_atomic(quantize(training[1]), images / f"ep3_p{prompt}_s{seed}.png")
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    argv = [
        "epochs", str(images), "--pattern", PATTERN, "--references", str(base), "--refs", str(refs), "--prompts", str(prompts),
        "--clip-model", tiny_embedders["clip"], "--dino-model", tiny_embedders["dino"], "--device", "cpu", "--strip-words", "sks",
        "--no-progress",
    ]
    return {"root": root, "refs": refs, "base": base, "images": images, "argv": argv, "models": tiny_embedders}


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def preset_result(likeness_run, tmp_path_factory):
    """`epochs --preset likeness --json --report` on the likeness run, once for the tests that read it."""
    report = tmp_path_factory.mktemp("likeness-report")
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        code = main([*likeness_run["argv"], "--preset", "likeness", "--json", "--report", str(report)])
    assert code == 0
    return json.loads(capture.getvalue()), (report / "index.html").read_text(encoding="utf-8")


def test_likeness_preset_excludes_the_copying_epoch_by_its_relative_diversity_bound(preset_result):
    """Epoch 3 copies a training image for every seed: the most alike, and no variety left. The preset's bound
    diversity >= 0.8x base keeps it out; the best is the most alike of the epochs within both bounds."""
    result, _ = preset_result
    for name in SIGNALS:
        assert name in result["metrics"]
    by_epoch = {c["epoch"]: c for c in result["candidates"]}
    assert sorted(by_epoch) == [1, 2, 3]
    likeness = {epoch: c["aggregates"]["likeness"] for epoch, c in by_epoch.items()}
    assert max(likeness, key=likeness.get) == 3  # the copy of a training image is the most alike ...
    assert by_epoch[3]["aggregates"]["memorization"] == pytest.approx(1.0, abs=1e-4)  # ... because it is one
    assert by_epoch[3]["aggregates"]["diversity"] == pytest.approx(0.0, abs=1e-6)  # and every seed gives it
    base = result["base"]["aggregates"]
    assert base["diversity"] > 0 and set(SIGNALS) <= set(base)
    assert base["ssim"] == pytest.approx(1.0)  # the base compared with itself, as the monitor measures it
    limit = 0.8 * base["diversity"]  # a positive base: 0.8x is 0.8 times it
    assert not by_epoch[3]["eligible"]
    assert re.search(rf"diversity \(mean\) \S+ is below the lower bound 0\.8x base \({base['diversity']:.6g}\) = {limit:.6g}", by_epoch[3]["note"])
    best = result["best"]["epoch"]
    assert best != 3 and by_epoch[best]["eligible"] and by_epoch[best]["aggregates"]["diversity"] >= limit
    assert best == max((e for e, c in by_epoch.items() if c["eligible"]), key=likeness.get)
    assert result["preset"] == "likeness" and result["rule"].startswith("best = highest mean likeness")
    assert set(result["bounds"]) == {"adherence", "diversity"} and result["bounds"]["diversity"].startswith("diversity >= 0.8x base (")
    # seeds come from the {seed} of the file names; previews with the same prompt text are one group
    assert result["seeds"] == [1, 2, 1, 2] and result["groups"] == [0, 0, 1, 1]
    assert result["prompts"] == [PROMPTS[0], PROMPTS[0], PROMPTS[1], PROMPTS[1]]


def test_reported_scores_are_the_scorers_on_the_files(likeness_run, preset_result):
    """The per-preview numbers are the registered scorers on the 8-bit files: likeness and memorization against the
    --refs images, adherence with the prompt text minus the trigger word, diversity over each prompt's seeds."""
    result, _ = preset_result
    models = likeness_run["models"]
    options = SignalOptions(references=str(likeness_run["refs"]), clip_model=models["clip"], dino_model=models["dino"], device="cpu", strip_words=("sks",))
    candidate = next(c for c in result["candidates"] if c["epoch"] == 2)
    images = torch.stack([read_image(path) for path in candidate["files"]])
    for name in ("likeness", "memorization"):
        expected = get_scorer(name, options=options)(images)
        assert candidate["scores"][name] == pytest.approx(expected.tolist(), abs=1e-5), name
    adherence = get_scorer("adherence", options=options)(images, prompts=result["prompts"])
    assert candidate["scores"]["adherence"] == pytest.approx(adherence.tolist(), abs=1e-5)
    diversity = get_scorer("diversity", options=options).score_set(list(images), [0, 0, 1, 1])
    assert candidate["scores"]["diversity"] == pytest.approx(diversity, abs=1e-5)
    assert diversity[0] != pytest.approx(diversity[2])  # two groups, two values: not one over all four


def test_report_states_the_rule_and_the_base_values(preset_result):
    result, page = preset_result
    from lora_monitor.policy import get_preset

    assert html.escape(get_preset("likeness").rule, quote=True) in page
    for text in result["bounds"].values():  # resolved against the base: "diversity >= 0.8x base (0.1) = 0.08"
        assert html.escape(text, quote=True) in page
    assert "base model" in page and f"diversity {result['base']['aggregates']['diversity']:.4g}" in page
    assert "seed 2" in page  # the contact sheet tells a prompt's seeds apart


def test_csv_and_table_carry_the_signals_and_the_base(likeness_run, preset_result, capsys):
    code, out, err = run_cli(capsys, *likeness_run["argv"], "--preset", "likeness", "--csv")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    for name in SIGNALS:
        assert name in rows[0] and f"{name}_mean" in rows[0]
    base = [row for row in rows if row["epoch"] == "base"]
    assert len(base) == 4 and len(rows) == 4 + 3 * 4
    assert [row["seed"] for row in base] == ["1", "2", "1", "2"] and [row["group"] for row in base] == ["0", "0", "1", "1"]
    epoch3 = [row for row in rows if row["epoch"] == "3"]
    assert all(float(row["memorization"]) == pytest.approx(1.0, abs=1e-4) for row in epoch3)
    best = str(preset_result[0]["best"]["epoch"])
    assert {row["epoch"] for row in rows if row["is_best"] == "1"} == {best}
    code, out, err = run_cli(capsys, *likeness_run["argv"], "--preset", "likeness")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:5] == ["epoch", "likeness_mean", "adherence_mean", "diversity_mean", "memorization_mean"]
    assert lines[2].split()[0] == "base" and "Rule: best = highest mean likeness" in out


def test_a_relative_adherence_bound_excludes_the_most_alike_epoch(likeness_run, preset_result, capsys):
    """--bound adherence=1x: (at least the base model's adherence), the diversity bound opened (diversity=0:): the
    most alike epoch follows its prompts less than the base model does, so only adherence keeps it out; the reason
    names the bound with its resolved value and the best is the most alike epoch that keeps the base's adherence."""
    result, _ = preset_result
    base = result["base"]["aggregates"]["adherence"]
    adherence = {c["epoch"]: c["aggregates"]["adherence"] for c in result["candidates"]}
    likeness = {c["epoch"]: c["aggregates"]["likeness"] for c in result["candidates"]}
    assert adherence[3] < base <= adherence[1]  # what the images give with the tiny CLIP: the case this test needs
    code, out, err = run_cli(capsys, *likeness_run["argv"], "--preset", "likeness", "--bound", "adherence=1x:", "--bound", "diversity=0:", "--json")
    assert code == 0, err
    chosen = json.loads(out)
    epoch3 = next(c for c in chosen["candidates"] if c["epoch"] == 3)
    assert not epoch3["eligible"] and epoch3["note"].startswith(f"adherence (mean) {adherence[3]:.6g} is below the lower bound 1x base")
    assert "diversity" not in epoch3["note"]
    keeping = [epoch for epoch, value in adherence.items() if value >= base]
    assert chosen["best"]["epoch"] == max(keeping, key=likeness.get) != 3
    assert "epoch 3: adherence (mean)" in chosen["explanation"].split("Not eligible: ")[1]
    assert not chosen["rule"].startswith("best = highest mean likeness (DINOv2")  # no longer the preset's rule ...
    assert "adherence >= 1x base" in chosen["rule"] and "diversity >= 0" in chosen["rule"]  # ... but its bounds in words


def test_groups_from_repeated_prompt_lines_of_kohya_samples(likeness_run, tmp_path, capsys):
    """kohya names one seed per prompt line: lines with the same text are one prompt's seeds; epoch 0 is the base."""
    sample = tmp_path / "sample"
    for epoch in (0, 1, 2):
        for index in range(4):
            image = picture(("square", "stripe", "disc", "square")[index], shift=epoch, seed=10 * epoch + index)
            save_png_atomic(quantize(image), sample / f"run_e{epoch:06d}_{index:02d}_20260101000000_{index}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"{PROMPTS[index // 2]} --d {index}\n" for index in range(4)), encoding="utf-8")
    models = likeness_run["models"]
    code, out, err = run_cli(
        capsys, "epochs", str(sample), "--prompts", str(prompts), "--metrics", "diversity,brisque", "--metric", "brisque",
        "--bound", "diversity=0.5x:", "--dino-model", models["dino"], "--device", "cpu", "--json", "--no-progress",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["groups"] == [0, 0, 1, 1]
    assert math.isfinite(result["base"]["aggregates"]["diversity"]) and result["base"]["aggregates"]["diversity"] > 0
    for candidate in result["candidates"]:
        values = candidate["scores"]["diversity"]
        assert values[0] == values[1] and values[2] == values[3] and values[0] != values[2]


# ----------------------------------------------------------------------------------------- rendering with --base


def test_seeds_per_prompt_renders_each_prompt_under_several_seeds(pipeline, tiny_model, likeness_run, tmp_path):
    """--base with --seeds-per-prompt 2: every prompt twice with its own seed, one diversity group per prompt, the base
    renders scored the same way (its diversity is the base of the relative bound)."""
    import argparse

    from lora_monitor.export import diffusers_lora_writer
    from lora_monitor.cli.posthoc import analyse_args, register

    for epoch in (1, 2):
        nudge_lora(pipeline.unet, seed=epoch, scale=0.4)
        target = tmp_path / "loras" / f"epoch-{epoch:04d}"
        target.mkdir(parents=True)
        diffusers_lora_writer(pipeline.unet)(target)
    models = likeness_run["models"]
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args([
        "epochs", str(tmp_path / "loras"), "--base", tiny_model, "--prompt", "a red circle", "--prompt", "a blue square",
        "--steps", "2", "--size", "64", "--seed", "7", "--seeds-per-prompt", "2", "--metrics", "likeness,diversity,memorization",
        "--metric", "likeness", "--bound", "diversity=0.5x:", "--refs", str(likeness_run["refs"]), "--dino-model", models["dino"],
        "--clip-model", models["clip"], "--device", "cpu", "--no-progress",
    ])
    analysis = analyse_args(args)
    assert analysis.prompts == ["a red circle", "a red circle", "a blue square", "a blue square"]
    assert analysis.groups == [0, 0, 1, 1] and analysis.seeds == [7, 8, 9, 10]
    assert not torch.equal(analysis.references[0], analysis.references[1])  # two seeds, two base renders
    diversity = get_scorer("diversity", options=SignalOptions(dino_model=models["dino"], device="cpu"))
    base = diversity.score_set(analysis.references, analysis.groups)
    assert analysis.base_scores["diversity"] == pytest.approx(base, abs=1e-6)
    assert analysis.policy.base["diversity"] == pytest.approx(sum(base) / 4, abs=1e-6)
    for result in analysis.results:
        images = [quantize(image) for image in result.candidate.images]
        assert result.scores["diversity"] == pytest.approx(diversity.score_set(images, analysis.groups), abs=1e-6)
        assert result.eligible == (result.aggregates["diversity"] >= 0.5 * analysis.policy.base["diversity"])


# ----------------------------------------------------------------------------------------- bad input, before rendering


def _refused(capsys, *argv) -> str:
    code, _, err = run_cli(capsys, *argv)
    assert code == 2, err
    return err


def test_missing_refs_folder_is_refused_before_rendering(likeness_run, tmp_path, capsys):
    """The --refs errors come before the (absent) base model is even looked at: nothing is rendered first."""
    render = ["epochs", str(tmp_path), "--base", str(tmp_path / "no-such-model"), "--prompt", "a toy", "--seeds-per-prompt", "2",
              "--preset", "likeness", "--no-progress"]
    err = _refused(capsys, *render, "--refs", str(tmp_path / "missing"))
    assert "--refs" in err and "missing" in err and "no such folder" in err
    err = _refused(capsys, *render)
    assert "--refs DIR" in err and "likeness" in err
    err = _refused(capsys, *likeness_run["argv"][:-1], "--refs", str(tmp_path / "missing"), "--preset", "likeness", "--no-progress")
    assert "--refs" in err and "no such folder" in err


def test_diversity_without_seeds_names_the_seeds_flag(likeness_run, tmp_path, capsys):
    models = likeness_run["models"]
    err = _refused(
        capsys, "epochs", str(tmp_path), "--base", str(tmp_path / "no-such-model"), "--prompt", "a toy", "--preset", "likeness",
        "--refs", str(likeness_run["refs"]), "--clip-model", models["clip"], "--dino-model", models["dino"], "--device", "cpu", "--no-progress",
    )
    assert "--seeds-per-prompt" in err and "single preview" in err


def test_relative_bound_without_base_images_names_the_fix(likeness_run, capsys):
    argv = [a for a in likeness_run["argv"]]
    at = argv.index("--references")
    del argv[at:at + 2]
    err = _refused(capsys, *argv, "--preset", "likeness")
    assert "relative to the base model" in err and "--references" in err and "--base" in err


def test_base_diversity_from_one_file_for_several_seeds_is_refused(likeness_run, capsys):
    argv = list(likeness_run["argv"])
    argv[argv.index("--references") + 1] = str(next(likeness_run["base"].iterdir()))  # one base image for every preview
    err = _refused(capsys, *argv, "--preset", "likeness")
    assert "base model's diversity" in err and "one base image per prompt and seed" in err


def test_the_loss_preset_and_val_loss_are_refused_post_hoc(likeness_run, capsys):
    for extra in (["--preset", "loss"], ["--metrics", "val_loss,brisque", "--metric", "val_loss"]):
        err = _refused(capsys, *likeness_run["argv"], *extra)
        assert "validation loss" in err and "in-training monitor" in err


def test_adherence_needs_prompt_text(likeness_run, capsys):
    argv = list(likeness_run["argv"])
    at = argv.index("--prompts")
    del argv[at:at + 2]
    err = _refused(capsys, *argv, "--metrics", "adherence", "--metric", "adherence")
    assert "--prompts" in err and "adherence" in err


def test_metrics_resolve_by_the_one_rule_of_every_command(likeness_run, capsys):
    """As in kohya and watch: without --preset the first of --metrics is monitored, and the monitored and bounded
    metrics join explicit --metrics; a preset's metrics gain what --metric and --bound need."""
    code, out, err = run_cli(capsys, *likeness_run["argv"], "--metrics", "likeness", "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"] == ["likeness"] and json.loads(out)["policy"]["metric"] == "likeness"
    code, out, err = run_cli(capsys, *likeness_run["argv"], "--metrics", "likeness,ssim", "--bound", "brisque=:200", "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"] == ["likeness", "ssim", "brisque"]
    code, out, err = run_cli(capsys, *likeness_run["argv"], "--metric", "memorization", "--bound", "likeness=0.5:", "--json")
    assert code == 0, err
    assert json.loads(out)["metrics"] == ["memorization", "brisque", "ssim", "likeness"]
