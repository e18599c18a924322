"""A fake minimal kohya-ss sd-scripts checkout for the launcher tests, written by `write_fake_checkout`.

Its train_network.py has a NetworkTrainer whose train() makes kohya's calls in kohya's order
(train_network.py, NetworkTrainer.train, at 48d368fa):
    Accelerator (train_util.prepare_accelerator: --log_with, or tensorboard with --logging_dir alone)
    load the model, post_process_network, accelerator.prepare(network, optimizer)
    register_save_state_pre_hook / register_load_state_pre_hook (train_state.json: epoch and step)
    train_util.resume_from_local_or_hf_if_specified: accelerator.load_state(--resume), BEFORE any
        sample point; the loop then starts at the epoch the state was saved in (global_step from 0)
    train_util.init_trackers (W&B: epoch, val_step, global_step defined as hidden metrics)
    sample_images at step 0, then accelerator.log({}, step=0) when a tracker is on
    each step: sample_images(None, step), with --save_every_n_steps the network file and (--save_state)
        train_util.save_and_remove_state_stepwise, then the step's log; each epoch end: the epoch's log, the
        network file and its rotation, with --save_state train_util.save_and_remove_state_on_epoch_end
        (BEFORE sampling), then sample_images(epoch)
    after the loop: end_training, with --save_state(_on_train_end) train_util.save_state_on_train_end
        (<output_name>-state), the final file
Every log goes as kohya's accelerator_logging sends it: TensorBoard at the step, W&B with no step
(each log a new row; "global_step" and "epoch" in the row) and the samples to W&B as sample_<i>
with commit=False (train_util.sample_image_inference). The network is an nn.Module holding the
denoiser's LoRA parameters, so accelerate's save_state/load_state save and restore them; nothing
else is registered. The family scripts (sdxl_train_network.py, sd3_train_network.py,
flux_train_network.py, lumina_train_network.py) subclass it as sd-scripts does (SdxlNetworkTrainer,
Sd3NetworkTrainer, FluxNetworkTrainer, LuminaNetworkTrainer) and override sample_images with
sd-scripts' own signatures (read from kohya-ss/sd-scripts at 48d368fa, Feb 2026):
    train_network.py        NetworkTrainer.sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet)
    sdxl_train_network.py   SdxlNetworkTrainer.sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizer, text_encoder, unet)
    sd3_train_network.py    Sd3NetworkTrainer.sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizer, text_encoder, mmdit)
    flux_train_network.py   FluxNetworkTrainer.sample_images(self, accelerator, args, epoch, global_step, device, ae, tokenizer, text_encoder, flux)
    lumina_train_network.py LuminaNetworkTrainer.sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizer, text_encoder, lumina)
each passing on to its library sampler with that sampler's signature (library/sdxl_train_util.py,
sd3_train_utils.py, flux_train_utils.py, lumina_train_util.py: sample_images). The samplers keep
kohya's rules that matter to the launcher: when to sample, the prompt keys (--l is "scale", the CFG
scale; --g is "guidance_scale", FLUX's distilled guidance), each family's defaults, sizes rounded
down to 8 (FLUX: 16) and at least 64 px, Lumina's refusal of seed 0, the file names, and FLUX
encoding the sample prompts once before training (--cache_text_encoder_outputs). They render with
our tiny diffusers pipeline of the family, and log every sample (with the fake network's multiplier
at that moment) to <output_dir>/fake_samples.jsonl. The network is a peft LoRA on the denoiser whose
set_multiplier scales it, as kohya's LoRANetwork does. Its "training" sets the LoRA to a scripted
size each epoch (--fake_schedule), so which epoch is best is known in advance, and a resumed run
trains as the uninterrupted one did. Like kohya, the main process alone saves network files and
states (with some of kohya's ss_* metadata keys; the final file also ss_training_finished_at), and
with several processes each renders its share of the prompts. <output_dir>/fake_events.jsonl lists
the states saved and loaded. Test switches: --fake_cpu (Accelerator(cpu=True), for accelerate
launch on CPU processes), --fake_fail_at_epoch N (a ValueError inside the loop at epoch N's end,
after its state is saved and before its samples), --fake_corrupt_sample EPOCH:INDEX (that sample
written as bytes that do not decode).
"""
from __future__ import annotations

import textwrap
from pathlib import Path

