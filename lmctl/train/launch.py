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

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lmctl.errors import LmctlError, UnavailableError

log = logging.getLogger("lmctl.train")
RDZV_PORT = 29400  # torchrun's default port for an endpoint given without one
# torchrun shares its rendezvous store with the workers by default, and workers restarted by
# --max-restarts then read the previous attempt's addresses and fail (pytorch#135712, #167288)
SHARE_STORE_ENV = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


class LaunchOptions(BaseModel):
    """Where the workers of one training job run, in torchrun's terms; each field is a flag of
    `lmctl train` (cli/fields.py), and `torchrun_args` is the one place torchrun's argv is built,
    for the launcher here and for the pods of `--emit kubernetes` (deploy/training_job.py)."""

    model_config = ConfigDict(defer_build=True, frozen=True)

    nproc_per_node: int | None = Field(None, ge=1, description=(
        "Start this many training processes on this node through torchrun (one per GPU); the flags of this "
        "section go to torchrun, the rest to every process."))
    nnodes: str = Field("1", description=(
        "Nodes in the job: N, or MIN:MAX for an elastic job (run the same command on each). With --emit "
        "kubernetes: the pods of the Job, a whole number."))
    rdzv_endpoint: str | None = Field(None, description=(
        f"HOST[:PORT] of the c10d rendezvous, the same on every node (needed with --nnodes > 1; port default "
        f"{RDZV_PORT})."))
    rdzv_id: str | None = Field(None, description="Job id shared by the nodes; default lmctl-RUN_NAME.")
    rdzv_timeout: float = Field(600.0, gt=0, description="Seconds to wait for every node to join before exiting 5.")
    max_restarts: int | None = Field(None, ge=0, description=(
        "torchrun --max-restarts: restart every process this many times after one fails; they resume from the "
        "newest sealed checkpoint (default 0 with --nproc-per-node, 3 with --emit kubernetes)."))

    @field_validator("nnodes")
    @classmethod
    def _node_counts(cls, value: str) -> str:
        low, _, high = value.partition(":")
        if not (low.isdigit() and int(low) >= 1 and (not high or high.isdigit() and int(high) >= int(low))):
            raise ValueError(f"{value!r}: expected N or MIN:MAX node counts")
        return value

    @model_validator(mode="after")
    def _endpoint_for_several_nodes(self) -> LaunchOptions:
        if self.nproc_per_node is not None and self.several_nodes and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT, the same address on every "
                             "node (a host every node reaches, e.g. node 0)")
        return self

    @property
    def several_nodes(self) -> bool:
        return self.nnodes.rpartition(":")[2] != "1"

    @property
    def endpoint(self) -> str:
        if not self.rdzv_endpoint:
            return "this host"
        return self.rdzv_endpoint if ":" in self.rdzv_endpoint else f"{self.rdzv_endpoint}:{RDZV_PORT}"

    def rdzv_conf(self, **extra: str) -> str:
        """torchrun's one --rdzv-conf value: join_timeout, always set, plus `extra` (e.g. is_host)."""
        return ",".join(f"{k}={v}" for k, v in {"join_timeout": f"{self.rdzv_timeout:g}", **extra}.items())

    def torchrun_args(self, worker_args: list[str], rdzv_id: str, *, with_rdzv_conf: bool = True) -> list[str]:
        """torchrun's command line for `python -m lmctl train WORKER_ARGS` on a node of this job.

        `with_rdzv_conf=False` leaves out --rdzv-conf for a caller that passes its own built by
        `rdzv_conf` (torchrun keeps only the last --rdzv-conf it is given)."""
        args = [f"--nnodes={self.nnodes}", f"--nproc-per-node={self.nproc_per_node or 1}",
                f"--max-restarts={self.max_restarts or 0}", *[f"--rdzv-conf={self.rdzv_conf()}"] * with_rdzv_conf]
        if self.rdzv_endpoint:
            args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={rdzv_id}"]
        else:  # one node: torchrun's --standalone picks a free port on localhost
            args.append("--standalone")
        return [*args, "-m", "lmctl", "train", *worker_args]


def launch(job: LaunchOptions, rdzv_id: str, worker_args: list[str]) -> None:
    """Run the job's workers on this node through torchrun; returns when they all succeeded."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous import RendezvousError
    from torch.distributed.run import parse_args, run

    argv = job.torchrun_args(worker_args, rdzv_id)
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
            f"rendezvous '{rdzv_id}' at {job.endpoint} did not complete within {job.rdzv_timeout:g} s: {first}",
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
