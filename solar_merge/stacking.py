"""Stacking: a config that only slices and stacks one model's layers, written by copying
tensor bytes instead of running mergekit.

A `passthrough` config without parameters moves no number: every output tensor is a
byte-for-byte copy of an input tensor under a new name. For such a config (`why_not` and
`plan` say which qualify) this module plans what stock mergekit 0.1.5 writes, from mergekit's
own architecture definitions (its `_data/architectures/*.json`, read as data): the same tensor
names, the same shards (mergekit's save order and `out_shard_size`), shard names and index.
Then it copies the bytes, never materialising a tensor: where the output's filesystem can
share blocks with the input's (reflinks: XFS, btrfs; `shares_blocks` tries one),
`os.copy_file_range` shares them; elsewhere each output shard is streamed in order through a
few 16 MB buffers, written with O_DIRECT so that the output's bytes skip the page cache.

The rest of the output is the mergekit path's (merging.merge): config.json with the new layer
count and `layer_types` re-sliced (`sliced_layer_types`, shared by both paths), the tokenizer
files `--copy-tokenizer` copies, the card, the completion marker. Every copied input tensor is
checked for NaN/Inf (as the mergekit path checks what it writes): in the buffer it was read
into, or after the kernel's copy, from the page cache.

Imports neither torch, mergekit nor transformers: a DUS costs the disk's time, not seconds of
imports.
"""

import errno
import functools
import importlib.util
import json
import mmap
import os
import queue
import shutil
import string
import struct
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from solar_merge.checkpoints import INDEX_FILE, _index_map, read_json, read_safetensors_header
from solar_merge.errors import UserError
from solar_merge.testhooks import crash_point

# Config keys and mergekit options a pure copy can honour. Options absent here (or with
# another value than the one given) change the tensors, so mergekit runs instead.
CONFIG_KEYS = {"slices", "merge_method", "dtype", "out_dtype", "name"}
NEUTRAL_OPTIONS = {"copy_tokenizer", "clone_tensors", "out_shard_size", "write_model_card",
                   "num_threads", "quiet", "verbosity", "async_write", "write_threads",
                   "lazy_unpickle", "low_cpu_memory", "read_to_gpu", "multi_gpu", "cuda",
                   "device", "gpu_rich", "transformers_cache", "lora_merge_cache",
                   "lora_merge_dtype", "random_seed", "allow_crimes", "allow_pickle"}
# Of those, the ones about how mergekit runs (threads, devices, caches, logging): the byte copy
# has no use for them.
RUNTIME_OPTIONS = NEUTRAL_OPTIONS - {"copy_tokenizer", "clone_tensors", "out_shard_size",
                                     "write_model_card", "allow_crimes", "allow_pickle"}
REQUIRED_OPTIONS = {"safe_serialization": True, "trust_remote_code": False,
                    "unsafe_truncate_embeddings": False}
DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
SHARD_SIZE = 5 * 10**9  # mergekit's default --out-shard-size ("5B"), compared with bytes
# The order safetensors gives dtypes (its Dtype enum); a file holds its tensors by dtype,
# largest first, then by name.
DTYPE_ORDER = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32",
               "U32", "F32", "F64", "I64", "U64"]
# What mergekit 0.1.5's --copy-tokenizer copies, when the donor has tokenizer_config.json and
# tokenizer.json or tokenizer.model (otherwise it re-serialises the tokenizer with
# transformers: mergekit's job).
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                   "tokenizer.model", "added_tokens.json", "merges.txt", "chat_template.jinja",
                   "generation_config.json", "chat_template.json",
                   "video_preprocessor_config.json")
# Files a tokenizer can be loaded from: a model with some, but not tokenizer_config.json with
# tokenizer.json or tokenizer.model, has its tokenizer re-serialised by mergekit.
TOKENIZER_SOURCES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model",
                     "special_tokens_map.json", "added_tokens.json", "merges.txt", "vocab.json",
                     "vocab.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")
