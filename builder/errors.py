"""Errors the CLI turns into a message and an exit code (never a traceback).

Exit codes, for every command:
  0 success, 1 the job failed (bad recipe, failed build or check),
  2 usage error (Click's own), 3 an input that is not what it claims (e.g. not a disk image).
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BAD_INPUT = 3


class ArmvmError(Exception):
    """A user-facing failure: ``str(err)`` is the whole message."""

    exit_code = EXIT_FAILED

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class RecipeError(ArmvmError):
    """A recipe problem: names the file, the line, the field and what is allowed."""

    def __init__(self, file, message: str, *, line: int | None = None,
                 field: str | None = None, allowed: str | None = None):
        self.file, self.line, self.field, self.allowed = str(file), line, field, allowed
        where = self.file + (f":{line}" if line else "")
        text = f"{where}: "
        if field:
            text += f"field '{field}': "
        text += message
        if allowed:
            text += f" (allowed: {allowed})"
        super().__init__(text)


class SourceError(ArmvmError):
    """A source could not be fetched or failed verification."""


class NotAnImageError(ArmvmError):
    """An input is not what it claims (e.g. not a disk image)."""

    exit_code = EXIT_BAD_INPUT


class MissingToolError(ArmvmError):
    """A host program is missing: the message names the Debian package to install."""

    def __init__(self, program: str, package: str, purpose: str = ""):
        why = f" (needed {purpose})" if purpose else ""
        super().__init__(f"'{program}' was not found{why}; install the Debian package "
                         f"'{package}' (apt-get install {package})")
