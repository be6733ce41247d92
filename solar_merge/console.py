"""What solar-merge's messages look like on the console. Library modules log with
`logging.getLogger(__name__)` and print nothing themselves; the command line calls `show()`
for the length of a command: every `solar_merge.*` message at INFO and above becomes one plain
line on stderr, as it is at that moment (click's test runner replaces it), warnings starting
with `warning: `. This is the one place to change that (a quieter console, a log file per
stage).

A process that a command starts (a recipe's stage, an accelerate rank running
`solar-merge train`) shows them too: the stage runs the CLI, or calls `show()` itself when its
parent `shown()`.
"""

import logging
import sys

LOGGER = "solar_merge"


class StderrLines(logging.Handler):
    """One plain line per message on the current sys.stderr."""

    def emit(self, record):
        try:
            prefix = "warning: " if record.levelno >= logging.WARNING else ""
            sys.stderr.write(prefix + record.getMessage() + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own convention for a failed emit
            self.handleError(record)


def show(level: int = logging.INFO) -> None:
    """Print solar-merge's messages at `level` and above on stderr. They stop propagating to
    the root logger meanwhile, so that a handler a library installs there (mergekit calls
    logging.basicConfig) does not print them a second time."""
    logger = logging.getLogger(LOGGER)
    if not shown():
        logger.addHandler(StderrLines())
    logger.setLevel(level)
    logger.propagate = False


def hide() -> None:
    """Undo `show()`: messages propagate to the root logger again (pytest's caplog)."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, StderrLines)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def shown() -> bool:
    return any(isinstance(h, StderrLines) for h in logging.getLogger(LOGGER).handlers)
