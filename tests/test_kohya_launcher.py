"""The kohya launcher against sd-scripts' file contract, with a fake minimal sd-scripts checkout.

The fake checkout is written by the test: a train_network.py whose NetworkTrainer calls the hooks in
kohya's order (post_process_network; sample_images at step 0, at every step, and at each epoch end
after the checkpoint save and rotation; the final file after the loop) and writes files under
kohya's names, rendering samples with our tiny pipeline. Its "training" sets the LoRA to a scripted
size each epoch (--fake_schedule), so which epoch is best is known in advance.
"""
from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lora_monitor import kohya_names
from lora_monitor.export import read_sidecar
from lora_monitor.integrations import kohya, kohya_commands
from lora_monitor.record import read_scores


TRAIN_UTIL = '''
import os
import time

import torch

EPOCH_FILE_NAME = "{}-{:06d}"


def get_epoch_ckpt_name(args, ext, epoch_no):
    return EPOCH_FILE_NAME.format(args.output_name or "epoch", epoch_no) + ext


def get_last_ckpt_name(args, ext):
    return (args.output_name or "last") + ext


def get_remove_epoch_no(args, epoch_no):
    if args.save_last_n_epochs is None:
        return None
    number = epoch_no - args.save_every_n_epochs * args.save_last_n_epochs
    return number if number >= 0 else None


def prepare_dtype(args):
    return torch.float32, None


def verify_command_line_training_args(args):
    pass


def read_config_from_file(args, parser):
    return args


def load_prompts(path):
    lines = [line.strip() for line in open(path, encoding="utf-8") if line.strip() and line[0] != "#"]
    prompts = []
    for line in lines:
        parts = line.split(" --")
        prompt = {"prompt": parts[0]}
        for part in parts[1:]:
            key, value = part.split(None, 1)
            prompt[{"d": "seed", "w": "width", "h": "height", "s": "sample_steps", "l": "scale"}[key]] = float(value) if key == "l" else int(value)
        prompts.append(prompt)
    return prompts


def sample_images(accelerator, args, epoch, steps, device, vae, tokenizer, text_encoder, unet):
    if steps == 0:
        if not args.sample_at_first:
            return
    else:
        if args.sample_every_n_epochs is None and args.sample_every_n_steps is None:
            return
        if args.sample_every_n_epochs is not None:
            if epoch is None or epoch % args.sample_every_n_epochs != 0:
                return
        elif steps % args.sample_every_n_steps != 0 or epoch is not None:
            return
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    save_dir = args.output_dir + "/sample"
    os.makedirs(save_dir, exist_ok=True)
    for i, prompt in enumerate(load_prompts(args.sample_prompts)):
        seed = prompt.get("seed")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        image = pipe(prompt["prompt"], num_inference_steps=prompt.get("sample_steps", 30), guidance_scale=prompt.get("scale", 7.5),
                     width=prompt.get("width", 512), height=prompt.get("height", 512), generator=generator).images[0]
        number = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
        name = f"{'' if args.output_name is None else args.output_name + '_'}{number}_{i:02d}_{time.strftime('%Y%m%d%H%M%S')}{'' if seed is None else '_' + str(seed)}.png"
        image.save(os.path.join(save_dir, name))
'''

