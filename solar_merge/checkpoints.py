"""What a model checkpoint is, read from its files alone (config.json, safetensors headers).

No torch here: `validate` and `dus -o` must stay instant, and must never download weights.
"""

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.sizing import Shape, tied_embeddings

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelInfo:
    source: str
    architecture: str
    n_layers: int
    hidden_size: int
    intermediate_size: int | None
    vocab_size: int
    tied: bool
    dtype: str
    params: int | None  # exact when the weights are local, else None
    per_layer_params: int | None
    shape: Shape | None = None  # sizing.Shape from config.json, params exact when known

    @property
    def dtype_bytes(self) -> int:
        return {"float32": 4, "float64": 8}.get(self.dtype, 2)

    def params_with_layers(self, n_layers: int) -> int | None:
        if self.params is None or self.per_layer_params is None:
            return None
        return self.params + (n_layers - self.n_layers) * self.per_layer_params

    def shape_key(self) -> tuple:
        """What must agree for two models' tensors to be merged one-to-one."""
        return (self.hidden_size, self.intermediate_size, self.vocab_size)


def is_hub_id(model: str) -> bool:
    """`owner/name` that is not a local path (mergekit's own test, minus the network call)."""
    return (model.count("/") == 1 and not model.startswith((".", "/", "~"))
            and not os.path.exists(model))


def local_dir(model: str, base_dir=None) -> Path | None:
    """The absolute local folder for `model`, or None for a Hub id."""
    path = Path(os.path.expanduser(model))
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    # normalised: `out/../m` and `m` are one model (hashes, cards), even if `out` is not there
    path = Path(os.path.normpath(path.absolute()))
    if path.exists():
        return path
    if is_hub_id(model):
        return None
    raise UserError(f"model `{model}` not found (looked for the folder {path})",
                    fix="give an existing local model folder, or a Hub id `owner/name`")


def read_config(model: str, base_dir=None, *, field: str = "model") -> dict:
    """config.json of a local folder, or of a Hub repo (downloads config.json only)."""
    folder = local_dir(model, base_dir)
    if folder is None:
        try:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(model, "config.json"))
        except Exception as e:  # noqa: BLE001 - offline, gated, missing: the user's to fix
            raise UserError(f"{field}: cannot read config.json of Hub model `{model}` "
                            f"({type(e).__name__})",
                            fix="check the id and that you are online (or use a local copy)"
                            ) from None
    else:
        path = folder / "config.json"
        if not path.is_file():
            raise UserError(f"{field}: {folder} has no config.json, so it is not a "
                            "Hugging Face model folder",
                            fix="point to a folder saved with save_pretrained()")
    config = read_json(path, what="config.json")
    if not isinstance(config, dict):
        raise _damaged(path, f"holds a JSON {type(config).__name__}, not an object")
    return config


# -- reading files that may be damaged ---------------------------------------------------------
# Every check below runs before anything big is read or allocated: a damaged or wrong file
# (a download cut short, a disk error, another file renamed) costs a few kilobytes of reading
# and ends in a UserError naming the file, what is wrong and the fix.

MAX_JSON_BYTES = 64 * 2**20  # config.json, index files: real ones are kilobytes
# safetensors' own limit (its Rust reader refuses larger headers); real headers of large
# shards are well under 1 MB, so this bounds memory without refusing what the library reads.
MAX_HEADER_BYTES = 100_000_000
# bits per element of every dtype safetensors 0.8 knows
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
              "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16,
              "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64,
              "U64": 64}
INDEX_FILE = "model.safetensors.index.json"
REDOWNLOAD = ("re-download the model (`hf download REPO --force`, or copy it again), or re-save "
              "it with save_pretrained(); if a fresh copy is damaged too, check the disk "
              "(free space, `dmesg` for I/O errors)")


def _damaged(path, what: str) -> UserError:
    """`what` reads after the path: "is not valid JSON (...)"."""
    return UserError(f"{path} {what}: the file is damaged, or not what its name says",
                     fix=REDOWNLOAD)


