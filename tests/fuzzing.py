"""What tests/test_fuzz_*.py share: hypothesis profiles, and the properties every entry point
keeps on any input.

Profiles: `ci` (the default: few examples, derandomized, so the suite stays fast and never
flaky) and `long` (SOLAR_MERGE_FUZZ=long: many random examples, for benchmarks/fuzz.py or a
manual run). SOLAR_MERGE_FUZZ_REPORT=FILE writes how many inputs each entry point was given.

`check_entry` runs one CLI command in-process (click's CliRunner: a subprocess costs 1-7 s
here) and asserts: exit code 0 or 2; no traceback; no input file modified (sha256 before and
after); nothing complete-looking left by a failed command (no completion marker, no
leftover hidden partial folder of a merge); Python memory (tracemalloc peak) under a bound.
"""

import atexit
import hashlib
import json
import os
import tracemalloc
from collections import Counter
from pathlib import Path

from click.testing import CliRunner
from hypothesis import HealthCheck, Phase, settings

from solar_merge.cli import main
from solar_merge.outputs import MARKER, partial_dir

PROFILE = os.environ.get("SOLAR_MERGE_FUZZ", "ci")
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
          HealthCheck.function_scoped_fixture, HealthCheck.large_base_example]
settings.register_profile("ci", deadline=None, derandomize=True, database=None,
                          suppress_health_check=_QUIET, print_blob=True)
settings.register_profile("long", deadline=None, suppress_health_check=_QUIET,
                          print_blob=True)
settings.load_profile(PROFILE)
if os.environ.get("SOLAR_MERGE_FUZZ_AS_LIMIT"):
    # benchmarks/fuzz.py: a runaway allocation fails its example instead of OOM-killing the run
    import resource

    _limit = int(float(os.environ["SOLAR_MERGE_FUZZ_AS_LIMIT"]) * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (_limit, _limit))

# Python-level allocations of one command (tracemalloc: torch's own tensor memory is not
# seen, every file read, JSON/YAML parse and record list is). A tiny model's files are
# ~200 KB: any reader that trusts a length field or expands aliases goes far past this.
MEMORY_BOUND = 128 * 2**20
# A whole pipeline or an evaluation holds more by design (lm-eval's task index alone is
# ~100 MiB of Python objects), still independent of the input's size.
PIPELINE_MEMORY_BOUND = 512 * 2**20

TRIED: Counter = Counter()  # entry point -> inputs given to it


def examples(ci: int, long: int) -> settings:
    """max_examples for one property, by profile; 0: only its @example cases."""
    n = ci if PROFILE == "ci" else long
    return settings(max_examples=n) if n else settings(phases=[Phase.explicit])


def digests(*roots) -> dict[str, str]:
    out = {}
    for root in roots:
        root = Path(root)
        paths = [root] if root.is_file() else sorted(root.rglob("*")) if root.exists() else []
        for p in paths:
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_entry(name: str, argv: list, *, inputs: list, outputs: list = (),
                keeps_partial: bool = False, input_text: str | None = None,
                memory_bound: int = MEMORY_BOUND):
    """Run `solar-merge ARGV` and assert the properties above; return (exit code, output).

    `outputs` are folders (or files) the command would write; `keeps_partial` for training,
    whose partial folder holds checkpoints to resume from (still never complete-looking)."""
    before = digests(*inputs)
    existed = {str(o) for o in outputs if Path(o).exists()}
    tracemalloc.start()
    try:
        result = CliRunner().invoke(main, [str(a) for a in argv], input=input_text)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    TRIED[name] += 1
    output = result.output
    crash = None
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        crash = "".join(traceback.format_exception(*result.exc_info))
    assert crash is None and result.exit_code in (0, 2), (
        f"{name}: exit {result.exit_code}\n{output[-3000:]}\n{crash or ''}")
    assert "Traceback" not in output, output[-3000:]
    assert digests(*inputs) == before, f"{name} modified an input"
    assert peak < memory_bound, f"{name}: {peak / 2**20:.0f} MiB of Python memory"
    if result.exit_code == 2:
        assert "fix:" in output or "Usage:" in output, output[-2000:]
        for out in outputs:
            out = Path(out)
            if str(out) not in existed:
                assert not (out / MARKER).exists(), f"{name}: {out} looks complete"
                if not keeps_partial:
                    assert not partial_dir(out).exists(), f"{name}: left {partial_dir(out)}"
                if out.suffix in (".yaml", ".yml"):
                    assert not out.exists(), f"{name}: wrote {out} and failed"
    return result.exit_code, output


