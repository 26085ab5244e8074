"""The tokenizer lock: a changed file in a checkpoint stops eval, serve and verify (exit 4)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from conftest import ASSETS, free_port
from lmctl import atomic, checkpoint, tokenizer_lock
from lmctl.errors import IntegrityError


def _tamper(ckpt: Path, name: str = "tokenizer_config.json") -> Path:
    path = ckpt / name
    data = json.loads(path.read_text())
    data["eos_token"] = "<unk>"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.timeout(600)  # serve runs in-process: were verification skipped, it would serve forever
def test_edited_tokenizer_file_fails_eval_serve_and_verify(cli, trained_checkpoint: Path) -> None:
    edited = _tamper(trained_checkpoint)
    data = ASSETS / "tiny_validation.jsonl"
    result = cli("eval", trained_checkpoint, "--data", data, "--json")
    assert result.code == 4 and str(edited) in result.err and "sha256 mismatch" in result.err
    assert result.out == "" and "Traceback" not in result.err
    verify = cli("registry", "verify", trained_checkpoint)
    assert verify.code == 4 and str(edited) in verify.err
    served = cli("serve", trained_checkpoint, "--port", free_port())
    assert served.code == 4, served.err
    assert str(edited) in served.err and "Traceback" not in served.err


def test_register_refuses_a_tampered_checkpoint(cli, trained_checkpoint: Path) -> None:
    _tamper(trained_checkpoint, "tokenizer.json")
    result = cli("register", trained_checkpoint, "--name", "tiny", "--json")
    assert result.code == 4
    assert cli("registry", "list", "--json").json["versions"] == []


def test_missing_and_unlisted_files(trained_checkpoint: Path) -> None:
    checkpoint.verify(trained_checkpoint)
    added = trained_checkpoint / "added_tokens.json"
    added.write_text('{"<new>": 999}')
    with pytest.raises(IntegrityError, match="added after sealing"):
        checkpoint.verify(trained_checkpoint)
    added.unlink()
    (trained_checkpoint / "adapter_config.json").unlink()
    with pytest.raises(IntegrityError, match="missing from checkpoint"):
        checkpoint.verify(trained_checkpoint)


def test_directory_without_manifest_is_not_a_checkpoint(cli, trained_checkpoint: Path) -> None:
    (trained_checkpoint / "lmctl.json").unlink()
    result = cli("register", trained_checkpoint, "--name", "tiny")
    assert result.code == 2 and "not an lmctl checkpoint" in result.err


def test_corrupt_manifest_is_integrity_failure(trained_checkpoint: Path) -> None:
    (trained_checkpoint / "lmctl.json").write_text("{ not json")
    with pytest.raises(IntegrityError, match="corrupt manifest"):
        checkpoint.read_manifest(trained_checkpoint)


def test_staging_dir_leaves_nothing_on_failure(tmp_path: Path) -> None:
    final = tmp_path / "ckpt"
    with pytest.raises(RuntimeError):
        with atomic.staging_dir(final) as stage:
            (stage / "adapter_model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("keep_existing", [False, True])
def test_staging_dir_replaces_or_keeps_an_existing_final(tmp_path: Path, keep_existing: bool) -> None:
    final = tmp_path / "entry"
    final.mkdir()
    (final / "data").write_text("theirs")
    with atomic.staging_dir(final, keep_existing=keep_existing) as stage:
        (stage / "data").write_text("ours")
    assert (final / "data").read_text() == ("theirs" if keep_existing else "ours")
    assert os.listdir(tmp_path) == ["entry"]


def _reseal(ckpt: Path) -> None:
    """Seal the directory again as someone covering their tracks would: every hash and the
    tokenizer lock recomputed, so `checkpoint.verify` passes."""
    from lmctl.loading import load_tokenizer

    manifest = checkpoint.read_manifest(ckpt)
    (ckpt / "lmctl.json").unlink()
    fields = manifest.model_dump(exclude={"files"})
    fields["tokenizer"] = tokenizer_lock.tokenizer_fingerprint(load_tokenizer(str(ckpt)), ckpt)
    checkpoint.seal(ckpt, fields)
    checkpoint.verify(ckpt)


def test_register_refuses_a_resealed_tokenizer_that_differs_from_the_base(cli, trained_checkpoint: Path) -> None:
    from lmctl.loading import load_tokenizer

    _tamper(trained_checkpoint)  # EOS becomes <unk>
    _reseal(trained_checkpoint)
    result = cli("register", trained_checkpoint, "--name", "tiny")
    assert result.code == 4 and "differs from base model" in result.err and "eos token id" in result.err
    assert "Traceback" not in result.err

    config = json.loads((trained_checkpoint / "tokenizer_config.json").read_text())
    config["eos_token"] = "</s>"
    (trained_checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(str(trained_checkpoint))
    tok.add_tokens(["<smuggled>"])  # a new vocabulary row the adapter knows nothing about
    tok.save_pretrained(trained_checkpoint)
    _reseal(trained_checkpoint)
    result = cli("register", trained_checkpoint, "--name", "tiny")
    assert result.code == 4 and "<smuggled>" in result.err and "saves no input embedding rows" in result.err
    assert cli("registry", "list", "--json").json["versions"] == []


def test_added_tokens_register_only_with_their_saved_rows(cli, tiny_config: Path) -> None:
    from safetensors.torch import load_file, save_file

    trained = cli("train", tiny_config, "--set", "model.add_special_tokens=['<tool>']", "--set", "train.max_steps=2",
                  "--set", "train.save_every=2", "--json")
    assert trained.code == 0, trained.err
    ckpt = Path(trained.json["checkpoint"])
    reg = cli("register", ckpt, "--name", "tools", "--json")
    assert reg.code == 0, reg.err
    assert list(reg.json["added_tokens"]) == ["<tool>"]

    weights = load_file(str(ckpt / "adapter_model.safetensors"))
    kept = {k: v for k, v in weights.items() if "trainable_tokens" not in k}
    assert len(kept) < len(weights)
    save_file(kept, str(ckpt / "adapter_model.safetensors"), metadata={"format": "pt"})
    _reseal(ckpt)
    result = cli("register", ckpt, "--name", "tools")
    assert result.code == 4 and "<tool>" in result.err and "embedding rows" in result.err


def test_resume_with_another_tokenizer_is_refused(cli, tiny_config: Path) -> None:
    first = cli("train", tiny_config, "--set", "train.max_steps=3", "--json")
    assert first.code == 0, first.err
    run_dir = Path(first.json["run_dir"])
    before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    resumed = cli("train", tiny_config, "--set", "model.add_special_tokens=['<tool>']", "--json")
    assert resumed.code == 4, resumed.err
    assert "cannot resume" in resumed.err and "vocab_size 401 (expected 400)" in resumed.err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == before
    same = cli("train", tiny_config, "--set", "train.max_steps=4", "--set", "train.save_every=4", "--json")
    assert same.code == 0 and same.json["resumed_from"].endswith("checkpoint-3")


def test_untied_output_head_saves_the_added_rows_too(cli, tiny_config: Path, tiny_base: Path, tmp_path: Path) -> None:
    import torch
    import yaml
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from lmctl.loading import load_for_inference
    from lmctl.modelref import resolve

    untied = tmp_path / "untied-base"
    config = AutoConfig.from_pretrained(tiny_base)
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(untied, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(untied)
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["model"] = {"base": str(untied), "add_special_tokens": ["<tool>"]}
    cfg["train"].update(max_steps=2, save_every=2)
    tiny_config.write_text(yaml.safe_dump(cfg))
    trained = cli("train", tiny_config, "--json")
    assert trained.code == 0, trained.err
    ckpt = Path(trained.json["checkpoint"])
    with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as fh:
        deltas = [k for k in fh.keys() if k.endswith("trainable_tokens_delta")]
    assert any("lm_head" in k for k in deltas) and any("embed_tokens" in k for k in deltas)
    first, second = (load_for_inference(resolve(str(ckpt))) for _ in range(2))
    ids = torch.tensor([first.tokenizer("<tool> reads")["input_ids"]])
    with torch.no_grad():  # the head's new row comes from the adapter, not a random resize
        assert torch.equal(first.model(input_ids=ids).logits, second.model(input_ids=ids).logits)
    assert cli("register", ckpt, "--name", "untied").code == 0


def test_checkpoint_sealed_by_the_untyped_manifest_code_still_loads_byte_for_byte(tmp_path: Path) -> None:
    """tests/assets/old_checkpoint was written by lmctl before Manifest.data/config/training were
    typed: it verifies, its typed fields read back, and sealing the same facts again with the
    typed models writes the very same lmctl.json bytes."""
    old = ASSETS / "old_checkpoint"
    manifest = checkpoint.verify(old)
    raw = json.loads((old / "lmctl.json").read_text())
    assert manifest.trust_remote_code is False
    assert manifest.data.train is not None and manifest.data.train.sha256 == raw["data"]["train"]["sha256"]
    assert [split for split, _ in manifest.data.splits()] == ["train", "validation"]
    assert manifest.training.step == raw["training"]["step"] == 6
    assert manifest.training.mlflow_run_id == raw["training"]["mlflow_run_id"]
    assert manifest.config.lora.r == raw["config"]["lora"]["r"] and manifest.config.registry.name == "tiny"

    resealed = tmp_path / "resealed"
    shutil.copytree(old, resealed)
    (resealed / "lmctl.json").unlink()
    facts = {"created_at": manifest.created_at, "lmctl_version": manifest.lmctl_version, "tokenizer": manifest.tokenizer,
             "base_model": manifest.base_model, "libraries": manifest.libraries,
             "data": checkpoint.ManifestData(train=manifest.data.train, validation=manifest.data.validation),
             "config": raw["config"], "training": checkpoint.TrainingInfo(**raw["training"])}
    checkpoint.seal(resealed, facts)
    assert (resealed / "lmctl.json").read_bytes() == (old / "lmctl.json").read_bytes()


def test_manifest_keeps_keys_it_does_not_type() -> None:
    """An int alpha stays an int and unknown config/training keys survive a read and a write."""
    raw = json.loads((ASSETS / "old_checkpoint" / "lmctl.json").read_text())
    raw["config"]["lora"]["alpha"] = 16
    raw["config"]["some_future_section"] = {"key": [1, 2]}
    raw["training"]["learning_rate"] = 0.001
    raw["data"] = {"train": raw["data"]["train"], "validation": None}
    assert checkpoint.Manifest.model_validate(raw).model_dump(mode="json") == raw
