"""The kohya launcher and watcher with the embedding signals (likeness, adherence, diversity, memorization) and the
policy presets, on tiny random-weight CLIP and DINOv2 folders (conftest's tiny_embedders).

The watcher reads a kohya-named sample folder of drawn images whose story is known: epoch 3 copies a training image
for every seed (the most alike, and no variety left), which the likeness preset's relative diversity bound must keep
out. The launcher runs the fake sd-scripts checkout (kohya_fake.py), whose samples our tiny SD pipeline renders.
Bad settings are refused with exit code 2 and a message naming the fix, before anything is trained or scored."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kohya_fake import write_fake_checkout
from lora_monitor.cli import main
from lora_monitor.export import read_sidecar
from lora_monitor.cli import flags
from lora_monitor.integrations import kohya
from lora_monitor.monitor import quantize
from lora_monitor.record import read_scores, save_png_atomic

SIGNALS = ("likeness", "adherence", "diversity", "memorization")
STAMP = "20260216120000"
#: Two prompts, each under two seeds: the same line repeated with another --d, as a kohya user writes it.
PROMPT_LINES = [
    "a photo of sks toy on a table --w 64 --h 64 --s 2 --d 1",
    "a photo of sks toy on a table --w 64 --h 64 --s 2 --d 2",
    "sks toy, watercolour painting --w 64 --h 64 --s 2 --d 1",
    "sks toy, watercolour painting --w 64 --h 64 --s 2 --d 2",
]


def drawing(kind: str, *, shift: int = 0, seed: int = 0, size: int = 64) -> torch.Tensor:
    """A disc, square or stripe on a smooth random background: content the tiny DINOv2 tells apart."""
    generator = torch.Generator().manual_seed(seed)
    background = torch.rand(3, 8, 8, generator=generator)
    image = 0.35 + 0.3 * torch.nn.functional.interpolate(background[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = size / 2 + shift
    masks = {
        "disc": ((y - centre) ** 2 + (x - centre) ** 2 < (size / 3) ** 2, (0.9, 0.1, 0.1)),
        "square": (((y - centre).abs() < size / 4) & ((x - centre).abs() < size / 4), (0.1, 0.1, 0.9)),
        "stripe": ((y - centre).abs() < size / 8, (0.1, 0.8, 0.1)),
    }
    mask, colour = masks[kind]
    for channel, value in enumerate(colour):
        image[channel][mask] = value
    return quantize(image.clamp(0, 1))


@pytest.fixture(scope="module")
def training_images(tmp_path_factory) -> tuple[Path, list[torch.Tensor]]:
    """--refs: three discs."""
    folder = tmp_path_factory.mktemp("refs")
    images = [drawing("disc", shift=shift, seed=100 + index) for index, shift in enumerate((-4, 0, 4))]
    for index, image in enumerate(images):
        save_png_atomic(image, folder / f"train_{index}.png")
    return folder, images


def signal_flags(models: dict[str, str], refs: Path) -> list[str]:
    return ["--refs", str(refs), "--clip-model", models["clip"], "--dino-model", models["dino"], "--strip-words", "sks"]


def expected_best(lines: list[dict], base: dict[str, float]) -> int | None:
    """The likeness preset's choice from the reported values: the highest likeness (earliest on ties) among epochs
    with adherence >= 0.9x and diversity >= 0.8x the base model's (for a negative base b, f x b is b + (f - 1)|b|)."""
    def limit(metric: str, factor: float) -> float:
        return base[metric] + (factor - 1) * abs(base[metric])

    best, best_value = None, -math.inf
    for line in lines:
        values = line["aggregates"]
        eligible = values["adherence"] >= limit("adherence", 0.9) and values["diversity"] >= limit("diversity", 0.8)
        if eligible and values["likeness"] > best_value:
            best, best_value = line["epoch"], values["likeness"]
    return best


# ------------------------------------------------------------------------------------------------ the watcher
def write_epoch(out: Path, epoch: int, images: list[torch.Tensor]) -> None:
    seeds = [int(line.rsplit("--d ", 1)[1]) for line in PROMPT_LINES]
    for index, (image, seed) in enumerate(zip(images, seeds)):
        save_png_atomic(image, out / "sample" / f"mylora_e{epoch:06d}_{index:02d}_{STAMP}_{seed}.png")


def write_network(path: Path, epoch: int) -> None:
    save_file({"lora_up": torch.full((2, 2), float(epoch))}, str(path), metadata={"ss_epoch": str(epoch)})


