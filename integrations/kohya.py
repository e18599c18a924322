"""kohya-ss sd-scripts: its file contract, and the launcher that monitors a LoRA trainer's run.

The launcher imports the user's sd-scripts checkout and the trainer script of the model family
(train_network.py, sdxl_train_network.py, sd3_train_network.py, flux_train_network.py,
lumina_train_network.py: kohya_names.KOHYA_TRAINERS), subclasses its most-derived trainer class
(NetworkTrainer, SdxlNetworkTrainer, Sd3NetworkTrainer, FluxNetworkTrainer, LuminaNetworkTrainer)
and overrides two hooks, whose arguments pass through as given (each family names them differently:
vae/ae, tokenizers/tokenizer, unet/mmdit/flux/lumina; they are found by position or name):
  - post_process_network: remembers the network object (for its set_multiplier and save_weights);
  - sample_images: lets kohya render its samples as usual, then reads the PNGs it wrote for the
    epoch, scores them through a LoraMonitor, copies the best epoch's checkpoint to best/ and, when
    the policy says so, ends training (kohya has no stop flag, so a private exception leaves its
    loop after the trackers are finished; the launcher catches it and exits 0).
Nothing of sd-scripts is copied here: we call its own functions (setup_parser, the checkpoint
names, prepare_dtype) and follow the file names it writes (the same for every family: all keep
train_network.NetworkTrainer's training loop and its sampler's file names):
    <output_dir>/sample/<output_name>_e<epoch:06d>_<prompt:02d>_<YYYYmmddHHMMSS>[_<seed>].png
    <output_dir>/<output_name>-<epoch:06d>.safetensors   (the last epoch: <output_name>.safetensors)
The watcher (kohya_watch.py) shares the file contract defined here.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import json
import os
import shutil
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping

import torch

from lora_monitor import distributed
from lora_monitor.export import export_checkpoint, read_sidecar, write_json_atomic
from lora_monitor.kohya_names import (
    KOHYA_TRAINERS,
    FolderLock,
    KohyaTrainer,
    SampleFile,
    check_output_name,
    family_of_script,
    family_of_trainer_class,
    group_by_epoch,
    last_checkpoint_name,
    list_samples,
)
from lora_monitor.monitor import EpochReport, LoraMonitor
from lora_monitor.policy import BestEpochPolicy, get_preset
from lora_monitor.record import read_image
from lora_monitor.spec import PreviewSpec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SAMPLE_DIR = "sample"
#: The launcher's base renders (network multiplier 0) go to <output_dir>/BASE_DIR/sample/ under kohya's names.
BASE_DIR = "lora_monitor_base"
PROMPTS_STEM = "lora_monitor_prompts"
LAUNCHER_STATE = "lora_monitor_kohya_state.json"
CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt")
#: What a checkout must hold besides the trainer script the user names.
CHECKOUT_LAYOUT = ("train_network.py", "library/train_util.py", "networks")
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


class UnreadableSampleError(ValueError):
    """A sample image that does not decode, whatever the decoder raised (OSError, ValueError, SyntaxError,
    PIL's DecompressionBombError, ...); `path` is the file and `why` the decoder's error."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} does not decode: {why}")
        self.path = path
        self.why = why


def read_sample(path: str | os.PathLike) -> torch.Tensor:
    """One sample image as (3, H, W) floats in [0, 1]; any decoding error as an UnreadableSampleError naming the file."""
    try:
        return read_image(path)
    except Exception as error:  # PIL raises many kinds for a damaged or hostile file: each is "unreadable"
        raise UnreadableSampleError(Path(path), f"{type(error).__name__}: {error}") from error


def images_in_order(by_index: Mapping[int, SampleFile], count: int, where: str) -> list[torch.Tensor]:
    """The images of prompts 0..count-1; a missing or extra index, or a file that does not decode, is an error naming `where`."""
    indices = sorted(by_index)
    if indices != list(range(count)):
        raise ValueError(f"{where}: found samples for prompt indices {indices}, expected 0..{count - 1} (one per prompt of the preview file)")
    try:
        return [read_sample(by_index[i].path) for i in indices]
    except UnreadableSampleError as error:
        raise UnreadableSampleError(error.path, f"{error.why} ({where})") from error.__cause__


def sample_point(args: Any, epoch: int | None, step: int) -> bool:
    """Whether kohya's sampler renders at this call of sample_images (library/train_util.py, sample_images_common):
    step 0 only with --sample_at_first; otherwise epoch ends every --sample_every_n_epochs epochs, or, without it,
    steps every --sample_every_n_steps steps inside an epoch."""
    if step == 0:
        return bool(getattr(args, "sample_at_first", False))
    every_epochs, every_steps = getattr(args, "sample_every_n_epochs", None), getattr(args, "sample_every_n_steps", None)
    if every_epochs is not None:
        return epoch is not None and epoch % every_epochs == 0
    return every_steps is not None and epoch is None and step % every_steps == 0


