"""What the demo leaves to look at: the HTML report of the monitored run, a one-picture summary, and whether
the run told the story it is meant to tell (the concept arrives, then the LoRA overfits).

`write_run_report` builds the post-hoc report (lora_monitor.report) from a monitor's own record: its base
renders, each evaluated epoch's previews, scores and reasons, and its policy, without scoring anything again.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from lora_monitor.monitor import LoraMonitor
from lora_monitor.policy import VALIDATION_METRIC, BestEpochPolicy


def _per_preview(scores: dict[str, list[float]], count: int) -> dict[str, list[float]]:
    """Scores with one value per preview: the validation loss (one per held-out image) becomes its mean, repeated."""
    return {
        name: [math.fsum(values) / len(values)] * count if name == VALIDATION_METRIC else list(values) for name, values in scores.items()
    }


def run_analysis(monitor: LoraMonitor, metrics: list[str] | None = None):
    """The monitor's run as a post-hoc Analysis (the report's input), read from its record and policy."""
    from lora_monitor.posthoc import Analysis, Candidate, CandidateResult
    from lora_monitor.record import read_image, read_scores

    spec, policy = monitor.spec, monitor.policy
    prompts, seeds = [p.prompt for p in spec.prompts], [p.seed for p in spec.prompts]
    count = len(prompts)
    history = {result.epoch: result for result in policy.history}
    results = []
    for line in read_scores(monitor.output_dir):
        epoch = line["epoch"]
        files = [monitor.output_dir / path for path in line["previews"]]
        candidate = Candidate(epoch, None, [read_image(path) for path in files], [str(path) for path in files], unit=line.get("unit", "epoch"))
        entry = history.get(epoch)
        results.append(CandidateResult(
            candidate, _per_preview(line["scores"], count), dict(entry.aggregates if entry else line["aggregates"]),
            entry.eligible if entry else True, entry.note if entry else "", line["reason"], is_best=epoch == policy.best_epoch,
        ))
    base_files = monitor.record.preview_paths(None, seeds)
    references = [read_image(path) for path in base_files] if all(path.is_file() for path in base_files) else None
    names = [scorer.name for scorer in monitor.scorers] + ([VALIDATION_METRIC] if monitor.validation is not None else [])
    metrics = [name for name in (metrics or names) if name in names]
    higher = {scorer.name: scorer.higher_is_better for scorer in monitor.scorers}
    higher[VALIDATION_METRIC] = False
    notes = []
    if monitor.validation is not None:
        notes.append(
            f"{VALIDATION_METRIC} is one number per {policy.unit}: the mean over the {len(monitor.validation.data)} held-out images; "
            "the contact sheet repeats it under every preview of that column"
        )
    return Analysis(
        kind="epochs", prompts=prompts, references=references, reference_files=[str(path) for path in base_files], results=results,
        policy=policy, metrics=metrics, notes=notes, source=str(monitor.output_dir), groups=spec.seed_groups(), seeds=seeds,
        base_scores=_per_preview(monitor.base_scores, count) if monitor.base_scores else None,
        base_aggregates=dict(policy.base) if policy.base else None, higher_is_better=higher,
        preset=monitor.preset if policy.metric == monitor.preset.metric else None,
    )


def write_run_report(monitor: LoraMonitor, folder: str | os.PathLike, *, metrics: list[str] | None = None, title: str | None = None) -> Path:
    """Write the HTML report of the monitor's run into `folder` (index.html, curves.png, images/); returns index.html."""
    from lora_monitor.report import write_report

    return write_report(run_analysis(monitor, metrics), folder, title=title or "lora-monitor demo: which epoch?")


@dataclass(frozen=True)
class StoryOutcome:
    """Whether the run showed the concept arriving and the LoRA overfitting, and a sentence that says so (or what did not show)."""

    shown: bool
    sentence: str


def story_outcome(policy: BestEpochPolicy, max_epochs: int, metric: str = VALIDATION_METRIC, rise: float = 0.02) -> StoryOutcome:
    """The story, checked on the scores alone: `metric` (lower is better) at the chosen epoch is below the base model's
    (the LoRA learned something the held-out images share), the chosen epoch is strictly between the first and the last
    evaluated one, `metric` rose after it by more than `rise` (a fraction of its value at the chosen epoch), and the
    policy stopped the run before `max_epochs`."""
    values = {result.epoch: result.aggregates.get(metric, math.nan) for result in policy.history}
    best = policy.best_epoch
    base = (policy.base or {}).get(metric, math.nan)
    if best is None or best not in values or not math.isfinite(values[best]):
        return StoryOutcome(False, f"The story did not show on this run: no epoch was chosen with a finite {metric}.")
    epochs = sorted(values)
    chosen = values[best]
    later = [(epoch, values[epoch]) for epoch in epochs if epoch > best and math.isfinite(values[epoch])]
    peak_epoch, peak = max(later, key=lambda item: item[1]) if later else (None, math.nan)
    missing = []
    if not (math.isfinite(base) and chosen < base):
        missing.append(f"{metric} at epoch {best} ({chosen:.4f}) is not below the base model's ({base:.4f}), so the concept did not visibly arrive")
    if not epochs[0] < best < epochs[-1]:
        missing.append(f"the chosen epoch {best} is not strictly between the first ({epochs[0]}) and the last ({epochs[-1]}) evaluated epoch")
    if peak_epoch is None or peak <= chosen * (1 + rise):
        missing.append(f"{metric} did not rise by more than {rise:.0%} after epoch {best}, so no overfitting showed")
    if not policy.should_stop or epochs[-1] >= max_epochs:
        missing.append(f"the run was not stopped early (it trained all {max_epochs} epochs)")
    if missing:
        return StoryOutcome(False, "The story did not show on this run: " + "; ".join(missing) + ". The numbers above are as they came out.")
    return StoryOutcome(True, (
        f"The story showed: {metric} on the held-out images fell from {base:.4f} (base model) to {chosen:.4f} at epoch {best} "
        f"as the concept arrived, then rose to {peak:.4f} by epoch {peak_epoch} as the LoRA overfit, and the policy stopped "
        f"the run at epoch {policy.stopped_epoch} of {max_epochs}."
    ))


