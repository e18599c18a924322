"""LoraMonitor: at the end of an epoch, render the previews, score them, decide, record and export.

Data flows one way: spec -> render -> score -> policy -> (export, record, listeners).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch

from lora_monitor import distributed
from lora_monitor import export as exporting
from lora_monitor.policy import AGGREGATES, VALIDATION_METRIC, BestEpochPolicy, Decision, DvarRule, get_preset
from lora_monitor.record import RunRecord, from_pil, save_png_atomic
from lora_monitor.families import detect_family, get_family
from lora_monitor.render import PreviewOutOfMemoryError, PreviewRenderer, empty_device_cache, preserved_rng_state
from lora_monitor.scoring import Scorer, get_scorer, score_images
from lora_monitor.scoring.scorers import score_sets
from lora_monitor.spec import PreviewSpec

logger = logging.getLogger("lora_monitor")
STATE_VERSION = 1


def _signal_options(references, clip_model, dino_model, strip_words, device):
    """The settings the embedding signals (likeness, adherence, diversity, memorization) are built with."""
    from lora_monitor.scoring.signals import SignalOptions

    options = {"references": references, "clip_model": clip_model, "dino_model": dino_model, "device": device}
    return SignalOptions(**{name: value for name, value in options.items() if value is not None}, strip_words=tuple(strip_words))


def _json_number(value: float) -> float | None:
    return value if math.isfinite(value) else None


@dataclass
class EpochReport:
    """What one evaluation produced. `epoch` is the evaluation's key in `unit`: the epoch, or the optimizer
    step for a monitor that evaluates every N steps (then `epoch == step`)."""

    epoch: int
    step: int | None
    images: list[torch.Tensor]  # the rendered previews, (3, H, W) float in [0, 1], before quantisation
    scores: dict[str, list[float]]  # metric -> one score per preview
    decision: Decision
    aggregates: dict[str, float] = field(default_factory=dict)
    preview_paths: list[Path] = field(default_factory=list)
    exported: Path | None = None
    unit: str = "epoch"

    @property
    def preview_scores(self) -> dict[str, list[float]]:
        """The scores with one value per preview (every metric but the validation loss, which has one per held-out image)."""
        return {name: values for name, values in self.scores.items() if name != VALIDATION_METRIC}

    @property
    def label(self) -> str:
        """'epoch 3' or 'step 400', for captions and messages."""
        return f"{self.unit} {self.epoch}"

    @property
    def is_best(self) -> bool:
        return self.decision.is_best

    @property
    def should_stop(self) -> bool:
        return self.decision.should_stop


class RecordWriteError(OSError):
    """Writing an evaluation's previews, export or score line failed; the message says what was kept."""


class Listener(Protocol):
    """Receives results as they happen (trackers, progress tables). Every method is optional."""

    def on_base_references(self, monitor: "LoraMonitor", images: list[torch.Tensor]) -> None: ...

    def on_evaluation(self, monitor: "LoraMonitor", report: EpochReport) -> None: ...


