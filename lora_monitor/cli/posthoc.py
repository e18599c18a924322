"""`lora-monitor epochs`, `strength` and `grid`: rank saved checkpoints or sample images after training.

`register(subparsers)` adds them to an argparse subparsers object; each sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from lora_monitor.families import FAMILIES
from lora_monitor.posthoc.candidates import MAX_STRENGTHS
from lora_monitor.cli.posthoc_help import (
    COMMON_EPILOG,
    EPOCHS_DESCRIPTION,
    EXAMPLES,
    GRID_DESCRIPTION,
    STRENGTH_DESCRIPTION,
)
from lora_monitor.posthoc.tables import table, to_csv
from lora_monitor.spec import PREVIEW_DEFAULTS
from lora_monitor.cli.flags import (
    add_device_argument,
    add_policy_arguments,
    add_signal_arguments,
    check_device,
    resolve_policy,
    signal_settings,
    unused_refs_note,
)

__all__ = ["analyse_args", "register", "run"]


def register(subparsers) -> None:
    """Add the `epochs`, `strength` and `grid` subcommands to an argparse subparsers object."""
    specs = [
        ("epochs", "rank saved epochs (checkpoints or sample images) after training", EPOCHS_DESCRIPTION),
        ("strength", "rank LoRA strengths (scales) for one checkpoint", STRENGTH_DESCRIPTION),
        ("grid", "rank every checkpoint at every strength", GRID_DESCRIPTION),
    ]
    for kind, help_text, description in specs:
        parser = subparsers.add_parser(
            kind, help=help_text, description=description, epilog=EXAMPLES[kind] + "\n" + COMMON_EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        _add_arguments(parser, kind)
        parser.set_defaults(func=run, posthoc_kind=kind)


def _add_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    source = parser.add_argument_group("what to rank")
    source.add_argument("paths", nargs="+", metavar="PATH", help="image folder, or (with --base) checkpoint files/folders")
    source.add_argument("--pattern", metavar="TEMPLATE", help="image file names: {epoch}, {strength}, {prompt}, {seed}, * (anything); e.g. 'lora_ep{epoch}_{prompt}.png'")
    source.add_argument(
        "--references", metavar="IMAGE_OR_DIR",
        help="the BASE model's images (LoRA off), which ssim compares with and relative bounds are measured on: one image for every "
             "prompt, or a folder with one per prompt (or per prompt and seed); not the training images (those are --refs)",
    )
    source.add_argument(
        "--base", metavar="MODEL",
        help="base model to render the checkpoints with: a diffusers folder or hub id of any supported family (see 'base models' below), "
             "or a single .safetensors/.ckpt file",
    )
    source.add_argument(
        "--family", metavar="NAME", type=_family_name,
        help=f"force the base model's family instead of detecting it from its pipeline class: {', '.join(FAMILIES)} (needs --base)",
    )
    source.add_argument("--prompts", metavar="FILE", help="preview prompts (kohya .txt with --n --w --h --d --s --l, or .toml/.json); with images, only labels")
    source.add_argument("--prompt", action="append", metavar="TEXT", help="a preview prompt (repeatable), instead of --prompts")
    if kind in ("strength", "grid"):
        source.add_argument(
            "--strengths",
            help=f"START:STOP:STEP (STOP included) or a list 0,0.5,1; finite values, at most {MAX_STRENGTHS} of them; "
                 "renders default to 0:1.5:0.1, images to all found",
        )
    if kind in ("epochs", "grid"):
        source.add_argument("--final-epoch", type=int, metavar="N", help="epoch of the final {name}.safetensors when its metadata has no ss_epoch")
        source.add_argument("--name", help="only checkpoints of this kohya output name (a folder may hold several runs)")
    source.add_argument("--allow-pickle", action="store_true", help="load .ckpt/.pt/.pth/.bin checkpoints with torch.load(weights_only=True)")

    render = parser.add_argument_group("rendering (with --base)")
    steps, size = PREVIEW_DEFAULTS["steps"], PREVIEW_DEFAULTS["width"]  # the loop's, the launcher's and kohya's
    render.add_argument("--steps", type=int, default=steps, help=f"denoising steps for prompts that do not set --s (default: {steps})")
    render.add_argument("--size", type=int, default=size, help=f"width and height for prompts that do not set --w/--h (default: {size})")
    render.add_argument(
        "--guidance-scale", type=float, default=None,
        help="CFG scale for prompts without --l (default: the model family's: 7.5 SD 1.x/2.x, 5 SDXL, 7 SD3, 1 = no CFG for Flux, "
             "whose distilled guidance is 3.5 unless a prompt line sets --g)",
    )
    render.add_argument("--seed", type=int, default=0, help="seed of the first prompt without --d; the next get seed+1, ... (default: 0)")
    render.add_argument(
        "--seeds-per-prompt", type=int, default=1, metavar="N",
        help="render every prompt N times with seeds seed, seed+1, ... (diversity compares them; the likeness preset needs N >= 2). "
             "Image folders: the {seed} of --pattern separates seeds instead (default: 1)",
    )
    render.add_argument(
        "--sampler", default=None,
        help="default (the base model's own scheduler), ddim, euler, euler_a, dpmsolver++ or pndm; the last five only for "
             "SD 1.x/2.x and SDXL (default: the family's: ddim for those, the model's own flow-matching scheduler for the others)",
    )
    render.add_argument("--batch-size", type=int, default=4, help="previews per pipeline call (default: 4)")
    add_device_argument(render, None, "cuda if available, else cpu")
    render.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model precision (default: float32)")

    policy = parser.add_argument_group("scoring and policy (the in-training monitor's)")
    add_policy_arguments(policy, stopping=False)

    add_signal_arguments(parser)

    output = parser.add_argument_group("output")
    output.add_argument("--json", action="store_true", help="print JSON instead of the table")
    output.add_argument("--csv", action="store_true", help="print CSV (one row per candidate and prompt) instead of the table")
    output.add_argument("--report", metavar="DIR", help="write an HTML report (index.html, curves.png, images/) into DIR")
    output.add_argument("--no-progress", action="store_true", help="no progress bars (they go to stderr)")


def _family_name(text: str) -> str:
    """--family: a family of the table (or an alias such as sd15, flux1); else argparse's error listing them."""
    from lora_monitor.families import get_family

    try:
        return get_family(text).name
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _spec(args: argparse.Namespace, seeds_per_prompt: int = 1):
    from lora_monitor.posthoc import PosthocError
    from lora_monitor.spec import PreviewSpec

    defaults = dict(steps=args.steps, guidance_scale=args.guidance_scale, width=args.size, height=args.size)
    if args.prompts and args.prompt:
        raise PosthocError("give --prompts FILE or --prompt TEXT, not both")
    if args.prompts:
        return PreviewSpec.load(args.prompts, seed=args.seed, seeds_per_prompt=seeds_per_prompt, **defaults)
    if args.prompt:
        return PreviewSpec.from_prompts(args.prompt, seed=args.seed, seeds_per_prompt=seeds_per_prompt, **defaults)
    return None


