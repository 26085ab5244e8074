"""The tokenizer lock: a fingerprint of what a tokenizer does, and the checks that a
checkpoint's tokenizer is the one its adapter was trained with.

A checkpoint may differ from its base's tokenizer only by added special tokens whose
embedding rows the adapter saves (checked at train start, on resume against the run's
earlier checkpoints, and at register).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

from lmctl.checkpoint import (TOKENIZER_FILES, TokenizerFingerprint, is_checkpoint, read_manifest, sealed_twin, sha256_file,
                              sha256_json)
from lmctl.errors import BadInputError, IntegrityError, LmctlError

log = logging.getLogger("lmctl.tokenizer_lock")
# Tokenizer ids of this text are locked in the manifest: a swapped vocabulary or changed
# normalizer shows up here even when file hashes were recomputed by someone else.
PROBE_TEXT = "lmctl tokenizer probe: Hello, world! 1234 <|im_start|> naïve café ΩMEGA\n\tdef f(x): return x**2"


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


# --- The tokenizer lock against the base model ---------------------------------------
# A checkpoint may only differ from its base's tokenizer by appended special tokens, and
# only when the adapter carries the embedding rows of those tokens; anything else (a
# renumbered vocabulary, other special-token ids, another chat template, a different
# split of the probe text) means the adapter was trained for a tokenizer it will not meet.

OUTPUT_EMBEDDING_NAMES = ("lm_head", "embed_out")  # output projections of HF causal LMs
DELTA_SUFFIX = ".token_adapter.trainable_tokens_delta"  # peft TrainableTokens rows


def tokenizer_behaviour(tokenizer: Any) -> dict[str, Any]:
    """The parts of a tokenizer fingerprint that do not depend on how its files were written."""
    return tokenizer_fingerprint(tokenizer, Path("/nonexistent")).model_dump(exclude={"files", "fingerprint"})


def behaviour_differences(actual: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Human-readable differences between two `tokenizer_behaviour` dicts."""
    diffs = []
    for key, want in expected.items():
        got = actual.get(key)
        if key == "special_tokens":
            diffs += [f"{name} token id {got.get(name)} (expected {tid})" for name, tid in want.items() if got.get(name) != tid]
        elif key == "probe_ids" and got != want:
            diffs.append("the probe text tokenizes differently")
        elif got != want:
            diffs.append(f"{key} {got} (expected {want})")
    return diffs


def tokenizer_delta(tokenizer: Any, base_tokenizer: Any) -> tuple[list[str], dict[str, int]]:
    """(differences not explained by added tokens, {added token: id}) of `tokenizer` vs its base's."""
    import copy

    from lmctl.loading import add_tokens

    base_vocab, vocab = base_tokenizer.get_vocab(), tokenizer.get_vocab()
    moved = [t for t, i in base_vocab.items() if vocab.get(t) != i]
    if moved:
        return [f"{len(moved)} base vocabulary entries missing or renumbered (e.g. {moved[0]!r})"], {}
    added = dict(sorted(((t, i) for t, i in vocab.items() if t not in base_vocab), key=lambda item: item[1]))
    expected = copy.deepcopy(base_tokenizer)
    add_tokens(expected, list(added))  # what lmctl itself would have made of the base
    return behaviour_differences(tokenizer_behaviour(tokenizer), tokenizer_behaviour(expected)), added


