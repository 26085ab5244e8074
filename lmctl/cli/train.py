"""`lmctl train CONFIG`: one process, one worker of several under torchrun, their launcher
(`--nproc-per-node`, lmctl.train.launch), or `--emit kubernetes`: the same training as a
Kubernetes Job. The cluster flags take their default and help from TrainJobOptions (cli/fields.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lmctl.cli.fields import changed_flags, option, options_from
from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.deploy.options import TrainJobOptions as J
from lmctl.errors import BadInputError, LmctlError

if TYPE_CHECKING:
    from lmctl.config import LmctlConfig

LAUNCH = "Several processes (torchrun)"
CLUSTER = "Cluster job (--emit kubernetes)"


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
    max_restarts: Annotated[int | None, typer.Option("--max-restarts", min=0, rich_help_panel=LAUNCH, help="torchrun --max-restarts: restart every process this many times after one fails; they resume from the newest sealed checkpoint (default 0 with --nproc-per-node, 3 with --emit kubernetes).")] = None,
    emit_target: Annotated[str | None, typer.Option("--emit", help="kubernetes: validate the config and write the manifests of an Indexed Job running torchrun on --nodes pods to --out; train nothing here.", rich_help_panel=CLUSTER)] = None,
    out: Annotated[Path | None, typer.Option(help="Directory for --emit (must be empty unless --force).", rich_help_panel=CLUSTER)] = None,
    force: Annotated[bool, typer.Option("--force", help="With --emit: replace a non-empty --out.", rich_help_panel=CLUSTER)] = False,
    nodes: int = option(J, "nodes", rich_help_panel=CLUSTER),
    gpus_per_node: int = option(J, "gpus_per_node", "--gpus-per-node", rich_help_panel=CLUSTER),
    image: str = option(J, "image", rich_help_panel=CLUSTER),
    namespace: str = option(J, "namespace", rich_help_panel=CLUSTER),
    name: str | None = option(J, "name", rich_help_panel=CLUSTER),
    cpu: str = option(J, "cpu", rich_help_panel=CLUSTER),
    memory: str = option(J, "memory", rich_help_panel=CLUSTER),
    data_claim: str = option(J, "data_claim", "--data-claim", rich_help_panel=CLUSTER),
    data_mount: str = option(J, "data_mount", "--data-mount", rich_help_panel=CLUSTER),
    data_root: Path | None = option(J, "data_root", "--data-root", rich_help_panel=CLUSTER),
    output_claim: str = option(J, "output_claim", "--output-claim", rich_help_panel=CLUSTER),
    output_mount: str = option(J, "output_mount", "--output-mount", rich_help_panel=CLUSTER),
    tracking_secret: str = option(J, "tracking_secret", "--tracking-secret", rich_help_panel=CLUSTER),
    tracking_secret_key: str = option(J, "tracking_secret_key", "--tracking-secret-key", rich_help_panel=CLUSTER),
    backoff_limit: int | None = option(J, "backoff_limit", "--backoff-limit", rich_help_panel=CLUSTER),
    json_out: JsonOpt = False,
    traceback: TracebackOpt = False,
) -> None:
    """LoRA fine-tune the configured base model; checkpoints go under the run directory."""
    from lmctl.config import load_config

    if resume not in ("auto", "never") and not Path(resume).exists():
        raise BadInputError(f"--resume {resume!r}: expected auto, never or an existing path")
    job = options_from(J, dict(
        nodes=nodes, gpus_per_node=gpus_per_node, image=image, namespace=namespace, name=name, cpu=cpu,
        memory=memory, data_claim=data_claim, data_mount=data_mount, data_root=data_root, output_claim=output_claim,
        output_mount=output_mount, tracking_secret=tracking_secret, tracking_secret_key=tracking_secret_key,
        backoff_limit=backoff_limit, **({} if max_restarts is None else {"max_restarts": max_restarts})))
    if emit_target is None:
        given = [f for f in changed_flags(job) if f != "--max-restarts"] + ["--out"] * (out is not None) + ["--force"] * force
        if given:
            raise BadInputError(f"{given[0]} applies to --emit kubernetes only")
        if max_restarts is not None and nproc_per_node is None:
            raise BadInputError("--max-restarts applies to --nproc-per-node or --emit kubernetes only",
                                hint="under torchrun itself, give torchrun --max-restarts")
        cfg = load_config(config, set_ or [])
        if nproc_per_node is not None and not dry_run:
            _launch(config, cfg, set_ or [], resume, nproc_per_node, nnodes, rdzv_endpoint, rdzv_id, rdzv_timeout,
                    max_restarts or 0, json_out, traceback)
            return
        _run(cfg, resume, dry_run, json_out)
        return
    if dry_run or resume != "auto" or nproc_per_node is not None:
        flag = "--dry-run" if dry_run else "--resume" if resume != "auto" else "--nproc-per-node"
        raise BadInputError(f"{flag} does not apply to --emit: the pods run torchrun with --gpus-per-node processes "
                            "and resume from the newest checkpoint on the output volume by themselves")
    from lmctl.deploy.training_job import emit_job

    cfg = load_config(config, set_ or [])
    emit(emit_job(cfg, config.expanduser().resolve().parent, emit_target, out, job, force), json_out)


def _launch(config: Path, cfg: LmctlConfig, sets: list[str], resume: str, nproc_per_node: int, nnodes: str,
            rdzv_endpoint: str | None, rdzv_id: str | None, rdzv_timeout: float, max_restarts: int, json_out: bool,
            traceback: bool) -> None:
    """torchrun's own launcher, in process, running `lmctl train CONFIG` in each worker."""
    from lmctl.train.launch import Launch, launch

    job = Launch(nproc_per_node, nnodes, rdzv_endpoint, rdzv_id or f"lmctl-{cfg.output.run_name}", rdzv_timeout,
                 max_restarts)
    worker = [str(config), *(a for s in sets for a in ("--set", s)), "--resume", resume]
    launch(job, worker + ["--json"] * json_out + ["--traceback"] * traceback)


def _run(cfg: LmctlConfig, resume: str, dry_run: bool, json_out: bool) -> None:
    from lmctl.distributed import world
    from lmctl.train import train as run_training

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