def _signal_options(args: argparse.Namespace, metrics: list[str], device: str | None):
    """The settings of the embedding signals, with --refs checked now (before anything is rendered)."""
    from lora_monitor.posthoc import PosthocError
    from lora_monitor.scoring.signals import SignalOptions

    try:
        settings = signal_settings(args, metrics, base_flag="--references")
    except ValueError as error:
        raise PosthocError(str(error)) from None
    return SignalOptions(**settings, **({"device": device} if device is not None else {}))


def analyse_args(args: argparse.Namespace):
    """Run the analysis the arguments ask for and return the Analysis (the report and outputs are separate).

    Every check of the arguments (metrics, presets, --refs, seeds, the embedding models) runs before anything is rendered."""
    from lora_monitor import posthoc

    kind = args.posthoc_kind
    progress = not args.no_progress
    strengths = posthoc.parse_strengths(args.strengths or "0:1.5:0.1") if kind in ("strength", "grid") else None
    if args.device is not None:
        check_device(args.device)
    choice = resolve_policy(args, "posthoc")
    metrics, monitor, bounds = choice.metrics, choice.metric, choice.all_bounds
    preset = choice.preset if choice.named else None
    if args.seeds_per_prompt < 1:
        raise posthoc.PosthocError(f"--seeds-per-prompt must be 1 or more, got {args.seeds_per_prompt}")
    if args.seeds_per_prompt > 1 and not args.base:
        raise posthoc.PosthocError(
            "--seeds-per-prompt renders several seeds with --base; with image folders the {seed} of --pattern separates "
            "the seeds of a prompt (and previews with the same prompt text are its seeds)"
        )
    spec = _spec(args, args.seeds_per_prompt if args.base else 1)
    if "adherence" in metrics and spec is None:
        raise posthoc.PosthocError(
            "the adherence metric (CLIP-T) compares each preview with its prompt text: give --prompts FILE or --prompt TEXT"
        )
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    unused = unused_refs_note(args, metrics)
    if unused:
        notes.append(unused)
    if getattr(args, "family", None) and not args.base:
        raise posthoc.PosthocError("--family chooses the family of the --base model; without --base nothing is rendered")
    if args.base:
        if spec is None:
            raise posthoc.PosthocError("rendering checkpoints needs preview prompts: --prompts FILE or --prompt TEXT")
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        options = _signal_options(args, metrics, device)
        prompts = [p.prompt for p in spec.prompts]
        groups, seeds = spec.seed_groups(), [p.seed for p in spec.prompts]
        scorers, scorer_notes = posthoc.make_scorers(metrics, True, monitor, options)  # the base renders are the references
        posthoc.check_groups(scorers, groups, "pass --seeds-per-prompt N (N >= 2) to render several seeds of each prompt")
        checkpoints, skipped = posthoc.find_checkpoints(
            args.paths, allow_pickle=args.allow_pickle, final_epoch=getattr(args, "final_epoch", None),
            name=getattr(args, "name", None), need_epoch=kind != "strength",
        )
        if kind == "strength" and len(checkpoints) != 1:
            raise posthoc.PosthocError(f"strength takes one checkpoint, found {len(checkpoints)}: {', '.join(c.name for c in checkpoints)}; use grid for several")
        units = {c.unit for c in checkpoints}
        unit = units.pop() if kind == "epochs" and len(units) == 1 else "epoch"  # strength/grid: the policy counts positions
        policy = posthoc.build_policy(scorers, monitor, min_delta=args.min_delta, aggregate=args.aggregate, bounds=bounds, unit=unit)
        pipeline = posthoc.load_base_pipeline(args.base, device=device, dtype=args.dtype, family=args.family, progress=progress)
        family = posthoc.base_family(pipeline, args.family)
        references, candidates = posthoc.render_checkpoints(
            pipeline, spec, checkpoints, strengths, family=family, sampler=args.sampler, batch_size=args.batch_size,
            with_epoch=kind != "strength", progress=progress,
        )
        reference_files: list[str | None] = [None] * len(prompts)
        source = ", ".join(str(p) for p in args.paths) + f" on {args.base} ({family.name})"
    else:
        if len(args.paths) != 1:
            raise posthoc.PosthocError(f"without --base give one image folder, got {len(args.paths)} paths")
        if kind == "grid" and not args.pattern:
            raise posthoc.PosthocError("grid from images needs --pattern with {epoch} and {strength} (or --base to render checkpoints)")
        options = _signal_options(args, metrics, args.device)
        found = posthoc.collect_images(
            args.paths[0], kind, pattern=args.pattern, references=args.references,
            prompts=[p.prompt for p in spec.prompts] if spec is not None else None,
        )
        candidates, references, prompts = found.candidates, found.references, found.prompts
        groups, seeds = posthoc.groups_from_prompts(prompts), found.seeds
        if strengths is not None and args.strengths:
            wanted = set(strengths)
            candidates = [c for c in candidates if c.strength in wanted]
        reference_files, skipped, notes = found.reference_files, found.skipped, notes + found.notes
        source = str(args.paths[0])
        have_references = references is not None or any(c.references is not None for c in candidates)
        scorers, scorer_notes = posthoc.make_scorers(metrics, have_references, monitor, options)
        posthoc.check_groups(
            scorers, groups,
            "name several images of each prompt with {seed} in --pattern, or (kohya samples) repeat a prompt line "
            "in --prompts with other --d seeds: previews with the same prompt text are one prompt's seeds",
        )
        units = {c.unit for c in candidates if c.epoch is not None}
        unit = units.pop() if kind == "epochs" and len(units) == 1 else "epoch"  # strength/grid: the policy counts positions
        policy = posthoc.build_policy(scorers, monitor, min_delta=args.min_delta, aggregate=args.aggregate, bounds=bounds, unit=unit)
    analysis = posthoc.analyse(
        kind, candidates, references, scorers, policy, prompts=prompts, reference_files=reference_files, progress=progress,
        groups=groups, seeds=seeds, preset=preset,
    )
    analysis.skipped = skipped + analysis.skipped
    analysis.notes = notes + scorer_notes + analysis.notes
    analysis.source = source
    return analysis


def run(args: argparse.Namespace) -> int:
    from lora_monitor.posthoc import PosthocError
    from lora_monitor.scoring.brisque_model import BrisqueModelError
    from lora_monitor.scoring.embeddings import ModelNotAvailableError

    command = f"lora-monitor {args.posthoc_kind}"
    try:
        if args.json and args.csv:
            raise PosthocError("choose one of --json and --csv")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            analysis = analyse_args(args)
        report = None
        if args.report:
            from lora_monitor.report import write_report

            report = write_report(analysis, args.report)
    except (PosthocError, ValueError, FileNotFoundError, OSError, ImportError) as error:  # ImportError: a library the base model needs
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2
    except (BrisqueModelError, ModelNotAvailableError) as error:  # a model file this machine does not have
        print(f"{command}: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(analysis.to_dict(), indent=2))
    elif args.csv:
        sys.stdout.write(to_csv(analysis))
    else:
        print(table(analysis))
    messages = sys.stderr if (args.json or args.csv) else sys.stdout
    for path, reason in analysis.skipped:
        print(f"skipped {path}: {reason}", file=messages)
    for note in analysis.notes:
        print(f"note: {note}", file=messages)
    if report is not None:
        print(f"report: {report}", file=messages)
    return 0