# Model types whose transformers config derives no per-layer list when config.json has no
# `layer_types` (Qwen2 derives one that is all "full_attention" without sliding windows).
NO_DERIVED_LAYER_TYPES = {"llama", "mistral"}
BLOCK = 4096  # filesystem block: reflinks share whole, aligned blocks


class Unstackable(Exception):
    """The config is valid, but not a pure copy of one local safetensors model: mergekit runs
    it. The message says why, for the CLI's line."""


@dataclass(frozen=True)
class Piece:
    """One output tensor: `size` bytes at `offset` (from the start of the file) of `source`."""
    name: str
    input_name: str
    source: Path
    offset: int
    size: int
    dtype: str
    shape: tuple


@dataclass
class Shard:
    name: str
    pieces: list  # in the order their bytes follow the header
    header: bytes  # length field, JSON header and padding


@dataclass
class Stack:
    """Everything `write` needs, planned before anything is written."""
    model: Path
    shards: list
    index: str | None
    config_json: str
    tokenizer_files: list = field(default_factory=list)

    @property
    def sources(self) -> set:
        """The input files the shards copy from."""
        return {p.source for shard in self.shards for p in shard.pieces}


# -- which configs qualify -------------------------------------------------------------------

def why_not(config, options: dict | None) -> str | None:
    """Why `config` (as written, before paths are resolved) with mergekit `options` is not a
    pure slice-and-stack config; None when its shape qualifies (`plan` checks the files)."""
    if not isinstance(config, dict):
        return "the config is not a mapping"
    method = config.get("merge_method")
    if method != "passthrough":
        return f"merge_method `{method}` computes its tensors"
    extra = sorted(str(k) for k in set(config) - CONFIG_KEYS)
    if extra:
        return f"the config sets {', '.join(extra)}"
    slices = config.get("slices")
    if not isinstance(slices, list) or not slices:
        return "the config has no slices"
    for i, s in enumerate(slices):
        if not isinstance(s, dict) or set(s) != {"sources"}:
            return f"slices[{i}] sets more than `sources`"
        sources = s["sources"]
        if not isinstance(sources, list) or len(sources) != 1:
            return f"slices[{i}] has {len(sources) if isinstance(sources, list) else 'no'} " \
                   "sources, not one"
        src = sources[0]
        if not isinstance(src, dict) or "parameters" in src:
            return f"slices[{i}] sets parameters (a `scale` filter computes)"
        if set(src) != {"model", "layer_range"} or not isinstance(src["model"], str) \
                or "+" in src["model"]:
            return f"slices[{i}] is not a plain `model` + `layer_range` source"
    for key in ("dtype", "out_dtype"):
        if config.get(key) is not None and config[key] not in DTYPES:
            return f"{key} `{config[key]}` is not one of {', '.join(DTYPES)}"
    for key, value in (options or {}).items():
        if key in REQUIRED_OPTIONS and value != REQUIRED_OPTIONS[key]:
            return f"the mergekit option {key}={value}"
        if key not in REQUIRED_OPTIONS and key not in NEUTRAL_OPTIONS:
            return f"the mergekit option {key}"
    return None


# -- planning --------------------------------------------------------------------------------