TRAIN_NETWORK = '''
import argparse
import math
import os

import torch
from accelerate import Accelerator

from library import train_util


class FakeNetwork:
    """Stands for kohya's LoRANetwork: set_multiplier and save_weights over a peft LoRA."""

    def __init__(self, unet):
        self.unet = unet
        self.multiplier = 1.0

    def set_multiplier(self, multiplier):
        self.multiplier = multiplier
        (self.unet.disable_lora if multiplier == 0 else self.unet.enable_lora)()

    def save_weights(self, file, dtype, metadata):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(self.unet).items()}
        save_file(state, file, metadata={k: str(v) for k, v in (metadata or {}).items()})


class NetworkTrainer:
    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        pass

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet):
        train_util.sample_images(accelerator, args, epoch, global_step, device, vae, tokenizers[0], text_encoder, unet)

    def train(self, args):
        from diffusers import StableDiffusionPipeline
        from peft import LoraConfig

        accelerator = Accelerator(log_with=args.log_with, project_dir=args.logging_dir)
        if args.log_with:
            accelerator.init_trackers("network_train")
        pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, safety_checker=None, requires_safety_checker=False)
        unet = pipe.unet
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))  # lora_B = 0
        network = FakeNetwork(unet)
        self.post_process_network(args, accelerator, network, [pipe.text_encoder], unet)
        tokenizers = [pipe.tokenizer]
        steps_per_epoch = 2
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * steps_per_epoch
        num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
        schedule = [float(x) for x in args.fake_schedule.split(",")]
        global_step = 0
        hooks = (accelerator.device, pipe.vae, tokenizers, pipe.text_encoder, unet)
        self.sample_images(accelerator, args, 0, global_step, *hooks)
        for epoch in range(num_train_epochs):
            for step in range(steps_per_epoch):
                generator = torch.Generator().manual_seed(epoch)
                with torch.no_grad():
                    for name, parameter in unet.named_parameters():
                        if "lora_B" in name:
                            parameter.copy_(torch.randn(parameter.shape, generator=generator) * schedule[min(epoch, len(schedule) - 1)])
                global_step += 1
                self.sample_images(accelerator, args, None, global_step, *hooks)
                if global_step >= args.max_train_steps:
                    break
            accelerator.wait_for_everyone()
            if args.save_every_n_epochs is not None:
                if (epoch + 1) % args.save_every_n_epochs == 0 and (epoch + 1) < num_train_epochs:
                    name = train_util.get_epoch_ckpt_name(args, "." + args.save_model_as, epoch + 1)
                    network.save_weights(os.path.join(args.output_dir, name), None, {"ss_epoch": epoch + 1})
                    remove = train_util.get_remove_epoch_no(args, epoch + 1)
                    if remove is not None:
                        old = os.path.join(args.output_dir, train_util.get_epoch_ckpt_name(args, "." + args.save_model_as, remove))
                        if os.path.exists(old):
                            os.remove(old)
            self.sample_images(accelerator, args, epoch + 1, global_step, *hooks)
        accelerator.end_training()
        name = train_util.get_last_ckpt_name(args, "." + args.save_model_as)
        network.save_weights(os.path.join(args.output_dir, name), None, {"ss_epoch": num_train_epochs})


def setup_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path")
    parser.add_argument("--output_dir")
    parser.add_argument("--output_name", default=None)
    parser.add_argument("--save_model_as", default="safetensors")
    parser.add_argument("--max_train_steps", type=int, default=1600)
    parser.add_argument("--max_train_epochs", type=int, default=None)
    parser.add_argument("--save_every_n_epochs", type=int, default=None)
    parser.add_argument("--save_last_n_epochs", type=int, default=None)
    parser.add_argument("--sample_prompts", default=None)
    parser.add_argument("--sample_every_n_epochs", type=int, default=None)
    parser.add_argument("--sample_every_n_steps", type=int, default=None)
    parser.add_argument("--sample_at_first", action="store_true")
    parser.add_argument("--log_with", default=None)
    parser.add_argument("--logging_dir", default=None)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--fake_schedule", default="0.1")
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    NetworkTrainer().train(args)
'''


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sd-scripts")
    (root / "library").mkdir()
    (root / "library" / "__init__.py").write_text("")
    (root / "library" / "train_util.py").write_text(textwrap.dedent(TRAIN_UTIL))
    (root / "networks").mkdir()
    (root / "train_network.py").write_text(textwrap.dedent(TRAIN_NETWORK))
    return root


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


def test_last_epoch_best_is_saved_from_the_network(checkout, tiny_model, prompts, tmp_path):
    argv = ["kohya", "--sd-scripts", str(checkout), "--metrics", "ssim", "--"]
    argv += trainer_args(tmp_path, tiny_model, prompts, "--max_train_epochs", "2", "--fake_schedule", "1.0,0.05", "--save_every_n_epochs", "1")
    assert run_cli(argv) == 0
    out = tmp_path / "out"
    assert [line["epoch"] for line in read_scores(out)] == [1, 2]
    assert read_sidecar(out / "best")["epoch"] == 2
    # the last epoch has no numbered file: the network was saved into best/ at its sample point,
    # and holds the same weights as kohya's final file written after the loop
    best = load_file(out / "best" / "mylora-000002.safetensors")
    final = load_file(out / "mylora.safetensors")
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
