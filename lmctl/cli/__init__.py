"""The one place where failures become exit codes and one line on stderr (httpie-style).

Commands raise `LmctlError` subclasses carrying their exit code; click usage errors are
bad input (2); Ctrl-C is 130; anything else is a bug (1). `--traceback` shows the stack.
Under torchrun every command speaks the same way: rank 0 as one process does, the other
ranks only warnings and errors, each line named `rank R` (cli/output.py prints results on
rank 0 alone).
"""

from __future__ import annotations

import os
import sys
import traceback

from lmctl.errors import ExitCode, LmctlError


def _environment() -> None:
    # MLflow's telemetry is switched off: nothing leaves the machine unasked.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    if not sys.stderr.isatty():
        # Progress bars of the libraries stay quiet when stderr is a log file or a pipe.
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        # tqdm's own switch, for bars libraries draw with plain tqdm (transformers' GGUF
        # de-quantization in `lmctl models pull` is one): CI and cron logs get no \r-spam.
        # tqdm reads it when first imported, which in the console script is after this line.
        os.environ.setdefault("TQDM_DISABLE", "1")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def _fail(message: str, code: int, show_traceback: bool, rank: int = 0) -> int:
    if show_traceback:
        traceback.print_exc(file=sys.stderr)
    first, *rest = message.splitlines() or [""]
    # every rank's error reaches torchrun's output: say whose it is
    sys.stderr.write(f"lmctl: error: rank {rank}: {first}\n" if rank else f"lmctl: error: {first}\n")
    for line in rest:  # config problems: one per line, all at once
        sys.stderr.write(f"  {line.strip()}\n")
    sys.stderr.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    """Run lmctl with `argv` (default sys.argv[1:]) and return the exit code."""
    import typer

    # typer may vendor click: take the exception classes from the module it really uses.
    click_errors = sys.modules[typer.BadParameter.__module__]

    from lmctl.cli.app import app
    from lmctl.cli.output import setup_logging
    from lmctl.distributed import env_rank

    args = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in args
    _environment()
    rank = env_rank()
    setup_logging(rank=rank)
    command = typer.main.get_command(app)
    try:
        result = command.main(args=args, prog_name="lmctl", standalone_mode=False)
        return result if isinstance(result, int) else ExitCode.OK
    except LmctlError as exc:
        if exc.details and not rank:  # a gate table, a config's problems: once, from rank 0
            sys.stderr.write(exc.details.rstrip("\n") + "\n")
        return _fail(str(exc), exc.exit_code, show_tb, rank)
    except typer.Exit as exc:
        return exc.exit_code
    except click_errors.ClickException as exc:
        exc.show(file=sys.stderr)
        return ExitCode.BAD_INPUT
    except (KeyboardInterrupt, typer.Abort):
        sys.stderr.write("lmctl: interrupted\n")
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the boundary: anything unexpected is a bug
        return _fail(f"internal error (a bug): {type(exc).__name__}: {exc} - rerun with --traceback", ExitCode.INTERNAL,
                     show_tb, rank)
