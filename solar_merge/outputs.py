"""Output folders that are either complete or visibly not, and never eat a user's files.

Every stage writes into `<parent>/.<name>.partial`, then renames it to `<name>` with a
completion marker (MARKER) holding the hash of the resolved config (and of the inputs'
contents) that produced it: a tool's own hash, or the stage hash a recipe passed it. A folder
without the marker (or with another hash) is never taken for finished. The marker is the
folder's one completion record: a recipe adds what the stage cost to it (`record`). The
partial folder survives a crash so that training can resume from its checkpoints; a lock
file keeps two runs apart.

What may be deleted: only folders solar-merge made. An existing output folder is replaced
only when it carries our completion marker (or is empty); any other folder is refused unless
the user typed `--overwrite` (`overwriting()`). A hidden partial folder is removed or reused
only when it carries the ownership file we put in every partial folder we create.
"""

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.testhooks import crash_point

MARKER = "solar_merge_complete.json"
OWNED = ".solar_merge_partial"  # inside every partial folder we create
_OVERWRITE: ContextVar[bool] = ContextVar("solar_merge_overwrite", default=False)


def config_hash(resolved) -> str:
    """Stable short hash of a JSON-able config (key order does not matter)."""
    text = json.dumps(resolved, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_complete(out_dir, expected_hash: str | None = None) -> bool:
    """The folder is finished (for `expected_hash`, if given)."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return False
    if expected_hash is None:
        return True
    found = read_record(out_dir)
    return found is not None and found.get("config_hash") == expected_hash


def read_record(out_dir) -> dict | None:
    """The completion record of a finished folder: {"config_hash", ...what `record` added}."""
    try:
        found = json.loads((Path(out_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def record(out_dir, **facts) -> None:
    """Add `facts` (JSON values) to a finished folder's completion record, atomically."""
    found = read_record(out_dir)
    if found is None:
        raise UserError(f"{out_dir} is not a finished output (no {MARKER})",
                        fix="run the stage that writes it")
    marker = Path(out_dir) / MARKER
    tmp = marker.with_name(f".{MARKER}.tmp")
    tmp.write_text(json.dumps({**found, **facts}) + "\n")
    tmp.replace(marker)


def partial_dir(out_dir) -> Path:
    out_dir = Path(out_dir).absolute()
    return out_dir.parent / f".{out_dir.name}.partial"


# -- what the inputs hold ----------------------------------------------------------------------

_SAMPLES, _SAMPLE_BYTES = 16, 64 * 1024
_SMALL = 64 * 2**20
_WEIGHTS = {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf"}
# Files of a model folder that do not change what the model computes.
_NOT_CONTENT = {MARKER, "README.md", "loss.jsonl", "loss.png", "resolved_hash", "steps.json"}


def fingerprint(path) -> str:
    """A short hash of what a local input holds, so that a result is only "complete" for the
    exact inputs it was made from.

    - a file up to 64 MiB (configs, tokenizers, most data sets): sha256 of its bytes;
    - a larger weights file (.safetensors, .bin, ...): its size and 16 samples of 64 KiB spread
      over it. Training rewrites every block, so retraining in place changes the samples, and
      a 5 GB shard costs ~1 MiB of reading instead of 5 GB;
    - a larger data file: size, samples and its modification time (an edit can be local);
    - a folder: every file below it by relative name, as above (hidden files, checkpoints and
      our own bookkeeping excluded);
    - anything else (a Hub id, a path that does not exist yet): the text itself.
    """
    p = Path(os.path.expanduser(str(path)))
    h = hashlib.sha256()
    if p.is_file():
        _hash_file(h, p)
    elif p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file()
                       and not any(part.startswith(".") for part in f.relative_to(p).parts)
                       and not f.relative_to(p).parts[0].startswith("checkpoint-")
                       and f.name not in _NOT_CONTENT)
        for f in files:
            h.update(str(f.relative_to(p)).encode() + b"\0")
            _hash_file(h, f)
    else:
        h.update(b"name:" + str(path).encode())
    return h.hexdigest()[:16]


def _hash_file(h, f: Path) -> None:
    stat = f.stat()
    h.update(str(stat.st_size).encode() + b"\0")
    with open(f, "rb") as fh:
        if stat.st_size <= _SMALL:
            for block in iter(lambda: fh.read(2**20), b""):
                h.update(block)
            return
        if f.suffix not in _WEIGHTS:
            h.update(str(stat.st_mtime_ns).encode())
        for i in range(_SAMPLES):
            fh.seek((stat.st_size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
            h.update(fh.read(_SAMPLE_BYTES))


# -- owning output folders ---------------------------------------------------------------------

@contextmanager
def overwriting(enabled: bool = True):
    """While active, output folders that solar-merge did not write may be replaced: only the
    CLI's `--overwrite` (typed by the user) turns this on."""
    token = _OVERWRITE.set(bool(enabled))
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def overwrite_allowed() -> bool:
    """True while `overwriting()` is active (the user typed --overwrite)."""
    return _OVERWRITE.get()


def check_replaceable(out_dir) -> None:
    """Refuse an existing output that is not ours to replace (see the module doc)."""
    out_dir = Path(out_dir).absolute()
    if _OVERWRITE.get() or not (out_dir.exists() or out_dir.is_symlink()):
        return
    what = None
    if out_dir.is_symlink() or not out_dir.is_dir():
        what = "is a file or a link, not an output folder of solar-merge"
    elif not is_complete(out_dir) and any(out_dir.iterdir()):
        what = "already exists, holds files, and was not written by solar-merge"
    if what:
        raise UserError(f"output folder {out_dir} {what}; nothing was written or deleted",
                        fix="choose another output folder, or add --overwrite to replace it "
                            "(its current contents will be deleted)")


def owns_partial(work) -> bool:
    """Ours: it holds the ownership file, or (finished, between the marker and the rename)
    our completion marker."""
    return (Path(work) / OWNED).is_file() or (Path(work) / MARKER).is_file()


def check_partial(out_dir) -> None:
    """Refuse `out_dir` when its hidden partial folder exists and is not ours (see the module
    doc): a run must never write into, or delete, a folder someone else made."""
    work = partial_dir(out_dir)
    if work.exists() and not owns_partial(work):
        raise UserError(f"{work} exists but was not created by solar-merge (no ownership file "
                        "in it), so it is left alone",
                        fix="if it is an old solar-merge work folder, it is safe to delete: "
                            f"rm -r '{work}'; otherwise choose another output folder")


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
def atomic_output(out_dir, resolved_hash: str, *, keep_partial=False):
    """Yield a work folder; on success it becomes `out_dir`, marked complete.

    keep_partial=True reuses an existing partial folder (training checkpoints to resume);
    otherwise a leftover partial folder from a crashed run is cleared first. keep_partial may
    also be a test of the work folder, `resumable(work) -> bool`: a failed run keeps its
    partial folder only when it holds something to resume from. An existing `out_dir` that
    solar-merge did not complete is refused before anything runs.
    """
    out_dir = Path(out_dir).absolute()
    check_replaceable(out_dir)
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
        check_partial(out_dir)
        work = partial_dir(out_dir)
        if work.exists() and not keep_partial:
            shutil.rmtree(work)
        if not work.exists():  # made under a temporary name, so it never exists unowned
            tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
            (tmp / OWNED).touch()
            tmp.rename(work)
        crash_point("work-created")
        try:
            yield work
        except BaseException:
            resumable = keep_partial(work) if callable(keep_partial) else keep_partial
            if not resumable:  # nothing in it to resume from: leave no trace
                shutil.rmtree(work, ignore_errors=True)
            raise
        crash_point("before-marker")
        check_replaceable(out_dir)  # still ours to replace (a user may have made it since)
        (work / MARKER).write_text(json.dumps({"config_hash": resolved_hash}) + "\n")
        (work / OWNED).unlink()
        if out_dir.is_dir() and not out_dir.is_symlink():
            # An older result: move it aside first so that no moment exists where out_dir
            # holds a mix of both.
            stale = out_dir.parent / f".{out_dir.name}.stale"
            if stale.exists():
                shutil.rmtree(stale)
            out_dir.rename(stale)
            crash_point("between-renames")
            work.rename(out_dir)
            shutil.rmtree(stale)
        else:
            if out_dir.is_symlink() or out_dir.exists():  # --overwrite of a link or a file
                out_dir.unlink()
            work.rename(out_dir)
    finally:
        # The lock file goes too (stock filelock leaves it): an output root holds only outputs.
        Path(lock.lock_file).unlink(missing_ok=True)
        lock.release()


def portable(value, root):
    """`value` (a config: dicts, lists, strings) with absolute local paths rewritten relative
    to `root`, so that configs written into an output folder (and pushed) do not carry
    `/home/...` paths. Hub ids and relative paths are left as they are."""
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v, root) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        return os.path.relpath(value, Path(root).absolute())
    return value


# Keys whose values (or list items) name local files or folders in our configs and recipes.
PATH_KEYS = frozenset({"model", "ref_model", "base_model", "path", "file", "models",
                       "datasets", "text", "problems", "qa", "data", "seed",
                       "chat_template_path", "include_path"})


def relocate(config, source_dir, target_dir, *, names=()):
    """`config` for a copy moved from `source_dir` to `target_dir`: every existing local path
    under PATH_KEYS (absolute, or relative to `source_dir`) rewritten relative to
    `target_dir`. `names` (a recipe's stage names) and anything that is not a local path
    (Hub ids) stay as they are."""
    source_dir, target_dir = Path(source_dir).absolute(), Path(target_dir).absolute()

    def path(value):
        if not isinstance(value, str) or value in names or "\n" in value:
            return value
        if value.split("/")[0] in names:  # `<stage>/<file>`: a synth_math stage's data file
            return value
        local = Path(os.path.expanduser(value))
        local = Path(os.path.normpath(local if local.is_absolute() else source_dir / local))
        return os.path.relpath(local, target_dir) if local.exists() else value

    def move(value, key=None):
        if isinstance(value, dict):
            return {k: move(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [move(v, key) for v in value]
        return path(value) if key in PATH_KEYS else value

    return move(config)
