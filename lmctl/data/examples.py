"""Turn checked records into training examples: token ids plus labels (-100 = not learned).

- text: each document ends with EOS and is cut into blocks of at most max_length; blocks
  never span two documents, so no sequence attends across a document boundary.
- completion: prompt tokens are masked, completion tokens + EOS are learned.
- chat: the tokenizer's chat template renders the conversation; only the characters of
  assistant turns (found by rendering the conversation prefix by prefix) are learned,
  including the template's end-of-turn marker, so the model learns to stop.
EOS is always a real label here: padding is masked by position in `collate`, never by
token id, so pad == eos cannot hide it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmctl.errors import DataError

IGNORE = -100


@dataclass
class ExampleSet:
    examples: list[dict[str, list[int]]] = field(default_factory=list)
    tokens_total: int = 0  # tokens before truncation
    tokens_dropped: int = 0  # tokens lost to truncation
    rows_dropped: int = 0  # rows with nothing left to learn after truncation

    @property
    def truncation_rate(self) -> float:
        return self.tokens_dropped / self.tokens_total if self.tokens_total else 0.0

    def add(self, ids: list[int], labels: list[int], max_length: int) -> None:
        self.tokens_total += len(ids)
        self.tokens_dropped += max(0, len(ids) - max_length)
        ids, labels = ids[:max_length], labels[:max_length]
        if len(ids) < 2 or all(label == IGNORE for label in labels[1:]):
            self.rows_dropped += 1
            return
        self.examples.append({"input_ids": ids, "labels": labels})


def _text_examples(texts: list[str], tokenizer: Any, max_length: int) -> ExampleSet:
    out = ExampleSet()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        ids = list(ids) + eos
        out.tokens_total += len(ids)
        for i in range(0, len(ids), max_length):
            block = ids[i : i + max_length]
            if len(block) > 1:
                out.examples.append({"input_ids": block, "labels": list(block)})
    return out


def _completion_examples(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> ExampleSet:
    out = ExampleSet()
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for rec in records:
        prompt = tokenizer(rec.get("prompt") or "", add_special_tokens=True)["input_ids"]
        completion = tokenizer(rec["completion"], add_special_tokens=False)["input_ids"] + eos
        out.add(prompt + completion, [IGNORE] * len(prompt) + completion, max_length)
    return out


def assistant_spans(messages: list[dict[str, str]], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    render = tokenizer.apply_chat_template
    full = render(messages, tokenize=False)
    spans = []
    for i, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = render(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        upto = render(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "cannot tell assistant turns apart")
        spans.append((len(before), len(upto)))
    return full, spans


def _chat_examples(records: list[dict[str, Any]], tokenizer: Any, max_length: int) -> ExampleSet:
    out = ExampleSet()
    for rec in records:
        text, spans = assistant_spans(rec["messages"], tokenizer)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        labels = [
            tok if any(s <= start < e for s, e in spans) else IGNORE
            for tok, (start, _end) in zip(enc["input_ids"], enc["offset_mapping"])
        ]
        out.add(list(enc["input_ids"]), labels, max_length)
    return out


def build_examples(path: Path, records: list[dict[str, Any]], fmt: str, text_field: str,
                   tokenizer: Any, max_length: int) -> ExampleSet:
    """Tokenized examples for one file in one of the three shapes."""
    if fmt == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{path}: chat data needs a chat template, and this tokenizer has none",
                            hint="use a chat model's tokenizer or convert the data to prompt/completion")
        return _chat_examples(records, tokenizer, max_length)
    if fmt == "completion":
        return _completion_examples(records, tokenizer, max_length)
    texts = [r[text_field] for r in records if isinstance(r.get(text_field), str) and r[text_field].strip()]
    return _text_examples(texts, tokenizer, max_length)


def collate(rows: list[dict[str, list[int]]], pad_id: int) -> dict[str, Any]:
    """Right-pad a batch; labels are -100 exactly on padding (never on a real EOS, even if pad == eos)."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row.get("labels", row["input_ids"]))
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
