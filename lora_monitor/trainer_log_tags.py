"""Where each trainer logs its own validation loss, as data (issue 13): one `TagSpec` per trainer.

Which tags, against which counter (global step or epoch), where the files go, which round's weights a logged
value was computed on, and what the user sets for the trainer to log it. Entries are under the names of
`trainer_layouts.LAYOUTS`; every value cites the code that writes it: repository, path and function, at the commit
in the entry's `source` (the commits of the layouts). `trainer_logs` reads the logs with them. No torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from lora_monitor.trainer_layouts import get_layout

AITK_SQLITE, SIMPLETUNER_JSONL = "ai-toolkit-sqlite", "simpletuner-jsonl"


@dataclass(frozen=True)
class TagSpec:
    """Where and how one trainer logs its validation loss. Tag patterns are regular expressions matched
    against whole tag names; `tags` is empty when the trainer logs no validation loss (`missing` says why)."""

    trainer: str  # the name in trainer_layouts.LAYOUTS
    source: str  # "owner/repository@commit" that the citations in the entry refer to
    tags: Mapping[str, str]  # step axis ("step": the trainer's global step, "epoch": its epoch number) -> tag pattern
    average_tags: Mapping[str, str]  # axis -> the tag holding the trainer's own combination, preferred when present
    default_axis: str | None
    # the TensorBoard event files, relative to the output folder and searched below it ("" = the output folder
    # itself); a `logging_dir` given to validation_loss() replaces it. None: the loss does not go to TensorBoard
    event_folder: str | None
    other_log: str | None = None  # a file (relative to the output folder) in another format holding the same values
    other_format: str | None = None  # AITK_SQLITE or SIMPLETUNER_JSONL
    round_offset: int = 0  # the logged value at n was computed on the weights of the trainer's round n + offset
    # the trainer's saved settings (a glob relative to the output folder; the newest file by name wins) and the key of
    # its gradient accumulation steps, when they widen which logged steps hold a round's weights (loss_for_round())
    settings_glob: str | None = None
    accumulation_key: str | None = None
    enable: str = ""  # what the user sets for the trainer to compute it
    combine: str = "one tag: its value"
    missing: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


# ------------------------------------------------------------------------------------------ kohya
# kohya-ss/sd-scripts train_network.py NetworkTrainer.train() (every *_train_network.py subclasses it):
# - "VALIDATION PER STEP" (when --validate_every_n_steps divides global_step, after that step's update and its
#   step checkpoint): logs {"loss/validation/step_average", "loss/validation/step_divergence"} through
#   step_logging() -> accelerator_logging(step_value=global_step): TensorBoard step = global step.
# - "EPOCH VALIDATION" (each epoch, or every --validate_every_n_epochs): {"loss/validation/epoch_average",
#   "loss/validation/epoch_divergence"} through epoch_logging() -> accelerator_logging(step_value=epoch + 1):
#   TensorBoard step = the 1-based epoch, the number of that epoch's checkpoint (get_epoch_ckpt_name(epoch + 1))
#   and samples (e{epoch:06d}), saved and rendered after the validation from the same weights.
# *_divergence is the validation average minus the training loss's moving average: not a loss, left out.
# Files: library/train_util.py prepare_accelerator(): project_dir = f"{--logging_dir}/{--log_prefix}%Y%m%d%H%M%S"
# (a new folder per launch: a resumed run writes a second one), init_trackers(): run name --log_tracker_name or
# "network_train" (default_tracker_name from train_network.py), so accelerate's TensorBoardTracker writes
# <logging_dir>/<prefix><timestamp>/network_train/events.out.tfevents.*. --logging_dir is any folder.
KOHYA_TAGS = TagSpec(
    trainer="kohya",
    source="kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb",
    tags={"epoch": r"loss/validation/epoch_average", "step": r"loss/validation/step_average"},
    average_tags={},
    default_axis="epoch",  # epoch validation runs every epoch by default; step validation only when asked
    event_folder="",  # under --logging_dir, which can be anywhere: pass it as logging_dir
    enable=("validation_split > 0 (train_network.py --validation_split, or per dataset in the dataset config: "
            "library/config_util.py); --validate_every_n_steps adds step validation; --log_with tensorboard or "
            "just --logging_dir (prepare_accelerator() then defaults log_with to tensorboard)"),
    combine="one tag per axis: the mean over the validation batches and --validation_timesteps it averaged",
    notes=("no default logs folder: pass the --logging_dir value as logging_dir (otherwise the output folder is "
           "searched); a logging_dir shared by several runs mixes them unless --log_prefix tells them apart",),
)

# ---------------------------------------------------------------------------------- musubi-tuner
# kohya-ss/musubi-tuner src/musubi_tuner/training/trainer_base.py NetworkTrainer.train() logs the training loss
# only ("loss/current", "loss/average" at global_step, "loss/epoch" at epoch + 1); no validation dataset exists
# (its validation split was proposed in PR #63, not merged). Event files: <--logging_dir>/<prefix><timestamp>/
# network_train/ as in sd-scripts (init_trackers in NetworkTrainer.train()).
MUSUBI_TAGS = TagSpec(
    trainer="musubi-tuner",
    source="kohya-ss/musubi-tuner@30c658c4f4b0bf05038b3346eff9670259b10fc7",
    tags={},
    average_tags={},
    default_axis=None,
    event_folder="",
    missing=("musubi-tuner logs no validation loss (training/trainer_base.py NetworkTrainer.train() logs only "
             "loss/current, loss/average and loss/epoch; a validation split was proposed in its PR #63, not merged)"),
)

# ------------------------------------------------------------------------------------ OneTrainer
# Nerogar/OneTrainer modules/trainer/GenericTrainer.py __validate(): per validation concept the mean loss as
# f"loss/validation_step/{label}" (label: the concept's name, else its folder's basename, "(1)", "(2)" added when
# two concepts share it), and with more than one concept "loss/validation_step/total_average" (all validation
# samples' mean: weighted by each concept's sample count). add_scalar(..., train_progress.global_step).
# train(): __validate() runs after the batch trained (and after its optimizer step, if it is one) and before
# train_progress.next_step(): the value logged at global step G holds the weights after the updates of batches
# 0..G, which are those a sample or save named G + 1 renders and stores (they run at the top of a batch, before it
# trains: trainer_entries' OneTrainer notes). With gradient_accumulation_steps A > 1 only batches with
# (G + 1) % A == 0 update (__is_update_step()), and samples and saves run only at update boundaries (S % A == 0):
# the values logged at S - 1 .. S + A - 2 all hold round S's weights. __needs_validate(): validate_after /
# validate_after_unit (TrainConfig defaults 1 EPOCH: the epoch's first batch, after it trained; TimedActionMixin.py
# repeating_action_needed()), so with A = 1 and equal intervals no validation meets a sample round.
# GenericTrainer.start() -> __save_config_to_workspace(): workspace_dir/config/f"{prefix}{timestamp}.json", the
# TrainConfig as to_pack_dict(), with its gradient_accumulation_steps (TrainConfig default 1).
# Files: GenericTrainer.__init__(): SummaryWriter(workspace_dir/"tensorboard"/f"{save_filename_prefix}<timestamp>"),
# a new folder per start (get_string_timestamp(): %Y-%m-%d_%H-%M-%S); written whatever config.tensorboard says.
ONETRAINER_TAGS = TagSpec(
    trainer="onetrainer",
    source="Nerogar/OneTrainer@23df3832e8f213d64c337e39f9365ba46e99fed0",
    tags={"step": r"loss/validation_step/.+"},
    average_tags={"step": "loss/validation_step/total_average"},
    default_axis="step",
    event_folder="tensorboard",
    round_offset=1,
    settings_glob="config/*.json",
    accumulation_key="gradient_accumulation_steps",
    enable="validation: true (TrainConfig) and at least one concept marked as a validation concept",
    combine=("loss/validation_step/total_average (the sample-weighted mean OneTrainer writes with more than one "
             "concept); otherwise the mean of the per-concept tags (then there is only one)"),
    notes=("with gradient_accumulation_steps 1 the validation of a batch holds the weights of the next step's sample: "
           "with equal STEP intervals, or EPOCH units (validation after the epoch's first batch, sample and save "
           "before it), no sample round gets a value; with more accumulation steps the validation at a sample's "
           "step holds that sample's weights (no optimizer step in between)",),
)

# ------------------------------------------------------------------------------------ SimpleTuner
# bghira/SimpleTuner simpletuner/helpers/training/validation.py Evaluation.execute_eval() computes losses per eval
# dataset (or once over all of them under the key "pooled" with --eval_dataset_pooling); generate_tracker_table()
# turns each into f"loss/val/{ds_name}" = the mean over its samples and timesteps ("chart/loss/val/..." only for
# wandb). helpers/training/trainer.py Trainer.train(): when Evaluation.would_evaluate(state) (--eval_steps_interval
# / --eval_epoch_interval), after global_step += 1 and that step's checkpoint, these join wandb_logs, logged by
# accelerator.log(wandb_logs, step=state["global_step"]): the global step, epoch schedules included.
# Files: helpers/configuration/cmd_args.py: logging_dir = os.path.join(output_dir, --logging_dir) ("logs"),
# ProjectConfiguration(project_dir=output_dir, logging_dir=...); Trainer.init_trackers(): run name
# --tracker_project_name ("simpletuner-training", _resolve_tracker_identifiers()) -> accelerate's TensorBoardTracker
# writes <output_dir>/logs/simpletuner-training/events.out.tfevents.*.
# --report_to simpletuner (or all) also sends every accelerator.log() to helpers/training/local_metrics.py
# LocalMetricsTracker.log(): one JSON line {"step": step, "metrics": {...}} appended to
# <output_dir>/training_metrics.jsonl.
SIMPLETUNER_TAGS = TagSpec(
    trainer="simpletuner",
    source="bghira/SimpleTuner@bc8e6ab7738ce457a2ed8eb2d26cadd91c6442cb",
    tags={"step": r"loss/val/.+"},
    average_tags={"step": "loss/val/pooled"},
    default_axis="step",
    event_folder="logs",  # --logging_dir (default "logs"), joined to output_dir
    other_log="training_metrics.jsonl",
    other_format=SIMPLETUNER_JSONL,
    enable=("a dataset with dataset_type 'eval' in the dataloader config and --eval_steps_interval or "
            "--eval_epoch_interval (not --eval_loss_disable); --report_to tensorboard, simpletuner or all"),
    combine=("loss/val/pooled with --eval_dataset_pooling; otherwise the mean of the per-dataset means "
             "loss/val/<dataset id> (unweighted: the sample counts are not logged)"),
)

# ------------------------------------------------------------------------------------ ai-toolkit
# ostris/ai-toolkit jobs/process/BaseSDTrainProcess.py validate(): self.additional_logs['val/loss'] = the mean
# loss over validation_items at validation_sigmas; run() calls it after the step's training when step_num ==
# start_step or step_num % validate_every_n_steps == 0 (toolkit/config_modules.py ValidationConfig, default 10),
# before that step's save(step_num) and sample(step_num): the same weights. additional_logs reach only
# self.logger (never the TensorBoard writer, which gets loss_dict and lr), and only on logging.log_every steps
# (default 100), then are cleared: the value logged at step n is the latest validation's, computed at the last
# multiple of validate_every_n_steps not after n. logger.commit(step=self.step_num).
# toolkit/logging_aitk.py create_logger(): logging.use_ui_logger (set by its UI's job config) -> UILogger writes
# SQLite <save_root>/loss_log.db (WAL): table metrics(step, key, value_real, value_text), upserted per
# (step, key); on a resumed run's first commit _prune_future_steps() deletes the steps after it. logging.use_wandb
# sends it to W&B instead; with neither, EmptyLogger drops it.
AI_TOOLKIT_TAGS = TagSpec(
    trainer="ai-toolkit",
    source="ostris/ai-toolkit@27a03a91f23eb1b757d5ec2e80ee3e129cfcc350",
    tags={"step": r"val/loss"},
    average_tags={},
    default_axis="step",
    event_folder=None,  # its TensorBoard files (config log_dir) never hold val/loss
    other_log="loss_log.db",  # save_root = the output folder (trainer_layouts' ai-toolkit folder)
    other_format=AITK_SQLITE,
    enable=("train.validation_config.validation_items (image_path and prompt) and logging.use_ui_logger: true "
            "(the UI sets it; W&B-only runs are not readable here)"),
    combine="one key, val/loss: the mean over validation items and validation_sigmas",
    notes=("val/loss reaches the log only on logging.log_every steps: choose validate_every_n_steps dividing "
           "log_every, or the value at n is from an earlier validation",),
)

# ---------------------------------------------------------------------------------------- diffusers
# huggingface/diffusers examples/*/train_*lora*.py: log_validation() renders images from --validation_prompt and
# sends them to the trackers; the only losses logged are the training step's ("loss", e.g.
# examples/dreambooth/train_dreambooth_lora_flux.py main()). Event files: Path(output_dir, --logging_dir "logs")
# through ProjectConfiguration, run name = the script's tracker_name.
DIFFUSERS_TAGS = TagSpec(
    trainer="diffusers",
    source="huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951",
    tags={},
    average_tags={},
    default_axis=None,
    event_folder="logs",
    missing=("the diffusers LoRA example scripts log no validation loss: their validation renders images "
             "(log_validation()) and only the training loss is logged"),
)

VALIDATION_TAGS: dict[str, TagSpec] = {
    spec.trainer: spec
    for spec in (AI_TOOLKIT_TAGS, ONETRAINER_TAGS, SIMPLETUNER_TAGS, MUSUBI_TAGS, KOHYA_TAGS, DIFFUSERS_TAGS)
}


def get_tag_spec(trainer: str) -> TagSpec:
    """The entry of a trainer, by any name trainer_layouts.get_layout() knows (ValueError with close names)."""
    return VALIDATION_TAGS[get_layout(trainer).name]
