"""What a person sees while solar-merge works, and where everything else goes.

- solar-merge's own messages: library modules log with `logging.getLogger(__name__)` and print
  nothing themselves; the command line calls `show()` for the length of a command, and every
  `solar_merge.*` message at INFO and above becomes one plain line on stderr (warnings start
  with `warning: `). These say what a command does and what it decided.
- everything the libraries print (Python warnings, transformers / datasets / TRL / mergekit /
  lm-eval logging and progress bars, the output of the processes they start, such as
  `accelerate launch` ranks) goes, while `capture(log)` is active, into that log file: a
  recipe's stage captures into `<stage folder>.log`, a tool command (`eval`, `train`, `sweep`,
  ...) into `<output folder>.log`. `--verbose` (SOLAR_MERGE_VERBOSE=1, inherited by the
  processes a command starts) leaves them on the terminal instead.
- results: the command prints them last, as a table (solar_merge.tables).

A process that a command starts shows messages too: a recipe's stage relays its lines to the
command's process (`relay`), which prints them under the stage's line, around the recipe's
progress bar; an accelerate rank running `solar-merge train` inherits the stage's log file.
"""

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from solar_merge.errors import UserError

LOGGER = "solar_merge"
VERBOSE = "SOLAR_MERGE_VERBOSE"
LOG = "SOLAR_MERGE_LOG"  # the log file being written, for the processes started meanwhile

_state: dict = {"terminal": None, "log": None, "relay": None}


class StderrLines(logging.Handler):
    """One plain line per message for the person at the terminal (see `echo`)."""

    def emit(self, record):
        try:
            prefix = "warning: " if record.levelno >= logging.WARNING else ""
            echo(prefix + record.getMessage())
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


def verbose() -> bool:
    """--verbose: the libraries' output stays on the terminal (no log file)."""
    return os.environ.get(VERBOSE, "") not in ("", "0")


def relay(send) -> None:
    """In a process a command started: hand every line to `send(line)` (the command's
    process prints it) instead of writing it to this process's stderr."""
    _state["relay"] = send


def terminal():
    """The stream our own output goes to (progress bars, lines): stderr as it was before a
    `capture` started."""
    return _state["terminal"] or sys.stderr


def echo(line: str) -> None:
    """One line for the person at the terminal, printed above any progress bar of ours (tqdm
    clears and redraws it); also into the log file while one is captured."""
    if _state["log"] is not None:
        _state["log"].write(line + "\n")
    if _state["relay"] is not None:
        _state["relay"](line)
        return
    stream = terminal()
    if "tqdm" in sys.modules:
        from tqdm import tqdm

        tqdm.write(line, file=stream)
    else:
        stream.write(line + "\n")
    stream.flush()


def log_beside(folder) -> Path:
    """The log file of an output folder: `<folder>.log`, beside it (a folder that is written
    atomically cannot hold its own log while it runs, and keeps no log of a failed run)."""
    folder = Path(folder).absolute()
    return folder.with_name(folder.name + ".log")


def shown_path(path) -> str:
    """`path` as a person would type it here: relative to the current folder when inside it."""
    path = Path(path).absolute()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@contextmanager
def capture(log, title: str = ""):
    """Send everything written to this process's stdout and stderr (Python's and the file
    descriptors', so that C libraries and child processes are caught too) into `log`,
    appended under a header line with the time and `title`, until the block ends; our own
    lines (`echo`) still reach the terminal. A run that wrote nothing (a mistake found before
    any library ran) or was refused (a UserError: bad input) leaves no log behind. Yields the
    log's path, or None where nothing is captured: --verbose, a log that cannot be written
    (the tool then says why its output folder cannot be), or a capture already active (here
    or in the process that started this one, whose log this process's output already goes
    to)."""
    if log is None or verbose() or _state["log"] is not None or os.environ.get(LOG):
        yield current_log()
        return
    log = Path(log).absolute()
    before = log.stat().st_size if log.exists() else None
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        f = open(log, "a", buffering=1, encoding="utf-8",  # noqa: SIM115 - closed below
                 errors="replace")
    except OSError:
        yield None
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    with f:
        f.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S')} {title}".rstrip() + "\n")
        f.flush()
        header_end = f.tell()
        saved = os.dup(1), os.dup(2)
        streams = sys.stdout, sys.stderr
        # our lines keep going where stderr went: the saved descriptor when Python's stderr
        # is descriptor 2, else the object itself (a test runner's buffer)
        owned = _writes_to(sys.stderr, 2)
        _state["terminal"] = (os.fdopen(os.dup(saved[1]), "w", buffering=1) if owned
                              else sys.stderr)
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        sys.stdout = sys.stderr = f
        _state["log"] = f
        os.environ[LOG] = str(log)
        refused = False
        try:
            yield log
        except UserError:
            refused = True  # bad input: its one message says it all, and nothing stays
            raise
        finally:
            f.flush()
            sys.stdout, sys.stderr = streams
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if owned:
                _state["terminal"].close()
            _state.update(terminal=None, log=None)
            os.environ.pop(LOG, None)
            if refused or os.fstat(f.fileno()).st_size == header_end:  # nothing new
                if before is None:
                    log.unlink(missing_ok=True)
                else:
                    f.truncate(before)


def current_log() -> Path | None:
    """The log file this process's output goes to (a `capture` here or in the process that
    started it), if any."""
    return Path(os.environ[LOG]) if os.environ.get(LOG) else None


def _writes_to(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):
        return False


def tail(log, lines: int = 15) -> str:
    """The last `lines` lines of a log file as a person reads them (a progress bar's redraws,
    separated by carriage returns, reduced to the last one)."""
    try:
        text = Path(log).read_text(errors="replace")
    except OSError:
        return ""
    kept = [line.split("\r")[-1].rstrip() for line in text.splitlines()]
    return "\n".join([line for line in kept if line.strip()][-lines:])
