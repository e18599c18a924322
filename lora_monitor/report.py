"""The HTML report of a post-hoc analysis: contact sheet, metric curves, policy and the reason for the choice.

Every metric gets a curve with the chosen candidate starred, its bounds (relative ones resolved against the
base model) and, where the base images were scored, a dashed line at the base model's value. The policy
section states the rule that chose: the preset's own sentence, or the monitored metric and bounds in words.

`write_report(analysis, folder)` writes `index.html`, `curves.png` and `images/` (full-size PNGs)
into one folder. Thumbnails are embedded as data URIs and everything else is linked relatively, so
the folder can be moved, zipped or opened from disk without a server or network.
"""
from __future__ import annotations

import base64
import html
import io
import math
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

import torch

from lora_monitor.posthoc import RESIZE_RULE, Analysis, CandidateResult, format_strength, resolve_bound_side
from lora_monitor.policy_rules import value_source
from lora_monitor.record import to_pil

REPORT_FILE = "index.html"
CURVES_FILE = "curves.png"

_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
.summary { background: #fff; border-left: 6px solid #2a7; padding: .8em 1em; max-width: 70em; }
.sheet { border-collapse: collapse; background: #fff; }
.sheet th, .sheet td { border: 1px solid #ddd; padding: 4px; text-align: center; vertical-align: top; font-size: 12px; }
.sheet th.prompt { text-align: left; max-width: 14em; font-weight: normal; }
.sheet td.best, .sheet th.best { outline: 4px solid #e0301e; outline-offset: -4px; background: #fff4f2; }
.sheet td.ineligible img { opacity: .55; }
.sheet img { display: block; margin: 0 auto 2px auto; image-rendering: auto; }
.scores { font-family: ui-monospace, monospace; white-space: nowrap; }
.policy td { padding: 2px 10px 2px 0; font-family: ui-monospace, monospace; }
.wrap { overflow-x: auto; }
ul.small { font-size: 12px; }
"""

# Sets data-images-loaded="all" on <body> once every <img> has decoded (naturalWidth > 0), else "broken:N":
# a headless browser's --dump-dom shows it, so a test can tell that no image link is broken.
_SCRIPT = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  document.body.setAttribute('data-image-count', String(images.length));
  document.body.setAttribute('data-images-loaded', broken.length ? 'broken:' + broken.length : 'all');
});
"""


def write_report(analysis: Analysis, folder: str | Path, *, title: str | None = None, thumbnail: int = 160) -> Path:
    """Write the report into `folder` (created); returns the path of index.html."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    curves = plot_curves(analysis, folder / CURVES_FILE)
    noun = {"epochs": analysis.unit, "strength": "strength", "grid": f"{analysis.unit} and strength"}[analysis.kind]
    title = title or f"lora-monitor: which {noun}?"
    best = analysis.best
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p>Source: <code>{_e(analysis.source)}</code> &middot; {len(analysis.results)} candidates &middot; "
        f"{len(analysis.prompts)} prompt(s) &middot; generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</p>",
        '<div class="summary">',
        f"<p><b>{'Best: ' + _e(best.candidate.label) if best else 'No candidate was eligible'}</b></p>",
        f"<p><i>Rule:</i> {_e(analysis.rule)}</p>",
        f"<p>{_e(analysis.explanation())}</p></div>",
        "<h2>Policy</h2>",
        _policy_table(analysis),
        "<h2>Metric curves</h2>",
        f'<p><img src="{curves.name}" alt="metric curves" style="max-width:100%"></p>' if curves else "<p>(no finite scores to plot)</p>",
        "<h2>Contact sheet</h2>",
        "<p>Scores under each thumbnail (per prompt); the chosen candidate is outlined in red; faded thumbnails are not eligible. "
        "Click a thumbnail for the full-size image.</p>",
    ]
    if analysis.kind == "grid":
        for index, prompt in enumerate(analysis.preview_labels):
            parts.append(f"<h3>{_e(prompt)}</h3>")
            parts.append(_grid_sheet(analysis, index, folder, thumbnail))
    else:
        parts.append(_sheet(analysis, folder, thumbnail))
    parts.append(_aggregate_table(analysis))
    if analysis.skipped or analysis.notes:
        parts.append("<h2>Skipped and notes</h2><ul class='small'>")
        parts += [f"<li>skipped <code>{_e(path)}</code>: {_e(reason)}</li>" for path, reason in analysis.skipped]
        parts += [f"<li>{_e(note)}</li>" for note in analysis.notes]
        parts.append("</ul>")
    parts.append(f"<p class='small'><i>Size rule:</i> {_e(RESIZE_RULE)}</p>")
    parts.append("</body></html>")
    path = folder / REPORT_FILE
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4g}"


def _policy_table(analysis: Analysis) -> str:
    policy = analysis.policy
    direction = "higher" if policy.higher_is_better else "lower"
    unit = analysis.unit
    tie = {"epochs": f"the earlier {unit}", "strength": "the lower strength", "grid": f"the earlier {unit}, then the lower strength"}[analysis.kind]
    bounds = "; ".join(f"{text} ({policy.aggregate})" for text in analysis.bound_texts().values())
    base = analysis.base_aggregates
    rows = [
        ("rule", analysis.rule),
        ("preset", analysis.preset.name if analysis.preset is not None else "none (the settings below)"),
        ("monitored metric", f"{policy.metric}, {direction} is better, {policy.aggregate} over {value_source(policy.metric)}s"),
        ("metrics", ", ".join(analysis.metrics)),
        ("min_delta", f"{policy.min_delta:g}: a later candidate must beat the best so far by more than this; ties within it go to {tie}"),
        ("bounds", bounds or "none"),
        ("base model", "not measured (no base images)" if base is None else
         "; ".join(f"{name} {_fmt(base.get(name, math.nan))}" for name in analysis.metrics) + f" ({policy.aggregate} over its images)"),
        ("NaN / inf", "the worst score: never chosen"),
        ("same rule as", "the in-training monitor (BestEpochPolicy, 8-bit images)"),
    ]
    return "<table class='policy'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _thumb(image: torch.Tensor, size: int, alt: str) -> str:
    """The <img> of a thumbnail at most `size` pixels a side, embedded as a PNG. A larger image is scaled down; one at
    most half as large is shown a whole number of times larger, its pixels kept sharp (a 32-pixel preview as 160)."""
    picture = to_pil(image)
    picture.thumbnail((size, size))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", optimize=True)
    source = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
    factor = size // max(picture.size)
    if factor < 2:
        return f"<img src='{source}' alt='{_e(alt)}'>"
    width, height = picture.size
    return f"<img src='{source}' width='{width * factor}' height='{height * factor}' style='image-rendering: pixelated' alt='{_e(alt)}'>"


def _full_copy(image: torch.Tensor, folder: Path, name: str) -> str:
    relative = f"images/{name}.png"
    to_pil(image).save(folder / relative)
    return relative


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _cell(
    result: CandidateResult | None, index: int, image: torch.Tensor, folder: Path, size: int, name: str, metrics: Sequence[str],
    base_scores: dict[str, list[float]] | None = None,
) -> str:
    href = _full_copy(image, folder, name)
    classes = []
    scores = ""
    if result is not None:
        classes += ["best"] if result.is_best else []
        classes += [] if result.eligible else ["ineligible"]
        scores = "<br>".join(f"{_e(metric)} {_fmt(result.scores[metric][index])}" for metric in metrics)
    elif base_scores is not None:
        scores = "<br>".join(f"{_e(metric)} {_fmt(base_scores[metric][index])}" for metric in metrics if metric in base_scores)
    return (
        f"<td class='{' '.join(classes)}'><a href='{href}'>{_thumb(image, size, name)}</a>"
        f"<div class='scores'>{scores}</div></td>"
    )


def _sheet(analysis: Analysis, folder: Path, size: int) -> str:
    head = ["<th>prompt</th>"]
    if analysis.references is not None:
        head.append("<th>reference<br>(base)</th>")
    for result in analysis.results:
        head.append(f"<th class='{'best' if result.is_best else ''}'>{_e(result.candidate.label)}</th>")
    rows = []
    for index, prompt in enumerate(analysis.preview_labels):
        cells = [f"<th class='prompt'>{_e(prompt)}</th>"]
        if analysis.references is not None:
            cells.append(_cell(None, index, analysis.references[index], folder, size, f"reference-{index:02d}", analysis.metrics, analysis.base_scores))
        for result in analysis.results:
            name = f"{_slug(result.candidate.label)}-{index:02d}"
            cells.append(_cell(result, index, result.candidate.images[index], folder, size, name, analysis.metrics))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<div class='wrap'><table class='sheet'><tr>" + "".join(head) + "</tr>" + "".join(rows) + "</table></div>"


def _grid_sheet(analysis: Analysis, index: int, folder: Path, size: int) -> str:
    epochs = sorted({r.candidate.epoch for r in analysis.results})
    strengths = sorted({r.candidate.strength for r in analysis.results})
    by_key = {(r.candidate.epoch, r.candidate.strength): r for r in analysis.results}
    head = f"<tr><th>{analysis.unit} \\ strength</th>" + "".join(f"<th>{format_strength(s)}</th>" for s in strengths) + "</tr>"
    rows = []
    for epoch in epochs:
        cells = [f"<th>{analysis.unit} {epoch}</th>"]
        for strength in strengths:
            result = by_key.get((epoch, strength))
            if result is None:
                cells.append("<td>-</td>")
                continue
            name = f"{_slug(result.candidate.label)}-{index:02d}"
            cells.append(_cell(result, index, result.candidate.images[index], folder, size, name, analysis.metrics))
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return "<div class='wrap'><table class='sheet'>" + head + "".join(rows) + "</table></div>"


def _aggregate_table(analysis: Analysis) -> str:
    aggregate = analysis.policy.aggregate
    head = "<tr><th>candidate</th>" + "".join(f"<th>{_e(m)} ({aggregate})</th>" for m in analysis.metrics) + "<th>eligible</th><th>note</th></tr>"
    rows = []
    if analysis.base_aggregates is not None:
        cells = "".join(f"<td class='scores'>{_fmt(analysis.base_aggregates.get(m, math.nan))}</td>" for m in analysis.metrics)
        rows.append(f"<tr><th>base model</th>{cells}<td></td><td style='text-align:left'>the base model's images (LoRA off)</td></tr>")
    for r in analysis.results:
        cells = "".join(f"<td class='scores'>{_fmt(r.aggregates.get(m, math.nan))}</td>" for m in analysis.metrics)
        rows.append(
            f"<tr><th class='{'best' if r.is_best else ''}'>{_e(r.candidate.label)}</th>{cells}"
            f"<td>{'yes' if r.eligible else 'no'}</td><td style='text-align:left'>{_e(r.note)}</td></tr>"
        )
    return "<h2>Scores</h2><table class='sheet'>" + head + "".join(rows) + "</table>"


def plot_curves(analysis: Analysis, path: Path) -> Path | None:
    """One panel per metric: the aggregate per candidate (per-prompt values faint), the best point starred,
    bounds dashed orange (relative ones at their resolved value), the base model's value dashed grey where
    measured. Grid runs draw one line per strength over the epochs."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the report's curves need matplotlib: pip install 'lora-monitor[report]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not any(math.isfinite(r.aggregates.get(m, math.nan)) for r in analysis.results for m in analysis.metrics):
        return None
    policy = analysis.policy
    count = len(analysis.metrics)
    columns = min(count, 3)  # three panels a row: six signals stay readable
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    for axis in axes.flat[count:]:
        axis.set_visible(False)
    x_label = {"epochs": analysis.unit, "strength": "LoRA strength", "grid": analysis.unit}[analysis.kind]
    for axis, metric in zip(axes.flat, analysis.metrics):
        if analysis.kind == "grid":
            strengths = sorted({r.candidate.strength for r in analysis.results})
            colours = plt.cm.viridis([i / max(1, len(strengths) - 1) for i in range(len(strengths))])
            for colour, strength in zip(colours, strengths):
                line = [r for r in analysis.results if r.candidate.strength == strength]
                axis.plot([r.candidate.epoch for r in line], [r.aggregates.get(metric, math.nan) for r in line], "o-", color=colour, ms=3, label=f"strength {format_strength(strength)}")
            axis.legend(fontsize=7)
        else:
            xs = [_x(r, analysis.kind) for r in analysis.results]
            for index in range(len(analysis.prompts)):
                axis.plot(xs, [r.scores[metric][index] for r in analysis.results], "-", color="0.8", lw=0.8)
            axis.plot(xs, [r.aggregates.get(metric, math.nan) for r in analysis.results], "o-", color="tab:blue", ms=4, label=policy.aggregate)
            bad = [r for r in analysis.results if not r.eligible]
            if bad:
                axis.plot([_x(r, analysis.kind) for r in bad], [r.aggregates.get(metric, math.nan) for r in bad], "x", color="tab:gray", ms=7, label="not eligible")
        best = analysis.best
        if best is not None and math.isfinite(best.aggregates.get(metric, math.nan)):
            x = _x(best, analysis.kind)
            axis.plot([x], [best.aggregates[metric]], "*", color="red", ms=16, label=f"best ({best.candidate.label})", zorder=5)
        if metric in policy.bounds:
            for side in policy.bounds[metric]:
                value, text = resolve_bound_side(policy, metric, side)
                if value is not None and math.isfinite(value):
                    axis.axhline(value, ls="--", color="tab:orange", lw=1, label=f"bound {text}")
        base = (analysis.base_aggregates or {}).get(metric, math.nan)
        if math.isfinite(base):
            axis.axhline(base, ls="--", color="0.35", lw=1, label=f"base model ({_fmt(base)})")
        direction = "higher" if _higher(analysis, metric) else "lower"
        axis.set_title(f"{metric} ({direction} is better){' - monitored' if metric == policy.metric else ''}", fontsize=10)
        axis.set_xlabel(x_label)
        if analysis.kind != "strength":
            from matplotlib.ticker import MaxNLocator

            axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _x(result: CandidateResult, kind: str) -> float:
    return result.candidate.strength if kind == "strength" else result.candidate.epoch


def _higher(analysis: Analysis, metric: str) -> bool:
    from lora_monitor.scoring import get_scorer

    if metric == analysis.policy.metric:
        return analysis.policy.higher_is_better
    if metric in analysis.higher_is_better:
        return analysis.higher_is_better[metric]
    try:
        return bool(get_scorer(metric).higher_is_better)
    except Exception:
        return True