@pytest.fixture
def watched_run(tmp_path, training_images) -> tuple[Path, Path]:
    """A finished kohya run: epoch-0 samples (the base: squares and stripes, two seeds a prompt), epoch 1 still the
    base's shapes, epoch 2 a disc for one seed of each prompt, epoch 3 a training image for every preview."""
    _, training = training_images
    out = tmp_path / "out"
    (out / "sample").mkdir(parents=True)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPT_LINES) + "\n", encoding="utf-8")
    shapes = ["square", "stripe", "stripe", "square"]  # per preview: prompt 0 seeds 1, 2; prompt 1 seeds 1, 2
    write_epoch(out, 0, [drawing(kind, seed=10 + i) for i, kind in enumerate(shapes)])
    write_epoch(out, 1, [drawing(kind, shift=3, seed=20 + i) for i, kind in enumerate(shapes)])
    write_epoch(out, 2, [drawing("disc" if i % 2 == 0 else kind, shift=6, seed=40 + i) for i, kind in enumerate(shapes)])
    write_epoch(out, 3, [training[1]] * 4)
    for epoch in (1, 2):
        write_network(out / f"mylora-{epoch:06d}.safetensors", epoch)
    write_network(out / "mylora.safetensors", 3)
    return out, prompts


def test_watch_likeness_preset_picks_the_most_alike_epoch_within_the_relative_bounds(watched_run, training_images, tiny_embedders, capsys):
    out, prompts = watched_run
    refs, _ = training_images
    argv = ["watch", str(out), "--prompts", str(prompts), "--once", "--interval", "0.05", "--preset", "likeness"]
    assert main([*argv, *signal_flags(tiny_embedders, refs)]) == 0
    said = capsys.readouterr().out
    lines = read_scores(out)
    assert [line["epoch"] for line in lines] == [1, 2, 3]
    for line in lines:  # every signal of the preset, per preview and aggregated
        assert set(SIGNALS) | {"brisque", "ssim"} <= set(line["aggregates"])
        assert all(len(line["scores"][name]) == 4 for name in SIGNALS)
    base = json.loads((out / "base_scores.json").read_text())["aggregates"]
    assert set(SIGNALS) <= set(base) and base["diversity"] > 0
    likeness = {line["epoch"]: line["aggregates"]["likeness"] for line in lines}
    epoch3 = lines[2]["aggregates"]
    # epoch 3 is a training image under every seed: the most alike, a copy (memorization 1), and no variety left ...
    assert max(likeness, key=likeness.get) == 3
    assert epoch3["memorization"] == pytest.approx(1.0, abs=1e-4) and epoch3["diversity"] == pytest.approx(0.0, abs=1e-6)
    # ... so the relative diversity bound keeps it out, and the best is the most alike epoch within both bounds
    best = expected_best(lines, base)
    assert best in (1, 2)
    assert not lines[2]["is_best"] and "diversity (mean)" in lines[2]["reason"] and "0.8x base" in lines[2]["reason"]
    assert lines[-1]["best_epoch"] == best and read_sidecar(out / "best")["epoch"] == best
    assert (out / "best" / f"mylora-{best:06d}.safetensors").is_file()
    # what the watcher says: the base model's values and the bounds they resolve, every signal of each epoch
    assert "base model (LoRA off): " in said and "diversity >= 0.8x base (" in said and "adherence >= 0.9x base (" in said
    epoch3_line = said.split("lora-monitor watch: epoch 3: ", 1)[1].splitlines()[0]
    assert all(f"{name} " in epoch3_line for name in SIGNALS)
    assert f"best epoch {best} (likeness " in said