STRATEGY_BASE = '''
class TokenizeStrategy:
    """kohya's strategy singleton; here it holds the loaded pipeline's components (tokenizers, scheduler)."""

    _strategy = None

    def __init__(self, components):
        self.components = components

    @classmethod
    def set_strategy(cls, strategy):
        cls._strategy = strategy

    @classmethod
    def get_strategy(cls):
        return cls._strategy
'''

TRAIN_UTIL = '''
import json
import os
import shutil
import time

import torch

from library import strategy_base

EPOCH_FILE_NAME = "{}-{:06d}"
STEP_FILE_NAME = "{}-step{:08d}"
EPOCH_STATE_NAME = "{}-{:06d}-state"
STEP_STATE_NAME = "{}-step{:08d}-state"
LAST_STATE_NAME = "{}-state"
DEFAULT_EPOCH_NAME = "epoch"
DEFAULT_STEP_NAME = "at"
DEFAULT_LAST_OUTPUT_NAME = "last"
#: what the fake network's set_multiplier last set (kohya's sampler does not know it; the fake logs it)
FAKE_STATE = {"multiplier": 1.0}
#: each family's sampler: kohya's defaults for what a prompt does not set, the size rounding, the smallest seed
SAMPLERS = {
    "sd": dict(pipeline="StableDiffusionPipeline", steps=30, scale=7.5, size=512, multiple=8, min_seed=0),
    "sdxl": dict(pipeline="StableDiffusionXLPipeline", steps=30, scale=7.5, size=512, multiple=8, min_seed=0),
    "sd3": dict(pipeline="StableDiffusion3Pipeline", steps=30, scale=7.5, size=512, multiple=8, min_seed=0),
    "flux": dict(pipeline="FluxPipeline", steps=20, scale=1.0, guidance=3.5, size=512, multiple=16, min_seed=0),
    "lumina": dict(pipeline="Lumina2Pipeline", steps=36, scale=3.5, size=1024, multiple=8, min_seed=1),
}


def get_epoch_ckpt_name(args, ext, epoch_no):
    return EPOCH_FILE_NAME.format(args.output_name or "epoch", epoch_no) + ext


def get_step_ckpt_name(args, ext, step_no):
    return STEP_FILE_NAME.format(args.output_name or DEFAULT_STEP_NAME, step_no) + ext


def get_last_ckpt_name(args, ext):
    return (args.output_name or "last") + ext


def get_remove_epoch_no(args, epoch_no):
    if args.save_last_n_epochs is None:
        return None
    number = epoch_no - args.save_every_n_epochs * args.save_last_n_epochs
    return number if number >= 0 else None


def prepare_dtype(args):
    return torch.float32, None


def default_if_none(value, default):
    return default if value is None else value


def fake_event(args, **event):
    """The fake's own log of what it saved and loaded (kohya logs these lines to the console)."""
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "fake_events.jsonl"), "a", encoding="utf-8") as log:
        log.write(json.dumps(event) + "\\n")


def prepare_accelerator(args):
    """kohya's rules for the trackers: --logging_dir alone means tensorboard; W&B writes under --logging_dir."""
    from accelerate import Accelerator

    log_with = args.log_with
    if log_with is None and args.logging_dir is not None:
        log_with = "tensorboard"
    if log_with in ("wandb", "all") and args.logging_dir is not None:
        os.makedirs(args.logging_dir, exist_ok=True)
        os.environ["WANDB_DIR"] = args.logging_dir
    return Accelerator(log_with=log_with, project_dir=args.logging_dir, cpu=args.fake_cpu)


def init_trackers(accelerator, args, default_tracker_name):
    if accelerator.is_main_process:
        accelerator.init_trackers(default_tracker_name, config={"output_name": args.output_name})
        if "wandb" in [tracker.name for tracker in accelerator.trackers]:
            wandb_tracker = accelerator.get_tracker("wandb", unwrap=True)
            wandb_tracker.define_metric("epoch", hidden=True)
            wandb_tracker.define_metric("val_step", hidden=True)
            wandb_tracker.define_metric("global_step", hidden=True)


def resume_from_local_or_hf_if_specified(accelerator, args):
    if not args.resume:
        return
    accelerator.load_state(args.resume)
    fake_event(args, event="load_state", folder=os.path.basename(os.path.normpath(args.resume)))


def _save_state(args, accelerator, name):
    """accelerate's save_state into <output_dir>/<name>, logged as the fake's event."""
    os.makedirs(args.output_dir, exist_ok=True)
    state_dir = os.path.join(args.output_dir, name)
    accelerator.save_state(state_dir)
    fake_event(args, event="save_state", folder=name)


def save_and_remove_state_on_epoch_end(args, accelerator, epoch_no):
    model_name = default_if_none(args.output_name, DEFAULT_EPOCH_NAME)
    _save_state(args, accelerator, EPOCH_STATE_NAME.format(model_name, epoch_no))
    last_n_epochs = args.save_last_n_epochs_state if args.save_last_n_epochs_state else args.save_last_n_epochs
    if last_n_epochs is not None:
        remove_epoch_no = epoch_no - args.save_every_n_epochs * last_n_epochs
        state_dir_old = os.path.join(args.output_dir, EPOCH_STATE_NAME.format(model_name, remove_epoch_no))
        if os.path.exists(state_dir_old):
            shutil.rmtree(state_dir_old)


def save_and_remove_state_stepwise(args, accelerator, step_no):
    model_name = default_if_none(args.output_name, DEFAULT_STEP_NAME)
    _save_state(args, accelerator, STEP_STATE_NAME.format(model_name, step_no))


def save_state_on_train_end(args, accelerator):
    model_name = default_if_none(args.output_name, DEFAULT_LAST_OUTPUT_NAME)
    _save_state(args, accelerator, LAST_STATE_NAME.format(model_name))


def verify_command_line_training_args(args):
    pass


def read_config_from_file(args, parser):
    return args


KEYS = {"d": ("seed", int), "w": ("width", int), "h": ("height", int), "s": ("sample_steps", int), "l": ("scale", float),
        "g": ("guidance_scale", float), "n": ("negative_prompt", str)}


def line_to_prompt_dict(line):
    parts = line.split(" --")
    prompt = {"prompt": parts[0]}
    for part in parts[1:]:
        key, value = part.split(None, 1)
        name, kind = KEYS[key.lower()]
        prompt[name] = kind(value)
    return prompt


def load_prompts(path):
    if path.endswith(".txt"):
        prompts = [line.strip() for line in open(path, encoding="utf-8") if line.strip() and line[0] != "#"]
    else:
        with open(path, encoding="utf-8") as file:
            prompts = json.load(file)
    prompts = [line_to_prompt_dict(p) if isinstance(p, str) else dict(p) for p in prompts]
    for i, prompt in enumerate(prompts):
        prompt["enum"] = i
    return prompts


def components_with(vae, denoiser, text_encoders, denoiser_name="unet"):
    """The pipeline components of the loaded model with the models the trainer passed in."""
    components = dict(strategy_base.TokenizeStrategy.get_strategy().components)
    components.update(vae=vae, **{denoiser_name: denoiser})
    encoders = text_encoders if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    for i, encoder in enumerate(encoders):
        components["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = encoder
    return components


def pipeline_of(family, components):
    import diffusers

    extra = dict(requires_safety_checker=False) if family == "sd" else {}
    pipe = getattr(diffusers, SAMPLERS[family]["pipeline"])(**components, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample_images_common(family, accelerator, args, epoch, steps, components, te_outputs=None):
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
    sampler = SAMPLERS[family]
    pipe = pipeline_of(family, components)
    save_dir = args.output_dir + "/sample"
    os.makedirs(save_dir, exist_ok=True)
    prompts = load_prompts(args.sample_prompts)
    if accelerator.num_processes > 1:  # kohya splits the prompts between the processes; each writes its own
        prompts = prompts[accelerator.process_index::accelerator.num_processes]
    for prompt in prompts:
        seed = prompt.get("seed")
        assert seed is None or seed >= sampler["min_seed"], f"Invalid seed {seed}"
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        multiple = sampler["multiple"]
        width, height = (max(64, v - v % multiple) for v in (prompt.get("width", sampler["size"]), prompt.get("height", sampler["size"])))
        scale = prompt.get("scale", sampler["scale"])
        kwargs = dict(num_inference_steps=prompt.get("sample_steps", sampler["steps"]), width=width, height=height, generator=generator)
        guidance = None
        if family == "flux":
            guidance = prompt.get("guidance_scale", sampler["guidance"])
            kwargs["guidance_scale"] = guidance
            if scale != 1.0:
                kwargs.update(true_cfg_scale=scale, negative_prompt=prompt.get("negative_prompt", ""))
        else:
            kwargs.update(guidance_scale=scale, negative_prompt=prompt.get("negative_prompt", ""))
        cached = bool(te_outputs) and prompt["prompt"] in te_outputs
        if cached:
            kwargs.update(te_outputs[prompt["prompt"]])
        else:
            kwargs["prompt"] = prompt["prompt"]
        image = pipe(**kwargs).images[0]
        number = f"e{epoch:06d}" if epoch is not None else f"{steps:06d}"
        i = prompt["enum"]
        name = f"{'' if args.output_name is None else args.output_name + '_'}{number}_{i:02d}_{time.strftime('%Y%m%d%H%M%S')}{'' if seed is None else '_' + str(seed)}.png"
        image.save(os.path.join(save_dir, name))
        if getattr(args, "fake_corrupt_sample", None) == f"{epoch}:{i}":
            with open(os.path.join(save_dir, name), "r+b") as damaged:
                damaged.seek(40)
                damaged.write(b"\\x00" * 64)
        record = dict(family=family, file=name, epoch=epoch, steps=steps, seed=seed, multiplier=FAKE_STATE["multiplier"],
                      scale=scale, guidance_scale=guidance, width=width, height=height, cached=cached)
        with open(os.path.join(args.output_dir, "fake_samples.jsonl"), "a", encoding="utf-8") as log:
            log.write(json.dumps(record) + "\\n")
        if "wandb" in [tracker.name for tracker in accelerator.trackers]:  # sample_image_inference: not committed
            import wandb

            wandb_tracker = accelerator.get_tracker("wandb")
            wandb_tracker.log({f"sample_{i}": wandb.Image(image, caption=prompt["prompt"])}, commit=False)


def sample_images(accelerator, args, epoch, steps, device, vae, tokenizer, text_encoder, unet, prompt_replacement=None):
    sample_images_common("sd", accelerator, args, epoch, steps, components_with(vae, unet, text_encoder))
'''

