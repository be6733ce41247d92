"""The one exception type for mistakes a user can fix.

The CLI turns it into exit code 2 and `Error: <message>` on stderr (no traceback unless
--debug). Every message names what is wrong (file, field, tensor) and how to fix it.
"""

from contextlib import contextmanager


class UserError(Exception):
    """What is wrong and, when known, the fix. `message` is both as printed: the problem,
    then `  fix: ...` on its own line."""

    exit_code = 2

    def __init__(self, message: str, *, fix: str | None = None):
        self.message = f"{message}\n  fix: {fix}" if fix else message
        super().__init__(self.message)


def did_you_mean(word: str, choices) -> str:
    """' (did you mean `x`?)' for the closest choice, or ''."""
    import difflib

    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


# -- naming the work in progress, for failures inside the libraries we call --------------------

@contextmanager
def during(what: str):
    """`with during("stage `avg` (merge)"):` names the stage and inputs being worked on. An
    exception other than UserError that leaves the block carries the description (with those
    of the enclosing blocks: `described(e)`), so that the CLI can say which stage and input
    failed."""
    try:
        yield
    except Exception as e:
        if not isinstance(e, UserError):
            try:  # outer blocks come first: "stage `avg` (merge): the merge of a, b"
                e._solar_merge_during = [what, *getattr(e, "_solar_merge_during", [])]
            except AttributeError:  # an exception type without __dict__: no description
                pass
        raise


def described(error: BaseException) -> str | None:
    """What was being done when `error` was raised (see `during`), if known."""
    return ": ".join(getattr(error, "_solar_merge_during", [])) or None


# Where a failure comes from: a library we call, or solar-merge itself (a bug: its traceback
# must stay visible, so that it is reported and fixed).
_OURS = {"solar_merge", "__main__", "__mp_main__", "click"}


def failing_library(error: BaseException) -> str | None:
    """The top-level package of the innermost non-standard-library frame that raised `error`
    (mergekit, transformers, trl, safetensors, ...), or None when that frame is ours."""
    import sys
    import traceback

    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
        top = str(frame.f_globals.get("__name__", "")).split(".")[0]
        if top in sys.stdlib_module_names or not top:
            continue  # json, struct, ... decide nothing: who called them does
        return None if top in _OURS else top
    return None
