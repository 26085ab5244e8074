"""`lmctl deploy` and `lmctl export`: a verified checkpoint made into something that serves.

- `run`: `deploy()`, the command: validate, verify, render into a staging directory, rename;
- `options`: `DeployOptions` (the flags); `bundle`: the source checkpoint and shared helpers;
- `local`, `vllm`, `kubernetes`: one renderer per target; `export`: `lmctl export`.

Nothing is imported here: the CLI reads `options` at start-up without loading the rest.
"""
