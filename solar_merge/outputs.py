"""Output folders that are either complete or visibly not.

Every stage writes into `<parent>/.<name>.partial`, then renames it to `<name>` with a
completion marker holding the hash of the resolved config that produced it. A folder without
the marker (or with another hash) is never taken for finished. The partial folder survives a
crash so that training can resume from its checkpoints; a lock file keeps two runs apart.
"""

import hashlib
import json
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from solar_merge.errors import UserError

MARKER = "solar_merge_complete.json"


def config_hash(resolved) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete(out_dir, expected_hash: str | None = None) -> bool:
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    if expected_hash is None:
        return True
    try:
        return json.loads(marker.read_text())["config_hash"] == expected_hash
    except (ValueError, KeyError):
        return False


def partial_dir(out_dir) -> Path:
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.partial"


def crash_point(name: str) -> None:
    """Fault-injection for the kill tests: SIGKILL ourselves at a named point when asked."""
    if os.environ.get("SOLAR_MERGE_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _lock(out_dir: Path):
    from filelock import FileLock, Timeout

    lock = FileLock(str(out_dir.parent / f".{out_dir.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UserError(
            f"{out_dir} is being written by another solar-merge run",
            fix="wait for that run to finish, or choose another output folder",
        ) from None
    return lock


@contextmanager
def atomic_output(out_dir, resolved_hash: str, *, keep_partial: bool = False):
    """Yield a work folder; on success it becomes `out_dir`, marked complete.

    keep_partial=True reuses an existing partial folder (training checkpoints to resume);
    otherwise a leftover partial folder from a crashed run is cleared first.
    """
    out_dir = Path(out_dir).absolute()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out_dir.parent}: {e.strerror}",
                        fix="choose a writable output folder") from None
    if not os.access(out_dir.parent, os.W_OK):
        raise UserError(f"output folder {out_dir.parent} is not writable",
                        fix="choose a writable output folder or fix its permissions")
    lock = _lock(out_dir)
    try:
        work = partial_dir(out_dir)
        if work.exists() and not keep_partial:
            shutil.rmtree(work)
        work.mkdir(exist_ok=True)
        crash_point("work-created")
        try:
            yield work
        except BaseException:
            if not keep_partial:  # nothing in it to resume from: leave no trace
                shutil.rmtree(work, ignore_errors=True)
            raise
        crash_point("before-marker")
        (work / MARKER).write_text(json.dumps({"config_hash": resolved_hash}) + "\n")
        if out_dir.exists():
            # An older result (other config): move it aside first so that no moment
            # exists where out_dir holds a mix of both.
            stale = out_dir.parent / f".{out_dir.name}.stale"
            if stale.exists():
                shutil.rmtree(stale)
            out_dir.rename(stale)
            crash_point("between-renames")
            work.rename(out_dir)
            shutil.rmtree(stale)
        else:
            work.rename(out_dir)
    finally:
        lock.release()
