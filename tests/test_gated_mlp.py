"""lmctl.train.gated_mlp: the gated MLP that recomputes act(gate) * up in backward gives the same
loss and LoRA gradients as the model's own forward, and keeps one intermediate-sized tensor per
token and layer less for backward."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

HIDDEN, INTERMEDIATE, LAYERS, BATCH, LENGTH = 32, 96, 2, 2, 24


def _model(family: str):
    from transformers import GemmaConfig, GemmaForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(vocab_size=300, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                 num_attention_heads=4, num_key_value_heads=2)
    if family == "gemma":  # gelu-tanh gate: the recompute is not tied to SiLU
        return GemmaForCausalLM(GemmaConfig(head_dim=8, **shape))
    return LlamaForCausalLM(LlamaConfig(tie_word_embeddings=True, **shape))


def _peft(model, targets="all-linear", dropout: float = 0.0):
    from peft import LoraConfig, TaskType, get_peft_model

    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets,
                                             task_type=TaskType.CAUSAL_LM))
    for name, p in model.named_parameters():  # B starts at zero: give every LoRA weight a gradient
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _ids():
    return torch.randint(0, 300, (BATCH, LENGTH), generator=torch.Generator().manual_seed(1))


def _saved_bytes(model) -> int:
    """Bytes of the distinct storages autograd keeps for backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=_ids(), labels=_ids()).loss
    loss.backward()
    return sum(saved.values())


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_loss_and_lora_gradients_equal_the_models_own(family: str) -> None:
    from lmctl.train import gated_mlp

    plain = _peft(_model(family))
    fused = copy.deepcopy(plain)
    assert gated_mlp.install(fused) == LAYERS
    losses = {}
    for name, model in (("plain", plain), ("fused", fused)):
        model.train()
        out = model(input_ids=_ids(), labels=_ids())
        out.loss.backward()
        losses[name] = out.loss.item()
    assert abs(losses["plain"] - losses["fused"]) < 1e-6
    trained = [(n, p) for n, p in plain.named_parameters() if p.requires_grad]
    assert any("mlp" in n for n, _ in trained)
    for (name, p), q in zip(trained, (q for q in fused.parameters() if q.requires_grad)):
        assert torch.allclose(q.grad, p.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize("targets, dropout, fewer", [
    ("all-linear", 0.0, 2),  # act(gate) and the product (down_proj's LoRA A input) are recomputed
    ("all-linear", 0.1, 1),  # dropout before A: down_proj keeps its own forward, only act(gate) is recomputed
    (["q_proj", "gate_proj"], 0.0, 1),  # a frozen down_proj keeps no input: act(gate) is the one saved
])
def test_backward_keeps_fewer_intermediate_tensors_per_layer(targets, dropout: float, fewer: int) -> None:
    from lmctl.train import gated_mlp

    plain = _peft(_model("llama"), targets, dropout)
    fused = copy.deepcopy(plain)
    gated_mlp.install(fused)
    one_intermediate = BATCH * LENGTH * INTERMEDIATE * 4  # float32
    assert _saved_bytes(plain) - _saved_bytes(fused) == fewer * LAYERS * one_intermediate


def test_inference_and_other_mlps_are_unchanged() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from lmctl.train import gated_mlp

    model = _model("llama").eval()
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
        gated_mlp.install(model)
        after = model(input_ids=_ids()).logits
    assert torch.equal(before, after)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=300))
    assert gated_mlp.install(gpt2) == 0  # its MLP is not gated: nothing to patch