def read_json(path: Path, *, what: str = "file", max_bytes: int = MAX_JSON_BYTES):
    """A small JSON file (config.json, an index) read defensively: size first, then UTF-8,
    then JSON. Raises UserError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise _damaged(path, f"is {size:,} bytes, far too large for a {what} (at most "
                                 f"{max_bytes:,} expected)")
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}",
                        fix="check that the file exists and is readable; " + REDOWNLOAD
                        ) from None
    if not data.strip():
        raise _damaged(path, "is empty")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _damaged(path, f"is not UTF-8 text (byte {e.start})") from None
    except (ValueError, RecursionError) as e:
        raise _damaged(path, f"is not valid JSON ({str(e)[:200]})") from None


def read_safetensors_header(file: Path) -> dict[str, dict]:
    """tensor name -> {"dtype", "shape", "data_offsets"} of one .safetensors file, checked the
    way safetensors itself checks it (and the file size too, so a truncated download is caught
    here, not inside a merge): header length within the file and a sane bound, a JSON object
    of known dtypes, shapes of non-negative integers, data offsets that fit the data, match
    dtype x shape and tile it exactly (no gap, no overlap)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _damaged(file, f"is only {size} bytes long, shorter than the 8-byte "
                                     "header length of a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise _damaged(file, f"says its header is {n:,} bytes long, but only "
                                     f"{size - 8:,} bytes follow the length field")
            if n > MAX_HEADER_BYTES:
                raise _damaged(file, f"says its header is {n:,} bytes long, more than "
                                     f"safetensors' limit of {MAX_HEADER_BYTES:,}")
            raw = f.read(n)
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror or e}",
                        fix="check that the file is readable; " + REDOWNLOAD) from None
    if len(raw) != n:  # the file shrank while we read it
        raise _damaged(file, "changed size while it was read")
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise _damaged(file, f"has a header that is not UTF-8 text (byte {8 + e.start})"
                       ) from None
    except (ValueError, RecursionError) as e:
        raise _damaged(file, f"has a header that is not valid JSON ({str(e)[:120]})") from None
    if not isinstance(header, dict):
        raise _damaged(file, f"has a header that is a JSON {type(header).__name__}, not an "
                             "object")
    _check_tensors(file, header, data_size=size - 8 - n)
    return header


def _check_tensors(file: Path, header: dict, *, data_size: int) -> None:
    meta = header.get("__metadata__")
    if meta is not None and (not isinstance(meta, dict) or not all(
            isinstance(v, str) for v in meta.values())):
        raise _damaged(file, "has a `__metadata__` that is not a mapping of strings")
    spans = []
    for name, t in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor `{name[:200]}`"
        if not isinstance(t, dict):
            raise _damaged(file, f"describes {where} by a {type(t).__name__}, not an object")
        dtype, shape, offsets = t.get("dtype"), t.get("shape"), t.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
            raise _damaged(file, f"gives {where} the unknown dtype {str(dtype)[:40]!r}")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            raise _damaged(file, f"gives {where} the shape {str(shape)[:80]}, not a list of "
                                 "non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(_is_size(o) for o in offsets) or offsets[0] > offsets[1]):
            raise _damaged(file, f"gives {where} the data offsets {str(offsets)[:80]}, not "
                                 "[begin, end] with 0 <= begin <= end")
        bits = _numel(shape) * DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise _damaged(file, f"gives {where} ({dtype}, shape {shape}: {bits / 8:g} "
                                 f"bytes) data offsets {offsets} that span "
                                 f"{offsets[1] - offsets[0]}")
        if offsets[1] > data_size:
            raise _damaged(file, f"ends {where} at byte {offsets[1]:,} of the data, but "
                                 f"holds only {data_size:,} bytes of data (cut short?)")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            what = "overlaps the previous tensor" if begin < end else "leaves a gap before it"
            raise _damaged(file, f"places tensor `{name[:200]}` at data offsets "
                                 f"[{begin}, {stop}], which {what}")
        end = stop
    if end != data_size:
        raise _damaged(file, f"has tensors covering {end:,} bytes of data, but holds "
                             f"{data_size:,} (extra bytes appended, or a tensor missing from "
                             "the header)")


def _is_size(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def weight_files(folder: Path) -> list[Path]:
    """The .safetensors files of a model folder: the shards its index names (checked to exist
    and to stay inside the folder), else every *.safetensors file."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if not index.is_file():
        return sorted(folder.glob("*.safetensors"))
    return sorted({folder / shard for shard in _index_map(index).values()})


def _index_map(index: Path) -> dict[str, str]:
    data = read_json(index, what="safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise _damaged(index, "has no `weight_map` object naming each tensor's shard")
    for name, shard in weight_map.items():
        if (not isinstance(shard, str) or not shard.endswith(".safetensors")
                or Path(shard).name != shard):
            raise _damaged(index, f"maps tensor `{name[:200]}` to {str(shard)[:80]!r}, not a "
                                  "*.safetensors file name in the same folder")
        if not (index.parent / shard).is_file():
            raise UserError(f"{index} names the shard {shard} (for tensor `{name[:200]}`), "
                            f"which is missing from {index.parent}",
                            fix="download the missing shard (`hf download REPO --force` "
                                "fetches every file again)")
    return weight_map


def safetensors_headers(folder: Path) -> dict[str, dict]:
    """tensor name -> {"dtype", "shape", ...} from the headers of the model's safetensors
    files, each checked (read_safetensors_header); with an index, every tensor it lists must
    be in the shard it names."""
    folder = Path(folder)
    out: dict[str, dict] = {}
    per_file: dict[str, dict] = {}
    for file in weight_files(folder):
        header = read_safetensors_header(file)
        header.pop("__metadata__", None)
        per_file[file.name] = header
        out.update(header)
    index = folder / INDEX_FILE
    if index.is_file():
        for name, shard in _index_map(index).items():
            if name not in per_file[shard]:
                raise _damaged(index, f"places tensor `{name[:200]}` in {shard}, which does "
                                      "not hold it (index and shards are from different "
                                      "downloads?)")
    return out


def check_gguf_header(file: Path) -> None:
    """The first 24 bytes of a GGUF file: magic, version, and tensor and key counts that the
    file's size can hold (cheap; the full parse takes seconds for a 100 MB file)."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(24)
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror or e}",
                        fix="check that the file is readable") from None
    if len(head) < 24 or head[:4] != b"GGUF":
        raise _damaged(file, f"does not start like a GGUF file ({size} bytes, first bytes "
                             f"{head[:4]!r})")
    version, tensors, keys = struct.unpack("<IQQ", head[4:])
    if version not in (2, 3):
        raise _damaged(file, f"has GGUF version {version}, not 2 or 3")
    if tensors > size // 24 or keys > size // 12:  # each entry takes at least that many bytes
        raise _damaged(file, f"claims {tensors:,} tensors and {keys:,} metadata keys, more "
                             f"than its {size:,} bytes can hold")


