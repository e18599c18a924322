"""The monitor's results in Weights & Biases.

`WandbListener` is a LoraMonitor listener. At each evaluation it logs, under one namespace
(`monitor/` by default) and plotted against `monitor/epoch`:
  - the previews as wandb.Image with captions (prompt, seed, epoch, scores), the base renders once,
    and a contact sheet (rows = prompts, columns = base then every epoch so far);
  - the scores (`monitor/<metric>_<aggregate>`, `monitor/<metric>/prompt_<i>`), is_best, best_epoch;
  - a wandb.Table with one row per prompt (prompt, seed, preview, base, every score);
  - run.summary: best epoch, best score, stop epoch and stop reason, whenever they change;
  - the best checkpoint folder as an Artifact of type "model" with aliases best, epoch-N and latest,
    metadata = the checkpoint's sidecar (scores, policy, spec fingerprint), when the best changes.

A monitor built with every_n_steps is keyed by step instead: plotted against `monitor/step`,
`best_step`/`stop_step` in the summary, a `step` table column, "step 400" in captions and
contact-sheet columns, and the artifact alias `step-400`.

It logs into the run the user already has (accelerate's wandb tracker, or `wandb.run`) or starts
one. Its rows never move the run's step: each joins the row open at the run's current step
(`log(..., commit=False)`, no `step=`) and is committed by the user's next log, so a user's own
`log(..., step=global_step)` at that same step still lands (a committed row would have moved the
step past it, and wandb drops rows logged to an earlier step), and a trainer that logs with no
step at all (kohya's sd-scripts: each log a new row) gets each evaluation in its next row. A row
holds one evaluation: when the run's step has not moved since the last one (nobody logged), the
next evaluation waits for the next row, or for `finish()` (LoraMonitor.close(), before the run
ends), which commits the rows still waiting one after another. W&B failing never stops training:
the first failure is one warning, a run that cannot start turns the listener off, and the
monitor's local record is written whatever W&B does. Only the main process logs. Nothing from
the environment goes into config or metadata.
"""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from lora_monitor.export import json_safe
from lora_monitor.integrations.trackers import BaseKeeper, ContactSheet, caption, scalars
from lora_monitor.record import to_pil

if TYPE_CHECKING:
    from lora_monitor.monitor import EpochReport, LoraMonitor

__all__ = ["WandbListener", "monitor_config"]

_SECRET_ENV = ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE")


def monitor_config(monitor: "LoraMonitor") -> dict[str, Any]:
    """The monitor's settings for a W&B run config: policy, metrics, spec fingerprint and prompts.
    Built from the monitor alone (never from the environment), so no secret can end up in it."""
    return json_safe(
        {
            "policy": monitor.policy.describe(),
            "metrics": [scorer.name for scorer in monitor.scorers],
            "every_n_epochs": monitor.every_n_epochs,
            "spec_fingerprint": monitor.spec.fingerprint(),
            "prompts": [prompt.to_dict() for prompt in monitor.spec.prompts],
            # a step-based monitor says so; an epoch-based one's config is as it always was
            **({"unit": "step", "every_n_steps": monitor.every_n_steps} if monitor.unit == "step" else {}),
        }
    )


