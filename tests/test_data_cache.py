"""The tokenization cache: keyed by data, tokenizer, max_length; atomic; corrupt entries rebuilt;
sharded inputs fingerprinted in order; bad rows, changing files and full disks leave no entry."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ASSETS, REPO
from lmctl import data
from lmctl.data import texts
from lmctl.data.cache import root, tokenized
from lmctl.errors import DataError
from lmctl.loading import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_base: Path):  # type: ignore[no-untyped-def]
    return load_tokenizer(str(tiny_base))


def _entries() -> list[Path]:
    return sorted(root().iterdir()) if root().is_dir() else []


def _rows(path: Path, n: int, bad_row: int | None = None) -> Path:
    """n completion rows; row `bad_row` (1-based) has an empty completion."""
    with path.open("w") as fh:
        for i in range(1, n + 1):
            fh.write(json.dumps({"prompt": f"Question {i}?", "completion": "" if i == bad_row else f" Answer {i}."}) + "\n")
    return path


def test_hits_and_misses_are_keyed_by_data_tokenizer_and_max_length(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    train = tmp_path / "train.jsonl"
    shutil.copy(ASSETS / "tiny_train.jsonl", train)
    first = tokenized(train, "text", "auto", tok, 64)
    assert not first.hit and first.fingerprint.sha256 == data.fingerprint(train, "text", 48, "text").sha256
    again = tokenized(train, "text", "auto", tok, 64)
    assert again.hit and again.table["input_ids"] == first.table["input_ids"]
    assert not tokenized(train, "text", "auto", tok, 32).hit  # max_length
    other = tok.__class__.from_pretrained(tok.name_or_path)
    other.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    assert not tokenized(train, "text", "auto", other, 64).hit  # tokenizer
    raw = bytearray(train.read_bytes())
    raw[raw.index(b"The") : raw.index(b"The") + 3] = b"Thy"  # one byte of the data
    train.write_bytes(bytes(raw))
    changed = tokenized(train, "text", "auto", tok, 64)
    assert not changed.hit and changed.fingerprint.sha256 != first.fingerprint.sha256
    assert len(_entries()) == 4


def test_the_fingerprint_names_the_data_by_absolute_path_where_it_is_now(  # type: ignore[no-untyped-def]
        tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """lmctl.json and the model card name the data by an absolute path, not one relative to the directory
    lmctl ran in; a cache hit built from another copy names this one. The sha256 does not change."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(ASSETS / "tiny_train.jsonl", tmp_path / "a" / "train.jsonl")
    shutil.copy(ASSETS / "tiny_train.jsonl", tmp_path / "b" / "train.jsonl")
    monkeypatch.chdir(tmp_path / "a")
    first = tokenized(Path("train.jsonl"), "text", "auto", tok, 64)
    assert first.fingerprint.path == str(tmp_path / "a" / "train.jsonl")
    monkeypatch.chdir(tmp_path)
    other = tokenized(Path("b/../b/train.jsonl"), "text", "auto", tok, 64)  # the same bytes elsewhere: a hit
    assert other.hit and other.fingerprint.path == str(tmp_path / "b" / "train.jsonl")
    assert other.fingerprint.sha256 == first.fingerprint.sha256 == data.fingerprint(
        ASSETS / "tiny_train.jsonl", "text", 48, "text").sha256
    assert data.fingerprint(Path("a/train.jsonl"), "text", 48).path == str(tmp_path / "a" / "train.jsonl")


