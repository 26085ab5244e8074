"""`--target vllm`: serve the base model plus this LoRA adapter with vLLM (OpenAI-compatible).

    OUT/adapter/          verified copy of the checkpoint (vLLM reads adapter_config.json +
                          adapter_model.safetensors; the tokenizer files are the locked ones)
    OUT/vllm.sh           exec vllm serve BASE --enable-lora --lora-modules NAME=OUT/adapter ...
    OUT/vllm-config.yaml  the same arguments for `vllm serve --config` (long flag names as keys)
    OUT/deploy.json

Flags are options of vLLM 0.33's own `vllm serve` parser (tests/assets/vllm_serve_flags.txt,
written by scripts/vllm_reference.py). `--tokenizer` and `--chat-template` point at the checkpoint's own
tokenizer files, so vLLM tokenizes, templates and stops (EOS) exactly as training did.
The API key is read by vLLM from VLLM_API_KEY (vllm/envs.py; `--api-key` would override it):
the script requires it to be set but never puts it on a command line, where `ps` shows it.
Adapters vLLM cannot serve faithfully are refused (exit 2) instead of deployed wrong, and so
are bases whose architecture vLLM serves without LoRA support (vllm_lora_architectures.txt,
generated from vLLM's model registry by scripts/vllm_reference.py).
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import yaml

from lmctl.deploy.bundle import Rendered, Source, adapter_config, copy_checkpoint, write_script
from lmctl.deploy.options import DeployOptions
from lmctl.errors import BadInputError, IntegrityError

# LoRAConfig.max_lora_rank: MaxLoRARanks (vLLM docs, vllm.config.lora)
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_HOST = "0.0.0.0"
ADAPTER_DIR = "adapter"
_NUMERIC = {"--max-lora-rank", "--max-loras", "--max-model-len", "--port"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LORA_ARCHITECTURES_FILE = "vllm_lora_architectures.txt"


def lora_architectures() -> frozenset[str]:
    """Architectures the pinned vLLM release serves with --enable-lora (package data, one per line)."""
    from importlib.resources import files

    text = files("lmctl.deploy").joinpath(LORA_ARCHITECTURES_FILE).read_text(encoding="utf-8")
    return frozenset(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def check_lora_architecture(architectures: list[str]) -> None:
    """vLLM refuses to start (`X does not support LoRA yet`) for a base outside the list: exit 2 now."""
    unsupported = [arch for arch in architectures if arch not in lora_architectures()]
    if unsupported or not architectures:
        named = ", ".join(unsupported) or "none declared in config.json"
        raise BadInputError(f"vLLM cannot serve a LoRA adapter on this base: architecture {named} "
                            "has no LoRA support in vLLM 0.33",
                            hint="use --target local or kubernetes (lmctl serve), or export --merge")


def _check_name(name: str) -> str:
    # also keeps every value of vllm.sh free of shell metacharacters
    if not _NAME_RE.match(name):
        raise BadInputError(f"served model name {name!r} is not usable",
                            hint="pass --name with letters, digits, '.', '_', '-'")
    return name


def max_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts for --max-lora-rank that holds an adapter of rank `rank`."""
    for allowed in MAX_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise BadInputError(f"LoRA rank {rank} exceeds vLLM's largest --max-lora-rank ({MAX_LORA_RANKS[-1]})")


def unsupported_features(cfg: dict[str, Any], added_tokens: bool) -> list[str]:
    """Reasons vLLM would refuse this adapter or silently serve something else."""
    reasons = []
    if cfg.get("peft_type", "LORA") != "LORA":
        reasons.append(f"peft_type {cfg.get('peft_type')} (vLLM serves LoRA adapters only)")
    if cfg.get("use_dora"):
        reasons.append("DoRA (use_dora: vLLM does not support DoRA adapters)")
    if cfg.get("modules_to_save"):
        reasons.append(f"modules_to_save {cfg['modules_to_save']} (vLLM requires modules_to_save to be empty)")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        reasons.append("trained bias terms (vLLM's PEFT loader serves bias 'none' only)")
    if cfg.get("trainable_token_indices") or added_tokens:
        reasons.append("added tokens / resized embeddings (vLLM removed LoRA extra-vocabulary support in v0.12)")
    return reasons


def adapter_rank(cfg: dict[str, Any]) -> int:
    # rank_pattern overrides r per module; vLLM must reserve room for the largest.
    return max([int(cfg["r"]), *(int(v) for v in (cfg.get("rank_pattern") or {}).values())])


def _resolve_base(source: Source, override: str | None) -> tuple[str, bool]:
    """(what vLLM loads as the base, whether its config hash was checked against the lock)."""
    from lmctl.loading import base_config_sha256
    from lmctl.modelref import resolve_base

    base = resolve_base(override or source.manifest.base_model.id)
    if not Path(base).is_dir():
        return base, False  # a hub id: checking it would need the hub
    actual = base_config_sha256(base, source.manifest.base_model.revision, source.manifest.trust_remote_code)
    if actual != source.manifest.base_model.config_sha256:
        raise IntegrityError(f"base model {base} has config hash {actual[:16]}…, the adapter was trained on "
                             f"{source.manifest.base_model.config_sha256[:16]}…", hint="pass the right --base")
    return base, True


