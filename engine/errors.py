"""The one exception type users see: printed as a single line, non-zero exit."""
from __future__ import annotations

import os
import re
from typing import Optional


class ShrinkError(Exception):
    """Bad input or an unrecoverable condition, with a message naming the key or file."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name: some
    libraries raise with an empty message, which must still make a readable error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# How Rust libraries (safetensors, tokenizers) word an operating-system error in their messages.
RUST_OS_ERROR = re.compile(r"os error (\d+)|Os \{ code: (\d+)")


def io_error_line(exc: BaseException) -> Optional[str]:
    """'<file>: <what went wrong>' for an operating-system error (disk full, name too long,
    permission denied, ...), also when a Rust library (safetensors, tokenizers) reports one as
    text; None for any other exception, which is a bug to show in full."""
    if isinstance(exc, OSError):
        what = exc.strerror or first_line(exc)
        return f"{exc.filename}: {what}" if exc.filename else what
    match = RUST_OS_ERROR.search(str(exc))
    if match:
        return os.strerror(int(match.group(1) or match.group(2)))
    return None


def user_error(exc: BaseException) -> Optional[str]:
    """The one line a user sees for an exception that is theirs to fix (bad input, a full disk,
    a path too long, ...); None for a bug, which keeps its traceback."""
    if isinstance(exc, ShrinkError):
        return str(exc)
    return io_error_line(exc)