TRAIN_NETWORK = '''
import argparse
import json
import math
import os
import time

import torch

from library import strategy_base, train_util


def kohya_metadata(args, epoch, steps):
    \"\"\"Some of the ss_* keys kohya's train_network.py writes into every network file it saves.\"\"\"
    return {"ss_epoch": str(epoch), "ss_steps": str(steps), "ss_output_name": str(args.output_name), "ss_network_module": "networks.lora",
            "ss_network_dim": "4", "ss_network_alpha": "4", "ss_base_model_version": "sd_v1", "ss_session_id": "1234"}


class FakeNetwork(torch.nn.Module):
    \"\"\"Stands for kohya's LoRANetwork, an nn.Module that accelerate prepares, saves and loads: its parameters are
    the denoiser's LoRA parameters (the same tensors); set_multiplier scales every LoRA layer; save_weights saves them.\"\"\"

    train_t5xxl = False

    def __init__(self, unet):
        super().__init__()
        self.targets = (unet,)  # a tuple: not a submodule, so the state holds the LoRA parameters only
        named = [(name, parameter) for name, parameter in unet.named_parameters() if "lora_" in name]
        self.lora_names = [name for name, _ in named]
        self.lora = torch.nn.ParameterList([parameter for _, parameter in named])
        self.multiplier = 1.0

    def set_multiplier(self, multiplier):
        from peft.tuners.lora import LoraLayer

        self.multiplier = multiplier
        train_util.FAKE_STATE["multiplier"] = multiplier
        for module in self.targets[0].modules():
            if isinstance(module, LoraLayer):
                module.set_scale("default", multiplier)

    def save_weights(self, file, dtype, metadata):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(self.targets[0]).items()}
        save_file(state, file, metadata={k: str(v) for k, v in (metadata or {}).items()})


class NetworkTrainer:
    pipeline_class = "StableDiffusionPipeline"
    load_kwargs = {"safety_checker": None, "requires_safety_checker": False}

    def load_target_model(self, args):
        import diffusers

        pipe = getattr(diffusers, self.pipeline_class).from_pretrained(args.pretrained_model_name_or_path, **self.load_kwargs)
        components = dict(pipe.components)
        strategy_base.TokenizeStrategy.set_strategy(strategy_base.TokenizeStrategy(components))
        text_encoders = [components[k] for k in sorted(components) if k.startswith("text_encoder") and components[k] is not None]
        tokenizers = [components[k] for k in sorted(components) if k.startswith("tokenizer") and components[k] is not None]
        denoiser = components.get("unet") or components["transformer"]
        return text_encoders, pipe.vae, denoiser, tokenizers

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset, weight_dtype):
        pass

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        pass

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizers, text_encoder, unet):
        train_util.sample_images(accelerator, args, epoch, global_step, device, vae, tokenizers[0], text_encoder, unet)

    def accelerator_logging(self, accelerator, logs, step_value, global_step, epoch):
        \"\"\"As kohya's: TensorBoard at step_value; W&B with no step (a new row each time), the steps in the row.\"\"\"
        for tracker in accelerator.trackers:
            if tracker.name == "wandb":
                accelerator.get_tracker("wandb").log({**logs, "global_step": global_step, "epoch": epoch})
            else:
                accelerator.get_tracker(tracker.name).log(logs, step=step_value)

    def train(self, args):
        from peft import LoraConfig, inject_adapter_in_model

        accelerator = train_util.prepare_accelerator(args)
        is_main_process = accelerator.is_main_process
        torch.manual_seed(args.seed)  # kohya: set_seed(args.seed); the LoRA's initial lora_A comes from it
        text_encoders, vae, unet, tokenizers = self.load_target_model(args)
        self.cache_text_encoder_outputs_if_needed(args, accelerator, unet, vae, text_encoders, None, torch.float32)
        inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]), unet)  # lora_B = 0
        network = FakeNetwork(unet)
        self.post_process_network(args, accelerator, network, text_encoders, unet)
        text_encoder = text_encoders[0] if len(text_encoders) == 1 else text_encoders
        optimizer = torch.optim.SGD(network.parameters(), lr=0.0)
        network, optimizer = accelerator.prepare(network, optimizer)
        current = {"epoch": 0, "step": 0}  # kohya's current_epoch and current_step
        steps_from_state = None

        def save_model_hook(models, weights, output_dir):
            if accelerator.is_main_process:
                for i in reversed([i for i, model in enumerate(models) if not isinstance(model, type(accelerator.unwrap_model(network)))]):
                    if len(weights) > i:
                        weights.pop(i)
            with open(os.path.join(output_dir, "train_state.json"), "w", encoding="utf-8") as f:
                json.dump({"current_epoch": current["epoch"], "current_step": current["step"] + 1}, f)

        def load_model_hook(models, input_dir):
            nonlocal steps_from_state
            for i in reversed([i for i, model in enumerate(models) if not isinstance(model, type(accelerator.unwrap_model(network)))]):
                models.pop(i)
            train_state_file = os.path.join(input_dir, "train_state.json")
            if os.path.exists(train_state_file):
                with open(train_state_file, encoding="utf-8") as f:
                    steps_from_state = json.load(f)["current_step"]

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)
        train_util.resume_from_local_or_hf_if_specified(accelerator, args)

        steps_per_epoch = 2
        if args.max_train_epochs is not None:
            args.max_train_steps = args.max_train_epochs * steps_per_epoch
        num_train_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
        initial_step = steps_from_state or 0
        epoch_to_start = initial_step // steps_per_epoch  # no --skip_until_initial_step: only the epochs are skipped
        global_step = 0  # kohya counts the steps of this start only
        schedule = [float(x) for x in args.fake_schedule.split(",")]

        train_util.init_trackers(accelerator, args, "network_train")
        self.sample_images(accelerator, args, 0, global_step, accelerator.device, vae, tokenizers, text_encoder, unet)
        is_tracking = len(accelerator.trackers) > 0
        if is_tracking:
            accelerator.log({}, step=0)  # kohya: "log empty object to commit the sample images to wandb"
        lora = accelerator.unwrap_model(network)
        for epoch in range(epoch_to_start, num_train_epochs):
            current["epoch"] = epoch + 1
            for step in range(steps_per_epoch):
                current["step"] = global_step
                generator = torch.Generator().manual_seed(epoch)
                with torch.no_grad():
                    for name, parameter in zip(lora.lora_names, lora.lora):
                        if "lora_B" in name:
                            parameter.copy_(torch.randn(parameter.shape, generator=generator) * schedule[min(epoch, len(schedule) - 1)])
                global_step += 1
                self.sample_images(accelerator, args, None, global_step, accelerator.device, vae, tokenizers, text_encoder, unet)
                if args.save_every_n_steps is not None and global_step % args.save_every_n_steps == 0:
                    accelerator.wait_for_everyone()
                    if is_main_process:
                        name = train_util.get_step_ckpt_name(args, "." + args.save_model_as, global_step)
                        lora.save_weights(os.path.join(args.output_dir, name), None, kohya_metadata(args, epoch, global_step))
                        if args.save_state:
                            train_util.save_and_remove_state_stepwise(args, accelerator, global_step)
                if is_tracking:
                    self.accelerator_logging(accelerator, {"loss/current": 0.1, "lr/unet": 1e-4}, global_step, global_step, epoch + 1)
                if global_step >= args.max_train_steps:
                    break
            if is_tracking:
                self.accelerator_logging(accelerator, {"loss/epoch_average": 0.1}, epoch + 1, global_step, epoch + 1)
            accelerator.wait_for_everyone()
            if args.save_every_n_epochs is not None:
                saving = (epoch + 1) % args.save_every_n_epochs == 0 and (epoch + 1) < num_train_epochs
                if is_main_process and saving:
                    name = train_util.get_epoch_ckpt_name(args, "." + args.save_model_as, epoch + 1)
                    lora.save_weights(os.path.join(args.output_dir, name), None, kohya_metadata(args, epoch + 1, global_step))
                    remove = train_util.get_remove_epoch_no(args, epoch + 1)
                    if remove is not None:
                        old = os.path.join(args.output_dir, train_util.get_epoch_ckpt_name(args, "." + args.save_model_as, remove))
                        if os.path.exists(old):
                            os.remove(old)
                    if args.save_state:
                        train_util.save_and_remove_state_on_epoch_end(args, accelerator, epoch + 1)
            if args.fake_fail_at_epoch == epoch + 1:
                raise ValueError(f"fake failure inside kohya's training loop at epoch {epoch + 1}")
            self.sample_images(accelerator, args, epoch + 1, global_step, accelerator.device, vae, tokenizers, text_encoder, unet)
        accelerator.end_training()
        if is_main_process and (args.save_state or args.save_state_on_train_end):
            train_util.save_state_on_train_end(args, accelerator)
        name = train_util.get_last_ckpt_name(args, "." + args.save_model_as)
        metadata = dict(kohya_metadata(args, num_train_epochs, global_step), ss_training_finished_at=str(time.time()))
        if is_main_process:
            lora.save_weights(os.path.join(args.output_dir, name), None, metadata)


def setup_parser():
    parser = argparse.ArgumentParser()
    parser.add_argument("--pretrained_model_name_or_path")
    parser.add_argument("--train_data_dir", default=None)  # read by kohya's data set; the fake trains on nothing
    parser.add_argument("--network_module", default=None)  # the fake's network is always its peft LoRA
    parser.add_argument("--output_dir")
    parser.add_argument("--output_name", default=None)
    parser.add_argument("--save_model_as", default="safetensors")
    parser.add_argument("--max_train_steps", type=int, default=1600)
    parser.add_argument("--max_train_epochs", type=int, default=None)
    parser.add_argument("--save_every_n_epochs", type=int, default=None)
    parser.add_argument("--save_last_n_epochs", type=int, default=None)
    parser.add_argument("--save_last_n_epochs_state", type=int, default=None)
    parser.add_argument("--save_every_n_steps", type=int, default=None)
    parser.add_argument("--save_state", action="store_true")
    parser.add_argument("--save_state_on_train_end", action="store_true")
    parser.add_argument("--resume", default=None)
    parser.add_argument("--sample_prompts", default=None)
    parser.add_argument("--sample_every_n_epochs", type=int, default=None)
    parser.add_argument("--sample_every_n_steps", type=int, default=None)
    parser.add_argument("--sample_at_first", action="store_true")
    parser.add_argument("--log_with", default=None, choices=["tensorboard", "wandb", "all"])
    parser.add_argument("--logging_dir", default=None)
    parser.add_argument("--network_weights", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fake_schedule", default="0.1")
    parser.add_argument("--fake_cpu", action="store_true", help="Accelerator(cpu=True): several CPU processes under accelerate launch --multi_gpu")
    parser.add_argument("--fake_fail_at_epoch", type=int, default=None, help="raise a ValueError in the loop at this epoch's end")
    parser.add_argument("--fake_corrupt_sample", default=None, help="EPOCH:INDEX: that sample is written as bytes that do not decode")
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    NetworkTrainer().train(args)
'''

