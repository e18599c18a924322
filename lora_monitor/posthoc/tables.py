"""The post-hoc outputs other than the report: the terminal table and the CSV (the JSON is Analysis.to_dict)."""
from __future__ import annotations

import csv
import io
import math

from lora_monitor.posthoc.analysis import Analysis


def table(analysis: Analysis) -> str:
    """The terminal table: a base row (the base model's values, where measured), one line per candidate with
    aggregates per metric and '*' on the best, then the rule and the reason."""
    aggregate = analysis.policy.aggregate
    columns = {"epochs": ["epoch"], "strength": ["strength"], "grid": ["epoch", "strength"]}[analysis.kind]
    names = [analysis.unit if c == "epoch" else c for c in columns]  # "step" for a run saved by step
    header = [*names, *(f"{m}_{aggregate}" for m in analysis.metrics), "best", "note"]
    rows = []
    if analysis.base_aggregates is not None:
        values = [_number(analysis.base_aggregates.get(m, math.nan)) for m in analysis.metrics]
        rows.append(["base", *([""] * (len(columns) - 1)), *values, "", "the base model's images (LoRA off)"])
    for r in analysis.results:
        keys = [str(r.candidate.epoch) if c == "epoch" else f"{r.candidate.strength:g}" for c in columns]
        values = [_number(r.aggregates.get(m, math.nan)) for m in analysis.metrics]
        rows.append([*keys, *values, "*" if r.is_best else "", "" if r.note == "new best" or r.is_best else r.note])
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header) - 1)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)) + "  note"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        lines.append("  ".join(v.rjust(w) for v, w in zip(row, widths)) + ("  " + row[-1] if row[-1] else ""))
    lines.append("")
    lines.append(f"Rule: {analysis.rule}")
    lines.append(analysis.explanation())
    return "\n".join(lines)


def _number(value: float) -> str:
    return "nan" if not math.isfinite(value) else f"{value:.4f}"


def to_csv(analysis: Analysis) -> str:
    """One row per candidate and preview: keys, prompt, file, per-preview scores, the candidate's aggregates and flags,
    the preview's seed and seed group; first the base model's rows ("base" in the first column), where measured."""
    aggregate = analysis.policy.aggregate
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [analysis.unit, "strength", "prompt_index", "prompt", "file", *analysis.metrics,
         *(f"{m}_{aggregate}" for m in analysis.metrics), "eligible", "is_best", "seed", "group"]
    )
    seeds = [("" if seed is None else seed) for seed in analysis.seeds] or [""] * len(analysis.prompts)
    groups = analysis.groups or list(range(len(analysis.prompts)))
    if analysis.base_scores is not None:
        for index, prompt in enumerate(analysis.prompts):
            writer.writerow([
                "base", "", index, prompt, analysis.reference_files[index] or "",
                *(_csv_number(analysis.base_scores.get(m, [math.nan] * (index + 1))[index]) for m in analysis.metrics),
                *(_csv_number(analysis.base_aggregates.get(m, math.nan)) for m in analysis.metrics),
                "", "", seeds[index], groups[index],
            ])
    for r in analysis.results:
        for index, prompt in enumerate(analysis.prompts):
            writer.writerow([
                "" if r.candidate.epoch is None else r.candidate.epoch,
                "" if r.candidate.strength is None else f"{r.candidate.strength:g}",
                index, prompt, r.candidate.files[index] or "",
                *(_csv_number(r.scores[m][index]) for m in analysis.metrics),
                *(_csv_number(r.aggregates.get(m, math.nan)) for m in analysis.metrics),
                int(r.eligible), int(r.is_best), seeds[index], groups[index],
            ])
    return buffer.getvalue()


def _csv_number(value: float) -> str:
    return repr(float(value)) if math.isfinite(value) else "nan"
