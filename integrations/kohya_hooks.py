"""The launcher's hooks in kohya's trainer: a subclass of its trainer class whose post_process_network and
sample_images feed a KohyaSession, and `SampleCall`, one call of sample_images as kohya made it (found by
position or by each family's own parameter names) that can be made again with other arguments.
"""
from __future__ import annotations

import contextlib
import inspect
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

if TYPE_CHECKING:
    from lora_monitor.integrations.kohya import KohyaSession

#: The leading parameters of every trainer's sample_images, by position (their names as in train_network.py).
SAMPLE_IMAGES_HEAD = ("accelerator", "args", "epoch", "global_step")


def _positional_names(method: Callable[..., Any]) -> list[str]:
    """The names of a callable's leading positional parameters (up to a *args or keyword-only one)."""
    try:
        parameters = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - a builtin or C callable
        return []
    names: list[str] = []
    for parameter in parameters:
        if parameter.kind not in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            break
        names.append(parameter.name)
    return names


class SampleCall:
    """One call of a trainer's sample_images, as kohya made it: its accelerator, args, epoch and step
    found by position or, when passed by keyword, by the names in that trainer's own signature
    (every sd-scripts trainer has them first: (accelerator, args, epoch, global_step, device, vae|ae,
    tokenizer(s), text_encoder, unet|mmdit|flux|lumina)); `again` calls it anew with other args,
    epoch and step and the rest as given."""

    def __init__(self, method: Callable[..., Any], arguments: tuple, keywords: Mapping[str, Any]) -> None:
        self.method = method
        self.arguments = tuple(arguments)
        self.keywords = dict(keywords)
        names = _positional_names(method)
        self.names = [names[i] if i < len(names) else None for i in range(len(SAMPLE_IMAGES_HEAD))]
        values = []
        for position, (name, meaning) in enumerate(zip(self.names, SAMPLE_IMAGES_HEAD)):
            if position < len(self.arguments):
                values.append(self.arguments[position])
            elif name is not None and name in self.keywords:
                values.append(self.keywords[name])
            else:
                where = getattr(method, "__qualname__", repr(method))
                raise TypeError(f"{where} was called without its {meaning} argument (parameter {position + 1}, "
                                f"{name or 'unnamed'}): not a call the kohya launcher knows")
        self.accelerator, self.args, self.epoch, self.step = values

    def again(self, args: Any, epoch: int | None, step: int) -> Any:
        arguments, keywords = list(self.arguments), dict(self.keywords)
        for position, value in ((1, args), (2, epoch), (3, step)):
            if position < len(arguments):
                arguments[position] = value
            else:
                keywords[self.names[position]] = value
        return self.method(*arguments, **keywords)

    def run(self) -> Any:
        """The call as kohya made it."""
        return self.method(*self.arguments, **self.keywords)


def monitored_trainer_class(base: type, session: KohyaSession) -> type:
    """A subclass of kohya's trainer whose hooks feed `session`: post_process_network (called before kohya's
    accelerator.prepare and load_state) gives it the network and the accelerator, sample_images each call.
    Hook arguments pass through as given; the ones the session needs are found by position or, passed by
    keyword, by the names in the trainer's own signature (they differ between families and sd-scripts versions)."""

    class MonitoredTrainer(base):  # type: ignore[misc, valid-type]
        def post_process_network(self, *arguments, **keywords):
            method = super().post_process_network
            result = method(*arguments, **keywords)
            names = _positional_names(method)  # (args, accelerator, network, text_encoders, unet)
            accelerator, network = (arguments[i] if len(arguments) > i else keywords.get(names[i] if len(names) > i else default)
                                    for i, default in ((1, "accelerator"), (2, "network")))
            session.on_network(network, accelerator)
            return result

        def sample_images(self, *arguments, **keywords):
            return session.on_sample_images(SampleCall(super().sample_images, arguments, keywords))

    MonitoredTrainer.__name__ = MonitoredTrainer.__qualname__ = f"Monitored{base.__name__}"
    return MonitoredTrainer



@contextlib.contextmanager
def trackers_hidden(accelerator: Any) -> Iterator[None]:
    """kohya's samplers send every sample to W&B (train_util.sample_image_inference: `sample_<i>` when "wandb" is among
    accelerator.trackers); inside this block the accelerator shows no tracker, so a render of the launcher's own
    (the base, LoRA off) is not logged as kohya's samples."""
    trackers = getattr(accelerator, "trackers", None)
    if not trackers:
        yield
        return
    accelerator.trackers = []
    try:
        yield
    finally:
        accelerator.trackers = trackers