# The family samplers, with the signatures of sd-scripts' own library functions.
FAMILY_LIBRARIES = {
    "sdxl_train_util.py": '''
from library import train_util


def sample_images(accelerator, args, epoch, steps, device, vae, tokenizer, text_encoder, unet, prompt_replacement=None, controlnet=None):
    train_util.sample_images_common("sdxl", accelerator, args, epoch, steps, train_util.components_with(vae, unet, text_encoder))
''',
    "sd3_train_utils.py": '''
from library import train_util


def sample_images(accelerator, args, epoch, steps, mmdit, vae, text_encoders, sample_prompts_te_outputs, prompt_replacement=None):
    components = train_util.components_with(vae, mmdit, text_encoders, "transformer")
    train_util.sample_images_common("sd3", accelerator, args, epoch, steps, components, sample_prompts_te_outputs)
''',
    "flux_train_utils.py": '''
import torch

from library import strategy_base, train_util


def encode_sample_prompts(args, text_encoders):
    """kohya encodes the sample prompts once, before training, when text encoder outputs are cached."""
    loaded = strategy_base.TokenizeStrategy.get_strategy().components
    pipe = train_util.pipeline_of("flux", train_util.components_with(loaded["vae"], loaded["transformer"], text_encoders, "transformer"))
    outputs = {}
    with torch.no_grad():
        for prompt in train_util.load_prompts(args.sample_prompts):
            embeds, pooled, _ = pipe.encode_prompt(prompt=prompt["prompt"], prompt_2=None)
            outputs[prompt["prompt"]] = dict(prompt_embeds=embeds, pooled_prompt_embeds=pooled)
    return outputs


def sample_images(accelerator, args, epoch, steps, flux, ae, text_encoders, sample_prompts_te_outputs, prompt_replacement=None, controlnet=None):
    components = train_util.components_with(ae, flux, text_encoders, "transformer")
    train_util.sample_images_common("flux", accelerator, args, epoch, steps, components, sample_prompts_te_outputs)
''',
    "lumina_train_util.py": '''
from library import train_util


def sample_images(accelerator, args, epoch, global_step, nextdit, vae, gemma2_model, sample_prompts_gemma2_outputs, prompt_replacement=None, controlnet=None):
    components = train_util.components_with(vae, nextdit, gemma2_model, "transformer")
    train_util.sample_images_common("lumina", accelerator, args, epoch, global_step, components, sample_prompts_gemma2_outputs)
''',
}