def test_a_corrupt_or_partial_entry_is_rebuilt(tok, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    first = tokenized(ASSETS / "tiny_train.jsonl", "text", "auto", tok, 64)
    expected = list(first.table["input_ids"])  # read now: the file is changed in place below
    arrow = next(first.path.glob("tokens*.arrow"))
    sealed = arrow.stat()
    blob = bytearray(arrow.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # a flipped bit inside the token ids
    arrow.write_bytes(bytes(blob))
    os.utime(arrow, ns=(sealed.st_atime_ns, sealed.st_mtime_ns))  # same size, mtime put back: ctime still moved
    rebuilt = tokenized(ASSETS / "tiny_train.jsonl", "text", "auto", tok, 64)
    assert not rebuilt.hit and list(rebuilt.table["input_ids"]) == expected
    assert "corrupt" in caplog.text
    (rebuilt.path / "entry.json").unlink()  # what a kill before the final rename would look like
    assert not tokenized(ASSETS / "tiny_train.jsonl", "text", "auto", tok, 64).hit
    assert tokenized(ASSETS / "tiny_train.jsonl", "text", "auto", tok, 64).hit


def test_a_warm_hit_reads_no_bytes_and_a_same_size_rewrite_still_misses(  # type: ignore[no-untyped-def]
        tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Warm runs trust the stat an unchanged file was hashed with (data) or sealed with (entry);
    any write moves ctime, so a rewrite of the same size with its mtime put back still misses,
    and a touched but intact entry file is re-hashed once, kept and sealed again."""
    from lmctl import checkpoint

    train = tmp_path / "train.jsonl"
    shutil.copy(ASSETS / "tiny_train.jsonl", train)
    old = time.time_ns() - 3_600 * 10**9
    os.utime(train, ns=(old, old))  # a file last written an hour ago: its hash may be remembered
    first = tokenized(train, "text", "auto", tok, 64)
    reads: list[Path] = []
    real = checkpoint.file_digest
    monkeypatch.setattr(checkpoint, "file_digest", lambda path: reads.append(path) or real(path))
    assert tokenized(train, "text", "auto", tok, 64).hit and reads == []
    arrow = next(first.path.glob("tokens*.arrow"))
    os.utime(arrow)  # touched, not changed
    assert tokenized(train, "text", "auto", tok, 64).hit and reads == [arrow]
    assert tokenized(train, "text", "auto", tok, 64).hit and reads == [arrow]  # sealed again
    raw = train.read_bytes()
    train.write_bytes(raw.replace(b"The", b"Thy", 1))
    os.utime(train, ns=(old, old))
    changed = tokenized(train, "text", "auto", tok, 64)
    assert not changed.hit and changed.fingerprint.sha256 != first.fingerprint.sha256
    assert changed.fingerprint.sha256 == data.fingerprint(train, "text", 48, "text").sha256


def test_an_entry_is_fsynced_before_it_is_renamed_into_place(  # type: ignore[no-untyped-def]
        tok, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after the rename must not leave an entry whose bytes were never on disk."""
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    built = tokenized(ASSETS / "tiny_train.jsonl", "text", "auto", tok, 64)
    staged = {Path(p).name for p in synced if Path(p).parent.name.startswith(f".tmp-{built.path.name}-")}
    assert {*built.entry.files, "entry.json"} <= staged  # synced while still in the staging directory
    assert synced[-1] == str(root())  # then the rename itself, in the cache directory


def test_sharded_input_is_read_and_fingerprinted_in_sorted_order(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lines = (ASSETS / "tiny_train.jsonl").read_text().splitlines(keepends=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    for name in ["train-2.jsonl", "train-0.jsonl", "train-1.jsonl"]:  # created out of order
        (shards / name).write_text("".join(lines[16 * int(name[6]) : 16 * int(name[6]) + 16]))
    by_dir = tokenized(shards, "text", "auto", tok, 64)
    by_glob = tokenized(shards / "train-*.jsonl", "text", "auto", tok, 64)
    single = tokenized(ASSETS / "tiny_train.jsonl", "text", "auto", tok, 64)
    assert by_dir.table["input_ids"] == by_glob.table["input_ids"] == single.table["input_ids"]
    assert by_dir.fingerprint.rows == 48 and by_dir.fingerprint.sha256 == by_glob.fingerprint.sha256
    # swapping two shards' contents keeps every byte but changes the order: a new fingerprint
    a, b = (shards / "train-0.jsonl").read_text(), (shards / "train-1.jsonl").read_text()
    (shards / "train-0.jsonl").write_text(b)
    (shards / "train-1.jsonl").write_text(a)
    swapped = tokenized(shards, "text", "auto", tok, 64)
    assert not swapped.hit and swapped.fingerprint.sha256 != by_dir.fingerprint.sha256
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    _rows(pairs / "part-a.jsonl", 5)
    _rows(pairs / "part-b.jsonl", 5, bad_row=2)
    with pytest.raises(DataError, match=r"part-b\.jsonl: row 2: field 'completion' is empty"):
        data.load_checked(pairs, "text")


def test_save_to_disk_directory_is_an_input(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(ASSETS / "tiny_train.jsonl"), split="train", cache_dir=str(tmp_path / "c"))
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = tokenized(tmp_path / "saved", "text", "auto", tok, 64)
    assert saved.table["input_ids"] == tokenized(ASSETS / "tiny_train.jsonl", "text", "auto", tok, 64).table["input_ids"]


def test_shape_error_in_100k_rows_names_the_row_and_caches_nothing(cli, tmp_path: Path) -> None:
    path = _rows(tmp_path / "big.jsonl", 100_000, bad_row=73_457)
    result = cli("data", "validate", path, "--json")
    assert result.code == 2, result.err
    assert f"{path}: row 73457: field 'completion' is empty" in result.err
    assert _entries() == []  # neither an entry nor a staging directory is left


def test_a_file_changing_while_read_is_refused_and_not_cached(tok, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _rows(tmp_path / "growing.jsonl", 60_000)

    def append_once_the_build_started() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any(p.name.startswith(".tmp-") for p in _entries()):
            time.sleep(0.002)
        with path.open("a") as fh:
            fh.write(json.dumps({"prompt": "late?", "completion": " row"}) + "\n")

    writer = threading.Thread(target=append_once_the_build_started)
    writer.start()
    with pytest.raises(DataError, match="changed while it was being read"):
        tokenized(path, "text", "auto", tok, 64)
    writer.join()
    assert _entries() == []


def test_a_full_disk_fails_clearly_and_leaves_no_entry(tmp_path: Path, lmctl_home: Path) -> None:
    """A real write failure: the child may not write files over 256 KiB (RLIMIT_FSIZE, EFBIG)."""
    path = _rows(tmp_path / "rows.jsonl", 30_000)
    child = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))\n"
        "from lmctl.cli import main\n"
        f"sys.exit(main(['data', 'validate', {str(path)!r}, '--json']))\n"
    )
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 6, proc.stderr  # the machine's problem (docs/exit-codes.md), not bad input
    assert "no space left to write the tokenization cache" in proc.stderr
    assert not (lmctl_home / "cache" / "tokens").is_dir() or not any((lmctl_home / "cache" / "tokens").iterdir())


def test_cache_list_and_clear_show_sizes(cli, tiny_config: Path) -> None:
    assert cli("data", "validate", tiny_config, "--json").code == 0
    listed = cli("data", "cache", "list", "--json").json
    assert len(listed["entries"]) == 2  # train and validation files
    assert all(e["bytes"] > 0 and e["tokenized"] and e["status"] == "ok" for e in listed["entries"])
    assert listed["total_bytes"] == sum(e["bytes"] for e in listed["entries"])
    cleared = cli("data", "cache", "clear", "--json").json
    assert cleared["removed"] == 2 and cleared["freed_bytes"] == listed["total_bytes"]
    assert cli("data", "cache", "list", "--json").json["entries"] == []


def test_eval_reuses_the_cache_and_misses_on_a_changed_byte_or_tokenizer(  # type: ignore[no-untyped-def]
        cli, tok, tiny_base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A small .jsonl is tokenized in process (no cache, no datasets import); above the size
    limit (set to 0 here) eval reads its documents from the cache, with the same numbers."""
    from lmctl.evaluate.inputs import documents

    path = tmp_path / "docs.jsonl"
    shutil.copy(ASSETS / "tiny_validation.jsonl", path)
    args = ("eval", tiny_base, "--data", path, "--max-length", "32", "--per-document", "--json")
    in_process = cli(*args).json
    assert _entries() == []
    monkeypatch.setattr(texts, "SMALL_JSONL_BYTES", 0)
    first, second = cli(*args), cli(*args)
    assert "tokenization cache miss" in first.err and "tokenization cache hit" in second.err and len(_entries()) == 1
    first, second = first.json, second.json
    for report in (first, second):
        assert report["sums"] == in_process["sums"] and report["documents"] == in_process["documents"]
        assert report["data"] == in_process["data"]
    listed = cli("data", "cache", "list", "--json").json["entries"]
    assert [e["purpose"] for e in listed] == ["eval"] and listed[0]["rows"] == in_process["sums"]["documents"]
    other = tok.__class__.from_pretrained(tok.name_or_path)
    other.add_special_tokens({"additional_special_tokens": ["<tool>"]})
    assert not documents(path, "text", other).hit and documents(path, "text", tok).hit  # tokenizer
    path.write_bytes(path.read_bytes().replace(b"The", b"Thy", 1))  # one byte of the data
    changed = cli(*args)
    assert "tokenization cache miss" in changed.err and len(_entries()) == 3
    changed = changed.json
    assert changed["data"]["sha256"] != first["data"]["sha256"] and changed["sums"] != first["sums"]


def test_validate_of_a_config_tokenizes_with_its_num_proc(cli, tiny_config: Path) -> None:
    """data.num_proc reaches the map: two workers write two Arrow shards, even for 48 rows."""
    import yaml

    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["data"] |= {"num_proc": 2, "validation": None}
    tiny_config.write_text(yaml.safe_dump(cfg))
    assert cli("data", "validate", tiny_config, "--json").code == 0
    [entry] = _entries()
    assert len(list(entry.glob("tokens*.arrow"))) == 2
