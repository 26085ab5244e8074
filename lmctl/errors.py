"""The one error hierarchy of lmctl.

Every expected failure is an `LmctlError` carrying its exit code (docs/exit-codes.md); the
library raises it (policy outcomes included: a failed gate is decided where the gates are,
not in the CLI), and the CLI boundary, `lmctl.cli.main`, alone turns it into one line on
stderr and the exit code. Anything else that escapes is a bug and exits 1.
"""

from __future__ import annotations

import errno


class ExitCode:
    """Exit codes shared by every command (docs/exit-codes.md)."""

    OK = 0
    INTERNAL = 1
    BAD_INPUT = 2
    POLICY = 3
    INTEGRITY = 4
    BUSY = 5
    ENVIRONMENT = 6
    INTERRUPTED = 130


class LmctlError(Exception):
    """An expected failure: a message for a person and the exit code for a machine."""

    exit_code: int = ExitCode.INTERNAL

    def __init__(self, message: str, *, hint: str | None = None, details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details  # shown above the error line, e.g. the gate table of a policy refusal

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class BadInputError(LmctlError):
    """Usage, config, data or a reference the user gave is wrong (exit 2)."""

    exit_code = ExitCode.BAD_INPUT


class ConfigError(BadInputError):
    """A config file cannot be read or does not validate; lists every problem at once."""

    def __init__(self, message: str, problems: list[str] | None = None, **kw: str) -> None:
        self.problems = problems or []
        full = message if not self.problems else message + ":\n  " + "\n  ".join(self.problems)
        super().__init__(full, **kw)


class DataError(BadInputError):
    """A data file is missing, empty or has the wrong shape."""


class ModelRefError(BadInputError):
    """A MODEL_REF names nothing that exists (path, registry version or alias)."""


class PolicyError(LmctlError):
    """A policy said no: gate failed, drift detected, candidate not promoted (exit 3).

    A "no" is a result, not a crash: `result` is the command's result object saying what was
    refused and why (a pydantic model or a dict), which the CLI prints on stdout with `--json`
    when the command has not printed one itself (docs/exit-codes.md)."""

    exit_code = ExitCode.POLICY

    def __init__(self, message: str, *, hint: str | None = None, details: str | None = None,
                 result: object | None = None) -> None:
        super().__init__(message, hint=hint, details=details)
        self.result = result


class IntegrityError(LmctlError):
    """A hash, tokenizer lock or checkpoint does not match what was recorded (exit 4)."""

    exit_code = ExitCode.INTEGRITY


class BusyError(LmctlError):
    """Another process holds the lock this command needs (exit 5)."""

    exit_code = ExitCode.BUSY


class UnavailableError(LmctlError):
    """Something lmctl depends on did not answer: the tracking server (unreachable, 5xx) or,
    under torchrun, the other processes (a rendezvous or collective that timed out or lost
    a peer). Nothing is wrong with the request, so, like a held lock, it is exit 5: run
    again later (a retrain resumes)."""

    exit_code = ExitCode.BUSY


class StorageError(LmctlError):
    """The machine will not let lmctl keep its files: the disk is full, or a directory lmctl must
    write (LMCTL_HOME, its cache, an output) is not writable (exit 6). Neither the input nor lmctl
    is at fault: free space, fix the permissions, or point LMCTL_HOME elsewhere, and run again."""

    exit_code = ExitCode.ENVIRONMENT


# What the machine refuses wherever lmctl keeps its own files (LMCTL_HOME, caches, outputs):
# permission denied, a read-only file system, no space, quota or file size limit exceeded.
# Neither lmctl's bug nor the user's input (the data readers name unreadable input themselves, 2).
MACHINE_ERRNOS = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def exit_code_of(exc: BaseException) -> int:
    """The exit code a failure means (docs/exit-codes.md): its own, 6 for the machine's OSErrors, else 1."""
    if isinstance(exc, LmctlError):
        return exc.exit_code
    if isinstance(exc, OSError) and exc.errno in MACHINE_ERRNOS:
        return ExitCode.ENVIRONMENT
    return ExitCode.INTERNAL
