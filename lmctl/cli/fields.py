"""CLI flags built from the typed option models, so each default and help text is written once.

`lmctl eval`, `serve` and `deploy` hand the library one pydantic model (EvalOptions/EvalGates,
ServeSettings, DeployOptions). Their flags take the default and the help text from that
model's fields; validation is the model's too, and `options_from` turns its errors into one
bad-input error naming the flags.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

import typer
from pydantic import BaseModel, ValidationError

from lmctl.errors import BadInputError

M = TypeVar("M", bound=BaseModel)


def option(model: type[BaseModel], field: str, *param_decls: str, **kwargs: Any) -> Any:
    """A typer option whose default and help are `model.field`'s (kwargs may add a panel, a metavar...)."""
    info = model.model_fields[field]
    default = kwargs.pop("default", info.get_default(call_default_factory=True))
    return typer.Option(default, *param_decls, help=kwargs.pop("help", info.description), **kwargs)


def options_from(model: type[M], values: Mapping[str, Any], flags: Mapping[str, str] | None = None) -> M:
    """Build `model` from CLI values; a validation error is exit 2 naming the flag (`flags` maps a
    field path whose flag is not `--field-name`, e.g. {"request_timeout_s": "--request-timeout"})."""
    try:
        return model.model_validate(dict(values))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = [str(p) for p in error["loc"]]
            path, names = ".".join(loc), flags or {}
            # canary_policy.window_s -> its own flag; suites.0 (a list item) -> the list's flag
            flag = (names.get(path) or names.get(loc[0]) or f"--{loc[0]}".replace("_", "-")) if loc else ""
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{flag}: {message}" if flag else message)
        raise BadInputError("; ".join(problems)) from None


def changed_flags(options: BaseModel) -> list[str]:
    """The flags of `options` whose value is not the default: what a user gave on the command line."""
    return [f"--{name}".replace("_", "-") for name, info in type(options).model_fields.items()
            if getattr(options, name) != info.get_default(call_default_factory=True)]
