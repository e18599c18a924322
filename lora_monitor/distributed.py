"""Several processes (accelerate launch, torchrun): split the previews, gather them, one decision.

Each rank renders its share of the previews (`shard_indices`) with the same per-image seeds a
single process uses, so the gathered images equal a one-process render. The main process (rank 0)
decides, records and exports; the decision reaches every rank so all stop at the same epoch.

Every collective here carries a status with its payload: a rank whose work raised sends its error
instead of its result, and then every rank raises `RankFailedError` naming the failed rank, so no
rank waits forever for a peer that gave up.

Before an evaluation's collectives every rank checks in (`check_in`) through the process group's
key-value store, not a collective: a rank that never comes (the loop calls the monitor inside
`if accelerator.is_main_process:`) or comes for another epoch makes the others raise
`RanksOutOfStepError` after a bounded wait, instead of hanging in the gathers.

What this cannot catch at once: a rank that dies (killed, out of memory, a crash in native code) or
hangs before it reaches the collective. The others then wait for the check-in's timeout, or, inside a
collective, in torch.distributed until its own timeout (30 minutes by default for gloo; set it with
accelerate's InitProcessGroupKwargs(timeout=...) or torch.distributed.init_process_group(timeout=...)).
accelerate launch and torchrun usually end the whole group as soon as one process exits with an error,
which is sooner.

The payloads are picklable Python objects holding CPU tensors (torch.distributed's
all_gather_object / broadcast_object_list), so this works on gloo and on NCCL.
"""
from __future__ import annotations

import itertools
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence, TypeVar

import torch

from lora_monitor.spec import PreviewSpec

__all__ = [
    "RankFailedError",
    "RanksOutOfStepError",
    "all_gather_checked",
    "assemble",
    "broadcast_checked",
    "check_in",
    "gather_images",
    "rank_and_world_size",
    "shard_indices",
]

T = TypeVar("T")


class RankFailedError(RuntimeError):
    """Raised on every rank when the work before a collective failed on one or more ranks.

    `errors` maps each failed rank to its error text ("ValueError: ..."). On a failed rank the
    original exception is chained as `__cause__`.
    """

    def __init__(self, what: str, errors: dict[int, str], world_size: int) -> None:
        self.errors = dict(errors)
        self.world_size = world_size
        ranks = sorted(errors)
        if len(ranks) == 1:
            message = f"{what} failed on rank {ranks[0]} of {world_size}: {errors[ranks[0]]}. Every rank raises this error rather than wait for rank {ranks[0]}"
        else:
            details = "; ".join(f"rank {rank}: {errors[rank]}" for rank in ranks)
            message = f"{what} failed on ranks {', '.join(map(str, ranks))} of {world_size} ({details}). Every rank raises this error rather than wait for them"
        super().__init__(message)

    @property
    def ranks(self) -> list[int]:
        return sorted(self.errors)


class RanksOutOfStepError(RuntimeError):
    """The ranks did not all reach the same evaluation: one never came within the timeout, or they came
    for different epochs. Raised by `check_in` before any collective, so nobody hangs in one."""


@dataclass
class _Outcome:
    """What a rank sends: its result, or the text of its error."""

    rank: int
    ok: bool
    value: Any = None
    error: str = ""


def rank_and_world_size(accelerator=None) -> tuple[int, int]:
    """(this process's rank, number of processes): from the Accelerator when one is given, else from
    torch.distributed when it is initialised (torchrun without accelerate), else (0, 1)."""
    if accelerator is not None:
        world_size = int(accelerator.num_processes)
        if world_size > 1 and not _initialised():
            raise RuntimeError(
                f"the Accelerator runs {world_size} processes but torch.distributed is not initialised; "
                "lora-monitor gathers previews with torch.distributed (CPU/CUDA launches by accelerate or torchrun)"
            )
        return int(accelerator.process_index), world_size
    if _initialised():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _initialised() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def shard_indices(spec: PreviewSpec, rank: int, world_size: int) -> list[int]:
    """The preview indices rank `rank` renders, in spec order.

    Prompts that render together (same size, steps and guidance: `spec.batches`) are split into
    contiguous, balanced runs, so each rank's batches stay full; the rank that takes the one extra
    prompt of an uneven group rotates from group to group, so no rank collects every remainder.
    Every index goes to exactly one rank; a rank may get none when there are fewer prompts than ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in 0..{world_size - 1}, got {rank}")
    mine: list[int] = []
    first_extra = 0  # the rank that gets the first of this group's extra prompts
    for group in spec.batches(max(len(spec), 1)):
        base, extra = divmod(len(group), world_size)
        sizes = [base + ((r - first_extra) % world_size < extra) for r in range(world_size)]
        start = sum(sizes[:rank])
        mine.extend(group[start:start + sizes[rank]])
        first_extra = (first_extra + extra) % world_size
    return sorted(mine)


def all_gather_checked(work: Callable[[], T], *, what: str) -> list[T]:
    """Run `work()` on every rank and gather its results on every rank (a list indexed by rank).

    If `work` raises on any rank, every rank raises RankFailedError naming that rank (the failed
    rank chains its own exception). Exceptions that are not `Exception` (KeyboardInterrupt,
    SystemExit) propagate at once and leave the others to torch.distributed's timeout.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:  # nobody to tell: the error stays what it is
        return [work()]
    local_error: BaseException | None = None
    try:
        outcome = _Outcome(rank, True, value=work())
    except Exception as error:
        local_error = error
        outcome = _Outcome(rank, False, error=_describe(error))
    outcomes = [None] * world_size
    torch.distributed.all_gather_object(outcomes, outcome)
    errors = {o.rank: o.error for o in outcomes if not o.ok}
    if errors:
        raise RankFailedError(what, errors, world_size) from local_error
    return [o.value for o in outcomes]


