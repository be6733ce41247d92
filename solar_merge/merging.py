"""Run a mergekit config with our methods and with what stock mergekit 0.1.5 gets wrong fixed.

Fixes, each for a pitfall of mergekit 0.1.5:
- unknown or misspelled keys, methods and parameters are errors (mergekit ignores unknown
  keys silently); `Checker` checks without importing mergekit, against key sets and a
  method table that tests/test_merging.py holds to mergekit's own models and registry;
- model paths become absolute (a relative path makes mergekit's model card call the Hub);
- configs with `layer_types` (Qwen2/3, Gemma 3) get the list re-sliced with the layers, so
  config.json can be saved;
- repeated layers are cloned before writing (no shared-storage warning and retry);
- the output is written atomically with a completion marker, and checked for NaN/Inf.

A config that only slices and stacks one model's layers is written by copying tensor bytes
(solar_merge.stacking) unless `fast=False`: the same tensors, without importing mergekit.
"""

import copy
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import yaml

from solar_merge import stacking
from solar_merge.checkpoints import local_dir, model_info
from solar_merge.errors import UserError, did_you_mean, during
from solar_merge.outputs import (
    atomic_output,
    check_replaceable,
    config_hash,
    fingerprint,
    is_complete,
    portable,
)
from solar_merge.readers import load_yaml, read_text
from solar_merge.testhooks import crash_point

log = logging.getLogger(__name__)

# mergekit 0.1.5's MergeConfiguration and its nested models, as allowed keys per level
# (tests/test_merging.py pins them to mergekit.config's pydantic models: importing mergekit
# costs seconds, which checking a config must not).
TOP_KEYS = {"modules", "slices", "models", "merge_method", "base_model", "dtype",
            "tokenizer_source", "tokenizer", "chat_template", "out_dtype", "parameters"}
MODEL_KEYS = {"model", "parameters"}
SLICE_KEYS = {"sources", "base_model", "residual_weight", "parameters"}
SOURCE_KEYS = {"model", "layer_range", "parameters"}
MODULE_KEYS = {"slices", "models", "parameters"}
TOKENIZER_KEYS = {"source", "tokens", "pad_to_multiple_of"}
# The dtype names mergekit.common.dtype_from_name accepts for `dtype` and `out_dtype`.
DTYPES = {"float32", "float16", "bfloat16", "float64"}
# Every merge method mergekit 0.1.5 registers (ours included), with its parameter names.
METHODS = {
    "arcee_fusion": set(),
    "breadcrumbs": {"density", "gamma", "int8_mask", "lambda", "normalize", "rescale",
                    "weight"},
    "breadcrumbs_ties": {"density", "gamma", "int8_mask", "lambda", "normalize", "rescale",
                         "weight"},
    "dare_linear": {"density", "int8_mask", "lambda", "normalize", "rescale", "weight"},
    "dare_ties": {"density", "int8_mask", "lambda", "normalize", "rescale", "weight"},
    "della": {"density", "epsilon", "int8_mask", "lambda", "normalize", "rescale", "weight"},
    "della_linear": {"density", "epsilon", "int8_mask", "lambda", "normalize", "rescale",
                     "weight"},
    "karcher": {"max_iter", "tol"},
    "linear": {"normalize", "weight"},
    "model_stock": {"filter_wise"},
    "multislerp": {"eps", "normalize_weights", "weight"},
    "nearswap": {"t"},
    "nuslerp": {"nuslerp_flatten", "nuslerp_row_wise", "weight"},
    "passthrough": {"scale"},
    "ram": {"epsilon"},
    "ramplus_tl": {"alpha", "epsilon", "r"},
    "sce": {"int8_mask", "select_topk"},
    "slerp": {"t"},
    "solar_average": {"normalize", "weight"},
    "solar_slerp": {"t"},
    "task_arithmetic": {"density", "int8_mask", "lambda", "normalize", "rescale", "weight"},
    "ties": {"density", "int8_mask", "lambda", "normalize", "rescale", "weight"},
}


