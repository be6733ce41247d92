"""Atomic outputs: real SIGKILLs at several points of a merge, locks, nothing half-done."""

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from solar_merge.errors import UserError
from solar_merge.merging import merge
from solar_merge.outputs import atomic_output, config_hash, is_complete, partial_dir

CLI = [sys.executable, "-m", "solar_merge.cli"]


def test_failure_leaves_nothing_complete(tmp_path):
    out = tmp_path / "x"
    with pytest.raises(RuntimeError), atomic_output(out, "h1") as work:
        (work / "weights").write_text("half")
        raise RuntimeError("crash")
    assert not out.exists() and not partial_dir(out).exists()  # nothing to resume: cleared
    with pytest.raises(RuntimeError), atomic_output(out, "h1", keep_partial=True) as work:
        (work / "checkpoint-1").mkdir()
        raise RuntimeError("crash")
    assert (partial_dir(out) / "checkpoint-1").is_dir() and not is_complete(partial_dir(out))
    with atomic_output(out, "h1") as work:  # the lock was released
        (work / "weights").write_text("full")
    assert is_complete(out, "h1") and not is_complete(out, "other")
    assert not partial_dir(out).exists()


def test_replacing_an_older_result(tmp_path):
    out = tmp_path / "x"
    for digest, text in (("a", "old"), ("b", "new")):
        with atomic_output(out, digest) as work:
            (work / "f").write_text(text)
    assert (out / "f").read_text() == "new" and is_complete(out, "b")


def test_second_writer_is_refused_with_a_clear_message(tmp_path):
    out = tmp_path / "x"
    with (atomic_output(out, "h"), pytest.raises(UserError, match="being written by another"),
          atomic_output(out, "h")):
        pass


def test_config_hash_ignores_key_order():
    assert config_hash({"a": 1, "b": [1, 2]}) == config_hash({"b": [1, 2], "a": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


def _config(tmp_path, a, b):
    path = tmp_path / "merge.yaml"
    path.write_text(yaml.safe_dump({
        "merge_method": "solar_slerp", "dtype": "float32", "parameters": {"t": 0.3},
        "models": [{"model": str(a)}, {"model": str(b)}]}))
    return path


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".json") and p.name != "solar_merge_complete.json"}


@pytest.mark.parametrize("point", ["work-created", "merged", "before-marker", "between-renames",
                                   "timed"])
def test_sigkill_then_rerun_gives_the_uninterrupted_result(point, tiny_model_factory, tmp_path):
    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    config = _config(tmp_path, a, b)
    reference = merge(config, tmp_path / "reference")
    out = tmp_path / "out"
    if point == "between-renames":  # an older result is being replaced when the kill lands
        merge(config, out)
        (out / "solar_merge_complete.json").write_text('{"config_hash": "older"}')
    env = {**os.environ, "SOLAR_MERGE_KILL_AT": point}
    proc = subprocess.Popen(CLI + ["yaml", str(config), str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if point == "timed":  # whenever the partial folder appears: mid-merge, or just after
        deadline = time.time() + 60
        while not partial_dir(out).exists() and time.time() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
        assert proc.wait() == -signal.SIGKILL
    # Whatever the kill interrupted, nothing may look finished unless it is.
    if is_complete(out):
        assert _files(out) == _files(reference)
    assert not is_complete(partial_dir(out)) or point in ("between-renames", "timed")
    merge(config, out)  # the re-run
    assert is_complete(out) and _files(out) == _files(reference)
