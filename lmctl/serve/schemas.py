"""Request bodies of the OpenAI-style endpoints and the error body every failure uses.

Strict types (pydantic's strict mode): `max_tokens: true` is no 1, `"0.5"` no number and 2.0
no integer; a float field takes an integer (JSON has one number type; OpenAI's SDK sends 1 for
1.0). Every number has bounds, so nothing a client sends can make the engine raise: a seed
torch cannot take used to fail every request batched with it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from lmctl.serve.jobs import SEED_MAX, SEED_MIN

TOKENS_MAX = 2**31 - 1  # a token count past this is no request (the server's cap is far lower)


def _unicode(value: Any) -> Any:
    """JSON may escape a lone UTF-16 surrogate ("\\udfff"): valid JSON, but no Unicode text, and
    the tokenizer fails on it. Refused here for every text field, so both endpoints answer it
    with the same 422 (before the field's own checks, so the message is always this one)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(f"not valid Unicode text: a lone surrogate {value[exc.start]!r} at "
                             f"character {exc.start}") from None
    return value


Text = Annotated[str, BeforeValidator(_unicode)]


class _Sampling(BaseModel):
    # Unknown OpenAI fields (logit_bias, presence_penalty, ...) are rejected rather than silently
    # ignored: a client that relies on one should learn it has no effect here.
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text | None = Field(None, max_length=256, description="Must name a served model when given.")
    max_tokens: int = Field(16, ge=1, le=TOKENS_MAX, description="Tokens to generate at most (capped by the server).")
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False, description="0 is greedy; OpenAI's range.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX, description="A 64-bit signed integer, as vLLM takes.")
    stream: bool = False
    stream_options: dict[str, bool] | None = Field(None, description="{include_usage: true} adds a usage chunk at the end of a stream.")
    stop: Text | list[Text] | None = Field(None, description="Up to 4 strings that end the completion.")
    user: Text | None = Field(None, max_length=256, description="End-user id; also the sticky key for canary routing.")
    n: int = Field(1, ge=1, le=1, description="Only one choice per request is supported.")

    @property
    def token_limit(self) -> int:
        """Tokens to generate at most, whichever field the client used to say it."""
        return self.max_tokens

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> list[str] | None:
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > 4 or any(not s for s in stops)):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    prompt: Text = Field(..., min_length=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: Text
    name: Text | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(
        None, ge=1, le=TOKENS_MAX, description="OpenAI's newer name for max_tokens in chat; wins when both are sent.")

    @property
    def token_limit(self) -> int:
        # OpenAI deprecated max_tokens for chat in favor of max_completion_tokens; a client that
        # sends both means the newer one (vLLM resolves it the same way).
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape, so clients' error handling works unchanged."""
    return {"error": {"message": message, "type": kind, "code": code}}
