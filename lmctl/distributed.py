"""Processes started by torchrun, in one place for every stage: which rank this is, how many
there are, which device it uses, and the few collectives lmctl needs.

torchrun (`python -m torch.distributed.run`) starts the processes and sets `RANK`,
`WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT`; torch.distributed does the
rendezvous and the collectives. What is left, and lives here instead of in each stage:
reading that environment once (a process started without torchrun is rank 0 of 1 and never
touches torch.distributed), choosing the backend and device (NCCL on `cuda:LOCAL_RANK`
where CUDA is available, gloo on CPU), a timeout lmctl states (`LMCTL_DIST_TIMEOUT`), and
turning a rendezvous or collective that does not complete into one lmctl error line
(`UnavailableError`, exit 5: the other processes did not come, nothing is wrong with the
command) instead of a hang or a C++ stack. docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from lmctl.clock import seconds_from_env
from lmctl.errors import BadInputError, UnavailableError

TIMEOUT_ENV = "LMCTL_DIST_TIMEOUT"
# torch's own default for gloo. It bounds every wait, including a fast rank waiting at a
# collective for the slowest one to finish its share, so it must exceed that difference.
DEFAULT_TIMEOUT_S = 1800.0
T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place among the processes torchrun started; `World()` is one process
    alone, whose collectives are no-ops, so callers that may be sharded need no branches."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_rank0(self) -> bool:
        """The one process that writes files and prints results."""
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether item `index` of a sequence every rank walks in the same order is this rank's."""
        return index % self.world_size == self.rank

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj` (picklable), in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        with _peers("all_gather_object", self.world_size):
            dist.all_gather_object(gathered, obj)
        return gathered

    def from_rank0(self, obj: T | None) -> T:
        """Rank 0's `obj` (picklable), on every rank; the other ranks pass None."""
        if self.world_size == 1:
            assert obj is not None
            return obj
        import torch.distributed as dist

        box: list[Any] = [obj]
        with _peers("broadcast_object_list", self.world_size):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def in_order(self, mine: list[tuple[int, T]]) -> list[tuple[int, T]]:
        """Every rank's (index, item) pairs of the items it `owns`, merged in index order."""
        if self.world_size == 1:
            return mine
        return sorted((pair for part in self.all_gather(mine) for pair in part), key=lambda pair: pair[0])

    def barrier(self) -> None:
        """Wait until every rank is here."""
        if self.world_size == 1:
            return
        import torch.distributed as dist

        with _peers("barrier", self.world_size):
            dist.barrier()

    @contextlib.contextmanager
    def rank0_first(self, local: bool = False) -> Iterator[None]:
        """Rank 0 runs the block first (it fills a cache or downloads), the other ranks then
        run it and find the work done, as `accelerate`'s `main_process_first`. With `local`,
        the first process of each node goes first instead (`local_main_process_first`): for
        work whose result lives on the node's own disk, such as the tokenization cache under
        a node-local LMCTL_HOME."""
        first = self.local_rank == 0 if local else self.is_rank0
        if not first:
            self.barrier()
        yield
        if first:
            self.barrier()


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    try:
        return int(raw) if raw not in (None, "") else default
    except ValueError:
        raise BadInputError(f"{name}={raw!r}: expected an integer (set by torchrun)") from None


def env_rank() -> int:
    """This process's rank from torchrun's environment (0 without torchrun, or when RANK is unreadable:
    `world()` is where a malformed environment is refused)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def world() -> World:
    """Rank, world size and local rank from torchrun's environment."""
    found = World(rank=_env_int("RANK", 0), world_size=_env_int("WORLD_SIZE", 1), local_rank=_env_int("LOCAL_RANK", 0))
    if found.world_size < 1 or not 0 <= found.rank < found.world_size:
        raise BadInputError(f"RANK={found.rank} WORLD_SIZE={found.world_size}: expected 0 <= RANK < WORLD_SIZE")
    return found


def launched() -> bool:
    """Whether torchrun started this process: it sets LOCAL_RANK, also for a job of one process."""
    return "LOCAL_RANK" in os.environ


def restart_count() -> int:
    """How often torchrun (--max-restarts) has restarted this job's workers: 0 on the first attempt."""
    return _env_int("TORCHELASTIC_RESTART_COUNT", 0)


def timeout_s() -> float:
    """How long a rendezvous or collective may wait for the other processes."""
    return seconds_from_env(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


def choose_device(cuda_available: bool, local_rank: int) -> str:
    """Where a process computes: `cuda:LOCAL_RANK` where CUDA is available, else the CPU. One
    decision for training's processes, eval and serve (a process torchrun did not start is
    local rank 0)."""
    return f"cuda:{local_rank}" if cuda_available else "cpu"


def device() -> Any:
    """The torch device of this process (`choose_device` for this machine and LOCAL_RANK)."""
    import torch

    return torch.device(choose_device(torch.cuda.is_available(), world().local_rank))


def synchronized_now(on: Any) -> float:
    """`time.perf_counter()` once the work queued on device `on` has finished: CUDA runs
    asynchronously, so a host clock read without a synchronize times the launches, not the work."""
    import time

    import torch

    if torch.device(on).type == "cuda":
        torch.cuda.synchronize(on)
    return time.perf_counter()


@contextlib.contextmanager
def _peers(what: str, size: int) -> Iterator[None]:
    """A rendezvous or collective that fails or times out becomes UnavailableError (exit 5).

    torch raises DistError subclasses from the rendezvous and a plain RuntimeError from a
    gloo collective that timed out or lost its peer; either way the other processes did
    not do their part, which is what the one line says."""
    try:
        yield
    except RuntimeError as exc:  # DistError (DistStoreError, DistNetworkError, DistBackendError) included
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UnavailableError(
            f"torch.distributed {what} did not complete: {type(exc).__name__}: {first}",
            hint=f"every one of the {size} processes must start and reach the same point within "
                 f"{TIMEOUT_ENV}={timeout_s():g} s; see the other ranks' errors") from None


@contextlib.contextmanager
def process_group() -> Iterator[World]:
    """Join the other processes when torchrun started several (WORLD_SIZE > 1), and leave at exit.

    Leaving explicitly matters: a gloo group torn down by the interpreter after a failed
    collective aborts the process (SIGABRT), which would hide lmctl's exit code."""
    here = world()
    if here.world_size == 1:
        yield here
        return
    import datetime

    import torch
    import torch.distributed as dist

    timeout = datetime.timedelta(seconds=timeout_s())
    cuda = torch.cuda.is_available()
    if cuda:
        if here.local_rank >= torch.cuda.device_count():
            raise BadInputError(f"LOCAL_RANK={here.local_rank} but {torch.cuda.device_count()} CUDA device(s) are "
                                "visible: start at most that many processes per node (torchrun --nproc-per-node)")
        torch.cuda.set_device(here.local_rank)  # NCCL's object collectives use the current device
    with _peers("rendezvous", here.world_size):
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout,
                                device_id=device() if cuda else None)
    try:
        yield here
    finally:
        dist.destroy_process_group()