def load_config(config, *, label: str = "merge config") -> dict:
    """A mergekit config from a dict, YAML text or a file path."""
    if isinstance(config, Path) or (isinstance(config, str) and "\n" not in config
                                    and config.endswith((".yaml", ".yml"))):
        path = Path(config)
        if not path.is_file():
            what = "merge config" if label == str(config) else label
            raise UserError(f"{what} file {path} not found", fix="check the path")
        label, config = str(path), read_text(path, what="merge config")
    if isinstance(config, str):
        config = load_yaml(config, label)
    if not isinstance(config, dict):
        raise UserError(f"{label} must be a YAML mapping with `merge_method` and "
                        f"`models` or `slices`, not {type(config).__name__}",
                        fix="see merge_configs/ for examples")
    return copy.deepcopy(config)


class Checker:
    """Checks a mergekit config strictly, collecting every problem, each named by its field
    path (after `where`, e.g. a recipe stage's `stages.avg.merge`).

    `structure` checks the keys, the method and its parameters, and resolves every model
    reference; `shapes` checks what the models hold: layer ranges inside each model, and
    shapes that can be merged. By default a reference is a local folder (relative to
    `base_dir`) or a Hub id, read from disk; a recipe passes `resolve(field, ref) -> ref` and
    `info(ref) -> ModelInfo | None` for references to its earlier stages' outputs."""

    def __init__(self, base_dir=None, *, where: str = "", resolve=None, info=None):
        self.base_dir = Path(base_dir) if base_dir else Path.cwd()
        self.where = where
        self.problems: list[str] = []
        self._resolve = resolve
        self._info = info
        self.infos: dict[str, object] = {}

    def add(self, path: str, message: str) -> None:
        path = ".".join(p for p in (self.where, path) if p)
        self.problems.append(f"{path}: {message}" if path else message)

    def keys(self, where: str, value, allowed: set) -> bool:
        if not isinstance(value, dict):
            self.add(where, f"expected a mapping, got {value!r}")
            return False
        for key in value:
            if key not in allowed:
                self.add(f"{where}.{key}" if where else str(key),
                         f"unknown key{did_you_mean(str(key), allowed)}; allowed here: "
                         f"{', '.join(sorted(allowed))}")
        return True

    def model(self, where: str, ref):
        """A model reference with its folder made absolute (or the recipe's reference
        resolved); its info is remembered for `shapes`."""
        if isinstance(ref, dict):  # mergekit's expanded form {model: {path: ...}, lora: ...}
            inner = ref.get("model", {})
            if isinstance(inner, dict) and isinstance(inner.get("path"), str):
                inner["path"] = self.model(where + ".model.path", inner["path"])
            return ref
        if not isinstance(ref, str) or not ref:
            self.add(where, f"expected a model path or Hub id, got {ref!r}")
            return ref
        path, plus, lora = ref.partition("+")
        if self._resolve is not None:
            return self._resolve(".".join(p for p in (self.where, where) if p), path) \
                + plus + lora
        try:
            folder = local_dir(path, self.base_dir)
            resolved = str(folder) if folder else path
            self.infos.setdefault(resolved, model_info(resolved, field=where))
        except UserError as e:
            message = e.message.split("\n  fix:")[0]
            self.problems.append(message if message.startswith(where) else
                                 f"{'.'.join(p for p in (self.where, where) if p)}: {message}")
            return ref
        return resolved + plus + lora

    def info(self, ref):
        path = os.path.normpath(_model_path(ref)) if _model_path(ref) else ""
        if self._info is not None:
            return self._info(path) if path else None
        return self.infos.get(path)

    def parameters(self, where: str, params, allowed: set | None, method: str):
        if params is None or allowed is None:
            return
        if not isinstance(params, dict):
            self.add(where, "expected a mapping of parameter names to values")
            return
        for key in params:
            if key not in allowed:
                self.add(f"{where}.{key}", f"`{method}` has no parameter `{key}`"
                         f"{did_you_mean(str(key), allowed)}; its parameters: "
                         f"{', '.join(sorted(allowed)) or 'none'}")

    def structure(self, config: dict) -> dict:
        """The config with its references resolved; problems noted (see the class doc)."""
        self.keys("", config, TOP_KEYS)
        method = config.get("merge_method")
        allowed = None
        if not isinstance(method, str):
            self.add("merge_method", "missing; e.g. `merge_method: solar_average`")
        elif method not in METHODS:
            self.add("merge_method", f"unknown method `{method}`{did_you_mean(method, METHODS)};"
                     f" known: {', '.join(sorted(METHODS))}")
        else:
            allowed = METHODS[method]
        for key in ("dtype", "out_dtype"):
            if isinstance(config.get(key), str) and config[key] not in DTYPES:
                self.add(key, f"unknown dtype `{config[key]}`"
                         f"{did_you_mean(config[key], DTYPES)}; one of "
                         f"{', '.join(sorted(DTYPES))}")
        if config.get("base_model") is not None:
            config["base_model"] = self.model("base_model", config["base_model"])
        self.parameters("parameters", config.get("parameters"), allowed, method)
        if isinstance(config.get("tokenizer"), dict):
            self.keys("tokenizer", config["tokenizer"], TOKENIZER_KEYS)
        groups = [k for k in ("models", "slices", "modules") if config.get(k)]
        if len(groups) != 1:
            self.add("", "exactly one of `models`, `slices` or `modules` must be given"
                     + (f" (found {', '.join(groups)})" if groups else ""))
        self._models("models", config.get("models"), allowed, method)
        self._slices("slices", config.get("slices"), allowed, method)
        modules = config.get("modules") or {}
        if not isinstance(modules, dict):
            self.add("modules", "expected a mapping of module names to {models|slices}")
            modules = {}
        for name, module in modules.items():
            where = f"modules.{name}"
            if self.keys(where, module, MODULE_KEYS):
                self._models(where + ".models", module.get("models"), allowed, method)
                self._slices(where + ".slices", module.get("slices"), allowed, method)
                self.parameters(where + ".parameters", module.get("parameters"), allowed,
                                method)
        return config

    def _listed(self, where, value) -> list:
        """`value` if it is a list; [] (with a problem noted unless it is absent) otherwise."""
        if value is not None and not isinstance(value, list):
            self.add(where, "expected a list")
        return value if isinstance(value, list) else []

    def _models(self, where, models, allowed, method):
        for i, entry in enumerate(self._listed(where, models)):
            w = f"{where}[{i}]"
            if self.keys(w, entry, MODEL_KEYS):
                if "model" not in entry:
                    self.add(f"{w}.model", "missing")
                else:
                    entry["model"] = self.model(w + ".model", entry["model"])
                self.parameters(w + ".parameters", entry.get("parameters"), allowed, method)

    def _slices(self, where, slices, allowed, method):
        for i, out_slice in enumerate(self._listed(where, slices)):
            w = f"{where}[{i}]"
            if not self.keys(w, out_slice, SLICE_KEYS):
                continue
            if out_slice.get("base_model") is not None:
                out_slice["base_model"] = self.model(w + ".base_model", out_slice["base_model"])
            self.parameters(w + ".parameters", out_slice.get("parameters"), allowed, method)
            lengths, folders = set(), set()
            for j, source in enumerate(self._listed(f"{w}.sources", out_slice.get("sources"))):
                ws = f"{w}.sources[{j}]"
                if not self.keys(ws, source, SOURCE_KEYS):
                    continue
                if "model" not in source:
                    self.add(f"{ws}.model", "missing")
                    continue
                written = source["model"]
                source["model"] = self.model(ws + ".model", written)
                if isinstance(source["model"], str):  # not a list or mapping (unhashable)
                    if source["model"] in folders and isinstance(written, str) \
                            and ".." in written:
                        # One folder twice in a slice (upscale.twin: an average of two of its
                        # layers) keeps its second spelling `DIR/../NAME`: mergekit tells models
                        # apart by their spelling and refuses one model twice ("Duplicate merge
                        # inputs").
                        source["model"] = str(Path(self.base_dir,
                                                   os.path.expanduser(written)).absolute())
                    folders.add(source["model"])
                self.parameters(ws + ".parameters", source.get("parameters"), allowed, method)
                lr = source.get("layer_range")
                if (not isinstance(lr, list) or len(lr) != 2
                        or not all(isinstance(x, int) for x in lr)):
                    self.add(f"{ws}.layer_range",
                             f"expected [start, end) as two integers, got {lr!r}")
                    continue
                lengths.add(lr[1] - lr[0])
            if not out_slice.get("sources"):
                self.add(f"{w}.sources", "missing or empty")
            elif len(lengths) > 1:
                self.add(f"{w}.sources", f"layer ranges of different lengths {sorted(lengths)}"
                         " cannot be merged layer by layer")

    def shapes(self, config: dict) -> None:
        """Layer ranges inside each model; models merged tensor by tensor (or stacked) agree
        on hidden, MLP and (unless a tokenizer is built) vocabulary sizes."""
        sliced = [("slices", config.get("slices"))] + [
            (f"modules.{name}.slices", module.get("slices"))
            for name, module in (config.get("modules") or {}).items()]
        for where, slices in sliced:
            for i, s in enumerate(slices or []):
                for j, src in enumerate(s["sources"]):
                    info, lr = self.info(src["model"]), src["layer_range"]
                    if info is not None and not 0 <= lr[0] < lr[1] <= info.n_layers:
                        self.add(f"{where}[{i}].sources[{j}].layer_range",
                                 f"{lr} is outside the model's {info.n_layers} layers (ranges "
                                 f"are end-exclusive: use 0 <= start < end <= {info.n_layers})")
        groups = []
        if config.get("models"):
            refs = [m["model"] for m in config["models"]]
            if config.get("base_model"):
                refs.append(config["base_model"])
            groups.append(("models", refs, True))
        if config.get("slices"):
            groups.append(("slices", [src["model"] for s in config["slices"]
                                      for src in s["sources"]], False))
        vocab_aligned = bool(config.get("tokenizer") or config.get("tokenizer_source"))
        for where, refs, whole_models in groups:
            infos = [(r, self.info(r)) for r in refs]
            infos = [(r, i) for r, i in infos if i is not None]
            for ref, info in infos[1:]:
                first_ref, first = infos[0]
                a, b = first.shape_key(), info.shape_key()
                if vocab_aligned:
                    a, b = a[:2], b[:2]
                if a != b or (whole_models and first.n_layers != info.n_layers):
                    self.add(where, f"{_described(ref, info)} cannot be merged with "
                             f"{_described(first_ref, first)}: merge models of the same "
                             "architecture and size")

    def error(self, label: str) -> UserError:
        return UserError(f"{label} has {len(self.problems)} problem(s):\n  - "
                         + "\n  - ".join(self.problems),
                         fix="correct the fields named above" + (
                             " (mergekit would have ignored unknown keys silently)"
                             if any("unknown key" in p or "has no parameter" in p
                                    for p in self.problems) else ""))


