"""What a post-hoc command ranks: a candidate (epoch, strength or both) with one image per prompt.

Shared by the image finder (images.py), the checkpoint renderer (checkpoints.py) and the scoring
(analysis.py), together with the error they raise for bad input and the strength notation.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class PosthocError(ValueError):
    """Bad input for a post-hoc command; the message names the file and what is allowed."""


@dataclass
class Candidate:
    """One epoch, strength or (epoch, strength) pair: one image per prompt, in prompt order.

    `unit` is what `epoch` counts: "epoch", or "step" for a run saved by optimizer step (the
    monitor's sidecar "unit": "step", kohya's name-step00000500 files); labels say which."""

    epoch: int | None
    strength: float | None
    images: list[torch.Tensor]
    files: list[str | None]
    references: list[torch.Tensor] | None = None  # only when this candidate has its own (control_NN.png)
    reference_files: list[str | None] | None = None
    unit: str = "epoch"

    @property
    def order(self) -> tuple[float, float]:
        return (self.epoch if self.epoch is not None else 0, self.strength if self.strength is not None else 0.0)

    @property
    def label(self) -> str:
        parts = []
        if self.epoch is not None:
            parts.append(f"{self.unit} {self.epoch}")
        if self.strength is not None:
            parts.append(f"strength {format_strength(self.strength)}")
        return " @ ".join(parts)


def format_strength(value: float) -> str:
    """A strength as labels, tables and the report write it (0.5, 1, 1.25)."""
    return f"{value:g}"


#: At most this many strengths: more than anyone means, and 0:1e9:1e-9 would otherwise fill the memory.
MAX_STRENGTHS = 1000


def parse_strengths(text: str) -> list[float]:
    """'0:1.5:0.1' (start:stop:step, stop included) or '0,0.5,1' -> sorted, rounded strengths: finite values,
    at most MAX_STRENGTHS of them (a range is counted before it is expanded)."""
    text = text.strip()
    usage = f"--strengths {text!r}: give START:STOP:STEP (e.g. 0:1.5:0.1, STOP included, STEP > 0) or a list like 0,0.5,1"
    try:
        parts = [float(p) for p in (text.split(":") if ":" in text else text.split(",")) if p.strip()]
    except ValueError:
        raise PosthocError(usage) from None
    if not all(math.isfinite(v) for v in parts):
        raise PosthocError(f"--strengths {text!r}: every value must be a finite number (no inf or nan)")
    if ":" in text:
        if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
            raise PosthocError(usage)
        start, stop, step = parts
        steps = (stop - start) / step  # inf when it overflows (0:1e308:1e-308)
        count = math.floor(steps + 1e-9) + 1 if math.isfinite(steps) else math.inf
    else:
        count = len(parts)
    if count > MAX_STRENGTHS:
        shown = f"{count:.6g}" if math.isfinite(count) else "too many"
        raise PosthocError(f"--strengths {text!r}: {shown} strengths, at most {MAX_STRENGTHS} allowed; use a larger STEP or fewer values")
    values = [round(start + i * step, 10) for i in range(count)] if ":" in text else parts
    if not values:
        raise PosthocError(usage)
    return sorted(set(values))
