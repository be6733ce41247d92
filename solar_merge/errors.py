"""The one exception type for mistakes a user can fix.

The CLI turns it into exit code 2 and a one-line message (no traceback unless --debug).
Every message names what is wrong (file, field, tensor) and how to fix it.
"""

import click


class UserError(click.ClickException):
    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None):
        super().__init__(f"{message}\n  fix: {fix}" if fix else message)


def did_you_mean(word: str, choices) -> str:
    """' (did you mean `x`?)' for the closest choice, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""
