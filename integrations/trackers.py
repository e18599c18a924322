"""The monitor's results in accelerate's trackers: scalars to every tracker, previews to TensorBoard.

`TrackersListener` is a LoraMonitor listener. At each evaluation it sends the scores (aggregate and
per prompt), the best epoch and whether this epoch is the best to every tracker the Accelerator
holds, and the previews, base references and a contact sheet to the trackers that take images
(TensorBoard through its SummaryWriter; W&B through accelerate's own `log_images` unless a
`WandbListener` covers W&B). `listeners_for(report_to)` builds the listeners for a
`--report_to wandb|tensorboard|all|none` flag. Only the main process logs. A monitor built with
every_n_steps is keyed by step everywhere: `monitor/step`, `monitor/best_step`, "step 400" in
captions and contact-sheet columns.

`scalars` and `ContactSheet` are shared with the W&B listener, so both name keys alike.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

from lora_monitor.record import to_pil

if TYPE_CHECKING:  # the core never imports integrations; integrations import the core lazily
    from lora_monitor.monitor import EpochReport, LoraMonitor

__all__ = ["REPORT_TO", "ContactSheet", "TrackersListener", "caption", "listeners_for", "scalars"]

#: Values of the --report_to flag that `listeners_for` understands (accelerate's log_with names).
REPORT_TO = ("wandb", "tensorboard", "all", "none")


def scalars(monitor: "LoraMonitor", report: "EpochReport", namespace: str = "monitor") -> dict[str, float]:
    """The numbers of one evaluation under `namespace/`: the key in the report's unit (`epoch`, or
    `step` for a step-based monitor), `<metric>_<aggregate>`, `<metric>/prompt_<i>` per prompt
    (`val_loss/image_<i>` per held-out image), `base_<metric>` (the base model's value, once measured),
    `is_best`, `best_<unit>` and `best_<monitored metric>`."""
    aggregate = monitor.policy.aggregate
    unit = report.unit
    values: dict[str, float] = {f"{namespace}/{unit}": float(report.epoch)}
    for metric, per_item in report.scores.items():
        if metric in report.aggregates:
            values[f"{namespace}/{metric}_{aggregate}"] = float(report.aggregates[metric])
        item = "prompt" if metric in report.preview_scores else "image"
        for index, value in enumerate(per_item):
            values[f"{namespace}/{metric}/{item}_{index:02d}"] = float(value)
    for metric, value in (monitor.policy.base or {}).items():
        values[f"{namespace}/base_{metric}"] = float(value)
    values[f"{namespace}/is_best"] = 1.0 if report.is_best else 0.0
    if report.decision.best_epoch is not None:
        values[f"{namespace}/best_{unit}"] = float(report.decision.best_epoch)
        values[f"{namespace}/best_{monitor.policy.metric}"] = float(report.decision.best_value)
    return values


def caption(monitor: "LoraMonitor", report: "EpochReport | None", index: int) -> str:
    """`prompt | seed S | epoch E | metric value, ...` (`step N` for a step-based monitor) for preview
    `index` (report None: the base render)."""
    prompt = monitor.spec.prompts[index]
    parts = [prompt.prompt, f"seed {prompt.seed}"]
    if report is None:
        parts.append("base (LoRA off)")
    else:
        parts.append(report.label)
        parts.append(", ".join(f"{metric} {values[index]:.4g}" for metric, values in report.preview_scores.items()))
    return " | ".join(parts)


class ContactSheet:
    """A grid of thumbnails: one row per preview prompt, one column per evaluation, the base render
    first. Keeps small thumbnails only, and at most `max_epochs` evaluation columns (the newest).
    Columns are labelled "<unit> <key>" ("epoch 3"; "step 400" with unit="step"), or by the label
    given to `add`."""

    def __init__(self, thumbnail: int = 128, max_epochs: int = 32, unit: str = "epoch") -> None:
        if thumbnail < 16:
            raise ValueError(f"thumbnail must be at least 16 pixels, got {thumbnail}")
        if max_epochs < 1:
            raise ValueError(f"max_epochs must be at least 1, got {max_epochs}")
        self.thumbnail = thumbnail
        self.max_epochs = max_epochs
        self.unit = unit
        self.base: list[Image.Image] | None = None
        self.epochs: list[tuple[int, str, list[Image.Image]]] = []  # (key, column label, thumbnails)

    def _thumbnails(self, images: Sequence[torch.Tensor]) -> list[Image.Image]:
        thumbs = []
        for image in images:
            pil = to_pil(image)
            pil.thumbnail((self.thumbnail, self.thumbnail))
            thumbs.append(pil)
        return thumbs

    def set_base(self, images: Sequence[torch.Tensor]) -> None:
        self.base = self._thumbnails(images)

    def add(self, epoch: int, images: Sequence[torch.Tensor], label: str | None = None) -> None:
        """A column for the evaluation keyed `epoch` (in the sheet's unit), labelled `label` if given
        (a report's `label`), else "<unit> <epoch>"."""
        self.epochs.append((epoch, label if label is not None else f"{self.unit} {epoch}", self._thumbnails(images)))
        del self.epochs[: -self.max_epochs]

    @property
    def columns(self) -> list[str]:
        labels = ["base"] if self.base is not None else []
        return labels + [label for _, label, _ in self.epochs]

    def render(self, best_epoch: int | None = None) -> Image.Image:
        """The sheet as an RGB image; the best evaluation's column label (`best_epoch`: its key) ends with '*'."""
        columns = ([("base", self.base)] if self.base is not None else []) + [
            (label + (" *" if epoch == best_epoch else ""), thumbs) for epoch, label, thumbs in self.epochs
        ]
        if not columns:
            raise ValueError("the contact sheet is empty: add an epoch's previews first")
        rows = max(len(thumbs) for _, thumbs in columns)
        cell_w = max(t.width for _, thumbs in columns for t in thumbs)
        cell_h = max(t.height for _, thumbs in columns for t in thumbs)
        pad, header = 2, 14
        sheet = Image.new("RGB", (len(columns) * (cell_w + pad) + pad, header + rows * (cell_h + pad) + pad), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for column, (label, thumbs) in enumerate(columns):
            x = pad + column * (cell_w + pad)
            draw.text((x + 1, 1), label, fill=(0, 0, 0))
            for row, thumb in enumerate(thumbs):
                y = header + pad + row * (cell_h + pad)
                sheet.paste(thumb, (x + (cell_w - thumb.width) // 2, y + (cell_h - thumb.height) // 2))
        return sheet


def _finite(values: dict[str, float]) -> dict[str, float]:
    """TensorBoard stores NaN/inf, but they break its charts' axes; W&B gets them as they are."""
    return {key: value for key, value in values.items() if math.isfinite(value)}


class BaseKeeper:
    """Keeps the base renders a listener logs once and shows in its contact sheet (`self.sheet`, may be None)."""

    sheet: "ContactSheet | None" = None
    _base: list[torch.Tensor] | None = None

    def on_base_references(self, monitor: "LoraMonitor", images: list[torch.Tensor]) -> None:
        if not monitor.is_main_process:
            return
        self._base = list(images)
        if self.sheet is not None:
            self.sheet.set_base(images)


class TrackersListener(BaseKeeper):
    """Sends each evaluation to the Accelerator's trackers (`monitor.attach(accelerator)` first).

    Scalars go to every tracker at `step` = the report's global step (the epoch when the loop gives
    none; a step-based monitor's key is its step). Images go to TensorBoard (`<namespace>/preview/<i>`,
    `<namespace>/base/<i>`, `<namespace>/contact_sheet`) and to accelerate's W&B tracker. W&B drops a row
    logged at a step before its own, which a trainer that logs with no step (kohya's sd-scripts: one row
    per log) is always past: give such a run a WandbListener (`listeners_for` does), which joins the run's
    rows and adds the table, summary and best artifact. Trackers named in `exclude` get
    nothing; by default those covered by another listener of the same monitor (a `WandbListener`
    covers "wandb") are excluded, so nothing is logged twice. A failing tracker gets one warning
    and never stops training.
    """

    def __init__(
        self,
        namespace: str = "monitor",
        *,
        images: bool = True,
        contact_sheet: bool = True,
        exclude: Sequence[str] | None = None,
        thumbnail: int = 128,
    ) -> None:
        if not isinstance(namespace, str) or not namespace or namespace.strip("/") != namespace:
            raise ValueError(f"namespace must be a non-empty name without leading/trailing '/', got {namespace!r}")
        self.namespace = namespace
        self.images = images
        self.exclude = None if exclude is None else set(exclude)
        self.sheet = ContactSheet(thumbnail) if (images and contact_sheet) else None
        self._base: list[torch.Tensor] | None = None
        self._base_logged: set[str] = set()
        self._prompts_logged: set[str] = set()
        self._warned: set[str] = set()

    # ----------------------------------------------------------------- listener events
    def on_evaluation(self, monitor: "LoraMonitor", report: "EpochReport") -> None:
        if not monitor.is_main_process or monitor.accelerator is None:
            return
        if self.sheet is not None:
            self.sheet.add(report.epoch, report.images, label=report.label)
        step = report.step if report.step is not None else report.epoch
        values = scalars(monitor, report, self.namespace)
        excluded = self._excluded(monitor)
        for tracker in monitor.accelerator.trackers:
            if tracker.name in excluded:
                continue
            try:
                tracker.log(_finite(values) if tracker.name == "tensorboard" else values, step=step)
                if self.images:
                    self._log_images(monitor, report, tracker, step)
            except Exception as error:  # a tracker must never stop training
                self._warn_once(tracker.name, f"logging the monitor's results to the {tracker.name!r} tracker failed ({error!r}); "
                                f"training goes on and the local record under {monitor.output_dir} is complete")

    # ----------------------------------------------------------------- internals
    def _excluded(self, monitor: "LoraMonitor") -> set[str]:
        if self.exclude is not None:
            return self.exclude
        return {name for listener in monitor.listeners if (name := getattr(listener, "tracker_name", None))}

    def _log_images(self, monitor: "LoraMonitor", report: "EpochReport", tracker: Any, step: int) -> None:
        ns = self.namespace
        if tracker.name == "tensorboard":
            writer = tracker.writer
            if tracker.name not in self._prompts_logged:
                lines = ["| # | prompt | seed |", "|---|---|---|"]
                lines += [f"| {i:02d} | {p.prompt} | {p.seed} |" for i, p in enumerate(monitor.spec.prompts)]
                writer.add_text(f"{ns}/prompts", "\n".join(lines), global_step=step)
                self._prompts_logged.add(tracker.name)
            for index, image in enumerate(report.images):
                writer.add_image(f"{ns}/preview/{index:02d}", _chw(image), global_step=step)
            if self._base is not None and tracker.name not in self._base_logged:
                for index, image in enumerate(self._base):
                    writer.add_image(f"{ns}/base/{index:02d}", _chw(image), global_step=step)
                self._base_logged.add(tracker.name)
            if self.sheet is not None:
                sheet = np.asarray(self.sheet.render(report.decision.best_epoch))
                writer.add_image(f"{ns}/contact_sheet", sheet, global_step=step, dataformats="HWC")
            writer.flush()
        elif tracker.name == "wandb":
            import wandb

            images = {f"{ns}/previews": [wandb.Image(to_pil(image), caption=caption(monitor, report, i)) for i, image in enumerate(report.images)]}
            if self._base is not None and tracker.name not in self._base_logged:
                images[f"{ns}/base"] = [wandb.Image(to_pil(image), caption=caption(monitor, None, i)) for i, image in enumerate(self._base)]
                self._base_logged.add(tracker.name)
            if self.sheet is not None:
                images[f"{ns}/contact_sheet"] = wandb.Image(self.sheet.render(report.decision.best_epoch), caption="rows: prompts; columns: " + ", ".join(self.sheet.columns))
            tracker.log(images, step=step)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)


def _chw(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) float in [0, 1], NaN as black, on the CPU: what SummaryWriter.add_image takes."""
    return torch.nan_to_num(image.detach().float().cpu(), nan=0.0).clamp(0, 1)


def listeners_for(report_to: str | None, **wandb_options: Any) -> list[Any]:
    """The listeners for a `--report_to` flag (the value given to `Accelerator(log_with=...)`).

    "tensorboard": a TrackersListener. "wandb": a WandbListener (full W&B logging: images, table,
    summary, best-checkpoint artifact; `wandb_options` go to it) and a TrackersListener for any
    other tracker. "all": both, the WandbListener only when wandb is installed. "none"/None: none.
    """
    if report_to is not None and report_to not in REPORT_TO:
        raise ValueError(f"report_to can be {', '.join(repr(name) for name in REPORT_TO)} or None, got {report_to!r}")
    if report_to in (None, "none"):
        return []
    listeners: list[Any] = []
    if report_to == "wandb" or (report_to == "all" and _wandb_installed()):
        from lora_monitor.integrations.wandb_logger import WandbListener

        listeners.append(WandbListener(**wandb_options))
    listeners.append(TrackersListener())
    return listeners


def _wandb_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("wandb") is not None
