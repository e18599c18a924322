"""An sd-scripts checkout: which trainer script runs (by --family or --script), importing it from the user's
folder, finding its trainer class, and parsing the trainer's arguments with its own parser.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from lora_monitor.kohya_names import KOHYA_TRAINERS, KohyaTrainer, family_of_script, family_of_trainer_class

#: What a checkout must hold besides the trainer script the user names.
CHECKOUT_LAYOUT = ("train_network.py", "library/train_util.py", "networks")


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

