"""`lmctl train CONFIG`: one process, one worker of several under torchrun, their launcher
(`--nproc-per-node`, lmctl.train.launch), or `--emit kubernetes`: the same training as a
Kubernetes Job. The launcher's and the cluster's flags take their default and help from LaunchOptions and
TrainJobOptions (cli/fields.py). Rank-aware output (only rank 0 prints; other ranks' lines are named)
is the CLI entry's, for every command (lmctl/cli/__init__.py).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lmctl.cli.fields import changed_flags, option, options_from
from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.deploy.options import TrainJobOptions as J
from lmctl.errors import BadInputError
from lmctl.train.launch import LaunchOptions
from lmctl.train.launch import LaunchOptions as L

if TYPE_CHECKING:
    from lmctl.config import LmctlConfig

log = logging.getLogger("lmctl")

LAUNCH = "Several processes (torchrun)"
CLUSTER = "Cluster job (--emit kubernetes)"


def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")] = None,
    resume: Annotated[str, typer.Option(help="auto (newest Trainer checkpoint of this run), never (archive it, start fresh), or a Trainer checkpoint PATH.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate config, model and data; print the plan; train nothing.")] = False,
    nproc_per_node: int | None = option(L, "nproc_per_node", "--nproc-per-node", rich_help_panel=LAUNCH),
    nnodes: str = option(L, "nnodes", "--nnodes", rich_help_panel=LAUNCH),
    rdzv_endpoint: str | None = option(L, "rdzv_endpoint", "--rdzv-endpoint", rich_help_panel=LAUNCH),
    rdzv_id: str | None = option(L, "rdzv_id", "--rdzv-id", rich_help_panel=LAUNCH),
    rdzv_timeout: float = option(L, "rdzv_timeout", "--rdzv-timeout", rich_help_panel=LAUNCH),
    max_restarts: int | None = option(L, "max_restarts", "--max-restarts", rich_help_panel=LAUNCH),
    emit_target: Annotated[str | None, typer.Option("--emit", help="kubernetes: validate the config and write the manifests of an Indexed Job running torchrun on --nnodes pods to --out; train nothing here.", rich_help_panel=CLUSTER)] = None,
    out: Annotated[Path | None, typer.Option(help="Directory for --emit (must be empty unless --force).", rich_help_panel=CLUSTER)] = None,
    force: Annotated[bool, typer.Option("--force", help="With --emit: replace a non-empty --out.", rich_help_panel=CLUSTER)] = False,
    nodes_alias: Annotated[int | None, typer.Option("--nodes", hidden=True, help="Old name of --nnodes for --emit.")] = None,
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
    launch = options_from(L, dict(nproc_per_node=nproc_per_node, nnodes=nnodes, rdzv_endpoint=rdzv_endpoint,
                                  rdzv_id=rdzv_id, rdzv_timeout=rdzv_timeout, max_restarts=max_restarts))
    if nodes_alias is not None:
        log.warning("--nodes is now --nnodes (one name for the nodes of a job, launched here or emitted)")
        launch = launch.model_copy(update={"nnodes": str(nodes_alias)})
    job = options_from(J, dict(
        nodes=_pods(launch.nnodes) if emit_target else 1, gpus_per_node=gpus_per_node, image=image,
        namespace=namespace, name=name, cpu=cpu, memory=memory, data_claim=data_claim, data_mount=data_mount,
        data_root=data_root, output_claim=output_claim, output_mount=output_mount, tracking_secret=tracking_secret,
        tracking_secret_key=tracking_secret_key, backoff_limit=backoff_limit,
        **({} if max_restarts is None else {"max_restarts": max_restarts})))
    if emit_target is None:
        given = [f for f in changed_flags(job) if f != "--max-restarts"] + ["--out"] * (out is not None) + ["--force"] * force
        if given:
            raise BadInputError(f"{given[0]} applies to --emit kubernetes only")
        if nproc_per_node is None and (changed_flags(launch) or nodes_alias is not None):
            flag = (changed_flags(launch) or ["--nnodes"])[0]
            raise BadInputError(f"{flag} applies to --nproc-per-node or --emit kubernetes only",
                                hint="under torchrun itself, give torchrun its own flags")
        cfg = load_config(config, set_ or [])
        if nproc_per_node is not None and not dry_run:
            _launch(config, cfg, set_ or [], resume, launch, json_out, traceback)
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


def _pods(nnodes: str) -> int:
    """--nnodes for --emit kubernetes: the Job's pods, a whole number (an elastic MIN:MAX is the launcher's)."""
    if not nnodes.isdigit():
        raise BadInputError(f"--nnodes {nnodes!r}: --emit kubernetes runs a fixed number of pods; give N")
    return int(nnodes)


def _launch(config: Path, cfg: LmctlConfig, sets: list[str], resume: str, job: LaunchOptions, json_out: bool,
            traceback: bool) -> None:
    """torchrun's own launcher, in process, running `lmctl train CONFIG` in each worker."""
    from lmctl.train.launch import launch

    worker = [str(config), *(a for s in sets for a in ("--set", s)), "--resume", resume]
    launch(job, job.rdzv_id or f"lmctl-{cfg.output.run_name}", worker + ["--json"] * json_out + ["--traceback"] * traceback)


def _run(cfg: LmctlConfig, resume: str, dry_run: bool, json_out: bool) -> None:
    from lmctl.train import train as run_training

    emit(run_training(cfg, resume=resume, dry_run=dry_run), json_out)