def decision_text(report: EpochReport, policy: BestEpochPolicy, stopped_before: int | None) -> str:
    """The policy's sentence for an evaluation; once the policy has stopped (`stopped_before`: the epoch it stopped
    at, before this evaluation) a sentence of its own, as the wait count then goes past the patience."""
    if stopped_before is None:
        return report.decision.reason
    if report.is_best:
        return (f"a new best after the stop at epoch {stopped_before} (the trainer went on); the policy stays stopped, "
                f"best/ now holds epoch {report.epoch}")
    best = (f"the best, epoch {policy.best_epoch} ({policy.metric} {policy.best_value:.4f})" if policy.best_epoch is not None
            else "no eligible epoch yet")
    return f"not better than {best}; already stopped at epoch {stopped_before} (the trainer went on past the stop)"


def monitor_metrics(options: Mapping[str, Any]) -> list[str]:
    """The metrics a LoraMonitor built with `options` computes: the given metrics, else its preset's (quality's
    by default), with the bounded ones (a monitor refuses bounds on metrics it does not compute)."""
    metrics = options.get("metrics") or get_preset(options.get("preset") or "quality").metrics
    return list(dict.fromkeys([*metrics, *([options["monitor"]] if options.get("monitor") else []), *(options.get("bounds") or {})]))


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


def describe_base(policy) -> str:
    """The base model's values (LoRA off) and the bounds they resolve, for one line after the first
    evaluation: 'adherence 0.2512, diversity 0.3301, ...; bounds: adherence >= 0.9x base (0.2512) = 0.226'."""
    values = ", ".join(f"{name} {value:.4f}" for name, value in (policy.base or {}).items())
    bounds = []
    for name, (low, high) in policy.bounds.items():
        try:
            if low is not None:
                bounds.append(f"{name} >= {policy.limit(name, low)[1]}")
            if high is not None:
                bounds.append(f"{name} <= {policy.limit(name, high)[1]}")
        except ValueError:  # a relative bound whose base value is unknown: the epoch lines say so
            continue
    return values + (f"; bounds: {', '.join(bounds)}" if bounds else "")


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


# ---------------------------------------------------------------------------------------- the checkout
@dataclass
class Checkout:
    """An imported sd-scripts checkout: the trainer script's module, library.train_util, the trainer
    class and its family (a KOHYA_TRAINERS key; None for a script of no known family)."""

    root: Path
    script: str
    module: ModuleType
    train_util: ModuleType
    trainer_class: type
    family: str | None = None


def choose_trainer(family: str | None = None, script: str | None = None) -> tuple[str, str | None]:
    """(script, family) from --family and --script: the family's script; or the script given, whose
    family is known by its file name (None for another name: found later from its trainer class);
    neither: train_network.py. A --script of one family given with another --family is an error."""
    if family is not None and family not in KOHYA_TRAINERS:
        raise ValueError(f"unknown family {family!r}; the launcher knows {', '.join(KOHYA_TRAINERS)}")
    if script is None:
        return KOHYA_TRAINERS[family or "sd"].script, family or "sd"
    named = family_of_script(script)
    if family is not None and named is not None and named != family:
        raise ValueError(f"--script {script} is sd-scripts' {named} trainer, but --family {family} was given: "
                         f"drop one (--family {family} alone runs {KOHYA_TRAINERS[family].script})")
    return script, family or named


def checkout_commit(root: str | os.PathLike) -> str | None:
    """The commit a git checkout's HEAD is at, read from its .git files (no git needed); None if unknown."""
    git = Path(root) / ".git"
    try:
        if git.is_file():  # a worktree or submodule: "gitdir: <path>"
            text = git.read_text(encoding="utf-8").strip()
            if not text.startswith("gitdir:"):
                return None
            git = (Path(root) / text[len("gitdir:"):].strip()).resolve()
        head = (git / "HEAD").read_text(encoding="utf-8").strip()
        common = git / (git / "commondir").read_text(encoding="utf-8").strip() if (git / "commondir").is_file() else git
        if head.startswith("ref:"):
            ref = head[len("ref:"):].strip()
            for folder in (git, common):
                if (folder / ref).is_file():
                    head = (folder / ref).read_text(encoding="utf-8").strip()
                    break
            else:
                packed = common / "packed-refs"
                lines = packed.read_text(encoding="utf-8").splitlines() if packed.is_file() else []
                head = next((line.split()[0] for line in lines if line.endswith(" " + ref)), "")
    except OSError:
        return None
    return head if len(head) == 40 and all(c in "0123456789abcdef" for c in head.lower()) else None


