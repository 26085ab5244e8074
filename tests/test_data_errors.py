"""Broken data files are bad input (exit 2, one line naming the file and what is wrong in it,
the reader's own error chained for --traceback); anything else that fails while reading is a
bug (exit 1), never dressed up as bad data. The files are broken for real: truncated or
overwritten bytes written by pyarrow, invalid JSON, ragged CSV, Latin-1 text."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import ASSETS, run_subprocess


def _table():  # type: ignore[no-untyped-def]
    import pyarrow as pa

    return pa.table({"text": [f"document {i} " * 20 for i in range(2000)]})


def _truncated_parquet(path: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(_table(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _corrupt_parquet_pages(path: Path) -> None:
    """The footer is intact (the schema reads), the compressed pages are not."""
    import pyarrow.parquet as pq

    pq.write_table(_table(), path, row_group_size=200, compression="snappy")
    raw = bytearray(path.read_bytes())
    for i in range(1000, len(raw) // 2, 7):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _truncated_arrow_stream(path: Path) -> None:
    import pyarrow as pa

    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, _table().schema) as writer:
        writer.write_table(_table())
    whole = sink.getvalue().to_pybytes()
    path.write_bytes(whole[: len(whole) // 2])


BROKEN: dict[str, tuple[Callable[[Path], object], str, str]] = {
    # file name: (how it is broken, builder, what the error line says about it)
    "truncated.parquet": (_truncated_parquet, "parquet", "Parquet magic bytes not found"),
    "pages.parquet": (_corrupt_parquet_pages, "parquet", "Corrupt snappy compressed data"),
    "text.arrow": (lambda p: p.write_text("this is not Arrow\n" * 20), "arrow", "Not an Arrow file"),
    "truncated.arrow": (_truncated_arrow_stream, "arrow", "Expected to be able to read"),
    "line2.jsonl": (lambda p: p.write_text('{"text": "a"}\n{"text": "b\n{"text": "c"}\n'), "json", "JSON parse error"),
    "ragged.csv": (lambda p: p.write_text("text,label\na,1\nb,2,3,4\n"), "csv", "Expected 2 fields in line 3, saw 4"),
    "latin1.txt": (lambda p: p.write_bytes("caf\xe9 au lait\n".encode("latin-1")), "text",
                   "'utf-8' codec can't decode byte 0xe9"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_a_broken_file_is_one_line_and_exit_2(cli, tmp_path: Path, name: str) -> None:
    make, builder, says = BROKEN[name]
    path = tmp_path / name
    make(path)
    result = cli("data", "validate", path)
    assert result.code == 2, result.err
    # In-process, datasets may draw progress bars (a test imported it before lmctl switched
    # them off); the console script's whole stderr is checked below.
    [line] = [line for line in result.err.splitlines() if line.startswith("lmctl:")]
    assert line.startswith(f"lmctl: error: {path}: cannot be read as {builder}: ") and says in line


def _saved(tmp_path: Path) -> Path:
    from datasets import load_dataset

    ds = load_dataset("json", data_files=str(ASSETS / "tiny_train.jsonl"), split="train", cache_dir=str(tmp_path / "c"))
    ds.save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


@pytest.mark.parametrize(("damage", "says"), [
    (lambda d: (d / "state.json").write_text("{not json"), "Expecting property name"),
    (lambda d: (d / "data-00000-of-00001.arrow").write_bytes(b"x" * 1000), "metadata bytes"),
], ids=["state.json", "shard"])
def test_a_damaged_saved_dataset_is_exit_2(cli, tmp_path: Path, damage: Callable[[Path], object], says: str) -> None:
    saved = _saved(tmp_path)
    damage(saved)
    result = cli("data", "validate", saved)
    assert result.code == 2, result.err
    assert f"{saved}: cannot be read as a saved dataset: " in result.err and says in result.err


def test_traceback_shows_the_readers_own_error(cli, tmp_path: Path) -> None:
    path = tmp_path / "line2.jsonl"
    BROKEN[path.name][0](path)
    result = cli("data", "validate", path, "--traceback")
    assert result.code == 2
    assert "pyarrow.lib.ArrowInvalid: JSON parse error" in result.err
    assert "The above exception was the direct cause of the following exception" in result.err


def test_the_console_script_prints_one_line_without_datasets_logging_it_too(tmp_path: Path) -> None:
    """datasets logs "Failed to load JSON from file ..." before raising; only lmctl's line remains."""
    path = tmp_path / "line2.jsonl"
    BROKEN[path.name][0](path)
    proc = run_subprocess("data", "validate", str(path), env={"LMCTL_HOME": str(tmp_path / "home")})
    assert proc.returncode == 2
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"lmctl: error: {path}: cannot be read as json: JSON parse error: "), line


def _planted_reader_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug inside the JSON reader once the schema is read: datasets wraps it in
    DatasetGenerationError, as it wraps the errors of bad bytes."""
    from datasets.packaged_modules.json.json import Json

    calls = []
    real = Json._generate_tables

    def broken(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) > 1:  # the first call infers the schema, outside the wrapper
            raise TypeError("planted bug in the reader")
        yield from real(self, *args, **kwargs)

    monkeypatch.setattr(Json, "_generate_tables", broken)


def _planted_call_bug(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in how lmctl calls datasets: the call itself fails before any byte is read."""
    import datasets

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("planted bug in the call")

    monkeypatch.setattr(datasets, "load_dataset", broken)


@pytest.mark.parametrize(("plant", "original"), [
    (_planted_reader_bug, "TypeError: planted bug in the reader"),
    (_planted_call_bug, "RuntimeError: planted bug in the call"),
], ids=["reader", "call"])
def test_a_bug_while_reading_is_exit_1_with_its_traceback(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          plant: Callable[[pytest.MonkeyPatch], None],
                                                          original: str) -> None:
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(5)))
    plant(monkeypatch)
    result = cli("data", "validate", path, "--traceback")
    assert result.code == 1, result.err
    assert original in result.err and "internal error (a bug)" in result.err
    assert "cannot be read" not in result.err
