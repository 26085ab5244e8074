"""The memory plan of a training run: its peak, from shapes alone (a meta-device model), before
any weight is loaded. `--dry-run` prints it; `train` compares it with what is free on the
device and refuses or warns (train.memory_check) before loading weights. docs/memory.md.

peak ~= weights (frozen base, in the dtype training really uses: lmctl.device.resolve_dtype;
          QLoRA: NF4 blocks at ~0.53 B/param, the rest float32 as peft's kbit preparation casts it)
       + optimizer (LoRA params in float32, their gradients and two Adam moments: 16 B/param)
       + activations (what autograd saves for backward, per token and layer: the norms'
         float32 inputs and outputs, q, k, v and the attention output, the MLP's
         intermediate-sized tensors, with packed rows each layer's copy of the block-diagonal
         mask; with gradient checkpointing, one layer's plus each layer's input: activation_bytes;
         on a glibc CPU plus the freed forward temporaries its heap keeps resident: heap_bytes)
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
# the interpreter with torch, transformers, peft and datasets imported (0.50 GB; MLflow lives in its
# own process, lmctl.train.mlflow_worker, 0.27 GB not counted here), plus what `lmctl train` holds
# beyond its tensors (the Trainer and accelerate state, the tokenizer, allocator slack): 0.09-0.32 GB
# more at the three shapes of scripts/bench_memory_plan.py (512-token rows)
RUNTIME_CPU_BYTES = int(0.7 * 2**30)
GLIBC_MMAP_MAX = 32 * 2**20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX: larger blocks are always mmapped
HEAP_BLOCKS_PER_LAYER = 6  # heap_bytes: measured 5.6-6.5 at two shapes, two lengths each
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
    packed: bool = False  # data.packing: rows hold several examples, attention gets a block-diagonal mask


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
    """What autograd saves for backward, per token and layer, as counted on the CPU (unique
    storages saved through torch.autograd.graph.saved_tensors_hooks; scripts/bench_memory_plan.py
    --breakdown), SDPA attention, LoRA on every linear layer:

    - each of the two RMSNorms: its input in float32 (in float32 training the residual itself;
      in half precision the upcast copy) and its output: 2 x (4 + element) bytes per hidden unit;
    - attention: rotated q and the attention output (hidden-sized each), k and v at kv width,
      the kernel's float32 row statistic (one per head), and with `work.packed` (data.packing:
      rows hold several examples, so attention gets a block-diagonal mask) k and v expanded to
      every head (transformers' repeat_kv: SDPA takes grouped k/v only without a mask) and the
      mask as the kernel keeps it, one [seq, seq] copy per layer: `seq` elements per token;
    - the MLP: 4 intermediate-sized tensors of a gated MLP (gate, act(gate), up, their product),
      2 (gate and up) when lmctl.train.gated_mlp recomputes act(gate) * up and down_proj's LoRA A.
    At the SmolLM2-135M shape (2048 tokens) that is 8,457 floats per token and layer without
    packing and 11,273 with it; counted 8,594 and 11,410 (LoRA's rank-sized inputs and shared
    position tables make the rest). `scores`: eager attention also keeps its heads x seq
    probabilities; SDPA's flash and memory-efficient kernels (CUDA, and the CPU's flash kernel)
    keep the row statistic only. With gradient checkpointing: each layer's input, plus one layer.
    What the CPU's allocator holds beyond these is `heap_bytes`."""
    tokens = work.batch * work.seq
    e = element_bytes
    kv = shape.hidden if work.packed else shape.kv_dim  # repeat_kv under a mask
    norms = 2 * (4 + e) * shape.hidden
    attention = 2 * e * shape.hidden + 2 * e * kv + 4 * shape.heads + (e * work.seq if work.packed else 0)
    intermediates = 2 if work.recompute_mlp and shape.gated_mlp else 4
    per_token_layer = (norms + attention + intermediates * e * shape.intermediate
                       + (e * shape.heads * work.seq if scores else 0))
    if work.gradient_checkpointing:  # each layer's input, plus one layer recomputed in backward
        return tokens * (shape.layers * shape.hidden * e + per_token_layer)
    return shape.layers * tokens * per_token_layer


def heap_bytes(shape: Shape, work: Workload, element_bytes: int, glibc: bool) -> int:
    """What the CPU's allocator keeps resident beyond the tensors alive. glibc's malloc serves
    blocks up to its mmap threshold from the heap, and the threshold rises to the largest block
    freed (up to DEFAULT_MMAP_THRESHOLD_MAX, 32 MiB on 64-bit), so within the first step every
    per-layer tensor under 32 MiB comes from the heap. Forward frees many temporaries per layer
    (LoRA's base and B outputs, rotary and norm intermediates, act(gate)); the smaller blocks
    kept for backward split their holes, so the heap grows by about six of the layer's largest
    temporary (hidden- or intermediate-sized) per layer, and those pages stay resident.
    Measured (RSS after forward over the loaded model minus the bytes saved for backward; fp32,
    one thread; scripts/bench_memory_plan.py --breakdown, first and second step), in blocks of
    the largest temporary under 32 MiB: SmolLM2-135M shape (30 layers, intermediate 1536)
    6.0-6.5 at 1 x 2048 tokens and 6.1-6.3 at 2 x 512, packed or not; Qwen2.5-0.5B shape (6
    layers) 5.6-6.5 at 2 x 512. At 1 x 2048 that shape's intermediates (38 MiB) are mmapped and
    returned on free, yet hidden-sized blocks and the packed mask keep 0.54-0.66 GB (the rule:
    0.25 GB). With MALLOC_MMAP_THRESHOLD_=1048576 the extra vanishes (RSS after forward = the
    saved bytes), at ~30% slower backward. Gradient checkpointing does not avoid it (its
    no-grad forward frees the same temporaries between the layer inputs it keeps): 4.1 blocks
    per layer at the 135M shape (2 x 512), so there the rule errs high by ~0.35 GB. Not counted:
    CUDA (its caching allocator's reserve is the context part) and C libraries other than glibc."""
    if not glibc:
        return 0
    tokens = work.batch * work.seq
    temporaries = [n * element_bytes for n in (tokens * shape.hidden, tokens * shape.intermediate)]
    return HEAP_BLOCKS_PER_LAYER * shape.layers * max((t for t in temporaries if t <= GLIBC_MMAP_MAX), default=0)


def parts(shape: Shape, work: Workload, dtype: str, device: Device) -> dict[str, float]:
    """Bytes of each part of the peak; `activations` is what autograd saves plus, on a glibc
    CPU, what the heap keeps of forward's freed temporaries (activation_bytes, heap_bytes)."""
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
        "activations": float(activation_bytes(shape, work, element, shape.eager_attention)
                             + heap_bytes(shape, work, element, not device.cuda and _glibc())),
        "logits": float(logits_bytes(work.kernel, tokens, shape.vocab, shape.hidden,
                                     4 if work.quantize_4bit else element, device)),
        # a batch as Python lists (~40 B per token for ids, labels, positions) and as tensors, 2 in flight
        "data": float(work.data_bytes + 2 * tokens * (40 + 3 * 8)),
        "runtime": float(CUDA_CONTEXT_BYTES if device.cuda else RUNTIME_CPU_BYTES),
    }


def _glibc() -> bool:
    import platform

    return platform.libc_ver()[0] == "glibc"


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
