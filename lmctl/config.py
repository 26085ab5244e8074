"""Typed configuration: YAML file + `--set section.key=value` overrides, validated at once.

Every field has a default or a clear error, and every problem in a file is reported in
one go with its location (`file:line: section.key: message`). Relative paths in a config
are resolved against the directory of the config file, so a cron job started elsewhere
reads the same data.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lmctl.errors import ConfigError


PRODUCTION_ALIAS = "production"  # the alias that serves: promote/rollback default, retrain.production_alias default

class Section(BaseModel):
    """Base of every config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    base: str = Field(
        "smollm2-135m",
        description="Base model: a local model directory, a name pulled with `lmctl models "
        "pull` (e.g. smollm2-135m), or a hub id (needs hub access).",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    trust_remote_code: bool = Field(
        False, description="Allow the base model's own Python code to run. Refused unless true."
    )
    add_special_tokens: list[str] = Field(
        default_factory=list,
        description="Special tokens to add to the tokenizer; their embedding rows are trained and saved with the "
        "adapter (peft trainable tokens), so the checkpoint loads with its larger vocabulary.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype for training and inference; auto = float32 on CPU, bfloat16 on a CUDA GPU "
        "with native bf16 (compute capability 8.0+), float16 on older GPUs (T4, V100)."
    )


class DataConfig(Section):
    train: Path | None = Field(
        None, description="Training data: a .txt, .jsonl, .json, .csv, .parquet or .arrow file, a glob of such "
        "shards (train-*.parquet), a directory of shards, or a `save_to_disk` dataset directory.",
    )
    validation: Path | None = Field(None, description="Held-out data in the same forms, for eval loss.")
    text_field: str = Field("text", description="Column holding the text in jsonl/csv/parquet files.")
    format: Literal["auto", "text", "completion", "chat"] = Field(
        "auto",
        description="Record shape: text (text_field), completion (prompt + completion; loss on the completion), "
        "chat (messages; loss on assistant turns), or auto-detect from the columns.",
    )
    max_length: int = Field(512, ge=8, le=131072, description="Tokens per training sequence (longer text is chunked).")
    packing: bool = Field(
        True,
        description="Pack short examples into rows of max_length without cross-example attention "
        "(checked on the model at start; falls back to padding where the architecture cannot isolate them).",
    )
    streaming: bool = Field(
        False,
        description="Train from a stream (datasets IterableDataset) instead of the tokenization cache, for data "
        "bigger than the disk: needs train.max_steps; rows are shape-checked as they arrive; packing fills rows "
        "within batches of 1000 examples; resume skips exactly the examples already trained on.",
    )
    num_proc: int | None = Field(
        None, ge=1, description="Processes that tokenize (Dataset.map num_proc); null = every core for files of "
        "20k+ rows, one process for smaller ones.",
    )


class LoraConfig(Section):
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "auto",
        description="Modules to adapt: 'auto' (attention and MLP projections of the architecture), "
        "'all-linear', or a list of module names.",
    )


    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA): better quality, ~2x slower steps.")
    use_rslora: bool = Field(False, description="Rank-stabilized LoRA: scale alpha/sqrt(r) instead of alpha/r.")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head)."
    )
    quantization: Literal["none", "4bit"] = Field(
        "none", description="4bit = QLoRA: the frozen base in NF4 via bitsandbytes (CUDA only)."
    )


