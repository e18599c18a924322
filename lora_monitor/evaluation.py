"""One evaluation of a LoraMonitor: render, score, decide, record and export, on one process or several.

Holds what an evaluation produces (`EpochReport`, `RecordWriteError`), the `Listener` protocol that hears
about it, `quantize` (previews rounded to the 8 bits a PNG keeps) and `Evaluation`, the part of
LoraMonitor that runs an evaluation: `score`, `evaluate`, `evaluate_shard` and the path every evaluation
takes, `_evaluate_shards` (each process renders and scores its share, the main process decides).

`Evaluation` is a part of LoraMonitor (lora_monitor/monitor.py), not a class to use alone: it reads the
monitor's spec, renderer, scorers, policy, record and settings.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence

import torch

from lora_monitor import distributed
from lora_monitor import export as exporting
from lora_monitor.policy import VALIDATION_METRIC, Decision
from lora_monitor.render import PreviewOutOfMemoryError, empty_device_cache, preserved_rng_state
from lora_monitor.scoring import score_images
from lora_monitor.scoring.scorers import score_sets

if TYPE_CHECKING:
    from lora_monitor.monitor import LoraMonitor

logger = logging.getLogger("lora_monitor")


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


class Evaluation:
    """LoraMonitor's evaluations: scoring, the checks on images given from outside, the gathering of the
    processes' shares, the decision and what is written after it (previews, best/ and top_k/, the score line)."""

    # ----------------------------------------------------------------- scoring
    def score(
        self, images: Sequence[torch.Tensor], references: Sequence[torch.Tensor] | None, indices: Sequence[int] | None = None
    ) -> dict[str, list[float]]:
        """Every scorer on every image (rounded to 8 bits, as saved); a failing scorer gives NaN and one warning.
        The random states are put back afterwards: a scorer that seeds or draws cannot change training."""
        with preserved_rng_state():
            prompts = [self.spec.prompts[i].prompt for i in (range(len(images)) if indices is None else indices)]
            return score_images(
                self.scorers, [quantize(image) for image in images], references, warn=self._warn_once, prompts=prompts,
                device=self.scoring_device,
            )

    @property
    def scoring_device(self) -> torch.device | None:
        """Where previews are scored: the denoiser's device, read at each evaluation (a loop may move the model after
        building the monitor); None, where the images are, for a monitor without a model. On a GPU this matters:
        an H200 rendered 4 previews of 1024 px with a Flux-width model in 2.2 s, and SSIM alone took 0.9 s more on
        the CPU."""
        return self.renderer.denoiser.device if self.renderer is not None else None

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

    # ----------------------------------------------------------------- the ways in
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

    # ----------------------------------------------------------------- checks
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

    def _warn_non_finite(self, epoch: int, images: Sequence[torch.Tensor]) -> None:
        broken = [i for i, image in enumerate(images) if not torch.isfinite(image).all()]
        if broken:
            self._warn_once(
                "non-finite",
                f"{self.unit} {epoch}: preview(s) {broken} contain NaN or inf values (has training diverged?); they score as the worst",
            )

    # ----------------------------------------------------------------- one or several processes
    def _share(self) -> list[int]:
        """The spec indices this process renders (all of them with one process)."""
        return distributed.shard_indices(self.spec, *distributed.rank_and_world_size(self.accelerator))

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

    # ----------------------------------------------------------------- decide and publish
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

    @staticmethod
    def _report_fields(report: EpochReport) -> dict[str, Any]:
        """What the sidecar and the scores line both say about an evaluation."""
        return {"epoch": report.epoch, "unit": report.unit, "step": report.step, "scores": report.scores, "aggregates": report.aggregates}

    def sidecar(self, report: EpochReport) -> dict[str, Any]:
        return {
            **self._report_fields(report),
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
            **self._report_fields(report),
            "is_best": report.is_best,
            "best_epoch": report.decision.best_epoch,
            "best_value": report.decision.best_value,
            "should_stop": report.should_stop,
            "reason": report.decision.reason,
            "previews": [str(p.relative_to(self.output_dir)) for p in report.preview_paths],
            "spec_fingerprint": self.spec.fingerprint(),
        }
