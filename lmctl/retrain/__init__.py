"""`lmctl retrain CONFIG`: the scheduled pipeline, one run at a time per registered model.

check_data -> train -> evaluate -> register -> promote -> report. The run is skipped when
the training data's fingerprint equals the one production was trained on (or the one the
last rejected candidate was trained on with the same config): retraining would rebuild a
model the registry already has. A candidate is evaluated against production on the fixed
eval set and suites and promoted only when every gate passes. With no production yet
(the first run) there is no baseline: the perplexity-regression gate cannot apply, the
absolute gates (suite scores, safety) still do, and a passing candidate is promoted.

Every stage persists the run's state (`lmctl.retrain.state`; on a team server an MLflow
run, `lmctl.retrain.server_state`, so another host can go on), so a killed run resumes at
the stage it died in. Registering is idempotent: a version whose `lmctl.manifest_sha256`
tag matches the candidate checkpoint is reused, never duplicated.

Modules: `pipeline` (`retrain()`, `status()`, the result and the webhook), `context` (the
validated inputs), `stages` (each stage), `state` (the run's typed state and the embedded
store), `server_state` (team mode's store in MLflow runs), `stores` (which store, and the
versions an unfinished run still needs), `lock` (one run at a time per model).
"""

from lmctl.retrain.pipeline import RetrainResult, RetrainStatus, retrain, status

__all__ = ["RetrainResult", "RetrainStatus", "retrain", "status"]
