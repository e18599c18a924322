"""The kohya watcher's state file, checked value by value before any of it is used (kohya_watch.py).

<output_dir>/lora_monitor_watch.json holds the monitor's state_dict, the output name, a pending best copy, the
epochs given up, and whether kohya's validation loss is recorded. It is written by the watcher, but read back as
untrusted: an output name must be a plain file name, numbers must be epoch numbers, and anything else is a
ValueError naming the file, the key and the value.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lora_monitor.integrations.watch_common import TRAINER_VAL_LOSS
from lora_monitor.kohya_names import check_output_name


def checked_state(state: Any, path: Path) -> tuple[dict[str, Any], list[int]]:
    """The watcher's state as read from `path`, each value checked (a ValueError names the file, the key and the value),
    and the epochs it scored."""
    def bad(key: str, value: Any, expected: str) -> ValueError:
        return ValueError(f"{path}: {key} is {value!r}, expected {expected}; the file was damaged or edited: move it away to start afresh")

    if not isinstance(state, dict):
        raise bad("the content", type(state).__name__, "a JSON object")
    monitor = state.get("monitor")
    history = monitor.get("policy", {}).get("history") if isinstance(monitor, dict) and isinstance(monitor.get("policy"), dict) else None
    if not isinstance(history, list) or not all(isinstance(entry, dict) and type(entry.get("epoch")) is int for entry in history):
        raise bad("monitor.policy.history", history, "a list of scored epochs (a lora-monitor monitor state)")
    name_known = state.get("name_known", False)
    if not isinstance(name_known, bool):
        raise bad("name_known", name_known, "true or false")
    name = state.get("output_name")
    if name is not None:
        check_output_name(name, f"{path} (output_name)")
    pending = state.get("pending")
    if pending is not None and (type(pending) is not int or pending < 0):
        raise bad("pending", pending, "an epoch number or null")
    skipped = state.get("skipped", [])
    if not isinstance(skipped, list) or not all(type(epoch) is int and epoch >= 0 for epoch in skipped):
        raise bad("skipped", skipped, "a list of epoch numbers")
    stop_written = state.get("stop_written", False)
    if not isinstance(stop_written, bool):
        raise bad("stop_written", stop_written, "true or false")
    prompts = state.get("prompts")
    if prompts is not None and not isinstance(prompts, str):
        raise bad("prompts", prompts, "the prompt file's name")
    with_loss = state.get(TRAINER_VAL_LOSS, False)  # absent in states written before the watcher read kohya's logs
    if not isinstance(with_loss, bool):
        raise bad(TRAINER_VAL_LOSS, with_loss, "true or false")
    checked = dict(monitor=monitor, output_name=name, name_known=name_known, pending=pending, skipped=skipped,
                   stop_written=stop_written, **{TRAINER_VAL_LOSS: with_loss})
    return checked, [entry["epoch"] for entry in history]
