"""`lmctl train` under torchrun on CPU (gloo): several processes and "nodes" on localhost.

Every test runs real torchrun launchers and real training processes: the loss curve of 2
processes equals one process's at the same global batch, two launchers meet through a c10d
rendezvous as two nodes would, each node tokenizes once, rank 0 alone writes, and a
rendezvous that never completes ends within its timeout with exit 5 and one line.
The heavier fault and world-size tests are in test_distributed_faults.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import assert_same_losses, free_port, tiny_config_dict
from dist_support import CHILD_ENV, SUPPORT, eval_at_world_size_1, json_objects, lmctl, torchrun
from lmctl import checkpoint

def test_two_processes_train_the_loss_curve_of_one(cli, tiny_config: Path, tmp_path: Path) -> None:
    """DDP at 2 x batch 2 against one process at batch 4: same global batch, same losses."""
    one = cli("train", tiny_config, "--set", "output.run_name=one", "--json")
    assert one.code == 0, one.err
    proc = lmctl("train", str(tiny_config), "--nproc-per-node", "2", "--set", "train.batch_size=2", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    objects = json_objects(proc.stdout)
    assert len(objects) == 1, proc.stdout  # only rank 0 prints the result
    result = objects[0]
    assert result["world_size"] == 2 and result["distributed"] == "ddp" and result["steps"] == 6
    run_dir = tmp_path / "runs" / "tiny"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003", "step-000006"]
    checkpoint.verify(Path(result["checkpoint"]))
    assert_same_losses(tmp_path / "runs" / "one", run_dir)
    # each rank wrote its own RNG state into the Trainer checkpoint before rank 0 sealed its twin
    assert {p.name for p in (run_dir / "trainer" / "checkpoint-3").glob("rng_state_*")} == \
        {"rng_state_0.pth", "rng_state_1.pth"}
    # ranks > 0 log only warnings and errors: every progress line is rank 0's
    assert "step 6/6" in proc.stderr and "rank 1" not in proc.stderr


def test_two_nodes_meet_through_c10d_and_only_rank_0_writes(tiny_base: Path, tmp_path: Path) -> None:
    """Two launchers, each a "node" with its own LMCTL_HOME (local disk) and one process, the
    output directory shared as on a cluster: one through `lmctl train --nnodes`, one through
    plain torchrun."""
    config = tmp_path / "tiny.yaml"
    settings = tiny_config_dict(tiny_base, tmp_path / "shared" / "runs")
    settings["train"].update(max_steps=2, save_every=2, eval_every=2, batch_size=2)
    config.write_text(yaml.safe_dump(settings))
    endpoint = f"127.0.0.1:{free_port()}"
    homes = [tmp_path / "node0", tmp_path / "node1"]
    commands = [
        [sys.executable, "-m", "lmctl", "train", str(config), "--nproc-per-node", "1", "--nnodes", "2",
         "--rdzv-endpoint", endpoint, "--rdzv-id", "job1", "--rdzv-timeout", "120", "--json"],
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend",
         "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "job1", "-m", "lmctl", "train", str(config), "--json"],
    ]
    launchers = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, **CHILD_ENV, "LMCTL_HOME": str(home)})
                 for cmd, home in zip(commands, homes)]
    outputs = [launcher.communicate(timeout=300) for launcher in launchers]
    for launcher, (_, err) in zip(launchers, outputs):
        assert launcher.returncode == 0, err[-3000:]
    objects = [obj for out, _ in outputs for obj in json_objects(out)]
    assert len(objects) == 1 and objects[0]["world_size"] == 2 and objects[0]["steps"] == 2
    checkpoint.verify(Path(objects[0]["checkpoint"]))
    # the MLflow run, the registry store and the run lock are rank 0's; each node has its own cache
    written = {home.name: sorted(p.name for p in home.iterdir()) for home in homes if home.exists()}
    rank0_home = next(home.name for home in homes if (home / "mlflow.db").exists())
    other = next(name for name in written if name != rank0_home)
    assert written[other] == ["cache"], written
    assert list((tmp_path / other / "cache" / "tokens").iterdir())


def test_each_node_tokenizes_once_and_the_others_read_its_entry(tiny_config: Path, tmp_path: Path) -> None:
    """Local rank 0 builds the tokenization cache entry; rank 1 waits, then opens it (a hit)."""
    proc = torchrun("--standalone", "--nproc-per-node", "2", str(SUPPORT), "plan", str(tiny_config))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hits = {obj["rank"]: obj["cache_hit"] for obj in json_objects(proc.stdout)}
    assert hits == {0: False, 1: True}
    entries = list((tmp_path / "home" / "cache" / "tokens").iterdir())
    assert len(entries) == 2 and not [p for p in entries if p.name.startswith(".")]  # train + validation


def test_a_rendezvous_that_never_completes_exits_5_within_its_timeout(tiny_config: Path) -> None:
    """--nnodes 2 with one node started: the launcher gives up after --rdzv-timeout."""
    started = time.monotonic()
    proc = lmctl("train", str(tiny_config), "--nproc-per-node", "1", "--nnodes", "2", "--rdzv-endpoint",
                 f"127.0.0.1:{free_port()}", "--rdzv-timeout", "5", "--json", timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1 and "did not complete within 5 s" in proc.stderr, proc.stderr
    assert proc.stdout == "" and elapsed < 5 + 25  # the timeout plus start-up, never a hang


def test_a_torchrun_restart_continues_the_run_whatever_resume_said(cli, tiny_config: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun --max-restarts starts the workers again with the same --resume: a restart
    (TORCHELASTIC_RESTART_COUNT > 0) must not archive the first attempt's progress."""
    first = cli("train", tiny_config, "--set", "train.max_steps=3", "--json")
    assert first.code == 0, first.err
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    again = cli("train", tiny_config, "--set", "train.max_steps=6", "--resume", "never", "--json")
    assert again.code == 0, again.err
    assert again.json["resumed_from"].endswith("checkpoint-3") and again.json["steps"] == 6
    assert [p.name for p in (tmp_path / "runs").iterdir() if not p.name.startswith(".")] == ["tiny"]  # nothing archived


