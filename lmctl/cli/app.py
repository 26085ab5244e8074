"""The typer application: one module per command, each a thin layer over a library call."""

from __future__ import annotations

import typer

from lmctl.cli import config, data, deploy, doctor, drift, eval, export, keys, models, promote, registry, retrain, serve, train

app = typer.Typer(
    name="lmctl",
    help="Lifecycle of a causal language model: train (LoRA) -> eval -> register -> promote -> serve.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # plain click help: typer's rich help renderer imports rich.markdown, pygments and attrs, and
    # alone doubled `lmctl --help` (scripts/bench_startup.py); every flag is in docs/commands.md
    rich_markup_mode=None,
)

app.command("train")(train.train)
app.command("eval")(eval.eval_)
app.command("register")(registry.register)
app.command("promote")(promote.promote)
app.command("rollback")(promote.rollback)
app.command("serve")(serve.serve)
app.command("export")(export.export)
app.command("deploy")(deploy.deploy)
app.command("doctor")(doctor.doctor)
app.command("drift")(drift.drift)
app.command("retrain")(retrain.retrain)
app.add_typer(registry.app, name="registry", help="Inspect and verify registered model versions.")
app.add_typer(config.app, name="config", help="Validate and show configs.")
app.add_typer(models.app, name="models", help="Base models known by name (pull, list).")
app.add_typer(data.app, name="data", help="Check and clean data (validate, prepare).")
app.add_typer(keys.app, name="keys", help="API keys for `lmctl serve` (add, hash), stored as sha256.")
