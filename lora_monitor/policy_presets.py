"""Policy presets: named choices of the metrics to score, the monitored metric, its bounds and the stop rule,
each with its rule in words (`lora-monitor presets`, the sidecar). `get_preset(name)` looks one up; the
monitor, the command line and the post-hoc tools build their policy from one.
"""
from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

from lora_monitor.policy_rules import DvarRule

__all__ = ["PRESETS", "PolicyPreset", "get_preset"]


@dataclass(frozen=True)
class PolicyPreset:
    """A named choice of metrics, monitored metric, bounds and stop rule, with the rule in words."""

    name: str
    metrics: tuple[str, ...]
    metric: str  # the monitored metric (BestEpochPolicy's metric=, LoraMonitor's metric=, the command line's --metric)
    rule: str
    bounds: Mapping[str, tuple[float | str | None, float | str | None]] = field(default_factory=dict)
    dvar: DvarRule | None = None
    needs: str = ""

    @property
    def monitor(self) -> str:
        """Deprecated: the old name of `metric`."""
        warnings.warn("PolicyPreset.monitor is deprecated; use PolicyPreset.metric", DeprecationWarning, stacklevel=2)
        return self.metric


PRESETS: dict[str, PolicyPreset] = {
    preset.name: preset
    for preset in (
        PolicyPreset(
            "quality",
            ("brisque", "ssim"),
            "brisque",
            "best = lowest mean BRISQUE over the previews (earliest epoch on ties).",
        ),
        PolicyPreset(
            "likeness",
            ("likeness", "adherence", "diversity", "memorization", "brisque", "ssim"),
            "likeness",
            "best = highest mean likeness (DINOv2 similarity of each preview to its nearest reference images), "
            "among epochs whose adherence (CLIP-T) is at least 0.9x the base model's and whose diversity across seeds "
            "is at least 0.8x the base model's, so that neither the prompt nor the variety is traded for the subject.",
            bounds={"adherence": ("0.9x", None), "diversity": ("0.8x", None)},
            needs="reference images (references=) and several seeds per prompt (seeds_per_prompt >= 2)",
        ),
        PolicyPreset(
            "loss",
            ("val_loss", "brisque", "ssim"),
            "val_loss",
            "best = lowest deterministic validation loss; stop when it has stopped moving (DVAR: the variance of the "
            "last 5 evaluations below 0.15 of the variance of all; Voronov et al., NeurIPS 2023).",
            dvar=DvarRule(),
            needs="validation images (validation=)",
        ),
    )
}


def get_preset(name: str) -> PolicyPreset:
    """The preset called `name`; a ValueError listing the presets otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown policy preset {name!r}; available: {', '.join(PRESETS)}")
    return PRESETS[name]
