"""User-facing errors: the CLI prints their message as one line and exits non-zero (no traceback)."""


class DiffalignError(Exception):
    """Bad input (file, row, key, model folder, ...); the message names the item."""
