"""Preview prompts: what is rendered at every epoch end, with which seed, size and steps.

A `PreviewSpec` is the fixed set of prompts the monitor renders after each epoch. Every prompt
carries its own seed so that the previews of different epochs differ only by the LoRA weights,
which is what makes their scores comparable. The spec can be built in code, or loaded from the
prompt files kohya-ss sd-scripts users already have (`--sample_prompts`: .txt, .toml, .json; read by
lora_monitor/prompt_files.py). Its `fingerprint()` names it in caches (the base renders) and in
exported metadata. `PREVIEW_DEFAULTS` holds what a preview renders with where nothing says otherwise,
for every entry point.

No torch here: loading and validating a spec must work before any model is built.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import operator
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

__all__ = [
    "MAX_PREVIEW_SIZE", "MAX_PREVIEW_SIZE_ENV", "MAX_STEPS", "MAX_STEPS_ENV", "PREVIEW_DEFAULTS", "PreviewPrompt", "PreviewSpec",
    "SEED_LIMIT", "SUFFIXES", "preview_limits",
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

#: What a preview renders with where neither its prompt nor the caller sets it, the same in every entry point:
#: PreviewPrompt, PreviewSpec.from_prompts and PreviewSpec.load (so LoraMonitor(spec="prompts.txt") too), the
#: command line's render flags and the kohya launcher and watcher (lora_monitor.kohya_names). The prompt files
#: are kohya sd-scripts' format, so these are kohya's own sampler defaults (library/train_util.py,
#: sample_image_inference: 30 steps at 512x512), and a prompt file gives the same previews wherever it is loaded.
#: `guidance_scale` None is the model family's CFG scale (lora_monitor.families, `cfg_default`: kohya's 7.5 for
#: SD, no CFG for FLUX); the sampler, which no prompt sets, is the family's preview sampler (render.default_sampler).
PREVIEW_DEFAULTS: Mapping[str, Any] = MappingProxyType({"steps": 30, "guidance_scale": None, "width": 512, "height": 512})


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
    CFG and distilled guidance 3.5), so one prompt file suits every family. What is not given
    comes from PREVIEW_DEFAULTS.

    Checked on construction: width and height positive multiples of 8 (the VAE downsamples by
    8) up to 4096, steps from 1 to 1000 (limits a user can raise: `preview_limits`), guidance
    scales finite and >= 0, seed an int in [0, 2**63), prompt a non-empty string. Ints given as
    other integer types are stored as int and the scales as float, so equal specs have equal
    fingerprints.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    steps: int = PREVIEW_DEFAULTS["steps"]
    guidance_scale: float | None = PREVIEW_DEFAULTS["guidance_scale"]
    width: int = PREVIEW_DEFAULTS["width"]
    height: int = PREVIEW_DEFAULTS["height"]
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
        steps: int = PREVIEW_DEFAULTS["steps"],
        guidance_scale: float | None = PREVIEW_DEFAULTS["guidance_scale"],
        width: int = PREVIEW_DEFAULTS["width"],
        height: int = PREVIEW_DEFAULTS["height"],
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
        steps: int = PREVIEW_DEFAULTS["steps"],
        guidance_scale: float | None = PREVIEW_DEFAULTS["guidance_scale"],
        width: int = PREVIEW_DEFAULTS["width"],
        height: int = PREVIEW_DEFAULTS["height"],
        negative_prompt: str = "",
        seeds_per_prompt: int = 1,
    ) -> PreviewSpec:
        """Read a preview prompt file; the format follows the suffix (.txt, .toml or .json).
        `seeds_per_prompt=n` renders every prompt n times with seeds seed, seed + 1, ... (see `with_seeds`).

        The keyword arguments are the defaults for whatever a line or entry does not set; left
        out, they are PREVIEW_DEFAULTS, kohya's own defaults for its prompt files (30 steps, 512x512,
        the family's CFG), so a file gives the same previews here, in LoraMonitor(spec=path) and in
        the kohya launcher and watcher. A prompt without a seed gets `seed + i`, where i is its 0-based position among the
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

        Errors name the file and the line (.txt) or entry index (.json/.toml). The parsing is
        lora_monitor/prompt_files.py's.
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
        from lora_monitor.prompt_files import read_prompt_file  # imported here: it imports PreviewPrompt from this module

        return cls(tuple(read_prompt_file(path, seed, defaults))).with_seeds(seeds_per_prompt)

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

