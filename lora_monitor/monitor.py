"""LoraMonitor: at the end of an epoch, render the previews, score them, decide, record and export.

Data flows one way: spec -> render -> score -> policy -> (export, record, listeners).

This module builds the monitor (every setting checked before training starts), wires it to the
Accelerator and holds the loop's calls. Its other parts live beside it, where a reader looks for them:
lora_monitor/evaluation.py (an evaluation on one or several processes; EpochReport, Listener, quantize),
lora_monitor/base_references.py (the base model's renders and their cache) and lora_monitor/resume.py
(state_dict/load_state_dict, on_resume). Their names stay importable from here.
"""
from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from lora_monitor import distributed
from lora_monitor import export as exporting
from lora_monitor.base_references import BaseReferences
from lora_monitor.evaluation import EpochReport, Evaluation, Listener, RecordWriteError, quantize
from lora_monitor.families import detect_family, get_family
from lora_monitor.policy import VALIDATION_METRIC, BestEpochPolicy, DvarRule, get_preset
from lora_monitor.record import RunRecord
from lora_monitor.render import PreviewRenderer
from lora_monitor.resume import STATE_VERSION, Resume
from lora_monitor.scoring import Scorer, get_scorer
from lora_monitor.spec import PreviewSpec

__all__ = ["EpochReport", "Listener", "LoraMonitor", "RecordWriteError", "STATE_VERSION", "quantize", "unwrap"]

logger = logging.getLogger("lora_monitor")


def _signal_options(references, clip_model, dino_model, strip_words, device):
    """The settings the embedding signals (likeness, adherence, diversity, memorization) are built with."""
    from lora_monitor.scoring.signals import SignalOptions

    options = {"references": references, "clip_model": clip_model, "dino_model": dino_model, "device": device}
    return SignalOptions(**{name: value for name, value in options.items() if value is not None}, strip_words=tuple(strip_words))


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/FSDP/torch.compile wrappers: the very object that trains, never a copy.
    A module compiled in place (`unet.compile()`, torch >= 2.2) has no wrapper: it is itself, and the
    previews run through its compiled forward."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif isinstance(getattr(module, "module", None), torch.nn.Module):
            module = module.module
        else:
            return module