def _described(ref, info) -> str:
    return (f"`{Path(_model_path(ref)).name}` (hidden {info.hidden_size}, mlp "
            f"{info.intermediate_size}, vocab {info.vocab_size}, {info.n_layers} layers)")


def check_config(config, base_dir=None, *, label: str = "merge config") -> dict:
    """Validate a mergekit config strictly, without running it. Returns it with absolute paths.

    Raises UserError listing every problem: unknown keys, unknown method or parameters,
    missing models, layer ranges outside a model, models whose shapes cannot be merged.
    """
    config = load_config(config, label=label)
    config.pop("name", None)  # mergekit-multi documents carry a name
    checker = Checker(base_dir)
    config = checker.structure(config)
    if not checker.problems:
        checker.shapes(config)
    if checker.problems:
        raise checker.error(label)
    return config


def _model_path(ref) -> str:
    if isinstance(ref, dict):  # mergekit's expanded form {model: {path: ...}} (else: "")
        inner = ref.get("model")
        path = inner.get("path") if isinstance(inner, dict) else None
        return path if isinstance(path, str) else ""
    return ref.partition("+")[0] if isinstance(ref, str) else ""


def _repeats_layers(config: dict) -> bool:
    seen = set()
    for s in config.get("slices") or []:
        for src in s["sources"]:
            for layer in range(*src["layer_range"]):
                key = (_model_path(src["model"]), layer)
                if key in seen:
                    return True
                seen.add(key)
    return False


