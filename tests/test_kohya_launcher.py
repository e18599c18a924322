"""The kohya launcher against sd-scripts' file contract, with a fake minimal sd-scripts checkout.

The fake checkout (kohya_fake.py) is written by the test: train_network.py and the family scripts
(sdxl_, sd3_, flux_, lumina_train_network.py) whose trainers call the hooks in kohya's order, with
sd-scripts' own sample_images signatures, and write files under kohya's names, rendering samples
with our tiny pipeline of each family. Its "training" sets the LoRA to a scripted size each epoch
(--fake_schedule), so which epoch is best is known in advance.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kohya_fake import FAMILY_SCRIPTS, write_fake_checkout
from lora_monitor import kohya_names
from lora_monitor.export import read_sidecar
from lora_monitor.cli import kohya as kohya_commands
from lora_monitor.integrations import kohya
from lora_monitor.record import read_scores


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    return write_fake_checkout(tmp_path_factory.mktemp("sd-scripts"))


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lora-monitor")
    kohya_commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def trainer_args(tmp_path: Path, model: str, prompts: Path, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", model, "--output_dir", str(tmp_path / "out"), "--output_name", "mylora",
        "--sample_prompts", str(prompts), "--sample_every_n_epochs", "1", *extra,
    ]


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("# previews\na red circle --w 64 --h 64 --s 2 --d 11\n\na blue square --w 64 --h 64 --s 2\n", encoding="utf-8")
    return path


def test_early_stop_copies_best_before_rotation_and_exits_zero(checkout, tiny_model, prompts, tmp_path, capsys):
    argv = ["kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", "--patience", "1", "--preview-seed", "100", "--"]
    argv += trainer_args(tmp_path, tiny_model, prompts, "--max_train_epochs", "4", "--fake_schedule", "0.05,0.5,1.0,1.0",
                         "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", "--log_with", "tensorboard", "--logging_dir", str(tmp_path / "logs"))
    assert run_cli(argv) == 0
    out = tmp_path / "out"
    said = capsys.readouterr().out
    assert "stopped early after epoch 2: ssim" in said and "trackers finished" in said
    assert "stopped early after epoch 2: Stopping" not in said  # the final line does not repeat its own prefix
    assert "prompts without --d got fixed seeds (1: 101)" in said
    # the rewritten prompt file kohya read: every prompt has a seed, and the sample names carry it
    assert (out / "lora_monitor_prompts.txt").read_text().splitlines() == [
        "a red circle --w 64 --h 64 --s 2 --d 11", "a blue square --w 64 --h 64 --s 2 --d 101"]
    epoch_samples = sorted(p.name for p in (out / "sample").glob("mylora_e000002_*.png"))
    assert [name.rsplit("_", 1)[1] for name in epoch_samples] == ["11.png", "101.png"]
    # base references rendered by kohya with the multiplier at 0, under kohya's names, and kept in the record
    assert len(list((out / kohya.BASE_DIR / "sample").glob("mylora_e000000_*.png"))) == 2
    assert len(list((out / "previews" / "base").glob("*.png"))) == 2
    # scores for every epoch trained; epoch 1 best; its file copied before --save_last_n_epochs 1 removed it
    lines = read_scores(out)
    assert [line["epoch"] for line in lines] == [1, 2]
    assert lines[-1]["should_stop"] and lines[0]["is_best"]
    assert not (out / "mylora-000001.safetensors").exists()
    assert (out / "best" / "mylora-000001.safetensors").is_file()
    assert read_sidecar(out / "best")["epoch"] == 1
    assert not (out / "mylora.safetensors").exists()  # kohya's after-loop save did not run
    # scores went through kohya's accelerator to its tensorboard tracker, and the tracker was finished
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "logs").rglob("events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert "monitor/ssim_mean" in accumulator.Tags()["scalars"]


def test_last_epoch_best_is_kohyas_final_file_with_its_metadata(checkout, tiny_model, prompts, tmp_path, capsys):
    """The last epoch has no numbered file: at its sample point the network is saved into best/ (few metadata keys);
    once kohya writes its final file after the loop, best/ holds that file instead, with kohya's full metadata."""
    argv = ["kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", "--"]
    argv += trainer_args(tmp_path, tiny_model, prompts, "--max_train_epochs", "2", "--fake_schedule", "1.0,0.05", "--save_every_n_epochs", "1")
    assert run_cli(argv) == 0
    out = tmp_path / "out"
    assert "the best epoch 2 is the last" in capsys.readouterr().out
    assert [line["epoch"] for line in read_scores(out)] == [1, 2]
    sidecar = read_sidecar(out / "best")
    assert sidecar["epoch"] == 2 and sidecar["checkpoint_source"] == "mylora.safetensors"
    assert sorted(p.name for p in (out / "best").iterdir()) == ["lora_monitor.json", "mylora.safetensors"]
    from safetensors import safe_open

    with safe_open(str(out / "best" / "mylora.safetensors"), "pt") as best, safe_open(str(out / "mylora.safetensors"), "pt") as final:
        assert best.metadata() == final.metadata()
        assert {"ss_training_finished_at", "ss_network_module", "ss_session_id"} <= set(best.metadata())
    best, final = load_file(out / "best" / "mylora.safetensors"), load_file(out / "mylora.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[k], final[k]) for k in best)
    state = json.loads((out / kohya.LAUNCHER_STATE).read_text())
    assert state["policy"]["best_epoch"] == 2


def test_missing_checkout(tmp_path):
    with pytest.raises(FileNotFoundError, match="sd-scripts checkout not found"):
        run_cli(["kohya", "--sd-scripts", str(tmp_path / "nowhere"), "--", "--output_dir", "x"])


def test_unknown_layout_names_what_was_looked_for(tmp_path):
    (tmp_path / "train_network.py").write_text("")
    with pytest.raises(ValueError, match=r"looked for train_network.py, library/train_util.py, networks; missing: library/train_util.py, networks"):
        run_cli(["kohya", "--sd-scripts", str(tmp_path), "--", "--output_dir", "x"])
    with pytest.raises(ValueError, match="looked for sdxl_train_network.py"):
        run_cli(["kohya", "--sd-scripts", str(tmp_path), "--sdxl", "--", "--output_dir", "x"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sample_prompts", None], "give the trainer --sample_prompts"),
        (["--sample_every_n_epochs", None, "--sample_every_n_steps", "5"], "add --sample_every_n_epochs"),
        (["--sample_prompts", "BAD"], r"prompts.txt:1: unknown option --q"),
    ],
)
def test_bad_trainer_arguments_fail_before_training(checkout, prompts, tmp_path, extra, message):
    args = {"--output_dir": str(tmp_path / "out"), "--sample_prompts": str(prompts), "--sample_every_n_epochs": "1",
            "--pretrained_model_name_or_path": str(tmp_path / "no-model")}
    for key, value in zip(extra[::2], extra[1::2]):
        args[key] = value
    if args["--sample_prompts"] == "BAD":
        prompts.write_text("a cat --q 3\n")
        args["--sample_prompts"] = str(prompts)
    argv = [item for key, value in args.items() if value is not None for item in (key, value)]
    with pytest.raises(ValueError, match=message):
        run_cli(["kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", "--", *argv])
    assert not (tmp_path / "out" / "sample").exists()  # nothing was trained or sampled


def test_no_trainer_arguments(checkout):
    with pytest.raises(ValueError, match="no trainer arguments"):
        run_cli(["kohya", "--sd-scripts", str(checkout)])


def test_prompt_files_get_explicit_seeds(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nwidth = 64\nheight = 64\n[[prompt.subset]]\nprompt = "a"\nseed = 5\n[[prompt.subset]]\nprompt = "b"\n')
    path, spec, changed = kohya.fixed_seed_prompts(toml, tmp_path / "out", seed=40)
    assert path.suffix == ".json" and changed == [1]
    assert [entry["seed"] for entry in json.loads(path.read_text())] == [5, 41]
    assert [p.seed for p in spec.prompts] == [5, 41]


def test_sample_names():
    sample = kohya_names.parse_sample_name("my_lora_e000012_03_20260216120000_42.png")
    assert (sample.output_name, sample.epoch, sample.index, sample.seed) == ("my_lora", 12, 3, 42)
    unnamed = kohya_names.parse_sample_name("e000001_00_20260216120000.png")
    assert (unnamed.output_name, unnamed.epoch, unnamed.seed) == (None, 1, None)
    assert kohya_names.parse_sample_name("my_lora_000100_00_20260216120000_1.png") is None  # a step sample
    assert kohya_names.epoch_checkpoint_name(None, 3) == "epoch-000003.safetensors"
    assert kohya_names.last_checkpoint_name("x", ".ckpt") == "x.ckpt"


# ---------------------------------------------------------------------------------------- the families
def family_param(family: str):
    """A --family value as a test parameter, skipped (with the reason) where the installed diffusers lacks its pipeline."""
    import diffusers

    from lora_monitor.tiny import available_tiny_families

    model_family = kohya_names.KOHYA_TRAINERS[family].model_family
    marks = ()
    if model_family not in available_tiny_families():
        from lora_monitor.families import get_family

        reason = f"diffusers {diffusers.__version__} has no {get_family(model_family).pipeline} (the {family} family's pipeline)"
        marks = pytest.mark.skip(reason=reason)
    return pytest.param(family, marks=marks, id=family)


FAMILIES = ("sdxl", "sd3", "flux", "lumina")


@pytest.fixture
def family_model(family_models):
    """kohya --family -> a saved tiny diffusers model of that architecture (conftest's family_models)."""
    return lambda family: family_models(kohya_names.KOHYA_TRAINERS[family].model_family)


def sample_log(folder: Path) -> list[dict]:
    path = folder / "fake_samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


@pytest.mark.parametrize("family", [family_param(f) for f in FAMILIES])
def test_each_family_end_to_end(checkout, family_model, family, tmp_path, capsys):
    """Each family's trainer script, picked by --family (SDXL by its --sdxl alias): base renders by kohya's
    own sampler at multiplier 0, every epoch scored, the best epoch's file copied before the rotation
    deletes it, and the early stop with exit code 0. FLUX's --g and --l reach kohya's sampler as written."""
    prompts = tmp_path / "prompts.txt"
    # 40 px: kohya's samplers draw at least 64 px (FLUX: sides a multiple of 16)
    options = " --g 4.0 --l 1.0" if family == "flux" else ""
    prompts.write_text(f"a red circle --w 40 --h 40 --s 2 --d 11{options}\na blue square --w 64 --h 64 --s 2{options}\n", encoding="utf-8")
    which = ["--sdxl"] if family == "sdxl" else ["--family", family]
    argv = ["kohya", "--sd-scripts", str(checkout), *which, "--metrics", "ssim", "--patience", "1", "--"]
    extra = ["--cache_text_encoder_outputs"] if family in ("flux", "sdxl") else []
    argv += trainer_args(tmp_path, family_model(family), prompts, "--max_train_epochs", "4", "--fake_schedule", "0.05,0.5,1.0,1.0",
                         "--save_every_n_epochs", "1", "--save_last_n_epochs", "1", *extra)
    assert run_cli(argv) == 0
    out = tmp_path / "out"
    said = capsys.readouterr().out
    trainer = kohya_names.KOHYA_TRAINERS[family]
    assert f"training with {checkout / trainer.script} ({trainer.trainer_class}, family {family})" in said
    assert "stopped early after epoch 2: ssim" in said
    # Lumina's sampler refuses seed 0: lora-monitor's seeds start at 1 there
    first = 1 if family == "lumina" else 0
    assert f"prompts without --d got fixed seeds (1: {first + 1})" in said
    lines = (out / "lora_monitor_prompts.txt").read_text().splitlines()
    assert lines == [f"a red circle --w 40 --h 40 --s 2 --d 11{options}", f"a blue square --w 64 --h 64 --s 2{options} --d {first + 1}"]
    # the base renders: kohya's own sampler, with the network multiplier at 0, then back to 1 for the epochs
    base_log, log = sample_log(out / kohya.BASE_DIR), sample_log(out)
    assert [(r["family"], r["epoch"], r["multiplier"]) for r in base_log] == [(family, 0, 0.0)] * 2
    assert {(r["epoch"], r["multiplier"]) for r in log} == {(1, 1.0), (2, 1.0)}
    assert all((r["width"], r["height"]) == (64, 64) for r in base_log + log)
    if family == "flux":  # --g is the distilled guidance, --l the CFG scale (1.0: none); the prompts were encoded before training
        assert all((r["guidance_scale"], r["scale"], r["cached"]) == (4.0, 1.0, True) for r in base_log + log)
    assert len(list((out / kohya.BASE_DIR / "sample").glob("mylora_e000000_*.png"))) == 2
    assert len(list((out / "previews" / "base").glob("*.png"))) == 2
    # scores; epoch 1 best; its file copied before --save_last_n_epochs 1 removed it; no final file
    scores = read_scores(out)
    assert [line["epoch"] for line in scores] == [1, 2]
    assert scores[0]["is_best"] and scores[-1]["should_stop"]
    assert 1.0 > scores[0]["aggregates"]["ssim"] > scores[1]["aggregates"]["ssim"]  # the LoRA moved the renders off the base
    assert not (out / "mylora-000001.safetensors").exists()
    assert (out / "best" / "mylora-000001.safetensors").is_file()
    assert read_sidecar(out / "best")["epoch"] == 1
    assert not (out / "mylora.safetensors").exists()


@pytest.mark.parametrize("family", [family_param("flux")])
def test_flux_json_prompts_keep_distilled_guidance_and_cfg(checkout, family_model, family, tmp_path):
    """A PreviewSpec.to_dict() file (our key names) is rewritten in kohya's: distilled_guidance -> guidance_scale (--g),
    guidance_scale -> scale (--l), steps -> sample_steps; kohya's FLUX sampler reads them so."""
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"prompts": [
        {"prompt": "a red circle", "seed": 3, "steps": 2, "width": 64, "height": 64, "distilled_guidance": 5.0, "guidance_scale": 1.0},
        {"prompt": "a blue square", "seed": 4, "steps": 2, "width": 64, "height": 64},
    ]}))
    argv = ["kohya", "--sd-scripts", str(checkout), "--family", "flux", "--metrics", "ssim", "--"]
    argv += trainer_args(tmp_path, family_model("flux"), prompts, "--max_train_epochs", "1")
    assert run_cli(argv) == 0
    out = tmp_path / "out"
    assert json.loads((out / "lora_monitor_prompts.json").read_text()) == [
        {"prompt": "a red circle", "seed": 3, "sample_steps": 2, "width": 64, "height": 64, "guidance_scale": 5.0, "scale": 1.0},
        {"prompt": "a blue square", "seed": 4, "sample_steps": 2, "width": 64, "height": 64},
    ]
    seen = [(r["seed"], r["guidance_scale"], r["scale"]) for r in sample_log(out / kohya.BASE_DIR) + sample_log(out)]
    assert seen == [(3, 5.0, 1.0), (4, 3.5, 1.0)] * 2  # kohya's FLUX defaults: --g 3.5, --l 1.0
    assert [line["epoch"] for line in read_scores(out)] == [1]


