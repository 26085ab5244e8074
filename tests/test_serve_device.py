"""Where serve runs and which attention kernel it plans for, decided without a GPU.

The decisions are functions of the device and the memory free there, so they are tested here
with those given; what a CPU can run (the expanded-K/V path, SDPA restricted to the planned
CPU kernel, a served model placed where `distributed.device()` says) runs for real.
scripts/gpu_check.py checks the CUDA side (SDPA restricted to the planned kernel) on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmctl import distributed
from lmctl.serve.kvcache import (CPU_BATCH_CAP, GPU_BATCH_CAP, AttentionPlan, attention_kernel, attention_plan,
                                 engine_sdpa, kv_limits)


def test_one_device_choice_for_every_stage() -> None:
    assert distributed.choose_device(cuda_available=True, local_rank=0) == "cuda:0"
    assert distributed.choose_device(cuda_available=True, local_rank=3) == "cuda:3"
    assert distributed.choose_device(cuda_available=False, local_rank=3) == "cpu"
    assert str(distributed.device()) == "cpu"  # this machine has no CUDA


def test_kv_budget_comes_from_the_memory_of_the_device_the_weights_are_on() -> None:
    per_token, gib = 36 * 1024, 1 << 30  # 0.5B-shaped: 24 layers x 2 x 2 KV heads x 64 x bf16... any size does
    assert kv_limits("cuda", per_token, 40 * gib) == (GPU_BATCH_CAP, 20 * gib // per_token)  # half the free GPU memory
    assert kv_limits("cpu", per_token, 40 * gib) == (CPU_BATCH_CAP, 10 * gib // per_token)  # a quarter of the RAM
    assert kv_limits("cuda", per_token, 0) == (GPU_BATCH_CAP, 1)  # nothing free: one token, never 0


def test_attention_plan_keeps_an_efficient_kernel_on_cuda() -> None:
    cuda, cpu = attention_plan("cuda"), attention_plan("cpu")
    # CUDA: flash refuses a mask, memory-efficient refuses grouped K/V -> expand them for memory-efficient
    assert cuda == AttentionPlan(kernel="EFFICIENT_ATTENTION", expand_kv=True)
    assert cpu == AttentionPlan(kernel="FLASH_ATTENTION", expand_kv=False)  # CPU flash takes both, no copy
    for plan in (cuda, cpu):
        assert plan.kernel in SDPBackend.__members__  # a name sdpa_kernel can be restricted to
    assert attention_kernel("cuda", True, "lmctl_sdpa_gqa") == "efficient+expanded_kv"
    assert attention_kernel("cpu", True, "lmctl_sdpa_gqa") == "flash"
    assert attention_kernel("cuda", False, "eager") == "transformers:eager"


def _grouped(seed: int, rows: int = 3, q: int = 2, k: int = 11) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(rows, 6, q, 8, generator=g)
    key, value = torch.randn(rows, 2, k, 8, generator=g), torch.randn(rows, 2, k, 8, generator=g)
    mask = torch.rand(rows, 1, q, k, generator=g) > 0.3
    mask[..., -1] = True  # every query sees at least one column
    return query, key, value, mask


@pytest.mark.parametrize("seed", [0, 1])
def test_expanded_kv_gives_the_grouped_numbers(seed: int) -> None:
    """The CUDA plan's expansion, run on the CPU: the same attention as the CPU plan's grouped call."""
    query, key, value, mask = _grouped(seed)
    expanded = AttentionPlan(kernel="EFFICIENT_ATTENTION", expand_kv=True)
    for causal_mask, causal in ((mask, False), (None, True)):
        want = engine_sdpa(query, key, value, causal_mask, 0.3, is_causal=causal, plan=attention_plan("cpu"))
        got = engine_sdpa(query, key, value, causal_mask, 0.3, is_causal=causal, plan=expanded)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_cpu_plan_runs_on_the_kernel_it_names() -> None:
    """SDPA restricted to the planned backend still runs the engine's masked grouped call (on
    CUDA the same check restricted to EFFICIENT_ATTENTION is what gpu_check prints)."""
    query, key, value, mask = _grouped(2)
    plan = attention_plan("cpu")
    with sdpa_kernel([getattr(SDPBackend, plan.kernel)]):
        out = engine_sdpa(query, key, value, mask, None)
        causal = engine_sdpa(query, key, value, None, None, is_causal=True)
    assert out.shape == query.shape and causal.shape == query.shape


def test_serve_places_the_model_where_the_shared_device_choice_says(tiny_base: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """`distributed.device()` is what puts eval's model on the GPU; serve asks it too. The meta
    device stands in for a GPU: the weights must end up there, and the slot reports it."""
    from lmctl.serve.settings import ServeSettings
    from lmctl.serve.slots import load_slot

    monkeypatch.setattr(distributed, "device", lambda: torch.device("meta"))
    slot = load_slot(str(tiny_base), "primary", ServeSettings())
    try:
        assert {p.device.type for p in slot.loaded.model.parameters()} == {"meta"}
        described = slot.describe()
        assert described["device"] == "meta" and described["attention_kernel"] == "flash"
    finally:
        slot.engine.stop()


def test_ttft_clock_waits_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first-token clock synchronizes a CUDA device before it reads the time (and only then)."""
    from lmctl.evaluate.latency import _FirstToken

    synced: list[Any] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synced.append(device))
    first = _FirstToken()
    scores = SimpleNamespace(device=torch.device("cuda", 0))
    assert first(None, scores) is scores and first.at is not None
    assert synced == [torch.device("cuda", 0)]
    first(None, scores)  # only the first token is timed
    distributed.synchronized_now(torch.device("cpu"))
    assert len(synced) == 1
