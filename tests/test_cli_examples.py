"""Every example in every command's --help runs as written.

The examples are read from the help text itself (the `example:`/`examples:` block of each command's epilog), so an
example edited there is what runs here. They run in a workspace that holds the files they name: image folders in
each naming scheme, tiny models of the families at the paths the examples give (a hub id such as
runwayml/stable-diffusion-v1-5 is a local folder of that name, which diffusers loads before asking the hub), LoRA
checkpoints in kohya's format, and the default CLIP/DINOv2 names in a Hugging Face cache of tiny random-weight
models. Nothing downloads.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import cached_brisque_model, shape_image
from lora_monitor.cli import build_parser, main
from lora_monitor.record import to_pil

PROMPTS = ["sks toy on a table", "a red circle"]
SHAPES = ("disc", "square", "stripe")


def help_examples(command: str) -> list[str]:
    """The example command lines of `lora-monitor COMMAND --help`: continuation lines joined, comments dropped."""
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    epilog = subcommands[command].epilog or ""
    lines, inside = [], False
    for line in epilog.splitlines():
        if line.strip() in ("example:", "examples:"):
            inside = True
            continue
        if inside and not line.startswith(" "):
            break
        if inside:
            lines.append(line.strip())
    examples: list[str] = []
    for line in lines:
        code = line.split("  #", 1)[0].strip()
        if examples and examples[-1].endswith("\\"):
            examples[-1] = examples[-1][:-1].rstrip() + " " + code
        elif code.startswith("lora-monitor "):
            examples.append(code)
    return examples


def run_example(line: str, capsys) -> tuple[int, str, str]:
    """Run one example line in the current folder as a shell would: ~ expanded, `> FILE` writes stdout to FILE."""
    words = shlex.split(line)
    target = None
    if ">" in words:
        at = words.index(">")
        words, target = words[:at], words[at + 1]
    words = [os.path.expanduser(word) if word.startswith("~") else word for word in words]
    assert words[0] == "lora-monitor"
    code = main(words[1:])
    out, err = capsys.readouterr()
    if target is not None:
        Path(target).write_text(out, encoding="utf-8")
    return code, out, err


def _save(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path)


def _images(folder: Path, names_and_seeds: list[tuple[str, int]]) -> None:
    for index, (name, seed) in enumerate(names_and_seeds):
        _save(shape_image(SHAPES[index % len(SHAPES)], size=64, seed=seed), folder / name)


def _kohya_sd_lora(unet: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A LoRA on the UNet's attention projections in kohya's key format, with random weights."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q", "attn2.to_k", "attn2.to_v")):
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
            state[f"{key}.lora_up.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
            state[f"{key}.alpha"] = torch.tensor(4.0)
    return state


def _seed_hf_cache(cache: Path, repo_id: str, folder: str) -> None:
    """Put a model folder into the Hugging Face cache as `repo_id` (the hub's cache layout), for offline loading."""
    root = cache / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    shutil.copytree(folder, root / "snapshots" / commit)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit, encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model, family_models):
    """A folder holding every file the examples name."""
    from diffusers import DiffusionPipeline

    root = tmp_path_factory.mktemp("examples")
    (root / "prompts.txt").write_text(
        "\n".join(f"{text} --w 32 --h 32 --s 2 --d {7 + i}" for i, text in enumerate(PROMPTS)) + "\n", encoding="utf-8"
    )
    # score
    _images(root / "previews" / "epoch_003", [("00.png", 1), ("01.png", 2)])
    _images(root, [("a.png", 3), ("b.png", 4)])
    _images(root, [("base.png", 5)])
    _images(root / "out", [("00.png", 6), ("01.png", 7)])
    _images(root / "base_renders", [("00.png", 8), ("01.png", 9)])
    # epochs from images: kohya samples (epoch 0 = base), the older tools' names, --pattern names
    _images(root / "output" / "sample", [(f"mylora_e{epoch:06d}_{i:02d}_20260101000000_{7 + i}.png", 10 * epoch + i)
                                         for epoch in range(4) for i in range(2)])
    _images(root / "old_run", [(f"epoch_{epoch:02d}.png", 40 + epoch) for epoch in (1, 2, 3)] + [("control_01.png", 44)])
    _images(root / "imgs", [(f"run_ep{epoch}_p{i}.png", 50 + 2 * epoch + i) for epoch in (1, 2, 3) for i in range(2)])
    _images(root / "seeds", [(f"ep{epoch}_p{i}_s{s}.png", 60 + 9 * epoch + 3 * i + s) for epoch in (1, 2) for i in range(2) for s in range(3)])
    _images(root / "base_per_seed", [(f"ep0_p{i}_s{s}.png", 80 + 3 * i + s) for i in range(2) for s in range(3)])
    _images(root / "imgs", [(f"e{epoch}_s{strength}_{i}.png", 90 + 5 * epoch + i) for epoch in (1, 2) for strength in (0.5, 1) for i in range(2)])
    _images(root / "base", [(f"{i:02d}.png", 120 + i) for i in range(2)])
    _images(root / "train_images", [(f"{i:02d}.png", 130 + i) for i in range(3)])
    _images(root / "sweep", [(f"strength_{s}.png", 140 + int(10 * s)) for s in (0.5, 1.0)] + [("control_base.png", 150)])
    # base models where the examples name them, and kohya-format LoRAs for them
    for name in ("MODEL", "runwayml/stable-diffusion-v1-5"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(tiny_model, target_is_directory=True)
    unet = DiffusionPipeline.from_pretrained(tiny_model).unet
    for epoch in (1, 2, 3):
        save_file(_kohya_sd_lora(unet, epoch), str(root / "output" / f"mylora-{epoch:06d}.safetensors"), metadata={"ss_epoch": str(epoch)})
    from test_posthoc_families import kohya_flux_lora, kohya_sdxl_lora

    for folder, family, lora, writer in (("black-forest-labs/FLUX.1-dev", "flux", "flux-lora.safetensors", kohya_flux_lora),
                                         ("my-sdxl-folder", "sdxl", "lora.safetensors", kohya_sdxl_lora)):
        (root / folder).parent.mkdir(parents=True, exist_ok=True)
        (root / folder).symlink_to(family_models(family), target_is_directory=True)
        save_file(writer(DiffusionPipeline.from_pretrained(family_models(family)), 3), str(root / lora))
    # watch: a finished kohya run in out/ (prompt file, samples of epochs 0-3, network files) and an ai-toolkit run
    (root / "out" / "sample").mkdir(parents=True, exist_ok=True)
    (root / "out" / "sample" / "prompt.txt").write_text("\n".join(f"{text} --d {7 + i}" for i, text in enumerate(PROMPTS)) + "\n", encoding="utf-8")
    _images(root / "out" / "sample", [(f"mylora_e{epoch:06d}_{i:02d}_20260101000000_{7 + i}.png", 160 + 2 * epoch + i)
                                      for epoch in range(4) for i in range(2)])
    for epoch in (1, 2, 3):
        name = f"mylora-{epoch:06d}.safetensors" if epoch < 3 else "mylora.safetensors"  # kohya: the last epoch unnumbered
        save_file(_kohya_sd_lora(unet, epoch), str(root / "out" / name), metadata={"ss_epoch": str(epoch)})
    from test_trainer_watch import ai_toolkit_run

    ai_toolkit_run(root / "output" / "my_lora")
    # kohya: a (fake) sd-scripts checkout at ~/sd-scripts, training images, a prompt file with two seeds a prompt
    from kohya_fake import write_fake_checkout

    write_fake_checkout(root / "home" / "sd-scripts")
    _images(root / "data" / "10_sks", [(f"{i:02d}.png", 170 + i) for i in range(3)])
    (root / "likeness_prompts.txt").write_text(
        "".join(f"{text} --w 32 --h 32 --s 2 --d {seed}\n" for text in PROMPTS for seed in (1, 2)), encoding="utf-8"
    )
    return root


@pytest.fixture
def fresh_workspace(workspace, tiny_embedders, empty_hf_cache, tmp_path, monkeypatch):
    """A function that makes a fresh copy of the workspace the current folder (each example starts from the files a
    user would have, not from what the previous example wrote), with the default CLIP and DINOv2 names (and the
    example's larger CLIP) in the HF cache."""
    from lora_monitor.scoring.brisque_model import CACHE_ENV, cache_dir
    from lora_monitor.scoring.embeddings import DEFAULT_CLIP, DEFAULT_DINO, release_embedding_models

    cached_brisque_model()
    monkeypatch.setenv(CACHE_ENV, str(cache_dir()))  # the BRISQUE model stays found when HOME moves
    for name, folder in ((DEFAULT_CLIP, tiny_embedders["clip"]), (DEFAULT_DINO, tiny_embedders["dino"]),
                         ("openai/clip-vit-large-patch14", tiny_embedders["clip"])):
        _seed_hf_cache(empty_hf_cache, name, folder)
    copies = iter(range(1000))

    def fresh() -> Path:
        folder = tmp_path / f"run{next(copies)}"
        shutil.copytree(workspace, folder, symlinks=True)
        monkeypatch.chdir(folder)
        monkeypatch.setenv("HOME", str(folder / "home"))  # ~/sd-scripts
        return folder

    yield fresh
    release_embedding_models()  # the tiny models loaded under the default names must not outlive this cache


def test_every_command_has_examples():
    for command in ("demo", "score", "models", "epochs", "strength", "grid", "kohya", "watch"):
        assert help_examples(command), f"`lora-monitor {command} --help` has no example"


@pytest.mark.parametrize("command", ["score", "models", "epochs", "strength", "grid", "watch", "kohya", "demo"])
def test_help_examples_run_as_written(command, fresh_workspace, capsys, request):
    for line in help_examples(command):
        folder = fresh_workspace()
        if command == "demo":  # the demo's base model from the fast recipe, built into a temporary cache (conftest)
            request.getfixturevalue("fast_demo")
        code, out, err = run_example(line, capsys)
        if "pyiqa:" in line and importlib.util.find_spec("pyiqa") is None:  # the optional extra: the message says how to get it
            assert code == 2 and "pip install 'lora-monitor[pyiqa]'" in err, err
            continue
        assert code == 0, f"{line}\n{err}"
        check_outcome(command, shlex.split(line), out, folder)


def check_outcome(command: str, words: list[str], out: str, folder: Path) -> None:
    """What the example promises is there: the JSON, CSV or report it asks for, a best candidate, scores."""
    line = " ".join(words)
    if "--json" in words:
        result = json.loads(out)
        assert command == "score" or result["best"] is not None, line
    if "--report" in words:
        assert (folder / words[words.index("--report") + 1] / "index.html").is_file(), line
    if ">" in words:
        rows = (folder / words[words.index(">") + 1]).read_text(encoding="utf-8").splitlines()
        assert len(rows) > 1 and "," in rows[0], line
    if command == "score" and "--json" not in words:
        assert all(math.isfinite(float(row.split()[-1])) for row in out.strip().splitlines()[1:]), line  # under a header
    if command == "models":
        assert "model" in out and ("at:" in out or "cached:" in out), line
    if command in ("epochs", "strength", "grid") and not {"--json", ">"} & set(words):
        assert "best" in out.lower(), line
    if command == "watch":
        assert (folder / words[2] / "scores.jsonl").is_file() and any((folder / words[2] / "best").iterdir()), line
    if command == "demo":
        report = out.strip().splitlines()[-1].removeprefix("report: ")
        assert "best epoch" in out and Path(report).is_file() and Path(report).is_relative_to(folder), line
    if command == "kohya":
        run = folder / words[words.index("--output_dir") + 1]
        assert (run / "scores.jsonl").is_file() and any((run / "best").iterdir()), line
        if "--save_state" in words:  # the state kohya saves carries the monitor's
            assert list(run.glob("mylora-*-state/lora_monitor_state.json")), line


def test_top_help_lists_every_command_on_one_line(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listing = out[out.index("COMMAND\n") + len("COMMAND\n"):out.index("\noptions:")].splitlines()
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert [row.split()[0] for row in listing] == list(subcommands), out  # one row each: no help text wraps
    assert all(len(row.split()) > 2 for row in listing), out


def test_the_core_imports_neither_the_cli_nor_the_integrations():
    """The library a training loop imports stands alone: importing every core module loads no command module and
    no trainer integration."""
    import pkgutil
    import subprocess
    import sys

    import lora_monitor

    core = [m.name for m in pkgutil.walk_packages(lora_monitor.__path__, "lora_monitor.")
            if not m.name.startswith(("lora_monitor.cli", "lora_monitor.integrations"))]
    assert "lora_monitor.monitor" in core and "lora_monitor.scoring.scorers" in core
    code = (f"import importlib, sys\nfor name in {core!r}:\n    importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('lora_monitor.cli', 'lora_monitor.integrations'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