def broadcast_checked(work: Callable[[], T], *, what: str, src: int = 0) -> T:
    """Run `work()` on rank `src` only and give its result to every rank.

    If it raises, rank `src` re-raises its exception after telling the others, which raise
    RankFailedError naming rank `src`: nobody waits for a result that will never come.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return work()
    local_error: BaseException | None = None
    message: list[Any] = [None]
    if rank == src:
        try:
            message[0] = _Outcome(rank, True, value=work())
        except Exception as error:
            local_error = error
            message[0] = _Outcome(rank, False, error=_describe(error))
    torch.distributed.broadcast_object_list(message, src=src)
    outcome: _Outcome = message[0]
    if local_error is not None:
        raise local_error
    if not outcome.ok:
        raise RankFailedError(what, {outcome.rank: outcome.error}, world_size)
    return outcome.value


_check_ins = itertools.count(1)  # the n-th check-in of this process: the same sequence on every rank


def check_in(what: str, *, timeout_s: float, hint: str = "") -> None:
    """Make sure every rank has reached this same point (`what`, e.g. "epoch 3's evaluation") before the
    collectives that follow; a no-op with one process.

    Each rank writes its `what` under the n-th check-in's keys of the process group's store and waits at
    most `timeout_s` seconds for the others (a few store operations, no collective: a rank busy in a
    training collective cannot be confused by it). A rank that does not come in time, or ranks that
    came for different things, make this raise RanksOutOfStepError naming them, followed by `hint`.
    """
    rank, world_size = rank_and_world_size()
    if world_size == 1:
        return
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()
    prefix = f"lora_monitor/check_in/{next(_check_ins)}"
    keys = [f"{prefix}/rank{r}" for r in range(world_size)]
    store.set(keys[rank], what)
    if store.add(f"{prefix}/count", 1) == world_size:
        store.set(f"{prefix}/all", "1")
    try:
        store.wait([f"{prefix}/all"], timedelta(seconds=timeout_s))
    except RuntimeError:  # DistStoreError: the wait timed out
        absent = [r for r in range(world_size) if not store.check([keys[r]])]
        late = ", ".join(map(str, absent))
        message = f"rank {rank} of {world_size} reached {what}, but rank(s) {late} did not within {timeout_s:g} s. {hint}"
        raise RanksOutOfStepError(message.rstrip()) from None
    values = store.multi_get(keys) if store.has_extended_api() else [store.get(key) for key in keys]
    seen = {r: value.decode() for r, value in enumerate(values)}
    if len(set(seen.values())) > 1:
        details = "; ".join(f"rank {r}: {value}" for r, value in seen.items())
        raise RanksOutOfStepError(f"the ranks reached different evaluations ({details}). {hint}".rstrip())


def assemble(shards: Sequence[tuple[Sequence[int], Sequence[T]]], count: int) -> list[T]:
    """Put per-rank (indices, values) pairs back into one list of `count` values in spec order.

    Every index in 0..count-1 must come exactly once; the error names the missing or repeated ones.
    """
    values: dict[int, T] = {}
    repeated: set[int] = set()
    for rank, (indices, items) in enumerate(shards):
        indices = list(indices)
        items = list(items)
        if len(indices) != len(items):
            raise ValueError(f"rank {rank} sent {len(items)} values for {len(indices)} preview indices")
        for index, item in zip(indices, items):
            if not 0 <= index < count:
                raise ValueError(f"rank {rank} sent preview index {index}; the spec has {count} prompts (0..{count - 1})")
            if index in values:
                repeated.add(index)
            values[index] = item
    missing = [index for index in range(count) if index not in values]
    if repeated or missing:
        raise ValueError(
            f"the ranks' preview shards do not cover the spec once: missing {missing}, sent more than once {sorted(repeated)}"
        )
    return [values[index] for index in range(count)]


def gather_images(
    indices: Sequence[int],
    images: Sequence[torch.Tensor] | Callable[[], Sequence[torch.Tensor]],
    count: int,
    *,
    what: str = "gathering the previews",
) -> list[torch.Tensor]:
    """Every rank's share of the previews, on every rank, as one list of `count` (3, H, W) CPU float
    tensors in spec order. `images` holds this rank's renders for `indices` (or a function that
    renders them, so that a failure there reaches the other ranks as RankFailedError).

    For trainers that split their own sampling across ranks (kohya): pass what this rank rendered,
    e.g. to set the base references with `monitor.set_base_references(gather_images(...))`.
    """
    indices = [int(index) for index in indices]

    def local() -> tuple[list[int], list[torch.Tensor]]:
        rendered = list(images() if callable(images) else images)
        if len(rendered) != len(indices):
            raise ValueError(f"got {len(rendered)} images for {len(indices)} preview indices {indices}")
        return indices, [image.detach().float().cpu() for image in rendered]

    return assemble(all_gather_checked(local, what=what), count)


def _describe(error: BaseException) -> str:
    """One line: the exception type, its message and where it was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"
