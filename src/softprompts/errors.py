"""User-facing errors: the CLI prints their message (no traceback) and exits with code 2; the server answers 4xx.

Errors of one layer that another layer raises live here, so no two modules import each other for an exception.
"""


class SoftpromptsError(ValueError):
    """Bad input a user can fix: the message says what is wrong and what to do."""


class DataError(SoftpromptsError):
    """Task data or a template the user must fix; the message names the file/line/field and the fix."""
