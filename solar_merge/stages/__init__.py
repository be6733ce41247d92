"""Training stages (cpt, sft, dpo, stepwise_dpo) as thin wrappers around TRL's trainers.

A stage config (YAML) is validated by a strict pydantic schema; its `args:` mapping is passed
verbatim to `trl.SFTConfig` (cpt, sft) or `trl.DPOConfig` (dpo, stepwise_dpo). This module
imports neither torch nor TRL: `resolve()` is cheap, so that recipes can plan with it.

    stage: sft                 # cpt | sft | dpo | stepwise_dpo
    model: path/or/hub-id      # the model to train (relative paths: the YAML file's folder)
    ref_model: ...             # dpo / stepwise_dpo only; default: model
    datasets:                  # path (file, folder or Hub name), format, max_samples, split
      - {path: data/orca.jsonl, max_samples: 100000}
    trainable_layers: [20, 21] # optional: train only these decoder layers, freeze the rest;
                               # `new`: the layers the up-scale that made `model` created
    steps: 2                   # stepwise_dpo: number k of ordered data chunks
    keep_steps: false          # stepwise_dpo: keep every step's model under steps/step-<i>
    seq_len: 512               # cpt packing length; max_length of sft / dpo
    beta: 0.1                  # dpo / stepwise_dpo: shorthand for args.beta (TRL's DPOConfig.beta)
    output: out/sft            # optional default output folder (the CLI's -o wins)
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


class DatasetSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="local .jsonl/.json/.parquet/.txt file or folder, or Hub name")
    format: Literal[DATA_FORMATS] = "auto"  # type: ignore[valid-type]
    max_samples: int | None = Field(default=None, gt=0)
    split: str = "train"


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    stage: Literal[STAGES]  # type: ignore[valid-type]
    model: str
    ref_model: str | None = None
    datasets: list[DatasetSpec] = Field(min_length=1)
    eval_datasets: list[DatasetSpec] | None = None  # [UPSCALE] cpt: held-out text, TRL's eval
    trainable_layers: list[int] | Literal["new"] | None = None  # new: see upscale.py
    steps: int | None = Field(default=None, ge=1)
    keep_steps: bool = False
    seq_len: int | None = Field(default=None, gt=0)
    beta: float | None = Field(default=None, gt=0)
    output: str | None = None
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
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"stage config {path} not found", fix="check the path")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {e}", fix="fix the YAML syntax") from None
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
    """A deep copy in which no two places share an object. [UPSCALE] YAML anchors (`<<: *cpt`)
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
            model = DatasetSpec if "datasets" in [str(p) for p in err["loc"]] else StageConfig
            lines.append(f"unknown key `{loc}`{did_you_mean(name, model.model_fields)}")
        elif err["type"] == "missing":
            lines.append(f"missing key `{loc}`")
        else:
            lines.append(f"`{loc}`: {err['msg']}")
    return UserError(f"{where}: " + "; ".join(lines),
                     fix=f"valid keys: {', '.join(StageConfig.model_fields)}; dataset keys: "
                         f"{', '.join(DatasetSpec.model_fields)}")


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
    import json

    cfg = Path(model) / "config.json"
    if cfg.is_file():
        data = json.loads(cfg.read_text())
        return data.get("text_config") or data
    return None


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
    datasets = [dict(d.model_dump(), path=_resolve_path(d.path, base_dir, data=True)) for d in cfg.datasets]
    # [UPSCALE] eval_datasets: held-out text that TRL scores every args.eval_steps
    if cfg.eval_datasets is not None and (stage != "cpt" or not cfg.eval_datasets):
        raise UserError(f"eval_datasets: a held-out set is supported by cpt stages (not "
                        f"{stage}), and needs at least one dataset",
                        fix="remove eval_datasets, or list held-out text files")
    eval_sets = [dict(d.model_dump(), path=_resolve_path(d.path, base_dir, data=True))
                 for d in cfg.eval_datasets or []]

    # Checks we can make from config.json alone (local models).
    mcfg = _local_config(model)
    if mcfg and cfg.trainable_layers:
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

    # Our defaults: quiet, resumable, fp32 unless asked (TRL would turn bf16 on by itself).
    seq = cfg.seq_len
    if seq is not None and args.get("max_length", seq) != seq:
        raise UserError(f"seq_len ({seq}) and args.max_length ({args['max_length']}) disagree",
                        fix="set only one of them")
    defaults: dict[str, Any] = {"report_to": "none", "save_strategy": "steps",
                                "save_steps": 200, "save_total_limit": 2, "seed": 42,
                                "bf16": False, "disable_tqdm": False}
    if stage == "cpt":
        defaults.update(packing=True, packing_strategy="wrapped", max_length=seq or 512,
                        dataset_text_field="text", completion_only_loss=False)
    elif stage == "sft":
        defaults.update(completion_only_loss=True)
        if seq:
            defaults["max_length"] = seq
    elif seq:
        defaults["max_length"] = seq
    if args.get("fp16"):
        defaults.pop("bf16")
    args = {**defaults, **args}
    if stage == "cpt" and not args.get("packing"):
        pass  # allowed: plain causal LM without packing
    if args.get("max_length") is not None and seq is None:
        seq = args["max_length"]

    out = cfg.model_dump()
    out.update(model=model, ref_model=ref, datasets=datasets, args=args, seq_len=seq)
    if eval_sets:  # [UPSCALE] absent otherwise: resolved configs (and hashes) stay as they were
        out["eval_datasets"] = eval_sets
    else:
        out.pop("eval_datasets")
    out.pop("beta")  # lives in args.beta: one place in the resolved config
    if stage != "stepwise_dpo":
        out.pop("steps")
        out.pop("keep_steps")
    if out.get("output"):
        out["output"] = str((base_dir / os.path.expanduser(out["output"])).absolute())
    return out


def stage_hash(resolved: dict) -> str:
    """The hash that marks a finished stage: its config (the output folder aside) and what its
    inputs hold (model folders, data files), so retraining an input in place, or editing a
    data file, makes the stage run again."""
    from solar_merge.outputs import config_hash, fingerprint

    inputs = [resolved.get("model"), resolved.get("ref_model"),
              *(d["path"] for d in resolved.get("datasets") or []),
              *(d["path"] for d in resolved.get("eval_datasets") or [])]
    return config_hash({"config": {k: v for k, v in resolved.items() if k != "output"},
                        "inputs": {p: fingerprint(p) for p in inputs if p}})


def train(config: dict, out_dir=None, *, overrides=(), base_dir=None) -> Path:
    """Run one stage described by `config`; return the finished output folder.

    A finished stage with the same resolved config is not re-run; an interrupted one resumes
    from its last checkpoint."""
    resolved = resolve(config, overrides, base_dir)
    out_dir = out_dir or resolved.get("output")
    if not out_dir:
        raise UserError("no output folder for the stage",
                        fix="pass -o OUT (or set `output:` in the stage config)")
    from solar_merge.stages import common

    return common.run(resolved, Path(out_dir).absolute())


__all__ = [
    "STAGES",
    "DatasetSpec",
    "StageConfig",
    "apply_overrides",
    "load_stage_config",
    "resolve",
    "stage_hash",
    "train",
]
