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
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path} is not valid JSON ({e})", fix="re-save the model") from None


def safetensors_headers(folder: Path) -> dict[str, dict]:
    """tensor name -> {"dtype", "shape"} from the headers of every *.safetensors file."""
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out.update(header)
    return out


def require_safetensors(folder: Path, *, allow_pickle: bool = False) -> None:
    """Refuse pickle checkpoints (they can run code on load) unless asked for."""
    if any(folder.glob("*.safetensors")) or allow_pickle:
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


def model_info(model: str, base_dir=None, *, field: str = "model") -> ModelInfo:
    config = read_config(model, base_dir, field=field)
    text = _text_config(config)
    try:
        n_layers = int(text["num_hidden_layers"])
        hidden = int(text["hidden_size"])
        vocab = int(text["vocab_size"])
    except KeyError as e:
        raise UserError(f"{field}: config.json of `{model}` has no {e.args[0]}",
                        fix="solar-merge supports decoder-only models with the usual "
                            "transformers config keys") from None
    if not config.get("architectures"):
        raise UserError(f"{field}: config.json of `{model}` has no `architectures` list, so "
                        "mergekit cannot tell how its weights are laid out",
                        fix='add e.g. "architectures": ["LlamaForCausalLM"] (saving the model '
                            "with save_pretrained() writes it)")
    params = per_layer = None
    folder = local_dir(model, base_dir)
    if folder is not None:
        headers = safetensors_headers(folder)
        if headers:
            sizes = {name: _numel(h["shape"]) for name, h in headers.items()}
            params = sum(sizes.values())
            layer0 = [s for name, s in sizes.items() if (m := _LAYER.search(name))
                      and m.group(1) == "0"]
            per_layer = sum(layer0) if layer0 else None
    dtype = str(text.get("dtype") or text.get("torch_dtype") or config.get("torch_dtype")
                or "float32")
    return ModelInfo(
        source=str(folder) if folder else model,
        architecture=(config.get("architectures") or ["?"])[0],
        n_layers=n_layers, hidden_size=hidden,
        intermediate_size=text.get("intermediate_size"), vocab_size=vocab,
        tied=bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        dtype=dtype, params=params, per_layer_params=per_layer,
    )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def human(n: int | None, unit: str = "") -> str:
    if n is None:
        return "unknown"
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.2f}{suffix}{unit}"
    return f"{n}{unit}"