def _report():
    path = os.environ.get("SOLAR_MERGE_FUZZ_REPORT")
    if not path or not TRIED:
        return
    old = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    for k, v in TRIED.items():
        old[k] = old.get(k, 0) + v
    Path(path).write_text(json.dumps(old, indent=1, sort_keys=True) + "\n")


atexit.register(_report)


def warm_imports() -> None:
    """Import the heavy libraries before any traced command: tracemalloc would otherwise
    trace (and slow down tenfold) the import of torch, transformers, TRL and mergekit, which
    every test process pays once anyway."""
    import mergekit.merge
    import mergekit.options  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import trl

    trl.SFTTrainer, trl.DPOTrainer, trl.SFTConfig, trl.DPOConfig  # noqa: B018 - lazy imports
    try:  # the eval stage's planner checks task names with lm-eval (2.7 s to import)
        import lm_eval.tasks  # noqa: F401
    except ImportError:
        pass


def offline(monkeypatch):
    """No test here may wait on the network: a mutated `owner/name` would retry for 25 s."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


# -- random documents and mutations of real ones ---------------------------------------------

def yamlish(keys=()):
    """Values a YAML file can hold; mapping keys drawn partly from `keys` (the schema's own,
    so that random documents get past the first check)."""
    from hypothesis import strategies as st

    scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
               | st.text(max_size=12)
               | st.sampled_from(["", "~", "a/b", "../x", "/", "x.yaml", "1e-4", "nan", "-1",
                                  "passthrough", "solar_average", "sft", "dpo", "train"]))
    key = st.sampled_from(list(keys)) | st.text(max_size=8) if keys else st.text(max_size=8)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(key, inner, max_size=4), max_leaves=12)


def _paths(value, prefix=()):
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, prefix + (i,))


def mutations(keys=()):
    """A list of (where, how, value) edits for `mutate`."""
    from hypothesis import strategies as st

    how = st.sampled_from(["replace", "replace", "delete", "add", "duplicate", "stringify"])
    return st.lists(st.tuples(st.integers(0, 10**6), how, yamlish(keys)), min_size=1,
                    max_size=4)


def mutate(doc, edits):
    """`doc` (a YAML document) after `edits`: each picks one node (by index among all nodes)
    and replaces it, deletes it, adds a key or item next to it, duplicates it or turns it into
    its string form."""
    import copy

    doc = copy.deepcopy(doc)
    for where, how, value in edits:
        paths = list(_paths(doc))
        path = paths[where % len(paths)]
        if not path:
            doc = value if how == "replace" else doc
            continue
        parent = doc
        for p in path[:-1]:
            parent = parent[p]
        last = path[-1]
        if how == "replace":
            parent[last] = value
        elif how == "delete":
            del parent[last]
        elif how == "add":
            if isinstance(parent, dict):
                parent[str(value)[:12]] = value
            else:
                parent.insert(last, value)
        elif how == "duplicate" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
        else:
            parent[last] = str(parent[last])
    return doc


def text_edits():
    """(position, characters removed, text inserted) edits of a file's text."""
    from hypothesis import strategies as st

    special = st.sampled_from([":", "- ", "\n", "  ", "[", "{", "*a", "&a", "'", '"', "#",
                               "!!python/name:os.system", "---\n", "\t"])
    return st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 40),
                              st.text(max_size=20) | special), min_size=1, max_size=5)


def edit_text(text: str, edits) -> str:
    for pos, cut, insert in edits:
        pos = pos % (len(text) + 1)
        text = text[:pos] + insert + text[pos + cut:]
    return text


def _alias_bomb() -> str:
    """577 bytes of YAML whose aliases stand for 10**9 values, inside a field every schema
    accepts: expanded, it would keep `validate` busy for hours; the reader must refuse it."""
    level = "&a0 [x, x, x, x, x, x, x, x, x, x]"
    for k in range(1, 9):
        level = f"&a{k} [{level}" + f", *a{k - 1}" * 9 + "]"
    return ("stages:\n  up:\n    merge:\n      merge_method: passthrough\n      parameters:\n"
            f"        t: {level}\n      models: [{{model: m}}]\n")


ALIAS_BOMB = _alias_bomb()
