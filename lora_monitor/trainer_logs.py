"""The trainers' own validation loss, read back from their logs (issue 13).

Several trainers compute a loss on held-out images themselves and log it: kohya sd-scripts
(`--validation_split`), OneTrainer (validation concepts), SimpleTuner (eval datasets) and ai-toolkit
(`validation_config`); musubi-tuner and the diffusers LoRA example scripts log none. Which tags, against
which counter (global step or epoch), and where the files go are data: one `TagSpec` per trainer in
`VALIDATION_TAGS`, under the names of `trainer_layouts.LAYOUTS`. Every value cites the code that writes
it: repository, path and function, at the commit in the entry's `source` (the commits of the layouts).

`read_scalars` reads TensorBoard event files through tensorboard's EventAccumulator (tensorboard is an
optional extra); `validation_loss` turns a trainer's logs into {step or epoch: loss}. Nothing of the
trainers is imported, and no torch.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from lora_monitor.trainer_layouts import UNITS, get_layout

__all__ = ["TagSpec", "VALIDATION_TAGS", "get_tag_spec", "read_scalars", "validation_loss", "EVENT_FILE_GLOB"]

EVENT_FILE_GLOB = "events.out.tfevents.*"  # tensorboard's EventFileWriter and tensorboardX name their files so
INSTALL_HINT = "pip install tensorboard (or pip install 'lora-monitor[tensorboard]')"
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
# train(): __validate() runs after the batch trained and before train_progress.next_step(): the value logged at
# global step S holds the weights after S + 1 batches, which the sample and save named S + 1 render and store
# (see trainer_layouts' OneTrainer notes). __needs_validate(): validate_after / validate_after_unit (TrainConfig
# defaults 1 EPOCH: the epoch's first batch, modules/util/TimedActionMixin.py repeating_action_needed()).
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
    enable="validation: true (TrainConfig) and at least one concept marked as a validation concept",
    combine=("loss/validation_step/total_average (the sample-weighted mean OneTrainer writes with more than one "
             "concept); otherwise the mean of the per-concept tags (then there is only one)"),
    notes=("with EPOCH units the validation of epoch e follows its first batch, while that epoch's sample and save "
           "come before it: no checkpoint holds exactly the validated weights",),
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


# ------------------------------------------------------------------------------------- TensorBoard
# keep every scalar (0 = no reservoir sampling, which would drop points of long runs) and as little as
# possible of everything else
_SIZE_GUIDANCE = {"scalars": 0, "images": 1, "audio": 1, "histograms": 1, "compressedHistograms": 1, "tensors": 1}
_NAME_TIME = re.compile(r"^events\.out\.tfevents\.(\d+)")

Series = dict[str, dict[int, float]]  # tag -> step -> value, one event file's


def _event_accumulator_class():
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError as error:
        raise ImportError(f"reading TensorBoard event files needs the tensorboard package, which is not "
                          f"importable here ({error}): {INSTALL_HINT}") from error
    return EventAccumulator


def _tag_matcher(tag_pattern: str | re.Pattern) -> re.Pattern:
    try:
        return tag_pattern if isinstance(tag_pattern, re.Pattern) else re.compile(tag_pattern)
    except re.error as error:
        raise ValueError(f"tag pattern {tag_pattern!r} is not a regular expression: {error}") from error


def event_files(log_dir: str | Path) -> list[Path]:
    """The TensorBoard event files at or below `log_dir` (a folder or one event file), in no particular order."""
    log_dir = Path(log_dir)
    if log_dir.is_file():
        return [log_dir]
    if not log_dir.is_dir():
        raise FileNotFoundError(f"{log_dir}: no such folder or event file")
    return sorted(path for path in log_dir.rglob(EVENT_FILE_GLOB) if path.is_file())


def _load_event_file(accumulator_class, path: Path, matcher: re.Pattern) -> tuple[tuple, Series]:
    """(sort key: the first event's wall time, the file's order in time; the matching scalars)."""
    # purge_orphaned_data=False: a restart's files are merged here (later files win per step) rather than
    # pruned by TensorBoard's guesses. A half-written last record ends the file's reading quietly
    # (tensorboard's EventFileLoader), as does a damaged one: what came before it is kept.
    accumulator = accumulator_class(str(path), size_guidance=_SIZE_GUIDANCE, purge_orphaned_data=False)
    accumulator.Reload()
    series: Series = {}
    for tag in accumulator.Tags().get("scalars", []):
        if matcher.fullmatch(tag):
            values = series.setdefault(tag, {})
            for event in accumulator.Scalars(tag):
                values[int(event.step)] = float(event.value)  # a step written twice: the later record wins
    try:
        started = accumulator.FirstEventTimestamp()
    except ValueError:  # no event yet (a file just created)
        name_time = _NAME_TIME.match(path.name)
        started = float(name_time.group(1)) if name_time else 0.0
    return (started, str(path)), series


def _read_event_series(log_dir: str | Path, tag_pattern: str | re.Pattern) -> list[Series]:
    """Each event file's matching scalars, the oldest file first (by its first event's wall time)."""
    matcher = _tag_matcher(tag_pattern)
    files = event_files(log_dir)
    if not files:
        return []
    accumulator_class = _event_accumulator_class()
    loaded = sorted((_load_event_file(accumulator_class, path, matcher) for path in files), key=lambda item: item[0])
    return [series for _, series in loaded if series]


def read_scalars(log_dir: str | Path, tag_pattern: str | re.Pattern) -> dict[str, list[tuple[int, float]]]:
    """The scalars whose tag matches `tag_pattern` (a regular expression matched against the whole tag) in the
    TensorBoard event files at or below `log_dir`: {tag: [(step, value), ...] by step}; {} when none matches.

    Several files (a resumed run writes a new one) are merged oldest first, later files winning per step;
    steps only an older file holds stay (TensorBoard's own purge would hide them). Needs tensorboard
    (ImportError naming `pip install tensorboard` otherwise); FileNotFoundError when `log_dir` is missing.
    """
    merged: Series = {}
    for series in _read_event_series(log_dir, tag_pattern):
        for tag, values in series.items():
            merged.setdefault(tag, {}).update(values)
    return {tag: sorted(values.items()) for tag, values in sorted(merged.items())}


# ----------------------------------------------------------------------------------- other formats
def _read_aitk_sqlite(path: Path, matcher: re.Pattern) -> list[Series]:
    """ai-toolkit's UILogger database: one value per (step, key) already (it upserts and prunes on resume)."""
    # no -wal file: no writer holds it open, so read it as immutable (no -wal/-shm left in the trainer's
    # folder); otherwise read-only alongside the writer
    immutable = "&immutable=1" if not path.with_name(path.name + "-wal").exists() else ""
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro{immutable}", uri=True, timeout=10.0)
    except sqlite3.Error as error:
        raise ValueError(f"{path}: not readable as ai-toolkit's SQLite loss log ({error})") from error
    try:
        rows = connection.execute("SELECT step, key, value_real FROM metrics WHERE value_real IS NOT NULL").fetchall()
    except sqlite3.OperationalError as error:
        if "no such table" in str(error):  # the logger has not committed anything yet
            return []
        raise ValueError(f"{path}: not readable as ai-toolkit's SQLite loss log ({error})") from error
    finally:
        connection.close()
    series: Series = {}
    for step, key, value in rows:
        if matcher.fullmatch(str(key)):
            series.setdefault(str(key), {})[int(step)] = float(value)
    return [series] if series else []


def _read_simpletuner_jsonl(path: Path, matcher: re.Pattern) -> list[Series]:
    """SimpleTuner's training_metrics.jsonl: appended lines, so a resumed run's later lines win per step; a
    torn last line (still being written) is skipped."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    series: Series = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step, metrics = int(record["step"]), record["metrics"]
        except (ValueError, KeyError, TypeError) as error:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise ValueError(f"{path}:{number}: not a SimpleTuner metrics line ({error})") from error
        for key, value in metrics.items():
            if matcher.fullmatch(key) and isinstance(value, (int, float)) and not isinstance(value, bool):
                series.setdefault(key, {})[step] = float(value)
    return [series] if series else []


_OTHER_READERS: dict[str, Callable[[Path, re.Pattern], list[Series]]] = {
    AITK_SQLITE: _read_aitk_sqlite,
    SIMPLETUNER_JSONL: _read_simpletuner_jsonl,
}


# -------------------------------------------------------------------------------- validation loss
def _combine(files: list[Series], average_tag: str | None) -> dict[int, float]:
    """One value per step: from the newest file holding the step, its average tag when there, else the mean of
    its matching tags at that step (a step's tags are never mixed across files)."""
    newest: dict[int, dict[str, float]] = {}
    for series in files:  # oldest first
        at_step: dict[int, dict[str, float]] = {}
        for tag, values in series.items():
            for step, value in values.items():
                at_step.setdefault(step, {})[tag] = value
        newest.update(at_step)
    combined = {}
    for step, values in sorted(newest.items()):
        if average_tag is not None and average_tag in values:
            combined[step] = values[average_tag]
        else:
            parts = [value for tag, value in values.items() if tag != average_tag]
            combined[step] = math.fsum(parts) / len(parts)
    return combined


def validation_loss(
    output_dir: str | Path,
    trainer: str,
    logging_dir: str | Path | None = None,
    axis: str | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[int, float]:
    """{step or epoch: validation loss} from the logs trainer `trainer` wrote for the run in `output_dir`.

    `axis` picks the counter ("step" or "epoch"; the entry's default_axis when None: kohya logs both).
    `logging_dir` is where the TensorBoard event files are when not in the trainer's default place (kohya's and
    musubi-tuner's --logging_dir, SimpleTuner's when given as an absolute path). Several tags at one step
    (per-concept or per-dataset losses) become one value as the entry's `combine` says. The values are as the
    trainer logged them: the weights behind the value at n are those of round n + round_offset.
    Returns {} when the trainer logs no validation loss or its logs hold none yet; `say` (when given) hears why.
    """
    spec = get_tag_spec(trainer)
    tell = say or (lambda message: None)
    if not spec.tags:
        tell(f"{spec.trainer}: {spec.missing}.")
        return {}
    axis = axis or spec.default_axis
    if axis not in spec.tags:
        allowed = " or ".join(repr(name) for name in spec.tags)
        raise ValueError(f"{spec.trainer} logs its validation loss against {allowed}, not {axis!r} (axes: {', '.join(UNITS)}).")
    matcher = _tag_matcher(spec.tags[axis])
    output_dir = Path(output_dir)
    looked: list[str] = []

    if spec.other_log is not None:
        other = output_dir / spec.other_log
        looked.append(str(other))
        if other.is_file():
            values = _combine(_OTHER_READERS[spec.other_format](other, matcher), spec.average_tags.get(axis))
            if values:
                return values

    if spec.event_folder is not None:
        folder = Path(logging_dir) if logging_dir is not None else output_dir / spec.event_folder
        looked.append(f"TensorBoard event files below {folder}")
        if folder.exists() and event_files(folder):
            values = _combine(_read_event_series(folder, matcher), spec.average_tags.get(axis))
            if values:
                return values
    elif logging_dir is not None:
        tell(f"{spec.trainer}: its TensorBoard files hold no validation loss; {logging_dir} is not read.")

    tell(f"{spec.trainer}: no validation loss ({spec.tags[axis]!r} against the {axis}) in {' or '.join(looked)}. "
         f"It is logged with: {spec.enable}.")
    return {}
