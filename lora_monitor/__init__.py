"""lora-monitor: score LoRA previews each epoch, keep the best, stop early.

The main names are importable from here (`from lora_monitor import LoraMonitor, PreviewSpec`);
they load on first use, so `import lora_monitor.policy` stays free of torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "LoraMonitor": "lora_monitor.monitor",
    "EpochReport": "lora_monitor.monitor",
    "PreviewSpec": "lora_monitor.spec",
    "PreviewPrompt": "lora_monitor.spec",
    "BestEpochPolicy": "lora_monitor.policy",
    "get_scorer": "lora_monitor.scoring",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lora_monitor' has no attribute {name!r}")
