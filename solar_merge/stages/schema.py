"""The stage config: a strict pydantic schema, `key=value` overrides, `resolve()` (paths,
defaults, checks) and the hash that marks a finished stage. Imports neither torch nor TRL:
recipes plan with it.

A stage config (YAML) names a model, its data and `args:`, passed verbatim to `trl.SFTConfig`
(cpt, sft) or `trl.DPOConfig` (dpo, stepwise_dpo):

    stage: sft                 # cpt | sft | dpo | stepwise_dpo
    model: path/or/hub-id      # the model to train (relative paths: the YAML file's folder)
    ref_model: ...             # dpo / stepwise_dpo only; default: model
    datasets:                  # path (file, folder or Hub name), format, max_samples, split
      - {path: data/orca.jsonl, max_samples: 100000}
    trainable_layers: [20, 21] # optional: train only these decoder layers, freeze the rest;
                               # `new`: the layers the up-scale that made `model` created;
                               # `all`: every decoder layer, embeddings/lm_head/final norm frozen
    steps: 2                   # stepwise_dpo: number k of ordered data chunks
    keep_steps: false          # stepwise_dpo: keep every step's model under steps/step-<i>
    seq_len: 512               # cpt packing length; max_length of sft / dpo
    beta: 0.1                  # dpo / stepwise_dpo: shorthand for args.beta (TRL's DPOConfig.beta)
    peft: {r: 16, lora_alpha: 32, target_modules: all-linear}   # LoRA: any peft.LoraConfig
                               # field; the output is still a full (merged) checkpoint
    keep_adapter: false        # with peft: also keep the adapter in OUT/adapter
    load_in_4bit: false        # with peft: QLoRA (bitsandbytes, needs a CUDA GPU)
    launch:                    # where it runs (solar-merge train CONFIG starts it), see
      num_processes: 8         # stages/launch.py: accelerate_config (TRL preset name or a
      accelerate_config: zero3 # file), num_processes (in all), num_machines, machine_rank,
                               # main_process_ip, main_process_port, device_memory
    output: out/sft            # optional default output folder (the CLI's -o wins)
    precision: auto            # auto | bf16 | fp16 | fp32 (solar_merge/precision.py): bf16 /
                               # fp16 autocast over fp32 weights, as TRL's args.bf16 / fp16;
                               # those args are read as this key, model_init_kwargs.dtype
                               # bfloat16 (bf16 weights) as bf16
    args:                      # trl.SFTConfig / trl.DPOConfig fields, e.g.
      learning_rate: 5.0e-5
      max_steps: 40
"""

import ast
import copy
import importlib.util
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from solar_merge.errors import UserError, did_you_mean
from solar_merge.precision import REQUESTS

STAGES = ("cpt", "sft", "dpo", "stepwise_dpo")
DATA_FORMATS = ("auto", "text", "alpaca", "openorca", "messages", "prompt_completion",
                "preference", "math_alignment", "math_instruct")
# Arguments we own: the output folder and resumption are managed by `train`.
_OWNED_ARGS = {
    "output_dir": "give the output folder to `train` / `solar-merge train -o` instead",
    "resume_from_checkpoint": "re-run the same stage: it resumes from its last checkpoint",
    "overwrite_output_dir": "a stage resumes or restarts by itself; remove the key",
}
_TRL_CONFIG = {"cpt": "SFTConfig", "sft": "SFTConfig", "dpo": "DPOConfig",
               "stepwise_dpo": "DPOConfig"}
# TRL's accelerate presets (trl/accelerate_configs/<name>.yaml), named as `trl sft` names them
PRESETS = ("zero1", "zero2", "zero3", "fsdp1", "fsdp2", "multi_gpu", "single_gpu")
# LoRA settings solar-merge sets: the stages train causal LMs
_OWNED_PEFT = {"task_type": "solar-merge sets CAUSAL_LM; remove the key"}


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="local .jsonl/.json/.parquet/.txt file or folder, or Hub name")
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    max_samples: int | None = Field(default=None, gt=0)
    split: str = "train"