def _output_layer_types(config: dict, trust_remote_code: bool = False) -> list | None:
    """The `layer_types` list a sliced output must carry, or None if the inputs have none.

    Read from the config as transformers loads it, not from the raw config.json: the Hub's
    own config.json files for Qwen2.5, Qwen3, Gemma 2/3 predate the key, and transformers
    derives the per-layer pattern (e.g. Gemma 3's five sliding layers to one full) on load.
    """
    if not config.get("slices"):
        return None
    from transformers import AutoConfig

    loaded: dict[str, list | None] = {}

    def types_of(ref):
        path = _model_path(ref)
        if path not in loaded:
            cfg = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
            types = getattr(cfg.get_text_config(), "layer_types", None)
            loaded[path] = list(types) if types is not None else None
        return loaded[path]

    return stacking.sliced_layer_types(config["slices"], types_of)


@contextmanager
def _mergekit_fixes(layer_types: list | None, inputs=()):
    """Two targeted patches of mergekit 0.1.5 (pinned), undone on exit:

    - it keeps the donor's `layer_types`, so transformers refuses to save config.json when the
      layer count changes: re-slice the list with the layers;
    - every tensor is checked for NaN/Inf as it is written, in memory (a second pass reading
      the output back from disk doubled the time of a DUS).
    """
    import mergekit.merge
    from mergekit.io.tensor_writer import TensorWriter

    out_config, save_tensor = mergekit.merge._model_out_config, TensorWriter.save_tensor

    def fixed_out_config(*args, **kwargs):
        cfg = out_config(*args, **kwargs)
        if layer_types is not None:
            target = cfg.get_text_config()
            fields = stacking.layer_fields(layer_types, getattr(target, "max_window_layers", None))
            for name, value in fields.items():
                setattr(target, name, value)
        return cfg

    def checked_save_tensor(self, name, tensor, clone: bool = False):
        # Copy first (as mergekit would), then check the copy: checking first would read a
        # lazily loaded (memory-mapped) tensor from disk once for the check, once to copy.
        tensor = tensor.contiguous()
        if clone:
            tensor = tensor.clone()
        if not _all_finite(tensor):
            source = _non_finite_input(inputs, name)
            if source is not None:
                raise UserError(f"input model {source} has NaN or Inf in tensor `{name}`, so "
                                "the merged tensor would too",
                                fix="fix or replace that model (re-save or re-train it); "
                                    "merging cannot repair non-finite weights")
            raise UserError(
                f"merged tensor `{name}` contains NaN or Inf",
                fix="check the input models for NaN/Inf weights (and the merge weights: "
                    "e.g. normalize with weights summing to ~0)")
        return save_tensor(self, name, tensor)

    mergekit.merge._model_out_config = fixed_out_config
    TensorWriter.save_tensor = checked_save_tensor
    try:
        yield
    finally:
        mergekit.merge._model_out_config = out_config
        TensorWriter.save_tensor = save_tensor