class LoraMonitor(Evaluation, BaseReferences, Resume):
    """Watches a LoRA training run through fixed previews.

    Build it from the modules the loop already holds, `attach` it to the Accelerator, call
    `on_epoch_end(epoch, step)` after each epoch and stop when `should_stop` is true.
    Settings are checked here, before training starts. Where the calls go in an accelerate loop:

        accelerator.load_state(path)                   # restores the monitor's state too (attach)
        monitor.on_resume(last_epoch, global_step, mid_epoch=...)   # right after load_state
        for epoch in range(first_epoch, epochs):
            for batch in dataloader:
                ...; global_step += 1
                if global_step % checkpointing_steps == 0:
                    accelerator.save_state(...)        # taken BEFORE on_epoch_end: on_resume evaluates what it missed
            monitor.on_epoch_end(epoch + 1, global_step)   # on EVERY process, never inside `if is_main_process:`
            accelerator.save_state(...)                # an epoch-end checkpoint taken here includes this evaluation
            if monitor.should_stop:
                break

    With several processes every rank must make the same calls: each renders its share of the previews.
    A rank that does not come within `sync_timeout_s` seconds makes the others raise RanksOutOfStepError
    instead of hanging in the gathers.

    `metric=` names the monitored metric, as BestEpochPolicy's metric= and the command line's --metric do
    (the preset's when not given); `monitor=` is its old name, deprecated.
    """

    def __init__(
        self,
        *,
        spec: PreviewSpec | str | os.PathLike,
        output_dir: str | os.PathLike,
        pipeline=None,
        family: str | None = None,
        unet: torch.nn.Module | None = None,
        transformer: torch.nn.Module | None = None,
        vae: torch.nn.Module | None = None,
        text_encoder: torch.nn.Module | None = None,
        text_encoder_2: torch.nn.Module | None = None,
        text_encoder_3: torch.nn.Module | None = None,
        tokenizer=None,
        tokenizer_2=None,
        tokenizer_3=None,
        scheduler=None,
        preset: str = "quality",
        metrics: Sequence[str] | None = None,
        metric: str | None = None,
        mode: str | None = None,
        min_delta: float = 0.0,
        patience: int | None = None,
        aggregate: str = "mean",
        bounds: Mapping[str, tuple[float | str | None, float | str | None]] | None = None,
        dvar: DvarRule | None = None,
        references: str | os.PathLike | Sequence[torch.Tensor] | None = None,
        validation=None,
        clip_model: str | None = None,
        dino_model: str | None = None,
        strip_words: Sequence[str] = (),
        keep_signal_models: bool = True,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        batch_size: int = 4,
        sampler: str | None = None,
        top_k: int = 1,
        export: bool = True,
        write_weights: exporting.WeightsWriter | None = None,
        scorers: Sequence[Scorer] | None = None,
        listeners: Sequence[Listener] = (),
        progress: bool = False,
        sync_timeout_s: float = 300.0,
        monitor: str | None = None,
    ) -> None:
        if monitor is not None:
            if metric is not None:
                raise ValueError(
                    f"got metric={metric!r} and monitor={monitor!r}: monitor= is the deprecated old name of metric=; give metric= only"
                )
            warnings.warn("LoraMonitor(monitor=...) is deprecated: name the monitored metric with metric=", DeprecationWarning, stacklevel=2)
            metric = monitor
        if not (isinstance(sync_timeout_s, (int, float)) and math.isfinite(sync_timeout_s) and sync_timeout_s > 0):
            raise ValueError(f"sync_timeout_s must be a number of seconds > 0, got {sync_timeout_s!r}")
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ValueError(f"every_n_steps must be an integer >= 1 (or None to evaluate by epoch), got {every_n_steps!r}")
        if top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        self.spec = spec if isinstance(spec, PreviewSpec) else PreviewSpec.load(spec)
        self.output_dir = Path(output_dir)
        self.unit = "epoch" if every_n_steps is None else "step"
        # the preset fills in what is not given: metrics, monitored metric, bounds (explicit ones win) and stop rule;
        # metrics given explicitly are taken as they are, the preset's gain what the monitored metric, bounds and DVAR read
        self.preset = get_preset(preset)
        metric = metric or self.preset.metric
        bounds = {**(self.preset.bounds if metric == self.preset.metric else {}), **(bounds or {})}
        dvar = dvar if dvar is not None else self.preset.dvar if metric == self.preset.metric else None
        if metrics is None:
            metrics = list(self.preset.metrics)
            metrics += [name for name in (metric, *bounds, *([dvar.metric] if dvar else [])) if name not in metrics]
        wants_validation = VALIDATION_METRIC in metrics
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.keep_signal_models = keep_signal_models
        self.top_k = top_k
        self.export = export
        # Without the diffusers modules the monitor scores images rendered elsewhere (a trainer's own
        # samples, files on disk): pass them to evaluate() and the base renders to set_base_references().
        components = {
            "unet": unet, "transformer": transformer, "vae": vae, "scheduler": scheduler,
            "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "text_encoder_3": text_encoder_3,
            "tokenizer": tokenizer, "tokenizer_2": tokenizer_2, "tokenizer_3": tokenizer_3,
        }
        if pipeline is not None:
            given = sorted(name for name, module in components.items() if module is not None)
            if given:
                raise ValueError(f"pass either pipeline= or the modules ({', '.join(given)}), not both")
            family = family or detect_family(pipeline=pipeline).name
            components = {name: getattr(pipeline, name, None) for name in get_family(family).components}
        components = {name: (unwrap(module) if isinstance(module, torch.nn.Module) else module) for name, module in components.items() if module is not None}
        self.renderer: PreviewRenderer | None = None
        self.validation = None
        if components or family is not None:
            self.renderer = PreviewRenderer(family=family, sampler=sampler, batch_size=batch_size, progress=progress, **components)
            self.renderer.check_spec(self.spec)
            if wants_validation:
                self.validation = self._validation_loss(validation)
            # frozen text encoders: every preview prompt encoded now, and let go of, so the loop may free them
            self.renderer.encode(self.spec, release=True)
        elif wants_validation:
            raise ValueError(f"the metric {VALIDATION_METRIC!r} runs the denoiser: build the monitor with the model's modules (or pipeline=)")
        if validation is not None and not wants_validation:
            raise ValueError(f"validation= was given but {VALIDATION_METRIC!r} is not among the metrics {metrics}; add it (or use preset='loss')")
        self.family = self.renderer.family if self.renderer is not None else None
        # the embedding signals score on the training device
        self.signal_options = _signal_options(references, clip_model, dino_model, strip_words, self.scoring_device)
        if scorers is not None:
            self.scorers: list[Scorer] = list(scorers)
        else:
            self.scorers = [get_scorer(name, options=self.signal_options) for name in metrics if name != VALIDATION_METRIC]
        names = [scorer.name for scorer in self.scorers] + ([VALIDATION_METRIC] if wants_validation else [])
        polarity = {scorer.name: scorer.higher_is_better for scorer in self.scorers}
        polarity[VALIDATION_METRIC] = False
        if metric not in names:
            raise ValueError(f"metric={metric!r} is not among the metrics {names}; add it to metrics")
        for bound_metric in bounds:
            if bound_metric not in names:
                raise ValueError(f"bounds name the metric {bound_metric!r}, which is not among the metrics {names}; add it to metrics")
        self.policy = BestEpochPolicy(
            metric,
            higher_is_better=polarity[metric],
            mode=mode,
            min_delta=min_delta,
            patience=patience,
            aggregate=aggregate,
            bounds=bounds,
            unit=self.unit,
            dvar=dvar,
        )
        groups = self.spec.seed_groups()
        for scorer in self.scorers:  # optional scorer hooks: fail now rather than at the first epoch end
            check_size = getattr(scorer, "check_size", None)
            if check_size is not None:
                for prompt in self.spec.prompts:
                    check_size(prompt.height, prompt.width)
            check_groups = getattr(scorer, "check_groups", None)
            if check_groups is not None:
                check_groups(groups)
            prepare = getattr(scorer, "prepare", None)
            if prepare is not None:
                prepare()
        if write_weights is None and self.renderer is not None:
            write_weights = exporting.lora_writer(self.family, self._lora_modules())
        if export and write_weights is None:
            raise ValueError("export=True needs the denoiser (to save its LoRA) or write_weights=; pass export=False to only score")
        self.write_weights = write_weights
        self.record = RunRecord(self.output_dir)
        self.listeners = list(listeners)
        self.accelerator = None
        self.top_k_epochs: list[int] = []
        self._base_images: list[torch.Tensor] | None = None
        self.base_scores: dict[str, list[float]] | None = None
        self._warned: set[str] = set()
        self.sync_timeout_s = float(sync_timeout_s)
        self._last_seen: int | None = None  # the last epoch (step) the loop reported, evaluated or not
        self._state_loaded = False
        self._resume_pending = False  # a state was loaded: the first call after it checks what the resume skipped
        self._recover_exports()

    def _validation_loss(self, validation):
        """The validation-loss signal over `validation` (a ValidationSet, or a folder of images with .txt captions,
        cropped to the first preview's size); its latents and captions are encoded now, before the encoders go."""
        from lora_monitor.validation import ValidationLoss, ValidationSet

        if validation is None:
            raise ValueError(
                f"the metric {VALIDATION_METRIC!r} needs held-out images: pass validation=ValidationSet(images, captions) "
                "or validation='folder/with/images_and_txt_captions'"
            )
        if not isinstance(validation, ValidationSet):
            first = self.spec.prompts[0]
            validation = ValidationSet.from_folder(validation, size=(first.height, first.width))
        loss = ValidationLoss(self.renderer, validation)
        loss.prepare()
        return loss

    @classmethod
    def from_pipeline(cls, pipeline, **kwargs) -> "LoraMonitor":
        """Build from a diffusers pipeline object's modules (no copy); the family comes from its class."""
        return cls(pipeline=pipeline, **kwargs)

    @classmethod
    def from_modules(cls, family: str, **kwargs) -> "LoraMonitor":
        """Build for `family` (see lora_monitor.families.FAMILIES) from the loop's modules by their pipeline names."""
        return cls(family=family, **kwargs)

    @property
    def unet(self) -> torch.nn.Module | None:
        """The denoiser that trains (a UNet or a transformer), as the renderer holds it."""
        return self.renderer.denoiser if self.renderer is not None else None

    denoiser = unet

    def _lora_modules(self) -> dict[str, torch.nn.Module]:
        """The modules whose LoRA an export saves, by the names save_lora_weights knows them."""
        pipeline = self.renderer.pipeline
        modules = {self.family.denoiser: self.renderer.denoiser}
        modules.update({name: getattr(pipeline, name) for name in self.renderer.live_encoders if name in self.family.lora_modules})
        return modules

    # ----------------------------------------------------------------- wiring
    def attach(self, accelerator, *, checkpoint: bool = True) -> "LoraMonitor":
        """Join the Accelerator's checkpoints (save_state/load_state) and use its mixed-precision autocast.
        `checkpoint=False` leaves the checkpoints alone, for a caller that saves the monitor's state itself
        (the kohya launcher: plain sd-scripts refuses a state holding objects it did not register).
        FSDP and DeepSpeed ZeRO-3 shard the parameters across ranks: rendering would see only a shard, so
        they are refused here, before training starts."""
        if self.renderer is not None:
            kind = str(getattr(accelerator, "distributed_type", "")).rsplit(".", 1)[-1]
            plugin = getattr(getattr(accelerator, "state", None), "deepspeed_plugin", None)
            if kind == "FSDP" or (kind == "DEEPSPEED" and getattr(plugin, "zero_stage", None) == 3):
                what = "FSDP" if kind == "FSDP" else "DeepSpeed ZeRO stage 3"
                raise ValueError(
                    f"{what} shards the model's parameters across ranks, so the monitor cannot render previews with them; "
                    "train the LoRA with DDP (accelerate's multi_gpu) or ZeRO stage 1/2, or render elsewhere and call evaluate()"
                )
        self.accelerator = accelerator
        if self.renderer is not None:
            self.renderer.autocast = accelerator.autocast
        if checkpoint:
            accelerator.register_for_checkpointing(self)
        return self

    @property
    def is_main_process(self) -> bool:
        """Only the main process writes the record and exports (rank 0 under torchrun without an Accelerator)."""
        if self.accelerator is not None:
            return self.accelerator.is_main_process
        return distributed.rank_and_world_size()[0] == 0

    @property
    def should_stop(self) -> bool:
        return self.policy.should_stop

    @property
    def best_epoch(self) -> int | None:
        return self.policy.best_epoch

    def due(self, epoch: int) -> bool:
        return self.unit == "epoch" and epoch % self.every_n_epochs == 0

    def due_step(self, step: int) -> bool:
        return self.unit == "step" and step % self.every_n_steps == 0

    # ----------------------------------------------------------------- the loop's calls
    def on_epoch_end(self, epoch: int, step: int | None = None, *, force: bool = False) -> EpochReport | None:
        """Render and evaluate `epoch` if it is due (every_n_epochs) or `force`; returns the report, or None when not due.
        A monitor built with every_n_steps evaluates in on_step_end and does nothing here.

        Call it on every process, after the epoch's last optimizer step. A checkpoint saved before it (inside the
        step loop, as diffusers' --checkpointing_steps does) does not include this evaluation: after resuming from
        it, call on_resume, which evaluates the epoch from the loaded weights."""
        if self.unit == "step":
            return None
        self._settle_resume(epoch)
        report = self._render_and_evaluate(epoch, step) if force or self.due(epoch) else None
        self._last_seen = epoch
        return report

    def on_step_end(self, step: int, *, force: bool = False) -> EpochReport | None:
        """Render and evaluate after optimizer step `step` if it is due (every_n_steps) or `force`; the policy,
        record, sidecar and trackers key this evaluation by its step. Returns the report, or None when not due."""
        if self.unit != "step":
            raise ValueError("on_step_end needs a monitor built with every_n_steps=N; this one evaluates by epoch (on_epoch_end)")
        self._settle_resume(step)
        report = self._render_and_evaluate(step, step) if force or self.due_step(step) else None
        self._last_seen = step
        return report

    def close(self) -> None:
        """End of training: listeners that hold something open (a W&B run they started) finish it."""
        self._settle_resume(None)
        for listener in self.listeners:
            finish = getattr(listener, "finish", None)
            if finish is not None:
                try:
                    finish()
                except Exception as error:
                    self._warn_once(f"listener:{type(listener).__name__}", f"{type(listener).__name__}.finish failed ({error!r})")

    # ----------------------------------------------------------------- listeners and warnings
    def _notify(self, event: str, payload: Any) -> None:
        """Tell every listener; a listener that raises gets one warning and never stops training."""
        for listener in self.listeners:
            handler: Callable | None = getattr(listener, event, None)
            if handler is None:
                continue
            try:
                handler(self, payload)
            except Exception as error:
                name = type(listener).__name__
                self._warn_once(f"listener:{name}", f"{name}.{event} failed ({error!r}); training goes on, the local record is complete")

    def _warn_loudly(self, message: str) -> None:
        """A warning that must not pass unseen (a resume that lost or disagrees with something): logged and warned."""
        logger.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

