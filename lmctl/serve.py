"""`lmctl serve`: an OpenAI-style HTTP API over one verified model (FastAPI + uvicorn).

The model is resolved and its checkpoint lock verified before the server binds a port, so
a tampered checkpoint never serves a request (exit 4). This module imports FastAPI at
the top (FastAPI resolves endpoint annotations from module globals); only `lmctl serve`
imports it. Generation runs one request at a
time under a lock: a single CPU model gains nothing from running two generate() calls at
once, and this keeps memory flat.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from lmctl.errors import BadInputError
from lmctl.loading import LoadedModel

log = logging.getLogger("lmctl.serve")
MAX_TOKENS_CAP = 512


class CompletionRequest(BaseModel):
    model: str | None = Field(None, description="Ignored: this server serves one model.")
    prompt: str = Field(..., min_length=1, max_length=20000)
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS_CAP)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None


def load_api_keys(keys_file: Path | None) -> list[str]:
    """API keys from --api-keys-file (one per line) or LMCTL_API_KEYS (comma-separated)."""
    if keys_file is not None:
        if not keys_file.is_file():
            raise BadInputError(f"API keys file not found: {keys_file}")
        raw = keys_file.read_text(encoding="utf-8").splitlines()
    else:
        raw = os.environ.get("LMCTL_API_KEYS", "").split(",")
    return [k.strip() for k in raw if k.strip() and not k.strip().startswith("#")]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Generator:
    """Greedy or sampled completion with the loaded model, one request at a time."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.lock = threading.Lock()

    def complete(self, req: CompletionRequest) -> tuple[str, str, int, int]:
        import torch

        tok, model = self.loaded.tokenizer, self.loaded.model
        enc = tok(req.prompt, return_tensors="pt")
        device = next(model.parameters()).device
        sample = req.temperature > 0
        with self.lock, torch.inference_mode():
            if req.seed is not None:
                torch.manual_seed(req.seed)
            out = model.generate(
                input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                max_new_tokens=req.max_tokens, do_sample=sample,
                temperature=req.temperature if sample else None, top_p=req.top_p if sample else None,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
        new = out[0, enc["input_ids"].shape[1]:].tolist()
        finish = "stop" if tok.eos_token_id in new else "length"
        if tok.eos_token_id in new:
            new = new[: new.index(tok.eos_token_id)]
        return tok.decode(new, skip_special_tokens=True), finish, enc["input_ids"].shape[1], len(new)


def create_app(loaded: LoadedModel, model_name: str, api_keys: list[str]) -> FastAPI:
    generator = Generator(loaded)
    app = FastAPI(title="lmctl", version="1")

    def check_key(request: Request) -> None:
        if not api_keys:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not any(hmac.compare_digest(given.encode(), k.encode()) for k in api_keys):
            raise HTTPException(status_code=401, detail="missing or invalid API key")

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        manifest = loaded.manifest
        return {"status": "ok", "model": model_name,
                "tokenizer_fingerprint": manifest.tokenizer.fingerprint if manifest else None}

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    def completions(req: CompletionRequest) -> dict[str, Any]:
        text, finish, n_in, n_out = generator.complete(req)
        return {
            "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}],
            "usage": {"prompt_tokens": n_in, "completion_tokens": n_out, "total_tokens": n_in + n_out},
        }

    return app


def serve(ref: str, host: str = "127.0.0.1", port: int = 8000, api_keys_file: Path | None = None,
          insecure: bool = False) -> None:
    """Verify and load `ref`, then serve until interrupted."""
    import uvicorn

    from lmctl.loading import load_for_inference
    from lmctl.modelref import resolve

    keys = load_api_keys(api_keys_file)
    if not keys and not _is_loopback(host) and not insecure:
        raise BadInputError(f"refusing to serve on {host} without API keys",
                            hint="set LMCTL_API_KEYS or --api-keys-file, or pass --insecure")
    if not 0 <= port <= 65535:
        raise BadInputError(f"--port {port} is out of range")
    loaded = load_for_inference(resolve(ref))
    app = create_app(loaded, ref, keys)
    log.info("serving %s on http://%s:%d", ref, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")