def _all_finite(tensor) -> bool:
    """No NaN/Inf in `tensor`. min and max propagate NaN and are Inf when any element is: one
    reduction without a temporary (isfinite(t).all() builds a boolean copy of the tensor)."""
    import torch

    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _non_finite_input(inputs, name: str) -> str | None:
    """The local input model whose tensor `name` holds NaN/Inf (only read on failure)."""
    from safetensors import safe_open

    for ref in inputs:
        for file in sorted(Path(ref).glob("*.safetensors")) if Path(ref).is_dir() else ():
            with safe_open(str(file), framework="pt") as f:
                if name in set(f.keys()):
                    tensor = f.get_tensor(name)
                    if not _all_finite(tensor):
                        return ref
    return None


def merge(config, out_dir, *, base_dir=None, options: dict | None = None,
          label: str = "merge config", kind: str = "merge", fast: bool = True) -> Path:
    """Check a mergekit config (check_config) and run it into `out_dir` (`run`); skip it if
    `out_dir` is already complete for this config and these inputs. Relative paths resolve
    against `base_dir` (default: the config file's folder, else the current one)."""
    if base_dir is None and isinstance(config, (str, Path)) and str(config).endswith(
            (".yaml", ".yml")) and Path(config).is_file():
        base_dir = Path(config).absolute().parent
    return run(check_config(config, base_dir, label=label), out_dir, options=options,
               kind=kind, fast=fast)