def _describe_checkout(root: Path) -> str:
    commit = checkout_commit(root)
    return f"{root} (commit {commit[:12]})" if commit else f"{root} (commit unknown: not a git checkout)"


def load_checkout(root: str | os.PathLike, script: str = "train_network.py", family: str | None = None) -> Checkout:
    """Import `script` from the sd-scripts checkout at `root` and find its trainer class.

    `family` (a KOHYA_TRAINERS key) names the class looked for first; without it, the family is that
    of the script's name or, failing that, of the trainer class (a subclass of FluxNetworkTrainer is flux)."""
    root = Path(root).expanduser().resolve()
    hint = "give --sd-scripts the folder of your kohya-ss/sd-scripts git checkout (the one holding train_network.py)"
    if not root.is_dir():
        raise FileNotFoundError(f"sd-scripts checkout not found: {root} is not a folder; {hint}")
    family = family or family_of_script(script)
    trainer: KohyaTrainer | None = KOHYA_TRAINERS.get(family) if family else None
    needed = [script, *[name for name in CHECKOUT_LAYOUT if name != script]]
    missing = [name for name in needed if not (root / name).exists()]
    if missing == [script] and script != "train_network.py":
        what = (f"sd-scripts' {trainer.family} LoRA trainer ({trainer.trainer_class}; in sd-scripts since {trainer.since})"
                if trainer is not None and trainer.script == Path(script).name else "the trainer script given with --script")
        raise ValueError(
            f"the sd-scripts checkout {_describe_checkout(root)} has no {script}, {what}; "
            f"update the checkout (git -C {root} pull) or give another --family / --script"
        )
    if missing:
        raise ValueError(
            f"{root} is not an sd-scripts checkout of a known layout: looked for {', '.join(needed)}; "
            f"missing: {', '.join(missing)}. {hint[0].upper() + hint[1:]}"
        )
    _forget_other_checkouts(root, Path(script).stem)
    if str(root) in sys.path:
        sys.path.remove(str(root))
    sys.path.insert(0, str(root))  # sd-scripts imports `library` and `networks` from its own folder: first, before another checkout's
    try:
        module = importlib.import_module(Path(script).stem)
        base = getattr(importlib.import_module("train_network"), "NetworkTrainer", None)
        train_util = importlib.import_module("library.train_util")
    except ImportError as error:
        raise ValueError(f"importing {script} from {root} failed ({error}); run lora-monitor in the venv that runs sd-scripts") from error
    if base is None:
        raise ValueError(f"{root / 'train_network.py'} has no class NetworkTrainer: an sd-scripts layout this launcher does not know")
    trainers = [obj for obj in vars(module).values() if inspect.isclass(obj) and issubclass(obj, base)]
    named = [t for t in trainers if trainer is not None and t.__name__ == trainer.trainer_class]
    leaves = named or [t for t in trainers if not any(other is not t and issubclass(other, t) for other in trainers)]
    if len(leaves) != 1:
        found = ", ".join(t.__name__ for t in leaves) or "none"
        raise ValueError(f"{root / script}: looked for one subclass of train_network.NetworkTrainer, found {found}")
    missing = [name for name in ("setup_parser",) if not hasattr(module, name)]
    missing += [f"library.train_util.{name}" for name in ("get_epoch_ckpt_name", "prepare_dtype", "read_config_from_file") if not hasattr(train_util, name)]
    if missing:
        raise ValueError(f"{root}: an sd-scripts layout this launcher does not know: looked for {', '.join(missing)}")
    return Checkout(root, script, module, train_util, leaves[0], family or family_of_trainer_class(leaves[0]))


def _forget_other_checkouts(root: Path, stem: str) -> None:
    """Drop sd-scripts modules imported earlier from another folder, so this checkout's are used."""
    family_stems = [Path(trainer.script).stem for trainer in KOHYA_TRAINERS.values()]  # one family script may import another
    for name in list(sys.modules):
        if name in (stem, "train_network", *family_stems) or name.split(".")[0] in ("library", "networks"):
            file = getattr(sys.modules[name], "__file__", None)
            if file and root not in Path(file).resolve().parents:
                del sys.modules[name]


# ---------------------------------------------------------------------------------------- the launcher
class TrainingStopped(BaseException):
    """Leaves kohya's training loop when the monitor stops the run. A BaseException, so that no
    `except Exception` in the trainer swallows it; the launcher catches it."""

    def __init__(self, epoch: int, reason: str) -> None:
        super().__init__(reason)
        self.epoch = epoch
        self.reason = reason


