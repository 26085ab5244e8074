"""A served model version: the verified, loaded model plus the batching engine that owns it."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmctl.loading import LoadedModel
from lmctl.serve.settings import ServeSettings

log = logging.getLogger("lmctl.serve")
# End-of-turn markers of common chat templates: generation stops at them even when the
# tokenizer's EOS is a different token (Llama 3's <|eot_id|>, Gemma's <end_of_turn>).
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


@dataclass
class Slot:
    ref: str
    model_name: str
    version: str
    role: str  # "primary" or "canary"
    loaded: LoadedModel
    engine: Any  # lmctl.serve.engine.Engine
    stop_ids: frozenset[int]
    context_length: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    def describe(self) -> dict[str, Any]:
        manifest = self.loaded.manifest
        return {"ref": self.ref, "version": self.version, "role": self.role,
                "tokenizer_fingerprint": manifest.tokenizer.fingerprint if manifest else None,
                "base_model": manifest.base_model.id if manifest else self.loaded.ref.path,
                "device": str(self.engine.device), "attention_kernel": self.engine.attention_kernel}

    def retire(self) -> None:
        """Stop the engine after its in-flight requests finish, without blocking the caller."""
        threading.Thread(target=self.engine.stop, kwargs={"drain": True}, daemon=True,
                         name=f"retire-{self.model_name}-{self.version}").start()


def _stop_ids(loaded: LoadedModel) -> frozenset[int]:
    tok, model = loaded.tokenizer, loaded.model
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in ([configured] if isinstance(configured, int) else configured or []):
        ids.add(int(value))
    if tok.eos_token_id is not None:
        ids.add(int(tok.eos_token_id))
    vocab = tok.get_vocab()
    ids.update(vocab[marker] for marker in END_OF_TURN if marker in vocab)
    return frozenset(ids)


def version_label(loaded: LoadedModel) -> str:
    """Registry version when served from the registry, else the manifest hash prefix, else 'base'."""
    if loaded.ref.registry_version:
        return str(loaded.ref.registry_version)
    if loaded.manifest is not None:
        from lmctl.checkpoint import sha256_file

        return "sha-" + sha256_file(Path(loaded.ref.path) / "lmctl.json")[:12]
    return "base"


def default_model_name(ref: str, loaded: LoadedModel) -> str:
    return loaded.ref.registry_name or Path(loaded.ref.path).name or ref


def load_slot(ref: str, role: str, settings: ServeSettings, model_name: str | None = None) -> Slot:
    """Resolve, verify (IntegrityError, exit 4) and load `ref`, then start its engine."""
    from lmctl import distributed
    from lmctl.loading import load_for_inference
    from lmctl.modelref import resolve
    from lmctl.serve.engine import Engine
    from lmctl.serve.kvcache import auto_batch_limits

    loaded = load_for_inference(resolve(ref))
    loaded.model.to(distributed.device())  # where eval runs too; "auto" already chose bf16 there
    config = getattr(loaded.model, "config", None)
    context = int(getattr(config, "max_position_embeddings", 0) or 2048)
    # Rows are admitted by what the requests need (prompt + max_tokens) against the memory budget,
    # not by a full-context worst case: at 8k context that capped a CPU batch at ~8 rows.
    cap, kv_budget = auto_batch_limits(loaded.model)
    engine = Engine(loaded.model, loaded.tokenizer, max_batch_size=settings.max_batch_size or cap,
                    max_queue=settings.max_queue, batch_wait_ms=settings.batch_wait_ms, kv_budget_tokens=kv_budget,
                    draft_tokens=settings.draft_tokens)
    engine.start()
    slot = Slot(ref=ref, model_name=model_name or default_model_name(ref, loaded), version=version_label(loaded),
                role=role, loaded=loaded, engine=engine, stop_ids=_stop_ids(loaded), context_length=context)
    log.info("loaded %s as %s version %s (%s) on %s, attention %s, KV budget %d tokens", ref, slot.model_name,
             slot.version, role, engine.device, engine.attention_kernel, kv_budget)
    return slot
