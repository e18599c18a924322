"""BRISQUE throughput: ours (batch 1 and 16, float64 and float32) against a per-image reference.

    python benchmarks/brisque_throughput.py [--reference-python /path/to/other/venv/bin/python]
    python benchmarks/brisque_throughput.py --device cuda --size 1024     # ours on a GPU (reference on the CPU)

The reference (pyiqa's brisque, else the `brisque` package) runs in its own interpreter, so it
can live in a separate environment (pyiqa pulls torchvision and its own torch). Both sides
score the same 16 RGB images of 512x512 (crops of the calibration images when
../shared/calibration exists, else smooth random images), warm (after a first call), on the
same CPU threads. Prints images per second and the ratio. With --device cuda ours scores on the
GPU (the reference still runs on the CPU, so that ratio compares devices, not implementations).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import common
from lora_monitor.scoring.brisque import brisque
from lora_monitor.scoring.brisque_model import resolve_brisque_model

SIZE = 512
COUNT = 16
CALIBRATION = Path(__file__).resolve().parents[2] / "shared" / "calibration" / "brisque"

# Runs in the reference interpreter: argv = image folder, model file, repeats. Prints JSON.
REFERENCE_SCRIPT = r"""
import json, sys, time
from pathlib import Path
import numpy as np
from PIL import Image
folder, model_file, repeats = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
arrays = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(folder.glob("*.png"))]
try:
    import torch, pyiqa
    torch.set_num_threads(int(sys.argv[4]))
    metric = pyiqa.create_metric("brisque", device="cpu", pretrained_model_path=model_file)
    name = "pyiqa %s brisque" % pyiqa.__version__
    inputs = [torch.from_numpy(a).permute(2, 0, 1)[None].float() / 255 for a in arrays]
    score = lambda x: float(metric(x))
except ImportError:
    try:
        from brisque import BRISQUE
    except ImportError:
        print(json.dumps({"error": "neither pyiqa nor brisque is importable in " + sys.executable}))
        sys.exit(0)
    model = BRISQUE(url=False)
    name = "brisque package (per image)"
    inputs = arrays
    score = model.score
first = [score(x) for x in inputs]  # warm-up
start = time.perf_counter()
for _ in range(repeats):
    for x in inputs:
        score(x)
elapsed = time.perf_counter() - start
print(json.dumps({"name": name, "images_per_s": repeats * len(inputs) / elapsed, "scores": first}))
"""


def make_images(count: int = COUNT, size: int = SIZE) -> torch.Tensor:
    """`count` images (count, 3, size, size) in [0, 1] with uint8 values, calibration crops if present."""
    sources = sorted(CALIBRATION.glob("*.bmp")) if CALIBRATION.is_dir() else []
    images = []
    generator = torch.Generator().manual_seed(0)
    for i in range(count):
        if sources:
            rgb = np.asarray(Image.open(sources[i % len(sources)]).convert("RGB"))
            rgb = np.asarray(Image.fromarray(rgb).resize((size, size), Image.BICUBIC))
            images.append(torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255)
        else:
            low = torch.rand(1, 3, size // 16, size // 16, generator=generator)
            smooth = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic").clamp(0, 1)[0]
            images.append(torch.round(smooth * 255) / 255)
    return torch.stack(images)


def time_ours(images: torch.Tensor, model, batch: int, dtype: torch.dtype, repeats: int) -> float:
    """Warm images per second of our BRISQUE at a batch size (on the images' device)."""
    brisque(images[:batch], model, dtype=dtype)  # warm-up: grids, allocator

    def passes() -> None:
        for _ in range(repeats):
            for part in images.split(batch):
                brisque(part, model, dtype=dtype)

    return repeats * images.shape[0] / common.timed(images.device, passes)[0]


def time_reference(python: str, images: torch.Tensor, model, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="brisque-bench-") as tmp:
        folder = Path(tmp)
        for i, image in enumerate(images.cpu()):
            array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            Image.fromarray(array).save(folder / f"{i:02d}.png")
        model_file = folder / "brisque_svm_weights.pth"
        torch.save((model.sv_coef.float(), model.sv.float()), model_file)  # pyiqa's format
        cmd = [python, "-c", REFERENCE_SCRIPT, str(folder), str(model_file), str(repeats), str(torch.get_num_threads())]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except OSError as err:
            return {"error": f"cannot run {python}: {err}"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if result.returncode != 0 or not lines:
        return {"error": f"{python} exited with {result.returncode}: {result.stderr.strip()[-400:]}"}
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference-python", default=sys.executable,
                        help="interpreter with pyiqa (or the brisque package) installed (default: this one)")
    parser.add_argument("--repeats", type=int, default=2, help="timed passes over the 16 images (default 2)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch CPU threads for both sides (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="where ours scores: cpu (default) or cuda")
    parser.add_argument("--size", type=int, default=SIZE, help=f"image side in px (default {SIZE})")
    parser.add_argument("--count", type=int, default=COUNT, help=f"images, also the large batch (default {COUNT})")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    model = resolve_brisque_model(sources=("path", "cache", "pyiqa-cache", "pypi"))
    images = make_images(args.count, args.size).to(device)
    where = "" if device.type == "cpu" else f", ours on {device} ({torch.cuda.get_device_name(device)})"
    print(f"{args.count} RGB images {args.size}x{args.size}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads{where}, warm")
    ours = {}
    for dtype in (torch.float64, torch.float32):
        for batch in (1, args.count):
            ours[(dtype, batch)] = time_ours(images, model, batch, dtype, args.repeats)
            label = str(dtype).replace("torch.", "")
            print(f"  ours {label:8s} batch {batch:2d}: {ours[(dtype, batch)]:7.1f} images/s "
                  f"({1000 / ours[(dtype, batch)]:.1f} ms/image)")
    f64, f32 = ours[(torch.float64, args.count)], ours[(torch.float32, args.count)]
    print(f"  float32 instead of float64 (batch {args.count}): {f32 / f64:.2f}x throughput, but fails the calibration (see README)")
    ref = time_reference(args.reference_python, images, model, args.repeats)
    if "error" in ref:
        print(f"  reference: unavailable ({ref['error']})")
        return 0
    print(f"  reference {ref['name']}, per image: {ref['images_per_s']:.1f} images/s "
          f"({1000 / ref['images_per_s']:.1f} ms/image)")
    for batch in (1, args.count):
        print(f"  ratio ours float64 batch {batch:2d} / reference: {ours[(torch.float64, batch)] / ref['images_per_s']:.2f}x")
    mine = brisque(images, model).cpu().tolist()
    worst = max(abs(a - b) for a, b in zip(mine, ref["scores"]))
    print(f"  largest score difference ours vs reference on these images: {worst:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
