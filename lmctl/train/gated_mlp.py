"""`train.kernels`, part two: a gated MLP whose activation output is not kept for backward.

A gated MLP (Llama, Qwen, Mistral, Gemma: `down(act(gate(x)) * up(x))`) makes autograd keep
four intermediate-sized tensors per token for backward: gate's output (for act's backward),
act's output and up's output (for the product's), and the product (for the LoRA A matrix of
down_proj). At a Qwen2.5-0.5B shape those four are 80% of what a layer keeps. Here
`act(gate) * up` runs under `torch.utils.checkpoint` (non-reentrant): backward keeps gate's and
up's outputs only and recomputes the activation and the product, an elementwise pass that costs
far less than a matmul. Liger Kernel's SwiGLU makes the same trade in one Triton kernel.
When down_proj is a plain LoRA layer (`base(p) + B(A(p)) * s`, no dropout), its A (a rank-r
matmul, ~r / hidden of down_proj's cost) runs inside the recomputed region as well: the frozen
base keeps no input for backward, so the product p is not kept at all, and the MLP keeps two
intermediate-sized tensors per token instead of four.

Nothing is differentiated by hand: torch.utils.checkpoint saves the two inputs and replays the
two elementwise ops under autograd. The patch is an instance attribute (`forward`) on each MLP
whose class's forward is exactly the gated expression above, so peft's LoRA layers inside it,
DDP and FSDP see the module they built; any other MLP keeps its own forward. Not installed with
train.gradient_checkpointing (whole layers are recomputed then) or train.kernels: none.
"""

from __future__ import annotations

import functools
import inspect
import logging
import re
import types
from typing import Any

log = logging.getLogger("lmctl.train")

# the forward of every gated MLP in transformers 5 (LlamaMLP, Qwen2MLP, Qwen3MLP, MistralMLP, GemmaMLP)
GATED_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


def recomputes(kernels: str, gradient_checkpointing: bool) -> bool:
    """Whether training installs this recompute (train.kernels, train.gradient_checkpointing):
    the trainer decides with it and the memory plan counts with it."""
    return kernels != "none" and not gradient_checkpointing


def is_gated(module: Any) -> bool:
    """Whether `module`'s class computes exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`."""
    if not all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        return False
    try:
        source = inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
    return GATED_FORWARD in re.sub(r"\s+", "", source)


def gated_mlps(model: Any) -> list[Any]:
    """The modules of `model` that `install` patches."""
    return [module for module in model.modules() if is_gated(module)]


def install(model: Any) -> int:
    """Patch every gated MLP of `model`; returns how many were patched."""
    mlps = gated_mlps(model)
    for module in mlps:
        module.forward = types.MethodType(_forward, module)
    if mlps:
        log.info("train.kernels: %d gated MLPs keep gate and up only; act(gate) * up is recomputed in backward",
                 len(mlps))
    return len(mlps)


def _act_times_up(act: Any, gate: Any, up: Any) -> Any:
    return act(gate) * up


def _act_times_up_and_a(act: Any, cast: Any, lora_a: Any, gate: Any, up: Any) -> tuple[Any, Any]:
    hidden = act(gate) * up
    return hidden, lora_a(cast(hidden))


def plain_lora(layer: Any) -> tuple[Any, Any, float] | None:
    """(lora_A, lora_B, scaling) when `layer` is a peft LoRA Linear computing exactly
    `base(x) + lora_B(lora_A(x)) * scaling` now (one active adapter, no dropout, no DoRA or other
    variant, not merged or disabled); None otherwise."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    if type(layer) is not LoraLinear or layer.disable_adapters or layer.merged:
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if len(active) != 1 or active[0] in layer.lora_variant:
        return None
    dropout = layer.lora_dropout[active[0]]
    if not isinstance(dropout, torch.nn.Identity) and not (isinstance(dropout, torch.nn.Dropout) and dropout.p == 0):
        return None
    return layer.lora_A[active[0]], layer.lora_B[active[0]], layer.scaling[active[0]]


def _forward(self: Any, x: Any) -> Any:
    import torch
    from torch.utils.checkpoint import checkpoint

    gate, up = self.gate_proj(x), self.up_proj(x)
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)):
        return self.down_proj(self.act_fn(gate) * up)
    lora = plain_lora(self.down_proj)
    if lora is None:  # no randomness inside: no RNG state to save and restore
        hidden = checkpoint(functools.partial(_act_times_up, self.act_fn), gate, up,
                            use_reentrant=False, preserve_rng_state=False)
        return self.down_proj(hidden)
    # down_proj's frozen base keeps no input for backward; its LoRA A does, and that input is
    # act(gate) * up again, so A runs inside the recomputed region too: the product is not kept
    lora_a, lora_b, scaling = lora
    down = self.down_proj
    cast = functools.partial(down._cast_input_dtype, dtype=lora_a.weight.dtype)
    hidden, low = checkpoint(functools.partial(_act_times_up_and_a, self.act_fn, cast, lora_a), gate, up,
                             use_reentrant=False, preserve_rng_state=False)
    result = down.base_layer(hidden)
    return (result + lora_b(low) * scaling).to(result.dtype)
