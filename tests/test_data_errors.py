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


@pytest.mark.parametrize(("key", "value", "says"), [
    ("_data_files", 5, "_data_files: Input should be a valid array (got int)"),
    ("_split", [], "_split: Input should be a valid string (got list)"),
    ("_format_kwargs", 5, "_format_kwargs: Input should be an object (got int)"),
])
def test_a_saved_dataset_whose_state_json_has_wrong_types_is_exit_2(cli, tmp_path: Path, key: str, value: object,
                                                                     says: str) -> None:
    """load_from_disk meets these with a TypeError or AttributeError, which read as a bug (exit 1)."""
    saved = _saved(tmp_path)
    state = json.loads((saved / "state.json").read_text())
    (saved / "state.json").write_text(json.dumps({**state, key: value}))
    result = cli("data", "validate", saved, "--json")
    assert result.code == 2, result.err
    [line] = result.err.splitlines()
    assert line.startswith(f"lmctl: error: {saved / 'state.json'}: {says}") and "save it again" in line, line
    assert result.out == ""


def test_a_bug_in_loading_a_sound_saved_dataset_stays_exit_1(cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise TypeError("planted bug in load_from_disk")

    saved = _saved(tmp_path)
    monkeypatch.setattr(datasets, "load_from_disk", broken)
    result = cli("data", "validate", saved)
    assert result.code == 1 and "internal error (a bug): TypeError: planted bug" in result.err, result.err


def _denied() -> list[str]:
    """A command prefix under which permission bits hold: root ignores them unless it gives up
    CAP_DAC_OVERRIDE (setpriv, util-linux); another user needs nothing."""
    import os
    import shutil

    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits cannot be made to hold")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search"]


_CHILD = """
import contextlib, io, json, os, sys
from lmctl.cli import main
results = []
for home, args in json.loads(sys.argv[1]):
    os.environ["LMCTL_HOME"] = home
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    results.append([code, out.getvalue(), err.getvalue()])
print(json.dumps(results))
"""


def test_unreadable_inputs_are_bad_input_and_an_unwritable_cache_is_the_machine(tiny_config: Path,
                                                                                tmp_path: Path) -> None:
    """Issue 28: an unreadable data file or config is the user's to fix (2); an LMCTL_HOME cache this
    user cannot write is the machine's (6), never "a bug" (1). One line each, stdout empty. One child
    process runs the three commands, with permission bits in force (root gives up CAP_DAC_OVERRIDE)."""
    import os
    import subprocess
    import sys

    import yaml

    data, config, locked = tmp_path / "train.jsonl", tmp_path / "c.yaml", tmp_path / "locked.yaml"
    data.write_bytes((ASSETS / "tiny_train.jsonl").read_bytes())
    unreadable = tmp_path / "unreadable.jsonl"
    unreadable.write_bytes(data.read_bytes())
    cfg = yaml.safe_load(tiny_config.read_text())
    config.write_text(yaml.safe_dump({**cfg, "data": {"train": str(data), "max_length": 64}}))
    locked.write_text(yaml.safe_dump({**cfg, "data": {"train": str(unreadable), "max_length": 64}}))
    unreadable.chmod(0)
    readonly = tmp_path / "readonly-home"
    (readonly / "cache").mkdir(parents=True)
    (readonly / "cache").chmod(0o555)
    home = str(tmp_path / "home")
    calls = [[home, ["data", "validate", str(locked), "--json"]], [home, ["drift", "--model", "m", "--reference", str(data),
             "--current", str(data), "--config", str(unreadable)]], [str(readonly), ["data", "validate", str(config), "--json"]]]
    child = subprocess.run([*_denied(), sys.executable, "-c", _CHILD, json.dumps(calls)], capture_output=True, text=True,
                           timeout=300, env=os.environ)
    assert child.returncode == 0, child.stderr
    (data_code, data_out, data_err), (cfg_code, _, cfg_err), (cache_code, cache_out, cache_err) = json.loads(child.stdout)
    assert (data_code, data_out) == (2, ""), data_err
    assert data_err.splitlines() == [f"lmctl: error: {unreadable}: cannot be read (permission denied) (make it "
                                     f"readable by uid {os.geteuid()}, the user lmctl runs as)"]
    assert cfg_code == 2 and len(cfg_err.splitlines()) == 1 and f"'{unreadable}' is not readable" in cfg_err, cfg_err
    assert (cache_code, cache_out) == (6, ""), cache_err
    [line] = cache_err.splitlines()
    assert line.startswith(f"lmctl: error: {readonly / 'cache' / 'tokens'}: Permission denied (the machine refused, "
                           "not lmctl") and "LMCTL_HOME" in line and "bug" not in line, line