def ties_embeddings(config: Any) -> bool:
    """Whether a model config shares the input embedding with the output head."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return bool(getattr(text, "tie_word_embeddings", getattr(config, "tie_word_embeddings", False)))


def _is_output(module: str) -> bool:
    return any(part in OUTPUT_EMBEDDING_NAMES for part in module.split("."))


def saved_token_rows(adapter_config: dict[str, Any], shapes: dict[str, list[int]], vocab_size: int) -> dict[str, set[int]]:
    """Token ids whose input/output embedding rows an adapter carries: peft trainable-token
    deltas (rows of the listed ids) or full embedding matrices (every row up to their size)."""
    indices = adapter_config.get("trainable_token_indices") or []
    rows: dict[str, set[int]] = {"input": set(), "output": set()}
    for key, shape in shapes.items():
        if key.endswith(DELTA_SUFFIX):
            module = key.removesuffix(DELTA_SUFFIX)
            ids = next((v for k, v in indices.items() if module.endswith(k)), []) if isinstance(indices, dict) else indices
            if shape and shape[0] == len(ids):
                rows["output" if _is_output(module) else "input"].update(ids)
        elif key.endswith(".weight") and "lora_" not in key and len(shape) == 2 and shape[0] >= vocab_size:
            rows["output" if _is_output(key) else "input"].update(range(shape[0]))
    return rows


def check_added_rows_saved(added: dict[str, int], rows: dict[str, set[int]], tied: bool, where: str,
                           error: type[LmctlError] = IntegrityError) -> None:
    """Refuse when an added token has no saved input (or, with an untied output head, output) row."""
    for role in ("input",) if tied else ("input", "output"):
        missing = [t for t, i in added.items() if i not in rows[role]]
        if missing:
            raise error(
                f"{where}: the tokenizer adds {missing} to the base vocabulary but the adapter saves no {role} "
                "embedding rows for them",
                hint="train with model.add_special_tokens so lmctl saves their rows, or use the base model's tokenizer",
            )


def check_resume_tokenizer(trainer_ckpt: Path, tokenizer: Any) -> None:
    """A resumed run must go on with the tokenizer its earlier steps were trained with (exit 4)."""
    sealed = sealed_twin(trainer_ckpt)
    if sealed is None or not is_checkpoint(sealed):
        log.warning("warning: %s has no sealed lmctl checkpoint; its tokenizer cannot be compared", trainer_ckpt)
        return
    locked = read_manifest(sealed).tokenizer.model_dump(exclude={"files", "fingerprint"})
    diffs = behaviour_differences(tokenizer_behaviour(tokenizer), locked)
    if diffs:
        raise IntegrityError(
            f"cannot resume from {trainer_ckpt}: the tokenizer differs from the one it was trained with: {'; '.join(diffs)}",
            hint="keep model.base and model.add_special_tokens as they were, or start over with --resume never",
        )


def token_indices(base: Any, modules_to_save: list[str], new_ids: list[int]) -> list[int] | dict[str, list[int]] | None:
    """Embedding rows of added tokens to train and save: the input embedding's (a tied output
    head shares them) and, for an untied head, the head's own rows, which would otherwise stay
    at their random resize values and differ on every load."""
    if not new_ids:
        return None
    inp, out = base.get_input_embeddings(), base.get_output_embeddings()
    names = {id(m): n for n, m in base.named_modules()}
    full = set(modules_to_save)  # trained in full already: peft refuses both at once
    layers = [inp] if out is None or out.weight is inp.weight else [inp, out]
    wanted = {names[id(m)]: new_ids for m in layers if names[id(m)].split(".")[-1] not in full}
    if not wanted:
        return None
    return new_ids if list(wanted) == [names[id(inp)]] else wanted


def check_rows_saved(model: Any, tokenizer: Any, new_ids: list[int]) -> None:
    """What save_pretrained will write must hold the rows of every added token (else exit 2)."""
    from peft import get_peft_model_state_dict

    if not new_ids:
        return
    shapes = {k: list(v.shape) for k, v in get_peft_model_state_dict(model, save_embedding_layers=False).items()}
    config = model.peft_config["default"].to_dict()
    rows = saved_token_rows(config, shapes, len(tokenizer))
    tied = model.get_output_embeddings() is None or ties_embeddings(model.config)
    added = dict(zip(tokenizer.convert_ids_to_tokens(new_ids), new_ids))
    check_added_rows_saved(added, rows, tied, "train", error=BadInputError)
