"""Self-describing checkpoints: adapter + tokenizer files + the `lmctl.json` lock manifest.

A checkpoint directory is only a checkpoint when it holds a valid `lmctl.json`: it is
written last, by atomic rename, after every other file is fsynced, and the finished
directory is itself renamed into place. A crash therefore leaves either nothing or a
hidden `.tmp-*` directory that no command mistakes for a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from lmctl.atomic import write_json_atomic
from lmctl.errors import IntegrityError

MANIFEST = "lmctl.json"
MANIFEST_FORMAT = "lmctl.checkpoint/1"
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


class DataFingerprint(BaseModel):
    """Identifies the exact data a model saw: file bytes plus how they were read."""

    path: str
    sha256: str
    rows: int
    text_field: str
    format: str = "text"


class ManifestData(BaseModel):
    """The data a checkpoint was trained on (fingerprints as `lmctl.data.fingerprint` computes them)."""

    train: DataFingerprint | None = None
    validation: DataFingerprint | None = None

    def splits(self) -> list[tuple[str, DataFingerprint]]:
        return [(name, fp) for name, fp in (("train", self.train), ("validation", self.validation)) if fp is not None]


class TrainingInfo(BaseModel):
    """Where in training the checkpoint was written. Unknown keys are kept: the lock is never rewritten lossily."""

    model_config = ConfigDict(extra="allow")

    step: int | None = None
    mlflow_run_id: str | None = None
    train_loss: float | None = None
    eval_loss: float | None = None


class _Section(BaseModel):
    # The recorded config is the resolved config of the lmctl version that trained; only the keys
    # read back are typed, every other key is kept as written (old and newer checkpoints load).
    model_config = ConfigDict(extra="allow")


class ModelSection(_Section):
    trust_remote_code: bool = False


class LoraSection(_Section):
    r: int | None = None
    alpha: int | float | None = None  # int stays int: the lock is rewritten byte for byte
    target_modules: list[str] | str | None = None
    use_dora: bool = False


class RegistrySection(_Section):
    name: str | None = None


class RecordedConfig(_Section):
    """The resolved lmctl config a checkpoint was trained with, as `lmctl config show` prints it."""

    model: ModelSection = Field(default_factory=ModelSection)
    lora: LoraSection = Field(default_factory=LoraSection)
    registry: RegistrySection = Field(default_factory=RegistrySection)


class Manifest(BaseModel):
    format: str = MANIFEST_FORMAT
    kind: str = Field("lora-adapter", description="what the directory holds")
    created_at: str
    lmctl_version: str
    files: dict[str, FileEntry]
    tokenizer: TokenizerFingerprint
    base_model: BaseModelInfo
    data: ManifestData = Field(default_factory=ManifestData, description="data fingerprints")
    config: RecordedConfig = Field(default_factory=RecordedConfig, description="resolved lmctl config")
    training: TrainingInfo = Field(default_factory=TrainingInfo, description="step, losses, run id")
    libraries: dict[str, str] = Field(default_factory=dict)

    @property
    def trust_remote_code(self) -> bool:
        """Whether the base model was loaded with remote code at training (and must be again)."""
        return self.config.model.trust_remote_code


def file_digest(path: Path) -> Any:
    """A sha256 object fed with the file's bytes in 1 MiB chunks (files may be GBs; Python 3.10
    has no hashlib.file_digest). The one chunked hash: data fingerprints extend it."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest


def sha256_file(path: Path) -> str:
    return file_digest(path).hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def hash_files(directory: Path) -> dict[str, FileEntry]:
    """sha256 and size of every regular file under `directory` except the manifest."""
    entries = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel != MANIFEST:
            entries[rel] = FileEntry(sha256=sha256_file(path), size=path.stat().st_size)
    return entries


def seal(directory: Path, manifest_fields: dict[str, Any]) -> Manifest:
    """Hash every file in `directory` and write `lmctl.json` last, atomically."""
    manifest = Manifest(files=hash_files(directory), **manifest_fields)
    write_json_atomic(directory / MANIFEST, manifest.model_dump(mode="json"))
    return manifest


def step_dir(run_dir: Path, step: int) -> Path:
    """Where a run seals the checkpoint of training step `step`: RUN/checkpoints/step-000123."""
    return run_dir / "checkpoints" / f"step-{step:06d}"


def sealed_steps(run_dir: Path) -> list[int]:
    """The steps of the run's sealed checkpoint directories, ascending."""
    return sorted(int(p.name.removeprefix("step-")) for p in (run_dir / "checkpoints").glob("step-*")
                  if p.name.removeprefix("step-").isdigit())


def sealed_twin(trainer_checkpoint: Path) -> Path | None:
    """The sealed checkpoint written from a Trainer's RUN/trainer/checkpoint-N (None for another name)."""
    step = trainer_checkpoint.name.removeprefix("checkpoint-")
    return step_dir(trainer_checkpoint.parent.parent, int(step)) if step.isdigit() else None


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
