"""The one exception type users see: printed as a single line, non-zero exit."""


class ShrinkError(Exception):
    """Bad input or an unrecoverable condition, with a message naming the key or file."""


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name: some
    libraries raise with an empty message, which must still make a readable error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
