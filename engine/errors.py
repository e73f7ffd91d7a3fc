"""The one exception type users see: printed as a single line, non-zero exit."""


class ShrinkError(Exception):
    """Bad input or an unrecoverable condition, with a message naming the key or file."""
