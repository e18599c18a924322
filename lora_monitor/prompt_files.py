"""kohya-ss sd-scripts' preview prompt files (`--sample_prompts`: .txt, .toml, .json), read into PreviewPrompts.

`read_prompt_file` is what `PreviewSpec.load` reads a file with; the format, its options and keys are
described there. kohya's options and keys that mean nothing for our previews (its sampler, ControlNet, ...)
are accepted with one warning each per file, so a user's existing prompt file loads; anything else is an
error naming the file and the line (.txt) or the entry (.json/.toml). What a prompt does not set comes
from the `defaults` given (PreviewSpec.load's keywords, lora_monitor.spec.PREVIEW_DEFAULTS unless told).

No torch here, as in lora_monitor.spec.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lora_monitor.spec import PreviewPrompt

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["read_prompt_file"]

# kohya prompt-line options we use: option letter -> (PreviewPrompt field, what the value is).
_TXT_OPTIONS: dict[str, tuple[str, str]] = {
    "n": ("negative_prompt", "negative prompt text"),
    "w": ("width", "width in pixels"),
    "h": ("height", "height in pixels"),
    "d": ("seed", "seed"),
    "s": ("steps", "number of denoising steps"),
    "l": ("guidance_scale", "classifier-free guidance scale"),
    "g": ("distilled_guidance", "distilled guidance scale (FLUX)"),
}

# Options kohya sd-scripts also understands (library/train_util.py, line_to_prompt_dict) but that
# have no meaning for our previews. A user's existing prompt file must load, so they are accepted
# and ignored, with one warning per option per file.
_TXT_IGNORED: dict[str, str] = {
    "ss": "sampler; previews use the training pipeline's scheduler",
    "cn": "ControlNet image; previews render without ControlNet",
    "ctr": "CFG truncation ratio (Lumina)",
    "rcfg": "CFG renormalisation (Lumina)",
    "fs": "flow shift (SD3/FLUX)",
}

# Keys of a kohya .json entry or .toml [prompt] table / [[prompt.subset]] entry -> PreviewPrompt
# field. kohya spells the steps `sample_steps`, the CFG scale `scale` and FLUX's distilled guidance
# `guidance_scale` (its --g; library/train_util.py line_to_prompt_dict); `steps` is accepted too.
_ENTRY_KEYS: dict[str, str] = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "seed": "seed",
    "sample_steps": "steps",
    "steps": "steps",
    "scale": "guidance_scale",
    "guidance_scale": "distilled_guidance",
}

# Our own format, `PreviewSpec.to_dict()` output (`{"prompts": [...]}`), uses PreviewPrompt's field names.

# kohya entry keys we accept and ignore (one warning per key per file). `enum` is the index kohya
# itself adds to each loaded prompt.
_ENTRY_IGNORED: dict[str, str] = {
    "sample_sampler": "sampler; previews use the training pipeline's scheduler",
    "controlnet_image": "ControlNet image; previews render without ControlNet",
    "cfg_trunc_ratio": "CFG truncation ratio (Lumina)",
    "renorm_cfg": "CFG renormalisation (Lumina)",
    "flow_shift": "flow shift (SD3/FLUX)",
    "enum": "prompt index kohya adds itself",
}


def read_prompt_file(path: Path, seed: int, defaults: dict[str, Any]) -> list[PreviewPrompt]:
    """The prompts of the kohya prompt file `path` (its suffix checked by the caller: .txt, .toml or .json),
    each over `defaults`; a prompt without a seed gets `seed` + its position. Errors name the file and the
    line or entry; a file without prompts is an error too."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 (byte {raw[error.start]:#04x} at offset {error.start}); save the prompt file as UTF-8"
        ) from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = _parse_txt(path, text, seed, defaults)
    elif suffix == ".json":
        prompts = _parse_json(path, text, seed, defaults)
    else:
        prompts = _parse_toml(path, text, seed, defaults)
    if not prompts:
        raise ValueError(f"preview prompt file {str(path)!r} contains no prompts")
    return prompts


class _IgnoredWarner:
    """Warns once per ignored kohya option per file."""

    def __init__(self, path: Path, kind: str) -> None:
        self.path = path
        self.kind = kind
        self.seen: set[str] = set()

    def __call__(self, name: str, what: str, where: str) -> None:
        if name in self.seen:
            return
        self.seen.add(name)
        warnings.warn(
            f"{where}: kohya {self.kind} {name} ({what}) is ignored by lora-monitor; "
            f"further uses in {str(self.path)!r} are not reported",
            UserWarning,
            stacklevel=6,
        )


def _parse_txt(path: Path, text: str, seed: int, defaults: dict[str, Any]) -> list[PreviewPrompt]:
    warn = _IgnoredWarner(path, "option")
    prompts = []
    for line_number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{line_number}"
        fields = _parse_prompt_line(line, where, warn)
        prompts.append(_build(fields, where, seed + len(prompts), defaults))
    return prompts


