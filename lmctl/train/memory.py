"""The memory plan of a training run: its peak, from shapes alone (a meta-device model), before
any weight is loaded. `--dry-run` prints it; `train` compares it with what is free on the
device and refuses or warns (train.memory_check) before loading weights. docs/memory.md.

peak ~= weights (frozen base, in the dtype training really uses: lmctl.device.resolve_dtype;
          QLoRA: NF4 blocks at ~0.53 B/param, the rest float32 as peft's kbit preparation casts it)
       + optimizer (LoRA params in float32, their gradients and two Adam moments: 16 B/param)
       + activations (what backward keeps per token and layer: the hidden-sized tensors of
         the norms, attention and residuals, the MLP's intermediate-sized ones, the attention
         probabilities where the kernel keeps them; with gradient checkpointing, one layer's
         plus each layer's input)
       + logits (the head's output and the loss over it: `logits_bytes`, per loss kernel of
         train.kernels: full logits, lmctl's chunked loss or Liger Kernel's)
       + data (index arrays and batches in flight) + runtime.
runtime: on the CPU, the resident interpreter with the training libraries imported; on CUDA,
the CUDA context (lmctl.device.CUDA_CONTEXT_BYTES), which torch.cuda.max_memory_allocated
does not count. Measured against peak RSS (CPU) by scripts/bench_memory_plan.py.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from lmctl import chunked_loss
from lmctl.device import CUDA_CONTEXT_BYTES, Device, dtype_bytes

log = logging.getLogger("lmctl.train")
# the interpreter with torch, transformers, peft, datasets and mlflow imported (0.61 GB), plus what
# `lmctl train` holds beyond its tensors (the Trainer and accelerate state, the tokenizer, allocator
# slack): 0.09-0.32 GB more at the three shapes of scripts/bench_memory_plan.py (512-token rows)
RUNTIME_CPU_BYTES = int(0.8 * 2**30)
NF4_BYTES = 0.53  # 4 bits per weight + double-quantized block scales (bitsandbytes, block 64)
PARTS = ("weights", "optimizer", "activations", "logits", "data", "runtime")


class MemoryEstimate(BaseModel):
    """The plan `--dry-run` prints (GB = 2**30 bytes)."""

    device: str = "cpu"  # cpu, or the CUDA GPU's name
    dtype: str = "float32"  # the dtype training uses: model.dtype with auto resolved for this device
    loss_kernel: str = "none"  # what train.kernels runs: chunked, liger or none (full logits)
    total_params: int
    trainable_params: int
    weights_gb: float
    optimizer_gb: float  # LoRA params + gradients + Adam moments, float32
    activations_gb: float
    logits_gb: float
    data_gb: float  # the data pipeline: index arrays + batches in flight (tokens stay memory-mapped)
    runtime_gb: float  # CPU: the interpreter's resident libraries; CUDA: the CUDA context
    estimated_peak_gb: float
    dominant: str = "weights"  # the largest part
    free_gb: float = 0.0  # free on the device now (CUDA: mem_get_info; CPU: available memory)
    fits: bool = True
    advice: str | None = None  # when it does not fit: the change that saves the most


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a model, read from its config on the meta device."""

    total_params: int
    trainable_params: int
    quantizable_params: int  # weights of the linear layers inside the blocks (NF4 under QLoRA)
    hidden: int
    intermediate: int
    kv_dim: int
    heads: int
    layers: int
    vocab: int
    eager_attention: bool
    transforms_logits: bool = False  # soft-capping and the like: the fused loss falls back to full logits
    gated_mlp: bool = False  # down(act(gate(x)) * up(x)): train.kernels can recompute its activation


@dataclass(frozen=True)
class Workload:
    """The run's settings that the estimate depends on."""

    batch: int
    seq: int
    gradient_checkpointing: bool
    quantize_4bit: bool = False
    kernel: str = "none"  # the loss kernel that runs (loss_kernel): none = full [tokens, vocab] logits
    data_bytes: int = 0
    fixed_kernel: bool = False  # the model cannot use a fused loss (soft-capping, added tokens)
    recompute_mlp: bool = False  # lmctl.train.gated_mlp runs: the MLP keeps 2 intermediate-sized tensors, not 4