def quantize(images: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit values a PNG holds, so scores of saved previews equal the scores given here.
    NaN stays NaN (the worst score)."""
    return torch.round(images.clamp(0, 1) * 255) / 255


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


class LoraMonitor:
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
        monitor: str | None = None,
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
    ) -> None:
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
        # metrics given explicitly are taken as they are, the preset's gain what the monitor, bounds and DVAR read
        self.preset = get_preset(preset)
        monitor = monitor or self.preset.monitor
        bounds = {**(self.preset.bounds if monitor == self.preset.monitor else {}), **(bounds or {})}
        dvar = dvar if dvar is not None else self.preset.dvar if monitor == self.preset.monitor else None
        if metrics is None:
            metrics = list(self.preset.metrics)
            metrics += [name for name in (monitor, *bounds, *([dvar.metric] if dvar else [])) if name not in metrics]
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
        device = self.renderer.denoiser.device if self.renderer is not None else None
        self.signal_options = _signal_options(references, clip_model, dino_model, strip_words, device)
        if scorers is not None:
            self.scorers: list[Scorer] = list(scorers)
        else:
            self.scorers = [get_scorer(name, options=self.signal_options) for name in metrics if name != VALIDATION_METRIC]
        names = [scorer.name for scorer in self.scorers] + ([VALIDATION_METRIC] if wants_validation else [])
        polarity = {scorer.name: scorer.higher_is_better for scorer in self.scorers}
        polarity[VALIDATION_METRIC] = False
        if monitor not in names:
            raise ValueError(f"monitor={monitor!r} is not among the metrics {names}; add it to metrics")
        for bound_metric in bounds:
            if bound_metric not in names:
                raise ValueError(f"bounds name the metric {bound_metric!r}, which is not among the metrics {names}; add it to metrics")
        self.policy = BestEpochPolicy(
            monitor,
            higher_is_better=polarity[monitor],
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
    def attach(self, accelerator) -> "LoraMonitor":
        """Join the Accelerator's checkpoints (save_state/load_state) and use its mixed-precision autocast.
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

    # ----------------------------------------------------------------- base references
    def base_key(self) -> str:
        """Identifies the base renders: the spec, the family, the sampler and its config, the base weights
        (LoRA parameters excluded) of the denoiser, the VAE and any live text encoder with their dtypes, and
        the cached prompt embeddings of frozen ones."""
        if self.renderer is None:
            raise ValueError("base_key() needs the diffusers modules; without them base renders come from set_base_references()")
        renderer = self.renderer
        digest = hashlib.sha256()
        digest.update(self.spec.fingerprint().encode())
        digest.update(f"{self.family.name}:{renderer.sampler}:{renderer.pipeline.scheduler.config}".encode())
        digest.update(renderer.embeddings_digest().encode())
        with torch.no_grad():
            for module in (renderer.denoiser, renderer.pipeline.vae, *renderer.text_encoders):
                for name, parameter in module.named_parameters():
                    if "lora_" not in name:
                        # MPS has no float64: sum there in float32 (the key only has to be stable on one machine)
                        total = parameter.sum(dtype=torch.float32 if parameter.device.type == "mps" else torch.float64)
                        digest.update(f"{name}:{parameter.dtype}:{total.item():.10e}".encode())
        return digest.hexdigest()[:16]

    def base_references(self) -> list[torch.Tensor]:
        """The base model's previews (LoRA off): from memory, else from the output dir when the key matches, else
        rendered (with several processes: each renders its share, all get the whole set, the main process saves)."""
        if self._base_images is not None:
            return self._base_images
        if self.renderer is None:
            raise ValueError(
                "no base references: this monitor has no diffusers modules to render them; "
                "call set_base_references(images) with the base model's renders first"
            )
        key = self.base_key()
        paths = self.record.preview_paths(None, [p.seed for p in self.spec.prompts])
        key_file = self.record.preview_dir(None) / "base.json"
        images = distributed.broadcast_checked(lambda: self._cached_base(key, paths, key_file), what="reading the cached base previews")
        if images is None:
            indices = self._share()
            images = distributed.gather_images(
                indices, lambda: self.renderer.render_base(self.spec, indices), len(self.spec), what="rendering the base previews"
            )

            def save() -> None:
                for image, path in zip(images, paths):
                    save_png_atomic(image, path)
                exporting.write_json_atomic(key_file, {"key": key, "spec_fingerprint": self.spec.fingerprint()})

            distributed.broadcast_checked(save, what="writing the base previews")
            self._warn_non_finite_base(images)
        self.set_base_references(images)
        return self._base_images

    def _cached_base(self, key: str, paths: Sequence[Path], key_file: Path) -> list[torch.Tensor] | None:
        """The base renders saved in the output dir when their key matches, else None."""
        if key_file.is_file() and all(path.is_file() for path in paths):
            if json.loads(key_file.read_text(encoding="utf-8")).get("key") == key:
                from PIL import Image

                return [from_pil(Image.open(path)) for path in paths]
        return None

    def _share(self) -> list[int]:
        """The spec indices this process renders (all of them with one process)."""
        return distributed.shard_indices(self.spec, *distributed.rank_and_world_size(self.accelerator))

    def set_base_references(self, images: Sequence[torch.Tensor]) -> None:
        """Use these base-model renders (LoRA off; one per prompt, same seeds) as the references."""
        if len(images) != len(self.spec):
            raise ValueError(f"got {len(images)} base images for {len(self.spec)} preview prompts")
        self._base_images = [quantize(image) for image in images]
        if self.is_main_process:
            self._notify("on_base_references", self._base_images)

    # ----------------------------------------------------------------- evaluation
    def score(
        self, images: Sequence[torch.Tensor], references: Sequence[torch.Tensor] | None, indices: Sequence[int] | None = None
    ) -> dict[str, list[float]]:
        """Every scorer on every image (rounded to 8 bits, as saved); a failing scorer gives NaN and one warning.
        The random states are put back afterwards: a scorer that seeds or draws cannot change training."""
        with preserved_rng_state():
            prompts = [self.spec.prompts[i].prompt for i in (range(len(images)) if indices is None else indices)]
            return score_images(self.scorers, [quantize(image) for image in images], references, warn=self._warn_once, prompts=prompts)

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

    def on_resume(self, epoch: int | None = None, step: int | None = None, *, mid_epoch: bool = False) -> EpochReport | None:
        """Call right after accelerator.load_state(...) (or load_state_dict), on every process, with where the
        checkpoint was saved: `epoch`, the last epoch that had ended (numbered as the loop numbers them for
        on_epoch_end; None when none had), `step`, the global optimizer step, and `mid_epoch=True` when the
        checkpoint was taken part-way through the epoch after `epoch`.

        A checkpoint saved at the last step of epoch E before on_epoch_end(E) (diffusers' checkpointing_steps)
        holds a monitor state that never saw E, and the resumed loop starts at E + 1. Its loaded weights are
        E's end weights, so E is evaluated here, if due, as the uninterrupted run did; the same for a step
        checkpoint saved before on_step_end(step). Returns that report, or None when nothing was missed.
        A missed evaluation whose weights are gone (a checkpoint taken later) is a warning. Afterwards best/
        and top_k/ are reconciled with the restored state (see load_state_dict)."""
        key = step if self.unit == "step" else epoch
        if self.unit == "step" and step is None:
            raise ValueError("on_resume needs step=: this monitor evaluates every N steps")
        self._resume_pending = False
        if not self._state_loaded:
            self._warn_loudly(
                "on_resume was called, but no saved monitor state was loaded: attach(accelerator) before accelerator.load_state "
                f"(or call load_state_dict); the monitor's history starts empty, without the {self.unit}s before the checkpoint"
            )
        report = self._evaluate_skipped(key, step, mid_epoch)
        self._reconcile_exports()
        return report

    def _evaluate_skipped(self, key: int | None, step: int | None, mid_epoch: bool) -> EpochReport | None:
        """on_resume's evaluation of `key` when the checkpoint was taken after it ended but before its evaluation."""
        last = self._last_key()
        if key is None or (last is not None and key <= last):
            if key is not None and key < last:
                self._warn_loudly(
                    f"on_resume({self.unit} {key}), but the restored monitor state has already seen {self.unit} {last}: give on_resume "
                    f"the {self.unit} numbering on_{self.unit}_end gets, or the checkpoint's monitor state is not its own"
                )
            return None
        missed = self._missed(last, key)
        if missed:
            self._warn_loudly(f"{missed} never evaluated before the checkpoint was taken; their weights are gone: missing from the history")
        due = self.due(key) if self.unit == "epoch" else self.due_step(key)
        report = None
        if due and mid_epoch and self.unit == "epoch":
            self._warn_loudly(
                f"epoch {key} ended before the checkpoint but was never evaluated, and the checkpoint was taken part-way through "
                f"the next epoch: epoch {key}'s weights are gone, it stays unevaluated"
            )
        elif due:
            logger.info("resumed from a checkpoint taken after %s %s but before its evaluation: evaluating it now", self.unit, key)
            report = self._render_and_evaluate(key, step)
        self._last_seen = key
        return report

    def _last_key(self) -> int | None:
        """The last epoch (step) the restored or running monitor has seen."""
        seen = [key for key in (self._last_seen, self.policy.history[-1].epoch if self.policy.history else None) if key is not None]
        return max(seen) if seen else None

    def _missed(self, last: int | None, key: int) -> str:
        """The due evaluations strictly between `last` and `key`, as a phrase ('' when none, or `last` unknown)."""
        if last is None:
            return ""
        if self.unit == "epoch":
            missed = [k for k in range(last + 1, key) if self.due(k)]
        else:
            missed = list(range((last // self.every_n_steps + 1) * self.every_n_steps, key, self.every_n_steps))
        if not missed:
            return ""
        return f"{self.unit}(s) " + ", ".join(map(str, missed[:5])) + (f" and {len(missed) - 5} more" if len(missed) > 5 else "")

    def _settle_resume(self, key: int | None) -> None:
        """The first call after load_state_dict without on_resume: warn about the evaluations the resume skipped
        (the loop should call on_resume right after load_state) and reconcile best/ and top_k/."""
        if not self._resume_pending:
            return
        self._resume_pending = False
        missed = self._missed(self._last_key(), key) if key is not None else ""
        if missed:
            self._warn_loudly(
                f"{missed} never evaluated: this run resumed from a checkpoint saved before the evaluation (a checkpoint saved "
                f"inside the step loop, as diffusers' --checkpointing_steps does, is taken before on_{self.unit}_end). Call "
                f"monitor.on_resume(epoch, step) right after accelerator.load_state: it evaluates such an {self.unit} "
                "from the loaded weights"
            )
        self._reconcile_exports()

    def _render_and_evaluate(self, key: int, step: int | None) -> EpochReport | None:
        """Render and evaluate; when even one preview at a time does not fit in device memory (on any rank),
        every rank skips this evaluation with a warning instead of ending the training run."""
        if self.renderer is None:
            raise ValueError("this monitor has no diffusers modules to render with; call evaluate(epoch, images) instead")
        self._check_in(key)
        try:
            references = self.base_references() if self.needs_references else None
            indices = self._share()  # several processes: each renders and scores its share; see evaluate_shard
            return self._evaluate_shards(key, indices, lambda: self.renderer.render(self.spec, indices), step, references)
        except (PreviewOutOfMemoryError, distributed.RankFailedError) as error:
            if isinstance(error, distributed.RankFailedError) and not all(
                text.startswith(PreviewOutOfMemoryError.__name__) for text in error.errors.values()
            ):
                raise
            message = f"{self.unit} {key} was not evaluated: {error}; training goes on"
            logger.warning(message)
            self._warn_once("out-of-memory", message)
            return None
        finally:
            self._release_signal_models()

    @property
    def has_base_references(self) -> bool:
        """Whether the base renders are in memory (rendered, loaded from the cache, or set)."""
        return self._base_images is not None

    @property
    def needs_references(self) -> bool:
        """Whether evaluations need the base renders: a scorer compares with them, or a bound is relative to the base."""
        return any(scorer.needs_reference for scorer in self.scorers) or self.policy.needs_base

    def validation_loss(self, *, base: bool = False) -> float:
        """The mean deterministic validation loss now (LoRA off with `base`). Cheap next to a render: a loop may
        call it more often than it evaluates, e.g. every 50 steps, and log it. Training is left as it was."""
        if self.validation is None:
            raise ValueError(f"this monitor has no validation set: build it with metrics including {VALIDATION_METRIC!r} and validation=")
        values = self.validation(base=base)
        return math.fsum(values) / len(values)

    def _signals(self, images: Sequence[torch.Tensor], *, base: bool = False) -> dict[str, list[float]]:
        """The scores that need every preview at once (diversity across seeds) and the validation loss."""
        with preserved_rng_state():
            scores = score_sets(self.scorers, [quantize(image) for image in images], self.spec.seed_groups(), warn=self._warn_once)
        if self.validation is not None:
            try:
                scores[VALIDATION_METRIC] = [float(value) for value in self.validation(base=base)]
            except PreviewOutOfMemoryError:
                raise
            except Exception as error:
                self._warn_once("validation", f"the validation loss failed ({error!r}); it counts as NaN (the worst)")
                scores[VALIDATION_METRIC] = [math.nan] * len(self.validation.data)
        return scores

    def _release_signal_models(self) -> None:
        """With keep_signal_models=False, hand the CLIP/DINOv2 weights' device memory back to training after each
        evaluation (they load again, from the local cache, at the next)."""
        if not self.keep_signal_models:
            from lora_monitor.scoring.embeddings import release_embedding_models

            release_embedding_models()
            empty_device_cache()

    def _measure_base(self) -> None:
        """Score the base renders once (every signal, LoRA off): the values bounds like '0.9x' multiply, also
        written to base_scores.json and shown beside the epochs' scores."""
        if self.base_scores is not None or self._base_images is None:
            return
        base = self._base_images
        scores = self.score(base, base)
        scores.update(self._signals(base, base=True))
        self.base_scores = scores
        aggregate = AGGREGATES[self.policy.aggregate]
        self.policy.set_base({
            name: float(aggregate(values)) if all(math.isfinite(value) for value in values) else math.nan
            for name, values in scores.items()
        })
        if self.is_main_process:
            exporting.write_json_atomic(self.output_dir / "base_scores.json", {
                "scores": scores, "aggregates": {name: _json_number(value) for name, value in self.policy.base.items()},
                "aggregate": self.policy.aggregate, "spec_fingerprint": self.spec.fingerprint(),
            })

    def evaluate(
        self, epoch: int, images: Sequence[torch.Tensor], *, step: int | None = None, references: Sequence[torch.Tensor] | None = None
    ) -> EpochReport:
        """Score `images` (one (3, H, W) tensor in [0, 1] per preview prompt, in spec order) as epoch `epoch`:
        decide, record, export and tell the listeners. Used by on_epoch_end and for images rendered elsewhere."""
        self._settle_resume(None)
        images = list(images)
        if len(images) != len(self.spec):
            raise ValueError(f"got {len(images)} images for {self.unit} {epoch}, but the spec has {len(self.spec)} preview prompts")
        images = self._checked_images(epoch, range(len(images)), images)
        if references is None and self.needs_references:
            references = self.base_references()
        self._check_sizes(epoch, range(len(images)), images, references)
        self._warn_non_finite(epoch, images)
        scores = self.score(images, references)
        try:
            return self._decide(epoch, step, images, scores)
        finally:
            self._release_signal_models()

    def evaluate_shard(
        self,
        epoch: int,
        indices: Sequence[int],
        images: Sequence[torch.Tensor],
        *,
        step: int | None = None,
        references: Sequence[torch.Tensor] | None = None,
    ) -> EpochReport:
        """Evaluate epoch `epoch` from this process's share of the previews: `images` rendered for the spec
        `indices` (any split, e.g. kohya's round-robin). Call it on every process: each scores its share,
        the shares are gathered, the main process decides, records and exports, and every process gets the
        same decision and the whole epoch's report. `references`, if given, cover the whole spec.
        With one process `indices` must cover the spec, and this is evaluate()."""
        self._settle_resume(None)
        self._check_in(epoch)
        indices = [int(index) for index in indices]
        images = list(images)
        if len(indices) != len(images):
            raise ValueError(f"{self.unit} {epoch}: got {len(images)} images for {len(indices)} preview indices {indices}")
        images = self._checked_images(epoch, indices, images)
        if references is not None:
            self._check_sizes(epoch, indices, images, references)
        try:
            return self._evaluate_shards(epoch, indices, lambda: images, step, references)
        finally:
            self._release_signal_models()

    def _check_in(self, key: int) -> None:
        """With several processes: every rank must be here for the same evaluation before the gathers (see distributed.check_in)."""
        distributed.check_in(
            f"{self.unit} {key}'s evaluation",
            timeout_s=self.sync_timeout_s,
            hint=f"Call on_{self.unit}_end (on_resume, evaluate_shard) on every process, each renders its share of the previews: "
            "keep `if accelerator.is_main_process:` for your own logging, not around the monitor. "
            f"(The wait is LoraMonitor(sync_timeout_s={self.sync_timeout_s:g}).)",
        )

    def _checked_images(self, epoch: int, indices: Sequence[int], images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Images given to evaluate(): (3, H, W) RGB, float in [0, 1] (NaN allowed: a diverged run) or uint8
        (scaled to [0, 1]); anything else is refused before the policy, the record or an export changes."""
        checked = []
        for index, image in zip(indices, images):
            where = f"{self.unit} {epoch}, preview {index}"
            if not isinstance(image, torch.Tensor):
                raise TypeError(f"{where}: expected a torch.Tensor of shape (3, H, W), got {type(image).__name__}")
            if image.dim() != 3 or image.shape[0] != 3 or image.numel() == 0:
                raise ValueError(
                    f"{where}: shape {tuple(image.shape)}; expected (3, H, W): RGB, channels first, one image (no batch dimension)"
                )
            if image.dtype == torch.uint8:
                image = image.float() / 255
            elif not image.is_floating_point():
                raise ValueError(f"{where}: dtype {image.dtype}; expected floats in [0, 1] or uint8 in [0, 255]")
            finite = image[torch.isfinite(image)]
            if finite.numel() and (finite.min() < -1e-3 or finite.max() > 1 + 1e-3):
                hint = " (a [-1, 1] image? pass (image + 1) / 2)" if finite.min() < 0 else " (0-255 values? pass image / 255)"
                raise ValueError(f"{where}: values from {finite.min().item():.3g} to {finite.max().item():.3g}; expected [0, 1]{hint}")
            checked.append(image)
        return checked

    def _check_sizes(self, epoch: int, indices: Sequence[int], images: Sequence[torch.Tensor], references: Sequence[torch.Tensor] | None) -> None:
        """Each preview must have its base reference's size (SSIM compares them pixel for pixel)."""
        for index, image in zip(indices, images):
            if references is not None and tuple(image.shape) != tuple(references[index].shape):
                raise ValueError(
                    f"{self.unit} {epoch}, preview {index}: shape {tuple(image.shape)}, but its base reference is "
                    f"{tuple(references[index].shape)}; render previews and base at the same size"
                )

    def _evaluate_shards(
        self,
        epoch: int,
        indices: list[int],
        render: Callable[[], Sequence[torch.Tensor]],
        step: int | None,
        references: Sequence[torch.Tensor] | None,
    ) -> EpochReport:
        """Render (`render()`) and score this process's share, gather every share with its status, let the
        main process decide and publish, and give every process the main process's decision (one process:
        render, score, decide)."""
        if references is None and self.needs_references:
            references = self.base_references()  # a collective too: every rank gets here together

        def local() -> tuple[list[int], list[torch.Tensor], dict[str, list[float]]]:
            shard = [image.detach().float().cpu() for image in render()]
            if len(shard) != len(indices):
                raise ValueError(f"{self.unit} {epoch}: got {len(shard)} images for {len(indices)} preview indices {indices}")
            shard_references = [references[i] for i in indices] if references is not None else None
            return indices, shard, self.score(shard, shard_references, indices)

        shards = distributed.all_gather_checked(local, what=f"{self.unit} {epoch}'s previews")
        count = len(self.spec)
        images = distributed.assemble([(shard, shard_images) for shard, shard_images, _ in shards], count)
        scores = {name: distributed.assemble([(shard, s[name]) for shard, _, s in shards], count) for name in shards[0][2]}
        reports: list[EpochReport] = []

        def decide() -> tuple[Decision, dict[str, Any], list[int], dict[str, list[float]]]:
            self._warn_non_finite(epoch, images)
            reports.append(self._decide(epoch, step, images, scores))
            return reports[0].decision, self.policy.state_dict(), list(self.top_k_epochs), reports[0].scores

        # the main process adds the signals that need every preview (diversity, validation loss) and decides
        decision, policy_state, top_k_epochs, all_scores = distributed.broadcast_checked(decide, what=f"deciding on {self.unit} {epoch}")
        if reports:  # the main process
            return reports[0]
        self.policy.load_state_dict(policy_state)
        self.top_k_epochs = top_k_epochs
        return EpochReport(epoch, step, images, all_scores, decision, aggregates=dict(self.policy.history[-1].aggregates), unit=self.unit)

    def _warn_non_finite_base(self, images: Sequence[torch.Tensor]) -> None:
        broken = [i for i, image in enumerate(images) if not torch.isfinite(image).all()]
        if not broken:
            return
        overflow = self.renderer.vae_report.get("vae_overflow")
        cause = (
            f"the VAE decode in {overflow} turned finite latents into NaN/inf: keep the VAE in float32 (vae.to(torch.float32)) "
            "or use a VAE made for half precision (for SDXL, madebyollin/sdxl-vae-fp16-fix)"
            if overflow
            else "the base model itself produced NaN/inf (check its dtype and weights)"
        )
        self._warn_once("base-non-finite", f"base preview(s) {broken} are not finite: {cause}; scores against them are NaN (the worst)")

    def _warn_non_finite(self, epoch: int, images: Sequence[torch.Tensor]) -> None:
        broken = [i for i, image in enumerate(images) if not torch.isfinite(image).all()]
        if broken:
            self._warn_once(
                "non-finite",
                f"{self.unit} {epoch}: preview(s) {broken} contain NaN or inf values (has training diverged?); they score as the worst",
            )

    def _decide(self, epoch: int, step: int | None, images: list[torch.Tensor], scores: dict[str, list[float]]) -> EpochReport:
        """Update the policy with the epoch's scores; the main process records, exports and tells the listeners.

        If writing the previews or the export fails (disk full, read-only), the policy and the top-k list go
        back to before this evaluation, so they never name a best whose weights were not written, and the
        error says what best/ still holds. If only the score line cannot be appended, best/ and the policy
        agree and the error says the line is missing. The signals that need every preview at once (diversity,
        validation loss) and the base model's values are measured here first."""
        self._measure_base()
        scores = {**scores, **self._signals(images)}
        policy_before, top_k_before = self.policy.state_dict(), list(self.top_k_epochs)
        decision = self.policy.update(epoch, scores, step=step)
        result = self.policy.history[-1]
        report = EpochReport(epoch, step, images, scores, decision, aggregates=dict(result.aggregates), unit=self.unit)
        if self.is_main_process:
            try:
                report.preview_paths = self.record.save_previews(epoch, images, [p.seed for p in self.spec.prompts], unit=self.unit)
                if self.export:
                    report.exported = self._export(report)
            except Exception as error:
                self.policy.load_state_dict(policy_before)
                self.top_k_epochs = top_k_before
                kept = f"{self.unit} {self.policy.best_epoch}" if self.policy.best_epoch is not None else "nothing yet"
                raise RecordWriteError(
                    f"{report.label} was not recorded: {type(error).__name__}: {error}. The policy is as it was before {report.label}, "
                    f"and best/ still holds {kept}; free the space (or fix the folder) and evaluate {report.label} again"
                ) from error
            try:
                self.record.append_scores(self._score_line(report))
            except Exception as error:
                raise RecordWriteError(
                    f"{report.label}: {type(error).__name__}: {error} while appending its line to {self.record.scores_path}; "
                    f"the policy and best/ include {report.label}, the scores file does not"
                ) from error
            logger.info("%s: %s", report.label, decision.reason)
            self._notify("on_evaluation", report)
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

    # ----------------------------------------------------------------- export
    def sidecar(self, report: EpochReport) -> dict[str, Any]:
        return {
            "epoch": report.epoch,
            "unit": report.unit,
            "step": report.step,
            "scores": report.scores,
            "aggregates": report.aggregates,
            "prompts": [p.prompt for p in self.spec.prompts],
            "seeds": [p.seed for p in self.spec.prompts],
            "spec_fingerprint": self.spec.fingerprint(),
            "policy": self.policy.describe(),
        }

    def _export(self, report: EpochReport) -> Path | None:
        """Write the best epoch to best/ and keep top_k/epoch-N/ for the k best epochs so far."""
        exported = None
        sidecar = self.sidecar(report)
        if report.is_best:
            exported = exporting.export_checkpoint(self.output_dir / "best", self.write_weights, sidecar)
        if self.top_k > 1:
            ranked = [r.epoch for r in self.policy.ranked(self.top_k)]
            top_dir = self.output_dir / "top_k"
            if report.epoch in ranked:
                exporting.export_checkpoint(top_dir / f"{self.unit}-{report.epoch:04d}", self.write_weights, sidecar)
            for epoch in self.top_k_epochs:
                if epoch not in ranked:
                    exporting.remove_checkpoint(top_dir / f"{self.unit}-{epoch:04d}")
            self.top_k_epochs = [epoch for epoch in ranked if epoch == report.epoch or epoch in self.top_k_epochs]
        return exported

    def _score_line(self, report: EpochReport) -> dict[str, Any]:
        return {
            "epoch": report.epoch,
            "unit": report.unit,
            "step": report.step,
            "scores": report.scores,
            "aggregates": report.aggregates,
            "is_best": report.is_best,
            "best_epoch": report.decision.best_epoch,
            "best_value": report.decision.best_value,
            "should_stop": report.should_stop,
            "reason": report.decision.reason,
            "previews": [str(p.relative_to(self.output_dir)) for p in report.preview_paths],
            "spec_fingerprint": self.spec.fingerprint(),
        }

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "policy": self.policy.state_dict(),
            "top_k_epochs": list(self.top_k_epochs),
            "spec_fingerprint": self.spec.fingerprint(),
            "last_seen": self._last_key(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()` (accelerate calls this inside load_state once attached). Exports an interrupted
        swap left half-done are put back at once. The checkpoint may be older than the last evaluation on disk: the
        first call after this (on_resume, right after load_state, or else the next on_epoch_end/evaluate) removes
        top_k/ entries the restored list does not hold and says loudly when best/ holds an evaluation the restored
        policy does not (its weights cannot be written again: best/ is replaced at the next new best)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"monitor state version {state.get('version')!r} is not {STATE_VERSION}; it was saved by another lora-monitor")
        if state["spec_fingerprint"] != self.spec.fingerprint():
            raise ValueError(
                f"the saved monitor state belongs to preview spec {state['spec_fingerprint']}, but this run's spec is "
                f"{self.spec.fingerprint()}: scores of different previews cannot be compared; resume with the same prompts"
            )
        self.policy.load_state_dict(state["policy"])
        self.top_k_epochs = list(state["top_k_epochs"])
        self._last_seen = state.get("last_seen")
        self._state_loaded = self._resume_pending = True
        self._recover_exports()

    def _recover_exports(self) -> None:
        """Main process: finish or undo the swap of best/ (and top_k/ entries) that a crash interrupted."""
        if not self.is_main_process or os.environ.get("RANK", "0") != "0":
            return
        try:
            exporting.recover_exports(self.output_dir / "best", self.output_dir / "top_k")
        except OSError as error:
            self._warn_loudly(f"could not recover an interrupted export in {self.output_dir}: {error}")

    def _reconcile_exports(self) -> None:
        """Main process, after a resume: best/ and top_k/ brought in line with the restored state (exporting.reconcile_exports)."""
        if not (self.export and self.is_main_process):
            return
        for message in exporting.reconcile_exports(
            self.output_dir / "best",
            self.output_dir / "top_k" if self.top_k > 1 else None,
            unit=self.unit,
            best_epoch=self.policy.best_epoch,
            top_k_epochs=self.top_k_epochs,
        ):
            self._warn_loudly(message)

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