class LaunchSpec(BaseModel):
    """Where the stage runs (stages/launch.py); the keys of `accelerate launch`."""

    model_config = ConfigDict(extra="forbid")

    accelerate_config: str | None = None   # TRL preset name (PRESETS) or a config file
    num_processes: int | None = None       # in all, over every machine (accelerate's meaning)
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int | None = None
    device_memory: str | int | None = None  # per device, e.g. 80GB: refuse what cannot fit


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal[STAGES]  # type: ignore[valid-type]
    model: str
    ref_model: str | None = None
    datasets: list[DatasetSpec] = Field(min_length=1)
    eval_datasets: list[DatasetSpec] | None = None  # cpt: held-out text, TRL's eval
    trainable_layers: list[int] | Literal["new", "all"] | None = None  # new: see upscale.py
    steps: int | None = Field(default=None, ge=1)
    keep_steps: bool = False
    seq_len: int | None = Field(default=None, gt=0)
    beta: float | None = Field(default=None, gt=0)
    peft: dict[str, Any] | None = None     # LoRA: peft.LoraConfig fields
    keep_adapter: bool = False
    load_in_4bit: bool = False             # QLoRA
    launch: LaunchSpec | None = None
    output: str | None = None
    precision: Literal[REQUESTS] = "auto"  # type: ignore[valid-type]
    args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("datasets", "eval_datasets", mode="before")
    @classmethod
    def _short_datasets(cls, value):
        if isinstance(value, (str, dict)):
            value = [value]
        if isinstance(value, list):
            return [{"path": v} if isinstance(v, str) else v for v in value]
        return value


def load_stage_config(path) -> dict:
    """Read a stage config YAML file into a mapping (relative paths: resolve against its folder)."""
    from solar_merge.readers import read_yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"stage config {path} not found", fix="check the path")
    data = read_yaml(path, what="stage config")
    if not isinstance(data, dict):
        raise UserError(f"{path} must be a mapping with `stage:`, `model:`, `datasets:`",
                        fix="see training/sft.yaml for an example")
    return data


# -- overrides -----------------------------------------------------------------------------

def apply_overrides(config: dict, overrides) -> dict:
    """`a.b=value` overrides (values parsed with yaml.safe_load) on a deep copy of `config`.
    A numeric key indexes a list: `datasets.0.max_samples=10`."""
    import yaml

    config = _unshared(dict(config))
    for item in overrides or ():
        key, sep, raw = str(item).partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"override `{item}` is not key=value",
                            fix="write e.g. args.learning_rate=1e-4 or seq_len=256")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        value = _number(value)
        parts = key.split(".")
        node: Any = config
        for depth, part in enumerate(parts[:-1]):
            nxt = _child(node, part, key)
            if nxt is None:
                nxt = {}
                _set(node, part, nxt, key)
            node = nxt
            if not isinstance(node, (dict, list)):
                raise UserError(f"override `{key}`: `{'.'.join(parts[:depth + 1])}` is not a "
                                "mapping", fix="check the key")
        _set(node, parts[-1], value, key)
    return config


