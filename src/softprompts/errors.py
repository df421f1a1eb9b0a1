"""User-facing errors: the CLI prints their message (no traceback) and exits with code 2."""


class SoftpromptsError(ValueError):
    """Bad input a user can fix: the message says what is wrong and what to do."""