def run(resolved: dict, out_dir, *, options: dict | None = None, kind: str = "merge",
        fast: bool = True, digest: str | None = None) -> Path:
    """Run a checked config (check_config's result: references resolved) into `out_dir`.

    `options` are mergekit's MergeOptions fields (e.g. {"out_shard_size": ..., "lazy_unpickle":
    True}). A config that only slices and stacks one local model is written by copying tensor
    bytes (solar_merge.stacking: the tensors stock mergekit writes, in seconds less), unless
    `fast` is False. Logs which path ran. `digest` marks the output complete (a recipe's stage
    hash); by default the hash of the config, the options and the inputs' contents, so that a
    model retrained in place is merged again. Returns the finished folder.
    """
    why = stacking.why_not(resolved, options) if fast else "--no-fast"
    options = dict(options or {})
    if _repeats_layers(resolved):
        options["clone_tensors"] = True
    options.setdefault("copy_tokenizer", True)
    allow_pickle = bool(options.pop("allow_pickle", False))
    digest = digest or config_hash({
        "merge": resolved, "options": _hashed_options(options),
        "inputs": {ref: fingerprint(ref) for ref in _all_models(resolved)}})
    out_dir = Path(out_dir).absolute()
    if is_complete(out_dir, digest):
        log.info("%s is complete for this config and these inputs: nothing to do", out_dir)
        return out_dir
    check_replaceable(out_dir)  # before the seconds mergekit takes to import
    # Written into the output (mergekit_config.yml, the card): paths relative to it.
    source = yaml.safe_dump(portable(resolved, out_dir), sort_keys=False)
    stack = None
    if not why:
        try:
            stack = stacking.plan(resolved, options)
        except stacking.Unstackable as e:
            why = str(e)
    if stack is not None:
        log.info("copying tensor bytes (a pure slice config: the tensors mergekit writes, "
                 "without running it; --no-fast runs mergekit)")
        unused = sorted(k for k, v in options.items() if k in stacking.RUNTIME_OPTIONS
                        and (k, v) != ("device", "cpu"))  # mergekit's parser sets device
        if unused:
            log.info("the byte copy does not use %s (how mergekit runs, not what it writes); "
                     "add --no-fast to run mergekit with them", ", ".join(unused))
        with atomic_output(out_dir, digest) as work:
            stacking.write(stack, work)
            _finish(work, resolved, source, kind, out_dir, _all_models(resolved))
        return out_dir
    log.info("merging with mergekit (%s)", why)

    import mergekit.merge
    from mergekit.config import MergeConfiguration
    from mergekit.options import MergeOptions

    from solar_merge.checkpoints import require_safetensors

    merge_config = MergeConfiguration.model_validate(resolved)
    inputs = sorted({str(ref.model.path) for ref in merge_config.referenced_models()})
    for ref in inputs:
        folder = local_dir(ref)
        if folder is not None:
            require_safetensors(folder, allow_pickle=allow_pickle)
    merge_options = MergeOptions(**options)
    with atomic_output(out_dir, digest) as work:
        try:
            layer_types = _output_layer_types(resolved, bool(options.get("trust_remote_code")))
            with _mergekit_fixes(layer_types, inputs), during(f"the merge of {', '.join(inputs)}"):
                mergekit.merge.run_merge(merge_config, str(work), options=merge_options,
                                         config_source=source)
        except (ValueError, TypeError, RuntimeError) as e:
            from solar_merge.checkpoints import remote_code_error

            if remote_code_error(None, e):
                raise remote_code_error(None, e) from e
            raise UserError(f"merge into {out_dir} failed: {e}",
                            fix="correct the config as the message says (--debug shows "
                                "the traceback)") from e
        _finish(work, resolved, source, kind, out_dir, inputs)
    return out_dir


