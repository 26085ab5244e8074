"""Shared fixtures: a tiny Llama and tokenizer built from config, an isolated LMCTL_HOME.

Nothing here downloads: the tokenizer is trained with `tokenizers` on tests/assets and the
model is built from a LlamaConfig, then saved exactly like a hub model directory, so the
loading code under test is the one users run against real models.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from http_wait import free_port  # noqa: F401  (the one definition, in scripts/; tests import it from here)

ASSETS = Path(__file__).parent / "assets"
REPO = Path(__file__).parent.parent


def build_tiny_model(out: Path) -> Path:
    """A 2-layer Llama with a 400-token byte-level BPE vocabulary (about 140 merges), saved as safetensors + tokenizer files."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in (ASSETS / "tiny_train.jsonl").read_text().splitlines()]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    # A ChatML-like template whose end-of-turn marker is EOS, as in SmolLM2.
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-base"))


@pytest.fixture(autouse=True)
def lmctl_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own LMCTL_HOME and embedded MLflow store under tmp_path."""
    home = tmp_path / "home"
    monkeypatch.setenv("LMCTL_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("LMCTL_API_KEYS", raising=False)
    return home


def tiny_config_dict(base: Path, runs: Path) -> dict:
    """The tiny training config (6 steps, checkpoints at 3 and 6) as a dict, for tests to adjust."""
    return {
        "model": {"base": str(base)},
        "data": {"train": str(ASSETS / "tiny_train.jsonl"), "validation": str(ASSETS / "tiny_validation.jsonl"),
                 "max_length": 64},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "eval_every": 3, "save_every": 3, "log_every": 1},
        "output": {"dir": str(runs), "run_name": "tiny"},
        "registry": {"name": "tiny"},
    }


@pytest.fixture
def tiny_config(tmp_path: Path, tiny_base: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(tiny_base, tmp_path / "runs")))
    return path


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    @property
    def json(self) -> dict:
        return json.loads(self.out)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """Run lmctl in-process (same boundary as the console script) and capture its output."""
    from lmctl.cli import main

    def run(*args: str) -> CliResult:
        capsys.readouterr()
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return CliResult(code, out, err)

    return run


def run_subprocess(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the real console entry point in a child process."""
    return subprocess.run([sys.executable, "-m", "lmctl", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def trainer_losses(run_dir: Path) -> dict[int, float]:
    """step -> training loss, from the Trainer state of the run's newest Trainer checkpoint."""
    newest = max((run_dir / "trainer").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    history = json.loads((newest / "trainer_state.json").read_text())["log_history"]
    return {h["step"]: h["loss"] for h in history if "loss" in h}


def assert_same_losses(expected_run: Path, actual_run: Path) -> None:
    """Both runs logged the same steps with the same losses (CPU: equal to 1e-5 relative)."""
    expected, actual = trainer_losses(expected_run), trainer_losses(actual_run)
    assert sorted(actual) == sorted(expected)
    for step, loss in expected.items():
        assert abs(actual[step] - loss) <= 1e-5 * abs(loss), (step, actual[step], loss)


def train_killed_at(config: Path, args: list[str], sealed: Path, timeout: float = 180) -> None:
    """Run `lmctl train CONFIG ARGS` in a child process and SIGKILL it once checkpoint `sealed` exists."""
    import signal
    import time

    proc = subprocess.Popen([sys.executable, "-m", "lmctl", "train", str(config), *args],
                            stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + timeout
    while not (sealed / "lmctl.json").exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"training ended before {sealed.name}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL


@pytest.fixture(scope="session")
def sealed_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Path:
    """One checkpoint trained with the tiny config, once per session, in-process with its own
    LMCTL_HOME. Read-only: tests get copies through `trained_checkpoint` / `copy_checkpoint`."""
    from lmctl.cli import main

    root = tmp_path_factory.mktemp("sealed")
    (root / "tiny.yaml").write_text(yaml.safe_dump(tiny_config_dict(tiny_base, root / "runs")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMCTL_HOME", str(root / "home"))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        assert main(["train", str(root / "tiny.yaml")]) == 0
    return root / "runs" / "tiny" / "checkpoints" / "step-000006"


def copy_checkpoint(sealed: Path, into: Path) -> Path:
    """A private copy of a sealed checkpoint (same directory name, so served model ids match)."""
    import shutil

    return Path(shutil.copytree(sealed, into / sealed.name))


@pytest.fixture
def trained_checkpoint(sealed_checkpoint: Path, tmp_path: Path) -> Path:
    """A checkpoint of the tiny config this test may tamper with: a copy of the session's one."""
    return copy_checkpoint(sealed_checkpoint, tmp_path / "trained")
