"""Helpers for the torchrun tests: worker programs torchrun starts, and checks on what they left.

`python tests/dist_support.py plan CONFIG` (one per rank under torchrun): runs lmctl's own
`train(..., dry_run=True)` and prints this rank's `{"rank", "cache_hit"}`, so a test sees
which process tokenized and which opened the entry another one sealed.

`python tests/dist_support.py fsdp CONFIG STEPS`: lmctl's model (PlannedRun + _build_model)
sharded with torch's `fully_shard` the way accelerate's `fsdp2_prepare_model` does (each
decoder layer, then the root), trained STEPS AdamW steps on one fixed global batch split
across the ranks, then sealed by lmctl's `SealCheckpoints` with `fsdp=True`. It stands
in for the Trainer's FSDP path, which accelerate 1.15 does not run on CPU
(lmctl/train/fsdp.py); without torchrun it trains the same batch unsharded in one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SUPPORT = Path(__file__)
CHILD_ENV = {"OMP_NUM_THREADS": "1"}  # 2 cores: one thread per process


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **CHILD_ENV})


def lmctl(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`lmctl ARGS` in a child process, one torch thread each (the launcher's workers inherit it)."""
    from conftest import run_subprocess

    return run_subprocess(*args, env=CHILD_ENV, timeout=timeout)


def json_objects(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def eval_at_world_size_1(cli, sealed: Path, base: Path) -> dict:  # type: ignore[no-untyped-def]
    """Score a sealed checkpoint with `lmctl eval` in this one process, check that plain
    transformers + peft (`PeftModel.from_pretrained`) scores the same windows identically, and
    return lmctl's sums."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import ASSETS
    from lmctl.evaluate.perplexity import perplexity

    data = ASSETS / "tiny_validation.jsonl"
    report = cli("eval", sealed, "--data", data, "--max-length", "64", "--stride", "32", "--batch-size", "1", "--json")
    assert report.code == 0, report.err
    sums = report.json["sums"]
    texts = [json.loads(line)["text"] for line in data.read_text().splitlines()]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), sealed).eval()
    plain = perplexity(model, AutoTokenizer.from_pretrained(sealed), texts, 64, 32, batch_size=1)
    assert plain.sums.tokens == sums["tokens"]
    assert abs(plain.sums.nll_sum - sums["nll_sum"]) <= 1e-9 * abs(plain.sums.nll_sum), (plain.sums, sums)
    return sums


ROWS, ROW_TOKENS = 4, 32  # the fixed global batch: equal rows, so every rank's mean loss weighs the same


def plan(config: str) -> None:
    from lmctl.config import load_config
    from lmctl.distributed import world
    from lmctl.train import train

    result = train(load_config(Path(config), []), dry_run=True)
    print(json.dumps({"rank": world().rank, "cache_hit": result.cache_hit}), flush=True)


def fsdp(config: str, steps: int) -> None:
    import torch
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerState

    from lmctl.config import load_config
    from lmctl.distributed import process_group
    from lmctl.train.callbacks import SealCheckpoints
    from lmctl.train.plan import PlannedRun
    from lmctl.train.trainer import _build_model

    cfg = load_config(Path(config), [])
    torch.manual_seed(cfg.train.seed)
    with process_group() as here:
        with here.rank0_first(local=True):
            run = PlannedRun(cfg, "never", fsdp=False)
        model = _build_model(cfg, run)
        if here.world_size > 1:
            for layer in model.base_model.model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        rows = [e["input_ids"][:ROW_TOKENS] for e in run.train.examples.examples if len(e["input_ids"]) >= ROW_TOKENS]
        mine = torch.tensor(rows[:ROWS][here.rank::here.world_size])
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
        for _ in range(steps):
            loss = model(input_ids=mine, labels=mine).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        def export(model, state, weights):  # type: ignore[no-untyped-def]
            return run.seal(model, state.global_step, {"train_loss": loss.item()}, "", weights)

        SealCheckpoints(export, here, fsdp=here.world_size > 1).seal(model, TrainerState(global_step=steps))


def worker_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:  # type: ignore[type-arg]
    """The pid of the worker with RANK=`rank` among the processes under a torchrun launcher."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank):
                    return child.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        time.sleep(0.05)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher.pid}")


def kill_when_sealed(launcher: subprocess.Popen, rank: int, sealed: Path, timeout: float = 240) -> None:  # type: ignore[type-arg]
    """SIGKILL worker `rank` once checkpoint `sealed` exists (training goes on past it)."""
    deadline = time.monotonic() + timeout
    while not (sealed / "lmctl.json").exists():
        assert launcher.poll() is None and time.monotonic() < deadline, f"training ended before {sealed.name}"
        time.sleep(0.01)
    os.kill(worker_pid(launcher, rank), signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[1] == "plan":
        plan(sys.argv[2])
    else:
        fsdp(sys.argv[2], int(sys.argv[3]))
