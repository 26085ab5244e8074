"""Pre-flight lint: refuse setups that cannot train well before a single step runs.

- EOS must be learnable: at least one unmasked EOS label in the training examples
  (the classic pad == eos bug masks every EOS and the model never learns to stop).
- Truncation that drops more than 5% of tokens is a warning (raise data.max_length).
- The tokenizer must fit the base model: every token id needs an embedding row.
- The machine must be able to run the precision, quantization and loss kernels asked for
  (`auto` falls back to float16 on a GPU without native bfloat16; an explicit bfloat16 there is refused).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel

from lmctl.config import LmctlConfig
from lmctl.data.examples import ExampleSet
from lmctl.device import Device
from lmctl.errors import BadInputError
from lmctl.train import headloss

log = logging.getLogger("lmctl.train.preflight")
TRUNCATION_WARN = 0.05


class LintReport(BaseModel):
    eos_labels: int
    truncation_rate: float
    rows_dropped: int
    warnings: list[str]


def check_tokenizer_fits(tokenizer: Any, model_vocab_size: int) -> None:
    if len(tokenizer) > model_vocab_size:
        raise BadInputError(
            f"tokenizer has {len(tokenizer)} tokens but the base model embeds only {model_vocab_size}",
            hint="use the base model's own tokenizer, or resize embeddings and save them with the adapter",
        )
    for name in ("bos", "eos", "pad", "unk"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None and token_id >= model_vocab_size:
            raise BadInputError(f"{name} token id {token_id} is outside the model's vocabulary ({model_vocab_size})")


def lint(train: ExampleSet, tokenizer: Any, model_vocab_size: int) -> LintReport:
    """Raise BadInputError on a setup that cannot work; return warnings for ones that work badly."""
    check_tokenizer_fits(tokenizer, model_vocab_size)
    eos_labels = train.eos_labels if tokenizer.eos_token_id is not None else 0
    if eos_labels == 0:
        raise BadInputError("EOS can never be learned: no training example has an unmasked EOS label: "
                            + no_eos_cause(train, tokenizer))
    warnings = []
    if train.truncation_rate > TRUNCATION_WARN:
        warnings.append(f"truncation drops {train.truncation_rate:.1%} of training tokens; raise data.max_length")
    if train.rows_dropped:
        warnings.append(f"{train.rows_dropped} rows had nothing left to learn after truncation and were skipped")
    for warning in warnings:
        log.warning("warning: %s", warning)
    return LintReport(eos_labels=eos_labels, truncation_rate=round(train.truncation_rate, 6),
                      rows_dropped=train.rows_dropped, warnings=warnings)


def _turn_end(tokenizer: Any) -> str | None:
    """What the chat template puts after an assistant turn's content, or None when that holds EOS."""
    from lmctl.data.examples import assistant_spans

    content = "lmctl probe"
    try:
        full, spans = assistant_spans([{"role": "user", "content": "hi"}, {"role": "assistant", "content": content}],
                                      tokenizer)
    except Exception:  # noqa: BLE001 - a template that refuses this probe gives no verdict; the data rendered
        return None
    turn = full[spans[0][0]:spans[0][1]]
    if tokenizer.eos_token_id in tokenizer(turn, add_special_tokens=False)["input_ids"]:
        return None
    return turn.split(content, 1)[-1]


def no_eos_cause(train: ExampleSet, tokenizer: Any) -> str:
    """Why no EOS label is left, naming the real cause: the tokenizer, the chat template, or truncation."""
    if tokenizer.eos_token_id is None:
        return "the tokenizer has no eos_token (give it one: the base model's tokenizer normally does)"
    eos = tokenizer.eos_token
    if train.fmt == "chat" and (end := _turn_end(tokenizer)) is not None:
        return (f"the chat template ends assistant turns with {end!r}, not the tokenizer's EOS {eos!r} (the data is "
                "fine; use a template whose assistant turns end with EOS, or a tokenizer whose eos_token is that marker)")
    cap = f"data.max_length={train.max_length}"
    if train.fmt == "text" and train.max_length:  # EOS ends every document, and lands alone in a dropped 1-token block
        return f"truncation at {cap} leaves every document's EOS alone in a 1-token block, which is not learned " \
               "(change data.max_length by one)"
    if train.fmt is not None and train.max_length and train.tokens_dropped:
        return (f"truncation at {cap} cuts the EOS off every {train.fmt} example ({train.truncation_rate:.0%} of "
                "tokens dropped; raise data.max_length or shorten the examples)")
    return f"no completion or assistant turn ends with the tokenizer's EOS {eos!r}"


def check_hardware(cfg: LmctlConfig, device: Device) -> None:
    """Refuse (exit 2) precision and quantization settings `device` cannot run."""
    import importlib.util

    if cfg.lora.quantization == "4bit":
        if not device.cuda:
            raise BadInputError("lora.quantization=4bit (QLoRA) needs a CUDA GPU; this machine has none",
                                hint="set lora.quantization=none to train in full precision on CPU")
        if importlib.util.find_spec("bitsandbytes") is None:
            raise BadInputError("lora.quantization=4bit needs the bitsandbytes package", hint="pip install bitsandbytes")
    headloss.check_kernels(cfg.train.kernels)
    if cfg.model.dtype == "float16" and not device.cuda:
        raise BadInputError("model.dtype=float16 needs a CUDA GPU; use float32 or bfloat16 on CPU")
    if cfg.model.dtype == "bfloat16" and device.cuda and not device.bf16:
        raise BadInputError(f"model.dtype=bfloat16: {device.name} has no native bfloat16 (compute capability < 8.0)",
                            hint="set model.dtype=auto (float16 with loss scaling on this GPU) or float16")


def mixed_precision(dtype: str, device: Device) -> dict[str, bool]:
    """The Trainer's autocast flags for the resolved training dtype (lmctl.device.resolve_dtype)."""
    return {"bf16": device.cuda and dtype == "bfloat16", "fp16": device.cuda and dtype == "float16"}
