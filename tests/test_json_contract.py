"""The `--json` output of every command keeps its keys.

The expected key sets below were recorded by running this walk against the code as it was
before the issue-12 redesign (typed hand-offs, one stats module): a refactoring that renames,
drops or adds a key fails here. Keys are paths: `a.b` is key `b` inside object `a`, `a[].b`
is key `b` in the items of list `a`. Objects whose keys are data (config sections, tags,
metric names, file names) are recorded one level deep only.

One walk through the lifecycle, in-process (the CLI boundary is the same function the
console script calls), on the tiny model of conftest.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from conftest import ASSETS

VALIDATION = ASSETS / "tiny_validation.jsonl"
# Objects whose keys are data, not contract: only their own key is recorded.
OPAQUE = {"libraries", "config", "tags", "metrics", "sums", "data.files", "files", "commands", "lm_eval", "stages",
          "diff.config", "config_changes", "checks[].details", "method", "paths"}


def shape(value: Any, prefix: str = "", depth: int = 3) -> set[str]:
    """The key paths of a JSON value, `depth` levels deep."""
    keys: set[str] = set()
    if depth == 0 or prefix in OPAQUE:
        return keys
    if isinstance(value, dict):
        for key, sub in value.items():
            path = f"{prefix}.{key}" if prefix else key
            keys.add(path)
            keys |= shape(sub, path, depth - 1)
    elif isinstance(value, list) and value and isinstance(value[0], dict):
        keys |= shape(value[0], prefix + "[]", depth)
    return keys


def test_json_keys_of_every_command(cli, tiny_config: Path, tmp_path: Path) -> None:
    got: dict[str, set[str]] = {}

    def run(label: str, *args: object, codes: tuple[int, ...] = (0,)) -> dict:
        result = cli(*args, "--json")
        assert result.code in codes, (label, result.err)
        got[label] = shape(result.json)
        return result.json

    run("config validate", "config", "validate", tiny_config)
    run("config show", "config", "show", tiny_config)
    run("doctor", "doctor")
    run("models list", "models", "list")
    run("data validate", "data", "validate", tiny_config)
    run("data prepare", "data", "prepare", ASSETS / "tiny_train.jsonl", "--out", tmp_path / "prepared")
    run("data cache list", "data", "cache", "list")
    run("train --dry-run", "train", tiny_config, "--dry-run")
    run("train --emit kubernetes", "train", tiny_config, "--emit", "kubernetes", "--nnodes", "2", "--gpus-per-node", "4",
        "--data-root", ASSETS, "--out", tmp_path / "train-job")
    ckpt = run("train", "train", tiny_config)["checkpoint"]
    first = run("eval", "eval", ckpt, "--data", VALIDATION, "--report", tmp_path / "first.json")
    assert first["registry"] is None
    run("register", "register", ckpt, "--name", "tiny", "--eval", tmp_path / "first.json")
    run("promote (first)", "promote", "tiny", "1")
    cfg = yaml.safe_load(tiny_config.read_text())
    cfg["output"]["run_name"] = "second"
    tiny_config.write_text(yaml.safe_dump(cfg))
    second = cli("train", tiny_config, "--set", "train.max_steps=3", "--json").json["checkpoint"]
    run("register (second)", "register", second, "--name", "tiny", "--alias", "candidate")
    run("eval (gated)", "eval", "models:/tiny/2", "--data", VALIDATION, "--baseline", "models:/tiny@production",
        "--max-ppl-regression", "1000", "--latency", "--latency-runs", "2", "--output-tokens", "4",
        "--max-p95-latency", "100000", "--report", tmp_path / "gate.json")
    run("promote (gated)", "promote", "tiny", "2", "--eval", tmp_path / "gate.json")
    run("rollback", "rollback", "tiny")
    run("registry list", "registry", "list")
    run("registry show", "registry", "show", "tiny@production")
    run("registry verify", "registry", "verify", "models:/tiny/1")
    run("registry history", "registry", "history", "tiny")
    run("registry diff", "registry", "diff", "models:/tiny/1", "models:/tiny/2")
    run("export", "export", "models:/tiny/1", "--out", tmp_path / "export")
    run("deploy local", "deploy", ckpt, "--target", "local", "--out", tmp_path / "local")
    run("deploy kubernetes", "deploy", "models:/tiny@production", "--target", "kubernetes", "--out", tmp_path / "k8s")
    run("drift", "drift", "--model", ckpt, "--reference", ASSETS / "tiny_train.jsonl", "--current",
        ASSETS / "drift_current_same.jsonl", "--max-length", "64", "--batch-size", "64", "--min-documents", "1",
        "--max-psi", "100", "--max-ks", "1", "--max-ppl-increase", "100000", "--max-rare-increase", "100")
    cfg["output"]["run_name"] = "tiny"
    cfg["retrain"] = {"eval_data": str(VALIDATION)}
    tiny_config.write_text(yaml.safe_dump(cfg))
    run("retrain", "retrain", tiny_config, "--set", "train.max_steps=3", codes=(0, 3))  # promoted or not: same keys
    run("data cache clear", "data", "cache", "clear")
    assert sorted(got) == sorted(EXPECTED)
    changed = {label: {"added": sorted(got[label] - keys), "dropped": sorted(keys - got[label])}
               for label, keys in EXPECTED.items() if got[label] != keys}
    assert not changed, changed


EXPECTED: dict[str, set[str]] = {
    'config show': {
        'data', 'data.format', 'data.max_length', 'data.num_proc', 'data.packing', 'data.streaming',
        'data.text_field', 'data.train', 'data.validation', 'drift', 'drift.alpha', 'drift.bootstrap_samples', 'drift.correction', 'drift.embedding_model',
        'drift.max_documents', 'drift.max_embedding_cosine', 'drift.max_embedding_mmd',
        'drift.max_ks_statistic', 'drift.max_ppl_increase', 'drift.max_psi', 'drift.max_rare_rate_increase',
        'drift.max_unk_rate_increase', 'drift.min_documents', 'drift.permutations', 'drift.psi_bins', 'drift.rare_max_count',
        'drift.seed', 'lora', 'lora.alpha', 'lora.dropout', 'lora.modules_to_save', 'lora.quantization',
        'lora.r', 'lora.target_modules', 'lora.use_dora', 'lora.use_rslora', 'model',
        'model.add_special_tokens', 'model.base', 'model.dtype', 'model.revision', 'model.trust_remote_code',
        'output', 'output.dir', 'output.run_name', 'registry', 'registry.name', 'registry.tracking_uri',
        'retrain', 'retrain.candidate_alias', 'retrain.drift_current', 'retrain.drift_reference',
        'retrain.eval_data', 'retrain.keep_runs', 'retrain.keep_versions', 'retrain.max_ppl_regression', 'retrain.max_safety_violations',
        'retrain.min_scores', 'retrain.production_alias', 'retrain.state_dir', 'retrain.suites',
        'retrain.webhook_timeout_s', 'retrain.webhook_url', 'train', 'train.batch_size',
        'train.early_stopping_patience', 'train.early_stopping_threshold', 'train.epochs', 'train.eval_every',
        'train.grad_accum', 'train.gradient_checkpointing', 'train.kernels', 'train.memory_check', 'train.keep_last', 'train.log_every', 'train.lr',
        'train.max_steps', 'train.save_every', 'train.seed', 'train.warmup_ratio', 'train.weight_decay',
        'train.distributed'},  # issue 22 added train.distributed
    'config validate': {
        'config', 'valid'},
    'data prepare': {
        'duplicates_removed', 'format', 'out', 'pii_redacted', 'rows_in', 'train_fingerprint', 'train_rows',
        'validation_fingerprint', 'validation_rows',
        'removed', 'removed.duplicate', 'removed.empty', 'identical_after_redaction'},  # issue 26
    'data validate': {
        'issues', 'ok', 'overlap_rows', 'train', 'train.duplicate_rows', 'train.empty_rows',
        'train.fingerprint', 'train.format', 'train.path', 'train.pii', 'train.rows', 'train.tokens',
        'train.tokens.max', 'train.tokens.max_length', 'train.tokens.mean', 'train.tokens.p50',
        'train.tokens.p95', 'train.tokens.truncation_rate', 'validation', 'validation.duplicate_rows',
        'validation.empty_rows', 'validation.fingerprint', 'validation.format', 'validation.path',
        'validation.pii', 'validation.rows', 'validation.tokens', 'validation.tokens.max',
        'validation.tokens.max_length', 'validation.tokens.mean', 'validation.tokens.p50',
        'validation.tokens.p95', 'validation.tokens.truncation_rate'},
    'deploy kubernetes': {
        'commands', 'files', 'manifest_sha256', 'out', 'registry_name', 'registry_version', 'source', 'target',
        'warnings'},
    'deploy local': {
        'commands', 'files', 'manifest_sha256', 'out', 'registry_name', 'registry_version', 'source', 'target',
        'warnings'},
    'doctor': {
        'accelerator', 'free_disk_gb', 'libraries', 'lmctl_home', 'missing', 'ok', 'pulled_models',
        'registry_reachable', 'tracking_uri'},
    'drift': {
        'checks', 'checks[].detail', 'checks[].detail.ci95_high', 'checks[].detail.ci95_low', 'checks[].name',
        'checks[].passed', 'checks[].setting', 'checks[].threshold', 'checks[].value', 'created_at', 'current',
        'checks[].p_adjusted', 'checks[].p_value', 'checks[].significant', 'checks[].test',  # issue 26
        'significance', 'significance.alpha', 'significance.correction', 'significance.permutations',
        'significance.signals',
        'current.documents', 'current.format', 'current.path', 'current.rows', 'current.sha256',
        'current.text_field', 'drift_detected', 'embedding', 'embedding_skipped', 'model', 'model_kind',
        'perplexity', 'perplexity.bootstrap_samples', 'perplexity.ci95', 'perplexity.current',
        'perplexity.increase_pct', 'perplexity.max_length', 'perplexity.per_document',
        'perplexity.per_document.current', 'perplexity.per_document.reference', 'perplexity.reference',
        'perplexity.stride', 'reference', 'reference.documents', 'reference.format', 'reference.path',
        'reference.rows', 'reference.sha256', 'reference.text_field', 'registry', 'schema_version', 'seconds',
        'token_length', 'token_length.current', 'token_length.current.max', 'token_length.current.mean',
        'token_length.current.p50', 'token_length.current.p95', 'token_length.ks_p_value',
        'token_length.ks_statistic', 'token_length.psi', 'token_length.psi_bins', 'token_length.reference',
        'token_length.reference.max', 'token_length.reference.mean', 'token_length.reference.p50',
        'token_length.reference.p95', 'tokens', 'tokens.rare_max_count', 'tokens.rare_rate_current',
        'tokens.rare_rate_expected', 'tokens.rare_rate_increase_pp', 'tokens.unk_rate_current',
        'tokens.unk_rate_increase_pp', 'tokens.unk_rate_reference', 'tokens.unk_token_id'},
    'eval': {
        'baseline', 'comparison', 'created_at', 'data', 'data.format', 'data.path', 'data.rows', 'data.sha256',
        'data.text_field', 'documents', 'gates', 'latency', 'lm_eval', 'manifest_sha256', 'method', 'metrics',
        'model', 'model_kind', 'perplexity', 'registry', 'schema_version', 'seconds', 'suites', 'sums'},
    'eval (gated)': {
        'baseline', 'baseline.bits_per_byte', 'baseline.byte_perplexity', 'baseline.manifest_sha256',
        'baseline.model', 'baseline.nll_per_token', 'baseline.perplexity', 'baseline.registry',
        'baseline.registry.name', 'baseline.registry.version', 'baseline.word_perplexity', 'comparison',
        'comparison.baseline', 'comparison.bootstrap_samples', 'comparison.candidate', 'comparison.ci95',
        'comparison.difference', 'comparison.documents', 'comparison.metric', 'comparison.regression_pct',
        'created_at', 'data', 'data.format', 'data.path', 'data.rows', 'data.sha256', 'data.text_field',
        'documents', 'gates', 'gates[].name', 'gates[].passed', 'gates[].threshold', 'gates[].value', 'latency',
        'latency.decode_tokens_per_s', 'latency.input_tokens', 'latency.input_tokens.max',
        'latency.input_tokens.mean', 'latency.input_tokens.p50', 'latency.input_tokens.p95',
        'latency.latency_ms', 'latency.latency_ms.mean', 'latency.latency_ms.p50', 'latency.latency_ms.p95',
        'latency.latency_ms.p99', 'latency.output_tokens', 'latency.prompt_tokens', 'latency.runs',
        'latency.samples_ms', 'latency.ttft_ms', 'latency.ttft_ms.mean', 'latency.ttft_ms.p50',
        'latency.ttft_ms.p95', 'latency.ttft_ms.p99', 'lm_eval', 'manifest_sha256', 'method', 'metrics',
        'model', 'model_kind', 'perplexity', 'registry', 'registry.name', 'registry.version', 'schema_version',
        'seconds', 'suites', 'sums'},
    'export': {
        'files', 'max_logit_diff', 'merged', 'out', 'perplexity_adapter', 'perplexity_merged', 'source'},
    'models list': {
        'models', 'models[].description', 'models[].license', 'models[].name', 'models[].pulled'},
    'promote (first)': {
        'alias', 'at', 'forced', 'gated', 'gates', 'name', 'previous_version', 'reason', 'report', 'user',
        'version', 'why',
        'promoted'},  # issue 26: a refusal (exit 3) prints the same object, promoted: false
    'promote (gated)': {
        'alias', 'at', 'forced', 'gated', 'gates', 'gates[].name', 'gates[].passed', 'gates[].threshold',
        'gates[].value', 'name', 'previous_version', 'reason', 'report', 'report.path', 'report.sha256', 'user',
        'version', 'why',
        'promoted'},  # issue 26: a refusal (exit 3) prints the same object, promoted: false
    'register': {
        'added_tokens', 'alias', 'cleaned', 'metrics', 'model_card', 'name', 'parent_version', 'run_id',
        'source', 'tokenizer_fingerprint', 'tracking_uri', 'version'},
    'register (second)': {
        'added_tokens', 'alias', 'cleaned', 'metrics', 'model_card', 'name', 'parent_version', 'run_id',
        'source', 'tokenizer_fingerprint', 'tracking_uri', 'version'},
    'registry diff': {
        'a', 'b', 'base_model', 'config', 'data', 'identical', 'metrics', 'tokenizer'},
    'registry history': {
        'moves', 'moves[].action', 'moves[].alias', 'moves[].at', 'moves[].forced', 'moves[].name',
        'moves[].previous_version', 'moves[].reason', 'moves[].report', 'moves[].user', 'moves[].version',
        # issue 14 (the audit trail) added these three
        'moves[].host', 'moves[].ci_job', 'moves[].seq'},
    'registry list': {
        'versions', 'versions[].aliases', 'versions[].created_at', 'versions[].model_card', 'versions[].name',
        'versions[].run_id', 'versions[].source', 'versions[].status', 'versions[].usable', 'versions[].version'},
    'registry show': {
        'aliases', 'created_at', 'model_card', 'name', 'run_id', 'source', 'status', 'tags', 'usable', 'version'},
    'registry verify': {
        'files', 'model_card', 'ref', 'tokenizer_fingerprint', 'verified'},
    'retrain': {
        'candidate_version', 'checkpoint', 'data_fingerprint', 'drift', 'eval_report', 'evaluation', 'gates',
        'name', 'production_after', 'production_before', 'reason', 'report', 'result', 'resumed', 'run_id',
        'schema_version', 'seconds', 'stages'},
    'rollback': {
        'action', 'alias', 'at', 'forced', 'name', 'previous_version', 'reason', 'report', 'user', 'version',
        'host', 'ci_job', 'seq'},  # issue 14 added the last three
    'train': {
        'best_checkpoint', 'best_eval_loss', 'checkpoint', 'checkpoints', 'eval_loss', 'mlflow_run_id',
        'resumed_from', 'run_dir', 'seconds', 'steps', 'stopped_early', 'tokens', 'tokens_per_s', 'train_loss',
        'distributed', 'world_size',  # issue 22 added these two (issue 28: `processes` is `world_size`)
        'tokens_per_s_steady'},  # issue 25 (steady-state throughput beside the whole run's)
    'train --dry-run': {
        'base_model', 'cache_hit', 'data_format', 'lint', 'lint.eos_labels', 'lint.rows_dropped',
        'lint.truncation_rate', 'lint.warnings', 'max_steps', 'memory', 'memory.activations_gb', 'memory.data_gb',
        'memory.estimated_peak_gb',
        'memory.logits_gb', 'memory.optimizer_gb', 'memory.runtime_gb', 'memory.total_params',
        'memory.trainable_params', 'memory.weights_gb', 'packing', 'resume_from', 'run_dir', 'streaming',
        'tokens_per_step', 'train_examples', 'train_rows', 'train_sequences', 'validation_rows',
        'distributed', 'world_size',  # issue 22 added these two (issue 28: `sharded` and `processes` renamed)
        # issue 25: the memory plan's device, dtype, loss kernel, largest part and fit
        'memory.device', 'memory.dtype', 'memory.loss_kernel', 'memory.dominant', 'memory.free_gb', 'memory.fits',
        'memory.advice'},
    # added by issue 22 (the training job for a cluster)
    'train --emit kubernetes': {'commands', 'files', 'gpus_per_node', 'job', 'namespace', 'nodes', 'out', 'paths',
                                'sequences_per_step', 'target', 'torchrun', 'warnings', 'world_size'},
    # added by issue 13 (the tokenization cache)
    'data cache list': {'entries', 'entries[].bytes', 'entries[].created_at', 'entries[].format', 'entries[].key',
                        'entries[].max_length', 'entries[].purpose', 'entries[].rows', 'entries[].source', 'entries[].status', 'entries[].tokenized',
                        'partial', 'path', 'total_bytes'},
    'data cache clear': {'freed_bytes', 'path', 'removed'},
}
