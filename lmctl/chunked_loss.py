"""The output head and its cross-entropy, fused and chunked: no full-vocabulary logits.

A 152k vocabulary makes `tokens x vocab` fp32 logits the largest tensors of a LoRA step by far
(2 x 1024 x 151,936 floats = 1.24 GB a copy, and the plain path keeps several copies alive:
the head's output, its fp32 upcast, the log-softmax and their gradients). Here the head runs on
`chunk` rows at a time, straight into log-softmax and the loss, so at most one chunk's logits
exist at once (`chunk_rows`: as many rows as fit a byte budget, not a fixed count).

The gradient is computed in the same pass (as Liger Kernel's fused linear cross-entropy does)
rather than by recomputing each chunk's logits in backward: the head is the largest matmul of a
small model with a big vocabulary (60% of the forward FLOPs of a Qwen2.5-0.5B shape), and
recomputing it would cost about 30% more compute per step. What is kept from forward to backward
is the gradient of the hidden states (`tokens x hidden`, the size of the hidden states
themselves) and, only when the head itself trains (LoRA on lm_head, modules_to_save, a trainable
tied embedding), the fp32 gradient of its weight. A frozen head gets no weight gradient.

Hand-written because no library does this in pure PyTorch: Liger Kernel and Cut Cross-Entropy
are Triton/CUDA only, and torchtune's chunked loss still keeps every chunk's logits for autograd.
The loss matches transformers' `ForCausalLMLoss` (fp32 upcast, the label shift, ignore_index,
the sum divided by the Trainer's `num_items_in_batch` when given, else the mean over
non-ignored targets), so the Trainer's gradient-accumulation scaling is unchanged.

Shared by training (lmctl.train.headloss installs it into the model's forward) and eval
(lmctl.evaluate.perplexity sizes its head chunks with `chunk_rows`).
"""

from __future__ import annotations

from typing import Any

# Configs whose forward transforms the head's output (soft-capping, scaling). For those the
# head's logits are not `hidden @ W.T`: training keeps the model's own loss and eval runs the
# model's full forward, so the numbers stay the model's own.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
CPU_CHUNK_BUDGET = 256 << 20  # bytes of one chunk's logits and their temporaries on the CPU
GPU_CHUNK_BUDGET_MAX = 1 << 30  # on a GPU: an eighth of the free memory, at most this


def transforms_logits(config: Any) -> str | None:
    """The config field that makes logits differ from `hidden @ W.T`, or None."""
    for name in LOGIT_TRANSFORMS:
        if getattr(config, name, None) not in (None, 1, 1.0):
            return name
    return None