def _parse_prompt_line(line: str, where: str, warn: _IgnoredWarner) -> dict[str, Any]:
    """A kohya prompt line -> PreviewPrompt fields it sets (values still unvalidated)."""
    allowed = ", ".join(f"--{name}" for name in [*_TXT_OPTIONS, *_TXT_IGNORED])
    if line.startswith("--"):
        raise ValueError(f"{where}: the prompt is empty: the line starts with an option ({line.split()[0]!r})")
    prompt, *options = line.split(" --")
    fields: dict[str, Any] = {"prompt": prompt.strip()}
    given: set[str] = set()
    for option in options:
        name, value = (option.strip().split(None, 1) + ["", ""])[:2]
        name, value = name.lower(), value.strip()
        if not name:
            raise ValueError(
                f"{where}: ' --' is followed by no option name; in a kohya prompt file ' --' "
                f"starts an option ({allowed})"
            )
        if name in _TXT_IGNORED:
            warn(f"--{name}", _TXT_IGNORED[name], where)
            continue
        if name not in _TXT_OPTIONS:
            raise ValueError(f"{where}: unknown option --{name}; allowed options: {allowed}")
        if name in given:
            raise ValueError(f"{where}: option --{name} is given more than once")
        given.add(name)
        field, meaning = _TXT_OPTIONS[name]
        if not value:
            raise ValueError(f"{where}: option --{name} needs a value ({meaning})")
        if field == "negative_prompt":
            fields[field] = value
        elif field in ("guidance_scale", "distilled_guidance"):
            try:
                fields[field] = float(value)
            except ValueError:
                raise ValueError(
                    f"{where}: --{name} {value!r} is not a number; expected the {meaning}, a finite number >= 0"
                ) from None
        else:
            try:
                fields[field] = int(value)
            except ValueError:
                raise ValueError(f"{where}: --{name} {value!r} is not an integer; expected the {meaning}") from None
        fields[f"_option:{field}"] = f"--{name}"
    return fields


def _build(fields: dict[str, Any], where: str, default_seed: int, defaults: dict[str, Any]) -> PreviewPrompt:
    """PreviewPrompt from parsed fields over the defaults; errors get `where` and the option."""
    sources = {key.split(":", 1)[1]: value for key, value in fields.items() if key.startswith("_option:")}
    values = {key: value for key, value in fields.items() if not key.startswith("_option:")}
    merged = {**defaults, "seed": default_seed, **values}
    if "prompt" not in merged:
        raise ValueError(f"{where}: no 'prompt' given")
    try:
        return PreviewPrompt(**merged)
    except ValueError as error:
        message = str(error)
        field = message.split(" ", 1)[0]
        label = f" {sources[field]}:" if field in sources else ""
        raise ValueError(f"{where}:{label} {message}") from None


def _parse_json(path: Path, text: str, seed: int, defaults: dict[str, Any]) -> list[PreviewPrompt]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: invalid JSON in preview prompt file: {error.msg}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to be a preview prompt file (a list of prompt objects or lines)") from None
    keys = _ENTRY_KEYS
    if isinstance(data, Mapping) and set(data) == {"prompts"}:
        data = data["prompts"]  # PreviewSpec.to_dict() output: our field names
        keys = {field.name: field.name for field in dataclasses.fields(PreviewPrompt)}
    if not isinstance(data, list):
        raise ValueError(
            f"{path}: a JSON preview prompt file must hold a list of prompt objects or kohya prompt "
            f"lines (or PreviewSpec.to_dict() output), got {type(data).__name__}"
        )
    warn_line = _IgnoredWarner(path, "option")
    warn_key = _IgnoredWarner(path, "key")
    prompts = []
    for index, entry in enumerate(data):
        where = f"{path}: entry {index}"
        if isinstance(entry, str):
            fields = _parse_prompt_line(entry.strip(), where, warn_line)
        else:
            fields = _entry_fields(entry, where, warn_key, keys)
        prompts.append(_build(fields, where, seed + index, defaults))
    return prompts


def _parse_toml(path: Path, text: str, seed: int, defaults: dict[str, Any]) -> list[PreviewPrompt]:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{path}: invalid TOML in preview prompt file: {error}") from None
    extra = sorted(set(data) - {"prompt"})
    if extra or not isinstance(data.get("prompt"), dict):
        raise ValueError(
            f"{path}: a TOML preview prompt file holds one [prompt] table (defaults) with "
            f"[[prompt.subset]] entries; unexpected top-level keys: {extra or 'none, but [prompt] is missing'}"
        )
    table = dict(data["prompt"])
    subsets = table.pop("subset", None)
    if not isinstance(subsets, list) or not all(isinstance(entry, dict) for entry in subsets):
        raise ValueError(f"{path}: [prompt] needs [[prompt.subset]] entries, one per preview prompt")
    warn_key = _IgnoredWarner(path, "key")
    table_fields = _entry_fields(table, f"{path}: [prompt]", warn_key)
    prompts = []
    for index, entry in enumerate(subsets):
        where = f"{path}: [[prompt.subset]] entry {index}"
        fields = {**table_fields, **_entry_fields(entry, where, warn_key)}
        prompts.append(_build(fields, where, seed + index, defaults))
    return prompts


def _entry_fields(entry: Any, where: str, warn: _IgnoredWarner, keys: Mapping[str, str] = _ENTRY_KEYS) -> dict[str, Any]:
    """A .json/.toml prompt entry -> PreviewPrompt fields by `keys` (kohya's, or ours); unknown keys are an error."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"{where}: expected an object with a 'prompt' key, got {type(entry).__name__}")
    fields: dict[str, Any] = {}
    source: dict[str, str] = {}
    for key, value in entry.items():
        if key in _ENTRY_IGNORED:
            warn(repr(key), _ENTRY_IGNORED[key], where)
            continue
        if key not in keys:
            allowed = sorted([*keys, *_ENTRY_IGNORED])
            raise ValueError(f"{where}: unknown key {key!r}; allowed keys: {allowed}")
        field = keys[key]
        if field in fields and fields[field] != value:
            raise ValueError(
                f"{where}: {source[field]!r} = {fields[field]!r} and {key!r} = {value!r} both set {field}; give one"
            )
        fields[field] = value
        source[field] = key
    return fields
