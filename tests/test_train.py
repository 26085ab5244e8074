"""Training inputs are validated before anything is written; a held run lock means exit 5."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import assert_same_losses, train_killed_at


def test_dry_run_validates_and_writes_nothing(cli, tiny_config: Path, tmp_path: Path) -> None:
    result = cli("train", tiny_config, "--dry-run", "--json")
    assert result.code == 0, result.err
    plan = result.json
    assert plan["train_rows"] == 48 and plan["validation_rows"] == 8 and plan["max_steps"] == 6
    assert not (tmp_path / "runs").exists()


def test_busy_run_exits_5(cli, tiny_config: Path, tmp_path: Path) -> None:
    (tmp_path / "runs").mkdir()
    with FileLock(str(tmp_path / "runs" / ".tiny.lock")):
        result = cli("train", tiny_config)
    assert result.code == 5 and "another process" in result.err


def test_bad_data_is_named(cli, tiny_config: Path, tmp_path: Path) -> None:
    missing = tmp_path / "missing.jsonl"
    result = cli("train", tiny_config, "--set", f"data.train={missing}")
    assert result.code == 2 and str(missing) in result.err
    result = cli("train", tiny_config, "--set", "data.text_field=body")
    assert result.code == 2 and "no field 'body'" in result.err
    unsupported = tmp_path / "data.xml"
    unsupported.write_text("<x/>")
    result = cli("train", tiny_config, "--set", f"data.train={unsupported}")
    assert result.code == 2 and "unsupported data format" in result.err
    assert not (tmp_path / "runs").exists()


def test_remote_code_is_refused_unless_trusted(cli, tiny_config: Path, tiny_base: Path, tmp_path: Path) -> None:
    custom = tmp_path / "custom-model"
    shutil.copytree(tiny_base, custom)
    config = json.loads((custom / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (custom / "config.json").write_text(json.dumps(config))
    result = cli("train", tiny_config, "--set", f"model.base={custom}", "--dry-run")
    assert result.code == 2 and "refusing to run it" in result.err


def test_unknown_base_model_is_bad_input(cli, tiny_config: Path) -> None:
    result = cli("train", tiny_config, "--set", "model.base=smollm2-135m", "--dry-run")
    assert result.code == 2 and "lmctl models pull smollm2-135m" in result.err
    result = cli("train", tiny_config, "--set", "model.base=./nowhere", "--dry-run")
    assert result.code == 2


def test_resume_auto_continues_from_the_trainer_checkpoint(cli, tiny_config: Path) -> None:
    first = cli("train", tiny_config, "--set", "train.max_steps=3", "--json")
    assert first.code == 0, first.err
    second = cli("train", tiny_config, "--set", "train.max_steps=6", "--json")
    assert second.code == 0, second.err
    assert second.json["resumed_from"].endswith("checkpoint-3") and second.json["steps"] == 6
    fresh = cli("train", tiny_config, "--set", "train.max_steps=3", "--resume", "never", "--json")
    assert fresh.code == 0 and fresh.json["resumed_from"] is None
    archived = [p for p in Path(fresh.json["run_dir"]).parent.iterdir() if p.name.startswith("tiny.")]
    assert len(archived) == 1 and (archived[0] / "checkpoints" / "step-000006" / "lmctl.json").is_file()


def test_sigkill_then_resume_matches_an_uninterrupted_run(cli, tiny_config: Path, tmp_path: Path) -> None:
    """Kill a real training process after its first checkpoint; resuming must finish the run
    with the same losses as a run that was never interrupted (CPU: equal to 1e-5 relative)."""
    common = ["--set", "train.max_steps=60", "--set", "train.save_every=2", "--set", "train.eval_every=1000",
              "--set", "train.log_every=2", "--set", "data.validation=null"]
    straight = cli("train", tiny_config, *common, "--set", "output.run_name=straight", "--json")
    assert straight.code == 0, straight.err

    run_dir = tmp_path / "runs" / "killed"
    train_killed_at(tiny_config, [*common, "--set", "output.run_name=killed"], run_dir / "checkpoints" / "step-000002",
                    timeout=120)
    killed_at = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert killed_at < 60, "the process finished before it was killed"

    resumed = cli("train", tiny_config, *common, "--set", "output.run_name=killed", "--json")
    assert resumed.code == 0, resumed.err
    assert resumed.json["steps"] == 60 and resumed.json["resumed_from"] is not None
    assert_same_losses(Path(straight.json["run_dir"]), run_dir)


def test_resume_auto_skips_a_checkpoint_killed_mid_save(cli, tiny_config: Path) -> None:
    first = cli("train", tiny_config, "--set", "train.max_steps=3", "--json")
    assert first.code == 0
    run_dir = Path(first.json["run_dir"])
    partial = run_dir / "trainer" / "checkpoint-5"  # what a kill during the Trainer's save leaves
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")
    second = cli("train", tiny_config, "--set", "train.max_steps=6", "--json")
    assert second.code == 0, second.err
    assert second.json["resumed_from"].endswith("checkpoint-3")


def test_training_is_tracked_in_mlflow(cli, tiny_config: Path) -> None:
    from lmctl import tracking

    result = cli("train", tiny_config, "--json")
    assert result.code == 0, result.err
    client = tracking.client()
    run = client.get_run(result.json["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["lora.r"] == "4" and run.data.params["train.max_steps"] == "6"
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses] == [1, 2, 3, 4, 5, 6]
    assert {"grad_norm", "learning_rate", "eval_loss", "tokens_per_s"} <= set(run.data.metrics)
    inputs = {d.tags[0].value: d.dataset for d in run.inputs.dataset_inputs}
    manifest = json.loads((Path(result.json["checkpoint"]) / "lmctl.json").read_text())
    assert inputs["train"].digest == manifest["data"]["train"]["sha256"][:32]
    assert "validation" in inputs
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["loss_curve.png"]
    assert (Path(result.json["run_dir"]) / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_retention_keeps_last_n_plus_best_and_early_stopping_stops(cli, tiny_config: Path) -> None:
    # A threshold of 10 nats: no evaluation counts as an improvement, so patience 3 runs out.
    result = cli("train", tiny_config, "--set", "train.max_steps=40", "--set", "train.eval_every=2",
                 "--set", "train.save_every=2", "--set", "train.keep_last=2",
                 "--set", "train.early_stopping_patience=3", "--set", "train.early_stopping_threshold=10", "--json")
    assert result.code == 0, result.err
    out = result.json
    assert out["stopped_early"] and out["steps"] <= 8
    best = int(Path(out["best_checkpoint"]).name.removeprefix("step-"))
    kept = sorted(int(p.name.removeprefix("step-")) for p in (Path(out["run_dir"]) / "checkpoints").glob("step-*"))
    assert kept == sorted({best, out["steps"] - 2, out["steps"]})
    trainer_kept = sorted(int(p.name.split("-")[1]) for p in (Path(out["run_dir"]) / "trainer").glob("checkpoint-*"))
    assert trainer_kept == kept


def test_early_stopping_without_validation_is_bad_input(cli, tiny_config: Path) -> None:
    result = cli("train", tiny_config, "--set", "data.validation=null", "--set", "train.early_stopping_patience=2")
    assert result.code == 2 and "needs validation data" in result.err


def test_dora_rslora_and_checkpointing_train(cli, tiny_config: Path) -> None:
    result = cli("train", tiny_config, "--set", "lora.use_dora=true", "--set", "lora.use_rslora=true",
                 "--set", "train.gradient_checkpointing=true", "--set", "lora.target_modules=[q_proj,v_proj]",
                 "--set", "train.max_steps=2", "--set", "train.save_every=2", "--json")
    assert result.code == 0, result.err
    adapter = json.loads((Path(result.json["checkpoint"]) / "adapter_config.json").read_text())
    assert adapter["use_dora"] and adapter["use_rslora"] and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="the refusal is for CPU-only machines; CUDA hosts run QLoRA")
def test_qlora_on_cpu_is_a_clear_bad_input(cli, tiny_config: Path) -> None:
    result = cli("train", tiny_config, "--set", "lora.quantization=4bit", "--dry-run")
    assert result.code == 2 and "needs a CUDA GPU" in result.err
    result = cli("train", tiny_config, "--set", "model.dtype=float16", "--dry-run")
    assert result.code == 2 and "float16 needs a CUDA GPU" in result.err


def test_dry_run_estimates_memory_from_shapes(cli, tiny_config: Path) -> None:
    plan = cli("train", tiny_config, "--dry-run", "--json").json
    memory = plan["memory"]
    # tiny Llama, 2 blocks; LoRA r=4 adds r x (in + out) to each of the 7 linear layers per block:
    # q 32->32, k 32->16, v 32->16, o 32->32, gate 32->64, up 32->64, down 64->32
    per_block = 4 * sum(i + o for i, o in [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)])
    assert memory["trainable_params"] == 2 * per_block == 4096
    parts = (memory["weights_gb"] + memory["optimizer_gb"] + memory["activations_gb"] + memory["logits_gb"]
             + memory["data_gb"])
    assert abs(memory["estimated_peak_gb"] - parts - memory["runtime_gb"]) < 0.01
    big = ("--set", "train.batch_size=256", "--dry-run", "--json")  # GB rounded to 3 places: a shape that shows
    plain = cli("train", tiny_config, *big).json
    with_ckpt = cli("train", tiny_config, "--set", "train.gradient_checkpointing=true", *big).json
    assert with_ckpt["memory"]["activations_gb"] < plain["memory"]["activations_gb"]


def test_added_special_tokens_are_trained_saved_and_loaded(cli, tiny_config: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    from lmctl.loading import load_for_inference, load_tokenizer
    from lmctl.modelref import resolve

    result = cli("train", tiny_config, "--set", "model.add_special_tokens=['<tool>', '</tool>']",
                 "--set", "train.max_steps=2", "--set", "train.save_every=2", "--json")
    assert result.code == 0, result.err
    ckpt = Path(result.json["checkpoint"])
    tok = load_tokenizer(str(ckpt))
    tool_id = tok.convert_tokens_to_ids("<tool>")
    assert tok.tokenize("<tool>") == ["<tool>"] and tool_id >= 200
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
        token_keys = [k for k in f.keys() if "token_adapter" in k or "trainable_tokens" in k]
    assert token_keys, "the rows of the added tokens must be saved with the adapter"
    loaded = load_for_inference(resolve(str(ckpt)))
    assert loaded.model.config.vocab_size >= len(tok)
    # rows of added tokens come from the adapter, not from a random resize: two loads agree
    import torch

    ids = torch.tensor([tok("<tool> reads </tool>")["input_ids"]])
    again = load_for_inference(resolve(str(ckpt)))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, again.model(input_ids=ids).logits)
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "<tool> The model reads the adapter. </tool>"}\n')
    assert cli("eval", ckpt, "--data", data, "--json").code == 0


def test_warmup_ratio_is_passed_as_a_share_of_the_steps(tiny_config: Path) -> None:
    """transformers 5 has no warmup_ratio; a warmup_steps below 1 is read as a share of the steps."""
    from lmctl.config import load_config
    from lmctl.train.plan import PlannedRun
    from lmctl.train.trainer import training_args

    run = PlannedRun(load_config(tiny_config), "never")
    for ratio, total, expected in [(0.05, 6, 1), (0.1, 200, 20), (0.0, 50, 0), (0.5, 7, 4)]:
        cfg = load_config(tiny_config, [f"train.warmup_ratio={ratio}", f"train.max_steps={total}"])
        args = training_args(cfg, run, sequences=48)
        assert args.max_steps == total and args.get_warmup_steps(total) == expected, (ratio, total)
