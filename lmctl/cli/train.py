"""`lmctl train CONFIG`, and `--emit kubernetes`: the same training as a Kubernetes Job.

The cluster flags take their default and help from TrainJobOptions (cli/fields.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from lmctl.cli.fields import changed_flags, option, options_from
from lmctl.cli.output import JsonOpt, TracebackOpt, emit
from lmctl.deploy.options import TrainJobOptions as J
from lmctl.errors import BadInputError

if TYPE_CHECKING:
    from lmctl.config import LmctlConfig

CLUSTER = "Cluster job (--emit kubernetes)"


def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a field: section.key=value (repeatable).")] = None,
    resume: Annotated[str, typer.Option(help="auto (newest Trainer checkpoint of this run), never (archive it, start fresh), or a Trainer checkpoint PATH.")] = "auto",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate config, model and data; print the plan; train nothing.")] = False,
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
    max_restarts: int = option(J, "max_restarts", "--max-restarts", rich_help_panel=CLUSTER),
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
        max_restarts=max_restarts, backoff_limit=backoff_limit))
    if emit_target is None:
        given = changed_flags(job) + ["--out"] * (out is not None) + ["--force"] * force
        if given:
            raise BadInputError(f"{given[0]} applies to --emit kubernetes only")
        _run(load_config(config, set_ or []), resume, dry_run, json_out)
        return
    if dry_run or resume != "auto":
        raise BadInputError(f"{'--dry-run' if dry_run else '--resume'} does not apply to --emit: the pods resume "
                            "from the newest checkpoint on the output volume by themselves")
    from lmctl.deploy.training_job import emit_job

    cfg = load_config(config, set_ or [])
    emit(emit_job(cfg, config.expanduser().resolve().parent, emit_target, out, job, force), json_out)


def _run(cfg: LmctlConfig, resume: str, dry_run: bool, json_out: bool) -> None:
    from lmctl.train import is_primary
    from lmctl.train import train as run_training

    result = run_training(cfg, resume=resume, dry_run=dry_run)
    if is_primary():  # under torchrun only rank 0 speaks: stdout holds one JSON object
        emit(result, json_out)
