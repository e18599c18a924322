"""kohya prompt files as the launcher and the watcher read them: kohya's sampler defaults, the prompt file
rewritten with a fixed seed on every prompt (kohya draws a random one for a prompt without --d, which
makes epochs incomparable), and the check that diversity has several seeds of each prompt to compare.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping

from lora_monitor.kohya_names import KOHYA_TRAINERS
from lora_monitor.policy import get_preset
from lora_monitor.spec import PreviewSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROMPTS_STEM = "lora_monitor_prompts"
#: kohya's defaults for what a prompt does not set (library/train_util.py, sample_image_inference:
#: SD and SDXL); each family's are in KOHYA_TRAINERS[family].sample_defaults.
KOHYA_PROMPT_DEFAULTS = dict(KOHYA_TRAINERS["sd"].sample_defaults)
#: PreviewSpec.to_dict()'s key names -> kohya's (train_util.line_to_prompt_dict stores --s as "sample_steps",
#: --l as "scale" (CFG) and --g as "guidance_scale", FLUX's distilled guidance), for the file kohya reads.
OUR_ENTRY_KEYS = {"steps": "sample_steps", "guidance_scale": "scale", "distilled_guidance": "guidance_scale"}


def prompt_defaults(family: str | None) -> dict[str, Any]:
    """What kohya's sampler of `family` uses for a prompt that does not set it (SD's for an unknown family)."""
    trainer = KOHYA_TRAINERS.get(family) if family else None
    return dict(trainer.sample_defaults if trainer else KOHYA_PROMPT_DEFAULTS)


def monitor_metrics(options: Mapping[str, Any]) -> list[str]:
    """The metrics a LoraMonitor built with `options` computes: the given metrics, else its preset's (quality's
    by default), with the bounded ones (a monitor refuses bounds on metrics it does not compute)."""
    metrics = options.get("metrics") or get_preset(options.get("preset") or "quality").metrics
    return list(dict.fromkeys([*metrics, *([options["metric"]] if options.get("metric") else []), *(options.get("bounds") or {})]))


def check_seed_groups(spec: PreviewSpec, metrics: Iterable[str], source: str | os.PathLike) -> None:
    """Diversity compares the seeds of each prompt; in a kohya prompt file (`source`) they are one line
    repeated with other --d seeds. A prompt with a single seed, or repeated with the same seed (the same
    image twice), is an error naming that fix, raised before training or scoring starts."""
    if "diversity" not in metrics:
        return
    members: dict[int, list[int]] = {}
    for index, group in enumerate(spec.seed_groups()):
        members.setdefault(group, []).append(index)

    def example(index: int) -> str:
        text = spec.prompts[index].prompt
        return text if len(text) <= 40 else text[:37] + "..."

    single = [indices[0] for indices in members.values() if len(indices) < 2]
    if single:
        listed = ", ".join(f"{index} ({example(index)!r})" for index in single[:5]) + (f" and {len(single) - 5} more" if len(single) > 5 else "")
        raise ValueError(
            f"the diversity metric compares the seeds of each prompt, but prompt(s) {listed} of {source} have a single seed: "
            f"repeat each such line with another --d, e.g. `{example(single[0])} ... --d 1` and `{example(single[0])} ... --d 2` "
            "(in a .toml or .json file: the entry again with another \"seed\"); or drop diversity (--preset quality, or --metrics without it)"
        )
    for indices in members.values():
        seeds = [spec.prompts[index].seed for index in indices]
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            same = [index for index in indices if spec.prompts[index].seed in repeated]
            raise ValueError(
                f"prompts {same} of {source} are the same prompt ({example(same[0])!r}) with the same seed {repeated[0]}: "
                "they render the same image, so diversity would be 0; give each repeat of the line another --d"
            )


def _prompt_entries(source: Path) -> tuple[list[Any], bool] | None:
    """The prompts of a kohya prompt file as kohya's load_prompts sees them (lines, or entries with a
    .toml's [prompt] defaults merged in), and whether they are PreviewSpec.to_dict() entries (our key
    names); None when the file does not read (PreviewSpec.load then says why)."""
    suffix = source.suffix.lower()
    try:
        text = source.read_text(encoding="utf-8-sig")
        if suffix == ".txt":
            lines = [line.strip() for line in text.splitlines()]
            return [line for line in lines if line and not line.startswith("#")], False
        if suffix == ".json":
            entries = json.loads(text)
            if isinstance(entries, dict) and set(entries) == {"prompts"}:
                return list(entries["prompts"]), True
            return (entries, False) if isinstance(entries, list) else None
        table = dict(tomllib.loads(text)["prompt"])
        subsets = table.pop("subset")
        return [{**table, **subset} for subset in subsets], False
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prompts_target(source: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Where fixed_seed_prompts writes the prompt file kohya reads: <folder>/lora_monitor_prompts.txt for a .txt source, else .json."""
    return Path(folder) / f"{PROMPTS_STEM}{'.txt' if Path(source).suffix.lower() == '.txt' else '.json'}"


def fixed_seed_prompts(
    source: str | os.PathLike, folder: str | os.PathLike, seed: int = 0, *, defaults: Mapping[str, Any] | None = None
) -> tuple[Path, PreviewSpec, list[int]]:
    """Write `source` (a kohya prompt file) into `folder` with an explicit seed on every prompt.

    kohya draws a random seed for a prompt without --d / "seed", which makes epochs incomparable;
    such a prompt gets seed + its index, as PreviewSpec.load gives it. Comment and blank lines are
    dropped (kohya and we skip them slightly differently). .txt stays .txt, its lines otherwise as
    they were (--l, --g and every other option kept); .toml and .json become .json (kohya reads
    both) in kohya's key names (PreviewSpec.to_dict() entries are renamed: steps -> sample_steps,
    guidance_scale -> scale, distilled_guidance -> guidance_scale). `defaults`: kohya's sampler
    defaults (prompt_defaults(family)). Returns the new file, the spec it holds and the indices given a seed.
    """
    source = Path(source)
    defaults = dict(KOHYA_PROMPT_DEFAULTS if defaults is None else defaults)
    spec = PreviewSpec.load(source, seed=seed, **defaults)
    suffix = source.suffix.lower()
    read = _prompt_entries(source)
    if read is None:  # pragma: no cover - it loaded just above
        raise ValueError(f"{source}: cannot read its prompts")
    entries, ours = read
    if ours:
        entries = [{OUR_ENTRY_KEYS.get(k, k): v for k, v in entry.items()} for entry in entries]
    fixed = []
    changed: list[int] = []
    for index, (entry, prompt) in enumerate(zip(entries, spec.prompts)):
        if isinstance(entry, str):
            options = [part.strip().split(None, 1)[0].lower() for part in entry.split(" --")[1:] if part.strip()]
            if "d" not in options:
                entry = f"{entry} --d {prompt.seed}"
                changed.append(index)
        elif "seed" not in entry:
            entry = {**entry, "seed": prompt.seed}
            changed.append(index)
        fixed.append(entry)
    target = prompts_target(source, folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".txt":
        text = "".join(line + "\n" for line in fixed)
    else:
        text = json.dumps(fixed, indent=2, ensure_ascii=False) + "\n"
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)
    rewritten = PreviewSpec.load(target, seed=seed, **defaults)
    if rewritten.fingerprint() != spec.fingerprint():  # pragma: no cover - a bug of ours, not of the input
        raise RuntimeError(f"rewriting {source} with fixed seeds changed its prompts; please report this")
    return target, spec, changed