def test_launcher_flags_are_checked_before_anything_starts(cli, tiny_config: Path, tmp_path: Path) -> None:
    result = cli("train", tiny_config, "--nproc-per-node", "2", "--nnodes", "2")
    assert result.code == 2 and "--rdzv-endpoint" in result.err
    result = cli("train", tiny_config, "--nproc-per-node", "0")
    assert result.code == 2 and "--nproc-per-node" in result.err
    result = cli("train", tiny_config, "--nproc-per-node", "2", "--nnodes", "three")
    assert result.code == 2 and "--nnodes" in result.err
    result = cli("train", tiny_config, "--nproc-per-node", "2", "--set", "train.distributed=zero")
    assert result.code == 2 and "train.distributed" in result.err
    assert not (tmp_path / "runs").exists()


def test_fsdp_across_cpu_processes_is_refused_not_run_as_ddp(cli, tiny_config: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate would train CPU processes with DDP while told FSDP: lmctl refuses (exit 2)
    before joining the others. One process has nothing to shard and trains plainly."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)  # what torchrun sets in rank 0 of 2
    result = cli("train", tiny_config, "--set", "train.distributed=fsdp", "--dry-run")
    assert result.code == 2 and "needs CUDA GPUs" in result.err and "train.distributed=ddp" in result.err
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name)
    plan = cli("train", tiny_config, "--set", "train.distributed=fsdp", "--dry-run", "--json")
    assert plan.code == 0 and plan.json["distributed"] == "none" and plan.json["world_size"] == 1


def test_qlora_with_fsdp_across_processes_is_refused_at_preflight(cli, tiny_config: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """4-bit weights shard under FSDP only with bnb_4bit_quant_storage, which lmctl does not set:
    the combination is one line and exit 2, before any other check and before anything is written,
    on any machine (the CUDA check would otherwise answer first on CPU)."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(name, value)  # what torchrun sets in rank 0 of 2
    result = cli("train", tiny_config, "--set", "train.distributed=fsdp", "--set", "lora.quantization=4bit", "--dry-run")
    assert result.code == 2, result.err
    assert "lora.quantization=4bit cannot be sharded with train.distributed=fsdp across 2 processes" in result.err
    assert "train.distributed=ddp" in result.err
    assert not (tmp_path / "runs").exists()


def test_fsdp2_sharded_lora_seals_the_whole_adapter(tiny_base: Path, tmp_path: Path, cli) -> None:
    """lmctl's model sharded with torch's fully_shard (FSDP2 on CPU) over 2 processes trains the
    same adapter as one process, and SealCheckpoints gathers it whole: a sealed checkpoint that
    lmctl eval and plain transformers + peft score identically at world size 1."""
    import torch
    from safetensors.torch import load_file

    configs = {}
    for name in ("sharded", "single"):
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(tiny_config_dict(tiny_base, tmp_path / name)))
    proc = torchrun("--standalone", "--nproc-per-node", "2", str(SUPPORT), "fsdp", str(configs["sharded"]), "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, str(SUPPORT), "fsdp", str(configs["single"]), "3"], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **CHILD_ENV})
    assert single.returncode == 0, single.stderr[-3000:]
    sealed = {name: tmp_path / name / "tiny" / "checkpoints" / "step-000003" for name in configs}
    checkpoint.verify(sealed["sharded"])
    tensors = {name: load_file(path / "adapter_model.safetensors") for name, path in sealed.items()}
    assert tensors["sharded"].keys() == tensors["single"].keys()
    for key, value in tensors["single"].items():
        assert tensors["sharded"][key].shape == value.shape  # whole tensors, not one rank's shard
        torch.testing.assert_close(tensors["sharded"][key], value, rtol=1e-5, atol=1e-6)
    assert any(value.abs().sum() > 0 for key, value in tensors["sharded"].items() if "lora_B" in key)  # it trained

    eval_at_world_size_1(cli, sealed["sharded"], tiny_base)