class TrainConfig(Section):
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; overrides epochs when set.")
    epochs: float = Field(1, gt=0, description="Passes over the training data when max_steps is null.")
    batch_size: int = Field(8, ge=1, description="Sequences per device per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes accumulated per optimizer step.")
    lr: float = Field(2.0e-4, gt=0, lt=1, description="Peak learning rate (linear warmup, then cosine decay).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up the LR.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    seed: int = Field(0, description="Seed for data order, LoRA init and dropout.")
    eval_every: int = Field(50, ge=1, description="Steps between validation-loss evaluations.")
    save_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    log_every: int = Field(5, ge=1, description="Steps between metric logs (MLflow, progress bar).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward: less memory, ~30% slower.")
    memory_check: Literal["auto", "refuse", "warn", "off"] = Field(
        "auto", description="When the memory plan exceeds what is free on the device, before loading weights: "
        "refuse (exit 2), warn, or off; auto refuses on a CUDA GPU (an out-of-memory error there is certain) and "
        "warns on the CPU (the OS can reclaim cache and swap). docs/memory.md.",
    )
    kernels: Literal["auto", "liger", "none"] = Field(
        "auto", description="The loss without full-vocabulary logits (docs/memory.md): auto = Liger Kernel's fused "
        "linear cross-entropy on CUDA when installed (lmctl[gpu]), else lmctl's chunked pure-PyTorch head + loss; "
        "liger = Liger or refuse; none = the model's plain loss over full logits. auto and liger also recompute "
        "a gated MLP's activation in backward instead of keeping it (not with gradient checkpointing).",
    )
    keep_last: int | None = Field(
        None, ge=1, description="Checkpoints to keep besides the best by validation loss; null keeps all."
    )
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a lower validation loss; null never stops early."
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="Smallest validation-loss decrease that counts as an improvement."
    )
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="How several processes (under torchrun) share the work: ddp keeps a whole model "
        "copy per process; fsdp (FSDP2, CUDA only) shards weights, gradients and optimizer state across them. "
        "Sealed checkpoints are the same either way. One process ignores it. docs/distributed.md.",
    )


class OutputConfig(Section):
    dir: Path = Field(Path("runs"), description="Directory that holds one sub-directory per run.")
    run_name: str | None = Field(None, description="Run directory name; default: the config file's stem.")


class RegistryConfig(Section):
    name: str | None = Field(None, description="Registered model name used by register/promote.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default MLFLOW_TRACKING_URI, else sqlite under LMCTL_HOME.",
    )


class RetrainConfig(Section):
    eval_data: Path | None = Field(
        None, description="Fixed eval set (text-shaped) on which candidate and production are scored; "
        "default data.validation.",
    )
    suites: list[Path] = Field(default_factory=list, description="Task/safety suites run on the candidate (YAML or JSONL).")
    max_ppl_regression: float | None = Field(
        1.0, description="Gate: candidate perplexity at most this % above production's on eval_data; null disables it.",
    )
    min_scores: dict[str, float] = Field(default_factory=dict, description="Gate: minimum score (0-1) per suite name.")
    max_safety_violations: int | None = Field(
        None, ge=0, description="Gate: at most this many safety violations across suites; null disables it.",
    )
    candidate_alias: str = Field("candidate", description="Alias set on every newly registered candidate version.")
    production_alias: str = Field(PRODUCTION_ALIAS, description="Alias moved to the candidate when every gate passes.")
    drift_current: Path | None = Field(
        None, description="Current production inputs (e.g. the `lmctl serve --sample-log` file). When set and "
        "production exists, a run goes on only if `lmctl drift` finds drift against drift_reference; "
        "--force skips the check.",
    )
    drift_reference: Path | None = Field(
        None, description="Reference inputs for the drift check; default data.train.",
    )
    webhook_url: str | None = Field(
        None, description="POST the JSON result here (default: env LMCTL_WEBHOOK_URL); delivery failures only warn.",
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=300, description="Seconds to wait for the webhook to answer.")
    state_dir: Path | None = Field(None, description="Run states and reports; default LMCTL_HOME/retrain/<registry.name>.")
    keep_runs: int = Field(50, ge=1, description="Finished run records kept in state_dir; older ones are pruned.")
    keep_versions: int | None = Field(
        None, ge=1, description="After each run, `lmctl registry gc NAME --keep N --yes` with this N: older versions "
        "are deleted unless an alias holds them or recently did; null keeps every version.",
    )


