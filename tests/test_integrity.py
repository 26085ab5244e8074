"""The tokenizer lock: a changed file in a checkpoint stops eval, serve and verify (exit 4)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import ASSETS, free_port, run_subprocess
from lmctl import checkpoint
from lmctl.errors import IntegrityError


def _tamper(ckpt: Path, name: str = "tokenizer_config.json") -> Path:
    path = ckpt / name
    data = json.loads(path.read_text())
    data["eos_token"] = "<unk>"
    path.write_text(json.dumps(data))
    return path


def test_edited_tokenizer_file_fails_eval_serve_and_verify(cli, trained_checkpoint: Path) -> None:
    edited = _tamper(trained_checkpoint)
    data = ASSETS / "tiny_validation.jsonl"
    result = cli("eval", trained_checkpoint, "--data", data, "--json")
    assert result.code == 4 and str(edited) in result.err and "sha256 mismatch" in result.err
    assert result.out == "" and "Traceback" not in result.err
    verify = cli("registry", "verify", trained_checkpoint)
    assert verify.code == 4 and str(edited) in verify.err
    served = run_subprocess("serve", str(trained_checkpoint), "--port", str(free_port()), timeout=120)
    assert served.returncode == 4, served.stderr
    assert str(edited) in served.stderr and "Traceback" not in served.stderr


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
        with checkpoint.staging_dir(final) as stage:
            (stage / "adapter_model.safetensors").write_bytes(b"partial")
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []
