"""Self-describing checkpoints: adapter + tokenizer files + the `lmctl.json` lock manifest.

A checkpoint directory is only a checkpoint when it holds a valid `lmctl.json`: it is
written last, by atomic rename, after every other file is fsynced, and the finished
directory is itself renamed into place. A crash therefore leaves either nothing or a
hidden `.tmp-*` directory that no command mistakes for a checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from lmctl.errors import BadInputError, IntegrityError

MANIFEST = "lmctl.json"
MANIFEST_FORMAT = "lmctl.checkpoint/1"
# Tokenizer ids of this text are locked in the manifest: a swapped vocabulary or changed
# normalizer shows up here even when file hashes were recomputed by someone else.
PROBE_TEXT = "lmctl tokenizer probe: Hello, world! 1234 <|im_start|> naïve café ΩMEGA\n\tdef f(x): return x**2"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
)


class FileEntry(BaseModel):
    sha256: str
    size: int


class TokenizerFingerprint(BaseModel):
    """What makes two tokenizers interchangeable: their files and their behaviour."""

    files: dict[str, str] = Field(description="sha256 of each tokenizer file")
    vocab_size: int
    special_tokens: dict[str, int | None] = Field(description="bos/eos/pad/unk token ids")
    chat_template_sha256: str | None
    probe_ids: list[int]
    fingerprint: str = Field(description="sha256 over everything above")


class BaseModelInfo(BaseModel):
    id: str
    revision: str | None = None
    config_sha256: str


class Manifest(BaseModel):
    format: str = MANIFEST_FORMAT
    kind: str = Field("lora-adapter", description="what the directory holds")
    created_at: str
    lmctl_version: str
    files: dict[str, FileEntry]
    tokenizer: TokenizerFingerprint
    base_model: BaseModelInfo
    data: dict[str, Any] = Field(default_factory=dict, description="data fingerprint and sources")
    config: dict[str, Any] = Field(default_factory=dict, description="resolved lmctl config")
    training: dict[str, Any] = Field(default_factory=dict, description="step, losses, run id")
    libraries: dict[str, str] = Field(default_factory=dict)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def tokenizer_fingerprint(tokenizer: Any, directory: Path) -> TokenizerFingerprint:
    """Fingerprint a loaded tokenizer plus the tokenizer files saved in `directory`."""
    files = {n: sha256_file(directory / n) for n in TOKENIZER_FILES if (directory / n).is_file()}
    template = getattr(tokenizer, "chat_template", None)
    body = {
        "vocab_size": len(tokenizer),
        "special_tokens": {
            name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "unk")
        },
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest() if template else None,
        "probe_ids": list(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]),
    }
    return TokenizerFingerprint(files=files, fingerprint=sha256_json({"files": files, **body}), **body)


def hash_files(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every regular file under `directory` except the manifest."""
    entries = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            entries[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return entries


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temp file in the same directory, fsync, then rename over `path`."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write text via a temp file in the same directory, fsync, then rename over `path`."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: Path, payload: bytes) -> None:
    """Temp file in the same directory, fsync, rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def require_empty_output(out: Path, force: bool) -> None:
    """An --out directory must be new or empty unless --force: a command never mixes its output
    into someone's files (checked before any work, so a refusal costs nothing)."""
    if out.exists() and not out.is_dir():
        raise BadInputError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()) and not force:
        raise BadInputError(f"{out} exists and is not empty", hint="choose another --out or pass --force")


@contextlib.contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A hidden sibling directory that becomes `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                with path.open("rb") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def seal(directory: Path, manifest_fields: dict[str, Any]) -> Manifest:
    """Hash every file in `directory` and write `lmctl.json` last, atomically."""
    manifest = Manifest(files=hash_files(directory), **manifest_fields)
    write_json_atomic(directory / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def is_checkpoint(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    try:
        return Manifest.model_validate_json(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{directory}: no {MANIFEST}; not an lmctl checkpoint") from None
    except ValueError as exc:
        raise IntegrityError(f"{path}: corrupt manifest ({str(exc).splitlines()[0]})") from None


def verify(directory: Path) -> Manifest:
    """Re-hash every file the manifest lists; raise IntegrityError naming the first mismatch."""
    manifest = read_manifest(directory)
    for rel, entry in manifest.files.items():
        path = directory / rel
        if not path.is_file():
            raise IntegrityError(f"{path}: missing from checkpoint (listed in {MANIFEST})")
        actual = sha256_file(path)
        if actual != entry.sha256:
            raise IntegrityError(
                f"{path}: sha256 mismatch, expected {entry.sha256[:16]}… got {actual[:16]}…",
                hint="the file was changed after the checkpoint was written; restore it or retrain",
            )
    for name in TOKENIZER_FILES:
        if (directory / name).is_file() and name not in manifest.files:
            raise IntegrityError(f"{directory / name}: tokenizer file not in {MANIFEST}; it was added after sealing")
    for name, digest in manifest.tokenizer.files.items():
        if manifest.files.get(name) is None or manifest.files[name].sha256 != digest:
            raise IntegrityError(f"{directory / name}: tokenizer lock disagrees with the file list")
    return manifest