FAMILY_SCRIPTS = {
    "sdxl_train_network.py": '''
import train_network
from library import sdxl_train_util, train_util


class SdxlNetworkTrainer(train_network.NetworkTrainer):
    pipeline_class = "StableDiffusionXLPipeline"
    load_kwargs = {}

    def __init__(self):
        super().__init__()
        self.is_sdxl = True

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizer, text_encoder, unet):
        sdxl_train_util.sample_images(accelerator, args, epoch, global_step, device, vae, tokenizer, text_encoder, unet)


def setup_parser():
    parser = train_network.setup_parser()
    parser.add_argument("--cache_text_encoder_outputs", action="store_true")
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    SdxlNetworkTrainer().train(args)
''',
    "sd3_train_network.py": '''
import train_network
from library import sd3_train_utils, train_util


class Sd3NetworkTrainer(train_network.NetworkTrainer):
    pipeline_class = "StableDiffusion3Pipeline"
    load_kwargs = {}

    def __init__(self):
        super().__init__()
        self.sample_prompts_te_outputs = None

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        self.train_t5xxl = network.train_t5xxl

    def get_models_for_text_encoding(self, args, accelerator, text_encoders):
        return text_encoders

    def sample_images(self, accelerator, args, epoch, global_step, device, vae, tokenizer, text_encoder, mmdit):
        text_encoders = text_encoder  # for compatibility
        text_encoders = self.get_models_for_text_encoding(args, accelerator, text_encoders)
        sd3_train_utils.sample_images(accelerator, args, epoch, global_step, mmdit, vae, text_encoders, self.sample_prompts_te_outputs)


def setup_parser():
    parser = train_network.setup_parser()
    parser.add_argument("--training_shift", type=float, default=1.0)
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    Sd3NetworkTrainer().train(args)
''',
    "flux_train_network.py": '''
import train_network
from library import flux_train_utils, train_util


class FluxNetworkTrainer(train_network.NetworkTrainer):
    pipeline_class = "FluxPipeline"
    load_kwargs = {}

    def __init__(self):
        super().__init__()
        self.sample_prompts_te_outputs = None

    def cache_text_encoder_outputs_if_needed(self, args, accelerator, unet, vae, text_encoders, dataset, weight_dtype):
        if args.cache_text_encoder_outputs:
            self.sample_prompts_te_outputs = flux_train_utils.encode_sample_prompts(args, text_encoders)

    def post_process_network(self, args, accelerator, network, text_encoders, unet):
        self.train_t5xxl = network.train_t5xxl

    def get_models_for_text_encoding(self, args, accelerator, text_encoders):
        return text_encoders

    def sample_images(self, accelerator, args, epoch, global_step, device, ae, tokenizer, text_encoder, flux):
        text_encoders = text_encoder  # for compatibility
        text_encoders = self.get_models_for_text_encoding(args, accelerator, text_encoders)
        flux_train_utils.sample_images(accelerator, args, epoch, global_step, flux, ae, text_encoders, self.sample_prompts_te_outputs)


def setup_parser():
    parser = train_network.setup_parser()
    parser.add_argument("--cache_text_encoder_outputs", action="store_true")
    parser.add_argument("--apply_t5_attn_mask", action="store_true")
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    FluxNetworkTrainer().train(args)
''',
    "lumina_train_network.py": '''
import train_network
from library import lumina_train_util, train_util


class LuminaNetworkTrainer(train_network.NetworkTrainer):
    pipeline_class = "Lumina2Pipeline"
    load_kwargs = {}

    def __init__(self):
        super().__init__()
        self.sample_prompts_te_outputs = None

    def get_models_for_text_encoding(self, args, accelerator, text_encoders):
        return text_encoders

    def sample_images(
        self,
        accelerator,
        args,
        epoch,
        global_step,
        device,
        vae,
        tokenizer,
        text_encoder,
        lumina,
    ):
        lumina_train_util.sample_images(
            accelerator,
            args,
            epoch,
            global_step,
            lumina,
            vae,
            self.get_models_for_text_encoding(args, accelerator, text_encoder),
            self.sample_prompts_te_outputs,
        )


def setup_parser():
    parser = train_network.setup_parser()
    parser.add_argument("--discrete_flow_shift", type=float, default=6.0)
    return parser


if __name__ == "__main__":
    parser = setup_parser()
    args = parser.parse_args()
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    LuminaNetworkTrainer().train(args)
''',
}