def _finish(work: Path, resolved: dict, source: str, kind: str, out_dir: Path,
            inputs: list[str]) -> None:
    """What every merged output carries besides the weights: the config and the card."""
    crash_point("merged")
    from solar_merge.hub import write_card

    write_card(work, kind=kind, source_yaml=source, source_name="mergekit_config.yml",
               base_models=inputs, merge_method=resolved["merge_method"],
               lineage=[{"stage": out_dir.name, "kind": kind, "inputs": inputs}])


def _hashed_options(options: dict) -> dict:
    # Performance knobs do not change the result; keep them out of the hash.
    ignore = {"num_threads", "quiet", "verbosity", "async_write", "write_threads",
              "lazy_unpickle", "low_cpu_memory", "read_to_gpu", "multi_gpu", "cuda", "device",
              "gpu_rich", "transformers_cache", "lora_merge_cache"}
    return {k: v for k, v in sorted(options.items()) if k not in ignore}


def _all_models(config: dict) -> list[str]:
    """The input models' paths, as mergekit's MergeConfiguration.referenced_models() gives
    them (tests/test_merging.py holds the two to each other), without importing mergekit."""
    refs = []
    if config.get("base_model"):
        refs.append(config["base_model"])
    refs += [m["model"] for m in config.get("models") or []]
    for s in config.get("slices") or []:
        refs += [src["model"] for src in s["sources"]]
    for module in (config.get("modules") or {}).values():
        refs += [m["model"] for m in module.get("models") or []]
        for s in module.get("slices") or []:
            refs += [src["model"] for src in s["sources"]]
    return sorted({_model_path(r) for r in refs})


# -- click commands that take every mergekit-yaml option (built on demand: importing
#    mergekit.options costs seconds, and only these two commands need it) --

def parse_merge_options(args: list[str], prog: str) -> dict:
    """mergekit-yaml's own options in `args` (-j, --async-write, --out-shard-size, ...) as
    MergeOptions fields, parsed by mergekit's click decorator so names and help match."""
    import click
    from mergekit.options import MergeOptions, add_merge_options

    @click.command()
    @add_merge_options
    def parse(merge_options: MergeOptions):
        _apply_global_options(merge_options)
        return merge_options.model_dump(exclude_defaults=True)

    return parse.main(list(args), prog_name=prog, standalone_mode=False)


