"""The fused, chunked head + cross-entropy (lmctl.chunked_loss) and its install into training
(lmctl.train.headloss): equal to transformers' own loss and gradients in fp32, and a real
`lmctl train` with a large vocabulary that stays far below what full logits cost."""

from __future__ import annotations

import copy
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_config_dict

torch = pytest.importorskip("torch")


def _plain_loss(hidden, weight, bias, labels, num_items=None, softcap=None, shift_labels=None):
    """transformers' own ForCausalLMLoss over full logits, as the model computes it."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    logits = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return ForCausalLMLoss(logits, labels, weight.shape[0], num_items_in_batch=num_items, shift_labels=shift_labels)


def _inputs(batch=3, length=11, hidden=16, vocab=97, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, length, hidden, generator=g, dtype=torch.float64).float().requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, :4] = -100  # a masked prompt
    labels[1, 7:] = -100  # right padding
    labels[2, 5] = -100  # a packed row: the boundary between two examples is not learned
    return h, w, b, labels


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, [t for t in tensors if t is not None])


def _close(a, b, rel=1e-5):
    scale = b.abs().max().clamp(min=1e-12)
    assert (a - b).abs().max() / scale < rel, f"max rel diff {(a - b).abs().max() / scale}"


@pytest.mark.parametrize("chunk", [1, 3, 7, 32, 1000])
@pytest.mark.parametrize("num_items", [None, 17])
def test_loss_and_gradients_equal_the_plain_loss(chunk: int, num_items: int | None) -> None:
    from lmctl.chunked_loss import causal_lm_loss

    h, w, b, labels = _inputs()
    items = None if num_items is None else torch.tensor(num_items)
    plain = _plain_loss(h, w, b, labels, items)
    fused = causal_lm_loss(h, labels, w, b, num_items_in_batch=items, chunk=chunk)
    assert abs(fused.item() - plain.item()) < 1e-5
    for got, want in zip(_grads(fused * 3, h, w, b), _grads(plain * 3, h, w, b)):
        _close(got, want)


def test_softcap_shift_labels_and_a_frozen_head() -> None:
    from lmctl.chunked_loss import causal_lm_loss

    h, w, b, labels = _inputs(bias=False)
    w.requires_grad_(False)
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:].contiguous()
    plain = _plain_loss(h, w, None, labels, softcap=5.0, shift_labels=shifted)
    fused = causal_lm_loss(h, None, w, None, shift_labels=shifted, softcap=5.0, chunk=4)
    assert abs(fused.item() - plain.item()) < 1e-5
    _close(_grads(fused, h)[0], _grads(plain, h)[0])
    fused = causal_lm_loss(h, labels, w, None, chunk=4)
    fused.backward()
    assert w.grad is None  # a frozen head gets no vocab x hidden gradient


def test_no_gradients_are_made_under_no_grad(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-training eval runs under no_grad: only the loss, no gradient matmuls."""
    from lmctl import chunked_loss

    made = []
    real = chunked_loss._chunk_loss_and_grad
    monkeypatch.setattr(chunked_loss, "_chunk_loss_and_grad", lambda *a: made.append(a[-1]) or real(*a))
    h, w, b, labels = _inputs()
    with torch.no_grad():
        loss = chunked_loss.causal_lm_loss(h, labels, w, b, chunk=5)
    assert made and not any(made)
    assert abs(loss.item() - _plain_loss(h, w, b, labels).item()) < 1e-5


def test_all_ignored_is_nan_like_the_plain_loss() -> None:
    from lmctl.chunked_loss import causal_lm_loss

    h, w, b, labels = _inputs()
    labels[:] = -100
    assert torch.isnan(causal_lm_loss(h, labels, w, b)) and torch.isnan(_plain_loss(h, w, b, labels))


def test_chunk_rows_follow_the_byte_budget() -> None:
    from lmctl.chunked_loss import chunk_bytes_per_row, chunk_rows

    assert chunk_bytes_per_row(151936, 4) == 151936 * 16
    assert chunk_rows(151936, 4) == (256 << 20) // (151936 * 16)  # 110 rows of a Qwen2.5 vocabulary
    assert chunk_rows(49152, 2, budget_bytes=1 << 30) == (1 << 30) // (49152 * 12)
    assert chunk_rows(10**9, 4) == 1


def _tiny_llama(vocab: int = 300, **config: object):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        **config))


def _peft(model, targets, **lora):
    from peft import LoraConfig, TaskType, get_peft_model

    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, **lora}
    model = get_peft_model(model, LoraConfig(target_modules=targets, task_type=TaskType.CAUSAL_LM, **lora))
    for name, p in model.named_parameters():  # B starts at zero: give every LoRA weight a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("targets, extra", [
    ("all-linear", {}),
    (["q_proj", "v_proj", "lm_head"], {}),  # LoRA on the (tied) output head: folded in as W + s B A
    (["q_proj"], {"modules_to_save": ["lm_head"]}),  # a trained copy of the head
])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_gradients_equal_kernels_none(targets, extra, checkpointing: bool) -> None:
    from lmctl.train.headloss import install

    plain = _peft(_tiny_llama(), targets, **extra)
    fused = copy.deepcopy(plain)
    assert install(plain, "none") == "none"
    assert install(fused, "auto") == "chunked"
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[1, 20:] = -100
    losses = {}
    for name, model in (("plain", plain), ("fused", fused)):
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        out = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40))
        out.loss.backward()
        losses[name] = out.loss.item()
        # the fused path never made logits: the head passed the hidden states through
        assert out.logits.shape[-1] == (32 if name == "fused" else 300)
    assert abs(losses["plain"] - losses["fused"]) < 1e-5
    trained = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]
    assert trained and len(trained) == len([p for p in fused.parameters() if p.requires_grad])
    for (name, p), q in zip(trained, (q for q in fused.parameters() if q.requires_grad)):
        _close(q.grad, p.grad)