def test_watch_refuses_the_loss_preset_missing_refs_and_single_seed_prompts(watched_run, training_images, tiny_embedders, tmp_path, capsys):
    out, prompts = watched_run
    refs, _ = training_images
    watch = ["watch", str(out), "--prompts", str(prompts), "--once", "--interval", "0.05"]

    def refused(*argv: str) -> str:
        assert main([*watch, *argv]) == 2
        return capsys.readouterr().err

    for extra in (["--preset", "loss"], ["--metrics", "brisque", "val_loss"]):
        err = refused(*extra)
        assert "deterministic validation loss" in err and "has no model" in err and "--validation_split" in err and "--preset likeness" in err
    err = refused("--preset", "likeness")
    assert "--refs DIR" in err and "likeness" in err and "--base is the base model's images" in err
    err = refused("--preset", "likeness", "--refs", str(tmp_path / "missing"))
    assert "--refs" in err and "no such folder" in err
    single = tmp_path / "single.txt"  # each prompt once: diversity has nothing to compare
    single.write_text("a photo of sks toy --d 1\nsks toy, watercolour --d 2\n", encoding="utf-8")
    err = refused("--prompts", str(single), "--preset", "likeness", *signal_flags(tiny_embedders, refs))
    assert "single seed" in err and "repeat each such line with another --d" in err and "'a photo of sks toy'" in err
    same = tmp_path / "same.txt"  # repeated with the same seed: the same image twice
    same.write_text("a cat --d 5\na cat --d 5\n", encoding="utf-8")
    err = refused("--prompts", str(same), "--metrics", "diversity", "brisque")
    assert "same seed 5" in err and "another --d" in err
    assert not (out / "scores.jsonl").exists()  # nothing was scored


# ------------------------------------------------------------------------------------------------ the launcher
@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return write_fake_checkout(tmp_path_factory.mktemp("sd-scripts"), scripts=())


def kohya_argv(checkout: Path, tmp_path: Path, model: str, prompts: Path, *monitor: str) -> list[str]:
    return ["kohya", "--sd-scripts", str(checkout), *monitor, "--", "--pretrained_model_name_or_path", model,
            "--output_dir", str(tmp_path / "out"), "--output_name", "mylora", "--sample_prompts", str(prompts),
            "--sample_every_n_epochs", "1", "--save_every_n_epochs", "1"]


def test_launcher_likeness_preset_scores_every_signal_and_logs_them(checkout, tiny_model, training_images, tiny_embedders, tmp_path, capsys):
    """kohya renders one prompt under two seeds (the line repeated with another --d); each epoch gets every signal
    in scores.jsonl, the printed line and kohya's tensorboard tracker, with the base model's values; the best
    epoch is the preset's choice from those values."""
    refs, _ = training_images
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 11\na red circle --w 64 --h 64 --s 2 --d 12\n", encoding="utf-8")
    argv = kohya_argv(checkout, tmp_path, tiny_model, prompts, "--preset", "likeness", *signal_flags(tiny_embedders, refs))
    argv += ["--max_train_epochs", "2", "--fake_schedule", "0.05,1.0", "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs")]
    assert main(argv) == 0
    out = tmp_path / "out"
    said = capsys.readouterr().out
    lines = read_scores(out)
    assert [line["epoch"] for line in lines] == [1, 2]
    for line in lines:
        assert set(SIGNALS) | {"brisque", "ssim"} <= set(line["aggregates"])
        assert all(len(line["scores"][name]) == 2 for name in SIGNALS)
    assert lines[0]["scores"]["diversity"][0] == lines[0]["scores"]["diversity"][1] > 0  # one value for the prompt's seeds
    base = json.loads((out / "base_scores.json").read_text())["aggregates"]
    assert set(SIGNALS) <= set(base)
    best = expected_best(lines, base)
    assert lines[-1]["best_epoch"] == best
    assert (read_sidecar(out / "best")["epoch"] if best is not None else None) == best
    assert "base model (LoRA off): " in said and "diversity >= 0.8x base (" in said
    assert all(f"{name} " in said.split("lora-monitor: epoch 1: ", 1)[1].splitlines()[0] for name in SIGNALS)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    tags = set(accumulator.Tags()["scalars"])
    for name in SIGNALS:
        assert {f"monitor/{name}_mean", f"monitor/base_{name}", f"monitor/{name}/prompt_01"} <= tags


def test_launcher_refuses_bad_signal_settings_before_training(checkout, training_images, tiny_embedders, tmp_path, capsys):
    refs, _ = training_images
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --w 64 --h 64 --s 2 --d 11\na blue square --w 64 --h 64 --s 2 --d 12\n", encoding="utf-8")
    no_model = str(tmp_path / "no-model")  # never loaded: every refusal comes first

    def refused(*monitor: str) -> str:
        assert main(kohya_argv(checkout, tmp_path, no_model, prompts, *monitor)) == 2
        return capsys.readouterr().err

    for extra in (["--preset", "loss"], ["--metrics", "val_loss"], ["--bound", "val_loss=:1"]):
        err = refused(*extra)
        assert "lora-monitor kohya: error: " in err and "deterministic validation loss" in err
        assert "--validation_split" in err and "Python API" in err and "--preset likeness" in err
    err = refused("--preset", "likeness")
    assert "--refs DIR" in err and "likeness, memorization" in err
    err = refused("--metrics", "memorization", "--refs", str(tmp_path / "missing"))
    assert "--refs" in err and "missing: no such folder" in err
    err = refused("--preset", "likeness", *signal_flags(tiny_embedders, refs))
    assert "prompt(s) 0 ('a red circle'), 1 ('a blue square')" in err and "repeat each such line with another --d" in err
    assert not (tmp_path / "out" / "sample").exists()  # nothing was trained or sampled


