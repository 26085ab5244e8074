"""The typer application: one module per command, each a thin layer over a library call."""

from __future__ import annotations

import typer

from lmctl.cli import config, data, deploy, doctor, drift, eval, export, keys, models, promote, registry, retrain, serve, train
from lmctl.cli.help import Command, examples

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

# The examples at the end of the heaviest commands' --help (tests/test_docs.py runs each through the
# command tree, so a renamed flag cannot leave a stale example behind).
EXAMPLES = {
    "train": examples(
        "lmctl train configs/demo.yaml --dry-run             # the plan and memory estimate; trains nothing",
        "lmctl train configs/demo.yaml --set train.lr=1e-4   # override any config field",
        "lmctl train cfg.yaml --nproc-per-node 8             # 8 GPUs on this machine, through torchrun",
        "lmctl train cfg.yaml --emit kubernetes --nnodes 2 --gpus-per-node 4 --out k8s/   # a Kubernetes Job"),
    "eval": examples(
        "lmctl eval runs/demo/checkpoints/step-000080 --data val.jsonl --report report.json",
        "lmctl eval models:/demo/2 --data val.jsonl --baseline models:/demo@production --max-ppl-regression 1",
        "lmctl eval models:/demo/2 --data val.jsonl --suite configs/evals/smoke.yaml --latency --html report.html"),
    "serve": examples(
        "lmctl serve models:/demo@production --port 8000     # follows the alias (hot reload)",
        "LMCTL_API_KEYS=sk-1 lmctl serve models:/demo@production --host 0.0.0.0",
        "lmctl serve models:/demo@production --canary models:/demo@candidate --canary-weight 0.1",
        "lmctl serve models:/demo@production --shadow models:/demo/7 --shadow-rate 0.2",
        "lmctl serve models:/demo@production --canary models:/demo/7 --canary-steps 0.05,0.25,0.5,1.0"),
    "deploy": examples(
        "lmctl deploy runs/demo/checkpoints/step-000080 --target local --out bundle/",
        "lmctl deploy models:/demo@production --target vllm --out vllm/",
        "lmctl deploy models:/demo@production --target kubernetes --out k8s/ --replicas 2"),
    "retrain": examples(
        "lmctl retrain configs/retrain.yaml --json           # from cron: 0 promoted/skipped, 3 not promoted, 5 busy",
        "lmctl retrain --status smollm2-pydoc                # the current or last run"),
}

app.command("train", cls=Command, epilog=EXAMPLES.get("train"))(train.train)
app.command("eval", cls=Command, epilog=EXAMPLES.get("eval"))(eval.eval_)
app.command("register", cls=Command, epilog=EXAMPLES.get("register"))(registry.register)
app.command("promote", cls=Command, epilog=EXAMPLES.get("promote"))(promote.promote)
app.command("rollback", cls=Command, epilog=EXAMPLES.get("rollback"))(promote.rollback)
app.command("serve", cls=Command, epilog=EXAMPLES.get("serve"))(serve.serve)
app.command("export", cls=Command, epilog=EXAMPLES.get("export"))(export.export)
app.command("deploy", cls=Command, epilog=EXAMPLES.get("deploy"))(deploy.deploy)
app.command("doctor", cls=Command, epilog=EXAMPLES.get("doctor"))(doctor.doctor)
app.command("drift", cls=Command, epilog=EXAMPLES.get("drift"))(drift.drift)
app.command("retrain", cls=Command, epilog=EXAMPLES.get("retrain"))(retrain.retrain)
app.add_typer(registry.app, name="registry", help="Inspect and verify registered model versions.")
app.add_typer(config.app, name="config", help="Validate and show configs.")
app.add_typer(models.app, name="models", help="Base models known by name (pull, list).")
app.add_typer(data.app, name="data", help="Check and clean data (validate, prepare).")
app.add_typer(keys.app, name="keys", help="API keys for `lmctl serve` (add, hash), stored as sha256.")
