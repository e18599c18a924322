"""The `epochs`, `strength` and `grid` subcommands of lora-monitor (post-hoc analysis).

`register(subparsers)` adds them to an argparse subparsers object; each sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import warnings

from lora_monitor.families import FAMILIES
from lora_monitor.posthoc import RESIZE_RULE
from lora_monitor.posthoc.candidates import MAX_STRENGTHS
from lora_monitor.posthoc.checkpoints import families_help

COMMON_EPILOG = f"""\
base models (--base): every family of the model-family table, where the installed diffusers has
its pipeline (an older diffusers is an error naming the release needed):
{families_help()}
The family is detected from the pipeline class the base model's model_index.json names (loaded
with diffusers' DiffusionPipeline). --family NAME forces it (the base then loads with that family's
pipeline class): for a folder whose pipeline class is none of these, or for a single
.safetensors/.ckpt file (without --family: guessed from its keys, SD 1.x/2.x unless it looks like
SDXL, SD3 or Flux). An unknown NAME is an error listing the families. Checkpoints load with the
pipeline's own load_lora_weights: diffusers-format LoRAs of every family, and kohya-format files
of SD 1.x/2.x, SDXL and Flux.1 (diffusers converts those; it reads no kohya SD3 files). A strength
scales the LoRA of the denoiser and of every text encoder the checkpoint carries one for (diffusers'
LoRA scale). SD 1.x/2.x and SDXL render with ddim unless --sampler says otherwise; the
flow-matching families (sd3, flux, sana, lumina2, chroma, qwenimage) only with their own scheduler.

step-based runs: a diffusers LoRA folder whose lora_monitor.json says "unit": "step" (the monitor's
every_n_steps exports, top_k/step-0020) and kohya name-step00000500.safetensors files are keyed by
step: labels, the table and the report say "step N" (JSON keeps the number in "epoch", with "unit").

