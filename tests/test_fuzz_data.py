"""Issue 15: no data file crashes us, proven by fuzzing.

Random bytes, truncations, bit flips and line edits of real .jsonl/.json/.parquet/.txt files,
given to the readers (data.load_records: records or a UserError naming the file, within a
memory bound) and, for a sample, to `train` (the properties of fuzzing.check_entry).
"""

import io
import json
import tempfile
import tracemalloc
from pathlib import Path

import pytest
from fuzzing import (
    MEMORY_BOUND,
    TRIED,
    check_entry,
    edit_text,
    examples,
    offline,
    text_edits,
    warm_imports,
)
from hypothesis import example, given
from hypothesis import strategies as st

from solar_merge.data import load_records
from solar_merge.errors import UserError

ROWS = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."}
        for i in range(6)]
SUFFIXES = [".jsonl", ".json", ".parquet", ".txt"]
FAST = {"logging_steps": 1, "per_device_train_batch_size": 2, "dataloader_num_workers": 0,
        "max_steps": 1, "save_strategy": "no", "seed": 7}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    offline(monkeypatch)


def valid_bytes(suffix: str) -> bytes:
    if suffix == ".jsonl":
        return "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    if suffix == ".json":
        return json.dumps({"train": ROWS}).encode()
    if suffix == ".txt":
        return "\n\n".join(r["instruction"] + " " + r["output"] for r in ROWS).encode()
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(ROWS), buf)
    return buf.getvalue()


DAMAGE = st.one_of(
    st.tuples(st.just("bytes"), st.binary(max_size=1024)),
    st.tuples(st.just("truncate"), st.integers(0, 10**6)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 7)),
                                        min_size=1, max_size=6)),
    st.tuples(st.just("edit"), text_edits()),
    st.tuples(st.just("lines"), st.lists(st.text(max_size=40) | st.sampled_from(
        ["[1, 2]", "null", '"text"', "{", "{}", '{"a": ' * 3000, "\ufeff{}", "1e999999"]),
        max_size=5)),
)


def damaged(suffix: str, damage) -> bytes:
    data = valid_bytes(suffix)
    kind, value = damage
    if kind == "bytes":
        return value
    if kind == "truncate":
        return data[:value % (len(data) + 1)]
    if kind == "flip":
        out = bytearray(data)
        for pos, bit in value:
            out[pos % len(out)] ^= 1 << bit
        return bytes(out)
    if kind == "edit":
        return edit_text(data.decode("utf-8", "replace"), value).encode("utf-8", "surrogatepass")
    return data + "\n".join(value).encode("utf-8", "surrogatepass")


REGRESSIONS = [(".jsonl", ("lines", ['{"a": ' * 3000])),    # RecursionError, not ValueError
               (".json", ("bytes", b"[" * 100_000)),          # RecursionError
               (".jsonl", ("bytes", b'{"a": 1}\n\xff\n')),    # UnicodeDecodeError, no line
               (".jsonl", ("lines", ["[1, 2]"])),             # list record after line 100
               (".parquet", ("truncate", 100)),               # ArrowInvalid (a ValueError)
               (".parquet", ("bytes", b"PAR1" + b"\0" * 8 + b"PAR1")),
               (".txt", ("bytes", b"")),                      # empty: no records
               (".json", ("bytes", b"{}"))]


@examples(ci=200, long=5000)
@given(suffix=st.sampled_from(SUFFIXES), damage=DAMAGE)
@example(suffix=".jsonl", damage=("bytes", b"".join(json.dumps(r).encode() + b"\n"
                                                    for r in ROWS * 30) + b"[1]\n"))
def test_readers(suffix, damage):
    _check_reader(suffix, damage)


@pytest.mark.parametrize("suffix,damage", REGRESSIONS, ids=[f"{s}-{d[0]}" for s, d in
                                                            REGRESSIONS])
def test_reader_regressions(suffix, damage):
    _check_reader(suffix, damage)


def _check_reader(suffix, damage):
    blob = damaged(suffix, damage)
    import pyarrow as pa

    with tempfile.TemporaryDirectory() as t:
        path = Path(t) / f"data{suffix}"
        path.write_bytes(blob)
        arrow_before = pa.total_allocated_bytes()
        tracemalloc.start()
        try:
            records = load_records(path)
        except UserError as e:
            assert str(path) in e.message and "fix:" in e.message, e.message
            records = None
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        TRIED["data readers"] += 1
        assert peak < MEMORY_BOUND and pa.total_allocated_bytes() - arrow_before < MEMORY_BOUND
        if records is not None:
            assert records and all(isinstance(r, dict) for r in records)
        assert path.read_bytes() == blob


@examples(ci=5, long=100)
@given(suffix=st.sampled_from(SUFFIXES), damage=DAMAGE)
@example(suffix=".jsonl", damage=("bytes", b'{"instruction": "a", "output": "b"}\n{oops\n'))
def test_train_on_damaged_data(tiny_model_factory, suffix, damage):
    """Damaged data through `train` (sft; cpt for .txt): refused naming the file (and the
    line for .jsonl), or trained for one step when the damage left valid records."""
    warm_imports()
    model = tiny_model_factory(seed=0)
    import yaml

    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        data = root / f"data{suffix}"
        data.write_bytes(damaged(suffix, damage))
        stage = root / "stage.yaml"
        stage.write_text(yaml.safe_dump({
            "stage": "cpt" if suffix == ".txt" else "sft", "model": str(model),
            "datasets": [str(data)], "seq_len": 32, "args": FAST}))
        code, output = check_entry("train (data)", ["train", stage, "-o", root / "out"],
                                   inputs=[data, stage, model], outputs=[root / "out"],
                                   keeps_partial=True)
        if code == 2 and damage[0] == "bytes" and b"{oops" in damage[1]:
            assert "line 2" in output, output