class TrainingFailed(RuntimeError):
    """The trainer raised during training (kohya's own code or a hook of ours); its traceback has been printed."""


def network_preloaded(args: Any) -> bool:
    """Whether the network starts from saved weights (--network_weights, --dim_from_weights): then kohya's samples
    before training show those weights, not the base model."""
    return bool(getattr(args, "network_weights", None) or getattr(args, "dim_from_weights", False))


class KohyaSession:
    """The monitor's side of one kohya run: checks the arguments, fixes the seeds, scores samples."""

    def __init__(self, checkout: Checkout, monitor_options: Mapping[str, Any], *, preview_seed: int = 0, say: Callable[[str], None] = print) -> None:
        self.checkout = checkout
        self.monitor_options = dict(monitor_options)
        self.preview_seed = preview_seed
        self.say = say
        self.monitor: LoraMonitor | None = None
        self.network: Any = None
        self.args: Any = None
        self.current: tuple[int, int] | None = None  # (epoch, step) being exported
        self.started = False  # sample_images was called once (the accelerator is attached, the base is handled)
        self.saved_from_network: int | None = None  # the epoch whose best/ weights were saved through save_weights
        self.scored = False  # this start scored an epoch: what it wrote belongs to the record
        self.prompts_before: tuple[Path, bytes | None] | None = None  # the prompt file kohya reads, and what it held before this start
        self.lock: FolderLock | None = None
        self.main_rank = os.environ.get("RANK", "0") == "0"  # set by accelerate launch and torchrun; the Accelerator comes later
        self._said_base = False

    # -- before training
    def prepare(self, args) -> None:
        """Check kohya's arguments and build the monitor; raises ValueError before any model loads."""
        if not getattr(args, "output_dir", None):
            raise ValueError("give the trainer --output_dir: the monitor reads the samples kohya writes there")
        if not getattr(args, "sample_prompts", None):
            raise ValueError("the monitor scores kohya's own samples: give the trainer --sample_prompts FILE (.txt, .toml or .json)")
        if args.sample_every_n_epochs is None:
            if args.sample_every_n_steps is not None:
                raise ValueError("--sample_every_n_steps alone samples between epochs; the monitor scores epoch ends: add --sample_every_n_epochs N")
            args.sample_every_n_epochs = 1
            self.say("lora-monitor: no --sample_every_n_epochs given: kohya samples every epoch, and each epoch is scored")
        output_dir = Path(args.output_dir)
        if getattr(args, "output_name", None) is not None:
            check_output_name(args.output_name, "the trainer's --output_name")
        if self.main_rank:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.lock = FolderLock(output_dir, "lora-monitor kohya", say=self.say).acquire()
        family = self.checkout.family
        target = prompts_target(args.sample_prompts, output_dir)
        self.prompts_before = (target, target.read_bytes() if target.is_file() else None)
        prompts, spec, changed = fixed_seed_prompts(args.sample_prompts, output_dir, self.preview_seed, defaults=prompt_defaults(family))
        if self.main_rank:
            for other in sorted(output_dir.glob(f"{PROMPTS_STEM}.*")):
                if other != prompts and other.suffix in (".txt", ".json") and other.is_file():
                    other.unlink()
                    self.say(f"lora-monitor: removed {other}, left by an earlier start from another prompt file; kohya reads {prompts}")
        trainer = KOHYA_TRAINERS.get(family) if family else None
        if trainer is not None and trainer.min_seed:
            low = [i for i, prompt in enumerate(spec.prompts) if prompt.seed < trainer.min_seed]
            if low:
                ours = [i for i in low if i in changed]
                fix = (f"give --preview-seed {trainer.min_seed} or more (prompts without --d get it + their index)" if ours
                       else f"give those prompts --d {trainer.min_seed} or more")
                raise ValueError(f"kohya's {trainer.family} sampler ({trainer.sampler}) refuses seeds below {trainer.min_seed}: "
                                 f"prompt(s) {low} of {args.sample_prompts} would get seed(s) {[spec.prompts[i].seed for i in low]}; {fix}")
        check_seed_groups(spec, monitor_metrics(self.monitor_options), args.sample_prompts)
        self.say(f"lora-monitor: kohya samples from {prompts} (your {args.sample_prompts} with a seed on every prompt)")
        if changed:
            seeds = ", ".join(f"{i}: {spec.prompts[i].seed}" for i in changed)
            self.say(f"lora-monitor: prompts without --d got fixed seeds ({seeds}); random seeds would make epochs incomparable")
        args.sample_prompts = str(prompts)
        options = dict(self.monitor_options)
        if getattr(args, "log_with", None) and "listeners" not in options:
            from lora_monitor.integrations.trackers import TrackersListener

            options["listeners"] = [TrackersListener()]  # through kohya's own accelerator and its trackers
        self.monitor = LoraMonitor(spec=spec, output_dir=output_dir, write_weights=self._write_checkpoint, **options)
        state = output_dir / LAUNCHER_STATE
        if getattr(args, "resume", None) and state.is_file():
            self._load_state(state)
        self.args = args

    def _load_state(self, path: Path) -> None:
        """Continue the monitor from a resumed run's state file; one that scored nothing and does not fit (a start
        that failed early) is replaced with a note, one that scored epochs and does not fit is an error naming it."""
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
            scored = [entry.get("epoch") for entry in state["policy"]["history"]]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path}: not a lora-monitor launcher state ({type(error).__name__}: {error}); move it away to start the monitor afresh") from None
        try:
            self.monitor.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as error:
            if not scored:
                self.say(f"lora-monitor: ignoring {path}: it scored no epoch and does not fit this run ({error}); it is replaced at the first epoch")
                return
            raise ValueError(f"{path} (epochs {scored} scored) cannot be continued: {error}. Move it away (with scores.jsonl and best/) to start "
                             "the monitor afresh") from None
        self.say(f"lora-monitor: resumed the monitor's state from {path} (best epoch so far: {self.monitor.best_epoch})")

    # -- the hook
    def on_sample_images(self, call: SampleCall) -> Any:
        """One call of the trainer's sample_images: kohya samples (or not: it calls this at every step and decides
        inside), and at its sample points the new samples are read. The first call renders the base references,
        unless kohya's own --sample_at_first samples, rendered at this call with the network off, are them."""
        args = call.args
        first = not self.started
        if first:
            self.started = True
            if self.monitor.accelerator is None:
                self.monitor.attach(call.accelerator)
        point = sample_point(args, call.epoch, call.step)
        base_from_first = first and point and call.epoch == 0 and self.monitor.needs_references and not network_preloaded(args)
        if first and self.monitor.needs_references and not base_from_first:
            self._render_base(call)
        if not point:  # kohya returns at once: nothing to look at
            return call.run()
        folder = Path(args.output_dir) / SAMPLE_DIR
        before = {s.path for s in list_samples(folder)}
        if base_from_first:
            with self._network_off():
                result = call.run()
            self._take_base(call.accelerator, folder, before, f"kohya's own --sample_at_first samples (network multiplier 0): {folder}")
            return result
        result = call.run()
        if call.epoch:  # None: a step sample point; 0: --sample_at_first, before any training
            self._after_samples(call, before)
        return result

    def _after_samples(self, call: SampleCall, before: set[Path]) -> None:
        accelerator, args, epoch, step = call.accelerator, call.args, call.epoch, call.step
        accelerator.wait_for_everyone()  # sampling is split between processes

        def score() -> str | None:  # rank 0 only; a failure there reaches every rank as an error instead of a hang
            samples = [s for s in list_samples(Path(args.output_dir) / SAMPLE_DIR, args.output_name) if s.epoch == epoch and s.path not in before]
            if samples:
                self._evaluate(epoch, step, samples)
            policy = self.monitor.policy
            return (policy.stop_reason or "the monitor's policy stopped the run") if policy.stopped_epoch == epoch else None

        stop_reason = distributed.broadcast_checked(score, what=f"scoring epoch {epoch}'s samples (read, scored and exported by rank 0)")
        if stop_reason is not None:
            if step >= args.max_train_steps:
                self.say("lora-monitor: (this was the last epoch anyway: kohya saves the final network as usual)")
                return
            accelerator.end_training()  # finish the trackers, as kohya would after its loop
            raise TrainingStopped(epoch, stop_reason)

    # -- internals
    @contextlib.contextmanager
    def _network_off(self):
        """The network's multiplier at 0 (the base model) inside the block, as it was afterwards."""
        network = self.network
        has_multiplier = network is not None and hasattr(network, "set_multiplier")
        if not has_multiplier:
            warnings.warn(
                "the network object has no set_multiplier (or post_process_network was not called): the base references "
                "are the network's samples before training, which are the base model only when it starts at zero "
                "(kohya's LoRA does: lora_up is zero-initialised; not with --network_weights)",
                RuntimeWarning,
                stacklevel=3,
            )
            yield
            return
        previous = getattr(network, "multiplier", 1.0)
        network.set_multiplier(0.0)
        try:
            yield
        finally:
            network.set_multiplier(previous)

    def _render_base(self, call: SampleCall) -> None:
        """kohya renders the same prompts and seeds with the network's multiplier at 0 (the base model):
        the trainer's own sample_images, called again with the arguments it was given, but args
        (output_dir under BASE_DIR, sample_at_first), epoch and step set for a step-0 sample."""
        base_args = copy.copy(call.args)
        base_args.output_dir = str(Path(call.args.output_dir) / BASE_DIR)
        base_args.sample_at_first = True
        folder = Path(base_args.output_dir) / SAMPLE_DIR
        before = {s.path for s in list_samples(folder)}
        with self._network_off():
            call.again(base_args, 0, 0)
        self._take_base(call.accelerator, folder, before, f"base references rendered by kohya with the network multiplier at 0: {folder}")

    def _take_base(self, accelerator, folder: Path, before: set[Path], source: str) -> None:
        """The new epoch-0 samples in `folder` become the base references (rank 0 reads them; a failure there ends every rank)."""
        accelerator.wait_for_everyone()

        def read() -> None:
            samples = [s for s in list_samples(folder, self.args.output_name) if s.epoch == 0 and s.path not in before]
            images = images_in_order(group_by_epoch(samples).get(0, {}), len(self.monitor.spec), f"base renders in {folder}")
            self.monitor.set_base_references(images)
            self.monitor.record.save_previews(None, images, [p.seed for p in self.monitor.spec.prompts])
            self.say(f"lora-monitor: {source}")

        distributed.broadcast_checked(read, what="reading the base renders (rank 0)")

    def _evaluate(self, epoch: int, step: int, samples: list[SampleFile]) -> None:
        where = f"epoch {epoch} samples in {samples[0].path.parent}"
        images = images_in_order(group_by_epoch(samples)[epoch], len(self.monitor.spec), where)
        self.current = (epoch, step)
        stopped_before = self.monitor.policy.stopped_epoch
        report = self.monitor.evaluate(epoch, images, step=step)
        self.scored = True
        if self.monitor.policy.base and not self._said_base:
            self._said_base = True
            self.say(f"lora-monitor: base model (LoRA off): {describe_base(self.monitor.policy)}")
        values = ", ".join(f"{name} {value:.4f}" for name, value in report.aggregates.items())
        text = decision_text(report, self.monitor.policy, stopped_before)
        self.say(f"lora-monitor: epoch {epoch}: {values}{'  (best)' if report.is_best else ''}; {text}")
        if report.exported is not None:
            self.say(f"lora-monitor: epoch {epoch} is the best so far: copied to {report.exported}")
        write_json_atomic(Path(self.args.output_dir) / LAUNCHER_STATE, self.monitor.state_dict())

    def _write_checkpoint(self, folder: Path) -> None:
        """Fill an export folder with the epoch's network file: kohya's own file when it exists (it was
        saved just before sampling), else (the last epoch, or one save_every_n_epochs skips) the network
        saved now through its own save_weights, in kohya's save precision."""
        epoch, step = self.current
        args, train_util = self.args, self.checkout.train_util
        name = train_util.get_epoch_ckpt_name(args, "." + args.save_model_as, epoch)
        source = Path(args.output_dir) / name
        if source.is_file():
            shutil.copy2(source, folder / name)
            self.saved_from_network = None
            return
        if self.network is None or not hasattr(self.network, "save_weights"):
            raise RuntimeError(f"cannot export epoch {epoch}: {source} does not exist and the trainer gave no network object to save")
        _, save_dtype = train_util.prepare_dtype(args)
        metadata = {"ss_epoch": str(epoch), "ss_steps": str(step), "ss_output_name": str(args.output_name), "lora_monitor": "saved by lora-monitor at the epoch's sample point"}
        self.network.save_weights(str(folder / name), save_dtype, metadata)
        self.saved_from_network = epoch

    # -- after training
    def adopt_final_file(self) -> None:
        """When the best epoch is the last one, best/ holds the network saved at its sample point with a few metadata
        keys; kohya's final file, written after the loop, holds the same weights with kohya's full metadata. best/
        takes kohya's file instead (checked: same epoch in its metadata, same tensors)."""
        epoch = self.saved_from_network
        if epoch is None or epoch != self.monitor.policy.best_epoch or not self.main_rank:
            return
        args, train_util = self.args, self.checkout.train_util
        suffix = "." + args.save_model_as
        last_name = getattr(train_util, "get_last_ckpt_name", None)
        final = Path(args.output_dir) / (last_name(args, suffix) if last_name else last_checkpoint_name(args.output_name, suffix))
        best = Path(args.output_dir) / "best"
        ours = best / train_util.get_epoch_ckpt_name(args, suffix, epoch)
        why = self._final_differs(final, ours, epoch)
        if why is None:
            try:
                sidecar = read_sidecar(best)
            except (OSError, ValueError) as error:
                why = f"{best} has no readable sidecar ({error})"
            else:
                why = None if sidecar.get("epoch") == epoch else f"{best} holds epoch {sidecar.get('epoch')!r}"
        if why is not None:
            self.say(f"lora-monitor: best/ keeps the network saved at epoch {epoch}'s sample point: {why}")
            return
        export_checkpoint(best, lambda folder: shutil.copy2(final, folder / final.name), {**sidecar, "checkpoint_source": final.name})
        self.saved_from_network = None
        self.say(f"lora-monitor: the best epoch {epoch} is the last: {best} holds kohya's final {final.name}, with its full metadata")

    @staticmethod
    def _final_differs(final: Path, ours: Path, epoch: int) -> str | None:
        """Why kohya's final file cannot stand for epoch `epoch`'s export `ours`; None when it can."""
        if not final.is_file():
            return f"kohya's final {final.name} was not written"
        if final.suffix != ".safetensors" or ours.suffix != ".safetensors" or not ours.is_file():
            return f"only .safetensors files are compared ({final.name})"
        from safetensors import safe_open

        try:
            with safe_open(str(final), "pt") as theirs, safe_open(str(ours), "pt") as mine:
                final_epoch = (theirs.metadata() or {}).get("ss_epoch")
                if final_epoch is not None and str(final_epoch) != str(epoch):
                    return f"kohya's final {final.name} is epoch {final_epoch}"
                if set(theirs.keys()) != set(mine.keys()) or any(not torch.equal(theirs.get_tensor(k), mine.get_tensor(k)) for k in mine.keys()):
                    return f"kohya's final {final.name} holds other weights than epoch {epoch}'s"
        except Exception as error:  # a damaged final file: keep what best/ holds
            return f"kohya's final {final.name} does not read ({type(error).__name__}: {error})"
        return None

    def clean_up(self, failed: bool) -> None:
        """Release the folder's lock; after a failed start that scored nothing, the prompt file it wrote is put back as it
        was before (removed when there was none), so nothing of that start is left to confuse the next."""
        if failed and not self.scored and self.main_rank and self.prompts_before is not None:
            target, before = self.prompts_before
            if before is None:
                target.unlink(missing_ok=True)
            else:
                temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                try:
                    temporary.write_bytes(before)
                    os.replace(temporary, target)
                finally:
                    temporary.unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release()
            self.lock = None


