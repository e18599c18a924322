"""Where each trainer writes its preview samples and LoRA checkpoints, as data (issue 13, "watch any trainer").

One `TrainerLayout` per trainer: the sample and checkpoint names and what they encode (the round's
step or epoch, the prompt, the seed), the file saved at the end and which round it holds, the
before-training (base) round, how the trainer can be told to stop, and its video sample formats.
Every value cites the code that writes that name: repository, path and function, at the commit in
the entry's `source`. Nothing of the trainers is imported, and no torch: names, folders and headers.

`detect_layout(folder)` tells the trainer from a folder's contents, `sample_rounds` groups the
finished sample files into rounds (skipping half-written ones), `checkpoint_for` finds the LoRA
file that holds a round's weights.
"""
from __future__ import annotations

import difflib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

from lora_monitor import kohya_names

UNITS = ("step", "epoch")


class RoundKey(NamedTuple):
    """A sample round: the trainer's step or epoch counter in its names (number 0: before training)."""

    unit: str
    number: int

    def __str__(self) -> str:
        return f"{self.unit} {self.number}"


@dataclass(frozen=True)
class SampleName:
    """What a sample file's name (and its folder's) says."""

    path: Path
    key: RoundKey
    prompt: int | str  # the prompt's index in the trainer's list; SimpleTuner names a prompt by its shortname
    seed: int | None  # None: the name holds no seed
    video: bool
    stamp: str = ""  # the wall-clock time in the name ("" when none): orders re-renders of one round


@dataclass(frozen=True)
class CheckpointName:
    """What a checkpoint's name says; `run_name` is the trainer's output or job name in it ("" when none)."""

    path: Path
    key: RoundKey
    run_name: str


@dataclass(frozen=True)
class TrainerLayout:
    """One trainer's output folder. Globs are relative to the folder the user points at (`folder` below)."""

    name: str
    title: str
    source: str  # "owner/repository@commit" that the citations in the entry refer to
    sample_globs: tuple[str, ...]  # () when the trainer writes no samples to disk
    parse_sample: Callable[[Path], SampleName | None]
    sample_example: str
    checkpoint_globs: tuple[str, ...]
    parse_checkpoint: Callable[[Path], CheckpointName | None]
    checkpoint_example: str
    checkpoint_file: str | None  # the LoRA file inside a checkpoint folder; None when a checkpoint is one file
    final_globs: tuple[str, ...]  # the file saved when training ends; () when it is not in the folder
    final_rounds: Callable[[Mapping[str, str]], tuple[RoundKey, ...]] | None  # rounds it holds, from its metadata
    base_key: RoundKey | None  # the key of the before-training round; None when the trainer renders none
    base_round: str | None  # how that round is named and when it is rendered
    base_globs: tuple[str, ...]  # base references kept apart from the rounds, and how to read their names
    parse_base: Callable[[Path], SampleName | None] | None
    stop: str | None  # how the trainer can be asked to stop; None when it cannot (short of killing it)
    video_formats: tuple[str, ...]
    temp_names: str | None  # the trainer's names for files it has not finished writing
    markers: tuple[str, ...] = ()  # globs only this trainer's folders hold
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------- file checks
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _mp4_finished(handle, size: int) -> bool:
    """ISO media boxes tile the file and a moov box is there (writers add it last)."""
    position, kinds = 0, set()
    while position < size:
        handle.seek(position)
        header = handle.read(8)
        if len(header) < 8:
            return False
        length, kind = int.from_bytes(header[:4], "big"), header[4:]
        if length == 1:
            length = int.from_bytes(handle.read(8), "big")
        elif length == 0:
            length = size - position
        if length < 8:
            return False
        kinds.add(kind)
        position += length
    return position == size and b"moov" in kinds


def is_finished(path: Path) -> bool:
    """Whether a sample file is whole: not empty, and PNG/JPEG/WebP/MP4 files end as their format ends."""
    try:
        size = path.stat().st_size
        if size == 0:
            return False
        suffix = path.suffix.lower()
        with open(path, "rb") as handle:
            if suffix == ".png":
                handle.seek(max(0, size - len(_PNG_END)))
                return handle.read() == _PNG_END
            if suffix in (".jpg", ".jpeg"):
                start = handle.read(2)
                handle.seek(size - 2)
                return start == b"\xff\xd8" and handle.read(2) == b"\xff\xd9"
            if suffix == ".webp":
                head = handle.read(12)
                return head[:4] == b"RIFF" and head[8:] == b"WEBP" and int.from_bytes(head[4:8], "little") + 8 == size
            if suffix == ".mp4":
                return _mp4_finished(handle, size)
    except OSError:
        return False
    return True


