"""Load tokenizers and models for training, eval and serving, the same way everywhere.

The safety rules of docs/storage.md live here: weights load from safetensors only, remote
code is refused unless the config allows it, and a checkpoint is verified against its lock
before any of its files are used.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmctl import checkpoint
from lmctl.errors import BadInputError, IntegrityError, ModelRefError
from lmctl.modelref import ResolvedRef, VerifiedCheckpoint, resolve_base, verified_checkpoint

log = logging.getLogger("lmctl.loading")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    ref: ResolvedRef
    manifest: checkpoint.Manifest | None


def torch_dtype(name: str) -> Any:
    """The torch dtype of `model.dtype` on this machine (`auto`: lmctl.device.resolve_dtype)."""
    import torch

    from lmctl.device import resolve_dtype, this_device

    return getattr(torch, resolve_dtype(name, this_device()) if name == "auto" else name)


def _refuse_remote_code(path: str, trust_remote_code: bool) -> None:
    config = Path(path) / "config.json"
    if config.is_file() and not trust_remote_code and "auto_map" in json.loads(config.read_text()):
        raise BadInputError(
            f"{path} ships its own Python code (auto_map in config.json); refusing to run it",
            hint="set model.trust_remote_code: true if you trust it",
        )


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    from transformers import AutoTokenizer

    _refuse_remote_code(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelRefError(f"cannot load a tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tok.pad_token is None:
        # Padding is masked everywhere lmctl computes a loss, so reusing EOS as pad is safe here.
        tok.pad_token = tok.eos_token
    return tok


def add_tokens(tokenizer: Any, tokens: list[str]) -> list[int]:
    """Add special tokens the tokenizer lacks; return the ids of the ones it gained."""
    missing = [t for t in tokens if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(missing)


def base_config_sha256(path: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """Hash of the base model's architecture config, without fields that vary by library version."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code).to_dict()
    for volatile in ("transformers_version", "_name_or_path", "_commit_hash", "dtype", "torch_dtype", "architectures"):
        config.pop(volatile, None)
    return checkpoint.sha256_json(config)


def base_architectures(path: str, revision: str | None = None, trust_remote_code: bool = False) -> list[str]:
    """The model classes a base's config.json declares (what vLLM's registry looks up)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    return list(getattr(config, "architectures", None) or [])


def model_vocab_size(path: str, revision: str | None = None, trust_remote_code: bool = False) -> int:
    """Rows in the base model's input embedding, read from its config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=revision, trust_remote_code=trust_remote_code)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)


def load_base_model(path: str, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
                    quantize_4bit: bool = False) -> Any:
    from transformers import AutoModelForCausalLM

    _refuse_remote_code(path, trust_remote_code)
    extra: dict[str, Any] = {}
    if quantize_4bit:  # QLoRA: NF4 weights, double quantization, compute in the training dtype
        from transformers import BitsAndBytesConfig

        extra["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype(dtype),
        )
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, revision=revision, dtype=torch_dtype(dtype), use_safetensors=True,
            trust_remote_code=trust_remote_code, **extra,
        )
    except OSError as exc:
        raise ModelRefError(f"cannot load model weights from {path}: {str(exc).splitlines()[0]}") from None


def load_checkpoint(verified: VerifiedCheckpoint, dtype: str = "auto") -> LoadedModel:
    """Load a verified checkpoint: its base model (checked against the lock's config hash) plus the adapter."""
    from peft import PeftModel

    ckpt, manifest = verified.path, verified.manifest
    if not (ckpt / "adapter_model.safetensors").is_file():
        raise IntegrityError(f"{ckpt}: adapter_model.safetensors missing (only safetensors are loaded)")
    trust = manifest.trust_remote_code
    base_path = resolve_base(manifest.base_model.id)
    actual = base_config_sha256(base_path, manifest.base_model.revision, trust)
    if actual != manifest.base_model.config_sha256:
        raise IntegrityError(
            f"base model {manifest.base_model.id} has config hash {actual[:16]}…, "
            f"the checkpoint was trained on {manifest.base_model.config_sha256[:16]}…"
        )
    tokenizer = load_tokenizer(str(ckpt))
    base = load_base_model(base_path, dtype, trust, manifest.base_model.revision)
    if len(tokenizer) > base.get_input_embeddings().num_embeddings:
        # the adapter carries the rows of the tokens training added; make room for them first
        base.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model = PeftModel.from_pretrained(base, str(ckpt), is_trainable=False)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, ref=verified.resolved, manifest=manifest)


def load_for_inference(ref: ResolvedRef, dtype: str = "auto") -> LoadedModel:
    """Load a resolved MODEL_REF in eval mode; checkpoints are verified first (IntegrityError)."""
    if ref.kind == "checkpoint":
        return load_checkpoint(verified_checkpoint(ref), dtype)
    tokenizer = load_tokenizer(ref.path)
    model = load_base_model(ref.path, dtype)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, ref=ref, manifest=None)
