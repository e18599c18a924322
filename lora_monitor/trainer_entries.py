"""The layouts of the trainers that write plain sample files: ai-toolkit, OneTrainer, kohya sd-scripts, musubi-tuner.

One `TrainerLayout` (lora_monitor.trainer_files) per trainer: the sample and checkpoint names and what they encode
(the round's step or epoch, the prompt, the seed), the file saved at the end and which round it holds, the
before-training (base) round, how the trainer can be told to stop, and its video sample formats. Every value
cites the code that writes that name: repository, path and function, at the commit in the entry's `source`.
Nothing of the trainers is imported, and no torch. The diffusers-based trainers (SimpleTuner, the diffusers
example scripts) are in `trainer_entries_diffusers`; `trainer_layouts` finds and reads all of them.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

from lora_monitor import kohya_names
from lora_monitor.trainer_files import CheckpointName, RoundKey, SampleName, TrainerLayout, animated_webp

# ------------------------------------------------------------------------------------ ai-toolkit
# jobs/process/BaseSDTrainProcess.py sample(): f"[time]_{step_num}_[count].{ext}" with step_num = f"_{step:09d}";
# toolkit/config_modules.py GenerateImageConfig._get_path_no_ext(): [time] = int(time.time() * 1000) (set_gen_time in
# save_image), [count] = the prompt's index zero-padded to len(str(max_count)); save_image_atomic(img, i) passes
# max_count 0, so the index is not padded. ext: sample.format, 'jpg' by default (SampleConfig).
_AITK_SAMPLE = re.compile(r"^(?P<ms>\d+)__(?P<step>\d{9})_(?P<prompt>\d+)\.(?P<ext>jpg|jpeg|png|webp|mp4)$")
# BaseSDTrainProcess.save(): f"{job name}{'_LoRA' if named_lora}_{step:09d}.safetensors" in save_root.
_AITK_CHECKPOINT = re.compile(r"^(?P<name>.+)_(?P<step>\d{9})\.safetensors$")


def _aitk_sample(path: Path) -> SampleName | None:
    match = _AITK_SAMPLE.match(path.name)
    if match is None:
        return None
    video = match["ext"] == "mp4" or (match["ext"] == "webp" and animated_webp(path))
    return SampleName(path, RoundKey("step", int(match["step"])), int(match["prompt"]), None, video, match["ms"].zfill(16))


def _aitk_checkpoint(path: Path) -> CheckpointName | None:
    match = _AITK_CHECKPOINT.match(path.name)
    return None if match is None else CheckpointName(path, RoundKey("step", int(match["step"])), match["name"])


def _aitk_final_rounds(metadata: Mapping[str, str]) -> tuple[RoundKey, ...]:
    # BaseSDTrainProcess.update_training_metadata(): training_info = {"step": step_num, "epoch": epoch_num},
    # stored as a JSON string by toolkit/metadata.py get_meta_for_safetensors().
    try:
        return (RoundKey("step", int(json.loads(metadata["training_info"])["step"])),)
    except (KeyError, ValueError, TypeError):
        return ()


AI_TOOLKIT = TrainerLayout(
    name="ai-toolkit",
    title="ostris/ai-toolkit",
    source="ostris/ai-toolkit@27a03a91f23eb1b757d5ec2e80ee3e129cfcc350",
    # the folder: {training_folder}/{job name} (jobs/process/BaseTrainProcess.py: save_root); samples in
    # save_root/samples (BaseSDTrainProcess.sample(): sample_folder)
    sample_globs=("samples/*",),
    parse_sample=_aitk_sample,
    sample_example="1724680000123__000000250_0.jpg",
    checkpoint_globs=("*.safetensors",),
    parse_checkpoint=_aitk_checkpoint,
    checkpoint_example="my_lora_000000250.safetensors",
    checkpoint_file=None,
    # BaseSDTrainProcess.run(): after the loop save() with no step -> f"{job name}.safetensors", then
    # sample(self.step_num): the final file holds the last round's weights (its training_info step)
    final_globs=("*.safetensors",),
    final_rounds=_aitk_final_rounds,
    base_key=RoundKey("step", 0),
    base_round=("<ms>__000000000_<i>.<ext>: BaseSDTrainProcess.run() 'Generating baseline samples before training' "
                "(sample(self.step_num) at step 0; also sample(0, is_first=True) for a first_sample config) unless "
                "train.skip_first_sample or train.disable_sampling"),
    base_globs=(),
    parse_base=None,
    stop=("no stop file: its UI sets stop = 1 on the job's row of the Job table in its SQLite database "
          "(config sqlite_db_path, ./aitk_db.db; job id in AITK_JOB_ID), read by extensions_built_in/sd_trainer/"
          "DiffusionTrainer.py should_stop()/maybe_stop(); on Linux the UI sends SIGINT, which run.py takes as "
          "KeyboardInterrupt -> on_error(), without a save"),
    # toolkit/config_modules.py SampleConfig/GenerateImageConfig.save_image(): num_frames > 1 -> animated webp;
    # extensions_built_in/diffusion_models/ltx2/ltx2.py and minimax_h3/minimax_h3.py new_save_image_function() -> mp4
    video_formats=("webp", "mp4"),
    temp_names=("samples/.tmp/<name>: GenerateImageConfig.save_image_atomic() writes there and os.replace()s into "
                "samples/; thumbnails go to samples/.thumbs/<name>.jpg"),
    markers=("samples/.tmp", "samples/.thumbs"),
    notes=("checkpoints past save.max_step_saves_to_keep are deleted (BaseSDTrainProcess.clean_up_saves())",
           "save(N) runs just before sample(N) in the same step: a round and its checkpoint hold the same weights",
           "seeds are not in the names (sample.seed, walk_seed: BaseSDTrainProcess.sample())"),
)


# ------------------------------------------------------------------------------------ OneTrainer
# modules/trainer/GenericTrainer.py __sample_loop(): samples/f"{i} - {safe_prompt}{folder_postfix}"/
# f"{save_filename_prefix}{get_string_timestamp()}-training-sample-{train_progress.filename_string()}", the extension
# added by modules/modelSampler/BaseModelSampler.py save_sampler_output(). i: the prompt's index in the sample list
# (disabled ones counted); filename_string() (modules/util/TrainProgress.py) = f"{global_step}-{epoch}-{epoch_step}";
# get_string_timestamp() (modules/util/time_util.py) = "%Y-%m-%d_%H-%M-%S".
_OT_PROMPT_FOLDER = re.compile(r"^(?P<prompt>\d+) - (?P<text>.*)$")
_OT_PROGRESS = r"(?P<stamp>\d{4}-\d{2}-\d{2}_\d{2}-\d{2}-\d{2})-{kind}-(?P<step>\d+)-(?P<epoch>\d+)-(?P<epoch_step>\d+)"
_OT_SAMPLE = re.compile(r"^(?P<prefix>.*?)" + _OT_PROGRESS.replace("{kind}", "training-sample") + r"\.(?P<ext>png|jpg|mp4)$")
# GenericTrainer.__save(): save/f"{save_filename_prefix}{get_string_timestamp()}-save-{filename_string()}{ext}",
# ext from modules/util/enum/ModelFormat.py file_extension(): ".safetensors" for every LoRA format.
_OT_CHECKPOINT = re.compile(r"^(?P<prefix>.*?)" + _OT_PROGRESS.replace("{kind}", "save") + r"\.safetensors$")
_OT_NO_EMA = " - no-ema"  # GenericTrainer.__sample_during_training(): folder_postfix of the non-EMA pass


def _ot_sample(path: Path) -> SampleName | None:
    folder = _OT_PROMPT_FOLDER.match(path.parent.name)
    match = _OT_SAMPLE.match(path.name)
    if folder is None or match is None or path.parent.name.endswith(_OT_NO_EMA):
        return None
    return SampleName(path, RoundKey("step", int(match["step"])), int(folder["prompt"]), None,
                      match["ext"] == "mp4", match["stamp"])


def _ot_checkpoint(path: Path) -> CheckpointName | None:
    match = _OT_CHECKPOINT.match(path.name)
    return None if match is None else CheckpointName(path, RoundKey("step", int(match["step"])), match["prefix"])


ONETRAINER = TrainerLayout(
    name="onetrainer",
    title="Nerogar/OneTrainer",
    source="Nerogar/OneTrainer@23df3832e8f213d64c337e39f9365ba46e99fed0",
    sample_globs=("samples/*/*",),  # the folder: workspace_dir (TrainConfig default "workspace/run")
    parse_sample=_ot_sample,
    sample_example="0 - a photo of sks dog/2026-08-19_12-00-00-training-sample-250-1-50.jpg",
    checkpoint_globs=("save/*.safetensors",),
    parse_checkpoint=_ot_checkpoint,
    checkpoint_example="save/2026-08-19_12-00-05-save-249-1-49.safetensors",
    checkpoint_file=None,
    # GenericTrainer.end(): the final model goes to output_model_destination (TrainConfig default
    # "models/model.safetensors", relative to OneTrainer's working folder, not the workspace)
    final_globs=(),
    final_rounds=None,
    base_key=RoundKey("step", 0),
    base_round=("<ts>-training-sample-0-0-0.<ext>: the first batch samples before training (GenericTrainer."
                "__needs_sample(): modules/util/TimedActionMixin.py repeating_action_needed() with start_at_zero) "
                "unless sample_skip_first > 0"),
    base_globs=(),
    parse_base=None,
    stop=("no stop file: TrainCommands.stop() (the UI's stop button; modules/util/commands/TrainCommands.py) is "
          "checked every step in GenericTrainer.train(), after which end() saves the final model; scripts/train.py "
          "catches Ctrl+C (SIGINT) and then runs end() only when backup_before_save (the default)"),
    # BaseModelSampler.save_sampler_output(): videos through av/libx264; TrainConfig sample_video_format MP4
    video_formats=("mp4",),
    temp_names=None,  # PIL and av write the final name directly: is_finished() tells a half-written file
    markers=("backup/*-backup-*",),  # GenericTrainer.__backup(): backup/f"{timestamp}-backup-{filename_string()}"
    # GenericTrainer.train(): at the top of each batch __needs_sample() enqueues the sample and __needs_save() sets
    # the save command; both run only `if not has_gradient` (no gradient-accumulation step pending), reading the
    # live train_progress: a sample or save is named with the global step it runs at, and holds the weights of
    # that moment (before that batch trains). The names therefore always match the weights: a save and a sample
    # of one name hold the same weights, and checkpoint_for() looks for that name only.
    notes=("with STEP units and gradient_accumulation_steps 1 a save runs one step before the sample of the same "
           "interval (__needs_save() start_at_zero=False: (global_step + 1) % n == 0; __needs_sample(): global_step "
           "% n == 0), is named so and holds the weights one optimizer step earlier: no file holds the round's "
           "weights. With more accumulation steps the save waits for the next update boundary (has_gradient), "
           "where the sample runs too: same name, same weights. With EPOCH units both run at the epoch's first "
           "batch, samples first, under one name",
           "save_every_unit defaults to NEVER (TrainConfig): no intermediate checkpoints unless asked",
           "with EMA the '<i> - <prompt>' folders hold EMA samples, '<i> - <prompt> - no-ema' the raw weights' "
           "(skipped here); checkpoints hold the EMA weights (GenericTrainer.__save(): copy_ema_to)",
           "samples/custom/ holds samples asked for from the UI (skipped); seeds are not in the names"),
)



# ---------------------------------------------------------------------------- kohya sd-scripts / musubi
# kohya-ss/sd-scripts library/train_util.py sample_image_inference() and kohya-ss/musubi-tuner
# src/musubi_tuner/training/trainer_base.py NetworkTrainer.sample_image_inference(): f"{output_name + '_'}{num_suffix}
# _{enum:02d}_{%Y%m%d%H%M%S}{'_' + seed}", num_suffix = f"e{epoch:06d}" for epoch rounds, f"{steps:06d}" for step
# rounds. Epoch names are parsed by lora_monitor.kohya_names; the step form is below.
_KOHYA_STEP = r"^(?:(?P<name>.+)_)?(?P<step>\d{6,})_(?P<prompt>\d{2,})_(?P<stamp>\d{14})(?:_(?P<seed>\d+))?"
_KOHYA_STEP_SAMPLE = re.compile(_KOHYA_STEP + r"\.png$")
# musubi writes images through src/musubi_tuner/hv_generate_video.py save_images_grid(): f"{name}_{frame:03d}.png"
# (an image is one frame: always _000), and videos through save_videos_grid() as f"{name}.mp4".
_MUSUBI_SAMPLE = re.compile(
    r"^(?:(?P<name>.+)_)?(?:e(?P<epoch>\d{6})|(?P<step>\d{6,}))_(?P<prompt>\d{2,})_(?P<stamp>\d{14})(?:_(?P<seed>\d+))?"
    r"(?:_(?P<frame>000)\.png|\.mp4)$"
)
# train_util.get_step_ckpt_name() / musubi utils/train_utils.py get_step_ckpt_name(): STEP_FILE_NAME "{}-step{:08d}";
# the epoch form EPOCH_FILE_NAME "{}-{:06d}" is kohya_names.CHECKPOINT_NAME.
_KOHYA_STEP_CHECKPOINT = re.compile(r"^(?P<name>.+)-step(?P<step>\d{8,})\.safetensors$")


def _seed(text: str | None) -> int | None:
    return None if text is None else int(text)


def _kohya_sample(path: Path) -> SampleName | None:
    parsed = kohya_names.parse_sample_name(path)
    if parsed is not None:
        # a seed never prints with a leading zero: "..._000.png" is musubi's frame suffix, not a kohya seed
        if parsed.seed is not None and not path.stem.endswith(f"_{parsed.seed}"):
            return None
        return SampleName(path, RoundKey("epoch", parsed.epoch), parsed.index, parsed.seed, False, parsed.stamp)
    match = _KOHYA_STEP_SAMPLE.match(path.name)
    if match is None or (match["seed"] is not None and match["seed"] != str(int(match["seed"]))):
        return None
    return SampleName(path, RoundKey("step", int(match["step"])), int(match["prompt"]), _seed(match["seed"]), False, match["stamp"])


def _musubi_sample(path: Path) -> SampleName | None:
    match = _MUSUBI_SAMPLE.match(path.name)
    if match is None:
        return None
    key = RoundKey("epoch", int(match["epoch"])) if match["epoch"] is not None else RoundKey("step", int(match["step"]))
    return SampleName(path, key, int(match["prompt"]), _seed(match["seed"]), match["frame"] is None, match["stamp"])


def _kohya_checkpoint(path: Path) -> CheckpointName | None:
    match = kohya_names.CHECKPOINT_NAME.match(path.name)
    if match is not None:
        return CheckpointName(path, RoundKey("epoch", int(match["epoch"])), match["name"])
    match = _KOHYA_STEP_CHECKPOINT.match(path.name)
    return None if match is None else CheckpointName(path, RoundKey("step", int(match["step"])), match["name"])


def _kohya_final_rounds(metadata: Mapping[str, str]) -> tuple[RoundKey, ...]:
    # save_model() in train_network.py NetworkTrainer.train() / musubi NetworkTrainer.train() stores ss_steps and
    # ss_epoch (the last call: global_step, num_train_epochs); --no_metadata leaves them out
    rounds = []
    for unit, key in (("epoch", "ss_epoch"), ("step", "ss_steps")):
        try:
            rounds.append(RoundKey(unit, int(metadata[key])))
        except (KeyError, ValueError):
            pass
    return tuple(rounds)


KOHYA = TrainerLayout(
    name="kohya",
    title="kohya-ss/sd-scripts",
    source="kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb",
    sample_globs=("sample/*.png",),  # train_util.sample_images_common(): save_dir = output_dir/sample
    parse_sample=_kohya_sample,
    sample_example="my_lora_e000003_00_20260216120000_42.png",
    checkpoint_globs=("*.safetensors",),
    parse_checkpoint=_kohya_checkpoint,
    checkpoint_example="my_lora-000003.safetensors",
    checkpoint_file=None,
    # train_util.get_last_ckpt_name() (kohya_names.last_checkpoint_name): f"{output_name}.safetensors"; the last
    # epoch has no epoch file ((epoch + 1) < num_train_epochs in train_network.py NetworkTrainer.train())
    final_globs=("*.safetensors",),
    final_rounds=_kohya_final_rounds,
    base_key=RoundKey("epoch", 0),
    base_round=("<name>_e000000_<i>_<ts>_<seed>.png with --sample_at_first: train_network.py NetworkTrainer.train() "
                "calls sample_images(accelerator, args, 0, global_step, ...)"),
    base_globs=(),
    parse_base=None,
    stop=None,  # no stop file and no signal handler: Ctrl+C ends it without a save
    video_formats=(),
    temp_names=None,  # image.save() to the final name
    notes=("the epoch file is saved before that epoch's samples are rendered: same weights",
           "--save_last_n_epochs / --save_last_n_steps delete older files"),
)

MUSUBI = TrainerLayout(
    name="musubi-tuner",
    title="kohya-ss/musubi-tuner",
    source="kohya-ss/musubi-tuner@30c658c4f4b0bf05038b3346eff9670259b10fc7",
    sample_globs=("sample/*.png", "sample/*.mp4"),  # NetworkTrainer.sample_images(): save_dir = output_dir/sample
    parse_sample=_musubi_sample,
    sample_example="my_lora_e000003_00_20260624120000_42_000.png",
    checkpoint_globs=("*.safetensors",),
    parse_checkpoint=_kohya_checkpoint,  # utils/train_utils.py: the same EPOCH_FILE_NAME and STEP_FILE_NAME
    checkpoint_example="my_lora-000003.safetensors",
    checkpoint_file=None,
    # train_utils.get_last_ckpt_name(): f"{output_name}.safetensors", saved after the loop; the last epoch has no
    # epoch file ((epoch + 1) < num_train_epochs in NetworkTrainer.train())
    final_globs=("*.safetensors",),
    final_rounds=_kohya_final_rounds,
    base_key=RoundKey("epoch", 0),
    base_round=("<name>_e000000_<i>_<ts>_<seed>_000.png with --sample_at_first: NetworkTrainer.train() calls "
                "_do_sample(0, global_step) when training/sampling_prompts.py should_sample_images(args, 0, epoch=0)"),
    base_globs=(),
    parse_base=None,
    stop=None,  # as sd-scripts: no stop file, no signal handler
    video_formats=("mp4",),  # NetworkTrainer.sample_image_inference(): frames > 1 -> save_videos_grid()
    temp_names=None,
    notes=("step and epoch rounds share the folder; a step round at a step that ends an epoch is rendered twice, "
           "as <step> and as e<epoch> (should_sample_images() ignores the epoch for step sampling)",
           "epoch and step files are saved before the samples of that epoch or step: same weights"),
)

