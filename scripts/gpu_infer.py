"""Serve and eval on the GPU for scripts/gpu_check.py (issue 25, item 4).

Serve: the batching engine against one-at-a-time `generate`, greedy, in bf16 (where the
batch changes the arithmetic: the first divergence of each request is reported) and in fp32
(outputs should be equal); tokens/s at 1, 8 and 32 clients; the attention kernel the engine
planned (`lmctl.serve.kvcache.attention_plan`), checked by running the engine with SDPA
restricted to that kernel alone, next to the old call (a mask with `enable_gqa=True`) with the
math kernel off, which CUDA refuses.

Eval: lmctl's perplexity against lm-eval-harness HFLM on the same windows, each warmed up on
the first documents first, then timed with a CUDA synchronize before and after.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from lmctl.distributed import synchronized_now


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (None: equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _engine(model: Any, tok: Any) -> Any:
    from lmctl.serve.engine import Engine
    from lmctl.serve.kvcache import auto_batch_limits

    cap, kv_budget = auto_batch_limits(model)
    engine = Engine(model, tok, max_batch_size=cap, kv_budget_tokens=kv_budget)
    engine.start()
    return engine


def _old_call_needs_math(device: Any) -> str:
    """The call serve made before attention_plan, with the math kernel off: refused on CUDA?"""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(4, 9, 1, 64, device=device, dtype=torch.bfloat16)
    k, v = (torch.randn(4, 3, 40, 64, device=device, dtype=torch.bfloat16) for _ in range(2))
    mask = torch.ones(4, 1, 1, 40, dtype=torch.bool, device=device)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return "old call (mask + enable_gqa) ran without math"
    except RuntimeError:
        return "old call (mask + enable_gqa) needs the math kernel"


def serve_rows(model_dir: Path, requests: int, new_tokens: int, levels: tuple[int, ...]) -> Any:
    """Rows as measured: equality vs generate per dtype (`requests` in bf16, half as many in fp32,
    all at once), the kernel check, tokens/s per client count (2 requests per client, at least 8)."""
    import torch
    from bench_serve import baseline, engine_client, make_prompts, run_level
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from lmctl import distributed
    from lmctl.loading import load_base_model, load_tokenizer
    from lmctl.serve.kvcache import attention_plan

    tok = load_tokenizer(str(model_dir))
    prompts = make_prompts(tok, 0, max(requests, 2 * max(levels)), 128)
    for dtype, n in (("float32", max(1, requests // 2)), ("bfloat16", requests)):
        model = load_base_model(str(model_dir), dtype).to(distributed.device()).eval()
        engine = _engine(model, tok)
        one = run_level(baseline(model, tok, new_tokens), prompts, 1, n)
        batched = run_level(engine_client(engine, tok, new_tokens), prompts, n, n)
        firsts = [_first_divergence(one["outputs"][i], batched["outputs"][i]) for i in range(n)]
        diverged = sorted(f for f in firsts if f is not None)
        yield [f"serve {dtype}: greedy vs one-at-a-time generate, {n} requests at once",
               f"identical {n - len(diverged)}/{n}",
               f"first divergence at token {diverged[0]} (median {statistics.median(diverged):.0f})" if diverged else
               "no divergence", f"{new_tokens} new tokens each"]
        if dtype == "float32":
            engine.stop()
            del engine, model
            continue
        plan, only = engine.attention_kernel, attention_plan(model.device.type).kernel
        try:
            with sdpa_kernel([getattr(SDPBackend, only)]):  # global flags: the engine's thread sees them too
                run_level(engine_client(engine, tok, 8), prompts[:8], 8, 8)
            check = f"ran with SDPA restricted to {only}"
        except Exception as exc:  # noqa: BLE001 - the check's answer
            check = f"FAILED with SDPA restricted to {only}: {type(exc).__name__}"
        yield ["serve attention kernel", plan, check, _old_call_needs_math(model.device)]
        for clients in levels:
            r = run_level(engine_client(engine, tok, new_tokens), prompts, clients, max(8, 2 * clients))
            yield [f"serve bf16 {clients} clients", f"{r['tok_s']:,.0f} tok/s", f"{r['req_s']:.1f} req/s",
                   f"attention {plan}"]
        engine.stop()


def eval_rows(model_dir: Path, texts: list[str], with_lm_eval: bool, batches: tuple[int, ...] = (1, 8, 32)) -> Any:
    """lmctl perplexity and lm-eval-harness on the same strided windows, warm, timed alike."""
    import importlib.util

    from bench_eval import _lm_eval

    from lmctl import distributed
    from lmctl.evaluate.perplexity import perplexity
    from lmctl.loading import load_base_model, load_tokenizer

    device = distributed.device()
    tok, model = load_tokenizer(str(model_dir)), load_base_model(str(model_dir), "auto").to(device).eval()
    peers = with_lm_eval and importlib.util.find_spec("lm_eval") is not None
    runs = [("lmctl", lambda docs: perplexity(model, tok, docs, 1024, 512).doc_nll)]
    runs += [(f"lm-eval b{b}", lambda docs, b=b: _lm_eval(model, tok, docs, "strided", 1024, 512, b, str(device)))
             for b in (batches if peers else ())]
    timed: dict[str, tuple[float, float]] = {}
    for name, run in runs:
        run(texts[:2])  # warm: kernels loaded, allocator and cuBLAS handles made
        t0 = synchronized_now(device)
        nll = run(texts)
        timed[name] = (synchronized_now(device) - t0, sum(nll))
    ours = timed["lmctl"]
    for name, (s, total) in timed.items():
        ratio = f"{timed['lm-eval b1'][0] / s:.2f}x lm-eval b1" if "lm-eval b1" in timed else "lm-eval: n/a"
        yield [f"eval strided 1024/512 warm: {name}, {len(texts)} documents", f"{s:.2f} s", ratio,
               f"NLL rel diff {abs(total - ours[1]) / ours[1]:.1e}"]
    del model