def test_models_it_cannot_express_keep_the_plain_loss(caplog: pytest.LogCaptureFixture) -> None:
    from lmctl.train.headloss import install

    model = _tiny_llama()
    model.config.final_logit_softcapping = 30.0
    with caplog.at_level("INFO", logger="lmctl.train"):
        assert install(_peft(model, ["q_proj"]), "auto") == "none"
    assert "final_logit_softcapping" in caplog.text
    assert install(_peft(_tiny_llama(), ["q_proj", "lm_head"], lora_dropout=0.1), "auto") == "none"
    model = _peft(_tiny_llama(), ["q_proj"])
    model.get_base_model().lm_head = torch.nn.Sequential(model.get_base_model().lm_head)
    assert install(model, "auto") == "none"


def test_kernels_liger_without_a_gpu_is_bad_input(tiny_base: Path, tmp_path: Path, cli) -> None:  # type: ignore[no-untyped-def]
    cfg = tiny_config_dict(tiny_base, tmp_path / "runs")
    cfg["train"]["kernels"] = "liger"
    path = tmp_path / "liger.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = cli("train", path)
    assert result.code == 2
    assert "train.kernels=liger" in result.err


_PEAK = """
import json, resource, sys
from lmctl.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), file=sys.stderr)
"""


def _large_vocab_base(tiny_base: Path, out: Path, vocab: int) -> Path:
    """The tiny test model and tokenizer, with a `vocab`-row (tied) embedding: a big vocabulary
    on a model whose body costs nothing."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_base)
    config.vocab_size = vocab
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    for name in tiny_base.iterdir():
        if name.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(name, out / name.name)
    return out


def _train_peak_mb(base: Path, tmp_path: Path, kernels: str, batch: int, length: int) -> float:
    cfg = tiny_config_dict(base, tmp_path / f"runs-{kernels}-{base.name}")
    cfg["data"].pop("validation")
    cfg["data"]["max_length"] = length
    cfg["train"].update(max_steps=2, batch_size=batch, save_every=100, log_every=1, kernels=kernels)
    path = tmp_path / f"{kernels}-{base.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    done = subprocess.run([sys.executable, "-c", _PEAK, "train", str(path), "--json"], capture_output=True,
                          text=True, timeout=600, env=env)
    result = json.loads(done.stderr.strip().splitlines()[-1])
    assert result["code"] == 0, done.stderr[-2000:]
    return result["peak_mb"]


@pytest.mark.slow
def test_large_vocabulary_training_makes_no_full_logits(tiny_base: Path, tmp_path: Path) -> None:
    """A 64k vocabulary, rows of 256, batch 8: one fp32 logits copy is 2048 x 64,000 x 4 B = 524 MB,
    and the plain loss keeps several alive (the logits, the log-softmax, their gradient). The
    chunked loss adds at most one chunk (256 MiB) over the same model with a 400-token vocabulary,
    whose run calibrates everything else (interpreter, libraries, MLflow, data)."""
    vocab, batch, length = 64_000, 8, 256
    small = _train_peak_mb(tiny_base, tmp_path, "auto", batch, length)
    large = _large_vocab_base(tiny_base, tmp_path / "vocab64k", vocab)
    weights_mb = vocab * 32 * 4 * 3 / 2**20  # the embedding, its loaded copy, its safetensors page cache share
    copy_mb = batch * length * vocab * 4 / 2**20
    bound = small + weights_mb + copy_mb
    chunked = _train_peak_mb(large, tmp_path, "auto", batch, length)
    plain = _train_peak_mb(large, tmp_path, "none", batch, length)
    print(f"peak RSS MB: vocab 400 {small:.0f}, chunked {chunked:.0f}, plain {plain:.0f}, bound {bound:.0f}")
    assert chunked < bound, (chunked, bound, small)
    assert plain > bound, (plain, bound, small)  # the bound can fail: full logits break it


def test_eval_batch_size_counts_the_full_logits_of_transformed_heads() -> None:
    """Soft-capping models skip eval's scored-positions head: their full logits size the batch."""
    from lmctl.evaluate.perplexity import auto_batch_size

    model = _tiny_llama(vocab=50_000)
    plain = auto_batch_size(model, 128, budget_bytes=256 << 20)
    model.config.final_logit_softcapping = 30.0
    capped = auto_batch_size(model, 128, budget_bytes=256 << 20)
    assert capped < plain and capped == (256 << 20) // ((4 * (6 * 32 + 3 * 64 + 4 * 128) * 2 + 50_000 * 8) * 128)
