"""`data.streaming: true`: training from an IterableDataset, resumed after SIGKILL at the same example."""

from __future__ import annotations

from pathlib import Path

from conftest import ASSETS, assert_same_losses, train_killed_at


def test_streaming_plan_and_max_steps(cli, tiny_config: Path) -> None:
    result = cli("train", tiny_config, "--set", "data.streaming=true", "--set", "train.max_steps=null", "--dry-run")
    assert result.code == 2 and "needs train.max_steps" in result.err
    plan = cli("train", tiny_config, "--set", "data.streaming=true", "--dry-run", "--json")
    assert plan.code == 0, plan.err
    assert plan.json["streaming"] and plan.json["train_rows"] == 0 and plan.json["cache_hit"] is None
    assert plan.json["validation_rows"] == 8 and plan.json["lint"]["eos_labels"] > 0


def test_streaming_resumes_after_sigkill_at_the_same_example(cli, tiny_config: Path, tmp_path: Path) -> None:
    """The stream wraps around the 48-row file several times in 40 steps; a run killed after a
    checkpoint and resumed must log exactly the losses of an uninterrupted run, which it can
    only do if it trains on the same examples in the same order."""
    common = ["--set", "data.streaming=true", "--set", "train.max_steps=40", "--set", "train.save_every=2",
              "--set", "train.eval_every=1000", "--set", "train.log_every=2", "--set", "data.validation=null",
              "--set", f"data.train={ASSETS / 'tiny_train.jsonl'}"]
    straight = cli("train", tiny_config, *common, "--set", "output.run_name=straight", "--json")
    assert straight.code == 0, straight.err

    run_dir = tmp_path / "runs" / "killed"
    train_killed_at(tiny_config, [*common, "--set", "output.run_name=killed"], run_dir / "checkpoints" / "step-000004")
    assert max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*")) < 40

    resumed = cli("train", tiny_config, *common, "--set", "output.run_name=killed", "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json["steps"] == 40 and resumed.json["resumed_from"] is not None
    assert_same_losses(Path(straight.json["run_dir"]), run_dir)