def plan(config: dict, options: dict | None = None) -> Stack:
    """The output of `config` (validated, paths resolved: merging.check_config) as mergekit
    would write it. Raises Unstackable when mergekit must run it, UserError for damaged
    inputs; reads only config.json and the safetensors headers."""
    options = options or {}
    models = {src["model"] for s in config["slices"] for src in s["sources"]}
    if len(models) != 1:
        raise Unstackable("the slices name several models (mergekit picks the donor of "
                          "config.json and tokenizer from a set)")
    model = models.pop()
    folder = Path(model)
    if not os.path.isabs(model) or not folder.is_dir():
        raise Unstackable(f"{model} is not a local folder")
    cfg = read_json(folder / "config.json", what="config.json")
    arch = architecture(cfg)
    key = arch.get("num_layers_config_key")
    if not isinstance(key, str) or key not in cfg or not isinstance(cfg[key], int):
        raise Unstackable(f"config.json has no `{key}` for mergekit to update")
    ranges = [tuple(s["sources"][0]["layer_range"]) for s in config["slices"]]
    n_in, n_out = cfg[key], sum(b - a for a, b in ranges)
    tensors = _tensors(folder)
    pieces = [_piece(tensors, out, inp) for out, inp in _weights(arch, ranges, n_in, n_out)]
    pieces = [p for p in pieces if p is not None]
    if not pieces:
        raise Unstackable("no tensor of the model matches mergekit's architecture definition")
    for name in ("dtype", "out_dtype"):
        want = DTYPES.get(config.get(name))
        changed = next((p for p in pieces if want and p.dtype != want), None)
        if changed:
            raise Unstackable(f"`{name}: {config[name]}` converts {changed.input_name} "
                              f"from {changed.dtype}")
    limit = options.get("out_shard_size", SHARD_SIZE)
    if not isinstance(limit, int) or isinstance(limit, bool):
        raise Unstackable(f"out_shard_size {limit!r} is not a number of bytes")
    shards, index = _shards(pieces, limit)
    return Stack(folder, shards, index, _config_json(cfg, config, key, n_out),
                 _tokenizer_files(folder) if options.get("copy_tokenizer", True) else [])


@functools.lru_cache(maxsize=1)
def _definitions() -> dict:
    """architecture name -> mergekit's JSON definitions that claim it, read as data from the
    installed mergekit (finding a package's folder does not import it)."""
    spec = importlib.util.find_spec("mergekit")
    if spec is None or not spec.submodule_search_locations:
        return {}
    by_name: dict[str, list] = {}
    folder = Path(next(iter(spec.submodule_search_locations))) / "_data" / "architectures"
    for file in sorted(folder.glob("*.json")):
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError):
            continue
        for name in data.get("architectures") or []:
            by_name.setdefault(name, []).append(data)
    return by_name


def architecture(cfg: dict) -> dict:
    """mergekit's definition for this config.json, chosen as mergekit chooses it (one
    candidate, else the one whose model_type matches); a single-module one, or Unstackable."""
    names = cfg.get("architectures")
    if not isinstance(names, list) or len(names) != 1:
        raise Unstackable("config.json names other than one architecture")
    if "text_config" in cfg:
        raise Unstackable("a multimodal config (text_config)")
    candidates = _definitions().get(names[0], [])
    if len(candidates) > 1:
        candidates = [c for c in candidates if c.get("model_type") == cfg.get("model_type")]
    if len(candidates) != 1:
        raise Unstackable(f"mergekit has no single architecture definition for {names[0]}")
    arch = candidates[0]
    if arch.get("kind", "module") != "module" or arch.get("override_num_layers") is not None:
        raise Unstackable(f"{names[0]} is a multi-module architecture in mergekit")
    weights = [*arch["pre_weights"], *arch["layer_templates"]["weights"], *arch["post_weights"]]
    if any(w.get("force_dtype") for w in weights):
        raise Unstackable(f"mergekit converts some tensors of {names[0]} (force_dtype)")
    return arch


class _Template(string.Template):
    idpattern = r"(?a:[_a-z][_a-z0-9]*([+-]1)?)"  # mergekit's: ${layer_index+1} and the like


def _named(weight: dict, num_layers: int, layer: int | None = None) -> dict:
    """A weight definition with mergekit's template variables filled in."""
    values = {"num_layers": num_layers, "num_layers+1": num_layers + 1,
              "num_layers-1": num_layers - 1}
    if layer is not None:
        values.update({"layer_index": layer, "layer_index+1": layer + 1,
                       "layer_index-1": layer - 1})

    def fill(text):
        return _Template(text).substitute(values) if "{" in text else text

    return {k: fill(v) if isinstance(v, str) else [fill(x) for x in v] if isinstance(v, list)
            else v for k, v in weight.items()}


def _weights(arch: dict, ranges, n_in: int, n_out: int):
    """(output weight, input weight) in mergekit's plan order: the pre weights, each output
    layer's weights, the post weights (pre and post weights are read under their output
    names, as mergekit's planner does)."""
    for w in arch["pre_weights"]:
        yield _named(w, n_out), _named(w, n_out)
    out = 0
    for a, b in ranges:
        for layer in range(a, b):
            for w in arch["layer_templates"]["weights"]:
                yield _named(w, n_out, out), _named(w, n_in, layer)
            out += 1
    for w in arch["post_weights"]:
        yield _named(w, n_out), _named(w, n_out)


