"""Saving and resuming a LoraMonitor: what joins a training checkpoint and what happens after a restart.

`Resume` is the part of LoraMonitor (lora_monitor/monitor.py) that saves its state (`state_dict`: the
policy, the top-k list, the spec's fingerprint, the last epoch or step seen), loads it back
(`load_state_dict`, which accelerate calls inside load_state once the monitor is attached), evaluates an
epoch that a checkpoint taken before its evaluation skipped (`on_resume`), warns about evaluations a resume
lost, and brings best/ and top_k/ in line with the restored state (lora_monitor.export's recover_exports
and reconcile_exports). Not a class to use alone: it reads the monitor's policy, spec and settings.
"""
from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from lora_monitor import export as exporting

if TYPE_CHECKING:
    from lora_monitor.evaluation import EpochReport

logger = logging.getLogger("lora_monitor")
STATE_VERSION = 1


class Resume:
    """LoraMonitor's state in checkpoints and its resumption."""

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