def write_summary_picture(
    monitor: LoraMonitor, path: str | os.PathLike, *, curves: tuple[str, ...] = (VALIDATION_METRIC, "ssim", "brisque"), title: str = "",
) -> Path:
    """One PNG of the run: the contact sheet (a row per preview; the base model's renders, then a column per evaluated
    epoch, the chosen one outlined in red) above the curves of `curves` (the chosen epoch starred, the base model dashed).
    Made for the README: a few hundred KB at most (256 colours)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle
    from PIL import Image

    from lora_monitor.record import to_pil

    analysis = run_analysis(monitor)
    columns = ([("base", analysis.references)] if analysis.references is not None else []) + [
        (str(result.candidate.epoch), result.candidate.images) for result in analysis.results
    ]
    rows = len(analysis.prompts)
    side = max(image.shape[-1] for _, images in columns for image in images)
    gap = max(2, side // 8)
    sheet = np.full((rows * (side + gap) - gap, len(columns) * (side + gap) - gap, 3), 255, dtype=np.uint8)
    for column, (_, images) in enumerate(columns):
        for row, image in enumerate(images):
            top, left = row * (side + gap), column * (side + gap)
            sheet[top : top + side, left : left + side] = np.asarray(to_pil(image).resize((side, side), Image.NEAREST))
    curves = tuple(name for name in curves if name in analysis.metrics)
    # inches: a preview at about 2x its pixels, row labels on the left, the curves in one row underneath
    cell, label, top, under, curve, between = 0.7, 1.9, 0.4, 0.35, 2.2, 0.75
    sheet_width, sheet_height = len(columns) * cell, rows * cell
    width = max(label + sheet_width + 0.3, 3.0 * max(1, len(curves)))
    height = top + sheet_height + under + between + curve + 0.45
    figure = plt.figure(figsize=(width, height), dpi=100)
    axis = figure.add_axes((label / width, 1 - (top + sheet_height) / height, sheet_width / width, sheet_height / height))
    axis.imshow(sheet, interpolation="nearest")
    axis.set_xticks([c * (side + gap) + side / 2 for c in range(len(columns))], [name for name, _ in columns], fontsize=9)
    axis.set_yticks([r * (side + gap) + side / 2 for r in range(rows)], analysis.preview_labels, fontsize=9)
    axis.tick_params(length=0)
    for spine in axis.spines.values():
        spine.set_visible(False)
    best = analysis.best
    if best is not None:
        column = [name for name, _ in columns].index(str(best.candidate.epoch))
        axis.add_patch(Rectangle(
            (column * (side + gap) - gap / 2, -gap / 2), side + gap, sheet.shape[0] + gap, fill=False, edgecolor="red", linewidth=2.5,
            clip_on=False,
        ))
    axis.set_title(title or f"previews: the base model, then each {analysis.unit} (red: the one the policy chose)", fontsize=10)
    epochs = [result.candidate.epoch for result in analysis.results]
    panel_width = (width - 0.3) / max(1, len(curves))
    for index, metric in enumerate(curves):
        panel = figure.add_axes(((0.3 + index * panel_width + 0.45) / width, 0.45 / height, (panel_width - 0.7) / width, curve / height))
        panel.plot(epochs, [result.aggregates.get(metric, math.nan) for result in analysis.results], "o-", ms=3, color="tab:blue")
        base = (analysis.base_aggregates or {}).get(metric, math.nan)
        if math.isfinite(base):
            panel.axhline(base, ls="--", color="0.4", lw=1, label="base model")
        if best is not None and math.isfinite(best.aggregates.get(metric, math.nan)):
            panel.plot([best.candidate.epoch], [best.aggregates[metric]], "*", color="red", ms=12, label=f"chosen ({analysis.unit} {best.candidate.epoch})")
        direction = "lower" if not analysis.higher_is_better.get(metric, True) else "higher"
        panel.set_title(f"{metric} ({direction} is better)", fontsize=9)
        panel.set_xlabel(analysis.unit, fontsize=8)
        panel.tick_params(labelsize=7)
        panel.grid(alpha=0.3)
        panel.legend(fontsize=7)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    Image.open(path).convert("RGB").quantize(colors=256).save(path, optimize=True)
    return path
