"""scripts/gpu_check.py without a GPU: the one-line refusal, its FLOP count, and (slow) its
training rows as a CPU smoke run, lmctl and TRL timed by the same callback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))


def test_exits_2_with_one_line_without_cuda() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LMCTL_GPU_CHECK_ON_CPU"}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py")], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine"]


@pytest.mark.parametrize("shape", ["135M", "0.5B", "1.5B"])
def test_mfu_counts_every_matmul_of_the_shape(shape: str) -> None:
    """N in the MFU formula is the weights of the model's Linear layers (the tied head included):
    counted from config, checked against the model built on the meta device."""
    import torch
    from gpu_train import SHAPES, flops_per_token, matmul_params
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, tie_word_embeddings=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert matmul_params(config) == linear
    heads, layers = config.num_attention_heads, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    assert flops_per_token(config, 2048) == 4 * linear + 6 * layers * 2048 * heads * head_dim


def test_first_divergence() -> None:
    from gpu_infer import _first_divergence

    assert _first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert _first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert _first_divergence([1, 2], [1, 2, 3]) == 2  # one stopped early


@pytest.mark.slow
def test_cpu_smoke_trains_lmctl_and_trl_under_one_clock(tiny_base: Path, tmp_path: Path) -> None:
    pytest.importorskip("trl")
    env = {**os.environ, "LMCTL_GPU_CHECK_ON_CPU": "1", "LMCTL_HOME": str(tmp_path / "home"),
           "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--tokenizer", str(tiny_base),
                          "--skip", "timing,serve,eval,lm-eval,launch"], capture_output=True, text=True, timeout=900,
                         env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| train tiny/64 b2 ")]
    assert [r.split(" | ")[0] for r in rows] == ["| train tiny/64 b2 lmctl", "| train tiny/64 b2 TRL"]
    assert all(" tok/s" in r and "FAILED" not in r and " 0 tok/s" not in r for r in rows)