def _apply_global_options(merge_options) -> None:
    """mergekit's apply_global_options, except that torch's inter-op pool, which can be sized
    only before the first parallel op (a RuntimeError after it: e.g. a second command in one
    Python process), is left as it is: -j is a speed knob, never a reason to fail."""
    import torch

    try:
        merge_options.apply_global_options()
    except RuntimeError as e:
        if "interop" not in str(e):
            raise
        torch.set_num_threads(merge_options.num_threads)


def yaml_command(mergekit_options: bool = True):
    """`solar-merge yaml CONFIG OUT`: with every mergekit-yaml option, parsed by mergekit's own
    click decorator (seconds to import), or, with `mergekit_options=False`, with our own flags
    only (nothing of mergekit imported, for a config that may not need it)."""
    import click

    def command(config_file: str, out_path: str, allow_pickle: bool, overwrite: bool,
                no_fast: bool, merge_options=None):
        """Run a mergekit YAML config, with solar_average/solar_slerp and our fixes."""
        from solar_merge.outputs import overwriting

        options = {}
        if merge_options is not None:
            _apply_global_options(merge_options)
            options = merge_options.model_dump(exclude_defaults=True)
        if allow_pickle:
            options["allow_pickle"] = True
        with overwriting(overwrite):
            out = merge(config_file, out_path, options=options, label=config_file,
                        fast=not no_fast)
        click.echo(f"merged into {out}")

    cls = click.Command
    if mergekit_options:
        from mergekit.options import PrettyPrintHelp, add_merge_options

        command, cls = add_merge_options(command), PrettyPrintHelp
    for option in reversed([
            click.command("yaml", cls=cls),
            click.argument("config_file", type=click.Path(dir_okay=False)),
            click.argument("out_path", type=click.Path(file_okay=False)),
            click.option("--allow-pickle", is_flag=True,
                         help="Allow loading pickle (.bin) checkpoints (they can run code)."),
            click.option("--overwrite", is_flag=True,
                         help="Replace OUT_PATH even if solar-merge did not write it (its "
                              "contents are deleted)."),
            click.option("--no-fast", is_flag=True,
                         help="Merge with mergekit even when the config only slices and "
                              "stacks layers (solar-merge copies those tensor bytes itself).")]):
        command = option(command)
    return command


def multi_command():
    """mergekit-multi itself, with our methods registered, strict configs, absolute paths."""
    import click
    from mergekit.scripts.multimerge import main as multimerge

    class Multi(click.Command):
        def invoke(self, ctx):
            params = ctx.params
            # Relative intermediate folders make mergekit's card call the Hub: make absolute.
            params["intermediate_dir"] = os.path.abspath(params["intermediate_dir"])
            if params.get("out_path"):
                params["out_path"] = os.path.abspath(params["out_path"])
            _check_multi(params["config_file"])
            return super().invoke(ctx)

    return Multi(name="multi", params=multimerge.params, callback=multimerge.callback,
                 help=multimerge.help)


def _check_multi(config_file: str):
    text = read_text(config_file, what="merge config")
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except (yaml.YAMLError, RecursionError) as e:
        raise UserError(f"{config_file} is not valid YAML: {e}", fix="fix the YAML syntax") \
            from None
    names = {d.get("name") for d in docs if isinstance(d, dict)}
    base_dir = Path(config_file).absolute().parent
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            continue
        # Names of earlier documents stand for their outputs; skip those from file checks.
        doc = copy.deepcopy(doc)
        name = doc.pop("name", None)
        label = f"{config_file} document {i + 1}" + (f" ({name})" if name else "")
        if _references(doc, names - {None}):
            keys = set(doc) - TOP_KEYS
            if keys:
                raise UserError(f"{label}: unknown key(s) {', '.join(sorted(keys))}",
                                fix="remove or correct them")
            continue
        check_config(doc, base_dir, label=label)


def _references(value, names: set) -> bool:
    if isinstance(value, dict):
        return any(_references(v, names) for v in value.values())
    if isinstance(value, list):
        return any(_references(v, names) for v in value)
    return isinstance(value, str) and value in names