class WandbListener(BaseKeeper):
    """Logs every evaluation of a LoraMonitor to W&B (see the module docstring for what goes where).

    Args:
        project, name, entity, tags: for the run this listener starts when none exists.
        run: a wandb run to log into. Default: accelerate's wandb tracker run when the monitor is
            attached to an Accelerator that has one, else `wandb.run`, else a new run.
        upload_checkpoints: log the best checkpoint as an Artifact when the best changes.
        namespace: prefix of every key (`monitor/ssim_mean`).
        artifact_name: the Artifact's name; default `lora-best-<run id>`.
        log_images: log previews, base, contact sheet and the table's image columns.
        thumbnail: contact-sheet cell size in pixels.
        init_kwargs: more wandb.init arguments for a run this listener starts.
    """

    tracker_name = "wandb"  # tells TrackersListener that W&B is covered here

    def __init__(
        self,
        project: str | None = None,
        name: str | None = None,
        *,
        run: Any = None,
        entity: str | None = None,
        tags: list[str] | None = None,
        upload_checkpoints: bool = True,
        namespace: str = "monitor",
        artifact_name: str | None = None,
        log_images: bool = True,
        thumbnail: int = 128,
        init_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ImportError("WandbListener needs wandb: pip install 'lora-monitor[wandb]'") from None
        if not isinstance(namespace, str) or not namespace or namespace.strip("/") != namespace:
            raise ValueError(f"namespace must be a non-empty name without leading/trailing '/', got {namespace!r}")
        if artifact_name is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", artifact_name):
            raise ValueError(f"artifact_name may hold letters, digits, '-', '_' and '.', got {artifact_name!r}")
        self.project = project
        self.name = name
        self.entity = entity
        self.tags = tags
        self.upload_checkpoints = upload_checkpoints
        self.namespace = namespace
        self.artifact_name = artifact_name
        self.log_images = log_images
        self.init_kwargs = dict(init_kwargs or {})
        self.run = run
        self.owns_run = False
        self.disabled = False  # set when the run cannot start: every later event is a no-op
        self.errors: list[str] = []  # every W&B failure, the first of which was warned about
        self.sheet = ContactSheet(thumbnail) if log_images else None
        self._prepared = False
        self._base: list[torch.Tensor] | None = None
        self._base_logged = False
        self._summary: dict[str, Any] = {}
        self._open_step: int | None = None  # the run step whose row holds our last, maybe not yet committed, row
        self._waiting: list[dict[str, Any]] = []  # evaluations' rows waiting for a row of the run's that holds none of ours

    # ----------------------------------------------------------------- listener events
    def on_evaluation(self, monitor: "LoraMonitor", report: "EpochReport") -> None:
        if not monitor.is_main_process or self.disabled:
            return
        if self.sheet is not None:
            self.sheet.add(report.epoch, report.images, label=report.label)
        run = self._ensure_run(monitor)
        if run is None:
            return
        for action in (self._log_epoch, self._update_summary, self._log_checkpoint):
            try:
                action(run, monitor, report)
            except Exception as error:  # W&B must never stop training
                self._failed(monitor, f"logging {report.label}", error)

    def finish(self) -> None:
        """End of training: the rows still waiting are logged (each committed into a row of its own), and the run is
        finished if this listener started it (a user's or accelerate's run is theirs to end)."""
        if self._waiting and self.run is not None and not self.disabled:
            try:
                self._log_waiting(self.run, closing=True)
            except Exception as error:
                self._failed(None, "logging the last evaluations", error)
        if self.owns_run and self.run is not None and not self.disabled:
            try:
                self.run.finish()
            except Exception as error:
                self._failed(None, "finishing the run", error)
        self.owns_run = False

    # ----------------------------------------------------------------- the run
    def _ensure_run(self, monitor: "LoraMonitor") -> Any:
        """The run to log into, prepared once (config, metric definitions); None when W&B is off."""
        if self._prepared:
            return self.run
        import wandb

        try:
            if self.run is None:
                self.run = self._existing_run(monitor)
            if self.run is None:
                self.run = wandb.init(
                    project=self.project or "lora-monitor",
                    name=self.name,
                    entity=self.entity,
                    tags=self.tags,
                    config={"lora_monitor": monitor_config(monitor)},
                    **self.init_kwargs,
                )
                self.owns_run = True
            else:
                self.run.config.update({"lora_monitor": monitor_config(monitor)}, allow_val_change=True)
            ns, unit = self.namespace, monitor.unit  # the x-axis: monitor/epoch, or monitor/step for a step-based monitor
            self.run.define_metric(f"{ns}/{unit}")
            self.run.define_metric(f"{ns}/*", step_metric=f"{ns}/{unit}")
        except Exception as error:
            self._failed(monitor, "starting the W&B run", error)
            self.disabled = True
            return None
        self._prepared = True
        return self.run

    @staticmethod
    def _existing_run(monitor: "LoraMonitor") -> Any:
        import wandb

        accelerator = monitor.accelerator
        if accelerator is not None and any(tracker.name == "wandb" for tracker in accelerator.trackers):
            run = accelerator.get_tracker("wandb", unwrap=True)
            if run is not None:
                return run
        return wandb.run

    # ----------------------------------------------------------------- what is logged
    def _log_epoch(self, run: Any, monitor: "LoraMonitor", report: "EpochReport") -> None:
        import wandb

        ns = self.namespace
        data: dict[str, Any] = dict(scalars(monitor, report, ns))
        if self.log_images:
            data[f"{ns}/previews"] = [wandb.Image(to_pil(image), caption=caption(monitor, report, i)) for i, image in enumerate(report.images)]
            if self._base is not None and not self._base_logged:
                data[f"{ns}/base"] = [wandb.Image(to_pil(image), caption=caption(monitor, None, i)) for i, image in enumerate(self._base)]
            if self.sheet is not None:
                data[f"{ns}/contact_sheet"] = wandb.Image(
                    self.sheet.render(report.decision.best_epoch), caption="rows: prompts; columns: " + ", ".join(self.sheet.columns)
                )
        data[f"{ns}/table"] = self._table(monitor, report)
        self._log_row(run, data)
        if f"{ns}/base" in data:
            self._base_logged = True

    def _log_row(self, run: Any, data: dict[str, Any]) -> None:
        """Add `data` to the row open at the run's current step, uncommitted: the user's next log commits it,
        and their `log(..., step=s)` at this step is not dropped. No step=, so their step never goes backwards.
        When our previous row is still open at that step (nobody committed since), `data` waits: committing that
        row now would move the step past s and drop the user's next log at s (see _log_waiting)."""
        self._waiting.append(data)
        self._log_waiting(run)

    def _log_waiting(self, run: Any, *, closing: bool = False) -> None:
        """Log the waiting rows, oldest first, each into a row of the run's that holds none of ours; the others go on
        waiting for the run's step to move. `closing` (end of training): commit each row to make room for the next."""
        step = _current_step(run)
        while self._waiting:
            if step is not None and step == self._open_step:
                if not closing:
                    return
                run.log({}, commit=True)
                step += 1
            run.log(self._waiting.pop(0), commit=False)
            self._open_step = step

    def _table(self, monitor: "LoraMonitor", report: "EpochReport") -> Any:
        import wandb

        metrics = list(report.preview_scores)
        table = wandb.Table(columns=[report.unit, "index", "prompt", "seed", "preview", "base", *metrics])
        for index, prompt in enumerate(monitor.spec.prompts):
            preview = base = None
            if self.log_images:
                preview = wandb.Image(to_pil(report.images[index]))
                base = wandb.Image(to_pil(self._base[index])) if self._base is not None else None
            table.add_data(report.epoch, index, prompt.prompt, prompt.seed, preview, base, *(report.scores[m][index] for m in metrics))
        return table

    def _update_summary(self, run: Any, monitor: "LoraMonitor", report: "EpochReport") -> None:
        ns, policy, unit = self.namespace, monitor.policy, report.unit
        summary = {
            f"{ns}/best_{unit}": report.decision.best_epoch,
            f"{ns}/best_{policy.metric}": report.decision.best_value,
            f"{ns}/best_metric": f"{policy.metric} ({policy.aggregate} over prompts, {policy.mode})",
            f"{ns}/stop_{unit}": policy.stopped_epoch,
            f"{ns}/stop_reason": policy.stop_reason,
        }
        changed = {key: value for key, value in summary.items() if value is not None and self._summary.get(key) != value}
        if changed:
            run.summary.update(json_safe(changed))
            self._summary.update(changed)

    def _log_checkpoint(self, run: Any, monitor: "LoraMonitor", report: "EpochReport") -> None:
        if not self.upload_checkpoints or report.exported is None:
            return
        import wandb

        folder = Path(report.exported)
        artifact = wandb.Artifact(
            self.artifact_name or f"lora-best-{run.id}",
            type="model",
            description=report.decision.reason,
            metadata=json_safe(monitor.sidecar(report)),
        )
        # add_dir copies the files into W&B's staging area now, so the next best may replace the folder.
        # Never artifact.wait(): it raises in offline mode, and training must not wait for an upload.
        artifact.add_dir(str(folder))
        run.log_artifact(artifact, aliases=["best", f"{report.unit}-{report.epoch}", "latest"])

    # ----------------------------------------------------------------- failures
    def _failed(self, monitor: "LoraMonitor | None", doing: str, error: BaseException) -> None:
        reason = _redact(f"{type(error).__name__}: {error}")
        self.errors.append(f"{doing}: {reason}")
        if len(self.errors) > 1:
            return
        where = f" under {monitor.output_dir}" if monitor is not None else ""
        then = "W&B logging is off for this run" if doing.startswith("starting") else "later W&B failures are not reported again"
        warnings.warn(
            f"W&B failed while {doing} ({reason}); {then}. Training goes on and the local record{where} is complete.",
            RuntimeWarning,
            stacklevel=3,
        )


def _current_step(run: Any) -> int | None:
    """The run's step (that of its next log), or None where the run cannot say (a "shared" mode run)."""
    try:
        step = run.step
    except Exception:
        return None
    return step if isinstance(step, int) else None


def _redact(text: str) -> str:
    """The message with any API key from the environment replaced by '***'."""
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 8:
            text = text.replace(secret, "***")
    return text