class DriftConfig(Section):
    """Checks of `lmctl drift` (definitions in lmctl/monitor/drift.py): a check fails when its signal is significant at alpha after the correction and its effect size exceeds its threshold; null turns a check off."""

    alpha: float = Field(
        0.05, gt=0, lt=1, description="Significance level for all checks together: the chance that any "
        "check is significant on same-distribution inputs (after the correction).",
    )
    correction: Literal["holm", "bonferroni", "none"] = Field(
        "holm", description="Correction of the p-values for testing every enabled check at once.",
    )
    permutations: int = Field(
        1000, ge=100, le=100_000, description="Permutations of whole documents between the two sets, per test.",
    )

    max_ppl_increase: float | None = Field(
        10.0, ge=0, description="Drift when current perplexity is more than this % above the reference's "
        "(and significantly).",
    )
    max_psi: float | None = Field(
        0.25, ge=0, description="Drift when the PSI of token lengths exceeds this (and significantly).")
    psi_bins: int = Field(10, ge=2, le=100, description="Most PSI bins (reference quantiles); fewer for small sets.")
    max_ks_statistic: float | None = Field(
        0.2, ge=0, le=1, description="Drift when the KS statistic of token lengths exceeds this (and significantly).",
    )
    rare_max_count: int = Field(
        1, ge=0, description="A token is rare when it occurs at most this many times in the reference (0 = unseen).",
    )
    max_rare_rate_increase: float | None = Field(
        1.0, ge=0, description="Drift when the rare-token rate is more than this many percentage points above "
        "its Good-Turing expectation from the reference, beyond the gap same-source sets show (and significantly).",
    )
    max_unk_rate_increase: float | None = Field(
        0.5, ge=0, description="Drift when the tokenizer's unknown-token rate rises by more than this many points "
        "(and significantly).",
    )
    embedding_model: Path | None = Field(
        None, description="Local sentence-transformers model directory for embedding drift (never downloaded); "
        "null skips embedding drift.",
    )
    max_embedding_cosine: float | None = Field(
        0.05, ge=0, le=2, description="Drift when the cosine distance of the mean embeddings exceeds this (and significantly).",
    )
    max_embedding_mmd: float | None = Field(
        0.05, ge=0, description="Drift when the squared MMD (RBF kernel, median bandwidth) of embeddings exceeds this "
        "(and significantly).",
    )
    min_documents: int = Field(20, ge=1, description="Refuse (exit 2) a file with fewer documents than this.")
    max_documents: int | None = Field(
        5000, ge=1, description="Score a seeded random sample of this many documents per file; null scores all.",
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Bootstrap resamples for the perplexity interval.")
    seed: int = Field(0, description="Seed for document sampling, the bootstrap and the permutations.")


class LmctlConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model to adapt.")
    data: DataConfig = Field(default_factory=DataConfig, description="Training and validation data.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimization.")
    output: OutputConfig = Field(default_factory=OutputConfig, description="Where runs are written.")
    registry: RegistryConfig = Field(default_factory=RegistryConfig, description="MLflow registry.")
    retrain: RetrainConfig = Field(default_factory=RetrainConfig, description="Scheduled retraining (`lmctl retrain`).")
    drift: DriftConfig = Field(default_factory=DriftConfig, description="Input drift checks (`lmctl drift`).")

    @field_validator("model")
    @classmethod
    def _base_not_empty(cls, v: ModelConfig) -> ModelConfig:
        if not v.base.strip():
            raise ValueError("model.base must not be empty")
        return v


_SET_RE = re.compile(r"^([A-Za-z_][\w]*(?:\.[A-Za-z_][\w]*)+)=(.*)$", re.S)
_SECRET_KEY_RE = re.compile(r"(password|secret|token|api_key|apikey|webhook_url)", re.I)  # webhook URLs embed tokens
_URI_PASSWORD_RE = re.compile(r"(//[^:/@]+:)([^@]+)(@)")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as a YAML scalar)."""
    m = _SET_RE.match(item)
    if not m:
        raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. train.lr=1e-4")
    try:
        value = yaml.safe_load(m.group(2)) if m.group(2) != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML ({exc})") from None
    return m.group(1).split("."), value


def _apply_override(raw: dict[str, Any], keys: list[str], value: Any) -> None:
    node = raw
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(keys)}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML document to its 1-based line number."""
    index: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key_path = path + (str(key_node.value),)
                index[key_path] = key_node.start_mark.line + 1
                walk(value_node, key_path)

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return index


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}", hint="check the path")
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
        lines = _line_index(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: malformed YAML: {exc.problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return raw, lines


def _format_problems(exc: ValidationError, path: Path | None, lines: dict[tuple[str, ...], int]) -> list[str]:
    problems = []
    for err in exc.errors():
        loc = tuple(str(p) for p in err["loc"])
        line = next((lines[loc[:n]] for n in range(len(loc), 0, -1) if loc[:n] in lines), None)
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        problems.append(f"{where}{'.'.join(loc)}: {msg}")
    return problems


def _resolve_paths(cfg: LmctlConfig, base_dir: Path) -> LmctlConfig:
    def absolute(p: Path | None) -> Path | None:
        return None if p is None else (p if p.is_absolute() else (base_dir / p)).resolve()

    cfg.data.train = absolute(cfg.data.train)
    cfg.data.validation = absolute(cfg.data.validation)
    cfg.output.dir = absolute(cfg.output.dir)  # type: ignore[assignment]
    cfg.retrain.eval_data = absolute(cfg.retrain.eval_data)
    cfg.retrain.suites = [absolute(p) for p in cfg.retrain.suites]  # type: ignore[misc]
    cfg.retrain.state_dir = absolute(cfg.retrain.state_dir)
    cfg.retrain.drift_current = absolute(cfg.retrain.drift_current)
    cfg.retrain.drift_reference = absolute(cfg.retrain.drift_reference)
    cfg.drift.embedding_model = absolute(cfg.drift.embedding_model)
    candidate = Path(cfg.model.base).expanduser()
    if not candidate.is_absolute() and (base_dir / candidate).exists():
        cfg.model.base = str((base_dir / candidate).resolve())
    return cfg


def load_config(path: Path | str | None, overrides: list[str] | tuple[str, ...] = ()) -> LmctlConfig:
    """Read, override and validate a config; raise ConfigError listing every problem."""
    raw: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    cfg_path = Path(path).expanduser().resolve() if path is not None else None
    if cfg_path is not None:
        raw, lines = _read_yaml(cfg_path)
    for item in overrides:
        keys, value = parse_override(item)
        _apply_override(raw, keys, value)
    try:
        cfg = LmctlConfig.model_validate(raw)
    except ValidationError as exc:
        problems = _format_problems(exc, cfg_path, lines)
        raise ConfigError(f"invalid config ({len(problems)} problem(s))", problems) from None
    if cfg.output.run_name is None:
        cfg.output.run_name = cfg_path.stem if cfg_path else "run"
    return _resolve_paths(cfg, cfg_path.parent if cfg_path else Path.cwd())


def redacted(value: Any, key: str = "") -> Any:
    """A JSON-able copy of a config dump with secrets and URI passwords masked."""
    if isinstance(value, dict):
        return {k: redacted(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [redacted(v, key) for v in value]
    if isinstance(value, str):
        if _SECRET_KEY_RE.search(key):
            return "***"
        return _URI_PASSWORD_RE.sub(r"\1***\3", value)
    return value


def config_dump(cfg: LmctlConfig) -> dict[str, Any]:
    """The resolved config as plain JSON types, secrets redacted."""
    return redacted(cfg.model_dump(mode="json"))