def test_kohya_json_and_toml_prompts_read_guidance_scale_as_distilled_guidance(tmp_path):
    """In kohya's .json/.toml entries "scale" is --l (CFG) and "guidance_scale" --g (FLUX's distilled guidance):
    both in one entry is a valid FLUX prompt, kept as written in the rewritten file."""
    flux = kohya.prompt_defaults("flux")
    source = tmp_path / "p.json"
    entries = [{"prompt": "a", "scale": 1.0, "guidance_scale": 3.0, "sample_steps": 4}, "b --g 2.5 --l 1.5 --d 9"]
    source.write_text(json.dumps(entries))
    path, spec, changed = kohya.fixed_seed_prompts(source, tmp_path / "out", seed=20, defaults=flux)
    assert changed == [0]
    assert [(p.guidance_scale, p.distilled_guidance, p.steps, p.seed) for p in spec.prompts] == [(1.0, 3.0, 4, 20), (1.5, 2.5, 20, 9)]
    assert json.loads(path.read_text()) == [{**entries[0], "seed": 20}, entries[1]]
    toml = tmp_path / "p.toml"
    toml.write_text('[prompt]\nguidance_scale = 4.0\nwidth = 64\n[[prompt.subset]]\nprompt = "a"\nscale = 2.0\n[[prompt.subset]]\nprompt = "b"\nguidance_scale = 1.0\n')
    path, spec, changed = kohya.fixed_seed_prompts(toml, tmp_path / "out2", seed=0, defaults=flux)
    assert [(p.guidance_scale, p.distilled_guidance, p.width) for p in spec.prompts] == [(2.0, 4.0, 64), (1.0, 1.0, 64)]
    assert json.loads(path.read_text()) == [
        {"guidance_scale": 4.0, "width": 64, "prompt": "a", "scale": 2.0, "seed": 0},
        {"guidance_scale": 1.0, "width": 64, "prompt": "b", "seed": 1},
    ]


