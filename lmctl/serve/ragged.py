"""One forward that decodes the running rows and prefills the newcomers' prompts together.

Why: on a CPU a forward at serving batch sizes is bound by reading the weights, so a separate
prefill pass for newcomers costs one more read of every weight while the running rows wait
(the engine's largest remaining loss to `transformers serve` at 8 clients). Padding the prompts
into the decode batch instead would pad every running row to the longest prompt. Here the step's
tokens lie flat in one row: each running row's next token, then each newcomer's whole prompt,
with a position id per token (real positions, so RoPE sees what `generate` gives it). The linear
layers, most of the time, see exactly the real tokens. Only attention must tell the rows apart:
the decode tokens attend to the batch's left-padded cache under its mask, as in a plain decode
step, and each prompt attends causally to itself. transformers has such a ragged forward only
inside its `ContinuousBatchingManager` (engine.py says why the engine does not use it), so the
step is handed to the model's attention through the function kvcache.py already registers in
transformers' `AttentionInterface`, as the `lmctl_ragged` keyword that the model forwards to
attention unchanged; the same object is the step's `past_key_values`.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from lmctl.serve.kvcache import RAGGED_KWARG, GrowingCache, GrowingLayer, engine_sdpa

__all__ = ["RAGGED_KWARG", "RaggedStep", "decode_mask", "full_attention_only"]


class RaggedStep(Cache):
    """The cache and attention of one step. Running row r feeds `queries[r]` tokens (its next
    token, then any draft tokens: lmctl.serve.drafts), newcomer i its whole prompt of
    `lengths[i]` tokens; the flat row holds them in that order. The running rows' tokens are
    appended to their cache as `width_q` new columns, left-aligned (columns past a row's own
    count are zeros that the engine masks); the prompts' keys/values land in `prefilled`,
    right-aligned to the longest prompt (zeros on the left, as GrowingLayer pads)."""

    def __init__(self, running: GrowingCache | None, queries: list[int], lengths: list[int], device: Any) -> None:
        super().__init__(layer_class_to_replicate=GrowingLayer)
        if queries and running is None:
            raise ValueError("decode rows need the running batch's cache")
        self.running, self.lengths = running, lengths
        self.rows, self.decoded = len(queries), sum(queries)
        self.width_q, self.width = max(queries, default=0), max(lengths, default=0)
        self._decode_slots = torch.tensor([row * self.width_q + j for row, q in enumerate(queries) for j in range(q)],
                                          dtype=torch.long, device=device)
        self._prompt_slots = torch.tensor([row * self.width + self.width - n + j
                                           for row, n in enumerate(lengths) for j in range(n)],
                                          dtype=torch.long, device=device)
        self.prefilled = GrowingCache()
        self._decode_kv: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def prefilled_mask(self) -> torch.Tensor:
        """(newcomers, width) attention mask of `prefilled`: 0 on the left padding."""
        mask = torch.zeros(len(self.lengths) * self.width, dtype=torch.long, device=self._prompt_slots.device)
        mask[self._prompt_slots] = 1
        return mask.view(len(self.lengths), self.width)

    def logit_positions(self) -> torch.Tensor:
        """Flat positions whose logits are used: every running row's token, each prompt's last."""
        device = self._prompt_slots.device
        ends = torch.tensor(self.lengths, dtype=torch.long, device=device).cumsum(0) - 1 + self.decoded
        return torch.cat([torch.arange(self.decoded, device=device), ends])

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the running rows' new keys/values to their cache (kept for `attend`), store the
        prompts' in `prefilled`, and hand the flat states on unchanged."""
        cut = self.decoded
        if self.rows:
            assert self.running is not None
            self._decode_kv = self.running.update(
                _scatter(key_states[0, :, :cut], self._decode_slots, self.rows, self.width_q),
                _scatter(value_states[0, :, :cut], self._decode_slots, self.rows, self.width_q), layer_idx)
        if self.lengths:
            self.prefilled.update(_scatter(key_states[0, :, cut:], self._prompt_slots, len(self.lengths), self.width),
                                  _scatter(value_states[0, :, cut:], self._prompt_slots, len(self.lengths), self.width),
                                  layer_idx)
        return key_states, value_states

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, decode_mask: torch.Tensor | None,
               scaling: float | None) -> torch.Tensor:
        """(1, heads, tokens, dim) flat query/key/value -> (1, tokens, heads, dim) attention output."""
        parts = []
        if self.rows:
            assert self._decode_kv is not None
            q = _scatter(query[0, :, :self.decoded], self._decode_slots, self.rows, self.width_q)
            keys, values = self._decode_kv
            out = engine_sdpa(q, keys, values, decode_mask, scaling)  # (rows, heads, Q, dim)
            flat = out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[-1])  # (rows x Q, heads, dim)
            parts.append(flat.index_select(0, self._decode_slots))
        start = self.decoded
        for n in self.lengths:
            span = slice(start, start + n)
            out = engine_sdpa(query[:, :, span], key[:, :, span], value[:, :, span], None, scaling, is_causal=True)
            parts.append(out[0].transpose(0, 1))  # (n, heads, dim)
            start += n
        return torch.cat(parts)[None]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never asked while the engine passes position ids and a prepared mask

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        raise NotImplementedError("a RaggedStep takes a prepared 4D mask")


def _scatter(flat: torch.Tensor, slots: torch.Tensor, groups: int, width: int) -> torch.Tensor:
    """(heads, tokens, dim) -> (groups, heads, width, dim), token t at flat slot slots[t], zeros elsewhere."""
    out = flat.new_zeros((flat.shape[0], groups * width, flat.shape[-1]))
    out.index_copy_(1, slots, flat)
    return out.view(flat.shape[0], groups, width, flat.shape[-1]).transpose(0, 1)


def decode_mask(mask: torch.Tensor | None, width_q: int = 1) -> torch.Tensor:
    """The 4D boolean mask a step passes to the model (so transformers builds none). `mask` is
    the running rows' (rows, columns) mask whose last `width_q` columns are this step's tokens:
    query j of a row sees the earlier columns its mask keeps and its own tokens up to j. A
    1-element placeholder when no row runs."""
    if mask is None:
        return torch.ones((1, 1, 1, 1), dtype=torch.bool)
    keep = mask.bool()[:, None, None, :]
    if width_q == 1:
        return keep
    columns = mask.shape[1]
    causal = torch.ones((width_q, columns), dtype=torch.bool, device=mask.device)
    causal[:, columns - width_q:] = torch.ones((width_q, width_q), dtype=torch.bool, device=mask.device).tril()
    return keep & causal[None, None]


def full_attention_only(config: Any) -> bool:
    """No sliding-window layers: the ragged step's attention sees every cached column."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return all(kind == "full_attention" for kind in layer_types)
    return getattr(config, "sliding_window", None) is None or getattr(config, "use_sliding_window", True) is False