def _unshared(value):
    """A deep copy in which no two places share an object. YAML anchors (`<<: *cpt`)
    make stages share their `args` mapping, and deepcopy keeps the sharing: an override of one
    stage's args would change every stage's."""
    if isinstance(value, dict):
        return {k: _unshared(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_unshared(v) for v in value]
    return copy.deepcopy(value)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _number(value):
    """YAML 1.1 reads `1e-4` (no dot) as a string; every such value here means a float."""
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def _child(node, part, key):
    if isinstance(node, list):
        return node[_index(node, part, key)]
    return node.get(part)


def _set(node, part, value, key):
    if isinstance(node, list):
        node[_index(node, part, key)] = value
    else:
        node[part] = value


def _index(node: list, part: str, key: str) -> int:
    try:
        i = int(part)
        node[i]
        return i
    except (ValueError, IndexError):
        raise UserError(f"override `{key}`: `{part}` is not an index of a list of {len(node)}",
                        fix=f"use an index from 0 to {len(node) - 1}") from None


# -- validation ----------------------------------------------------------------------------

def _pydantic_error(e: ValidationError, where: str) -> UserError:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            name = str(err["loc"][-1])
            where_ = [str(p) for p in err["loc"]]
            model = (DatasetSpec if "datasets" in where_ or "eval_datasets" in where_
                     else LaunchSpec if "launch" in where_ else StageConfig)
            lines.append(f"unknown key `{loc}`{did_you_mean(name, model.model_fields)}")
        elif err["type"] == "missing":
            lines.append(f"missing key `{loc}`")
        else:
            lines.append(f"`{loc}`: {err['msg']}")
    return UserError(f"{where}: " + "; ".join(lines),
                     fix=f"valid keys: {', '.join(StageConfig.model_fields)}; dataset keys: "
                         f"{', '.join(DatasetSpec.model_fields)}; launch keys: "
                         f"{', '.join(LaunchSpec.model_fields)}")


_FIELD_CACHE: dict[str, set] = {}


def trl_fields(stage: str) -> set[str]:
    """The init fields of the TRL config class for `stage`, read from TRL's and transformers'
    source files (ast), without importing torch or TRL."""
    cls = _TRL_CONFIG[stage]
    if cls not in _FIELD_CACHE:
        names: set[str] = set()
        for pkg, rel, name in (("transformers", "training_args.py", "TrainingArguments"),
                               ("trl", "trainer/base_config.py", "_BaseConfig"),
                               ("trl", f"trainer/{cls[:-6].lower()}_config.py", cls)):
            spec = importlib.util.find_spec(pkg)
            tree = ast.parse(Path(spec.submodule_search_locations[0], rel).read_text())
            for node in tree.body:
                if isinstance(node, ast.ClassDef) and node.name == name:
                    names |= {n.target.id for n in node.body if isinstance(n, ast.AnnAssign)
                              and isinstance(n.target, ast.Name)
                              and not n.target.id.startswith("_")}
        _FIELD_CACHE[cls] = names
    return _FIELD_CACHE[cls]


def check_args(stage: str, args: dict, where: str = "args") -> None:
    for key in args:
        if key in _OWNED_ARGS:
            raise UserError(f"{where}.{key} is set by solar-merge", fix=_OWNED_ARGS[key])
    valid = trl_fields(stage)
    unknown = [k for k in args if k not in valid]
    if unknown:
        k = unknown[0]
        raise UserError(f"{where}.{k} is not a trl.{_TRL_CONFIG[stage]} argument"
                        f"{did_you_mean(k, valid)}",
                        fix=f"use a field of trl.{_TRL_CONFIG[stage]} / "
                            "transformers.TrainingArguments")


def _class_fields(pkg: str, rel: str, names: tuple[str, ...]) -> set[str]:
    """Annotated fields of the named classes in a package's source file (ast; no import)."""
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        return set()
    tree = ast.parse(Path(spec.submodule_search_locations[0], rel).read_text())
    return {n.target.id for node in tree.body if isinstance(node, ast.ClassDef)
            and node.name in names for n in node.body if isinstance(n, ast.AnnAssign)
            and isinstance(n.target, ast.Name) and not n.target.id.startswith("_")}


def lora_fields() -> set[str]:
    """The fields of peft.LoraConfig (and its bases), read from peft's source files."""
    if "LoraConfig" not in _FIELD_CACHE:
        _FIELD_CACHE["LoraConfig"] = (_class_fields("peft", "tuners/lora/config.py",
                                                    ("LoraConfig",))
                                      | _class_fields("peft", "config.py",
                                                      ("PeftConfig", "PeftConfigMixin")))
    return _FIELD_CACHE["LoraConfig"]


def check_peft(peft: dict, where: str = "peft") -> None:
    fields = lora_fields()
    if not fields:
        raise UserError("peft (LoRA) needs the `peft` package", fix="pip install peft")
    for key in peft:
        if key in _OWNED_PEFT:
            raise UserError(f"{where}.{key} is set by solar-merge", fix=_OWNED_PEFT[key])
        if key not in fields:
            raise UserError(f"{where}.{key} is not a peft.LoraConfig field"
                            f"{did_you_mean(key, fields)}",
                            fix="use LoraConfig's fields, e.g. r, lora_alpha, lora_dropout, "
                                "target_modules (a list, or all-linear)")


def check_launch(launch, base_dir: Path) -> dict | None:
    """The `launch:` mapping checked (numbers, the preset or file, the device memory)."""
    if launch is None:
        return None
    out = launch.model_dump(exclude_none=True) if hasattr(launch, "model_dump") else dict(launch)
    n = out.get("num_processes")
    if n is not None and n < 1:
        raise UserError(f"launch.num_processes is {n}: it must be at least 1",
                        fix="give the number of processes in all (one per GPU), e.g. "
                            "--num-processes 8")
    m = out.get("num_machines", 1)
    if m < 1 or not 0 <= out.get("machine_rank", 0) < m:
        raise UserError(f"launch: machine_rank {out.get('machine_rank', 0)} of num_machines {m}"
                        " is not possible", fix="num_machines >= 1, machine_rank from 0 to "
                                                "num_machines - 1 (a different one per machine)")
    if m > 1 and not out.get("main_process_ip"):
        raise UserError(f"launch: {m} machines need the address of machine 0",
                        fix="add --main-process-ip (and --main-process-port) on every machine")
    if n is not None and n < m:
        raise UserError(f"launch: {n} processes cannot cover {m} machines",
                        fix="num_processes counts all processes of all machines "
                            "(accelerate's meaning): e.g. 16 for 2 machines of 8 GPUs")
    config = out.get("accelerate_config")
    if config is not None:
        path = Path(os.path.expanduser(str(config)))
        path = path if path.is_absolute() else base_dir / path
        if path.is_file():
            out["accelerate_config"] = str(path.absolute())
        elif config not in PRESETS:
            raise UserError(f"launch.accelerate_config `{config}` is neither a file nor one of "
                            f"TRL's presets{did_you_mean(str(config), PRESETS)}",
                            fix=f"use one of {', '.join(PRESETS)}, or the path of an "
                                "accelerate config file (`accelerate config` writes one)")
    if out.get("device_memory") is not None:
        from solar_merge.memory import parse_bytes

        try:
            out["device_memory"] = parse_bytes(out["device_memory"])
        except ValueError:
            raise UserError(f"launch.device_memory `{out['device_memory']}` is not a size",
                            fix="write it like 80GB, 24GiB or a number of bytes") from None
    return out


def _resolve_path(value: str, base_dir: Path, data: bool = False) -> str:
    """An absolute path for a local model/data path, the value itself for a Hub name.

    A path that does not exist yet is fine here (in a recipe it is an earlier stage's output);
    `train()` checks existence before it starts. `owner/name` that does not exist locally (and
    whose first part is not a local folder) is taken for a Hub name."""
    p = Path(os.path.expanduser(value))
    if not p.is_absolute():
        p = base_dir / p
    p = Path(os.path.normpath(p.absolute()))  # `a/../b` and `b` are one input (hashes)
    if p.exists():
        return str(p)
    first = value.split("/")[0]
    local = (value.startswith((".", "/", "~")) or value.count("/") > 1
             or (value.count("/") == 1 and first and (base_dir / first).is_dir())
             or (data and Path(value).suffix in (".jsonl", ".json", ".parquet", ".txt")))
    return str(p.absolute()) if local else value


def _local_config(model: str) -> dict | None:
    """The integer fields of a local model's config.json that resolve() checks (damaged
    files: a UserError naming the file, from checkpoints.read_config)."""
    from solar_merge.checkpoints import read_config

    if not (Path(model) / "config.json").is_file():
        return None
    data = read_config(model)
    text = data.get("text_config") if isinstance(data.get("text_config"), dict) else data
    return {k: v for k in ("num_hidden_layers", "vocab_size")
            if isinstance(v := text.get(k), int) and not isinstance(v, bool)}


# Override keys whose values are paths: on a command line, they are typed relative to the
# current folder, not to the stage config's.
_PATH_KEYS = re.compile(r"(model|ref_model|output|args\.chat_template_path"
                        r"|(eval_)?datasets\.\d+\.path)")


def command_line_overrides(overrides, cwd=None) -> list[str]:
    """`overrides` with each relative path value (model=, datasets.0.path=, output=, ...) made
    absolute against `cwd` (default: the current folder), a Hub name left as it is."""
    cwd = Path(cwd or os.getcwd()).absolute()
    out = []
    for o in overrides:
        key, eq, value = str(o).partition("=")
        if eq and value and _PATH_KEYS.fullmatch(key.strip()) and value[0] not in "[{'\"":
            if key.strip() == "output":
                value = str(Path(os.path.normpath(cwd / os.path.expanduser(value))))
            else:
                value = _resolve_path(value, cwd, data="datasets" in key)
            o = f"{key}={value}"
        out.append(o)
    return out


def resolve(config: dict, overrides=(), base_dir=None) -> dict:
    """The validated, fully resolved stage config (JSON-able): overrides applied, paths
    absolute, our defaults filled into `args`. Imports neither torch nor TRL."""
    if not isinstance(config, dict):
        raise UserError("a stage config must be a mapping", fix="see training/sft.yaml")
    base_dir = Path(base_dir or os.getcwd()).absolute()
    raw = apply_overrides(config, overrides)
    try:
        cfg = StageConfig.model_validate(raw)
    except ValidationError as e:
        raise _pydantic_error(e, f"stage config ({raw.get('stage', '?')})") from None
    stage = cfg.stage
    if cfg.ref_model is not None and stage not in ("dpo", "stepwise_dpo"):
        raise UserError(f"ref_model is only used by dpo and stepwise_dpo, not {stage}",
                        fix="remove ref_model")
    if cfg.steps is not None and stage != "stepwise_dpo":
        raise UserError(f"steps (number of data chunks) is only used by stepwise_dpo, not {stage}",
                        fix="remove steps, or use args.max_steps for the number of updates")
    if cfg.beta is not None and stage not in ("dpo", "stepwise_dpo"):
        raise UserError(f"beta is only used by dpo and stepwise_dpo, not {stage}",
                        fix="remove beta")
    if cfg.peft is not None:
        check_peft(cfg.peft)
        if cfg.trainable_layers is not None:
            raise UserError("trainable_layers and peft both choose what is trained",
                            fix="keep one: peft's layers_to_transform restricts LoRA to layers")
    elif cfg.keep_adapter or cfg.load_in_4bit:
        raise UserError(f"{'keep_adapter' if cfg.keep_adapter else 'load_in_4bit'} is a LoRA "
                        "setting, and the stage has no `peft:`",
                        fix="add peft: {r: 16, lora_alpha: 32}, or remove the key")
    if stage == "stepwise_dpo" and cfg.steps is None:
        cfg.steps = 2
    if cfg.trainable_layers == "new":  # the layers the up-scale that made `model` created
        from solar_merge.upscale import resolve_new_layers

        cfg.trainable_layers = resolve_new_layers(_resolve_path(cfg.model, base_dir))
    if isinstance(cfg.trainable_layers, list):
        if not cfg.trainable_layers:
            raise UserError("trainable_layers is empty: nothing would be trained",
                            fix="list layer indices, or remove the key to train everything")
        if any(i < 0 for i in cfg.trainable_layers):
            raise UserError("trainable_layers holds a negative index", fix="indices start at 0")
        cfg.trainable_layers = sorted(set(cfg.trainable_layers))

    args = {k: _number(v) for k, v in cfg.args.items()}
    if "activation_checkpointing" not in trl_fields(stage):
        # transformers before 5.23 calls the same setting `gradient_checkpointing` (5.23 keeps
        # that name as an alias): recipes written for either run on both
        for key in ("activation_checkpointing", "activation_checkpointing_kwargs"):
            if key in args:
                args[key.replace("activation", "gradient")] = args.pop(key)
    check_args(stage, args)
    if isinstance(args.get("chat_template_path"), str):  # a .jinja file or a tokenizer
        args["chat_template_path"] = _resolve_path(args["chat_template_path"], base_dir)
    if cfg.beta is not None:
        if args.get("beta", cfg.beta) != cfg.beta:
            raise UserError(f"beta ({cfg.beta}) and args.beta ({args['beta']}) disagree",
                            fix="set only one of them")
        args["beta"] = cfg.beta
    model = _resolve_path(cfg.model, base_dir)
    ref = None
    if stage in ("dpo", "stepwise_dpo"):
        ref = _resolve_path(cfg.ref_model, base_dir) if cfg.ref_model else model
        if cfg.peft is not None and ref != model:
            raise UserError(f"ref_model {ref}: with peft, TRL scores the reference with the "
                            "adapter switched off, i.e. the model itself",
                            fix="remove ref_model (or set it to the model)")
    launch = check_launch(cfg.launch, base_dir)
    datasets = [dict(d.model_dump(), path=_resolve_path(d.path, base_dir, data=True))
                for d in cfg.datasets]
    # eval_datasets: held-out text that TRL scores every args.eval_steps
    if cfg.eval_datasets is not None and (stage != "cpt" or not cfg.eval_datasets):
        raise UserError(f"eval_datasets: a held-out set is supported by cpt stages (not "
                        f"{stage}), and needs at least one dataset",
                        fix="remove eval_datasets, or list held-out text files")
    eval_sets = [dict(d.model_dump(), path=_resolve_path(d.path, base_dir, data=True))
                 for d in cfg.eval_datasets or []]

    # Checks we can make from config.json alone (local models).
    mcfg = _local_config(model)
    if mcfg and isinstance(cfg.trainable_layers, list):
        n = mcfg.get("num_hidden_layers")
        if n is not None and cfg.trainable_layers[-1] >= n:
            raise UserError(f"trainable_layers: layer {cfg.trainable_layers[-1]} does not exist, "
                            f"{model} has {n} layers (0..{n - 1})",
                            fix="choose layer indices below num_hidden_layers")
    rcfg = _local_config(ref) if ref and ref != model else None
    if mcfg and rcfg and mcfg.get("vocab_size") != rcfg.get("vocab_size"):
        raise UserError(f"ref_model {ref} has vocab_size {rcfg.get('vocab_size')}, the model "
                        f"{model} has {mcfg.get('vocab_size')}: DPO compares their "
                        "log-probabilities token by token",
                        fix="use a reference model with the same tokenizer/vocabulary "
                            "(usually the SFT model that `model` starts from)")

    args, request = fold_precision(cfg.precision, args)
    # Our defaults: quiet, resumable; bf16/fp16 are the precision decision's (train time).
    seq = cfg.seq_len
    if seq is not None and args.get("max_length", seq) != seq:
        raise UserError(f"seq_len ({seq}) and args.max_length ({args['max_length']}) disagree",
                        fix="set only one of them")
    defaults: dict[str, Any] = {"report_to": "none", "save_strategy": "steps",
                                "save_steps": 200, "save_total_limit": 2, "seed": 42,
                                "disable_tqdm": False}
    if stage == "cpt":
        defaults.update(packing=True, packing_strategy="wrapped", max_length=seq or 512,
                        dataset_text_field="text", completion_only_loss=False)
    elif stage == "sft":
        defaults.update(completion_only_loss=True)
        if seq:
            defaults["max_length"] = seq
    elif seq:
        defaults["max_length"] = seq
    args = {**defaults, **args}
    if stage == "cpt" and not args.get("packing"):
        pass  # allowed: plain causal LM without packing
    if args.get("max_length") is not None and seq is None:
        seq = args["max_length"]

    out = cfg.model_dump()
    out.update(model=model, ref_model=ref, datasets=datasets, args=args, seq_len=seq,
               precision=request)
    if eval_sets:  # absent otherwise: a stage without held-out text hashes without the key
        out["eval_datasets"] = eval_sets
    else:
        out.pop("eval_datasets")
    out.pop("beta")  # lives in args.beta: one place in the resolved config
    # unset LoRA and launch keys stay out, so configs (and hashes) without them are unchanged
    for key in ("peft", "keep_adapter", "load_in_4bit"):
        if not out[key]:
            out.pop(key)
    out.pop("launch")
    if launch:
        out["launch"] = launch
    if stage != "stepwise_dpo":
        out.pop("steps")
        out.pop("keep_steps")
    if out.get("output"):
        out["output"] = str((base_dir / os.path.expanduser(out["output"])).absolute())
    return out


def fold_precision(stated: str, args: dict) -> tuple[dict, str]:
    """(args without bf16/fp16, the precision request): the stage's `precision:`, else what
    TRL's args.bf16 / args.fp16 or a 16-bit model_init_kwargs.dtype ask for, else auto;
    SOLAR_MERGE_PRECISION over all of them (it also loads 16-bit weights in float32 unless
    it forces their own format). Disagreeing settings are a UserError."""
    from solar_merge import precision

    args = dict(args)
    flags = {k: args.pop(k) for k in ("bf16", "fp16") if args.get(k) is not None}
    init = args.get("model_init_kwargs")
    dtype = (init.get("dtype") or init.get("torch_dtype")) if isinstance(init, dict) else None
    weights = {"bfloat16": "bf16", "float16": "fp16"}.get(str(dtype).removeprefix("torch."))
    on = [k for k, v in flags.items() if v]
    if len(on) == 2:
        raise UserError("args.bf16 and args.fp16 are both true", fix="keep one, or set "
                        "`precision:` (auto, bf16, fp16, fp32) instead of both")
    if weights and on and on[0] != weights:
        raise UserError(f"args.model_init_kwargs.dtype {dtype} and args.{on[0]}: true disagree",
                        fix="remove one of them")
    from_args = on[0] if on else weights or ("fp32" if flags else None)
    if stated != "auto" and from_args not in (None, stated):
        source = (f"args.{on[0]}: true" if on else f"args.model_init_kwargs.dtype {dtype}"
                  if weights else ", ".join(f"args.{k}: false" for k in flags))
        raise UserError(f"precision: {stated} and {source} disagree",
                        fix=f"set only one of them (`precision: {stated}` sets TRL's "
                            "bf16/fp16: autocast over fp32 weights)")
    request = stated if stated != "auto" else from_args or "auto"
    forced = precision.forced()
    if forced:
        request = forced
        if weights and weights != forced:
            args["model_init_kwargs"] = {k: v for k, v in init.items()
                                         if k not in ("dtype", "torch_dtype")}
    return args, request


def stage_hash(resolved: dict) -> str:
    """The hash that marks a finished stage: its config (the output folder aside) and what its
    inputs hold (model folders, data files), so retraining an input in place, or editing a
    data file, makes the stage run again."""
    from solar_merge.outputs import config_hash, fingerprint

    inputs = [resolved.get("model"), resolved.get("ref_model"),
              *(d["path"] for d in resolved.get("datasets") or []),
              *(d["path"] for d in resolved.get("eval_datasets") or [])]
    # where it runs (launch) does not change what a finished stage holds
    return config_hash({"config": {k: v for k, v in resolved.items()
                                   if k not in ("output", "launch")},
                        "inputs": {p: fingerprint(p) for p in inputs if p}})
