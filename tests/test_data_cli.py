"""`lmctl data validate|prepare` on real files: stats, overlap, PII, redaction, split."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ASSETS

ROWS = [
    {"text": "Contact alice@example.com about the adapter."},
    {"text": "The registry verifies every checkpoint."},
    {"text": "The registry verifies every checkpoint."},
    {"text": "Card 4111 1111 1111 1111 was charged."},
    {"text": "   "},
    {"text": "Server 192.168.10.20 serves one request."},
] + [{"text": f"Row number {i} reads the manifest."} for i in range(30)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_validate_reports_duplicates_empty_overlap_pii_and_tokens(cli, tmp_path: Path, tiny_base: Path) -> None:
    train = _write(tmp_path / "train.jsonl", ROWS)
    val = _write(tmp_path / "val.jsonl", [ROWS[1], {"text": "A new held-out row."}])
    result = cli("data", "validate", train, "--validation", val, "--model", tiny_base, "--max-length", "8", "--json")
    assert result.code == 0, result.err
    report = result.json
    assert report["train"]["rows"] == 36 and report["train"]["empty_rows"] == 1
    assert report["train"]["duplicate_rows"] == 1 and report["overlap_rows"] == 1
    assert report["train"]["pii"] == {"card": 1, "email": 1, "ip": 1}
    tokens = report["train"]["tokens"]
    assert tokens["p50"] <= tokens["p95"] <= tokens["max"] and tokens["truncation_rate"] > 0
    assert report["ok"] is False and any("PII" in issue for issue in report["issues"])


def test_validate_a_config_uses_its_data_and_tokenizer(cli, tiny_config: Path) -> None:
    result = cli("data", "validate", tiny_config, "--json")
    assert result.code == 0, result.err
    assert result.json["train"]["rows"] == 48 and result.json["train"]["tokens"]["max_length"] == 64
    assert result.json["validation"]["rows"] == 8


def test_prepare_redacts_dedups_and_splits_deterministically(cli, tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw.jsonl", ROWS)
    first = cli("data", "prepare", raw, "--out", tmp_path / "a", "--validation-share", "0.3", "--json")
    assert first.code == 0, first.err
    res = first.json
    assert res["rows_in"] == 36 and res["duplicates_removed"] == 1
    assert res["removed"] == {"duplicate": 1, "empty": 1} and res["identical_after_redaction"] == 0
    assert res["train_rows"] + res["validation_rows"] == 34 and res["validation_rows"] > 0
    assert res["pii_redacted"] == {"card": 1, "email": 1, "ip": 1}
    text = (tmp_path / "a" / "train.jsonl").read_text() + (tmp_path / "a" / "validation.jsonl").read_text()
    assert "alice@example.com" not in text and "[REDACTED_EMAIL]" in text and "4111" not in text
    again = cli("data", "prepare", raw, "--out", tmp_path / "b", "--validation-share", "0.3", "--json").json
    assert again["train_fingerprint"] == res["train_fingerprint"]
    # adding rows never moves an existing row between the splits
    grown = _write(tmp_path / "grown.jsonl", ROWS + [{"text": f"Extra row {i}."} for i in range(10)])
    cli("data", "prepare", grown, "--out", tmp_path / "c", "--validation-share", "0.3")
    old_val = set((tmp_path / "a" / "validation.jsonl").read_text().splitlines())
    assert old_val <= set((tmp_path / "c" / "validation.jsonl").read_text().splitlines())


def test_prepare_refuses_to_overwrite_without_force(cli, tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw.jsonl", ROWS)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    result = cli("data", "prepare", raw, "--out", out)
    assert result.code == 2 and (out / "keep.txt").read_text() == "precious"
    assert cli("data", "prepare", raw, "--out", out, "--force").code == 0
    assert (out / "prepare.json").is_file() and not (out / "keep.txt").exists()


def test_prepare_chat_redacts_message_contents(cli, tmp_path: Path) -> None:
    rows = [json.loads(line) for line in (ASSETS / "tiny_chat.jsonl").read_text().splitlines()]
    rows[0]["messages"][1]["content"] = "Mail me at bob@example.org please"
    raw = _write(tmp_path / "chat.jsonl", rows)
    result = cli("data", "prepare", raw, "--out", tmp_path / "out", "--json")
    assert result.code == 0 and result.json["format"] == "chat" and result.json["pii_redacted"] == {"email": 1}
    assert "bob@example.org" not in (tmp_path / "out" / "train.jsonl").read_text() + (
        (tmp_path / "out" / "validation.jsonl").read_text() if (tmp_path / "out" / "validation.jsonl").exists() else "")


def test_prepare_and_validate_agree_on_duplicates_before_redaction(cli, tmp_path: Path) -> None:
    # Issue 26: four tickets that differ only in the phone number were collapsed into one by
    # prepare (it de-duplicated after redaction) while validate said 0 duplicate rows.
    tickets = [{"text": f"Customer called from {phone} about a failed payment."}
               for phone in ("020 7946 0958", "07700 900123", "+1-202-555-0173", "(202) 555-0188")]
    rows = tickets + [tickets[0], {"text": "  "}] + [{"text": f"Filler row {i} about the adapter."} for i in range(6)]
    raw = _write(tmp_path / "raw.jsonl", rows)
    report = cli("data", "validate", raw, "--json")
    assert report.code == 0, report.err
    result = cli("data", "prepare", raw, "--out", tmp_path / "out", "--validation-share", "0", "--json")
    assert result.code == 0, result.err
    res = result.json
    assert res["removed"] == {"duplicate": 1, "empty": 1} and res["duplicates_removed"] == 1
    assert res["removed"]["duplicate"] == report.json["train"]["duplicate_rows"]
    assert res["train_rows"] == 10 and res["pii_redacted"] == {"phone": 4}
    # the four redacted tickets are now the same text: kept, and said so
    assert res["identical_after_redaction"] == 3
    written = (tmp_path / "out" / "train.jsonl").read_text()
    assert written.count("Customer called from [REDACTED_PHONE]") == 4 and "7946" not in written


def test_prepare_phone_regions_are_configurable(cli, tmp_path: Path) -> None:
    raw = _write(tmp_path / "raw.jsonl", [{"text": "Llame al 912 345 678 hoy."}, {"text": "Otra fila."}])
    default = cli("data", "prepare", raw, "--out", tmp_path / "a", "--validation-share", "0", "--json")
    spain = cli("data", "prepare", raw, "--out", tmp_path / "b", "--validation-share", "0", "--pii-regions", "ES,GB",
                "--json")
    assert default.json["pii_redacted"] == {} and spain.json["pii_redacted"] == {"phone": 1}
    bad = cli("data", "prepare", raw, "--out", tmp_path / "c", "--pii-regions", "UK")
    assert bad.code == 2 and "UK" in bad.err