class Renderer:
    def __init__(self, opts: DeployOptions, final: Path) -> None:
        self.opts, self.final = opts, final
        self.host = opts.host or DEFAULT_HOST
        if opts.name is not None:
            _check_name(opts.name)

    def prepare(self, source: Source) -> None:
        from lmctl.loading import base_architectures, model_vocab_size

        self.source = source
        cfg = adapter_config(source)
        self.name = _check_name(self.opts.name or source.display_name)
        self.base, self.base_verified = _resolve_base(source, self.opts.base)
        manifest = source.manifest
        trust = manifest.trust_remote_code
        if self.base_verified:  # a local base: its config.json names the architecture vLLM will load
            check_lora_architecture(base_architectures(self.base, manifest.base_model.revision, trust))
        added = self.base_verified and manifest.tokenizer.vocab_size > model_vocab_size(
            self.base, manifest.base_model.revision, trust)
        reasons = unsupported_features(cfg, added)
        if reasons:
            raise BadInputError(f"vLLM cannot serve this adapter: {'; '.join(reasons)}",
                                hint="use --target local or kubernetes (lmctl serve), or export --merge")
        self.rank = adapter_rank(cfg)
        self.max_rank = max_lora_rank(self.rank)
        self.trust = trust

    def args(self, adapter: str) -> list[tuple[str, str | None]]:
        """(flag, value) pairs after the positional base model; value None is a switch."""
        revision = self.source.manifest.base_model.revision
        pairs: list[tuple[str, str | None]] = [
            ("--served-model-name", f"{self.name}-base"),
            ("--tokenizer", adapter),
            ("--enable-lora", None),
            ("--lora-modules", f"{self.name}={adapter}"),
            ("--max-lora-rank", str(self.max_rank)),
            ("--max-loras", str(self.opts.max_loras)),
        ]
        if (self.source.path / "chat_template.jinja").is_file():
            pairs.append(("--chat-template", f"{adapter}/chat_template.jinja"))
        if revision and not self.base_verified:
            pairs.append(("--revision", revision))
        if self.trust:
            pairs.append(("--trust-remote-code", None))
        if self.opts.max_model_len:
            pairs.append(("--max-model-len", str(self.opts.max_model_len)))
        return pairs + [("--host", self.host), ("--port", str(self.opts.port))]

    def script(self) -> str:
        from lmctl import __version__

        lines = [f"vllm serve {shlex.quote(self.base)}"]
        for flag, value in self.args("@ADAPTER@"):
            quoted = "" if value is None else " " + shlex.quote(value)
            # names are validated to shell-safe characters, so the placeholder is never inside quotes
            assert "@ADAPTER@" not in quoted or "'" not in quoted
            lines.append(f"  {flag}{quoted}".replace("@ADAPTER@", f'"$here/{ADAPTER_DIR}"'))
        body = " \\\n".join(lines)
        return (
            "#!/usr/bin/env bash\n"
            f"# Generated by lmctl {__version__} (`lmctl deploy {self.source.ref} --target vllm`).\n"
            "# Base model + the LoRA adapter in ./adapter, OpenAI-compatible API. Clients send\n"
            f"# model={self.name!r} for the adapter. vLLM reads the API key from VLLM_API_KEY.\n"
            "set -euo pipefail\n"
            'here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"\n'
            ': "${VLLM_API_KEY:?set VLLM_API_KEY to the key clients must send as Authorization: Bearer KEY}"\n'
            f'exec {body} \\\n  "$@"\n'
        )

    def config(self) -> dict[str, Any]:
        """`vllm serve --config` YAML: long flag names without dashes; switches are true."""
        doc: dict[str, Any] = {"model": self.base}
        for flag, value in self.args(str(self.final / ADAPTER_DIR)):
            doc[flag[2:]] = True if value is None else (int(value) if flag in _NUMERIC else value)
        doc["lora-modules"] = [doc["lora-modules"]]  # nargs="+": one entry per adapter
        return doc

    def render(self, stage: Path) -> Rendered:
        copy_checkpoint(self.source, stage / ADAPTER_DIR)
        write_script(stage / "vllm.sh", self.script())
        config = self.config()
        header = ("# vllm serve --config vllm-config.yaml  (generated by lmctl deploy; set VLLM_API_KEY,\n"
                  "# vLLM reads it from the environment; keys are vllm serve's long flag names)\n")
        (stage / "vllm-config.yaml").write_text(header + yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        argv = ["vllm", "serve", self.base] + [x for f, v in self.args(str(self.final / ADAPTER_DIR))
                                                for x in ([f] if v is None else [f, v])]
        warnings = [] if self.base_verified else [
            f"base model {self.base!r} is a hub id; its config hash and architecture were not checked"]
        return Rendered(
            commands={"start": shlex.quote(str(self.final / "vllm.sh")), "serve": shlex.join(argv),
                      "serve_config": f"vllm serve --config {shlex.quote(str(self.final / 'vllm-config.yaml'))}"},
            warnings=warnings,
            target_info={"vllm": {"argv": argv, "adapter_dir": ADAPTER_DIR, "served_model_name": self.name,
                                  "base_served_model_name": f"{self.name}-base", "lora_rank": self.rank,
                                  "max_lora_rank": self.max_rank, "base": self.base,
                                  "base_config_verified": self.base_verified,
                                  "api_key_env": "VLLM_API_KEY"}},
        )