def _animated_webp(path: Path) -> bool:
    """A WebP whose VP8X header sets the animation flag."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(21)
    except OSError:
        return False
    return len(head) == 21 and head[:4] == b"RIFF" and head[12:16] == b"VP8X" and bool(head[20] & 0x02)


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of a completely written .safetensors file ({} when it has none); None while incomplete."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= 100_000_000:
                return None
            header = json.loads(handle.read(length))
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        return dict(header.get("__metadata__") or {}) if path.stat().st_size == 8 + length + end else None
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError):
        return None


def _is_temporary(name: str) -> bool:
    """Names trainers give files and folders they are still writing (see each entry's temp_names)."""
    return name.startswith(".") or name.endswith(("-tmp", ".tmp", "~")) or ".tmp." in name


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
    video = match["ext"] == "mp4" or (match["ext"] == "webp" and _animated_webp(path))
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
    notes=("with STEP units a save is named one step before the round of the same interval, and holds other "
           "weights: __needs_save() uses start_at_zero=False ((global_step + 1) % n == 0), sampling global_step % n "
           "== 0, both before that batch trains; with EPOCH units both run at the epoch's first batch, samples "
           "first, under one name",
           "save_every_unit defaults to NEVER (TrainConfig): no intermediate checkpoints unless asked",
           "with EMA the '<i> - <prompt>' folders hold EMA samples, '<i> - <prompt> - no-ema' the raw weights' "
           "(skipped here); checkpoints hold the EMA weights (GenericTrainer.__save(): copy_ema_to)",
           "samples/custom/ holds samples asked for from the UI (skipped); seeds are not in the names"),
)


# ------------------------------------------------------------------------------------ SimpleTuner
# simpletuner/helpers/training/validation_images.py save_images() and validation_video.py save_videos():
# validation_images/f"step_{StateTracker.get_global_step()}_{shortname}_{index}_{res_label}.{ext}", index counting the
# prompt's images over validation resolutions x num_eval_images; ext from save_validation_image(): png (default),
# webp, jpg; videos .mp4. shortname: the prompt library's key ("validation" for --validation_prompt); adapter runs
# append "__<slug>" (validation.py Validation._decorate_shortname()).
_ST_SAMPLE = re.compile(r"^step_(?P<step>\d+)_(?P<shortname>.*)_(?P<index>\d+)_(?P<res>\d+x\d+|unknown)\.(?P<ext>png|jpg|webp|mp4)$")
# simpletuner/helpers/training/trainer.py Trainer.checkpoint_state_save(): f"checkpoint-{global_step}" (+ "-rolling"
# for rolling saves), written as "<name>-tmp" and renamed when checkpointing_use_tempdir; a ".guard" file is its last
# file (helpers/utils/checkpoint_manager.py write_guard()).
_ST_CHECKPOINT = re.compile(r"^checkpoint-(?P<step>\d+)(?:-rolling)?$")
# Validation.save_benchmark(): benchmarks/base_model/f"{shortname}_{width}x{height}.png", videos "..._{index}.mp4"
_ST_BENCHMARK = re.compile(r"^(?P<shortname>.*)_(?P<width>\d+)x(?P<height>\d+)(?:_(?P<index>\d+))?\.(?P<ext>png|mp4)$")
DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def _st_sample(path: Path) -> SampleName | None:
    match = _ST_SAMPLE.match(path.name)
    if match is None:
        return None
    return SampleName(path, RoundKey("step", int(match["step"])), match["shortname"], None, match["ext"] == "mp4")


def _st_benchmark(path: Path) -> SampleName | None:
    match = _ST_BENCHMARK.match(path.name)
    return None if match is None else SampleName(path, RoundKey("step", 0), match["shortname"], None, match["ext"] == "mp4")


def _checkpoint_folder(pattern: re.Pattern) -> Callable[[Path], CheckpointName | None]:
    def parse(path: Path) -> CheckpointName | None:
        match = pattern.match(path.name)
        return None if match is None else CheckpointName(path, RoundKey("step", int(match["step"])), "")

    return parse