policy: the in-training monitor's rule. Candidates are scored in increasing order (epoch, then
strength); a later one becomes best only if it beats the best so far by more than --min-delta, so
ties within min_delta go to the earlier epoch / lower strength (--min-delta 0.01 with --metric
brisque is the older tools' rule). NaN/inf scores are the worst; --bound keeps a candidate out
unless a metric's aggregate lies in [LO, HI] (e.g. --bound ssim=0.3:0.95: not "no effect").

sizes: {RESIZE_RULE}

bad input: unreadable or truncated images are skipped and listed (a candidate missing a prompt's
image is left out); .ckpt/.pt/.pth/.bin pickles are refused unless --allow-pickle, and then read
with torch.load(weights_only=True).
"""

EPOCHS_DESCRIPTION = """\
Which saved epoch (or step) is best? With --base, PATH holds LoRA checkpoints (kohya
name-000003.safetensors or name-step00000500.safetensors files, diffusers LoRA folders with
pytorch_lora_weights.safetensors): each is loaded into the base model (SD 1.x/2.x, SDXL, SD3, Flux
or another family below; --family to force it) and the --prompts previews are rendered (plus the
base model's, the references), scored and ranked. Without --base, PATH is a folder of images: kohya
samples ({name}_e000003_00_{timestamp}_{seed}.png; a kohya output dir's sample/ is found; epoch-0
samples from --sample_at_first are the references), the older tools' epoch_01.png with
control_01.png per epoch or one control.png, or any names via --pattern. --references gives a
reference image or a folder with one per prompt."""

STRENGTH_DESCRIPTION = """\
Which LoRA strength is best? With --base, PATH is one LoRA checkpoint: it is rendered at every
--strengths scale (diffusers' LoRA scale, on the denoiser and every text encoder the LoRA has; 0 is
the base model, which is also the reference), with a base model of any family below (--family to
force it).
Without --base, PATH is a folder of strength_0.5.png images with control_base.png (or
strength_0.png) as the reference, or names given by --pattern with {strength}."""

GRID_DESCRIPTION = """\
Which (epoch, strength) pair is best? Every checkpoint in PATH rendered at every --strengths scale
(with --base: a base model of any family below, --family to force it), or images named by a
--pattern with both {epoch} and {strength}."""

EXAMPLES = {
    "epochs": """\
examples:
  lora-monitor epochs output/sample/                       # kohya samples, epoch 0 as references
  lora-monitor epochs old_run/ --min-delta 0.01            # epoch_01.png + control_01.png
  lora-monitor epochs output/ --base runwayml/stable-diffusion-v1-5 --prompts prompts.txt --report report/
  lora-monitor epochs imgs/ --pattern "run_ep{epoch}_p{prompt}.png" --references base/ --csv > scores.csv
""",
    "strength": """\
examples:
  lora-monitor strength sweep/                              # strength_0.5.png + control_base.png
  lora-monitor strength output/name-000008.safetensors --base MODEL --prompts prompts.txt \\
      --strengths 0:1.5:0.1 --bound ssim=0:0.95 --report strength-report/
  lora-monitor strength flux-lora.safetensors --base black-forest-labs/FLUX.1-dev --prompts prompts.txt \\
      --dtype bfloat16 --strengths 0:1.2:0.2          # family detected: flux
  lora-monitor strength lora.safetensors --base my-sdxl-folder/ --family sdxl --prompts prompts.txt
""",
    "grid": """\
examples:
  lora-monitor grid output/ --base MODEL --prompts prompts.txt --strengths 0.5,0.75,1 --report grid/
  lora-monitor grid imgs/ --pattern "e{epoch}_s{strength}_{prompt}.png" --references base.png --json
""",
}


def register(subparsers) -> None:
    """Add the `epochs`, `strength` and `grid` subcommands to an argparse subparsers object."""
    specs = [
        ("epochs", "rank saved epochs from checkpoints or sample images; table, JSON, CSV, HTML report", EPOCHS_DESCRIPTION),
        ("strength", "rank LoRA strengths (scales) for one checkpoint or from strength_X.png images", STRENGTH_DESCRIPTION),
        ("grid", "rank (epoch, strength) pairs: every checkpoint at every strength", GRID_DESCRIPTION),
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
    source.add_argument("--references", metavar="IMAGE_OR_DIR", help="reference (base model) image for every prompt, or a folder with one per prompt")
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
    render.add_argument("--steps", type=int, default=20, help="denoising steps for prompts that do not set --s (default: 20)")
    render.add_argument("--size", type=int, default=512, help="width and height for prompts that do not set --w/--h (default: 512)")
    render.add_argument(
        "--guidance-scale", type=float, default=None,
        help="CFG scale for prompts without --l (default: the model family's: 7.5 SD 1.x/2.x, 5 SDXL, 7 SD3, 1 = no CFG for Flux, "
             "whose distilled guidance is 3.5 unless a prompt line sets --g)",
    )
    render.add_argument("--seed", type=int, default=0, help="seed of the first prompt without --d; the next get seed+1, ... (default: 0)")
    render.add_argument(
        "--sampler", default=None,
        help="default (the base model's own scheduler), ddim, euler, euler_a, dpmsolver++ or pndm; the last five only for "
             "SD 1.x/2.x and SDXL (default: the family's: ddim for those, the model's own flow-matching scheduler for the others)",
    )
    render.add_argument("--batch-size", type=int, default=4, help="previews per pipeline call (default: 4)")
    render.add_argument("--device", default=None, help="torch device: cpu, cuda[:N] or mps where this machine has it (default: cuda if available, else cpu)")
    render.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="model precision (default: float32)")

    policy = parser.add_argument_group("scoring and policy (the in-training monitor's)")
    policy.add_argument("--metric", default="brisque", help="the metric that picks the best (default: brisque, lower is better)")
    policy.add_argument("--metrics", default="brisque,ssim", help="metrics to compute, comma-separated (default: brisque,ssim; ssim only with references)")
    policy.add_argument("--min-delta", type=float, default=0.0, help="a later candidate must be better by more than this (default: 0)")
    policy.add_argument("--aggregate", default="mean", choices=["mean", "median", "min", "max"], help="over prompts (default: mean)")
    policy.add_argument("--bound", action="append", default=[], metavar="METRIC=LO:HI", help="eligible only if METRIC's aggregate is in [LO, HI]; empty side open (e.g. ssim=:0.95)")

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


def _bounds(items: list[str]) -> dict[str, tuple[float | None, float | None]]:
    from lora_monitor.policy import parse_bound
    from lora_monitor.posthoc import PosthocError

    try:
        return dict(parse_bound(item) for item in items)
    except ValueError as error:
        raise PosthocError(str(error)) from None


def _spec(args: argparse.Namespace):
    from lora_monitor.posthoc import PosthocError
    from lora_monitor.spec import PreviewSpec

    defaults = dict(steps=args.steps, guidance_scale=args.guidance_scale, width=args.size, height=args.size)
    if args.prompts and args.prompt:
        raise PosthocError("give --prompts FILE or --prompt TEXT, not both")
    if args.prompts:
        return PreviewSpec.load(args.prompts, seed=args.seed, **defaults)
    if args.prompt:
        return PreviewSpec.from_prompts(args.prompt, seed=args.seed, **defaults)
    return None


def analyse_args(args: argparse.Namespace):
    """Run the analysis the arguments ask for and return the Analysis (the report and outputs are separate)."""
    from lora_monitor import posthoc

    kind = args.posthoc_kind
    progress = not args.no_progress
    strengths = posthoc.parse_strengths(args.strengths or "0:1.5:0.1") if kind in ("strength", "grid") else None
    if args.device is not None:
        from lora_monitor.scoring.commands import check_device

        check_device(args.device)
    spec = _spec(args)
    bounds = _bounds(args.bound)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] + list(bounds)
    skipped: list[tuple[str, str]] = []
    notes: list[str] = []
    if getattr(args, "family", None) and not args.base:
        raise posthoc.PosthocError("--family chooses the family of the --base model; without --base nothing is rendered")
    if args.base:
        if spec is None:
            raise posthoc.PosthocError("rendering checkpoints needs preview prompts: --prompts FILE or --prompt TEXT")
        checkpoints, skipped = posthoc.find_checkpoints(
            args.paths, allow_pickle=args.allow_pickle, final_epoch=getattr(args, "final_epoch", None),
            name=getattr(args, "name", None), need_epoch=kind != "strength",
        )
        if kind == "strength" and len(checkpoints) != 1:
            raise posthoc.PosthocError(f"strength takes one checkpoint, found {len(checkpoints)}: {', '.join(c.name for c in checkpoints)}; use grid for several")
        import torch

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipeline = posthoc.load_base_pipeline(args.base, device=device, dtype=args.dtype, family=args.family, progress=progress)
        family = posthoc.base_family(pipeline, args.family)
        references, candidates = posthoc.render_checkpoints(
            pipeline, spec, checkpoints, strengths, family=family, sampler=args.sampler, batch_size=args.batch_size,
            with_epoch=kind != "strength", progress=progress,
        )
        prompts = [p.prompt for p in spec.prompts]
        reference_files: list[str | None] = [None] * len(prompts)
        source = ", ".join(str(p) for p in args.paths) + f" on {args.base} ({family.name})"
    else:
        if len(args.paths) != 1:
            raise posthoc.PosthocError(f"without --base give one image folder, got {len(args.paths)} paths")
        if kind == "grid" and not args.pattern:
            raise posthoc.PosthocError("grid from images needs --pattern with {epoch} and {strength} (or --base to render checkpoints)")
        found = posthoc.collect_images(
            args.paths[0], kind, pattern=args.pattern, references=args.references,
            prompts=[p.prompt for p in spec.prompts] if spec is not None else None,
        )
        candidates, references, prompts = found.candidates, found.references, found.prompts
        if strengths is not None and args.strengths:
            wanted = set(strengths)
            candidates = [c for c in candidates if c.strength in wanted]
        reference_files, skipped, notes = found.reference_files, found.skipped, found.notes
        source = str(args.paths[0])
    have_references = references is not None or any(c.references is not None for c in candidates)
    scorers, scorer_notes = posthoc.make_scorers(metrics, have_references, args.metric)
    units = {c.unit for c in candidates if c.epoch is not None}
    unit = units.pop() if kind == "epochs" and len(units) == 1 else "epoch"  # strength/grid: the policy counts positions
    policy = posthoc.build_policy(scorers, args.metric, min_delta=args.min_delta, aggregate=args.aggregate, bounds=bounds, unit=unit)
    analysis = posthoc.analyse(kind, candidates, references, scorers, policy, prompts=prompts, reference_files=reference_files, progress=progress)
    analysis.skipped = skipped + analysis.skipped
    analysis.notes = notes + scorer_notes
    analysis.source = source
    return analysis


def run(args: argparse.Namespace) -> int:
    from lora_monitor.posthoc import PosthocError
    from lora_monitor.scoring.brisque_model import BrisqueModelError

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
    except BrisqueModelError as error:
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


def table(analysis) -> str:
    """The terminal table: one line per candidate, aggregates per metric, '*' on the best, then the reason."""
    aggregate = analysis.policy.aggregate
    columns = {"epochs": ["epoch"], "strength": ["strength"], "grid": ["epoch", "strength"]}[analysis.kind]
    names = [analysis.unit if c == "epoch" else c for c in columns]  # "step" for a run saved by step
    header = [*names, *(f"{m}_{aggregate}" for m in analysis.metrics), "best", "note"]
    rows = []
    for r in analysis.results:
        keys = [str(r.candidate.epoch) if c == "epoch" else f"{r.candidate.strength:g}" for c in columns]
        values = [_number(r.aggregates.get(m, math.nan)) for m in analysis.metrics]
        rows.append([*keys, *values, "*" if r.is_best else "", "" if r.note == "new best" or r.is_best else r.note])
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header) - 1)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)) + "  note"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths)) + ("  " + row[-1] if row[-1] else ""))
    lines.append("")
    lines.append(analysis.explanation())
    return "\n".join(lines)


def _number(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def to_csv(analysis) -> str:
    """One row per candidate and prompt: keys, prompt, file, per-prompt scores, the candidate's aggregates and flags."""
    aggregate = analysis.policy.aggregate
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [analysis.unit, "strength", "prompt_index", "prompt", "file", *analysis.metrics,
         *(f"{m}_{aggregate}" for m in analysis.metrics), "eligible", "is_best"]
    )
    for r in analysis.results:
        for index, prompt in enumerate(analysis.prompts):
            writer.writerow([
                "" if r.candidate.epoch is None else r.candidate.epoch,
                "" if r.candidate.strength is None else f"{r.candidate.strength:g}",
                index, prompt, r.candidate.files[index] or "",
                *(_csv_number(r.scores[m][index]) for m in analysis.metrics),
                *(_csv_number(r.aggregates.get(m, math.nan)) for m in analysis.metrics),
                int(r.eligible), int(r.is_best),
            ])
    return buffer.getvalue()


def _csv_number(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else "nan"


def main(argv: list[str] | None = None) -> int:
    """Run one of the commands without the main CLI (tests, `python -m lora_monitor.posthoc_commands`)."""
    parser = argparse.ArgumentParser(prog="lora-monitor")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
