"""Benchmark lmctl's batched perplexity against a plain batch-size-1 loop, in one process.

The reference is the loop from the Hugging Face perplexity guide, written plainly: one
window at a time, labels -100 on the context, loss x scored tokens summed. Both must agree
to 1e-4 relative; the speed ratio is printed (goal >= 3x on CPU).

    python scripts/bench_eval.py [--model smollm2-135m] [--max-length 512] [--stride 256]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from demo_corpus import split_topics  # noqa: E402

from lmctl.evaluate.perplexity import perplexity  # noqa: E402
from lmctl.loading import load_base_model, load_tokenizer  # noqa: E402
from lmctl.modelref import resolve_base  # noqa: E402


def reference_nll(model, tokenizer, texts: list[str], max_length: int, stride: int) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = torch.tensor([[prefix] + tokenizer(text, add_special_tokens=False)["input_ids"]])
            n = ids.shape[1] - 1
            for start in range(0, n, stride):
                end = min(start + stride, n)
                ctx = max(0, end - max_length)
                window = ids[:, ctx : end + 1]  # inputs ctx..end-1 predict tokens ctx+1..end
                labels = window.clone()
                labels[:, : start - ctx + 1] = -100  # only tokens start+1..end are new
                loss = model(input_ids=window[:, :-1].contiguous(), labels=None).logits.float()
                logprobs = torch.log_softmax(loss, -1)
                targets = window[:, 1:]
                mask = labels[:, 1:] != -100
                total -= float(logprobs.gather(2, targets[..., None])[..., 0][mask].sum())
                count += int(mask.sum())
    return total, count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--stride", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--docs", type=int, default=13)
    args = parser.parse_args()
    os.environ.setdefault("LMCTL_HOME", str(Path(tempfile.mkdtemp()) / "home"))
    path = resolve_base(args.model)
    tokenizer, model = load_tokenizer(path), load_base_model(path).eval()
    _, texts = split_topics()
    texts = texts[: args.docs]
    t0 = time.perf_counter()
    ref_nll, ref_tokens = reference_nll(model, tokenizer, texts, args.max_length, args.stride)
    ref_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    sums, _ = perplexity(model, tokenizer, texts, args.max_length, args.stride, args.batch_size)
    lm_s = time.perf_counter() - t0
    rel = abs(sums.nll_sum - ref_nll) / abs(ref_nll)
    print(f"model {args.model}, {len(texts)} documents, {sums.tokens} tokens, max_length {args.max_length}, "
          f"stride {args.stride}, torch threads {torch.get_num_threads()}")
    print(f"{'run':28} {'seconds':>8} {'tokens/s':>9} {'perplexity':>11}")
    print(f"{'plain loop, batch 1':28} {ref_s:8.2f} {ref_tokens / ref_s:9.1f} {math.exp(ref_nll / ref_tokens):11.5f}")
    print(f"{'lmctl, batch ' + str(args.batch_size):28} {lm_s:8.2f} {sums.tokens / lm_s:9.1f} {sums.metrics['perplexity']:11.5f}")
    print(f"speed ratio {ref_s / lm_s:.2f}x; NLL relative difference {rel:.2e} (must be <= 1e-4)")
    return 0 if rel <= 1e-4 and ref_tokens == sums.tokens else 1


if __name__ == "__main__":
    raise SystemExit(main())
