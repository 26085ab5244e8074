"""`train.kernels`: the training loss without full-vocabulary logits (docs/memory.md).

The model's own forward stays in charge, so everything that wraps it keeps working (peft's
PeftModel, gradient checkpointing, DDP's and FSDP's forward hooks, the Trainer's loss
normalisation): two instance attributes are set on the base causal LM after it is built.

- its output head's `forward` returns its input, so the "logits" the model passes to its loss
  are the final hidden states and no `tokens x vocab` tensor is made;
- its `loss_function` (transformers' documented override of `ForCausalLMLoss`) is the fused
  head + cross-entropy of lmctl.chunked_loss (or Liger Kernel's on CUDA), called with the very
  arguments transformers passes: labels, `num_items_in_batch`, `shift_labels`.

The head's weight is read at each call: a LoRA adapter on lm_head is folded in as
`W + scaling * B @ A` (autograd carries the gradient to A and B), a modules_to_save copy is
used as the copy it is. Models this cannot express exactly (a transformed head output such as
soft-capping, a head that is not a plain linear layer, a forward that does not call
`self.loss_function`) keep the plain loss, with one log line saying why.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging
from typing import Any

from lmctl import chunked_loss
from lmctl.errors import BadInputError

log = logging.getLogger("lmctl.train")


def liger_usable() -> str | None:
    """Why Liger Kernel cannot run here, or None when it can."""
    import torch

    if not torch.cuda.is_available():
        return "Liger Kernel needs a CUDA GPU; this machine has none"
    if importlib.util.find_spec("liger_kernel") is None:
        return "Liger Kernel is not installed (pip install 'lmctl[gpu]')"
    return None


def check_kernels(kernels: str) -> None:
    """Pre-flight: `train.kernels: liger` on a machine that cannot run it is exit 2."""
    if kernels == "liger" and (reason := liger_usable()) is not None:
        raise BadInputError(f"train.kernels=liger: {reason}", hint="set train.kernels=auto")


def install(model: Any, kernels: str) -> str:
    """Make `model` (a PeftModel or an HF causal LM) compute its training loss without full
    logits; returns what runs: "chunked", "liger" or "none"."""
    if kernels == "none":
        return "none"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    reason = _unsupported(base, head)
    if reason is not None:
        log.info("train.kernels=%s: using the plain loss (full logits): %s", kernels, reason)
        return "none"
    kind = "liger" if kernels == "liger" or (kernels == "auto" and liger_usable() is None) else "chunked"
    head.forward = _passthrough
    base.loss_function = functools.partial(_head_loss, head, kind)
    log.info("train.kernels=%s: fused %s head + cross-entropy, no full-vocabulary logits", kernels, kind)
    return kind


def _passthrough(hidden: Any, *args: Any, **kwargs: Any) -> Any:
    return hidden


def _unsupported(base: Any, head: Any) -> str | None:
    config = getattr(base, "config", None)
    if head is None or config is None:
        return "the model has no output head"
    if (name := chunked_loss.transforms_logits(config)) is not None:
        return f"the model transforms its logits ({name})"
    try:
        source = inspect.getsource(type(base).forward)
    except (OSError, TypeError):
        source = ""
    if "self.loss_function(" not in source or "self.lm_head(" not in source:
        return f"{type(base).__name__}.forward does not compute its loss with self.loss_function from self.lm_head"
    if head is not getattr(base, "lm_head", None):
        return "the output head is not the model's lm_head"
    try:
        head_weight(head)
    except ValueError as exc:
        return str(exc)
    return None


def head_weight(head: Any) -> tuple[Any, Any]:
    """(weight, bias) with head(x) == x @ weight.T + bias for the head as it is now; ValueError
    (with the reason) for heads that are not that."""
    import torch

    from peft.tuners.lora import Linear as LoraLinear
    from peft.utils.other import ModulesToSaveWrapper

    if type(head) is torch.nn.Linear:
        return head.weight, head.bias
    if type(head) is ModulesToSaveWrapper:
        active = head.active_adapters
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            return head_weight(head.original_module)
        return head_weight(head.modules_to_save[active[0]])
    if type(head) is LoraLinear:
        return _lora_weight(head)
    return _fail(f"the output head is a {type(head).__name__}, not a linear layer")


def _lora_weight(head: Any) -> tuple[Any, Any]:
    """A LoRA lm_head as one weight: W + scaling * B @ A for each active adapter."""
    import torch

    weight, bias = head_weight(head.get_base_layer())
    if head.disable_adapters or head.merged:
        return weight, bias
    for name in head.active_adapters:
        if name not in head.lora_A:
            continue
        dropout = head.lora_dropout[name]
        if name in head.lora_variant or head.fan_in_fan_out or head.lora_B[name].bias is not None:
            _fail("LoRA on the output head uses DoRA, a bias or fan_in_fan_out")
        if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
            _fail("LoRA on the output head has dropout (lora.dropout > 0)")
        delta = head.lora_B[name].weight @ head.lora_A[name].weight
        weight = weight + (delta * head.scaling[name]).to(weight.dtype)
    return weight, bias


def _fail(reason: str) -> Any:
    raise ValueError(reason)


def _head_loss(head: Any, kind: str, logits: Any, labels: Any, vocab_size: int | None = None,
               num_items_in_batch: Any = None, ignore_index: int = -100, shift_labels: Any = None,
               **kwargs: Any) -> Any:
    """The model's `loss_function`: `logits` are the head's input (the head passes them through)."""
    weight, bias = head_weight(head)
    if logits.shape[-1] != weight.shape[1]:
        raise RuntimeError(f"the fused loss got {logits.shape[-1]} features, the head takes {weight.shape[1]}")
    if kind == "liger":
        return _liger_loss(logits, labels, weight, bias, num_items_in_batch, ignore_index, shift_labels)
    return chunked_loss.causal_lm_loss(logits, labels, weight, bias, num_items_in_batch=num_items_in_batch,
                                       ignore_index=ignore_index, shift_labels=shift_labels)


def _liger_loss(hidden: Any, labels: Any, weight: Any, bias: Any, num_items: Any, ignore_index: int,
                shift_labels: Any) -> Any:
    """Liger Kernel's fused linear cross-entropy, normalised as transformers normalises."""
    import torch
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    if shift_labels is None:
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    flat = hidden.reshape(-1, hidden.shape[-1])
    targets = shift_labels.reshape(-1).to(hidden.device)
    loss = liger_fused_linear_cross_entropy(flat, weight, targets, bias, ignore_index=ignore_index,
                                            reduction="mean" if num_items is None else "sum")
    return loss if num_items is None else loss / torch.as_tensor(num_items, device=loss.device)
