"""Record shapes: what is learned (labels) for text, completion and chat data; row errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import ASSETS
from lmctl import data
from lmctl.train import preflight
from lmctl.data.examples import IGNORE, ExampleSet, build_examples
from lmctl.errors import BadInputError, DataError
from lmctl.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_base: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(str(tiny_base))


def _examples(path: Path, tok, max_length: int = 128) -> tuple[str, ExampleSet]:  # type: ignore[no-untyped-def]
    records = data.load_records(path)
    fmt = data.detect_format(path, records, "text")
    data.check_rows(path, records, fmt, "text")
    return fmt, build_examples(path, records, fmt, "text", tok, max_length)


def _learned_text(tok, ex: dict) -> str:  # type: ignore[no-untyped-def]
    return tok.decode([t for t, label in zip(ex["input_ids"], ex["labels"]) if label != IGNORE])


def test_completion_learns_only_the_completion_and_eos(tok) -> None:  # type: ignore[no-untyped-def]
    fmt, examples = _examples(ASSETS / "tiny_completion.jsonl", tok)
    first = json.loads((ASSETS / "tiny_completion.jsonl").read_text().splitlines()[0])
    assert fmt == "completion" and len(examples.examples) == 24
    ex = examples.examples[0]
    assert _learned_text(tok, ex) == first["completion"] + "</s>"
    assert ex["labels"][-1] == tok.eos_token_id and tok.pad_token_id == tok.eos_token_id


def test_chat_learns_only_assistant_turns(tok) -> None:  # type: ignore[no-untyped-def]
    fmt, examples = _examples(ASSETS / "tiny_chat.jsonl", tok, max_length=256)
    assert examples.tokens_dropped == 0
    rows = [json.loads(line) for line in (ASSETS / "tiny_chat.jsonl").read_text().splitlines()]
    assert fmt == "chat"
    for row, ex in zip(rows, examples.examples):
        learned = _learned_text(tok, ex)
        expected = "".join(m["content"] + "</s>\n" for m in row["messages"] if m["role"] == "assistant")
        assert learned == expected
        assert all(m["content"] not in learned for m in row["messages"] if m["role"] != "assistant")


def test_chat_without_template_is_refused(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    tok_no_template = tok.__class__.from_pretrained(tok.name_or_path)
    tok_no_template.chat_template = None
    with pytest.raises(DataError, match="needs a chat template"):
        _examples(ASSETS / "tiny_chat.jsonl", tok_no_template)


@pytest.mark.parametrize(("row", "message"), [
    ({"messages": [{"role": "robot", "content": "hi"}]}, "row 2: field 'messages'[0].role"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "row 2: field 'messages' has no assistant turn"),
    ({"messages": [{"role": "assistant", "content": 3}]}, "row 2: field 'messages'[0].content"),
])
def test_bad_chat_rows_are_named(tmp_path: Path, row: dict, message: str) -> None:
    path = tmp_path / "chat.jsonl"
    good = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    records = data.load_records(path)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        data.check_rows(path, records, data.detect_format(path, records, "text"), "text")


def test_empty_completion_is_named(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,completion\nhello,world\nhi,\n")
    records = data.load_records(path)
    with pytest.raises(DataError, match="row 2: field 'completion' is empty"):
        data.check_rows(path, records, data.detect_format(path, records, "text"), "text")


def test_parquet_and_csv_text_load(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame({"body": ["first document", "second document"]})
    frame.to_parquet(tmp_path / "d.parquet")
    frame.to_csv(tmp_path / "d.csv", index=False)
    for name in ("d.parquet", "d.csv"):
        records = data.load_records(tmp_path / name)
        assert data.detect_format(tmp_path / name, records, "body") == "text"
        assert [r["body"] for r in records] == ["first document", "second document"]


def test_lint_refuses_unlearnable_eos_and_oversized_tokenizer(tok) -> None:  # type: ignore[no-untyped-def]
    no_eos = ExampleSet(examples=[{"input_ids": [5, 6, 7], "labels": [5, 6, 7]}], eos_labels=0)
    with pytest.raises(BadInputError, match="EOS can never be learned"):
        preflight.lint(no_eos, tok, model_vocab_size=len(tok))
    ok = ExampleSet(examples=[{"input_ids": [5, tok.eos_token_id], "labels": [IGNORE, tok.eos_token_id]}], eos_labels=1)
    assert preflight.lint(ok, tok, model_vocab_size=len(tok)).eos_labels == 1
    with pytest.raises(BadInputError, match="embeds only"):
        preflight.lint(ok, tok, model_vocab_size=len(tok) - 1)


CHAT_WITHOUT_EOS = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
                    "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


@pytest.mark.parametrize(("name", "max_length", "template", "says", "not_says"), [
    ("tiny_completion.jsonl", 12, None, "truncation at data.max_length=12 cuts the EOS off every completion example",
     "template"),
    ("tiny_chat.jsonl", 40, None, "truncation at data.max_length=40 cuts the EOS off every chat example", "template"),
    ("tiny_chat.jsonl", 256, CHAT_WITHOUT_EOS, "the chat template ends assistant turns with '<|end|>\\n', not the "
     "tokenizer's EOS '</s>' (the data is fine", "truncation"),
])
def test_unlearnable_eos_names_its_real_cause(tok, name: str, max_length: int, template: str | None, says: str,
                                              not_says: str) -> None:  # type: ignore[no-untyped-def]
    """Real data, really tokenized: the lint blames the cause, not the data (issue 26)."""
    import copy

    tokenizer = copy.deepcopy(tok)
    if template:
        tokenizer.chat_template = template
    _, examples = _examples(ASSETS / name, tokenizer, max_length=max_length)
    assert examples.eos_labels == 0
    with pytest.raises(BadInputError) as raised:
        preflight.lint(examples, tokenizer, model_vocab_size=len(tokenizer))
    message = str(raised.value)
    assert message.startswith("EOS can never be learned") and says in message, message
    assert not_says not in message and "completions must end" not in message


@pytest.mark.parametrize(("name", "max_length"), [("tiny_train.jsonl", 16), ("tiny_completion.jsonl", 12),
                                                 ("tiny_chat.jsonl", 40), ("tiny_chat.jsonl", 256)])
def test_learned_eos_are_counted_while_tokenizing(tok, name: str, max_length: int) -> None:  # type: ignore[no-untyped-def]
    """The lint's EOS count comes from the tokenizing pass; it must equal the EOS labels the examples carry."""
    _, examples = _examples(ASSETS / name, tok, max_length=max_length)
    counted = sum(ex["labels"].count(tok.eos_token_id) for ex in examples.examples)
    assert examples.eos_labels == counted
    assert counted > 0 or max_length < 64  # short limits may cut every EOS off


def test_lint_warns_on_heavy_truncation(tok) -> None:  # type: ignore[no-untyped-def]
    _, full = _examples(ASSETS / "tiny_completion.jsonl", tok)
    shortest = min(len(ex["input_ids"]) for ex in full.examples)
    # cut at the shortest row: it keeps its EOS, every longer row loses its tail
    _, examples = _examples(ASSETS / "tiny_completion.jsonl", tok, max_length=shortest)
    report = preflight.lint(examples, tok, model_vocab_size=len(tok))
    assert examples.truncation_rate > 0.05
    assert any("truncation drops" in w for w in report.warnings)


def test_train_on_chat_and_completion_data(cli, tiny_config: Path) -> None:
    for name in ("tiny_chat.jsonl", "tiny_completion.jsonl"):
        result = cli("train", tiny_config, "--set", f"data.train={ASSETS / name}", "--set", "data.validation=null", "--set", "data.max_length=200",
                     "--set", "train.max_steps=2", "--set", "train.save_every=2", "--resume", "never", "--json")
        assert result.code == 0, result.err
        manifest = json.loads((Path(result.json["checkpoint"]) / "lmctl.json").read_text())
        assert manifest["data"]["train"]["format"] == name.split("_")[1].split(".")[0]
