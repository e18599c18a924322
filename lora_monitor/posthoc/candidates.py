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


def parse_strengths(text: str) -> list[float]:
    """'0:1.5:0.1' (start:stop:step, stop included) or '0,0.5,1' -> sorted, rounded strengths."""
    text = text.strip()
    try:
        if ":" in text:
            parts = [float(p) for p in text.split(":")]
            if len(parts) != 3 or parts[2] <= 0 or parts[1] < parts[0]:
                raise ValueError
            start, stop, step = parts
            count = int(math.floor((stop - start) / step + 1e-9)) + 1
            values = [round(start + i * step, 10) for i in range(count)]
        else:
            values = [float(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise PosthocError(f"--strengths {text!r}: give START:STOP:STEP (e.g. 0:1.5:0.1, STOP included, STEP > 0) or a list like 0,0.5,1") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise PosthocError(f"--strengths {text!r}: no finite strengths")
    return sorted(set(values))
