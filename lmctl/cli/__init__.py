"""The one place where failures become exit codes and one line on stderr (httpie-style).

Commands raise `LmctlError` subclasses carrying their exit code; click usage errors are
bad input (2), one line like any other; an OSError the machine raised (permission denied,
no space) is 6; Ctrl-C is 130; anything else is a bug (1). `--traceback` shows the stack.
Under torchrun every command speaks the same way: rank 0 as one process does, the other
ranks only warnings and errors, each line named `rank R` (cli/output.py prints results on
rank 0 alone).
"""

from __future__ import annotations

import os
import sys
import traceback

from lmctl.errors import ExitCode, LmctlError, PolicyError, exit_code_of


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


def _machine_line(exc: OSError) -> str:
    where = f"{exc.filename}: " if exc.filename else ""
    return (f"{where}{exc.strerror or exc} (the machine refused, not lmctl: fix the permissions or free space, "
            "or set LMCTL_HOME to a directory this user can write)")


def _print_refusal(exc: PolicyError, as_json: bool) -> None:
    """A policy "no" is a result: with --json, exit 3 leaves exactly one JSON object on stdout.

    Commands that show their result before deciding (eval, drift, retrain) have printed it;
    for the others the error carries its result (promote), or stdout gets `{refused, error,
    hint, exit_code}`. Every other failure leaves stdout empty."""
    from lmctl.cli.output import emit, printed

    if as_json and not printed():
        emit(exc.result if exc.result is not None else
             {"refused": True, "error": exc.message, "hint": exc.hint, "exit_code": exc.exit_code}, True)


def _usage_line(exc: Exception) -> str:
    """click's Usage/Try/Error block as one line: the error, then where the help is."""
    ctx = getattr(exc, "ctx", None)
    where = f"{ctx.command_path} --help" if ctx is not None else "lmctl --help"
    return f"{exc.format_message()} (see `{where}`)"  # type: ignore[attr-defined]


def main(argv: list[str] | None = None) -> int:
    """Run lmctl with `argv` (default sys.argv[1:]) and return the exit code."""
    import typer

    # typer may vendor click: take the exception classes from the module it really uses.
    click_errors = sys.modules[typer.BadParameter.__module__]

    from lmctl.cli.app import app
    from lmctl.cli.output import reset_printed, setup_logging
    from lmctl.distributed import env_rank

    args = list(sys.argv[1:] if argv is None else argv)
    show_tb = "--traceback" in args
    _environment()
    rank = env_rank()
    setup_logging(rank=rank)
    command = typer.main.get_command(app)
    reset_printed()
    try:
        result = command.main(args=args, prog_name="lmctl", standalone_mode=False)
        return result if isinstance(result, int) else ExitCode.OK
    except LmctlError as exc:
        if isinstance(exc, PolicyError):
            _print_refusal(exc, as_json="--json" in args)
        if exc.details and not rank:  # a gate table, a config's problems: once, from rank 0
            sys.stderr.write(exc.details.rstrip("\n") + "\n")
        return _fail(str(exc), exc.exit_code, show_tb, rank)
    except typer.Exit as exc:
        return exc.exit_code
    except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:  # bare `lmctl` / `lmctl registry`: the help
        exc.show(file=sys.stderr)
        return ExitCode.BAD_INPUT
    except click_errors.UsageError as exc:  # unknown flag, missing argument, bad value: one line, like any error
        return _fail(_usage_line(exc), ExitCode.BAD_INPUT, show_tb)
    except click_errors.ClickException as exc:
        return _fail(exc.format_message(), ExitCode.BAD_INPUT, show_tb)
    except (KeyboardInterrupt, typer.Abort):
        sys.stderr.write("lmctl: interrupted\n")
        return ExitCode.INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - the boundary: anything unexpected is a bug
        if isinstance(exc, OSError) and exit_code_of(exc) == ExitCode.ENVIRONMENT:
            return _fail(_machine_line(exc), ExitCode.ENVIRONMENT, show_tb, rank)
        return _fail(f"internal error (a bug): {type(exc).__name__}: {exc} - rerun with --traceback", ExitCode.INTERNAL,
                     show_tb, rank)