def _tensors(folder: Path) -> dict:
    """input tensor name -> (file, offset of its bytes in the file, size, dtype, shape), from
    the checked headers; with an index, each tensor from the shard the index names."""
    from solar_merge.checkpoints import weight_files

    files = weight_files(folder)
    if not files:
        raise Unstackable(f"{folder} has no safetensors weights")
    index = folder / INDEX_FILE
    owner = _index_map(index) if index.is_file() else None
    out = {}
    for file in files:
        header = read_safetensors_header(file)
        header.pop("__metadata__", None)
        start = 8 + _header_length(file)
        for name, t in header.items():
            if owner is not None and owner.get(name) != file.name:
                continue  # mergekit reads a sharded model through its index only
            if name in out:
                raise Unstackable(f"tensor {name} is in two files and no index says which")
            begin, end = t["data_offsets"]
            out[name] = (file, start + begin, end - begin, t["dtype"], tuple(t["shape"]))
    return out


def _header_length(file: Path) -> int:
    with open(file, "rb") as f:
        return struct.unpack("<Q", f.read(8))[0]


def _piece(tensors: dict, out: dict, inp: dict) -> Piece | None:
    """The input tensor mergekit would read for one output weight, None when mergekit skips
    it (an optional weight the model lacks, e.g. the lm_head of tied embeddings)."""
    names = [inp["name"], *(inp.get("aliases") or [])]
    if inp.get("optional") and not any(n in tensors for n in names):
        return None
    found = next((n for n in names + list(inp.get("tied_names") or []) if n in tensors), None)
    if found is None:
        raise Unstackable(f"the model has no tensor {inp['name']} (mergekit converts or "
                          "refuses it)")
    piece = Piece(out["name"], found, *tensors[found])
    if piece.dtype not in DTYPE_ORDER:
        raise Unstackable(f"{found} has the dtype {piece.dtype}, which torch cannot save")
    return piece


def _shards(pieces: list, limit: int) -> tuple[list, str | None]:
    """mergekit's shards: tensors in the order its scheduler saves them (by input tensor name,
    then plan order), a new shard when the next tensor would pass `limit` bytes; one shard is
    model.safetensors, several are model-0000i-of-0000n.safetensors with an index."""
    order = sorted(range(len(pieces)), key=lambda i: (pieces[i].input_name, i))
    groups, current, size = [], [], 0
    for i in order:
        p = pieces[i]
        if current and limit > 0 and size + p.size > limit:
            groups.append(current)
            current, size = [], 0
        current.append(p)
        size += p.size
    groups.append(current)
    n = len(groups)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)])
    shards = [_shard(name, group) for name, group in zip(names, groups)]
    if n == 1:
        return shards, None
    try:
        version = metadata.version("mergekit")
    except metadata.PackageNotFoundError:
        version = None
    meta = {"total_size": sum(p.size for p in pieces)}
    if version:
        meta["mergekit_version"] = version
    weight_map = {p.name: name for name, group in zip(names, groups) for p in group}
    return shards, json.dumps({"metadata": meta, "weight_map": weight_map}, indent=2)


def _shard(name: str, pieces: list) -> Shard:
    """The file safetensors would write for these tensors (metadata {"format": "pt"}, tensors
    by dtype then name, compact JSON), with the header padded so that as many tensor bytes as
    possible sit at the same offset modulo the block size as in their source file: those
    blocks can be shared (reflinked) instead of copied."""
    pieces = sorted(pieces, key=lambda p: (-DTYPE_ORDER.index(p.dtype), p.name))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    gain: dict[int, int] = {}
    for p in pieces:
        header[p.name] = {"dtype": p.dtype, "shape": list(p.shape),
                          "data_offsets": [offset, offset + p.size]}
        residue = (p.offset - offset) % BLOCK
        if residue % 8 == 0:  # the data must start 8-byte aligned
            gain[residue] = gain.get(residue, 0) + p.size // BLOCK
        offset += p.size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    length = len(text) + (-len(text)) % 8
    best = max(gain, key=lambda r: (gain[r], -((r - 8 - len(text)) % BLOCK)), default=None)
    if best is not None and gain[best] > 0:
        length = len(text) + (best - 8 - len(text)) % BLOCK
    return Shard(name, pieces, struct.pack("<Q", length) + text.ljust(length, b" "))


