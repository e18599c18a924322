"""The layouts of the diffusers-based trainers: SimpleTuner and the diffusers example scripts.

Both keep `checkpoint-<step>` folders whose LoRA is diffusers' `pytorch_lora_weights.safetensors`. SimpleTuner
writes its validation images to disk, but as display images: `cut_sample` says where the sample lies in one
and refuses the displays it cannot be cut back out of. The diffusers scripts write no samples to disk. Every
value cites the code that writes it, at the commit in the entry's `source`; nothing of the trainers is
imported, and no torch. The other trainers are in `trainer_entries`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from lora_monitor.trainer_files import CheckpointName, DisplayCut, DisplayError, RoundKey, SampleName, TrainerLayout

DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"


def _checkpoint_folder(pattern: re.Pattern) -> Callable[[Path], CheckpointName | None]:
    def parse(path: Path) -> CheckpointName | None:
        match = pattern.match(path.name)
        return None if match is None else CheckpointName(path, RoundKey("step", int(match["step"])), "")

    return parse


# ------------------------------------------------------------------------------------ SimpleTuner
# simpletuner/helpers/training/validation_images.py save_images() and validation_video.py save_videos():
# validation_images/f"step_{StateTracker.get_global_step()}_{shortname}_{index}_{res_label}.{ext}", index counting the
# prompt's images over validation resolutions x num_eval_images; res_label the requested resolution "WxH";
# ext from save_validation_image(): png (default), webp, jpg (validation_image_format); videos .mp4. shortname: the
# prompt library's key ("validation" for --validation_prompt, "unconditional" for the empty prompt unless
# --validation_disable_unconditional: validation.py prepare_validation_prompt_list()); adapter runs append
# "__<slug>" (Validation._decorate_shortname()).
_ST_SAMPLE = re.compile(r"^step_(?P<step>\d+)_(?P<shortname>.*)_(?P<index>\d+)_(?P<res>\d+x\d+|unknown)\.(?P<ext>png|jpg|webp|mp4)$")
# simpletuner/helpers/training/trainer.py Trainer.checkpoint_state_save(): f"checkpoint-{global_step}" (+ "-rolling"
# for rolling saves), written as "<name>-tmp" and renamed when checkpointing_use_tempdir; a ".guard" file is its last
# file (helpers/utils/checkpoint_manager.py write_guard()).
_ST_CHECKPOINT = re.compile(r"^checkpoint-(?P<step>\d+)(?:-rolling)?$")
# Validation.save_benchmark(): benchmarks/base_model/f"{shortname}_{width}x{height}.png", videos "..._{index}.mp4"
_ST_BENCHMARK = re.compile(r"^(?P<shortname>.*)_(?P<width>\d+)x(?P<height>\d+)(?:_(?P<index>\d+))?\.(?P<ext>png|mp4)$")
# Validation.validate_prompt(): pipeline_kwargs width and height = MultiaspectImage._round_to_nearest_multiple(value,
# 16) (helpers/multiaspect/image.py: Python's round(value / 16) * 16, at least 16): the size a sample is rendered at
_ST_ALIGNMENT = 16
# draw_text_on_image() (validation.py) pastes the sample at (0, 0) of a black image `footer_height` = text height +
# 2 x 10 pixels taller and draws the prompt at y = sample height + 10 (or lower; its 2-pixel stroke reaches 8): the
# rows under the sample are black. Rows 3..7 under it are checked before cutting: clear of the text, and of what a
# lossy format's deblocking (WebP's loop filter reaches 3 pixels past a macroblock edge) carries over from the sample.
_ST_FOOTER_CHECKED = (3, 8)


def _st_sample(path: Path) -> SampleName | None:
    match = _ST_SAMPLE.match(path.name)
    if match is None:
        return None
    return SampleName(path, RoundKey("step", int(match["step"])), match["shortname"], None, match["ext"] == "mp4",
                      variant=f"{match['index']}_{match['res']}")


def _st_benchmark(path: Path) -> SampleName | None:
    match = _ST_BENCHMARK.match(path.name)
    if match is None:
        return None
    resolution = f"{match['width']}x{match['height']}"
    variant = f"{match['index']}_{resolution}" if match["index"] is not None else resolution  # images: no index
    return SampleName(path, RoundKey("step", 0), match["shortname"], None, match["ext"] == "mp4", variant=variant)


def _st_rendered_size(requested: int) -> int:
    return max(round(requested / _ST_ALIGNMENT) * _ST_ALIGNMENT, _ST_ALIGNMENT)


_ST_SIDE_BY_SIDE = (
    "SimpleTuner saved a side-by-side display with labels drawn over the samples (validation.py Validation."
    "validate_prompt(): [base model | step N] by stitch_benchmark_image() unless --disable_benchmark, or the "
    "validation input (validation_stitch_input_location 'left'), the control image (controlnet/control) or the EMA "
    "sample (ema_validation 'comparison') beside it); a sample cannot be cut back out of it. Train with "
    "--disable_benchmark and without those options, and --validation_on_startup for a base round at step 0"
)


def _st_cut(sample: SampleName, width: int, height: int) -> DisplayCut:
    """The sample in a saved SimpleTuner validation file: the top-left corner of the rendered size, above the
    black prompt footer; a side-by-side display, or a video with a footer, raises DisplayError."""
    resolution = sample.variant.split("_", 1)[1]
    if resolution == "unknown":
        raise DisplayError(f"{sample.path.name}: its name holds no resolution (save_images() wrote 'unknown'), so the "
                           "sample's size in the display is not known")
    requested = tuple(int(side) for side in resolution.split("x"))
    rendered = tuple(_st_rendered_size(side) for side in requested)
    if width != rendered[0] or height < rendered[1]:
        raise DisplayError(f"{sample.path.name} is {width}x{height} pixels, but a {resolution} sample is rendered at "
                           f"{rendered[0]}x{rendered[1]}: {_ST_SIDE_BY_SIDE}")
    if sample.video and height != rendered[1]:
        # save_videos(): diffusers' export_to_video() (src/diffusers/utils/export_utils.py, macro_block_size=16) has
        # imageio-ffmpeg scale each frame up to a height divisible by 16: the footer's frames are rescaled
        raise DisplayError(f"{sample.path.name}: SimpleTuner's video files hold the display frames (the sample with "
                           "the prompt footer, draw_text_on_image()), which diffusers' export_to_video() scales to a "
                           "height divisible by 16: the sample cannot be cut back out of them")
    first, end = (min(rendered[1] + offset, height) for offset in _ST_FOOTER_CHECKED)
    return DisplayCut((0, 0, rendered[0], rendered[1]), (first, end))


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
                "run_validations(validation_type='base_model', step=0) (plain samples) unless --disable_benchmark or "
                "benchmarks/base_model/ already holds files; with --disable_benchmark, --validation_on_startup "
                "(Trainer.run_startup_validation()) renders step 0 of a new run before training, the adapter as "
                "initialised (a no-op for the usual zero-initialised LoRA and LoKr), as displays with the footer"),
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
    notes=("the checkpoint of step N is saved before step N's validation (Trainer.train()): same weights",
           "the saved image is the display image, not the raw sample (validation.py Validation.validate_prompt()): "
           "past the base round, unless --disable_benchmark, [base model | this step] side by side with the labels "
           "drawn over both, and always a black footer with 'Prompt: ...' under it (get_font_for_labels() falls back "
           "to PIL's default font); only the benchmark round (validation_type 'base_model') is saved plain",
           "epoch-interval validations are named by global step too; checkpoints_total_limit deletes old checkpoints",
           "a checkpoint folder also receives copies of validation files (Trainer._populate_checkpoint_assets())"),
    cut_sample=_st_cut,
    open_slots=True,
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