#: The leading parameters of every trainer's sample_images, by position (their names as in train_network.py).
SAMPLE_IMAGES_HEAD = ("accelerator", "args", "epoch", "global_step")


def _positional_names(method: Callable[..., Any]) -> list[str]:
    """The names of a callable's leading positional parameters (up to a *args or keyword-only one)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin or C callable
        return []
    names: list[str] = []
    for parameter in parameters:
        if parameter.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    return names


class SampleCall:
    """One call of a trainer's sample_images, as kohya made it: its accelerator, args, epoch and step
    found by position or, when passed by keyword, by the names in that trainer's own signature
    (every sd-scripts trainer has them first: (accelerator, args, epoch, global_step, device, vae|ae,
    tokenizer(s), text_encoder, unet|mmdit|flux|lumina)); `again` calls it anew with other args,
    epoch and step and the rest as given."""

    def __init__(self, method: Callable[..., Any], arguments: tuple, keywords: Mapping[str, Any]) -> None:
        self.method = method
        self.arguments = tuple(arguments)
        self.keywords = dict(keywords)
        names = _positional_names(method)
        self.names = [names[i] if i < len(names) else None for i in range(len(SAMPLE_IMAGES_HEAD))]
        values = []
        for position, (name, meaning) in enumerate(zip(self.names, SAMPLE_IMAGES_HEAD)):
            if position < len(self.arguments):
                values.append(self.arguments[position])
            elif name is not None and name in self.keywords:
                values.append(self.keywords[name])
            else:
                where = getattr(method, "__qualname__", repr(method))
                raise TypeError(f"{where} was called without its {meaning} argument (parameter {position + 1}, "
                                f"{name or 'unnamed'}): not a call the kohya launcher knows")
        self.accelerator, self.args, self.epoch, self.step = values

    def again(self, args: Any, epoch: int | None, step: int) -> Any:
        arguments, keywords = list(self.arguments), dict(self.keywords)
        for position, value in ((1, args), (2, epoch), (3, step)):
            if position < len(arguments):
                arguments[position] = value
            else:
                keywords[self.names[position]] = value
        return self.method(*arguments, **keywords)

    def run(self) -> Any:
        """The call as kohya made it."""
        return self.method(*self.arguments, **self.keywords)


def monitored_trainer_class(base: type, session: KohyaSession) -> type:
    """A subclass of kohya's trainer whose hooks feed `session`. Hook arguments pass through as given;
    the ones the session needs are found by position or, passed by keyword, by the names in the
    trainer's own signature (they differ between families and sd-scripts versions)."""

    class MonitoredTrainer(base):  # type: ignore[misc, valid-type]
        def post_process_network(self, *arguments, **keywords):
            method = super().post_process_network
            result = method(*arguments, **keywords)
            names = _positional_names(method)  # (args, accelerator, network, text_encoders, unet)
            name = names[2] if len(names) > 2 else "network"
            session.network = arguments[2] if len(arguments) > 2 else keywords.get(name)
            return result

        def sample_images(self, *arguments, **keywords):
            return session.on_sample_images(SampleCall(super().sample_images, arguments, keywords))

    MonitoredTrainer.__name__ = MonitoredTrainer.__qualname__ = f"Monitored{base.__name__}"
    return MonitoredTrainer


