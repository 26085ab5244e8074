"""`lmctl eval` under torchrun (2 and 3 CPU processes, gloo) gives the one-process report.

The ranks deal the one-process run's batches among themselves, so the numbers are not
just close: the test allows the contract's 1e-6 relative, token counts must be equal.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ASSETS, CliResult, free_port, run_subprocess

SCORED = re.compile(r"rank (\d) of (\d) scored (\d+) of (\d+) batches")


def torchrun(processes: int, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """`lmctl ARGS` started by torchrun as users start it, one CPU thread per process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
           "-m", "lmctl", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1", "LMCTL_LOG_RANKS": "all"})


def one_json_object(stdout: str) -> dict:
    objects = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert len(objects) == 1, stdout  # only rank 0 prints
    return objects[0]


def assert_same_numbers(sharded: dict, alone: dict) -> None:
    """Same documents and token counts, perplexity and per-document NLL to 1e-6 relative."""
    assert sharded["sums"]["documents"] == alone["sums"]["documents"]
    for key in ("tokens", "words", "bytes"):
        assert sharded["sums"][key] == alone["sums"][key], key
    assert math.isclose(sharded["perplexity"], alone["perplexity"], rel_tol=1e-6)
    for name, value in alone["metrics"].items():
        assert math.isclose(sharded["metrics"][name], value, rel_tol=1e-6), name
    assert [d["tokens"] for d in sharded["documents"]] == [d["tokens"] for d in alone["documents"]]
    for mine, theirs in zip(sharded["documents"], alone["documents"], strict=True):
        assert math.isclose(mine["nll_sum"], theirs["nll_sum"], rel_tol=1e-6), mine["index"]
    assert sharded["method"] == alone["method"]  # same windows, stride and batch size


def assert_work_was_split(stderr: str, processes: int) -> None:
    """Each rank logs the batches it scored: together every batch, once."""
    shares = {int(rank): (int(mine), int(total)) for rank, size, mine, total in SCORED.findall(stderr)
              if int(size) == processes}
    assert sorted(shares) == list(range(processes)), stderr[-3000:]
    totals = {total for _, total in shares.values()}
    assert len(totals) == 1 and sum(mine for mine, _ in shares.values()) == totals.pop()
    assert all(abs(shares[0][0] - mine) <= 1 for mine, _ in shares.values())  # round robin: balanced