def test_family_from_script_and_trainer_class(checkout, tmp_path):
    assert kohya.choose_trainer() == ("train_network.py", "sd")
    assert kohya.choose_trainer("flux") == ("flux_train_network.py", "flux")
    assert kohya.choose_trainer(None, "sd3_train_network.py") == ("sd3_train_network.py", "sd3")
    assert kohya.choose_trainer("flux", "my_flux.py") == ("my_flux.py", "flux")
    assert kohya.choose_trainer(None, "my_trainer.py") == ("my_trainer.py", None)
    with pytest.raises(ValueError, match="--script sdxl_train_network.py is sd-scripts' sdxl trainer, but --family flux"):
        kohya.choose_trainer("flux", "sdxl_train_network.py")
    # each family script: its class, found by name
    for script in FAMILY_SCRIPTS:
        loaded = kohya.load_checkout(checkout, script)
        trainer = kohya_names.KOHYA_TRAINERS[loaded.family]
        assert (loaded.trainer_class.__name__, trainer.script) == (trainer.trainer_class, script)
    # a script of another name: its family is that of the sd-scripts class it derives from
    (checkout / "my_flux_variant.py").write_text(
        "import flux_train_network\nfrom flux_train_network import setup_parser\n\n\n"
        "class MyTrainer(flux_train_network.FluxNetworkTrainer):\n    pass\n"
    )
    loaded = kohya.load_checkout(checkout, "my_flux_variant.py")
    assert (loaded.trainer_class.__name__, loaded.family) == ("MyTrainer", "flux")