# ------------------------------------------------------------------------------------------------ the flags
def parse(command: str, *argv: str) -> argparse.Namespace:
    from lora_monitor.cli import build_parser

    parser = build_parser()
    head = ["kohya", "--sd-scripts", "x"] if command == "kohya" else ["watch", "out"]
    return parser.parse_args([*head, *argv])


@pytest.mark.parametrize(
    "argv, metrics, monitor, bounds",
    [
        ([], ("brisque", "ssim"), "brisque", None),  # the default, as before the presets: quality's
        (["--metrics", "ssim"], ("ssim",), "ssim", None),  # without --preset the first of --metrics is monitored
        (["--metrics", "ssim,brisque", "--metric", "likeness"], ("likeness", "ssim", "brisque"), "likeness", None),
        (["--metrics", "ssim", "brisque,likeness"], ("ssim", "brisque", "likeness"), "ssim", None),
        (["--preset", "likeness"], ("likeness", "adherence", "diversity", "memorization", "brisque", "ssim"), "likeness", None),
        (["--preset", "likeness", "--metrics", "likeness", "ssim"], ("likeness", "ssim", "adherence", "diversity"), "likeness", None),
        (["--metrics", "ssim", "--bound", "adherence=0.9x:"], ("ssim", "adherence"), "ssim", {"adherence": ("0.9x", None)}),
    ],
)
def test_monitor_options_resolve_like_the_monitor(argv, metrics, monitor, bounds, training_images):
    refs, _ = training_images
    for command in ("kohya", "watch"):
        options = flags.monitor_options(parse(command, *argv, "--refs", str(refs)), command)
        assert (options["metrics"], options["metric"], options["bounds"]) == (metrics, monitor, bounds)
        assert options["references"] == str(refs) and options["strip_words"] == ()
        assert "clip_model" not in options and "dino_model" not in options  # the monitor's defaults


def test_signal_flags_are_defined_once_for_every_command():
    """The policy and signal flags: one spelling, one help text and one way of reading them in every command."""
    from lora_monitor.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    helps: dict[str, set[str]] = {}
    shared = ("--preset", "--metrics", "--metric", "--bound", "--min-delta", "--aggregate",
              "--refs", "--clip-model", "--dino-model", "--strip-words")
    for command in ("epochs", "strength", "grid", "kohya", "watch"):
        actions = {option: action for action in subcommands[command]._actions for option in action.option_strings}
        for flag in shared:
            helps.setdefault(flag, set()).add((actions[flag].help, actions[flag].nargs, str(actions[flag].choices)))
    assert all(len(texts) == 1 for texts in helps.values()), helps
    assert all(len(texts) == 1 for texts in helps.values()), helps
    args = parse("watch", "--strip-words", "sks, ohwx", "--strip-words", "sks", "--metrics", "ssim")
    assert flags.monitor_options(args, "kohya")["strip_words"] == ("sks", "ohwx")


def test_check_seed_groups_only_when_diversity_is_computed(tmp_path):
    from lora_monitor.spec import PreviewSpec

    spec = PreviewSpec.from_prompts(["a cat", "a dog"], seed=3)
    kohya.check_seed_groups(spec, ["brisque", "ssim"], "p.txt")  # no diversity: one seed a prompt is fine
    with pytest.raises(ValueError, match=r"prompt\(s\) 0 \('a cat'\), 1 \('a dog'\) of p.txt have a single seed: repeat each such line with another --d"):
        kohya.check_seed_groups(spec, ["diversity"], "p.txt")
    kohya.check_seed_groups(spec.with_seeds(2), ["diversity"], "p.txt")
    assert kohya.monitor_metrics({"preset": "likeness"})[:3] == ["likeness", "adherence", "diversity"]
    assert kohya.monitor_metrics({"metrics": ("ssim",), "bounds": {"diversity": ("0.8x", None)}}) == ["ssim", "diversity"]