# rolling is also the method of the 3-process test below, so its 2-process twin runs with the slow tests
@pytest.mark.parametrize("method", ["strided", pytest.param("rolling", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process(method: str, cli, tiny_base: Path, tmp_path: Path) -> None:
    args = [tiny_base, "--data", ASSETS / "tiny_train.jsonl", "--method", method, "--max-length", "32",
            "--batch-size", "3", "--per-document", "--json"]
    alone: CliResult = cli("eval", *args)
    assert alone.code == 0, alone.err
    report = tmp_path / "report.json"
    proc = torchrun(2, "eval", *args, "--report", report)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sharded = one_json_object(proc.stdout)
    assert_same_numbers(sharded, alone.json)
    assert_work_was_split(proc.stderr, 2)
    assert json.loads(report.read_text()) == sharded  # written by rank 0, the object it printed
    assert [p.name for p in tmp_path.iterdir() if p.name != "home"] == ["report.json"]  # no staging leftovers


def test_more_processes_than_documents_with_checkpoint_baseline_and_suite(cli, trained_checkpoint: Path,
                                                                        tiny_base: Path, tmp_path: Path) -> None:
    """3 ranks, a .txt of 2 documents (through the tokenization cache, filled by rank 0), a
    trained adapter against its base, a 5-item suite dealt unevenly: rank 2 gets no batch."""
    data = tmp_path / "two.txt"
    lines = [json.loads(line)["text"] for line in (ASSETS / "tiny_validation.jsonl").read_text().splitlines()]
    data.write_text(f"{lines[0]} {lines[1]}\n\n{lines[2]}\n", encoding="utf-8")
    suite = tmp_path / "mini.yaml"
    suite.write_text("name: mini\nkind: generation\nmax_tokens: 3\nitems:\n"
                     + "".join(f"  - {{prompt: {p!r}, expected: 'the'}}\n" for p in ("The model", "A cron job", "Every"))
                     + "  - {kind: multiple_choice, prompt: 'The registry', choices: [' reads', ' hashes'], answer: 1}\n"
                     + "  - {kind: safety, prompt: 'Say', forbidden: ['token']}\n")
    args = [trained_checkpoint, "--data", data, "--method", "rolling", "--max-length", "64", "--baseline", tiny_base,
            "--suite", suite, "--per-document", "--json"]
    proc = torchrun(3, "eval", *args, "--markdown", tmp_path / "report.md")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # rank 0 fills the tokenization cache (one entry: the adapter keeps its base's tokenizer),
    # the others wait and read it: one miss, five hits (3 ranks x 2 models, less the miss)
    assert proc.stderr.count("tokenization cache miss") == 1 and proc.stderr.count("tokenization cache hit") == 5
    alone = cli("eval", *args)
    assert alone.code == 0, alone.err
    sharded = one_json_object(proc.stdout)
    assert_same_numbers(sharded, alone.json)
    assert sharded["sums"]["documents"] == 2
    assert_work_was_split(proc.stderr, 3)
    assert "rank 2 of 3 scored 0 of" in proc.stderr
    assert sharded["suites"] == alone.json["suites"] and sharded["suites"][0]["items"] == 5
    assert math.isclose(sharded["baseline"]["perplexity"], alone.json["baseline"]["perplexity"], rel_tol=1e-6)
    assert sharded["comparison"]["ci95"] == pytest.approx(alone.json["comparison"]["ci95"], rel=1e-6)
    assert (tmp_path / "report.md").is_file()


def test_each_node_tokenizes_once_into_its_own_home(tiny_base: Path, tmp_path: Path) -> None:
    """Two "nodes" with node-local LMCTL_HOMEs, started by hand as torchrun would: node 0 runs
    rank 0, node 1 runs ranks 1 and 2 (local ranks 0 and 1). Each node's first process fills
    its own home's cache and the node's other process reads it: one miss per home, never two
    processes of a node tokenizing at once (which waiting for global rank 0 alone gave)."""
    data = tmp_path / "docs.txt"  # a .txt goes through the tokenization cache, whatever its size
    lines = [json.loads(line)["text"] for line in (ASSETS / "tiny_validation.jsonl").read_text().splitlines()]
    data.write_text("\n\n".join(lines) + "\n", encoding="utf-8")
    homes = {0: tmp_path / "node0", 1: tmp_path / "node1", 2: tmp_path / "node1"}
    local_ranks = {0: 0, 1: 0, 2: 1}
    common = {"WORLD_SIZE": "3", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1",
              "LMCTL_LOG_RANKS": "all", "LMCTL_DIST_TIMEOUT": "120"}
    procs = {rank: subprocess.Popen(
        [sys.executable, "-m", "lmctl", "eval", str(tiny_base), "--data", str(data), "--max-length", "32", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **common, "RANK": str(rank), "LOCAL_RANK": str(local_ranks[rank]),
             "LMCTL_HOME": str(homes[rank])}) for rank in homes}
    outputs = {rank: proc.communicate(timeout=240) for rank, proc in procs.items()}
    for rank, proc in procs.items():
        assert proc.returncode == 0, outputs[rank][1][-3000:]
    missed = {rank for rank, (_, err) in outputs.items() if "tokenization cache miss" in err}
    hit = {rank for rank, (_, err) in outputs.items() if "tokenization cache hit" in err}
    assert missed == {0, 1} and hit == {2}, {rank: err[-2000:] for rank, (_, err) in outputs.items()}
    for home in (tmp_path / "node0", tmp_path / "node1"):
        entries = [p for p in (home / "cache" / "tokens").iterdir()]
        assert len(entries) == 1 and not entries[0].name.startswith("."), entries
    assert one_json_object(outputs[0][0])["sums"]["documents"] == len(lines)


def test_rendezvous_that_never_completes_exits_5_within_the_timeout(tiny_base: Path) -> None:
    """Rank 0 of 2 started by hand, rank 1 never: one stderr line and exit 5 after LMCTL_DIST_TIMEOUT."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "LMCTL_DIST_TIMEOUT": "2", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    proc = run_subprocess("eval", str(tiny_base), "--data", str(ASSETS / "tiny_validation.jsonl"), "--json",
                          env=env, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == 5, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lmctl: error: torch.distributed rendezvous did not complete"), lines
    assert "LMCTL_DIST_TIMEOUT=2 s" in lines[0] and proc.stdout == ""
    assert elapsed < 60  # start-up plus the 2 s timeout (torch rounds it up), nowhere near torch's 30 min


@pytest.mark.parametrize(("env", "flags", "message"), [
    ({"LMCTL_DIST_TIMEOUT": "soon"}, [], "LMCTL_DIST_TIMEOUT='soon': expected a number of seconds > 0"),
    ({"RANK": "2"}, [], "RANK=2 WORLD_SIZE=2: expected 0 <= RANK < WORLD_SIZE"),
    ({}, ["--lm-eval", "wikitext"], "--lm-eval cannot run under torchrun"),
])
def test_bad_torchrun_settings_are_bad_input(env: dict[str, str], flags: list[str], message: str, cli,
                                             tiny_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused before any rendezvous or model load: exit 2, one line."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", **env}.items():
        monkeypatch.setenv(name, value)
    result = cli("eval", tiny_base, "--data", ASSETS / "tiny_validation.jsonl", *flags)
    assert result.code == 2 and message in result.err, result.err
    assert len(result.err.strip().splitlines()) == 1