# GGUF metadata value types -> bytes (8: string, 9: array are read by _GGUFLayout)
_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _GGUFLayout:
    """A walk over a GGUF file's metadata and tensor table that trusts no length or count: each
    is checked against the bytes left before anything is read or allocated (the `gguf`
    package's reader took 40 s and 4 GB on a 600-byte file whose string length had one bit
    flipped). Memory: one field at a time."""

    def __init__(self, file: Path):
        self.file, self.f = file, open(file, "rb")  # noqa: SIM115 - closed by check_layout
        self.size = file.stat().st_size
        self.alignment = 32

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.f.tell():
            raise _damaged(self.file, f"has {what} of {n:,} bytes at byte {self.f.tell():,}, "
                                      "past the end of the file")
        return self.f.read(n)

    def number(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> bytes:
        return self.take(self.number("Q", what + " length"), what)

    def value(self, kind: int, key: bytes, depth: int = 0):
        if kind in _GGUF_SCALARS:
            raw = self.take(_GGUF_SCALARS[kind], f"the value of {key[:80]!r}")
            return int.from_bytes(raw, "little") if kind == 4 else None
        if kind == 8:
            self.string(f"the string value of {key[:80]!r}")
            return None
        if kind != 9 or depth > 2:
            raise _damaged(self.file, f"gives metadata key {key[:80]!r} the unknown value type "
                                      f"{kind}")
        item, count = self.number("I", "an array type"), self.number("Q", "an array length")
        smallest = _GGUF_SCALARS.get(item, 8 if item == 8 else 12)
        if count * smallest > self.size - self.f.tell():
            raise _damaged(self.file, f"gives metadata key {key[:80]!r} an array of {count:,} "
                                      "items, more than the file can hold")
        if item in _GGUF_SCALARS:
            self.take(count * smallest, f"the array of {key[:80]!r}")
        else:
            for _ in range(count):
                self.value(item, key, depth + 1)
        return None

    def check(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.take(4, "the magic")
        self.number("I", "the version")
        tensors, keys = self.number("Q", "the tensor count"), self.number("Q", "the key count")
        for _ in range(keys):
            key = self.string("a metadata key")
            value = self.value(self.number("I", "a value type"), key)
            if key == b"general.alignment" and value is not None:
                if value <= 0 or value & (value - 1):
                    raise _damaged(self.file, f"has general.alignment {value}, not a power of 2")
                self.alignment = value
        spans = []
        for _ in range(tensors):
            name = self.string("a tensor name")
            n_dims = self.number("I", "a dimension count")
            if n_dims > 4:
                raise _damaged(self.file, f"gives tensor {name[:80]!r} {n_dims:,} dimensions "
                                          "(GGUF has at most 4)")
            dims = [self.number("Q", "a dimension") for _ in range(n_dims)]
            kind, offset = self.number("I", "a tensor type"), self.number("Q", "a tensor offset")
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
            except (ValueError, KeyError):
                raise _damaged(self.file, f"gives tensor {name[:80]!r} the unknown type "
                                          f"{kind}") from None
            spans.append((name, offset, _numel(dims) * type_size // block))
        start = -(-self.f.tell() // self.alignment) * self.alignment
        for name, offset, n_bytes in spans:
            if start + offset + n_bytes > self.size:
                raise _damaged(self.file, f"places tensor {name[:80]!r} ({n_bytes:,} bytes at "
                                          f"offset {offset:,}) past the end of the file")


def check_gguf_layout(file: Path) -> None:
    """The GGUF file's header, metadata and tensor table, every length bounded by the file
    (milliseconds for SmolLM2's 98 MB file: its metadata is a vocabulary at the start)."""
    check_gguf_header(file)
    layout = _GGUFLayout(Path(file))
    try:
        layout.check()
    except OSError as e:
        raise UserError(f"cannot read {file}: {e.strerror or e}",
                        fix="check that the file is readable") from None
    finally:
        layout.f.close()


def check_gguf(file: Path) -> None:
    """check_gguf_layout, then a full parse by the `gguf` package (as transformers does),
    every error a UserError naming the file. Seconds for 100 MB: call it to explain a failed
    import."""
    check_gguf_layout(file)
    try:
        from gguf import GGUFReader

        reader = GGUFReader(file)
        size = Path(file).stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} ends past the end of the file")
    except ImportError as e:
        raise UserError(f"reading {file} needs the `gguf` package ({e})",
                        fix="pip install gguf") from None
    except Exception as e:  # noqa: BLE001 - any failure to parse means a damaged file
        raise _damaged(file, f"cannot be parsed ({type(e).__name__}: {str(e)[:200]})") from None


def require_safetensors(folder: Path, *, allow_pickle: bool = False) -> None:
    """Refuse pickle checkpoints (they can run code on load) unless asked for."""
    if any(folder.glob("*.safetensors")):
        safetensors_headers(folder)  # damaged files stop here, not inside mergekit or torch
        return
    if allow_pickle:
        return
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UserError(f"{folder} holds only pickle weights ({', '.join(pickles[:3])}), "
                        "which can execute code when loaded",
                        fix="convert them to safetensors, or pass --allow-pickle if you "
                            "trust the source")
    raise UserError(f"{folder} has no *.safetensors weights",
                    fix="point to a folder saved with save_pretrained()")


def remote_code_error(model, e: Exception) -> UserError | None:
    """A clear refusal when transformers/mergekit would need the model's own Python code."""
    text = str(e)
    if "trust_remote_code" not in text and "custom code" not in text:
        return None
    if model is None:  # name the model from transformers' message when the caller cannot
        found = re.search(r"repository (\S+) (?:contains|references)", text)
        model = found.group(1) if found else "a model"
    return UserError(f"{model} needs custom Python code shipped with the model (config.json "
                     "`auto_map`) to load; solar-merge never runs such code by default",
                     fix="use a model whose architecture transformers supports natively; if "
                         "you trust the code, opt in explicitly (merges: --trust-remote-code, "
                         "training: args.model_init_kwargs.trust_remote_code: true)")


def _text_config(config: dict) -> dict:
    # Multimodal configs (Gemma 3, ...) keep the language model's fields in text_config.
    return config.get("text_config") or config


# config.json fields we read: an integer within a bound no real model comes near (a damaged
# file must not make `dus -o` build a layer map of 10^12 entries).
_INT_FIELDS = {"num_hidden_layers": 100_000, "hidden_size": 10_000_000,
               "vocab_size": 100_000_000}


def _config_fields(config: dict, label: str, field: str) -> dict:
    """The fields of config.json that solar-merge uses, checked for type and range."""
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise UserError(f"{field}: {label}: `text_config` is a {type(text).__name__}, not an "
                        "object", fix=_CONFIG_FIX)
    text = _text_config(config)
    out = {}
    for key, limit in _INT_FIELDS.items():
        if key not in text:
            raise UserError(f"{field}: {label} has no {key}",
                            fix="solar-merge supports decoder-only models with the usual "
                                "transformers config keys")
        value = text[key]
        if not _is_size(value) or not 1 <= value <= limit:
            raise UserError(f"{field}: {label}: `{key}` is {str(value)[:40]!r}, not an integer "
                            f"from 1 to {limit:,}", fix=_CONFIG_FIX)
        out[key] = value
    inter = text.get("intermediate_size")
    if inter is not None and not _is_size(inter):
        raise UserError(f"{field}: {label}: `intermediate_size` is {str(inter)[:40]!r}, not a "
                        "non-negative integer", fix=_CONFIG_FIX)
    archs = config.get("architectures")
    if not archs:
        raise UserError(f"{field}: {label} has no `architectures` list, so "
                        "mergekit cannot tell how its weights are laid out",
                        fix='add e.g. "architectures": ["LlamaForCausalLM"] (saving the model '
                            "with save_pretrained() writes it)")
    if not isinstance(archs, list) or not all(isinstance(a, str) and a for a in archs):
        raise UserError(f"{field}: {label}: `architectures` is {str(archs)[:60]}, not a list "
                        'of class names such as ["LlamaForCausalLM"]', fix=_CONFIG_FIX)
    for where in (config, text):
        tied = where.get("tie_word_embeddings")
        if tied is not None and not isinstance(tied, bool):
            raise UserError(f"{field}: {label}: `tie_word_embeddings` is {str(tied)[:40]!r}, "
                            "not true or false", fix=_CONFIG_FIX)
    dtype = text.get("dtype") or text.get("torch_dtype") or config.get("torch_dtype")
    if dtype is not None and not isinstance(dtype, str):
        raise UserError(f"{field}: {label}: `dtype` is {str(dtype)[:40]!r}, not a name such as "
                        '"bfloat16"', fix=_CONFIG_FIX)
    return {**out, "intermediate_size": inter, "architecture": archs[0],
            "tied": tied_embeddings(config),
            "dtype": dtype or "float32"}


_CONFIG_FIX = ("re-download config.json with the weights (`hf download REPO --force`), or "
               "re-save the model with save_pretrained()")


def model_info(model: str, base_dir=None, *, field: str = "model") -> ModelInfo:
    config = read_config(model, base_dir, field=field)
    folder = local_dir(model, base_dir)
    label = str(folder / "config.json") if folder else f"config.json of `{model}`"
    fields = _config_fields(config, label, field)
    n_layers = fields["num_hidden_layers"]
    params = per_layer = None
    if folder is not None:
        headers = safetensors_headers(folder)
        if headers:
            sizes = {name: _numel(h["shape"]) for name, h in headers.items()}
            params = sum(sizes.values())
            layers = [(int(m.group(1)), s) for name, s in sizes.items()
                      if (m := _LAYER.search(name))]
            per_layer = sum(s for i, s in layers if i == 0) or None
            held = max((i for i, _ in layers), default=-1) + 1
            if layers and held < n_layers:
                raise UserError(f"{field}: {label} says {n_layers} layers, but the weights in "
                                f"{folder} hold only {held}",
                                fix="config.json and the weights come from different models, "
                                    "or a shard is missing: " + REDOWNLOAD)
    return ModelInfo(
        source=str(folder) if folder else model,
        architecture=fields["architecture"],
        n_layers=n_layers, hidden_size=fields["hidden_size"],
        intermediate_size=fields["intermediate_size"], vocab_size=fields["vocab_size"],
        tied=fields["tied"], dtype=fields["dtype"], params=params, per_layer_params=per_layer,
        shape=Shape.from_config(config, params, where=f"{field}: {label}"),
    )


def _numel(shape) -> int:
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > 2**80:  # far beyond any file; stop before a damaged shape builds a huge integer
            break
    return n


def human(n: int | None, unit: str = "") -> str:
    if n is None:
        return "unknown"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n}{unit}"
