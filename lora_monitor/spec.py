"""Preview prompts: what is rendered at every epoch end, with which seed, size and steps.

A `PreviewSpec` is the fixed set of prompts the monitor renders after each epoch. Every prompt
carries its own seed so that the previews of different epochs differ only by the LoRA weights,
which is what makes their scores comparable. The spec can be built in code, or loaded from the
prompt files kohya-ss sd-scripts users already have (`--sample_prompts`: .txt, .toml, .json).
Its `fingerprint()` names it in caches (the base renders) and in exported metadata.

No torch here: loading and validating a spec must work before any model is built.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "MAX_PREVIEW_SIZE", "MAX_PREVIEW_SIZE_ENV", "MAX_STEPS", "MAX_STEPS_ENV", "PreviewPrompt", "PreviewSpec", "SEED_LIMIT",
    "SUFFIXES", "preview_limits",
]

#: Seeds must lie in [0, SEED_LIMIT): torch.Generator.manual_seed takes them on every device.
SEED_LIMIT = 2**63

#: The largest preview width or height, and the most denoising steps, a PreviewPrompt accepts. Past these
#: a typo (`--w 100000`, `--s 1000000000`) would run out of memory or render for days before anything
#: failed. Raise them with the environment variables below, or by setting these constants before the
#: spec is built (`lora_monitor.spec.MAX_STEPS = 2000`); a set variable wins over the constant.
MAX_PREVIEW_SIZE = 4096
MAX_STEPS = 1000
MAX_PREVIEW_SIZE_ENV = "LORA_MONITOR_MAX_PREVIEW_SIZE"
MAX_STEPS_ENV = "LORA_MONITOR_MAX_STEPS"

#: The file formats `PreviewSpec.load` reads, chosen by suffix.
SUFFIXES = (".txt", ".toml", ".json")

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


def preview_limits() -> tuple[int, int]:
    """(largest width or height, most steps) a preview may ask for: $LORA_MONITOR_MAX_PREVIEW_SIZE and
    $LORA_MONITOR_MAX_STEPS where set, else MAX_PREVIEW_SIZE and MAX_STEPS. Read at every check, so a
    limit raised after import applies."""
    limits = []
    for name, default in ((MAX_PREVIEW_SIZE_ENV, MAX_PREVIEW_SIZE), (MAX_STEPS_ENV, MAX_STEPS)):
        text = os.environ.get(name, "").strip()
        if not text:
            limits.append(default)
            continue
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"${name} must be a whole number >= 1, got {text!r}")
        limits.append(value)
    return limits[0], limits[1]


def _check_seeds_per_prompt(value: Any) -> int:
    count = _as_int("seeds_per_prompt", value)
    if not 1 <= count <= 64:
        raise ValueError(f"seeds_per_prompt must be from 1 to 64, got {count}")
    return count


def _as_int(name: str, value: Any) -> int:
    """`value` as an int; bools and floats are refused (512.0 or True is a typo, not a size)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class PreviewPrompt:
    """One preview image: prompt, negative prompt, seed, steps, guidance and size.

    `guidance_scale` is the classifier-free guidance scale (kohya --l) and `distilled_guidance`
    the embedded guidance of guidance-distilled models such as FLUX.1-dev (kohya --g); None
    means the model family's default (e.g. CFG 7.5 for SD 1.x, 5.0 for SDXL; for FLUX, no true
    CFG and distilled guidance 3.5), so one prompt file suits every family.

    Checked on construction: width and height positive multiples of 8 (the VAE downsamples by
    8) up to 4096, steps from 1 to 1000 (limits a user can raise: `preview_limits`), guidance
    scales finite and >= 0, seed an int in [0, 2**63), prompt a non-empty string. Ints given as
    other integer types are stored as int and the scales as float, so equal specs have equal
    fingerprints.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance_scale: float | None = None
    width: int = 512
    height: int = 512
    distilled_guidance: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"prompt must be a non-empty string, got {self.prompt!r}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {self.negative_prompt!r}")
        seed = _as_int("seed", self.seed)
        if not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2**63), got {seed}")
        max_size, max_steps = preview_limits()
        steps = _as_int("steps", self.steps)
        if steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps}")
        if steps > max_steps:
            raise ValueError(
                f"steps must be at most {max_steps}, got {steps}; if that many is meant, raise the limit: "
                f"{MAX_STEPS_ENV}={steps} (or lora_monitor.spec.MAX_STEPS)"
            )
        for name in ("width", "height"):
            size = _as_int(name, getattr(self, name))
            if size <= 0 or size % 8:
                raise ValueError(f"{name} must be a positive multiple of 8, got {size}")
            if size > max_size:
                raise ValueError(
                    f"{name} must be at most {max_size} pixels, got {size}; if that size is meant, raise the limit: "
                    f"{MAX_PREVIEW_SIZE_ENV}={size} (or lora_monitor.spec.MAX_PREVIEW_SIZE)"
                )
            object.__setattr__(self, name, size)
        for name in ("guidance_scale", "distilled_guidance"):
            scale = getattr(self, name)
            if scale is None:
                continue
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {scale!r} (None: the model family's default)")
            object.__setattr__(self, name, float(scale))
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "steps", steps)

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain JSON-serialisable dict; a guidance left to the model's default is left out."""
        return {name: value for name, value in dataclasses.asdict(self).items() if value is not None}