def model_shape(base_path: str, lora_config: Any, trust_remote_code: bool = False) -> Shape:
    """The model's shape, built on the meta device with its LoRA adapter (no weights read)."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from lmctl.train import gated_mlp

    config = AutoConfig.from_pretrained(base_path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code), lora_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    quantizable = sum(m.base_layer.weight.numel() for m in model.modules() if hasattr(m, "base_layer")
                      and isinstance(m.base_layer, torch.nn.Linear))
    return Shape(
        total_params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        quantizable_params=quantizable, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", None) or 4 * text.hidden_size,
        kv_dim=(getattr(text, "num_key_value_heads", None) or heads) * head_dim, heads=heads,
        layers=text.num_hidden_layers, vocab=text.vocab_size,
        eager_attention=getattr(config, "_attn_implementation", None) == "eager",
        transforms_logits=chunked_loss.transforms_logits(text) is not None,
        gated_mlp=bool(gated_mlp.gated_mlps(model)),
    )


def loss_kernel(kernels: str, shape: Shape, device: Device, new_tokens: bool = False) -> str:
    """What train.kernels will run (lmctl.train.headloss.install decides on the built model; this
    is the same decision from the config): chunked, liger or none (full logits)."""
    import importlib.util

    if kernels == "none" or shape.transforms_logits or new_tokens:  # added tokens: the head is not a plain linear
        return "none"
    liger = device.cuda and importlib.util.find_spec("liger_kernel") is not None
    return "liger" if kernels == "liger" or (kernels == "auto" and liger) else "chunked"


def logits_bytes(kernel: str, tokens: int, vocab: int, hidden: int, element_bytes: int, device: Device) -> int:
    """The head's logits and the loss over them at their peak, per loss kernel (train.kernels).

    none: transformers' loss over full [tokens, vocab] logits. At the peak four float32 copies
    are alive (the logits, the log-softmax kept for backward, its gradient and the logits'
    gradient), plus the model-dtype logits when those are not float32: 16 B per logit in
    float32, 18 in half precision (the CPU's RSS grows by two copies in forward and two more
    in the head's backward).
    chunked (lmctl.chunked_loss): one chunk's logits and temporaries (its byte budget), plus the
    hidden-state gradient the fused pass keeps for backward and its scaled copy.
    liger: Liger Kernel's chunks of about tokens / ceil(vocab / hidden) rows, plus the same
    hidden-state gradients.
    """
    if kernel == "none":
        return tokens * vocab * (4 * 4 + (element_bytes if element_bytes != 4 else 0))
    grads = 2 * tokens * hidden * element_bytes
    if kernel == "liger":
        rows = min(tokens, -(-tokens // -(-vocab // hidden)))
        return grads + rows * vocab * (element_bytes + 4)
    budget = (min(chunked_loss.GPU_CHUNK_BUDGET_MAX, device.free_bytes // 8) if device.cuda
              else chunked_loss.CPU_CHUNK_BUDGET)
    rows = min(tokens, chunked_loss.chunk_rows(vocab, element_bytes, budget_bytes=budget))
    return grads + rows * chunked_loss.chunk_bytes_per_row(vocab, element_bytes)


def activation_bytes(shape: Shape, work: Workload, element_bytes: int, scores: bool) -> int:
    """What backward keeps, per token and layer: ~11 hidden-sized tensors (the norms' inputs,
    their float32 statistics and outputs, rotated q, k and v expanded to every head, the
    attention output, residuals), k and v, and 4 intermediate-sized ones (gate, its activation,
    up, their product) of a gated MLP, 2 (gate and up) when lmctl.train.gated_mlp recomputes the
    activation and the product.
    `scores`: attention that keeps its heads x seq
    probabilities (eager attention); SDPA's flash and memory-efficient kernels (CUDA, and the
    CPU's flash kernel) keep only a row statistic: a 2048-token CPU run matched the plan without
    that term (0.97) and missed with it (1.37). Fitted to the peak RSS of CPU runs."""
    tokens = work.batch * work.seq
    intermediates = 2 if work.recompute_mlp and shape.gated_mlp else 4
    per_token_layer = (11 * shape.hidden + 2 * shape.kv_dim + intermediates * shape.intermediate
                       + (shape.heads * work.seq if scores else 0)) * element_bytes
    if work.gradient_checkpointing:  # each layer's input, plus one layer recomputed in backward
        return tokens * (shape.layers * shape.hidden * element_bytes + per_token_layer)
    return shape.layers * tokens * per_token_layer


def parts(shape: Shape, work: Workload, dtype: str, device: Device) -> dict[str, float]:
    """Bytes of each part of the peak."""
    element = dtype_bytes(dtype)
    frozen = shape.total_params - shape.trainable_params
    if work.quantize_4bit:  # NF4 blocks; embeddings, head and norms float32 (prepare_model_for_kbit_training)
        weights = shape.quantizable_params * NF4_BYTES + (frozen - shape.quantizable_params) * 4
        element = 4 if dtype == "float32" else element
    else:
        weights = frozen * element
    tokens = work.batch * work.seq
    return {
        "weights": weights, "optimizer": shape.trainable_params * 16.0,
        "activations": float(activation_bytes(shape, work, element, shape.eager_attention)),
        "logits": float(logits_bytes(work.kernel, tokens, shape.vocab, shape.hidden,
                                     4 if work.quantize_4bit else element, device)),
        # a batch as Python lists (~40 B per token for ids, labels, positions) and as tensors, 2 in flight
        "data": float(work.data_bytes + 2 * tokens * (40 + 3 * 8)),
        "runtime": float(CUDA_CONTEXT_BYTES if device.cuda else RUNTIME_CPU_BYTES),
    }


def estimate(shape: Shape, work: Workload, dtype: str, device: Device) -> MemoryEstimate:
    gb = {k: v / 2**30 for k, v in parts(shape, work, dtype, device).items()}
    peak = sum(gb.values())
    free = device.free_bytes / 2**30
    return MemoryEstimate(
        device=device.name, dtype=dtype, loss_kernel=work.kernel, total_params=shape.total_params, trainable_params=shape.trainable_params,
        **{f"{k}_gb": round(v, 3) for k, v in gb.items()}, estimated_peak_gb=round(peak, 3),
        dominant=max(PARTS, key=lambda k: gb[k]), free_gb=round(free, 3), fits=peak <= free,
        advice=None if peak <= free else best_knob(shape, work, dtype, device, peak),
    )


def _alternatives(work: Workload, device: Device) -> dict[str, Workload]:
    """The changes that lower the peak without changing the model: config override -> its workload."""
    from dataclasses import replace

    options = {}
    if work.batch > 1:
        options["train.batch_size=1 (raise train.grad_accum to keep the step)"] = replace(work, batch=1)
    if not work.gradient_checkpointing:
        options["train.gradient_checkpointing=true"] = replace(work, gradient_checkpointing=True, recompute_mlp=False)
    if work.seq > 256:
        options[f"data.max_length={work.seq // 2}"] = replace(work, seq=work.seq // 2)
    if device.cuda and not work.quantize_4bit:
        options["lora.quantization=4bit (QLoRA)"] = replace(work, quantize_4bit=True)
    if work.kernel == "none" and not work.fixed_kernel:
        options["train.kernels=auto (no full-vocabulary logits)"] = replace(work, kernel="chunked",
                                                                          recompute_mlp=not work.gradient_checkpointing)
    return options


def best_knob(shape: Shape, work: Workload, dtype: str, device: Device, peak_gb: float) -> str:
    """The one change that saves the most, with the peak it would leave."""
    saved = {knob: peak_gb - sum(parts(shape, alt, dtype, device).values()) / 2**30
             for knob, alt in _alternatives(work, device).items()}
    saved = {knob: gb for knob, gb in saved.items() if gb > 0.005}
    if not saved:
        return "no setting of this run lowers it further: a smaller base model, or a device with more memory"
    knob = max(saved, key=lambda k: saved[k])
    return f"{knob} saves the most: about {saved[knob]:.1f} GB"


def check(plan: MemoryEstimate, mode: str, device: Device, world_size: int = 1) -> None:
    """Refuse (exit 2) or warn when the plan exceeds what is free; `mode` is train.memory_check."""
    from lmctl.errors import BadInputError

    needed = plan.estimated_peak_gb * (world_size if not device.cuda else 1)  # CPU processes share the RAM
    if mode == "off" or needed <= plan.free_gb:
        return
    where = "on this CPU" if not device.cuda else f"on {device.name}"
    message = (f"the memory plan needs {needed:.1f} GB but {plan.free_gb:.1f} GB is free {where} "
               f"(largest part: {plan.dominant}, {getattr(plan, plan.dominant + '_gb'):.1f} GB)")
    hint = f"{plan.advice or best_hint(plan)}; train.memory_check=warn trains anyway"
    if mode == "refuse" or (mode == "auto" and device.cuda):
        raise BadInputError(message, hint=hint)
    log.warning("warning: %s; %s", message, hint)


def best_hint(plan: MemoryEstimate) -> str:
    return f"lower the {plan.dominant} part"
