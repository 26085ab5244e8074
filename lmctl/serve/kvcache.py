"""The serving engine's KV cache: its layer, its memory budget, and grouped-query attention.

`auto_batch_limits` sizes a batch from the KV cache's bytes per token and the memory free on
the device; the engine admits a request only while the batch's cache fits that budget.

Why hand-written (both measured on SmolLM2-135M, 32 rows, CPU, 1 thread):
- transformers 5.17's `DynamicLayer.update` concatenates each layer's keys and values into a
  new tensor on every decode step, a copy of the whole cache per step that grows with
  rows x length; `StaticLayer` preallocates, but for a batch size and length fixed at creation,
  while the engine's batch gains and loses rows between steps. `GrowingLayer` is a
  `DynamicLayer` (same `update` / `get_seq_length` / `get_mask_sizes` / `batch_select_indices`
  contract, so the model code sees no difference) that appends into a preallocated buffer
  grown by doubling, and adds the two row operations the engine needs (append another
  cache's rows; drop leading all-padding columns) without rebuilding anything per step.
- transformers' `sdpa` attention expands grouped-query keys and values to every query head
  (`repeat_kv`: a copy of n_rep x the cache per layer per step, 3x for SmolLM2) whenever an
  attention mask is passed, which the engine's left-padded batch always does; on the CPU
  torch's `scaled_dot_product_attention(enable_gqa=True)` takes the mask directly. The result
  is bitwise identical, and the attention ~3-5x faster at 32 rows. `use_gqa_attention`
  registers it under its own name in transformers' `AttentionInterface` and switches a model
  that uses `sdpa` to it; anything else (eager, flash, no mask) goes through transformers' own
  code. On CUDA no fused kernel takes a mask and grouped K/V together, so there the keys and
  values are expanded (`attention_plan`: the memory-efficient kernel, not the math one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

GQA_ATTENTION = "lmctl_sdpa_gqa"
RAGGED_KWARG = "lmctl_ragged"  # forward(**{RAGGED_KWARG: step}): attention runs lmctl.serve.ragged.RaggedStep.attend
_MIN_COLUMNS = 16  # smallest buffer: a short prompt plus a few decode steps without regrowing


# Rows decoded together at most. Measured on CPU: at 32 clients a cap of 16 gave 0.38x
# transformers serve (which batches all 32); a CPU decode step at these sizes is bound by
# reading the weights, so more rows are nearly free until the KV budget below says no.
CPU_BATCH_CAP, GPU_BATCH_CAP = 64, 256


# Batches of at most this many rows feed draft tokens (lmctl.serve.drafts). A forward costs a
# fixed part (reading the weights) plus a part per token fed, so every draft token slows the
# step for all its rows; the more rows, the more a request whose text does not repeat waits on
# the others' guesses. Measured on CPU (SmolLM2-135M, 1 thread, greedy, 32 new tokens; a step
# ~65 ms + ~4.5 ms per token; 74% of the drafts accepted), drafts on vs. off: 1 client 1.84x
# tokens/s and p95 0.63x; 2 clients 2.0x, 0.56x; 4 clients 1.49x, 0.87x; 8 clients 1.15x but
# p95 1.09x. On a GPU the fixed part dwarfs the per-token one (not measured here).
CPU_DRAFT_ROWS, GPU_DRAFT_ROWS = 4, 32


def _available_ram() -> int:
    """MemAvailable (free + reclaimable page cache), not MemFree, which a busy page cache hides."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def kv_limits(device_type: str, bytes_per_token: int, free_bytes: int) -> tuple[int, int]:
    """(most rows per batch, KV-cache tokens in the budget) on a device of `device_type` with
    `free_bytes` free there: half the free GPU memory (the weights are already on it; activations
    and the allocator's slack take the rest), a quarter of the available RAM on the CPU."""
    if device_type == "cuda":
        return GPU_BATCH_CAP, max(1, free_bytes // 2 // bytes_per_token)
    return CPU_BATCH_CAP, max(1, free_bytes // 4 // bytes_per_token)


def auto_batch_limits(model: Any) -> tuple[int, int]:
    """`kv_limits` for `model` where its weights are: free GPU memory on CUDA, MemAvailable on
    the CPU. The engine admits rows while the batch's padded cache, counted at every row's
    prompt + max_tokens, stays within the token budget."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    param = next(model.parameters())
    per_token = int(config.num_hidden_layers) * 2 * kv_heads * head_dim * param.element_size()
    cuda = param.device.type == "cuda"
    free = torch.cuda.mem_get_info(param.device)[0] if cuda else _available_ram()
    return kv_limits(param.device.type, per_token, free)


@dataclass(frozen=True)
class AttentionPlan:
    """How the engine's masked attention calls SDPA on one device: `kernel` is the
    torch.nn.attention.SDPBackend it is meant to land on (a test or gpu_check can restrict SDPA to
    it), `expand_kv` whether grouped keys/values are first repeated to the query heads."""

    kernel: str
    expand_kv: bool


def attention_plan(device_type: str) -> AttentionPlan:
    """On CUDA the flash kernel refuses an attention mask and the memory-efficient one refuses
    grouped K/V (`enable_gqa`), so a masked grouped call falls to the math kernel, which builds
    the whole score matrix in the input dtype; expanded K/V (one copy per layer and step, as
    transformers' own sdpa path does) keep it on the memory-efficient kernel. torch's CPU flash
    kernel takes the mask and the groups as they are (no copy: the numbers the engine gave
    before this plan existed)."""
    if device_type == "cuda":
        return AttentionPlan(kernel="EFFICIENT_ATTENTION", expand_kv=True)
    return AttentionPlan(kernel="FLASH_ATTENTION", expand_kv=False)


def attention_kernel(device_type: str, engine_owned: bool, implementation: str) -> str:
    """What /healthz and the start-up log name as the serving attention: the SDPA kernel the
    engine's masked (decode) attention is planned for, lower-case, `+expanded_kv` where grouped
    K/V are repeated first; or transformers' own implementation where the engine does not own
    the attention (`use_gqa_attention` declined the model)."""
    if not engine_owned:
        return f"transformers:{implementation}"
    plan = attention_plan(device_type)
    return plan.kernel.lower().removesuffix("_attention") + ("+expanded_kv" if plan.expand_kv else "")


def engine_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scaling: float | None, dropout: float = 0.0, is_causal: bool = False,
                plan: AttentionPlan | None = None) -> torch.Tensor:
    """SDPA of (rows, heads, q, dim) queries over grouped (rows, kv_heads, k, dim) keys/values
    under `mask` (or causal), as `attention_plan` says for the query's device (or `plan`). An
    unmasked causal call takes the flash kernel on CUDA in half precision either way; expanded,
    it also keeps the memory-efficient one in fp32."""
    plan = plan or attention_plan(query.device.type)
    groups = query.shape[1] // key.shape[1]
    if plan.expand_kv and groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                            is_causal=is_causal, scale=scaling,
                                                            enable_gqa=groups > 1 and not plan.expand_kv)


class GrowingLayer(DynamicLayer):
    """Keys/values live in `_k`/`_v` (batch, heads, capacity, head_dim); columns [start, end) are
    the cache. `keys`/`values` are views of that window, as DynamicLayer's callers expect."""

    is_croppable = False  # the engine never rolls back; crop() would desynchronise the views

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._start = self._end = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self._k = key_states.new_zeros((*key_states.shape[:2], 0, key_states.shape[-1]))
        self._v = value_states.new_zeros((*value_states.shape[:2], 0, value_states.shape[-1]))
        self._start = self._end = 0
        self._sync()
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self._k is not None and self._v is not None
        n = key_states.shape[-2]
        if self._end + n > self._k.shape[-2]:
            self._relayout(self._k.shape[0], room=n)
        self._k[:, :, self._end:self._end + n] = key_states
        self._v[:, :, self._end:self._end + n] = value_states
        self._end += n
        self._sync()
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingLayer does not roll back")

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("GrowingLayer serves one sequence per row")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows `indices`: one gather of the buffer (its spare columns included, so the
        next steps still append without regrowing)."""
        if self.is_initialized and self._k is not None:
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
            self._sync()

    def drop_leading(self, columns: int) -> None:
        """Forget the first `columns` columns (padding in every row): a view change, no copy."""
        self._start = min(self._end, self._start + columns)
        self._sync()

    def drop_trailing(self, columns: int) -> None:
        """Forget the last `columns` columns (masked in every row): the next update overwrites them."""
        self._end = max(self._start, self._end - columns)
        self._sync()

    def keep_columns(self, index: torch.Tensor) -> None:
        """Row r keeps columns index[r] (rows x new width), in that order: one gather, which
        squeezes out the masked columns that rejected draft tokens leave between live ones."""
        assert self._k is not None and self._v is not None
        rows, width = index.shape
        k, v = self._alloc(rows, 2 * width), self._alloc(rows, 2 * width, values=True)
        expand = index[:, None, :, None].expand(rows, self._k.shape[1], width, self._k.shape[-1])
        k[:, :, :width] = self.keys.gather(2, expand)
        v[:, :, :width] = self.values.gather(2, expand)
        self._k, self._v, self._start, self._end = k, v, 0, width
        self._sync()

    def append_rows(self, other: "GrowingLayer") -> None:
        """Add `other`'s rows below these, right-aligned: the shorter side gets zero columns on
        the left (finite, and masked out by the engine's attention mask)."""
        assert self._k is not None and self._v is not None and other._k is not None and other._v is not None
        mine, theirs = self._end - self._start, other._end - other._start
        width = max(mine, theirs)
        rows = self._k.shape[0] + other._k.shape[0]
        k, v = self._alloc(rows, 2 * width), self._alloc(rows, 2 * width, values=True)
        top = self._k.shape[0]
        k[:top, :, width - mine:width], v[:top, :, width - mine:width] = self.keys, self.values
        k[top:, :, width - theirs:width], v[top:, :, width - theirs:width] = other.keys, other.values
        self._k, self._v, self._start, self._end = k, v, 0, width
        self._sync()

    def _relayout(self, rows: int, room: int) -> None:
        """Move the live columns to the front of buffers with space for twice (live + room)."""
        live = self._end - self._start
        k, v = self._alloc(rows, 2 * (live + room)), self._alloc(rows, 2 * (live + room), values=True)
        k[:, :, :live], v[:, :, :live] = self.keys, self.values
        self._k, self._v, self._start, self._end = k, v, 0, live

    def _alloc(self, rows: int, columns: int, values: bool = False) -> torch.Tensor:
        like = self._v if values else self._k
        assert like is not None
        # Zeros, not empty: left-padding columns are read by attention (masked, but NaN * 0 is NaN).
        return like.new_zeros((rows, like.shape[1], max(_MIN_COLUMNS, columns), like.shape[3]))

    def _sync(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:, :, self._start:self._end]
        self.values = self._v[:, :, self._start:self._end]


class GrowingCache(Cache):
    """A Cache of GrowingLayer, one per model layer, created as the model first writes each."""

    def __init__(self) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)

    def drop_leading(self, columns: int) -> None:
        for layer in self.layers:
            layer.drop_leading(columns)

    def drop_trailing(self, columns: int) -> None:
        for layer in self.layers:
            layer.drop_trailing(columns)

    def keep_columns(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_columns(index)

    def append_rows(self, other: "GrowingCache") -> None:
        for mine, theirs in zip(self.layers, other.layers, strict=True):
            mine.append_rows(theirs)


def _gqa_sdpa(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
              attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
              is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' sdpa attention, but grouped-query keys/values are never expanded; a mixed
    decode-and-prefill step (lmctl.serve.ragged) brings its own attention."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    step = kwargs.pop(RAGGED_KWARG, None)
    if step is not None:
        return step.attend(query, key, value, attention_mask, scaling), None
    if (attention_mask is None or query.shape[1] == key.shape[1] or kwargs.get("position_bias") is not None
            or kwargs.get("output_attentions")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = engine_sdpa(query, key, value, attention_mask, scaling, dropout)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model: Any) -> bool:
    """Switch a model on transformers' `sdpa` attention to `_gqa_sdpa` (same numbers, no K/V
    expansion). Other implementations are left alone. Returns whether the model now uses it."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel -> HF model
    current = getattr(base.config, "_attn_implementation", None)
    if current == GQA_ATTENTION:  # a second engine on the same model
        return True
    if current != "sdpa" or not hasattr(base, "set_attn_implementation"):
        return False
    AttentionInterface.register(GQA_ATTENTION, _gqa_sdpa)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)  # the masks sdpa gets, built the same way
    base.set_attn_implementation(GQA_ATTENTION)
    return True
