"""`lmctl train CONFIG`, also as one worker of several under torchrun, or as their launcher
(`--nproc-per-node`, lmctl.train.launch)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.errors import BadInputError, LmctlError

LAUNCH = "Several processes (torchrun)"


def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")] = None,
    resume: Annotated[str, typer.Option(help="auto (newest Trainer checkpoint of this run), never (archive it, start fresh), or a Trainer checkpoint PATH.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate config, model and data; print the plan; train nothing.")] = False,
    nproc_per_node: Annotated[int | None, typer.Option("--nproc-per-node", rich_help_panel=LAUNCH, help="Start this many training processes on this node through torchrun (one per GPU); the job's flags below go to torchrun, the rest to every process.")] = None,
    nnodes: Annotated[str, typer.Option("--nnodes", rich_help_panel=LAUNCH, help="Nodes in the job: N, or MIN:MAX for an elastic job; run the same command on each.")] = "1",
    rdzv_endpoint: Annotated[str | None, typer.Option("--rdzv-endpoint", rich_help_panel=LAUNCH, help="HOST[:PORT] of the c10d rendezvous, the same on every node (needed with --nnodes > 1; port default 29400).")] = None,
    rdzv_id: Annotated[str | None, typer.Option("--rdzv-id", rich_help_panel=LAUNCH, help="Job id shared by the nodes; default lmctl-RUN_NAME.")] = None,
    rdzv_timeout: Annotated[float, typer.Option("--rdzv-timeout", rich_help_panel=LAUNCH, help="Seconds to wait for every node to join before exiting 5.")] = 600.0,
    max_restarts: Annotated[int, typer.Option("--max-restarts", rich_help_panel=LAUNCH, help="Restart all processes this many times after one fails; they resume from the newest sealed checkpoint.")] = 0,
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """LoRA fine-tune the configured base model; checkpoints go under the run directory."""
    from lmctl.config import load_config
    from lmctl.distributed import world
    from lmctl.train import train as run_training

    if resume not in ("auto", "never") and not Path(resume).exists():
        raise BadInputError(f"--resume {resume!r}: expected auto, never or an existing path")
    cfg = load_config(config, set_ or [])
    if nproc_per_node is not None and not dry_run:
        from lmctl.train.launch import Launch, launch

        job = Launch(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id or f"lmctl-{cfg.output.run_name}",
                     rdzv_timeout, max_restarts)
        worker = [str(config), *(a for s in set_ or [] for a in ("--set", s)), "--resume", resume]
        launch(job, worker + ["--json"] * json_out + ["--traceback"] * traceback)
        return
    here = world()
    _speak_as(here.rank)
    try:
        result = run_training(cfg, resume=resume, dry_run=dry_run)
    except LmctlError as exc:
        if here.rank:  # every rank's error reaches torchrun's output: say whose it is
            exc.message = f"rank {here.rank}: {exc.message}"
        raise
    if here.primary:  # under torchrun only rank 0 speaks: stdout holds one JSON object
        emit(result, json_out)


def _speak_as(rank: int) -> None:
    """Under torchrun, rank 0 logs as one process does; the others only warnings and errors, named."""
    if rank:
        logger = logging.getLogger("lmctl")
        logger.setLevel(logging.WARNING)
        for handler in logger.handlers:
            handler.setFormatter(logging.Formatter(f"lmctl[rank {rank}]: %(message)s"))
