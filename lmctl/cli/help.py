"""How `lmctl COMMAND --help` reads: options in sections, metavars that say what to type, examples.

Plain click formatting, not typer's rich renderer (which alone doubled `lmctl --help`'s start-up,
scripts/bench_startup.py). typer's plain formatter prints every option in one block and shows
Python types as metavars (`--set <list[str]>`, `{config}`); `Command` instead groups options by
the `rich_help_panel` each declares (output flags last), derives a conventional metavar from an
option's type and name where the option names none (`N`, `SECONDS`, `PATH`, `IMAGE`), and prints
its epilog (the examples) as written instead of re-wrapped.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Any, get_args, get_origin

from typer import _click as click
from typer.core import TyperCommand

OPTIONS = "Options"
OUTPUT = "Output"
OUTPUT_FLAGS = {"json_out", "traceback", "help"}
# What to type, for options whose name and type alone do not say it (by parameter name).
_BY_NAME = {
    "set": "KEY=VALUE", "resume": "auto|never|PATH", "nnodes": "N|MIN:MAX", "rdzv_endpoint": "HOST[:PORT]",
    "rdzv_id": "ID", "emit_target": "kubernetes", "method": "strided|rolling", "target": "local|vllm|kubernetes",
    "canary": "MODEL_REF", "baseline": "MODEL_REF", "shadow": "MODEL_REF", "tracking_uri": "URI",
    "served_model_name": "NAME", "text_field": "FIELD", "data_mount": "PATH", "output_mount": "PATH",
    "data_claim": "CLAIM", "output_claim": "CLAIM", "tracking_secret": "SECRET", "tracking_secret_key": "KEY",
    "memory": "QUANTITY", "description": "TEXT", "reason": "TEXT",
}
_TARGET_PANELS = {"vllm": "vLLM target (--target vllm)", "kubernetes": "Kubernetes target (--target kubernetes)"}
# float options measured in seconds: by name, since the type alone says only "a number"
_SECONDS_HINTS = ("timeout", "interval", "window")


def metavar_for(param: Any) -> str | None:
    """The conventional metavar of a typer parameter that names none: what a user types, not a Python type."""
    name = (param.name or "value").removesuffix("_")
    if param.param_type_name == "argument":
        return name.upper()
    if param.is_flag or param.count:
        return None
    if name in _BY_NAME:
        return _BY_NAME[name]
    desc = param.type_descriptor
    if desc.is_choice and desc.choices:
        return "|".join(str(getattr(c, "value", c)) for c in desc.choices)
    kind = get_args(desc.annotation)[0] if get_origin(desc.annotation) is list else desc.annotation
    if kind is int:
        return "N"
    if kind is float:
        seconds = name.endswith("_s") or any(hint in name for hint in _SECONDS_HINTS)
        return "SECONDS" if seconds else "NUMBER"
    if isinstance(kind, type) and issubclass(kind, PurePath):
        return "DIR" if name in ("out", "output", "state_dir") else "PATH"
    return name.upper()


def _panel_of(help_text: str | None) -> str:
    """Options whose help starts `vllm:` or `kubernetes:` (one target's) get that target's section."""
    prefix = (help_text or "").partition(":")[0]
    return _TARGET_PANELS.get(prefix, OPTIONS)


class Command(TyperCommand):
    """A typer command whose help has sections, plain metavars and verbatim examples."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if param.metavar is None:
                param.metavar = metavar_for(param)

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        arguments: list[tuple[str, str]] = []
        sections: dict[str, list[tuple[str, str]]] = {OPTIONS: []}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":  # typer adds the Python type: `CONFIG <path>`
                arguments.append((param.metavar + "..." * (param.nargs != 1), record[1]))
                continue
            panel = OUTPUT if param.name in OUTPUT_FLAGS else getattr(param, "rich_help_panel", None) or _panel_of(param.help)
            sections.setdefault(panel, []).append(record)
        sections[OUTPUT] = sections.pop(OUTPUT, [])  # output flags close the list
        if arguments:
            with formatter.section("Arguments"):
                formatter.write_dl(arguments)
        for title, records in sections.items():
            if records:
                with formatter.section(title):
                    formatter.write_dl(records)

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        """`lmctl train [OPTIONS] CONFIG`: a required argument plain, an optional one in brackets."""
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name == "argument":
                name = param.metavar + "..." * (param.nargs != 1)
                pieces.append(name if param.required else f"[{name}]")
        return pieces

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if not self.epilog:
            return
        formatter.write_paragraph()
        for line in self.epilog.strip("\n").splitlines():
            formatter.write_text(line) if not line.startswith("  ") else formatter.write(f"{line}\n")


def examples(*lines: str) -> str:
    """An epilog of example command lines, each `# what it does` then the command, printed as written."""
    return "Examples:\n" + "\n".join(f"  {line}" for line in lines)
