"""`lmctl train CONFIG --nproc-per-node M [--nnodes N ...]`: torchrun's own launcher, in process.

torch.distributed.run (torchrun) does the work: the c10d rendezvous of the nodes, starting M
workers per node, each running `python -m lmctl train CONFIG ...` unchanged, and restarting
all of them after a failure (`--max-restarts`). This module only turns lmctl's flags into
torchrun's arguments and torchrun's failures into lmctl's exit codes:

- a rendezvous that does not complete within `--rdzv-timeout` (torchrun's c10d `join_timeout`,
  set explicitly) is one line on stderr and exit 5, not a stack from the launcher;
- a worker that failed hands the launcher its exit code (a bad config stays exit 2), so a
  scheduler reads the same codes as from a single process. docs/distributed.md.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from lmctl.errors import BadInputError, LmctlError, UnavailableError

log = logging.getLogger("lmctl.train")
RDZV_PORT = 29400  # torchrun's default port for an endpoint given without one
# torchrun shares its rendezvous store with the workers by default, and workers restarted by
# --max-restarts then read the previous attempt's addresses and fail (pytorch#135712, #167288)
SHARE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


@dataclass(frozen=True)
class Launch:
    """Where the workers of one training job run: torchrun's terms, checked."""

    nproc_per_node: int
    nnodes: str  # "N", or "MIN:MAX" for an elastic job
    rdzv_endpoint: str | None  # HOST[:PORT] of the c10d rendezvous, the same on every node
    rdzv_id: str
    rdzv_timeout: float  # torchrun's c10d join_timeout, always set explicitly
    max_restarts: int

    def __post_init__(self) -> None:
        if self.nproc_per_node < 1:
            raise BadInputError(f"--nproc-per-node {self.nproc_per_node}: expected at least 1")
        if self.max_restarts < 0 or not self.rdzv_timeout > 0:
            raise BadInputError("--max-restarts must be >= 0 and --rdzv-timeout > 0")
        low, _, high = self.nnodes.partition(":")
        if not (low.isdigit() and int(low) >= 1 and (not high or high.isdigit() and int(high) >= int(low))):
            raise BadInputError(f"--nnodes {self.nnodes!r}: expected N or MIN:MAX node counts")
        if self.several_nodes and not self.rdzv_endpoint:
            raise BadInputError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT",
                                hint="the same address on every node: a host every node reaches, e.g. node 0")

    @property
    def several_nodes(self) -> bool:
        return self.nnodes.rpartition(":")[2] != "1"

    @property
    def endpoint(self) -> str:
        if not self.rdzv_endpoint:
            return "this host"
        return self.rdzv_endpoint if ":" in self.rdzv_endpoint else f"{self.rdzv_endpoint}:{RDZV_PORT}"

    def torchrun_args(self, worker_args: list[str]) -> list[str]:
        """torchrun's command line for `python -m lmctl train WORKER_ARGS` on this node."""
        args = [f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc_per_node}",
                f"--max-restarts={self.max_restarts}", f"--rdzv-conf=join_timeout={self.rdzv_timeout:g}"]
        if self.rdzv_endpoint:
            args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={self.rdzv_id}"]
        else:  # one node: torchrun's --standalone picks a free port on localhost
            args.append("--standalone")
        return [*args, "-m", "lmctl", "train", *worker_args]


def launch(job: Launch, worker_args: list[str]) -> None:
    """Run the job's workers on this node through torchrun; returns when they all succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    argv = job.torchrun_args(worker_args)
    log.debug("torchrun %s", " ".join(argv))
    # torchrun shares its rendezvous TCPStore with the workers by default, and workers it
    # restarts then read the previous attempt's addresses from it and cannot connect (measured
    # here with gloo; pytorch issues 135712 and 167288 report it with NCCL). With sharing off,
    # rank 0 of each attempt hosts a fresh store. A user's own setting wins.
    os.environ.setdefault(SHARE_STORE_ENV, "1")
    try:
        run(parse_args(argv))  # run(), not main(): main's @record would print a second report
    except RendezvousError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnavailableError(
            f"rendezvous '{job.rdzv_id}' at {job.endpoint} did not complete within {job.rdzv_timeout:g} s: {first}",
            hint=f"start the same command on all {job.nnodes} nodes; --rdzv-timeout sets the wait") from None
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if failure.exitcode > 0:  # an lmctl worker: it printed its own error line; keep its code
            raise _WorkerFailed(failure.exitcode) from None
        raise LmctlError(f"training worker rank {rank} (pid {failure.pid}) died from signal {failure.signal_name()}"
                         + (f" after {job.max_restarts} restart(s)" if job.max_restarts else ""),
                         hint="see its stderr above; --max-restarts restarts all workers from the newest "
                              "sealed checkpoint") from None


class _WorkerFailed(LmctlError):
    """A worker exited with an lmctl exit code and said why on its stderr: the launcher exits with that code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"a training worker exited with code {code} (its error is above)")
        self.exit_code = code
