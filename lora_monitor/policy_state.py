"""Saving and restoring a BestEpochPolicy: its state as plain, JSON-safe data and back.

`policy_state` is what `BestEpochPolicy.state_dict` returns (inf and NaN as the strings 'inf', '-inf',
'nan', which JSON lacks; picklable as well) and `restore_policy_state` what `load_state_dict` does: it
refuses a state saved under other settings (another metric, patience or bound would change what "best"
means) and names each difference.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lora_monitor.policy import BestEpochPolicy

__all__ = ["STATE_VERSION", "policy_state", "restore_policy_state"]

STATE_VERSION = 1


def _encode_float(value: float | None) -> float | str | None:
    """JSON has no inf/NaN: encode them as the strings 'inf', '-inf', 'nan'."""
    if value is None or math.isfinite(value):
        return value
    return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")


def _decode_float(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, str):
        if value not in ("inf", "-inf", "nan"):
            raise ValueError(f"policy state holds {value!r} where a number was expected")
        return float(value)
    return float(value)


def _normalise(value: Any) -> Any:
    """Tuples and lists compare equal (JSON turns one into the other); ints equal floats."""
    if isinstance(value, Mapping):
        return {key: _normalise(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalise(item) for item in value]
    return value


def policy_state(policy: BestEpochPolicy) -> dict[str, Any]:
    """Everything needed to resume `policy`; JSON-serialisable (inf/NaN as strings) and picklable."""
    return {
        "version": STATE_VERSION,
        "settings": policy.describe(),
        "best_epoch": policy.best_epoch,
        "best_value": _encode_float(policy.best_value),
        "best_step": policy.best_step,
        "wait_count": policy.wait_count,
        "stopped_epoch": policy.stopped_epoch,
        "stop_reason": policy.stop_reason,
        "base": None if policy.base is None else {name: _encode_float(value) for name, value in policy.base.items()},
        "history": [
            {
                "epoch": result.epoch,
                "step": result.step,
                "value": _encode_float(result.value),
                "aggregates": {name: _encode_float(value) for name, value in result.aggregates.items()},
                "eligible": result.eligible,
                "note": result.note,
            }
            for result in policy.history
        ],
    }


def restore_policy_state(policy: BestEpochPolicy, state: Mapping[str, Any]) -> None:
    """Put `policy` where `policy_state` found it (also after a JSON round trip); the saved settings must equal its own."""
    from lora_monitor.policy import EpochResult  # imported here: lora_monitor.policy imports this module

    if not isinstance(state, Mapping) or state.get("version") != STATE_VERSION:
        found = state.get("version") if isinstance(state, Mapping) else type(state).__name__
        raise ValueError(f"not a BestEpochPolicy state of version {STATE_VERSION} (found {found!r})")
    saved = {"unit": "epoch", "dvar": None, **state["settings"]}  # older states: epoch-based, no DVAR
    current = policy.describe()
    differences = [
        f"{key}: saved {saved.get(key)!r}, now {current[key]!r}"
        for key in current
        if _normalise(saved.get(key)) != _normalise(current[key])
    ]
    if differences:
        raise ValueError("the saved policy state has different settings: " + "; ".join(differences))
    history = [
        EpochResult(
            epoch=int(entry["epoch"]),
            step=entry["step"],
            value=_decode_float(entry["value"]),
            aggregates={name: _decode_float(value) for name, value in entry["aggregates"].items()},
            eligible=bool(entry["eligible"]),
            note=str(entry["note"]),
        )
        for entry in state["history"]
    ]
    policy.history = history
    policy.best_epoch = state["best_epoch"]
    policy.best_value = _decode_float(state["best_value"])
    policy.best_step = state["best_step"]
    policy.wait_count = int(state["wait_count"])
    policy.stopped_epoch = state["stopped_epoch"]
    policy.stop_reason = state["stop_reason"]
    base = state.get("base")
    policy.base = None if base is None else {name: _decode_float(value) for name, value in base.items()}