def write_fake_checkout(root: Path, scripts: tuple[str, ...] | None = None, commit: str | None = None) -> Path:
    """Write the fake checkout into `root`: train_network.py and library/, plus the family scripts named
    in `scripts` (default: all of them). `commit`: also a .git whose HEAD is that commit on a branch."""
    root.mkdir(parents=True, exist_ok=True)
    library = root / "library"
    library.mkdir(exist_ok=True)
    (library / "__init__.py").write_text("")
    (library / "strategy_base.py").write_text(textwrap.dedent(STRATEGY_BASE))
    (library / "train_util.py").write_text(textwrap.dedent(TRAIN_UTIL))
    for name, text in FAMILY_LIBRARIES.items():
        (library / name).write_text(textwrap.dedent(text))
    (root / "networks").mkdir(exist_ok=True)
    (root / "train_network.py").write_text(textwrap.dedent(TRAIN_NETWORK))
    for name in FAMILY_SCRIPTS if scripts is None else scripts:
        (root / name).write_text(textwrap.dedent(FAMILY_SCRIPTS[name]))
    if commit is not None:
        git = root / ".git"
        (git / "refs" / "heads").mkdir(parents=True, exist_ok=True)
        (git / "HEAD").write_text("ref: refs/heads/main\n")
        (git / "refs" / "heads" / "main").write_text(commit + "\n")
    return root