SIMPLETUNER = TrainerLayout(
    name="simpletuner",
    title="bghira/SimpleTuner",
    source="bghira/SimpleTuner@bc8e6ab7738ce457a2ed8eb2d26cadd91c6442cb",
    sample_globs=("validation_images/*",),  # the folder: output_dir (Validation.__init__: save_dir)
    parse_sample=_st_sample,
    sample_example="step_500_validation_0_1024x1024.png",
    checkpoint_globs=("checkpoint-*",),
    parse_checkpoint=_checkpoint_folder(_ST_CHECKPOINT),
    checkpoint_example="checkpoint-500/pytorch_lora_weights.safetensors",
    # helpers/training/save_hooks.py SaveHookManager._save_lora(): model.save_lora_weights(output_dir) (diffusers'
    # default weight name); LyCORIS: _save_lycoris() writes the same name (LORA_SAFETENSORS_FILENAME)
    checkpoint_file=DIFFUSERS_LORA_FILE,
    # Trainer.train(): save_lora_weights(save_directory=output_dir) at the end; its final validation runs with
    # skip_execution=True (no new images), so the final file is matched to no round
    final_globs=(DIFFUSERS_LORA_FILE,),
    final_rounds=None,
    base_key=RoundKey("step", 0),
    base_round=("step_0_<shortname>_<i>_<WxH>.<ext>: Trainer.init_benchmark_base_model() runs "
                "run_validations(validation_type='base_model', step=0) unless --disable_benchmark or "
                "benchmarks/base_model/ already holds files; --validation_on_startup also renders at the resumed step"),
    base_globs=("benchmarks/base_model/*",),
    parse_base=_st_benchmark,
    stop=("no stop file: its server aborts a job through an in-process should_abort callable (Trainer."
          "_exit_on_signal() raises StopIteration) and SIGTERMs the process group; the JSON file named by "
          "SIMPLETUNER_ACCELERATE_SIGNAL_FILE only asks for a manual validation or checkpoint (simpletuner/train.py "
          "_build_signal_consumer(): counters manual_validation, manual_checkpoint)"),
    video_formats=("mp4",),  # validation_video.py save_videos(): export_to_video
    temp_names=("checkpoint-<step>-tmp (checkpoint_state_save()); <stem>.tmp.mp4 while audio is muxed in "
                "(validation_video.py _mux_audio_into_video(), then os.replace)"),
    markers=("validation_images", "benchmarks/base_model", "checkpoint-*/.guard", "checkpoint-*/checkpoint_manifest.json"),
    notes=("the saved image is the display image, not the raw sample (validation.py Validation.validate_prompt()): "
           "past the base round, unless --disable_benchmark, [base model | this step] side by side with labels, and "
           "a black footer with 'Prompt: ...' under it whenever a font loads (PIL's default always does)",
           "the checkpoint of step N is saved before step N's validation (Trainer.train()): same weights",
           "epoch-interval validations are named by global step too; checkpoints_total_limit deletes old checkpoints",
           "a checkpoint folder also receives copies of validation files (Trainer._populate_checkpoint_assets())"),
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


# ------------------------------------------------------------------------------ diffusers examples
# huggingface/diffusers examples/*/train_*lora*.py: f"checkpoint-{global_step}" through accelerator.save_state(),
# whose save_model_hook() calls <Pipeline>.save_lora_weights(output_dir) -> pytorch_lora_weights.safetensors.
_DIFFUSERS_CHECKPOINT = re.compile(r"^checkpoint-(?P<step>\d+)$")


def _no_sample(path: Path) -> SampleName | None:
    return None


DIFFUSERS = TrainerLayout(
    name="diffusers",
    title="huggingface/diffusers example scripts",
    source="huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951",
    # log_validation() (e.g. examples/dreambooth/train_dreambooth_lora_flux.py) sends its images to the trackers
    # only (tensorboard add_images, wandb.Image): nothing on disk to watch
    sample_globs=(),
    parse_sample=_no_sample,
    sample_example="(none: validation images go to TensorBoard/W&B only)",
    checkpoint_globs=("checkpoint-*",),
    parse_checkpoint=_checkpoint_folder(_DIFFUSERS_CHECKPOINT),
    checkpoint_example="checkpoint-500/pytorch_lora_weights.safetensors",
    checkpoint_file=DIFFUSERS_LORA_FILE,
    final_globs=(DIFFUSERS_LORA_FILE,),  # after the loop: <Pipeline>.save_lora_weights(save_directory=output_dir)
    final_rounds=None,
    base_key=None,  # no validation before training
    base_round=None,
    base_globs=(),
    parse_base=None,
    stop=None,
    video_formats=(),
    temp_names=None,
    markers=(DIFFUSERS_LORA_FILE,),  # a SimpleTuner folder holds it too, but shows its own markers first
    notes=("checkpoints follow --checkpointing_steps; validation follows --validation_epochs in most LoRA scripts "
           "(--validation_steps in the LCM, flux-control and ORPO ones): rounds and checkpoints rarely meet",
           "cogvideo's log_validation() writes validation_video_<i>_<prompt[:25]>.mp4 into output_dir only while a "
           "wandb tracker runs, overwriting it each round (no step in the name); save_model_card() writes "
           "image_<i>.png of the final validation only with --push_to_hub",
           "--checkpoints_total_limit deletes the oldest checkpoint-* folders before a save"),
)

LAYOUTS: dict[str, TrainerLayout] = {layout.name: layout for layout in (AI_TOOLKIT, ONETRAINER, SIMPLETUNER, MUSUBI, KOHYA, DIFFUSERS)}
# checkpoint names alone cannot tell kohya from musubi-tuner (the same names), nor diffusers from an older
# SimpleTuner (checkpoint-<step> folders both): kohya and diffusers are the guesses then
_CHECKPOINT_ORDER = ("ai-toolkit", "onetrainer", "kohya", "musubi-tuner", "diffusers", "simpletuner")


# ------------------------------------------------------------------------------------------ lookup
def get_layout(name: str) -> TrainerLayout:
    """The layout of that name; an unknown name raises ValueError naming the close ones and all known."""
    wanted = name.strip().lower()
    for layout in LAYOUTS.values():
        if wanted in (layout.name, layout.title.lower(), layout.title.split(" ")[0].split("/")[-1].lower()):
            return layout
    close = difflib.get_close_matches(wanted, LAYOUTS, n=3, cutoff=0.5)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown trainer layout {name!r}.{hint} Known layouts: {', '.join(LAYOUTS)}.")


def _entries(folder: Path, globs: tuple[str, ...]) -> list[Path]:
    found = {path for pattern in globs for path in folder.glob(pattern)}
    return sorted(path for path in found if not any(map(_is_temporary, path.relative_to(folder).parts)))


def _evidence(folder: Path, layout: TrainerLayout) -> tuple[str | None, str | None]:
    """(a sample name or marker only this trainer writes, a checkpoint name it writes), as sentences."""
    for path in _entries(folder, layout.sample_globs):
        if path.is_file() and layout.parse_sample(path) is not None:
            return f"{path.relative_to(folder)} has the name {layout.title} gives its samples", None
    for pattern in layout.markers:
        for path in folder.glob(pattern):
            return f"{path.relative_to(folder)} is a {layout.title} file", None
    for path in _entries(folder, layout.checkpoint_globs):
        if layout.parse_checkpoint(path) is not None:
            return None, f"{path.relative_to(folder)} has the name {layout.title} gives its checkpoints"
    return None, None


def describe_layouts() -> str:
    """One line per known layout: where it keeps samples and checkpoints, with an example name of each."""
    lines = []
    for layout in LAYOUTS.values():
        samples = f"samples {', '.join(layout.sample_globs)} e.g. {layout.sample_example}" if layout.sample_globs else "no samples on disk"
        lines.append(f"  {layout.name} ({layout.title}): {samples}; checkpoints {', '.join(layout.checkpoint_globs)}"
                     f" e.g. {layout.checkpoint_example}")
    return "\n".join(lines)


def detect_layout(folder: str | Path, say: Callable[[str], None] | None = None) -> TrainerLayout:
    """The trainer whose output `folder` is, told by its sample names and marker files first, by checkpoint
    names otherwise; `say` (when given) hears what was detected and why. ValueError when nothing fits."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder; point at a trainer's output folder.\nKnown layouts:\n{describe_layouts()}")
    found = {name: _evidence(folder, layout) for name, layout in LAYOUTS.items()}
    strong = [(name, sure) for name, (sure, _) in found.items() if sure]
    weak = [(name, found[name][1]) for name in _CHECKPOINT_ORDER if found[name][1]]
    chosen = strong or weak
    if not chosen:
        raise ValueError(
            f"{folder}: no known trainer layout fits (no sample, marker or checkpoint name of one).\n"
            f"Known layouts:\n{describe_layouts()}"
        )
    name, reason = chosen[0]
    if say is not None:
        others = [other for other, _ in chosen[1:]]
        also = f" (also fits: {', '.join(others)})" if others else ""
        say(f"{folder}: {LAYOUTS[name].title} layout: {reason}{also}.")
    return LAYOUTS[name]


# ------------------------------------------------------------------------------------------ rounds
def list_samples(folder: str | Path, layout: TrainerLayout) -> list[SampleName]:
    """The finished sample files of `folder` under `layout`'s names (temporary, empty and truncated files left out)."""
    folder = Path(folder)
    found = (layout.parse_sample(path) for path in _entries(folder, layout.sample_globs) if path.is_file() and is_finished(path))
    return [sample for sample in found if sample is not None]


def _group(samples: list[SampleName]) -> dict[RoundKey, dict[int | str, list[Path]]]:
    rounds: dict[RoundKey, dict[int | str, list[Path]]] = {}
    for sample in sorted(samples, key=lambda s: (s.key, s.stamp, s.path.name)):
        rounds.setdefault(sample.key, {}).setdefault(sample.prompt, []).append(sample.path)
    return rounds


def sample_rounds(folder: str | Path, layout: TrainerLayout) -> dict[RoundKey, dict[int | str, list[Path]]]:
    """round -> prompt -> its finished sample files, oldest first (a round rendered again after a restart, or
    several images of one prompt, give several); rounds in key order."""
    return _group(list_samples(folder, layout))


def base_references(folder: str | Path, layout: TrainerLayout) -> dict[int | str, list[Path]]:
    """The before-training images by prompt: the base round, or else the layout's separate base references
    (SimpleTuner's benchmarks/base_model); {} when the trainer renders none."""
    folder = Path(folder)
    if layout.base_key is None:
        return {}
    base = sample_rounds(folder, layout).get(layout.base_key)
    if base:
        return base
    if layout.parse_base is None:
        return {}
    paths = [path for path in _entries(folder, layout.base_globs) if path.is_file() and is_finished(path)]
    references = [layout.parse_base(path) for path in paths]
    return _group([reference for reference in references if reference is not None]).get(RoundKey("step", 0), {})


def _lora_file(layout: TrainerLayout, path: Path) -> Path:
    return path / layout.checkpoint_file if layout.checkpoint_file else path


def final_checkpoint(folder: str | Path, layout: TrainerLayout) -> Path | None:
    """The completely written file the trainer saves when training ends, or None (not yet, or not in `folder`).
    When several files could be it, the one named like the run's checkpoints wins; None if still unclear."""
    folder = Path(folder)
    candidates = [
        path for path in _entries(folder, layout.final_globs)
        if path.is_file() and layout.parse_checkpoint(path) is None and safetensors_metadata(path) is not None
    ]
    if len(candidates) > 1:
        names = {c.run_name for c in map(layout.parse_checkpoint, _entries(folder, layout.checkpoint_globs)) if c}
        candidates = [path for path in candidates if path.stem in names]
    return candidates[0] if len(candidates) == 1 else None


def checkpoint_for(folder: str | Path, layout: TrainerLayout, key: RoundKey) -> Path | None:
    """The completely written LoRA file holding the weights of round `key`: a checkpoint named with that key
    (the newest if a restart wrote two), else the final file when its metadata says it holds that round; None
    when the trainer kept no such file (see the layout's notes)."""
    folder = Path(folder)
    matches = []
    for path in _entries(folder, layout.checkpoint_globs):
        name = layout.parse_checkpoint(path)
        lora = _lora_file(layout, path)
        if name is not None and name.key == key and lora.is_file() and safetensors_metadata(lora) is not None:
            matches.append(lora)
    if matches:
        return max(matches, key=lambda path: (path.stat().st_mtime, path.name))
    final = final_checkpoint(folder, layout)
    if final is not None and layout.final_rounds is not None and key in layout.final_rounds(safetensors_metadata(final) or {}):
        return final
    return None