def test_a_family_whose_script_is_missing_names_the_file_and_the_commit(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    old = write_fake_checkout(tmp_path / "old-sd-scripts", scripts=("sdxl_train_network.py",), commit=commit)
    for argv, script, since in ((["--family", "flux"], "flux_train_network.py", "v0.10.0"),
                                (["--family", "lumina"], "lumina_train_network.py", "v0.10.0"),
                                (["--script", "sd3_train_network.py"], "sd3_train_network.py", "v0.10.0")):
        with pytest.raises(ValueError, match=rf"checkout {old} \(commit 0123456789ab\) has no {script}, .*since {since}\); update the checkout"):
            run_cli(["kohya", "--sd-scripts", str(old), *argv, "--", "--output_dir", str(tmp_path / "x")])
    assert kohya.checkout_commit(old) == commit
    (old / ".git" / "HEAD").write_text(commit[::-1] + "\n")  # a detached HEAD
    assert kohya.checkout_commit(old) == commit[::-1]
    bare = write_fake_checkout(tmp_path / "no-git", scripts=())
    with pytest.raises(ValueError, match=r"\(commit unknown: not a git checkout\) has no sdxl_train_network.py"):
        run_cli(["kohya", "--sd-scripts", str(bare), "--sdxl", "--", "--output_dir", str(tmp_path / "x")])


def test_lumina_refuses_seed_zero_before_training(checkout, tmp_path):
    """kohya's Lumina sampler asserts seed > 0: a --d 0 is an error before any model loads."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat --d 0\na dog\n")
    argv = ["kohya", "--sd-scripts", str(checkout), "--family", "lumina", "--metrics", "ssim", "--"]
    argv += trainer_args(tmp_path, str(tmp_path / "no-model"), prompts)
    with pytest.raises(ValueError, match=r"kohya's lumina sampler \(library/lumina_train_util.py .*\) refuses seeds below 1: "
                                         r"prompt\(s\) \[0\] of .* would get seed\(s\) \[0\]; give those prompts --d 1 or more"):
        run_cli(argv)
    prompts.write_text("a cat\n")
    with pytest.raises(ValueError, match=r"give --preview-seed 1 or more"):
        run_cli([*argv[:5], "--preview-seed", "0", *argv[5:]])
    assert not (tmp_path / "out" / "sample").exists()


def test_hooks_find_their_arguments_by_position_or_by_the_trainers_own_names():
    """sample_images' leading arguments are found by position, or by keyword under the trainer's own
    parameter names; the base render calls it again with args, epoch and step replaced, the rest as given."""
    calls = []

    class FluxLike:
        def sample_images(self, accelerator, args, epoch, global_step, device, ae, tokenizer, text_encoder, flux):
            calls.append((accelerator, args, epoch, global_step, device, ae, tokenizer, text_encoder, flux))

    method = FluxLike().sample_images
    call = kohya.SampleCall(method, ("acc", "args"), dict(global_step=7, epoch=3, device="cpu", ae="AE", tokenizer="T", text_encoder="TE", flux="F"))
    assert (call.accelerator, call.args, call.epoch, call.step) == ("acc", "args", 3, 7)
    call.again("base-args", 0, 0)
    assert calls[-1] == ("acc", "base-args", 0, 0, "cpu", "AE", "T", "TE", "F")
    positional = kohya.SampleCall(method, ("acc", "args", None, 5, "cpu", "AE", "T", "TE", "F"), {})
    assert (positional.epoch, positional.step) == (None, 5)
    positional.again("b", 0, 0)
    assert calls[-1] == ("acc", "b", 0, 0, "cpu", "AE", "T", "TE", "F")
    with pytest.raises(TypeError, match="without its global_step argument"):
        kohya.SampleCall(method, ("acc", "args", 1), {})


def test_a_trainer_of_no_known_family_runs_with_sd_prompt_defaults(checkout):
    """sd-scripts has trainers the launcher has no family for (hunyuan_image_, anima_train_network.py): --script
    runs them; deriving from NetworkTrainer does not make them SD."""
    (checkout / "other_train_network.py").write_text(
        "import train_network\nfrom train_network import setup_parser\n\n\n"
        "class OtherNetworkTrainer(train_network.NetworkTrainer):\n"
        "    def sample_images(self, accelerator, args, epoch, global_step, device, ae, tokenizer, text_encoder, flux):\n"
        "        pass\n"
    )
    loaded = kohya.load_checkout(checkout, "other_train_network.py")
    assert (loaded.trainer_class.__name__, loaded.family) == ("OtherNetworkTrainer", None)
    assert kohya.prompt_defaults(loaded.family) == kohya.KOHYA_PROMPT_DEFAULTS
    assert kohya.load_checkout(checkout).family == "sd"
