"""The model registry stage: MLflow model versions with their lock, gated alias moves, an audit trail.

- `register`: a checkpoint becomes a version (tokenizer checked, model card, pending until complete);
- `aliases`: alias moves and rollback, each an audit record; `locks`: the alias lock;
- `audit`: the append-only trail; `mutex`: locks in a team server's database, with a heartbeat;
- `promotion`: the promotion policy; `gc`: deleting old versions; `diff`; `model_card`.

Reading versions and downloading them as verified checkpoints is shared by every stage and
lives below this package, in `lmctl.versions`; the MLflow client in `lmctl.tracking`.
"""

from lmctl.registry.aliases import alias_history, move_alias, rollback, rollback_target

__all__ = ["alias_history", "move_alias", "rollback", "rollback_target"]
