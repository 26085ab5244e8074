"""The demo lifecycle, offline, through the real CLI: pull -> eval -> train -> eval ->
register -> promote -> serve -> one completion, then a summary table.

SmolLM2-135M-Instruct is LoRA-tuned on the Python language reference (pydoc_data.topics);
held-out perplexity must fall by at least 20% or the demo exits 3. The first run promotes
without a report (nothing holds production yet); a rerun on the same LMCTL_HOME gates the
promotion with an eval of the new version against the production holder.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from demo_corpus import split_topics, write_jsonl  # noqa: E402
from http_wait import free_port, wait_for_http  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "demo.yaml"
MODEL_NAME = "smollm2-pydoc"
REQUIRED_DROP = 0.20
MAX_REGRESSION_PCT = 2.0  # promotion gate: held-out perplexity at most 2% above the production holder's
console = Console(stderr=True)


def lmctl(*args: str) -> dict:
    """Run one lmctl command with --json; stop the demo with its exit code if it fails."""
    cmd = [sys.executable, "-m", "lmctl", *args, "--json"]
    console.print(f"[bold]$ lmctl {' '.join(args)}[/bold]")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        console.print(f"[red]demo stopped: `lmctl {args[0]}` exited {proc.returncode}[/red]")
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout)


def lmctl_optional(*args: str) -> dict | None:
    """Like `lmctl`, but exit 2 (a reference that does not exist) returns None."""
    cmd = [sys.executable, "-m", "lmctl", *args, "--json"]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode == 2:
        return None
    if proc.returncode != 0:
        console.print(f"[red]demo stopped: `lmctl {args[0]}` exited {proc.returncode}: {proc.stderr.strip()}[/red]")
        raise SystemExit(proc.returncode)
    return json.loads(proc.stdout)


def promote_gated(version: str, eval_args: list[str], report: Path) -> str:
    """Promote to production the way the policy wants: the first promotion needs no report;
    later ones are gated by an eval of the new version against the current holder."""
    holder = lmctl_optional("registry", "show", f"{MODEL_NAME}@production")
    promote = ["promote", MODEL_NAME, version, "--alias", "production", "--reason", "demo"]
    if holder is not None:
        lmctl("eval", f"models:/{MODEL_NAME}/{version}", *eval_args, "--baseline", f"models:/{MODEL_NAME}@production",
              "--max-ppl-regression", str(MAX_REGRESSION_PCT), "--report", str(report))
        promote += ["--eval", str(report)]
    moved = lmctl(*promote)
    return f"production (was v{moved['previous_version']}; {moved['why']})" if holder else f"production ({moved['why']})"


def serve_one_completion(ref: str, prompt: str) -> str:
    port = free_port()
    console.print(f"[bold]$ lmctl serve {ref} --port {port}[/bold]")
    server = subprocess.Popen([sys.executable, "-m", "lmctl", "serve", ref, "--port", str(port)])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/healthz", timeout=180, proc=server)  # its log is the demo's own stderr
        body = {"prompt": prompt, "max_tokens": 40, "temperature": 0}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        response.raise_for_status()
        return response.json()["choices"][0]["text"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    home = Path(os.environ.setdefault("LMCTL_HOME", str(REPO / ".lmctl"))).resolve()
    corpus = home / "demo"
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, t0: float) -> None:
        timings[name] = time.perf_counter() - t0

    t0 = time.perf_counter()
    lmctl("models", "pull", "smollm2-135m")
    stage("pull", t0)
    train_docs, val_docs = split_topics()
    write_jsonl(corpus / "train.jsonl", train_docs)
    write_jsonl(corpus / "validation.jsonl", val_docs)
    lifecycle_start = time.perf_counter()
    eval_args = ["--data", str(corpus / "validation.jsonl"), "--method", "rolling", "--max-length", "512"]
    t0 = time.perf_counter()
    before = lmctl("eval", "smollm2-135m", *eval_args, "--report", str(corpus / "eval-before.json"))
    stage("eval base", t0)
    t0 = time.perf_counter()
    trained = lmctl("train", str(CONFIG), "--resume", "never", "--set", f"data.train={corpus / 'train.jsonl'}",
                    "--set", f"data.validation={corpus / 'validation.jsonl'}")
    stage("train", t0)
    t0 = time.perf_counter()
    after = lmctl("eval", trained["checkpoint"], *eval_args, "--report", str(corpus / "eval-after.json"))
    stage("eval tuned", t0)
    t0 = time.perf_counter()
    reg = lmctl("register", trained["checkpoint"], "--name", MODEL_NAME, "--alias", "candidate",
                "--eval", str(corpus / "eval-after.json"),
                "--description", "Completes text about Python's language reference (pydoc topics); a demo, not for production use.")
    promoted = promote_gated(reg["version"], eval_args, corpus / "eval-gate.json")
    stage("register+promote", t0)
    t0 = time.perf_counter()
    prompt = "The `for` statement is used to"
    completion = serve_one_completion(f"models:/{MODEL_NAME}@production", prompt)
    stage("serve", t0)
    lifecycle = time.perf_counter() - lifecycle_start

    drop = 1 - after["perplexity"] / before["perplexity"]
    table = Table(title="lmctl demo lifecycle")
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("base model", "SmolLM2-135M-Instruct (smollm2-135m)")
    table.add_row("held-out perplexity before", f"{before['perplexity']:.3f}")
    table.add_row("held-out perplexity after", f"{after['perplexity']:.3f}")
    table.add_row("perplexity drop", f"{drop:.1%} (required >= {REQUIRED_DROP:.0%})")
    table.add_row("training", f"{trained['steps']} steps, {trained['tokens']} tokens, {trained['seconds']:.0f} s")
    table.add_row("registered", f"{MODEL_NAME} version {reg['version']}")
    table.add_row("alias", promoted)
    table.add_row("model card", reg["model_card"])
    table.add_row("served completion", f"{prompt!r} -> {completion!r}")
    table.add_row("stage times", ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    table.add_row("lifecycle wall time", f"{lifecycle:.0f} s (all stages {time.perf_counter() - started:.0f} s)")
    Console().print(table)
    if drop < REQUIRED_DROP:
        console.print(f"[red]perplexity fell by {drop:.1%}, less than the required {REQUIRED_DROP:.0%}[/red]")
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
