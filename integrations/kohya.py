"""kohya-ss sd-scripts: the launcher that monitors a LoRA trainer's run (`launch`, `lora-monitor kohya`).

The launcher imports the user's sd-scripts checkout and the trainer script of the model family
(train_network.py, sdxl_train_network.py, sd3_train_network.py, flux_train_network.py,
lumina_train_network.py: kohya_names.KOHYA_TRAINERS), subclasses its most-derived trainer class
(NetworkTrainer, SdxlNetworkTrainer, Sd3NetworkTrainer, FluxNetworkTrainer, LuminaNetworkTrainer)
and overrides two hooks, whose arguments pass through as given (each family names them differently:
vae/ae, tokenizers/tokenizer, unet/mmdit/flux/lumina; they are found by position or name):
  - post_process_network: remembers the network object (for its set_multiplier and save_weights) and
    joins kohya's accelerator's save_state/load_state, before kohya prepares it and loads a --resume state;
  - sample_images: lets kohya render its samples as usual, then reads the PNGs it wrote for the
    epoch, scores them through a LoraMonitor, copies the best epoch's checkpoint to best/ and, when
    the policy says so, ends training (kohya has no stop flag, so a private exception leaves its
    loop after the trackers are finished; the launcher catches it and exits 0).
Nothing of sd-scripts is copied here: we call its own functions (setup_parser, the checkpoint
names, prepare_dtype) and follow the file names it writes (the same for every family: all keep
train_network.NetworkTrainer's training loop and its sampler's file names):
    <output_dir>/sample/<output_name>_e<epoch:06d>_<prompt:02d>_<YYYYmmddHHMMSS>[_<seed>].png
    <output_dir>/<output_name>-<epoch:06d>.safetensors   (the last epoch: <output_name>.safetensors)
    <output_dir>/<output_name>-<epoch:06d>-state/         (--save_state: accelerate's state folders)

Where the parts are:
    kohya.py            KohyaSession (one run: arguments, base renders, scoring, export, stop) and launch
    kohya_checkout.py   the checkout: choosing and importing the trainer script, parsing its arguments
    kohya_export.py     the best epoch's network file for best/, and kohya's final file in its place
    kohya_hooks.py      the trainer subclass, SampleCall (one sample_images call, made again with other arguments)
    kohya_prompts.py    prompt files: kohya's defaults, the rewrite with fixed seeds, the diversity check
    kohya_samples.py    reading kohya's samples, when it samples, the sentences printed per evaluation
    kohya_state.py      the monitor's state in kohya's state folders (--save_state, --resume)
The watcher (kohya_watch.py) shares the file contract; the names it and the tests use stay importable from here.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

from lora_monitor import distributed
from lora_monitor.integrations.kohya_checkout import (
    CHECKOUT_LAYOUT,
    Checkout,
    checkout_commit,
    choose_trainer,
    load_checkout,
    parse_trainer_args,
)
from lora_monitor.integrations.kohya_export import adopt_final_file, write_epoch_file
from lora_monitor.integrations.kohya_hooks import SAMPLE_IMAGES_HEAD, SampleCall, monitored_trainer_class, trackers_hidden
from lora_monitor.integrations.kohya_prompts import (
    KOHYA_PROMPT_DEFAULTS,
    OUR_ENTRY_KEYS,
    PROMPTS_STEM,
    check_seed_groups,
    fixed_seed_prompts,
    monitor_metrics,
    prompt_defaults,
    prompts_target,
)
from lora_monitor.integrations.kohya_samples import (
    BASE_DIR,
    CHECKPOINT_SUFFIXES,
    SAMPLE_DIR,
    UnreadableSampleError,
    decision_text,
    describe_base,
    images_in_order,
    read_sample,
    sample_point,
)
from lora_monitor.integrations.kohya_state import LAUNCHER_STATE, STATE_FILE, MonitorStates
from lora_monitor.kohya_names import (
    KOHYA_TRAINERS,
    FolderLock,
    SampleFile,
    check_output_name,
    group_by_epoch,
    last_checkpoint_name,
    list_samples,
)
from lora_monitor.monitor import LoraMonitor

__all__ = [
    "BASE_DIR", "CHECKOUT_LAYOUT", "CHECKPOINT_SUFFIXES", "KOHYA_PROMPT_DEFAULTS", "LAUNCHER_STATE", "OUR_ENTRY_KEYS",
    "PROMPTS_STEM", "SAMPLE_DIR", "SAMPLE_IMAGES_HEAD", "STATE_FILE", "Checkout", "KohyaSession", "SampleCall",
    "TrainingFailed", "TrainingStopped", "UnreadableSampleError", "check_seed_groups", "checkout_commit", "choose_trainer",
    "decision_text", "describe_base", "fixed_seed_prompts", "images_in_order", "last_epoch", "launch", "load_checkout",
    "monitor_metrics", "monitored_trainer_class", "network_preloaded", "parse_trainer_args", "prompt_defaults",
    "prompts_target", "read_sample", "sample_point",
]


class TrainingStopped(BaseException):
    """Leaves kohya's training loop when the monitor stops the run. A BaseException, so that no
    `except Exception` in the trainer swallows it; the launcher catches it."""

    def __init__(self, epoch: int, reason: str) -> None:
        super().__init__(reason)
        self.epoch = epoch
        self.reason = reason


class TrainingFailed(RuntimeError):
    """The trainer raised during training (kohya's own code or a hook of ours); its traceback has been printed."""


def network_preloaded(args: Any) -> bool:
    """Whether the network starts from saved weights (--network_weights, --dim_from_weights, or a --resume state):
    then kohya's samples before training show those weights, not the base model."""
    return bool(getattr(args, "network_weights", None) or getattr(args, "dim_from_weights", False) or getattr(args, "resume", None))


def last_epoch(args: Any, epoch: int, step: int) -> bool:
    """Whether `epoch` is the last of kohya's loop (its final file follows): by --max_train_epochs when given, as kohya's
    global_step counts the steps of this start only (a resumed run's from 0); else by --max_train_steps."""
    if getattr(args, "max_train_epochs", None) is not None:
        return epoch >= args.max_train_epochs
    return step >= args.max_train_steps


class KohyaSession:
    """The monitor's side of one kohya run: checks the arguments, fixes the seeds, scores samples, keeps the monitor's
    state in kohya's state folders (`states`, kohya_state.MonitorStates)."""

    def __init__(self, checkout: Checkout, monitor_options: Mapping[str, Any], *, preview_seed: int = 0, say: Callable[[str], None] = print) -> None:
        self.checkout = checkout
        self.monitor_options = dict(monitor_options)
        self.preview_seed = preview_seed
        self.say = say
        self.monitor: LoraMonitor | None = None
        self.states: MonitorStates | None = None
        self.network: Any = None
        self.args: Any = None
        self.current: tuple[int, int] | None = None  # (epoch, step) being exported
        self.started = False  # sample_images was called once (the accelerator is attached, the base is handled)
        self.saved_from_network: int | None = None  # the epoch whose best/ weights were saved through save_weights
        self.scored = False  # this start scored an epoch: what it wrote belongs to the record
        self.prompts_before: tuple[Path, bytes | None] | None = None  # the prompt file kohya reads, and what it held before this start
        self.lock: FolderLock | None = None
        self.main_rank = os.environ.get("RANK", "0") == "0"  # set by accelerate launch and torchrun; the Accelerator comes later
        self._said_base = False

    # -- before training
    def prepare(self, args) -> None:
        """Check kohya's arguments and build the monitor; raises ValueError before any model loads."""
        if not getattr(args, "output_dir", None):
            raise ValueError("give the trainer --output_dir: the monitor reads the samples kohya writes there")
        if not getattr(args, "sample_prompts", None):
            raise ValueError("the monitor scores kohya's own samples: give the trainer --sample_prompts FILE (.txt, .toml or .json)")
        if args.sample_every_n_epochs is None:
            if args.sample_every_n_steps is not None:
                raise ValueError("--sample_every_n_steps alone samples between epochs; the monitor scores epoch ends: add --sample_every_n_epochs N")
            args.sample_every_n_epochs = 1
            self.say("lora-monitor: no --sample_every_n_epochs given: kohya samples every epoch, and each epoch is scored")
        output_dir = Path(args.output_dir)
        if getattr(args, "output_name", None) is not None:
            check_output_name(args.output_name, "the trainer's --output_name")
        if self.main_rank:
            output_dir.mkdir(parents=True, exist_ok=True)
            self.lock = FolderLock(output_dir, "lora-monitor kohya", say=self.say).acquire()
        family = self.checkout.family
        target = prompts_target(args.sample_prompts, output_dir)
        self.prompts_before = (target, target.read_bytes() if target.is_file() else None)
        prompts, spec, changed = fixed_seed_prompts(args.sample_prompts, output_dir, self.preview_seed, defaults=prompt_defaults(family))
        if self.main_rank:
            for other in sorted(output_dir.glob(f"{PROMPTS_STEM}.*")):
                if other != prompts and other.suffix in (".txt", ".json") and other.is_file():
                    other.unlink()
                    self.say(f"lora-monitor: removed {other}, left by an earlier start from another prompt file; kohya reads {prompts}")
        trainer = KOHYA_TRAINERS.get(family) if family else None
        if trainer is not None and trainer.min_seed:
            low = [i for i, prompt in enumerate(spec.prompts) if prompt.seed < trainer.min_seed]
            if low:
                ours = [i for i in low if i in changed]
                fix = (f"give --preview-seed {trainer.min_seed} or more (prompts without --d get it + their index)" if ours
                       else f"give those prompts --d {trainer.min_seed} or more")
                raise ValueError(f"kohya's {trainer.family} sampler ({trainer.sampler}) refuses seeds below {trainer.min_seed}: "
                                 f"prompt(s) {low} of {args.sample_prompts} would get seed(s) {[spec.prompts[i].seed for i in low]}; {fix}")
        check_seed_groups(spec, monitor_metrics(self.monitor_options), args.sample_prompts)
        self.say(f"lora-monitor: kohya samples from {prompts} (your {args.sample_prompts} with a seed on every prompt)")
        if changed:
            seeds = ", ".join(f"{i}: {spec.prompts[i].seed}" for i in changed)
            self.say(f"lora-monitor: prompts without --d got fixed seeds ({seeds}); random seeds would make epochs incomparable")
        args.sample_prompts = str(prompts)
        options = dict(self.monitor_options)
        report_to = getattr(args, "log_with", None) or ("tensorboard" if getattr(args, "logging_dir", None) else None)  # kohya's rule
        if report_to and "listeners" not in options:
            from lora_monitor.integrations.trackers import listeners_for

            # through kohya's own accelerator and its trackers; W&B gets the WandbListener (scores, previews, table,
            # summary, the best artifact), which joins kohya's rows instead of logging at a step of its own
            options["listeners"] = listeners_for(report_to)
        self.monitor = LoraMonitor(spec=spec, output_dir=output_dir, write_weights=self._write_checkpoint, **options)
        self.args = args
        self.states = MonitorStates(self.monitor, args, self.checkout.train_util, main_rank=self.main_rank, say=self.say)
        resume = getattr(args, "resume", None)
        if resume and not getattr(args, "resume_from_huggingface", False) and Path(resume).is_dir():
            self.states.resume(Path(resume))  # before any model loads: a state that does not fit is an error now

    # -- the hooks
    def on_network(self, network: Any, accelerator: Any) -> None:
        """post_process_network: the network object, and kohya's accelerator before it prepares it and loads a --resume state."""
        self.network = network
        if accelerator is not None:
            self.states.hook(accelerator)

    def on_sample_images(self, call: SampleCall) -> Any:
        """One call of the trainer's sample_images: kohya samples (or not: it calls this at every step and decides
        inside), and at its sample points the new samples are read. The first call renders the base references,
        unless kohya's own --sample_at_first samples, rendered at this call with the network off, are them, and
        scores the epoch a resumed state was saved before (see _catch_up)."""
        args = call.args
        self.states.step = call.step
        first = not self.started
        if first:
            self.started = True
            self.states.hook(call.accelerator)  # a trainer that never called post_process_network: its later saves still carry the state
            if self.monitor.accelerator is None:
                self.monitor.attach(call.accelerator, checkpoint=False)  # its state travels in MonitorStates' file
        point = sample_point(args, call.epoch, call.step)
        base_from_first = first and point and call.epoch == 0 and self.monitor.needs_references and not network_preloaded(args)
        if first and self.monitor.needs_references and not base_from_first:
            self._render_base(call)
        if first and self.states.owed is not None:
            self._catch_up(call)
        if not point:  # kohya returns at once: nothing to look at
            return call.run()
        folder = Path(args.output_dir) / SAMPLE_DIR
        before = {s.path for s in list_samples(folder)}
        if base_from_first:
            with self._network_off():
                result = call.run()
            self._take_base(call.accelerator, folder, before, f"kohya's own --sample_at_first samples (network multiplier 0): {folder}")
            return result
        result = call.run()
        if call.epoch:  # None: a step sample point; 0: --sample_at_first, before any training
            self._after_samples(call.accelerator, args, call.epoch, call.step, before)
        return result

    def _catch_up(self, call: SampleCall) -> None:
        """The --resume state was saved at epoch E's end before E's samples were scored (the run stopped while kohya
        rendered them): its weights are E's, so kohya renders E's samples again now, before training goes on, and they
        are scored at E's step, as the uninterrupted run scored them."""
        owed, self.states.owed = self.states.owed, None
        self.say(f"lora-monitor: {self.states.loaded.name} was saved at the end of epoch {owed.epoch}, before its samples were "
                 "scored: kohya renders them again from the loaded weights")
        folder = Path(call.args.output_dir) / SAMPLE_DIR
        before = {s.path for s in list_samples(folder)}
        call.again(call.args, owed.epoch, owed.step)
        self._after_samples(call.accelerator, call.args, owed.epoch, owed.step, before)

    def _after_samples(self, accelerator: Any, args: Any, epoch: int, step: int, before: set[Path]) -> None:
        accelerator.wait_for_everyone()  # sampling is split between processes

        def score() -> str | None:  # rank 0 only; a failure there reaches every rank as an error instead of a hang
            samples = [s for s in list_samples(Path(args.output_dir) / SAMPLE_DIR, args.output_name) if s.epoch == epoch and s.path not in before]
            if samples:
                self._evaluate(epoch, step, samples)
            policy = self.monitor.policy
            return (policy.stop_reason or "the monitor's policy stopped the run") if policy.stopped_epoch == epoch else None

        stop_reason = distributed.broadcast_checked(score, what=f"scoring epoch {epoch}'s samples (read, scored and exported by rank 0)")
        if stop_reason is not None:
            if last_epoch(args, epoch, step):
                self.say("lora-monitor: (this was the last epoch anyway: kohya saves the final network as usual)")
                return
            self.monitor.close()  # listeners hand over what they hold, while the trackers are open
            accelerator.end_training()  # finish the trackers, as kohya would after its loop
            raise TrainingStopped(epoch, stop_reason)

    # -- internals
    @contextlib.contextmanager
    def _network_off(self):
        """The network's multiplier at 0 (the base model) inside the block, as it was afterwards."""
        network = self.network
        has_multiplier = network is not None and hasattr(network, "set_multiplier")
        if not has_multiplier:
            warnings.warn(
                "the network object has no set_multiplier (or post_process_network was not called): the base references "
                "are the network's samples before training, which are the base model only when it starts at zero "
                "(kohya's LoRA does: lora_up is zero-initialised; not with --network_weights)",
                RuntimeWarning,
                stacklevel=3,
            )
            yield
            return
        previous = getattr(network, "multiplier", 1.0)
        network.set_multiplier(0.0)
        try:
            yield
        finally:
            network.set_multiplier(previous)

    def _render_base(self, call: SampleCall) -> None:
        """kohya renders the same prompts and seeds with the network's multiplier at 0 (the base model):
        the trainer's own sample_images, called again with the arguments it was given, but args
        (output_dir under BASE_DIR, sample_at_first), epoch and step set for a step-0 sample."""
        base_args = copy.copy(call.args)
        base_args.output_dir = str(Path(call.args.output_dir) / BASE_DIR)
        base_args.sample_at_first = True
        folder = Path(base_args.output_dir) / SAMPLE_DIR
        before = {s.path for s in list_samples(folder)}
        with self._network_off(), trackers_hidden(call.accelerator):  # not kohya's samples: not logged as sample_<i>
            call.again(base_args, 0, 0)
        self._take_base(call.accelerator, folder, before, f"base references rendered by kohya with the network multiplier at 0: {folder}")

    def _take_base(self, accelerator, folder: Path, before: set[Path], source: str) -> None:
        """The new epoch-0 samples in `folder` become the base references (rank 0 reads them; a failure there ends every rank)."""
        accelerator.wait_for_everyone()

        def read() -> None:
            samples = [s for s in list_samples(folder, self.args.output_name) if s.epoch == 0 and s.path not in before]
            images = images_in_order(group_by_epoch(samples).get(0, {}), len(self.monitor.spec), f"base renders in {folder}")
            self.monitor.set_base_references(images)
            self.monitor.record.save_previews(None, images, [p.seed for p in self.monitor.spec.prompts])
            self.say(f"lora-monitor: {source}")

        distributed.broadcast_checked(read, what="reading the base renders (rank 0)")

    def _evaluate(self, epoch: int, step: int, samples: list[SampleFile]) -> None:
        history = self.monitor.policy.history
        if history and epoch <= history[-1].epoch:
            came = f" (its state came with {self.states.loaded})" if self.states.loaded is not None else ""
            raise ValueError(
                f"kohya is at epoch {epoch}, but the monitor has scored epochs up to {history[-1].epoch}{came}. A state saved after "
                "a --resume does this: kohya counts a resumed start's steps from 0, and its train_state.json sends the next resume "
                f"back. Resume from a state of the first start, or give sd-scripts --initial_epoch {history[-1].epoch + 1} with --resume"
            )
        where = f"epoch {epoch} samples in {samples[0].path.parent}"
        images = images_in_order(group_by_epoch(samples)[epoch], len(self.monitor.spec), where)
        self.current = (epoch, step)
        stopped_before = self.monitor.policy.stopped_epoch
        report = self.monitor.evaluate(epoch, images, step=step)
        self.scored = True
        if self.monitor.policy.base and not self._said_base:
            self._said_base = True
            self.say(f"lora-monitor: base model (LoRA off): {describe_base(self.monitor.policy)}")
        values = ", ".join(f"{name} {value:.4f}" for name, value in report.aggregates.items())
        text = decision_text(report, self.monitor.policy, stopped_before)
        self.say(f"lora-monitor: epoch {epoch}: {values}{'  (best)' if report.is_best else ''}; {text}")
        if report.exported is not None:
            self.say(f"lora-monitor: epoch {epoch} is the best so far: copied to {report.exported}")
        self.states.after_evaluation(epoch, step)

    def _write_checkpoint(self, folder: Path) -> None:
        """Fill an export folder with the epoch being exported (kohya_export.write_epoch_file)."""
        epoch, step = self.current
        saved = write_epoch_file(folder, self.args, self.checkout.train_util, self.network, epoch, step)
        self.saved_from_network = epoch if saved else None

    # -- after training
    def adopt_final_file(self) -> None:
        """When the best epoch is the last one, best/ takes kohya's final file (kohya_export.adopt_final_file)."""
        epoch = self.saved_from_network
        if epoch is None or epoch != self.monitor.policy.best_epoch or not self.main_rank:
            return
        if adopt_final_file(Path(self.args.output_dir) / "best", self.args, self.checkout.train_util, epoch, self.say):
            self.saved_from_network = None

    def clean_up(self, failed: bool) -> None:
        """Release the folder's lock; after a failed start that scored nothing, the prompt file it wrote is put back as it
        was before (removed when there was none), so nothing of that start is left to confuse the next."""
        if failed and not self.scored and self.main_rank and self.prompts_before is not None:
            target, before = self.prompts_before
            if before is None:
                target.unlink(missing_ok=True)
            else:
                temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
                try:
                    temporary.write_bytes(before)
                    os.replace(temporary, target)
                finally:
                    temporary.unlink(missing_ok=True)
        if self.lock is not None:
            self.lock.release()
            self.lock = None



def launch(
    sd_scripts: str | os.PathLike,
    trainer_args: list[str],
    *,
    script: str | None = None,
    family: str | None = None,
    monitor_options: Mapping[str, Any] | None = None,
    preview_seed: int | None = None,
    say: Callable[[str], None] = print,
) -> int:
    """Run the trainer script of the checkout with `trainer_args`, as its own __main__ would, with the
    monitor attached. `family` (a KOHYA_TRAINERS key: sd, sdxl, sd3, flux, lumina) picks the script;
    `script` names one explicitly (its family is known by its name or its trainer class); neither:
    train_network.py. `preview_seed` None: the smallest seed the family's sampler takes (0; Lumina: 1).
    Returns 0 after a full run or an early stop by the policy. An error inside training prints its
    traceback and raises TrainingFailed; the trainer's own argument errors exit as its parser does."""
    script, family = choose_trainer(family, script)
    checkout = load_checkout(sd_scripts, script, family)
    if preview_seed is None:
        trainer_info = KOHYA_TRAINERS.get(checkout.family) if checkout.family else None
        preview_seed = trainer_info.min_seed if trainer_info else 0
    saved_argv = sys.argv
    sys.argv = [str(checkout.root / script), *trainer_args]  # sd-scripts inspects the command line
    session: KohyaSession | None = None
    failed = True
    try:
        args = parse_trainer_args(checkout, trainer_args)
        session = KohyaSession(checkout, monitor_options or {}, preview_seed=preview_seed, say=say)
        session.prepare(args)
        trainer = monitored_trainer_class(checkout.trainer_class, session)()
        family_text = f"family {checkout.family}" if checkout.family else "family unknown: kohya's SD sampler defaults assumed for the prompts"
        say(f"lora-monitor: training with {checkout.root / script} ({checkout.trainer_class.__name__}, {family_text})")
        try:
            trainer.train(args)
        except TrainingStopped as stop:  # the monitor was closed before kohya's trackers were
            reason = stop.reason.removeprefix(f"Stopping at epoch {stop.epoch}: ")  # the policy's sentence starts so too
            say(f"lora-monitor: stopped early after epoch {stop.epoch}: {reason}")
            say(f"lora-monitor: trackers finished; kohya's final {last_checkpoint_name(args.output_name, '.' + args.save_model_as)} is not written")
        except Exception as error:
            traceback.print_exc(file=sys.stderr)
            raise TrainingFailed(f"{script} failed during training: {type(error).__name__}: {error} (its traceback is above)") from error
        else:
            session.monitor.close()
            session.adopt_final_file()
            policy = session.monitor.policy
            say(f"lora-monitor: training finished; {policy.stop_reason or f'best epoch by {policy.metric}: {policy.best_epoch}'}")
        best = Path(args.output_dir) / "best"
        if session.monitor.best_epoch is not None:
            say(f"lora-monitor: best epoch {session.monitor.best_epoch}: {best} ; scores: {session.monitor.record.scores_path}")
        failed = False
        return 0
    finally:
        if session is not None:
            session.clean_up(failed)
        sys.argv = saved_argv