def sliced_layer_types(slices: list, types_of) -> list | None:
    """The `layer_types` list of a sliced output: each slice's range of its first source's
    list (`types_of(model path)`, None when that model has none), or None."""
    out = []
    for s in slices:
        src = s["sources"][0]
        types = types_of(src["model"])
        if types is None:
            return None
        out.extend(types[src["layer_range"][0]:src["layer_range"][1]])
    return out


def layer_fields(layer_types: list, max_window_layers) -> dict:
    """The config fields that follow the layer list: its length, and a sliding-window layer
    bound that cannot exceed it."""
    fields = {"layer_types": list(layer_types), "num_hidden_layers": len(layer_types)}
    if max_window_layers is not None:
        fields["max_window_layers"] = min(max_window_layers, len(layer_types))
    return fields


def _config_json(cfg: dict, config: dict, key: str, n_out: int) -> str:
    """config.json as the mergekit path writes it: the layer count, the dtype the config
    names, and `layer_types` re-sliced with the layers."""
    out = dict(cfg)
    out[key] = n_out
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype:
        out["torch_dtype" if "torch_dtype" in out and "dtype" not in out else "dtype"] = dtype
    if isinstance(cfg.get("layer_types"), list):
        types = sliced_layer_types(config["slices"], lambda _: cfg["layer_types"])
        out.update(layer_fields(types, cfg.get("max_window_layers")))
    elif cfg.get("model_type") not in NO_DERIVED_LAYER_TYPES and not (
            cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window")):
        raise Unstackable(f"config.json has no `layer_types`; transformers derives one for "
                          f"`{cfg.get('model_type')}` models, which the mergekit path re-slices")
    return json.dumps(out, indent=2, sort_keys=True) + "\n"


def _tokenizer_files(folder: Path) -> list:
    """The files --copy-tokenizer copies; none when the model has no tokenizer (mergekit then
    fails to load one, logs it, and writes none)."""
    if (folder / "tokenizer_config.json").is_file() and any(
            (folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        return [f for f in TOKENIZER_FILES if (folder / f).is_file()]
    if any((folder / f).is_file() for f in TOKENIZER_SOURCES):
        raise Unstackable("the tokenizer must be re-serialised (no tokenizer_config.json with "
                          "tokenizer.json or tokenizer.model)")
    return []


# -- writing ---------------------------------------------------------------------------------

def write(stack: Stack, work: Path) -> None:
    """Write the planned output into the (empty, owned) folder `work`: by reflinks where the
    filesystem shares blocks between the input and the output, else streamed."""
    from tqdm import tqdm

    from solar_merge.console import terminal

    work = Path(work)
    size = sum(p.size for shard in stack.shards for p in shard.pieces)
    with tqdm(total=size, desc="copying", unit="B", unit_scale=True, file=terminal(),
              disable=None) as bar:  # None: drawn on a terminal only
        if shares_blocks(min(stack.sources), work):
            _write_shared(stack, work, bar.update)
        else:
            _write_streamed(stack, work, bar.update)
    if stack.index is not None:
        (work / INDEX_FILE).write_text(stack.index)
    (work / "config.json").write_text(stack.config_json)
    for name in stack.tokenizer_files:
        shutil.copy(stack.model / name, work / name)


FICLONERANGE = 0x4020940D  # linux/fs.h: _IOW(0x94, 13, struct file_clone_range)


def shares_blocks(source: Path, folder: Path) -> bool:
    """Whether a file in `folder` can share blocks with `source` (reflinks: XFS, btrfs),
    found by cloning one block of it into a probe file."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return False
    probe = folder / ".reflink-probe"
    try:
        src = os.open(source, os.O_RDONLY)
        try:
            if os.fstat(src).st_size < BLOCK:
                return False
            dst = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                fcntl.ioctl(dst, FICLONERANGE, struct.pack("qQQQ", src, 0, BLOCK, 0))
                return True
            finally:
                os.close(dst)
        finally:
            os.close(src)
    except OSError:  # EOPNOTSUPP (ext4, tmpfs), EXDEV (another filesystem), ENOTTY, ...
        return False
    finally:
        probe.unlink(missing_ok=True)


def _positions(stack: Stack, work: Path) -> list:
    """(output file, its header, [(piece, position of its bytes in the file)]) per shard."""
    out = []
    for shard in stack.shards:
        position, placed = len(shard.header), []
        for p in shard.pieces:
            placed.append((p, position))
            position += p.size
        out.append((work / shard.name, shard.header, placed))
    return out


# -- streamed: each output file written in order, around the page cache ---------------------

CHUNK = 16 * 2**20  # one read, one write; a multiple of ALIGN
ALIGN = 4096  # O_DIRECT offsets and lengths: the logical block of every disk we expect


def _write_streamed(stack: Stack, work: Path, progress) -> None:
    """Each output shard written in order, CHUNK bytes at a time by a second thread while the
    next CHUNK is read, with O_DIRECT where the filesystem allows it: the output goes from
    three buffers to the disk, not through the page cache (which would cost a copy of every
    byte, a page for each, and evict what the machine had cached)."""
    writer = _Writer([_aligned(CHUNK) for _ in range(3)])
    reader, finite = _Reader(bytearray(CHUNK)), _Finite()
    writer.start()
    outputs: list[int] = []
    try:
        for path, header, placed in _positions(stack, work):
            fd = _open_direct(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            outputs.append(fd)
            out = _Output(path, fd, writer)
            out.add(memoryview(header))
            for piece, _ in placed:
                first = finite.first(piece)
                for view in reader.read(piece, path):
                    if first:
                        finite.check(piece, view)
                    out.add(view)
                    progress(len(view))
                crash_point("tensor-copied")
            out.close()
        writer.finish()
    finally:
        writer.abandon()
        reader.close()
        for fd in outputs:
            os.close(fd)


def _aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)  # page-aligned, as O_DIRECT needs


def _open_direct(path, flags: int) -> int:
    """Open with O_DIRECT, or without it where the filesystem refuses it."""
    direct = getattr(os, "O_DIRECT", 0)
    try:
        return os.open(path, flags | direct, 0o644)
    except OSError as e:
        if not direct or e.errno != errno.EINVAL:
            raise
        return os.open(path, flags, 0o644)


def _buffered_after_einval(fd: int, e: OSError) -> bool:
    """After EINVAL from a write: if `fd` was opened with O_DIRECT, drop it (this filesystem
    wants another alignment) and say so, so the write is retried buffered."""
    direct = getattr(os, "O_DIRECT", 0)
    if e.errno != errno.EINVAL or not direct or not _flags(fd) & direct:
        return False
    import fcntl

    fcntl.fcntl(fd, fcntl.F_SETFL, _flags(fd) & ~direct)
    return True


def _flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


class _Reader:
    """Reads a piece's bytes CHUNK at a time into one buffer, through the page cache: a DUS
    reads its middle layers twice, and the next layout of the same model reads it all again."""

    def __init__(self, buffer):
        self.buffer, self.files = buffer, {}

    def read(self, piece: Piece, path: Path):
        """Views of the piece's bytes, in order, each valid until the next."""
        if piece.source not in self.files:
            self.files[piece.source] = os.open(piece.source, os.O_RDONLY)
        fd, at, end = self.files[piece.source], piece.offset, piece.offset + piece.size
        while at < end:
            view = memoryview(self.buffer)[:min(end - at, CHUNK)]
            n = os.preadv(fd, [view], at)
            if n < len(view):
                raise _ended(path)
            yield view
            at += n

    def close(self):
        for fd in self.files.values():
            os.close(fd)


class _Output:
    """One output file's bytes, gathered into CHUNK-sized buffers that the writer writes."""

    def __init__(self, path: Path, fd: int, writer):
        self.path, self.fd, self.writer = path, fd, writer
        self.at, self.fill, self.buffer = 0, 0, writer.buffer()

    def add(self, data: memoryview) -> None:
        done = 0
        while done < len(data):
            n = min(CHUNK - self.fill, len(data) - done)
            self.buffer[self.fill:self.fill + n] = data[done:done + n]
            self.fill, done = self.fill + n, done + n
            if self.fill == CHUNK:
                self.writer.put(self.path, self.fd, self.at, self.buffer, CHUNK)
                self.at, self.fill, self.buffer = self.at + CHUNK, 0, self.writer.buffer()

    def close(self) -> None:
        """Write the last buffer padded to ALIGN (O_DIRECT writes whole blocks), then cut the
        file to its size."""
        pad = -self.fill % ALIGN
        self.buffer[self.fill:self.fill + pad] = bytes(pad)
        self.writer.put(self.path, self.fd, self.at, self.buffer, self.fill + pad,
                        size=self.at + self.fill)


class _Writer(threading.Thread):
    """Writes buffers in the order they come, on its own thread (file writes release the
    GIL), and hands each back for the next chunk; the first error stops the writing and is
    raised in the reading thread."""

    def __init__(self, buffers):
        super().__init__(name="solar-merge writer", daemon=True)
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.free: queue.SimpleQueue = queue.SimpleQueue()
        for b in buffers:
            self.free.put(b)
        self.error: BaseException | None = None

    def buffer(self):
        b = self.free.get()
        if self.error is not None:
            raise self.error
        return b

    def put(self, path, fd, at, buffer, n, size=None) -> None:
        self.todo.put((path, fd, at, buffer, n, size))

    def run(self):
        while (job := self.todo.get()) is not None:
            path, fd, at, buffer, n, size = job
            if self.error is None:
                try:
                    _write_all(path, fd, memoryview(buffer)[:n], at)
                    if size is not None:
                        _full(path, os.ftruncate, fd, size)
                except BaseException as e:  # noqa: BLE001 - raised in the reading thread
                    self.error = e
            self.free.put(buffer)

    def finish(self) -> None:
        """Wait for every queued write; raise the first error."""
        self.todo.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def abandon(self) -> None:
        if self.is_alive():
            self.error = self.error or RuntimeError("abandoned")
            self.todo.put(None)
            self.join()


def _write_all(path: Path, fd: int, data, position: int) -> None:
    done = 0
    while done < len(data):
        try:
            done += _full(path, os.pwrite, fd, data[done:], position + done)
        except OSError as e:
            if not _buffered_after_einval(fd, e):
                raise


def _ended(path: Path) -> UserError:
    return UserError(f"an input file ended while {path.name} was being written (was the model "
                     "changed during the copy?)",
                     fix="re-run when the input model is no longer being written")


def _full(path: Path, write, *args):
    """Run one write, `write(*args)`; a full disk names the file (the CLI turns it into
    exit 2)."""
    try:
        return write(*args)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) and not e.filename:
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise


# -- shared: reflinks by the kernel ------------------------------------------------------------

def _write_shared(stack: Stack, work: Path, progress) -> None:
    """Each input tensor copied by `os.copy_file_range` to every place the output holds it
    (whole aligned blocks shared, not copied: the header padding lines most of them up); the
    inputs are then read once, in order, by the NaN/Inf check on another thread, while the
    kernel copies what it cannot share."""
    checker, files = _FiniteCheck(), {}  # path -> descriptor, inputs and outputs
    checker.start()
    try:
        places: dict = {}  # (input file, offset) -> (piece, [(output path, position)])
        for path, header, placed in _positions(stack, work):
            files[path] = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            _write_all(path, files[path], header, 0)
            for piece, position in placed:
                places.setdefault((piece.source, piece.offset), (piece, []))[1].append(
                    (path, position))
        for (source, offset), (piece, targets) in sorted(places.items()):
            if source not in files:
                files[source] = os.open(source, os.O_RDONLY)
            for path, position in targets:
                _clone(files[source], offset, files[path], position, piece.size, path)
                progress(piece.size)
            checker.check(piece, targets[0][0])
            crash_point("tensor-copied")
        checker.result()
    finally:
        checker.stop()
        for fd in files.values():
            os.close(fd)


def _clone(src: int, src_at: int, dst: int, dst_at: int, size: int, path: Path) -> None:
    """Copy a byte range in the kernel: up to the next block boundary first when the two
    offsets line up, so that the rest starts on a block on both sides and can be shared."""
    head = min(size, -src_at % BLOCK) if (dst_at - src_at) % BLOCK == 0 else 0
    for start, length in ((0, head), (head, size - head)):
        done = 0
        while done < length:
            n = _full(path, os.copy_file_range, src, dst, length - done, src_at + start + done,
                      dst_at + start + done)
            if n == 0:
                raise _ended(path)
            done += n


# -- NaN/Inf in what is copied ---------------------------------------------------------------

# (unsigned view, smallest value of `bits << 1` whose exponent is all ones): shifting the sign
# out, a float is NaN or Inf exactly when the shifted bits reach that value.
_NON_FINITE = {"BF16": ("<u2", 0xFF00), "F16": ("<u2", 0xF800),
               "F32": ("<u4", 0xFF000000), "F64": ("<u8", 0xFFE0000000000000)}


class _Finite:
    """Checks input tensors for NaN/Inf, each once (a DUS copies some twice), through one
    scratch array (a fresh one per chunk would cost new pages each time)."""

    def __init__(self):
        self.seen: set = set()
        self.scratch = None

    def first(self, piece: Piece) -> bool:
        """Whether `piece`'s input tensor is to be checked now (a float not yet checked)."""
        key = (piece.source, piece.offset)
        if piece.dtype not in _NON_FINITE or not piece.size or key in self.seen:
            return False
        self.seen.add(key)
        return True

    def check(self, piece: Piece, data) -> None:
        """Raise if `data` (some of `piece`'s bytes, whole values) holds NaN or Inf."""
        import numpy as np

        kind, limit = _NON_FINITE[piece.dtype]
        values = np.frombuffer(data, dtype=kind)
        if self.scratch is None or self.scratch.nbytes < values.nbytes:
            self.scratch = np.empty(max(values.nbytes, CHUNK), dtype=np.uint8)
        shifted = self.scratch[:values.nbytes].view(kind)
        np.left_shift(values, 1, out=shifted)
        if shifted.size and shifted.max() >= limit:
            raise UserError(f"input model {piece.source.parent} has NaN or Inf in tensor "
                            f"`{piece.input_name}`, so the copy `{piece.name}` would too",
                            fix="fix or replace that model (re-save or re-train it); "
                                "up-scaling cannot repair non-finite weights")


class _FiniteCheck(threading.Thread):
    """`_Finite` on another thread, reading each input tensor through its own `_Reader` right
    after the kernel copied it (so from the page cache)."""

    def __init__(self):
        super().__init__(name="solar-merge finite check", daemon=True)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.finite = _Finite()
        self.error: BaseException | None = None
        self.stopped = threading.Event()

    def check(self, piece: Piece, path: Path) -> None:
        """Queue `piece` (copied into the output file `path`) for the check."""
        if self.finite.first(piece):
            self.queue.put((piece, path))

    def run(self):
        reader = _Reader(bytearray(CHUNK))
        try:
            while (job := self.queue.get()) is not None:
                if self.error is not None or self.stopped.is_set():
                    continue  # drain the queue; the writer stops at result()
                for view in reader.read(*job):
                    self.finite.check(job[0], view)
        except BaseException as e:  # noqa: BLE001 - handed to the writing thread
            self.error = e
        finally:
            reader.close()

    def result(self) -> None:
        """Wait for the check of everything queued; raise if an input holds NaN or Inf."""
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        self.stopped.set()
        if self.is_alive():
            self.queue.put(None)
            self.join()