@dataclass(frozen=True)
class PreviewSpec:
    """The ordered, fixed set of preview prompts rendered at every epoch end.

    The order matters: image i of every epoch is prompt i, and it is scored against base
    render i. A list given as `prompts` is stored as a tuple.
    """

    prompts: tuple[PreviewPrompt, ...]

    def __post_init__(self) -> None:
        if isinstance(self.prompts, (str, bytes)) or not isinstance(self.prompts, Sequence):
            raise ValueError(f"prompts must be a sequence of PreviewPrompt, got {type(self.prompts).__name__}")
        prompts = tuple(self.prompts)
        if not prompts:
            raise ValueError("a PreviewSpec needs at least one prompt")
        for index, prompt in enumerate(prompts):
            if not isinstance(prompt, PreviewPrompt):
                raise ValueError(f"prompts[{index}] must be a PreviewPrompt, got {type(prompt).__name__}")
        object.__setattr__(self, "prompts", prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def fingerprint(self) -> str:
        """16 hex chars of sha256 over the prompts as canonical JSON (sorted keys, no spaces).

        Identical across processes and Python runs: no hash(), no object ids, no dict order.
        Any change of any field of any prompt, or of their order, changes it.
        """
        canonical = json.dumps(
            [prompt.to_dict() for prompt in self.prompts],
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=True,
            allow_nan=False,
        )
        return hashlib.sha256(canonical.encode("ascii")).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """`{"prompts": [...]}`, JSON-serialisable; `from_dict` reads it back."""
        return {"prompts": [prompt.to_dict() for prompt in self.prompts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreviewSpec:
        """Inverse of `to_dict`. Unknown keys are an error naming them."""
        if not isinstance(data, Mapping):
            raise ValueError(f"PreviewSpec.from_dict expects a mapping, got {type(data).__name__}")
        extra = sorted(set(data) - {"prompts"})
        if extra:
            raise ValueError(f"unknown PreviewSpec keys {extra}; allowed: ['prompts']")
        entries = data.get("prompts")
        if not isinstance(entries, Sequence) or isinstance(entries, (str, bytes)):
            raise ValueError("PreviewSpec.from_dict needs 'prompts': a list of prompt dicts")
        fields = [field.name for field in dataclasses.fields(PreviewPrompt)]
        prompts = []
        for index, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise ValueError(f"prompts[{index}] must be a dict, got {type(entry).__name__}")
            unknown = sorted(set(entry) - set(fields))
            if unknown:
                raise ValueError(f"prompts[{index}]: unknown keys {unknown}; allowed: {fields}")
            try:
                prompts.append(PreviewPrompt(**entry))
            except (TypeError, ValueError) as error:
                raise ValueError(f"prompts[{index}]: {error}") from None
        return cls(tuple(prompts))

    @classmethod
    def from_prompts(
        cls,
        prompts: Sequence[str],
        *,
        seed: int = 0,
        negative_prompt: str = "",
        steps: int = 20,
        guidance_scale: float | None = None,
        width: int = 512,
        height: int = 512,
        seeds_per_prompt: int = 1,
    ) -> PreviewSpec:
        """One preview per prompt text, with seeds seed, seed + 1, ... in order; with `seeds_per_prompt=n`,
        n previews per text side by side, each with its own seed (diversity compares them)."""
        if isinstance(prompts, (str, bytes)):
            raise ValueError("prompts must be a list of strings, not a single string")
        seed = _as_int("seed", seed)
        count = _check_seeds_per_prompt(seeds_per_prompt)
        spec = cls(
            tuple(
                PreviewPrompt(
                    prompt=text,
                    negative_prompt=negative_prompt,
                    seed=seed + index,
                    steps=steps,
                    guidance_scale=guidance_scale,
                    width=width,
                    height=height,
                )
                for index, text in enumerate(prompts)
            )
        )
        # seeds seed + i*n + k: every preview keeps a seed of its own
        return spec if count == 1 else cls(tuple(
            dataclasses.replace(prompt, seed=seed + index * count + k) for index, prompt in enumerate(spec.prompts) for k in range(count)
        ))

    def with_seeds(self, seeds_per_prompt: int) -> PreviewSpec:
        """Each prompt `seeds_per_prompt` times side by side, with seeds seed, seed + 1, ... (1: this spec).
        The previews of one prompt differ only by their seed: what the diversity signal compares."""
        count = _check_seeds_per_prompt(seeds_per_prompt)
        if count == 1:
            return self
        return PreviewSpec(tuple(
            dataclasses.replace(prompt, seed=(prompt.seed + k) % SEED_LIMIT) for prompt in self.prompts for k in range(count)
        ))

    def seed_groups(self) -> list[int]:
        """One group number per preview: previews with equal numbers are the same prompt and settings under
        different seeds. Groups are numbered in order of their first preview."""
        numbers: dict[tuple, int] = {}
        return [
            numbers.setdefault(tuple(sorted(dataclasses.replace(prompt, seed=0).to_dict().items())), len(numbers))
            for prompt in self.prompts
        ]

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        seed: int = 0,
        steps: int = 20,
        guidance_scale: float | None = None,
        width: int = 512,
        height: int = 512,
        negative_prompt: str = "",
        seeds_per_prompt: int = 1,
    ) -> PreviewSpec:
        """Read a preview prompt file; the format follows the suffix (.txt, .toml or .json).
        `seeds_per_prompt=n` renders every prompt n times with seeds seed, seed + 1, ... (see `with_seeds`).

        The keyword arguments are the defaults for whatever a line or entry does not set. A
        prompt without a seed gets `seed + i`, where i is its 0-based position among the
        file's prompts (comments and blank lines not counted). kohya picks a random seed
        instead; fixed seeds are what make epochs comparable.

        - .txt (kohya sample prompt file): one prompt per line; blank lines and lines whose
          first non-blank character is `#` are skipped. Options follow the prompt, each
          introduced by " --" (space, two dashes; letters case-insensitive, as in kohya):
          --n negative prompt, --w width, --h height, --d seed, --s steps, --l CFG scale,
          --g distilled guidance (FLUX). kohya's --ss, --cn, --ctr, --rcfg and --fs are
          accepted and ignored with one warning each. Anything else is a ValueError naming file, line and option.
        - .json: a list whose items are kohya prompt lines (strings, parsed as above) or
          objects with kohya's keys prompt, negative_prompt, width, height, seed, sample_steps
          (or steps), scale (CFG) and guidance_scale (FLUX's distilled guidance, as kohya reads
          it); `PreviewSpec.to_dict()` output ({"prompts": [...]}, our field names) is read too.
        - .toml: kohya's layout, a [prompt] table whose keys are defaults for its
          [[prompt.subset]] entries (same keys as .json); an entry may override a default.

        Errors name the file and the line (.txt) or entry index (.json/.toml).
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in SUFFIXES:
            raise ValueError(
                f"preview prompt file {str(path)!r} has suffix {path.suffix!r}; "
                f"allowed suffixes: {', '.join(SUFFIXES)}"
            )
        if not path.is_file():
            raise FileNotFoundError(f"preview prompt file not found: {str(path)!r}")
        defaults = {
            "negative_prompt": negative_prompt,
            "steps": steps,
            "guidance_scale": guidance_scale,
            "width": width,
            "height": height,
        }
        try:
            PreviewPrompt(prompt="defaults check", seed=seed, **defaults)
        except ValueError as error:
            raise ValueError(f"invalid default passed to PreviewSpec.load: {error}") from None
        seed = _as_int("seed", seed)
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as error:
            line = raw[: error.start].count(b"\n") + 1
            raise ValueError(
                f"{path}:{line}: not UTF-8 (byte {raw[error.start]:#04x} at offset {error.start}); save the prompt file as UTF-8"
            ) from None
        if suffix == ".txt":
            prompts = _parse_txt(path, text, seed, defaults)
        elif suffix == ".json":
            prompts = _parse_json(path, text, seed, defaults)
        else:
            prompts = _parse_toml(path, text, seed, defaults)
        if not prompts:
            raise ValueError(f"preview prompt file {str(path)!r} contains no prompts")
        return cls(tuple(prompts)).with_seeds(seeds_per_prompt)

    def batches(self, max_batch_size: int) -> list[list[int]]:
        """Prompt indices grouped for batched rendering.

        A group shares (width, height, steps, guidance_scale, distilled_guidance), which one pipeline call needs,
        and holds at most `max_batch_size` indices. Groups come in order of their first prompt
        and keep the prompts' order; the result depends on nothing but the spec.
        """
        size = _as_int("max_batch_size", max_batch_size)
        if size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {size}")
        groups: dict[tuple, list[int]] = {}
        for index, prompt in enumerate(self.prompts):
            key = (prompt.width, prompt.height, prompt.steps, prompt.guidance_scale, prompt.distilled_guidance)
            groups.setdefault(key, []).append(index)
        return [indices[start:start + size] for indices in groups.values() for start in range(0, len(indices), size)]


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
            stacklevel=5,
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
