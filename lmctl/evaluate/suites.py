"""Task suites: generation (exact / contains / regex), multiple choice by log-likelihood,
reference QA (incorrect-answer rate, a hallucination proxy) and safety (violation rate).

A suite is YAML (`name`, `kind`, optional `max_tokens`, `chat`, and `items`) or JSONL (one
item per line, each with its own `kind`; the name is the file stem). Generation is greedy,
so scores are reproducible, and under torchrun each rank judges its share of the items
(item i on rank i % size): an item's verdict does not depend on where it ran. With
`chat: true` the prompt is sent as a user turn through the tokenizer's chat template, as a
chat model expects.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, model_validator

from lmctl.distributed import World
from lmctl.errors import BadInputError

Kind = Literal["generation", "multiple_choice", "reference_qa", "safety"]


class Item(BaseModel):
    prompt: str = Field(min_length=1)
    kind: Kind | None = None
    expected: str | None = None
    scorer: Literal["exact", "contains", "regex"] = "contains"
    choices: list[str] | None = None
    answer: int | str | None = None
    aliases: list[str] = Field(default_factory=list)
    forbidden: list[str] = Field(default_factory=list)


class Suite(BaseModel):
    name: str
    kind: Kind | None = None
    max_tokens: int = Field(32, ge=1, le=512)
    chat: bool = False
    items: list[Item] = Field(min_length=1)

    @model_validator(mode="after")
    def _items_complete(self) -> "Suite":
        for i, item in enumerate(self.items):
            item.kind = item.kind or self.kind
            need = {"generation": item.expected is not None, "multiple_choice": bool(item.choices) and item.answer is not None,
                    "reference_qa": item.answer is not None, "safety": bool(item.forbidden)}
            if item.kind is None or not need[item.kind]:
                raise ValueError(f"item {i}: kind {item.kind!r} needs "
                                 + {"generation": "expected", "multiple_choice": "choices and answer",
                                    "reference_qa": "answer", "safety": "forbidden patterns"}.get(str(item.kind), "a kind"))
            for pattern in item.forbidden + ([item.expected] if item.scorer == "regex" and item.expected else []):
                re.compile(pattern)
        return self


class SuiteResult(BaseModel):
    name: str
    kinds: list[str]
    items: int
    score: float  # share of items passed (safety: share without a violation)
    incorrect_rate: float | None = None
    safety_violations: int = 0
    violation_rate: float | None = None
    failures: list[dict[str, Any]] = Field(default_factory=list)


def load_suite(path: Path) -> Suite:
    import yaml  # only when a suite is given: `lmctl eval` without one need not pay for it

    if not path.is_file():
        raise BadInputError(f"suite file not found: {path}")
    try:
        if path.suffix.lower() == ".jsonl":
            items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            raw: Any = {"name": path.stem, "items": items}
        else:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return Suite.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BadInputError(f"{path}: invalid suite: {where + ': ' if where else ''}{err['msg']}") from None
    except (ValueError, yaml.YAMLError, re.error) as exc:
        raise BadInputError(f"{path}: invalid suite: {str(exc).splitlines()[0]}") from None


def _prompt_ids(tokenizer: Any, prompt: str, chat: bool) -> list[int]:
    if chat:
        return list(tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                  tokenize=True, return_dict=False))
    return list(tokenizer(prompt)["input_ids"])


def _generate(model: Any, tokenizer: Any, prompt: str, chat: bool, max_tokens: int) -> str:
    import torch

    ids = torch.tensor([_prompt_ids(tokenizer, prompt, chat)], device=next(model.parameters()).device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _choice_logprob(model: Any, tokenizer: Any, prompt_ids: list[int], choice: str) -> float:
    import torch

    choice_ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + choice_ids], device=next(model.parameters()).device)
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
    targets = ids[0, len(prompt_ids):]
    return float(logprobs[len(prompt_ids) - 1:].gather(1, targets[:, None]).sum())


def _judge(model: Any, tokenizer: Any, item: Item, suite: Suite) -> tuple[bool, str]:
    """(passed, what the model said) for one item."""
    if item.kind == "multiple_choice":
        prompt_ids = _prompt_ids(tokenizer, item.prompt, suite.chat)
        scores = [_choice_logprob(model, tokenizer, prompt_ids, c) for c in item.choices or []]
        picked = max(range(len(scores)), key=scores.__getitem__)
        answer = item.answer if isinstance(item.answer, int) else (item.choices or []).index(str(item.answer))
        return picked == answer, (item.choices or [])[picked]
    output = _generate(model, tokenizer, item.prompt, suite.chat, suite.max_tokens)
    text = output.strip()
    if item.kind == "safety":
        return not any(re.search(p, output, re.IGNORECASE) for p in item.forbidden), output
    if item.kind == "reference_qa":
        accepted = [str(item.answer), *item.aliases]
        return any(a.lower() in text.lower() for a in accepted), output
    expected = str(item.expected)
    if item.scorer == "exact":
        return text == expected.strip(), output
    if item.scorer == "regex":
        return re.search(expected, text) is not None, output
    return expected.lower() in text.lower(), output


def run_suite(model: Any, tokenizer: Any, suite: Suite, world: World = World()) -> SuiteResult:
    """Judge every item (each rank of `world` its share) and score the suite, on every rank."""
    mine = [(index, _judge(model, tokenizer, item, suite)) for index, item in enumerate(suite.items)
            if world.owns(index)]
    passed, failures = 0, []
    kinds = sorted({str(i.kind) for i in suite.items})
    for index, (ok, said) in world.in_order(mine):
        item = suite.items[index]
        passed += ok
        if not ok:
            failures.append({"index": index, "kind": item.kind, "prompt": item.prompt[:200], "output": said[:200]})
    n = len(suite.items)
    qa = [f for f in failures if f["kind"] == "reference_qa"]
    safety_items = sum(1 for i in suite.items if i.kind == "safety")
    violations = sum(1 for f in failures if f["kind"] == "safety")
    qa_items = sum(1 for i in suite.items if i.kind == "reference_qa")
    return SuiteResult(
        name=suite.name, kinds=kinds, items=n, score=passed / n, failures=failures,
        incorrect_rate=len(qa) / qa_items if qa_items else None, safety_violations=violations,
        violation_rate=violations / safety_items if safety_items else None,
    )
