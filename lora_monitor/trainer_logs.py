"""The trainers' own validation loss, read back from their logs (issue 13).

Several trainers compute a loss on held-out images themselves and log it: kohya sd-scripts
(`--validation_split`), OneTrainer (validation concepts), SimpleTuner (eval datasets) and ai-toolkit
(`validation_config`); musubi-tuner and the diffusers LoRA example scripts log none. Which tags, against
which counter, and where the files go are data: one `TagSpec` per trainer in `trainer_log_tags`.

`read_scalars` reads TensorBoard event files through tensorboard's EventAccumulator (tensorboard is an
optional extra); `validation_loss` turns a trainer's logs into {step or epoch: loss}; `loss_for_round` picks
the value computed on a round's weights. Nothing of the trainers is imported, and no torch.
"""
from __future__ import annotations

import json
import math
import re
import sqlite3
from pathlib import Path
from typing import Callable, Mapping

from lora_monitor.trainer_layouts import UNITS
from lora_monitor.trainer_log_tags import AITK_SQLITE, SIMPLETUNER_JSONL, VALIDATION_TAGS, TagSpec, get_tag_spec

__all__ = ["TagSpec", "VALIDATION_TAGS", "get_tag_spec", "read_scalars", "validation_loss", "accumulation_steps",
           "loss_for_round", "EVENT_FILE_GLOB"]

EVENT_FILE_GLOB = "events.out.tfevents.*"  # tensorboard's EventFileWriter and tensorboardX name their files so
INSTALL_HINT = "pip install tensorboard (or pip install 'lora-monitor[tensorboard]')"


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


# ------------------------------------------------------------------------------- which round it is
def accumulation_steps(output_dir: str | Path, trainer: str, say: Callable[[str], None] | None = None) -> int:
    """The run's gradient accumulation steps, from the settings file trainer `trainer` saved in `output_dir` (the
    newest by name); 1 when the trainer's rounds do not depend on it, or no readable file gives it (`say` hears why)."""
    spec = get_tag_spec(trainer)
    if spec.settings_glob is None or spec.accumulation_key is None:
        return 1
    files = sorted(Path(output_dir).glob(spec.settings_glob), key=lambda path: path.name)
    tell = say or (lambda message: None)
    for path in reversed(files):
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get(spec.accumulation_key)
        except (OSError, ValueError, AttributeError) as error:
            tell(f"{path}: not readable as {spec.trainer}'s settings ({error}); trying an older one")
            continue
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
        tell(f"{path}: {spec.accumulation_key} is {value!r}, not a count of steps; trying an older one")
    tell(f"{spec.trainer}: no saved settings ({spec.settings_glob} in {output_dir}) say its {spec.accumulation_key}: "
         "taken as 1")
    return 1


def loss_for_round(losses: Mapping[int, float], number: int, trainer: str, accumulation: int = 1) -> float:
    """The validation loss computed on the weights of the trainer's round `number` (NaN when none was logged):
    the value logged at number - round_offset; for a trainer whose entry names its accumulation setting, any of
    the `accumulation` steps from there on (no optimizer step between them), the latest logged one."""
    spec = get_tag_spec(trainer)
    first = number - spec.round_offset
    window = accumulation if spec.accumulation_key is not None else 1
    logged = [step for step in range(first, first + max(window, 1)) if step in losses]
    return float(losses[logged[-1]]) if logged else math.nan