def parse_trainer_args(checkout: Checkout, trainer_args: list[str]) -> Any:
    """The trainer's arguments, parsed by its own parser (with its config file read) under its own name: its
    errors read `<script>: error: ...` and are followed by a line saying they are about the arguments after `--`."""
    parser = checkout.module.setup_parser()
    parser.prog = Path(checkout.script).name
    try:
        args = parser.parse_args(trainer_args)
        verify = getattr(checkout.train_util, "verify_command_line_training_args", None)
        if verify is not None:
            verify(args)
        return checkout.train_util.read_config_from_file(args, parser)
    except SystemExit as exit:
        if exit.code not in (0, None):
            print(f"lora-monitor kohya: the error above is {parser.prog}'s (from {checkout.root}), about the trainer arguments "
                  f"after `--`; `lora-monitor kohya --sd-scripts {checkout.root} -- --help` lists them", file=sys.stderr)
        raise


def launch(
    sd_scripts: str | os.PathLike,
    trainer_args: list[str],
    *,
    script: str | None = None,
    family: str | None = None,
    monitor_options: Mapping[str, Any] | None = None,
    preview_seed: int | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Run the trainer script of the checkout with `trainer_args`, as its own __main__ would, with the
    monitor attached. `family` (a KOHYA_TRAINERS key: sd, sdxl, sd3, flux, lumina) picks the script;
    `script` names one explicitly (its family is known by its name or its trainer class); neither:
    train_network.py. `preview_seed` None: the smallest seed the family's sampler takes (0; Lumina: 1).
    Returns 0 after a full run or an early stop by the policy. An error inside training prints its
    traceback and raises TrainingFailed; the trainer's own argument errors exit as its parser does."""
    script, family = choose_trainer(family, script)
    checkout = load_checkout(sd_scripts, script, family)
    if preview_seed is None:
        trainer_info = KOHYA_TRAINERS.get(checkout.family) if checkout.family else None
        preview_seed = trainer_info.min_seed if trainer_info else 0
    saved_argv = sys.argv
    sys.argv = [str(checkout.root / script), *trainer_args]  # sd-scripts inspects the command line
    session: KohyaSession | None = None
    failed = True
    try:
        args = parse_trainer_args(checkout, trainer_args)
        session = KohyaSession(checkout, monitor_options or {}, preview_seed=preview_seed, say=say)
        session.prepare(args)
        trainer = monitored_trainer_class(checkout.trainer_class, session)()
        family_text = f"family {checkout.family}" if checkout.family else "family unknown: kohya's SD sampler defaults assumed for the prompts"
        say(f"lora-monitor: training with {checkout.root / script} ({checkout.trainer_class.__name__}, {family_text})")
        try:
            trainer.train(args)
        except TrainingStopped as stop:
            session.monitor.close()
            reason = stop.reason.removeprefix(f"Stopping at epoch {stop.epoch}: ")  # the policy's sentence starts so too
            say(f"lora-monitor: stopped early after epoch {stop.epoch}: {reason}")
            say(f"lora-monitor: trackers finished; kohya's final {last_checkpoint_name(args.output_name, '.' + args.save_model_as)} is not written")
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            raise TrainingFailed(f"{script} failed during training: {type(error).__name__}: {error} (its traceback is above)") from error
        else:
            session.monitor.close()
            session.adopt_final_file()
            policy = session.monitor.policy
            say(f"lora-monitor: training finished; {policy.stop_reason or f'best epoch by {policy.metric}: {policy.best_epoch}'}")
        best = Path(args.output_dir) / "best"
        if session.monitor.best_epoch is not None:
            say(f"lora-monitor: best epoch {session.monitor.best_epoch}: {best} ; scores: {session.monitor.record.scores_path}")
        failed = False
        return 0
    finally:
        if session is not None:
            session.clean_up(failed)
        sys.argv = saved_argv
