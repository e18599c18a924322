"""What the benchmark scripts share: an offline, quiet environment, the checkout importable without installing
(in the script and in the child processes it starts), and wall-clock timing that waits for the GPU.

The scripts import it as a sibling (`import common`): `python benchmarks/<script>.py` puts benchmarks/ first
on sys.path. Nothing here imports torch before a function that needs it is called.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

T = TypeVar("T")

HERE = Path(__file__).resolve().parent
#: The checkout the benchmarks belong to.
ROOT = HERE.parent


def offline_environment(**extra: str) -> None:
    """No downloads, no tokenizer threads, no progress bars (plus `extra`), unless the environment already says
    otherwise. Call it before torch, diffusers or transformers are imported."""
    settings = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **extra}
    for name, value in settings.items():
        os.environ.setdefault(name, value)


def use_checkout() -> None:
    """Make `lora_monitor` importable from this checkout without installing it, and the benchmarks' sibling modules
    (realistic_models, ...) from here: in this process, and through PYTHONPATH in the processes it starts."""
    for path in (str(HERE), str(ROOT)):
        if path not in sys.path:
            sys.path.insert(0, path)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def synchronize(device: Any) -> None:
    """Wait for the work queued on `device` (a CUDA device; nothing to wait for elsewhere)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: Any, fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds, result) of `fn()` on `device`, its queued GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result
