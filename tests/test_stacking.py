"""Configs that only slice and stack: written by copying tensor bytes (solar_merge.stacking),
the same tensors and config as stock mergekit-yaml, with every promise of the mergekit path."""

import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from solar_merge import stacking
from solar_merge.checkpoints import INDEX_FILE, read_safetensors_header
from solar_merge.cli import main
from solar_merge.merging import merge
from solar_merge.outputs import MARKER, is_complete, partial_dir

CLI = [sys.executable, "-m", "solar_merge.cli"]
FAST = "copying tensor bytes"


def _config(model, ranges, **extra) -> dict:
    return {"slices": [{"sources": [{"model": str(model), "layer_range": list(r)}]}
                       for r in ranges], "merge_method": "passthrough", **extra}


def _write(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _tensors(folder: Path) -> dict:
    """name -> (dtype, shape, sha256 of the bytes, shard), read from the files' own headers."""
    index = folder / INDEX_FILE
    shards = (sorted(set(json.loads(index.read_text())["weight_map"].values()))
              if index.is_file() else ["model.safetensors"])
    out = {}
    for shard in shards:
        file = folder / shard
        header = read_safetensors_header(file)
        header.pop("__metadata__", None)
        start = 8 + int.from_bytes(file.read_bytes()[:8], "little")
        data = file.read_bytes()
        for name, t in header.items():
            begin, end = t["data_offsets"]
            digest = hashlib.sha256(data[start + begin:start + end]).hexdigest()
            out[name] = (t["dtype"], tuple(t["shape"]), digest, shard)
    return out


def _loaded(folder: Path) -> dict:
    """What the safetensors library itself reads from the folder (headers padded or not)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _mergekit_yaml(config: Path, out: Path, *options) -> None:
    """Stock `mergekit-yaml CONFIG OUT --clone-tensors --copy-tokenizer` (its click command,
    in this process: no solar-merge fix applies)."""
    from mergekit.scripts.run_yaml import main as mergekit_yaml

    CliRunner().invoke(mergekit_yaml, [str(config), str(out), "--clone-tensors",
                                       "--copy-tokenizer", *options])


def _fast(config, out, caplog, **kw) -> Path:
    with caplog.at_level(logging.INFO, logger="solar_merge.merging"):
        result = merge(config, out, **kw)
    assert FAST in caplog.text, caplog.text
    caplog.clear()
    return result


def _same_tensors(ours: Path, theirs: Path, *, tokenizer: bool = True) -> None:
    a, b = _tensors(ours), _tensors(theirs)
    assert {k: v[:3] for k, v in a.items()} == {k: v[:3] for k, v in b.items()}
    # The same shards, each holding the same tensor contents (two copies of one input tensor
    # may sit in either order around a shard boundary: mergekit's scheduler orders such ties
    # by its task graph's set iteration).
    def by_shard(x):
        out = {}
        for dtype, shape, digest, shard in x.values():
            out.setdefault(shard, Counter())[dtype, shape, digest] += 1
        return out

    assert by_shard(a) == by_shard(b)
    index_a, index_b = ours / INDEX_FILE, theirs / INDEX_FILE
    assert index_a.is_file() == index_b.is_file()
    if index_a.is_file():
        ia, ib = json.loads(index_a.read_text()), json.loads(index_b.read_text())
        assert ia["metadata"] == ib["metadata"] and set(ia["weight_map"]) == set(ib["weight_map"])
    loaded_a, loaded_b = _loaded(ours), _loaded(theirs)
    assert set(loaded_a) == set(loaded_b)
    for name, t in loaded_a.items():
        assert t.dtype == loaded_b[name].dtype and t.equal(loaded_b[name]), name
    for f in stacking.TOKENIZER_FILES if tokenizer else ():
        assert (ours / f).is_file() == (theirs / f).is_file(), f
        if (ours / f).is_file():
            assert (ours / f).read_bytes() == (theirs / f).read_bytes(), f


# -- the same tensors as stock mergekit ------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_dus_gives_stock_mergekits_tensors_and_config(arch, tied, tiny_model_factory,
                                                      tmp_path, caplog):
    model = tiny_model_factory(arch=arch, tied=tied)
    # the config `solar-merge dus MODEL --drop 1 -o` writes: layers 1 and 2 occur twice
    result = CliRunner().invoke(main, ["dus", str(model), "--drop", "1", "-o",
                                       str(tmp_path / "dus.yaml")])
    assert result.exit_code == 0, result.output
    config = tmp_path / "dus.yaml"
    ours = _fast(config, tmp_path / "ours", caplog, kind="dus")
    _mergekit_yaml(config, tmp_path / "stock")
    # stock mergekit stops at config.json for qwen2 (below), before it copies the tokenizer
    _same_tensors(ours, tmp_path / "stock", tokenizer=arch != "qwen2")
    assert ("lm_head.weight" in _tensors(ours)) is not tied  # mergekit skips a tied lm_head
    mergekit_path = merge(config, tmp_path / "mergekit-path", kind="dus", fast=False)
    _same_tensors(ours, mergekit_path)
    written = json.loads((ours / "config.json").read_text())
    assert written == json.loads((mergekit_path / "config.json").read_text())
    assert written["num_hidden_layers"] == 6
    if arch == "qwen2":  # stock mergekit cannot save a config with layer_types (NOTES.md)
        assert not (tmp_path / "stock" / "config.json").exists()
        assert written["layer_types"] == ["full_attention"] * 6
    else:
        assert written == json.loads((tmp_path / "stock" / "config.json").read_text())
    assert (ours / "mergekit_config.yml").read_text() == \
        (mergekit_path / "mergekit_config.yml").read_text()


def test_shards_and_index_follow_out_shard_size(tiny_model_factory, tmp_path, caplog):
    """Three overlapping slices of an untied Qwen2 (layer_types re-sliced), cut into shards of
    at most 20 kB as mergekit cuts them."""
    model = tiny_model_factory(arch="qwen2", tied=False)
    cfg = json.loads((model / "config.json").read_text())
    types = ["sliding_attention", "full_attention"] * 2
    shaped = tmp_path / "model"
    shutil.copytree(model, shaped)
    (shaped / "config.json").write_text(json.dumps({**cfg, "layer_types": types}))
    config = _write(tmp_path / "c.yaml", _config(shaped, [(0, 2), (1, 3), (2, 4)],
                                                 dtype="float32"))
    ours = _fast(config, tmp_path / "ours", caplog, options={"out_shard_size": 20_000})
    _mergekit_yaml(config, tmp_path / "stock", "--out-shard-size", "20K")
    _same_tensors(ours, tmp_path / "stock", tokenizer=False)
    shards = sorted(p.name for p in ours.glob("*.safetensors"))
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for name in shards:  # at most the limit, unless one tensor alone is larger
        pieces = [v for v in _tensors(ours).values() if v[3] == name]
        size = (ours / name).stat().st_size - 8 - read_header_length(ours / name)
        assert size <= 20_000 or len(pieces) == 1
    written = json.loads((ours / "config.json").read_text())
    assert written["layer_types"] == types[0:2] + types[1:3] + types[2:4]
    assert written["num_hidden_layers"] == 6


def read_header_length(file: Path) -> int:
    return int.from_bytes(file.read_bytes()[:8], "little")


def _shareable_blocks(source: Path, output: Path) -> int:
    """Whole blocks of output tensors that sit at their source offset modulo the block size
    (DUS m=1 of 4 layers: output layer i < 3 is layer i, else i - 2)."""
    def layout(file):
        header = read_safetensors_header(file)
        header.pop("__metadata__", None)
        start = 8 + read_header_length(file)
        return {name: start + t["data_offsets"][0] for name, t in header.items()}, header

    src, _ = layout(source)
    out, header = layout(output)
    total = 0
    for name, at in out.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        source_name = name if layer is None or int(layer) < 3 else name.replace(
            f"layers.{layer}.", f"layers.{int(layer) - 2}.")
        if (at - src[source_name]) % stacking.BLOCK == 0:
            begin, end = header[name]["data_offsets"]
            total += (end - begin) // stacking.BLOCK
    return total


def test_headers_line_tensors_up_with_their_source_blocks(tiny_model_factory, tmp_path,
                                                          caplog):
    """The header is padded so that tensor bytes sit at their source offset modulo 4096:
    whole blocks can then be shared on filesystems with reflinks."""
    model = tiny_model_factory(arch="llama", tied=False)
    config = _write(tmp_path / "c.yaml", _config(model, [(0, 3), (1, 4)], dtype="float32"))
    ours = _fast(config, tmp_path / "ours", caplog)
    _mergekit_yaml(config, tmp_path / "stock")
    _same_tensors(ours, tmp_path / "stock")
    assert (8 + read_header_length(ours / "model.safetensors")) % 8 == 0
    shared = _shareable_blocks(model / "model.safetensors", ours / "model.safetensors")
    assert shared >= 24  # at least the embeddings and lm_head: 384 x 32 fp32 = 12 blocks each
    assert shared > _shareable_blocks(model / "model.safetensors",
                                      tmp_path / "stock" / "model.safetensors")


# -- which configs qualify -------------------------------------------------------------------

def test_what_is_not_a_pure_copy_goes_to_mergekit(tiny_model, tmp_path, caplog):
    base = _config(tiny_model, [(0, 3), (1, 4)])
    scaled = _config(tiny_model, [(0, 3), (1, 4)])
    scaled["slices"][1]["sources"][0]["parameters"] = {"scale": 0.5}
    assert "scale" in stacking.why_not(scaled, {})
    assert stacking.why_not({**base, "merge_method": "linear"}, {})
    assert stacking.why_not({**base, "tokenizer_source": "base"}, {})
    assert stacking.why_not(base, {"safe_serialization": False})
    assert stacking.why_not(base, {"out_shard_size": 10**9, "copy_tokenizer": True}) is None
    two = _config(tiny_model, [(0, 2)])
    two["slices"][0]["sources"].append({"model": str(tiny_model), "layer_range": [2, 4]})
    assert "one" in stacking.why_not(two, {})

    # a dtype change converts every tensor: mergekit runs it, and says why
    with caplog.at_level(logging.INFO, logger="solar_merge.merging"):
        out = merge({**base, "dtype": "bfloat16"}, tmp_path / "bf16")
    assert "merging with mergekit" in caplog.text and "converts" in caplog.text
    assert {v[0] for v in _tensors(out).values()} == {"BF16"}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="solar_merge.merging"):
        merge(scaled, tmp_path / "scaled")
    assert "merging with mergekit" in caplog.text and FAST not in caplog.text


def test_tokenizer_files_as_copy_tokenizer_leaves_them(tiny_model, tmp_path, caplog):
    bare = tmp_path / "bare"  # no tokenizer at all: mergekit fails to load one, writes none
    bare.mkdir()
    for f in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(tiny_model / f, bare / f)
    config = _write(tmp_path / "c.yaml", _config(bare, [(0, 3), (1, 4)]))
    ours = _fast(config, tmp_path / "ours", caplog)
    _mergekit_yaml(config, tmp_path / "stock")
    _same_tensors(ours, tmp_path / "stock")  # the tokenizer files too: none on either side
    assert not (ours / "generation_config.json").exists()
    (bare / "tokenizer.json").write_bytes((tiny_model / "tokenizer.json").read_bytes())
    with pytest.raises(stacking.Unstackable, match="re-serialised"):
        stacking.plan(_config(bare, [(0, 3), (1, 4)]))


def test_dus_run_says_which_path_ran_and_no_fast_runs_mergekit(tiny_model, tmp_path):
    fast = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1",
                                     "--run", str(tmp_path / "fast")])
    assert fast.exit_code == 0, fast.output
    assert fast.output.count(FAST) == 1
    slow = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1",
                                     "--run", str(tmp_path / "slow"), "--no-fast"])
    assert slow.exit_code == 0, slow.output
    assert "merging with mergekit (--no-fast)" in slow.output and FAST not in slow.output
    _same_tensors(tmp_path / "fast", tmp_path / "slow")
    scaled = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1", "--scale-overlap",
                                       "0.5", "--run", str(tmp_path / "scaled")])
    assert scaled.exit_code == 0, scaled.output
    assert "merging with mergekit (slices[1] sets parameters" in scaled.output


def test_yaml_takes_the_fast_path_and_no_fast(tiny_model, tmp_path):
    config = _write(tmp_path / "dus.yaml", _config(tiny_model, [(0, 3), (1, 4)]))
    result = CliRunner().invoke(main, ["yaml", str(config), str(tmp_path / "a")])
    assert result.exit_code == 0 and FAST in result.output, result.output
    result = CliRunner().invoke(main, ["yaml", str(config), str(tmp_path / "b"), "--no-fast"])
    assert result.exit_code == 0 and "merging with mergekit (--no-fast)" in result.output
    result = CliRunner().invoke(main, ["yaml", str(config), str(tmp_path / "c"),
                                       "--out-shard-size", "1K"])  # a mergekit option
    assert result.exit_code == 0 and FAST in result.output, result.output
    assert len(list((tmp_path / "c").glob("model-*-of-*.safetensors"))) > 1
    assert "does not use" not in result.output  # the copy honours the shard size
    result = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1", "--run",
                                       str(tmp_path / "d"), "-j", "2", "--async-write"])
    assert result.exit_code == 0 and FAST in result.output, result.output
    assert "the byte copy does not use async_write, num_threads" in result.output
    assert "--no-fast" in result.output.split("does not use")[1]


def test_growth_presets_copy_bytes_and_expand_blocks_compute(tiny_model_factory, tmp_path):
    model = tiny_model_factory(arch="mistral", tied=False)
    # G_stack: the whole model twice (every layer repeated), the same tensors as stock
    result = CliRunner().invoke(main, ["dus", str(model), "--preset", "gstack", "--layers", "8",
                                       "-o", str(tmp_path / "g.yaml"), "--run",
                                       str(tmp_path / "g")])
    assert result.exit_code == 0 and FAST in result.output, result.output
    _mergekit_yaml(tmp_path / "g.yaml", tmp_path / "stock")
    _same_tensors(tmp_path / "g", tmp_path / "stock")
    # LLaMA Pro's identity blocks zero o_proj/down_proj (a `scale` filter): mergekit computes
    result = CliRunner().invoke(main, ["expand", str(model), "--every", "2", "--run",
                                       str(tmp_path / "e")])
    assert result.exit_code == 0 and "merging with mergekit (slices[1] sets parameters" \
        in result.output, result.output


def test_a_recipe_upscale_stage_copies_bytes(tiny_model, tmp_path, caplog):
    from solar_merge import recipe

    path = _write(tmp_path / "recipe.yaml", {"name": "up", "stages": {
        "dus": {"upscale": {"model": str(tiny_model), "drop": 1}}}})
    with caplog.at_level(logging.INFO, logger="solar_merge.merging"):
        recipe.run(path, tmp_path / "runs", progress=False)
    assert FAST in caplog.text
    assert is_complete(tmp_path / "runs" / "dus")
    assert json.loads((tmp_path / "runs" / "dus" / "config.json").read_text())[
        "num_hidden_layers"] == 6


def test_the_fast_path_imports_neither_torch_nor_mergekit(tiny_model, tmp_path):
    config = _write(tmp_path / "dus.yaml", _config(tiny_model, [(0, 3), (1, 4)]))
    code = ("import sys; from solar_merge.cli import main; "
            "main(sys.argv[1:], standalone_mode=False); "
            "print(sorted(m for m in ('torch', 'mergekit', 'transformers') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, "yaml", str(config), str(tmp_path / "o")],
                          capture_output=True, text=True, check=True)
    assert FAST in proc.stderr, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert is_complete(tmp_path / "o")


# -- the promises of the mergekit path -------------------------------------------------------

def test_damaged_header_is_refused_before_anything_is_written(tiny_model, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model, bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[12] = ord("!")  # inside the JSON header
    (bad / "model.safetensors").write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["dus", str(bad), "--drop", "1", "--run",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2 and "damaged" in result.output, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def _with_bad_value(model: Path, out: Path, tensor: str, dtype: str, value: float) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model, out)
    weights = {k: v.to(getattr(torch, dtype)) for k, v in
               load_file(str(out / "model.safetensors")).items()}
    weights[tensor].view(-1)[weights[tensor].numel() // 2] = value
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("way", ["streamed", "shared"])
def test_nan_or_inf_in_a_copied_tensor_stops_it(way, dtype, value, tiny_model, tmp_path,
                                                monkeypatch):
    if way == "shared":  # the kernel's copy, forced: this filesystem has no reflinks
        monkeypatch.setattr(stacking, "shares_blocks", lambda *a: True)
    tensor = "model.layers.2.mlp.down_proj.weight"
    bad = _with_bad_value(tiny_model, tmp_path / "bad", tensor, dtype, value)
    config = _write(tmp_path / "c.yaml", _config(bad, [(0, 3), (1, 4)]))
    result = CliRunner().invoke(main, ["yaml", str(config), str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert FAST in result.output and tensor in result.output and "NaN or Inf" in result.output
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()
    # a layer the config drops is not copied, so not checked either
    config = _write(tmp_path / "d.yaml", _config(bad, [(0, 2), (1, 2)]))
    result = CliRunner().invoke(main, ["yaml", str(config), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("chunk", [stacking.ALIGN, 3 * stacking.ALIGN, stacking.CHUNK])
def test_streamed_and_shared_copies_give_the_same_files(chunk, tiny_model, tmp_path, caplog,
                                                        monkeypatch):
    """The streamed copy with chunks smaller than a tensor (pieces across buffers, reads from
    unaligned offsets) and the kernel's copy (forced here: this filesystem has no reflinks)
    give the same bytes."""
    config = _config(tiny_model, [(0, 3), (1, 4)])
    monkeypatch.setattr(stacking, "CHUNK", chunk)
    assert not stacking.shares_blocks(next(tiny_model.glob("*.safetensors")), tmp_path)
    streamed = _fast(config, tmp_path / "streamed", caplog)
    monkeypatch.setattr(stacking, "shares_blocks", lambda *a: True)
    shared = _fast(config, tmp_path / "shared", caplog)
    files = sorted(f.name for f in streamed.glob("*.safetensors"))
    assert files and files == sorted(f.name for f in shared.glob("*.safetensors"))
    for name in files:
        assert (streamed / name).read_bytes() == (shared / name).read_bytes()


def test_a_filesystem_refusing_direct_io_gets_buffered_io(tiny_model, tmp_path, caplog,
                                                         monkeypatch):
    """O_DIRECT refused at open (EINVAL) or at the first write (another alignment): the same
    bytes, through the page cache."""
    try:
        os.close(os.open(tmp_path / "probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT))
    except OSError:
        pytest.skip("this filesystem has no O_DIRECT")
    config = _config(tiny_model, [(0, 3), (1, 4)])
    reference = _fast(config, tmp_path / "reference", caplog)
    direct, refused = os.O_DIRECT, Counter()
    real = {name: getattr(os, name) for name in ("open", "pwrite")}

    def refusing(name):
        def call(*args, **kwargs):
            flags = args[1] if name == "open" else stacking._flags(args[0])
            if flags & direct and not (name == "open" and refused[name]):
                refused[name] += 1
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
            return real[name](*args, **kwargs)
        return call

    monkeypatch.setattr(os, "pwrite", refusing("pwrite"))
    out = _fast(config, tmp_path / "io", caplog)  # opened direct, then refused per file
    monkeypatch.setattr(os, "open", refusing("open"))
    opened = _fast(config, tmp_path / "open", caplog)  # refused at the first open only
    assert refused["pwrite"] and refused["open"] == 1
    for f in reference.glob("*.safetensors"):
        assert f.read_bytes() == (out / f.name).read_bytes() == (opened / f.name).read_bytes()


@pytest.mark.parametrize("way", ["streamed", "shared"])
def test_full_disk_is_exit_2_and_leaves_nothing(way, tiny_model, tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if way == "shared":
        monkeypatch.setattr(stacking, "shares_blocks", lambda *a: True)
        monkeypatch.setattr(os, "copy_file_range", full)
    else:
        monkeypatch.setattr(os, "pwrite", full)
    result = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1", "--run",
                                       str(tmp_path / "out")])
    assert result.exit_code == 2 and "disk is full" in result.output, result.output
    assert "model.safetensors" in result.output  # names the file being written
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def xfs(tmp_path):
    """A loop-mounted XFS image with reflinks (root, mkfs.xfs): a filesystem whose files can
    share blocks."""
    image, mount = tmp_path / "xfs.img", tmp_path / "xfs"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 * 2**20)  # XFS's smallest
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs") or any(
            subprocess.run(cmd, capture_output=True, check=False).returncode for cmd in (
                ["mkfs.xfs", "-q", "-m", "reflink=1", str(image)],
                ["mount", "-o", "loop", str(image), str(mount)])):
        pytest.skip("cannot mount an XFS image here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_on_a_filesystem_with_reflinks_the_output_shares_the_input_blocks(
        tiny_model_factory, xfs, tmp_path, caplog):
    model = tiny_model_factory(arch="llama", tied=False, layers=6, hidden=256)
    inside = xfs / "model"
    shutil.copytree(model, inside)
    assert stacking.shares_blocks(next(inside.glob("*.safetensors")), xfs)
    assert not list(xfs.glob(".reflink-probe"))
    config = _config(inside, [(0, 4), (2, 6)])
    subprocess.run(["sync"], check=True)
    before = shutil.disk_usage(xfs).used
    out = _fast(config, xfs / "out", caplog)
    subprocess.run(["sync"], check=True)
    used = shutil.disk_usage(xfs).used - before
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert used < size / 2, (used, size)  # the copied layers' blocks are shared
    reference = _fast(_config(model, [(0, 4), (2, 6)]), tmp_path / "ext", caplog)
    for f in reference.glob("*.safetensors"):
        assert f.read_bytes() == (out / f.name).read_bytes()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 400 kB tmpfs (root only): a real full disk, and another filesystem than the input's
    (no reflinks: the streamed copy runs)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs",
                                            str(mount)], capture_output=True,
                                           check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_tmpfs_is_exit_2_and_leaves_nothing(tiny_model_factory, small_tmpfs):
    model = tiny_model_factory(arch="llama", tied=False, layers=6)  # 6 -> 10 layers: 470 kB
    result = CliRunner().invoke(main, ["dus", str(model), "--drop", "1", "--run",
                                       str(small_tmpfs / "out")])
    assert result.exit_code == 2 and "disk is full" in result.output, result.output
    assert list(small_tmpfs.iterdir()) == []
    small = tiny_model_factory(arch="llama", layers=4)  # fits: the streamed copy completes
    result = CliRunner().invoke(main, ["dus", str(small), "--drop", "1", "--run",
                                       str(small_tmpfs / "out")])
    assert result.exit_code == 0 and FAST in result.output, result.output
    assert is_complete(small_tmpfs / "out")


def _files(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if p.suffix in (".safetensors", ".json") and p.name != MARKER}


@pytest.mark.parametrize("point", ["work-created", "tensor-copied", "merged", "before-marker",
                                   "between-renames", "timed"])
def test_sigkill_then_rerun_gives_the_uninterrupted_result(point, tiny_model, tmp_path):
    config = _write(tmp_path / "dus.yaml", _config(tiny_model, [(0, 3), (1, 4)]))
    reference = merge(config, tmp_path / "reference")
    out = tmp_path / "out"
    args = CLI + ["yaml", str(config), str(out)]
    if point == "between-renames":  # an older result is being replaced when the kill lands
        merge(config, out)
        (out / MARKER).write_text('{"config_hash": "older"}')
    env = {**os.environ, "SOLAR_MERGE_KILL_AT": point}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if point == "timed":  # whenever the partial folder appears: mid-copy, or just after
        deadline = time.time() + 60
        while not partial_dir(out).exists() and time.time() < deadline:
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
        assert proc.wait() == -signal.SIGKILL
    if is_complete(out):
        assert _files(out) == _files(reference)
    assert not is_complete(partial_dir(out)) or point in ("between-renames", "timed")
    assert subprocess.run(args, capture_output=True, check=False).returncode == 0  # the re-run
    assert is_complete(out) and _files(out) == _files(reference)