def chunk_budget(device: Any) -> int:
    """Bytes one chunk may use: 256 MiB on the CPU (a chunk of ~100 rows of a 152k vocabulary
    is already a compute-bound GEMM there), on a GPU an eighth of the free memory up to 1 GiB
    (larger chunks keep a GPU busy; the rest of the step needs the other seven eighths)."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return int(min(GPU_CHUNK_BUDGET_MAX, torch.cuda.mem_get_info(device)[0] // 8))
    return CPU_CHUNK_BUDGET


def chunk_bytes_per_row(vocab: int, itemsize: int) -> int:
    """Peak bytes one row of a chunk holds: the head's output in the model's dtype, its fp32
    copy, the fp32 softmax/gradient made in place of it plus one fp32 temporary (the soft-cap's
    tanh or the log-softmax's), and the gradient cast back to the model's dtype."""
    return vocab * (2 * itemsize + 8)


def chunk_rows(vocab: int, itemsize: int, device: Any = "cpu", budget_bytes: int | None = None) -> int:
    """Rows per head chunk so that one chunk's logits and temporaries fit the budget."""
    budget = chunk_budget(device) if budget_bytes is None else budget_bytes
    return max(1, budget // chunk_bytes_per_row(vocab, itemsize))


def linear_cross_entropy(hidden: Any, weight: Any, targets: Any, bias: Any = None, *, num_items: Any = None,
                         ignore_index: int = -100, softcap: float | None = None, chunk: int | None = None) -> Any:
    """sum over rows of cross_entropy(hidden @ weight.T + bias, targets), divided by `num_items`
    (None: the number of targets that are not `ignore_index`), without full logits.

    hidden [..., H] and targets [...] (already shifted), weight [V, H]; gradients flow to hidden,
    weight and bias as far as they require them. `chunk`: rows per chunk (None: `chunk_rows`)."""
    import torch

    flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).to(hidden.device)
    if num_items is None:
        num_items = (flat_targets != ignore_index).sum()
    denom = torch.as_tensor(num_items, device=hidden.device).float()
    rows = chunk or chunk_rows(weight.shape[0], hidden.element_size(), hidden.device)
    # a Function's forward runs with grad mode off and sees needs_input_grad set even under
    # no_grad (in-training eval): whether to make gradients is decided out here
    return _FusedLinearCrossEntropy.apply(flat, weight, bias, flat_targets, denom, rows, ignore_index, softcap,
                                          torch.is_grad_enabled())


def causal_lm_loss(hidden: Any, labels: Any, weight: Any, bias: Any = None, *, num_items_in_batch: Any = None,
                   ignore_index: int = -100, shift_labels: Any = None, softcap: float | None = None,
                   chunk: int | None = None) -> Any:
    """transformers' ForCausalLMLoss on the head's input instead of its output: position t
    predicts labels[t + 1] (or `shift_labels[t]` when the collator gives them)."""
    import torch

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return linear_cross_entropy(hidden, weight, shift_labels, bias, num_items=num_items_in_batch,
                                ignore_index=ignore_index, softcap=softcap, chunk=chunk)


def _chunk_loss_and_grad(x: Any, weight: Any, bias: Any, t: Any, ignore_index: int, softcap: float | None,
                         want_grad: bool) -> tuple[Any, Any]:
    """(summed NLL of the chunk in fp32, d(summed NLL)/d(logits) in x's dtype or None)."""
    import torch

    logits = torch.nn.functional.linear(x, weight, bias).float()
    tanh = None
    if softcap is not None:
        tanh = torch.tanh(logits / softcap)
        logits = tanh * softcap
    valid = t != ignore_index
    safe = torch.where(valid, t, 0).unsqueeze(1)
    lse = torch.logsumexp(logits, dim=-1)
    nll = ((lse - logits.gather(1, safe).squeeze(1)) * valid).sum()
    if not want_grad:
        return nll, None
    grad = logits.sub_(lse.unsqueeze(1)).exp_()  # softmax, in place of the logits
    grad.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=grad.dtype))
    grad.mul_(valid.unsqueeze(1))
    if tanh is not None:
        grad.mul_(1 - tanh * tanh)
    return nll, grad.to(x.dtype)


def _autograd_function() -> Any:
    import torch

    class FusedLinearCrossEntropy(torch.autograd.Function):
        """Forward computes the loss and, where needed, the gradients chunk by chunk; backward
        scales them by the incoming gradient (the loss is a scalar)."""

        @staticmethod
        def forward(ctx: Any, hidden: Any, weight: Any, bias: Any, targets: Any, denom: Any, rows: int,
                    ignore_index: int, softcap: float | None, grads: bool) -> Any:
            need_h, need_w = grads and ctx.needs_input_grad[0], grads and ctx.needs_input_grad[1]
            need_b = grads and bias is not None and ctx.needs_input_grad[2]
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], rows):
                x, t = hidden[start : start + rows], targets[start : start + rows]
                nll, g = _chunk_loss_and_grad(x, weight, bias, t, ignore_index, softcap, need_h or need_w or need_b)
                total += nll
                if grad_h is not None:
                    grad_h[start : start + rows] = g @ weight.to(g.dtype)
                if grad_w is not None:
                    grad_w.addmm_(g.t().float(), x.float())
                if grad_b is not None:
                    grad_b += g.float().sum(0)
            ctx.save_for_backward(grad_h, grad_w, grad_b, denom)
            ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
            return total / denom

        @staticmethod
        def backward(ctx: Any, grad_out: Any) -> tuple[Any, ...]:
            grad_h, grad_w, grad_b, denom = ctx.saved_tensors
            scale = grad_out / denom
            out_h = grad_h * scale.to(grad_h.dtype) if grad_h is not None else None
            out_w = (grad_w * scale).to(ctx.dtypes[0]) if grad_w is not None else None
            out_b = (grad_b * scale).to(ctx.dtypes[1]) if grad_b is not None else None
            return out_h, out_w, out_b, None, None, None, None, None, None

    return FusedLinearCrossEntropy


class _Lazy:
    """The autograd Function, built on first use so that importing this module needs no torch."""

    _fn: Any = None

    def apply(self, *args: Any) -> Any:
        if _Lazy._fn is None:
            _Lazy._fn = _autograd_function()
        return _Lazy._fn.apply(*args)


_FusedLinearCrossEntropy = _Lazy()
