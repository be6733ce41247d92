"""Recipes: one YAML file of named stages (upscale, train, merge, eval), run in dependency order.

    # solar-merge run training/demo.yaml
    name: demo
    out: runs/demo                 # output root (relative: the recipe's folder); --out wins
    final: dpo                     # the pipeline's final model (gets the recipe card)
    stages:
      dus:   {upscale: {model: HuggingFaceTB/SmolLM2-135M-Instruct, drop: 8}}
      cpt:   {train: {stage: cpt, model: dus, datasets: [data/corpus.txt]}}
      avg:   {merge: {merge_method: solar_average, models: [{model: cpt, ...}, ...]}}
      slerp: {merge: {file: ../merge_configs/sft_slerp.yaml, models: [...]}}
      dpo:   {train: {stage: dpo, model: avg, datasets: [...]}}
      eval:  {eval: {models: [dus, cpt, dpo], perplexity: {text: data/heldout.txt}}}

Each stage has exactly one kind. A model field whose value is a stage name stands for that
stage's output folder `<out>/<stage>` and makes it a dependency; any other value is a local
path (relative to the recipe file; for `merge: {file: ...}`, relative to that file) or a Hub
id. A `merge` stage is a mergekit config, inline or `file:` (inline keys replace the file's
top-level keys, `key: null` removes one) plus optional mergekit `options:`.

Resume: each stage's config is resolved (paths absolute, stage references replaced by their
output folder *and* their hash) and hashed. A stage whose output is complete and stamped
with the same hash (`recipe_stage.json`) is skipped; a changed stage re-runs, and so does
everything downstream (their hashes include it). Planning imports neither torch nor mergekit
and never downloads weights (Hub models: config.json at most).
"""

import copy
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from solar_merge.checkpoints import ModelInfo, human, is_hub_id, read_config
from solar_merge.errors import UserError, did_you_mean
from solar_merge.outputs import MARKER, atomic_output, config_hash, is_complete, partial_dir

KINDS = ("upscale", "train", "merge", "eval")
MODEL_KINDS = ("upscale", "train", "merge")
STAMP = "recipe_stage.json"  # inside a finished stage folder: {"stage", "recipe_hash"}
STATE = ".recipe_state.json"  # in the output root: stage -> hash of the config last started
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# -- schema ----------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpscaleSpec(_Strict):
    model: str
    method: Literal["dus", "expand", "repeat"] = "dus"  # repeat: all 2n layers, a baseline
    drop: int | None = Field(default=None, ge=0, description="DUS: layers m dropped per copy")
    every: int | None = Field(default=None, ge=1, description="expand: a new block every N")
    options: dict[str, Any] = Field(default_factory=dict)  # mergekit MergeOptions fields

    @model_validator(mode="after")
    def _method_fields(self):
        if self.method == "dus" and (self.drop is None or self.every is not None):
            raise ValueError("method dus needs `drop` (and no `every`)")
        if self.method == "expand" and (self.every is None or self.drop is not None):
            raise ValueError("method expand needs `every` (and no `drop`)")
        if self.method == "repeat" and (self.every is not None or self.drop is not None):
            raise ValueError("method repeat takes neither `drop` nor `every`")
        return self


class Stage(_Strict):
    upscale: UpscaleSpec | None = None
    train: dict[str, Any] | None = None  # a stage config (solar_merge.stages), minus `output`
    merge: dict[str, Any] | None = None  # a mergekit config, or {file: ...} (+ overrides)
    eval: dict[str, Any] | None = None   # {models: [...], <solar_merge.evaluate spec>}

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @model_validator(mode="after")
    def _one_kind(self):
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a stage has exactly one of {', '.join(KINDS)}"
                             + (f" (found {', '.join(given)})" if given else ""))
        return self


class Recipe(_Strict):
    name: str = "recipe"
    description: str | None = None
    license: str | None = None
    out: str | None = None
    final: str | None = None
    stages: dict[str, Stage] = Field(min_length=1)


def _schema_error(e: ValidationError, label: str) -> UserError:
    lines = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc)
        if err["type"] == "extra_forbidden":
            model = Recipe if len(loc) == 1 else Stage if len(loc) == 3 else UpscaleSpec
            lines.append(f"{path}: unknown key{did_you_mean(loc[-1], model.model_fields)}; "
                         f"allowed here: {', '.join(model.model_fields)}")
        elif err["type"] == "missing":
            lines.append(f"{path}: missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {msg}" if path else msg)
    return UserError(f"{label}: " + "\n  ".join(lines),
                     fix="correct the keys named above (see training/solar_10.7b.yaml)")


# -- loading ---------------------------------------------------------------------------------

@dataclass
class Loaded:
    data: dict          # the recipe mapping, overrides applied
    recipe: Recipe
    base_dir: Path      # relative paths resolve against it
    label: str


def load(source, overrides=(), *, base_dir=None) -> Loaded:
    """A recipe from a file, an output folder, a URL or a Hub repo (hub.load_recipe_text),
    or a mapping; `overrides` are `dotted.key=value` strings (values parsed as YAML)."""
    if isinstance(source, dict):
        data, label = copy.deepcopy(source), "recipe"
        base = Path(base_dir or os.getcwd())
    else:
        path = Path(os.path.expanduser(str(source)))
        if path.is_file():
            text, label = path.read_text(), str(source)
            base = path.absolute().parent
        else:
            try:
                from solar_merge.hub import load_recipe_text
            except ImportError:  # pragma: no cover - hub.py is optional for local files
                raise UserError(f"recipe {source} not found", fix="check the path") from None
            text, label = load_recipe_text(str(source))
            base = Path(os.getcwd())  # a recipe from a folder, URL or Hub repo: paths are ours
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"{label} is not valid YAML: {e}",
                            fix="fix the YAML syntax at the line shown") from None
        if base_dir is not None:
            base = Path(base_dir)
    if not isinstance(data, dict):
        raise UserError(f"{label} must be a mapping with `stages:`",
                        fix="see training/solar_10.7b.yaml for an example")
    if overrides:
        from solar_merge.stages import apply_overrides

        data = apply_overrides(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _schema_error(e, label) from None
    return Loaded(data, recipe, base.absolute(), label)


# -- planning --------------------------------------------------------------------------------

@dataclass
class StagePlan:
    name: str
    kind: str
    out_dir: Path
    deps: list[str]
    inputs: list[str]                   # as written (stage names or models)
    config: dict                        # resolved: what the runner executes
    hash: str = ""
    info: ModelInfo | None = None       # predicted output model (None: unknown or eval)
    params_estimated: bool = False
    memory: int | None = None           # bytes, a rough estimate
    memory_note: str = ""
    base_dir: Path | None = None        # for relative paths left inside `config`


@dataclass
class Plan:
    name: str
    label: str
    out: Path
    order: list[str]
    stages: dict[str, StagePlan]
    final: str | None
    notes: list[str] = field(default_factory=list)
    recipe_yaml: str = ""
    loaded: Loaded | None = None


class _Planner:
    def __init__(self, loaded: Loaded, out):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.base = loaded.base_dir
        root = out if out is not None else (self.recipe.out or f"runs/{self.recipe.name}")
        root = Path(os.path.expanduser(str(root)))
        # --out is relative to where the command runs; the recipe's `out:` to its file
        root = root if root.is_absolute() or out is not None else self.base / root
        self.out = Path(os.path.normpath(root.absolute()))
        self.names = list(self.recipe.stages)
        self.problems: list[str] = []
        self.notes: list[str] = []
        self._infos: dict[str, ModelInfo | None] = {}
        self._est: set[str] = set()  # refs whose parameter count is estimated from config.json

    # references ----------------------------------------------------------------------------
    def ref(self, where: str, value, deps: list[str], base: Path, *, stage_only=False):
        """A stage name -> its output folder (recorded as a dependency); else a local path
        (absolute) or a Hub id. Problems are collected, not raised."""
        if not isinstance(value, str) or not value:
            self.problems.append(f"{where}: expected a stage name, a model folder or a Hub id, "
                                 f"got {value!r}")
            return value
        if value in self.recipe.stages:
            if value not in deps:
                deps.append(value)
            return str(self.out / value)
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else base / path
        if path.exists() and not stage_only:
            return os.path.normpath(path.absolute())
        if is_hub_id(value) and not stage_only:
            return value
        hint = did_you_mean(value, self.names)
        kind = "stage" if stage_only else "stage, model folder or Hub id"
        self.problems.append(f"{where}: `{value}` is not a known {kind}{hint}; stages: "
                             f"{', '.join(self.names)}")
        return value

    def info(self, ref: str, deps_plans: dict[str, StagePlan]) -> ModelInfo | None:
        for plan in deps_plans.values():
            if str(plan.out_dir) == ref:
                return plan.info
        if ref not in self._infos:
            from solar_merge.checkpoints import model_info

            try:
                source = ref
                if is_hub_id(ref) and not _hub_reachable():  # skip the Hub's retries (~25 s)
                    source = _cached_config_dir(ref)
                    if source is None:
                        raise UserError("offline")
                info = dataclasses.replace(model_info(source), source=ref)
                if info.params is None:
                    info = _with_estimate(info, source)
                    self._est.add(ref)
            except UserError as e:
                info = None
                if is_hub_id(ref):
                    self.notes.append(f"sizes of `{ref}` unknown (offline: config.json could "
                                      "not be fetched)")
                else:
                    self.problems.append(_first(e))
            self._infos[ref] = info
        return self._infos[ref]

    def estimated(self, refs, deps_plans: dict[str, StagePlan]) -> bool:
        outs = {str(p.out_dir): p for p in deps_plans.values()}
        return any(outs[r].params_estimated if r in outs else r in self._est for r in refs)

    # the graph -----------------------------------------------------------------------------
    def order(self, deps: dict[str, list[str]]) -> list[str]:
        order, state = [], {}

        def visit(name, path):
            if state.get(name) == "done":
                return
            if state.get(name) == "active":
                cycle = path[path.index(name):] + [name]
                raise UserError(f"stages form a cycle: {' -> '.join(cycle)}",
                                fix="a stage can only use the outputs of stages that do not "
                                    "depend on it")
            state[name] = "active"
            for d in deps[name]:
                visit(d, path + [name])
            state[name] = "done"
            order.append(name)

        for name in self.names:
            visit(name, [])
        return order

    def build(self) -> Plan:
        r = self.recipe
        raw = {}
        for name, stage in r.stages.items():
            if not _NAME.match(name):
                self.problems.append(f"stages.{name}: a stage name uses letters, digits, "
                                     "`_`, `-` and `.` only (it names a folder)")
            raw[name] = getattr(self, f"_{stage.kind}")(name, stage)
        for name, plan in raw.items():
            for d in plan.deps:
                if r.stages[d].kind == "eval":
                    self.problems.append(f"stages.{name}: uses `{d}`, an eval stage, as a "
                                         "model; name a model-producing stage")
        if r.final is not None and (r.final not in r.stages
                                    or r.stages[r.final].kind == "eval"):
            models = [n for n in self.names if r.stages[n].kind != "eval"]
            self.problems.append(f"final: `{r.final}` is not a model-producing stage"
                                 f"{did_you_mean(r.final, models)}; choose one of "
                                 f"{', '.join(models)}")
        if self.problems:  # unknown references make the graph meaningless
            raise self.error()
        order = self.order({n: p.deps for n, p in raw.items()})
        for name in order:  # hashes and sizes flow downstream
            plan = raw[name]
            deps_plans = {d: raw[d] for d in plan.deps}
            plan.hash = config_hash({"kind": plan.kind, "config": plan.config,
                                     "inputs": {d: raw[d].hash for d in plan.deps}})
            getattr(self, f"_size_{plan.kind}")(plan, deps_plans)
        if self.problems:
            raise self.error()
        final = r.final or next((n for n in reversed(order) if raw[n].kind != "eval"), None)
        return Plan(r.name, self.loaded.label, self.out, order, raw, final,
                    notes=list(dict.fromkeys(self.notes)),
                    recipe_yaml=yaml.safe_dump(self.loaded.data, sort_keys=False),
                    loaded=self.loaded)

    def error(self) -> UserError:
        return UserError(f"{self.loaded.label} has {len(self.problems)} problem(s):\n  - "
                         + "\n  - ".join(self.problems),
                         fix="correct the stages named above; nothing has been run")

    # stage kinds: resolve the config ---------------------------------------------------------
    def _upscale(self, name, stage):
        spec = stage.upscale
        deps: list[str] = []
        model = self.ref(f"stages.{name}.upscale.model", spec.model, deps, self.base)
        config = {**spec.model_dump(), "model": model}
        return StagePlan(name, "upscale", self.out / name, deps, [spec.model], config)

    def _train(self, name, stage):
        where = f"stages.{name}.train"
        cfg = copy.deepcopy(stage.train)
        from solar_merge.stages import DatasetSpec, StageConfig, resolve

        allowed = [k for k in StageConfig.model_fields if k != "output"]
        for key in cfg:
            if key not in allowed:
                extra = (" (the recipe places outputs under `out:`)" if key == "output"
                         else did_you_mean(str(key), allowed))
                self.problems.append(f"{where}.{key}: unknown key{extra}; allowed here: "
                                     f"{', '.join(allowed)}")
        for i, d in enumerate(cfg.get("datasets") or []):
            for key in d if isinstance(d, dict) else ():
                if key not in DatasetSpec.model_fields:
                    self.problems.append(f"{where}.datasets[{i}].{key}: unknown key"
                                         f"{did_you_mean(str(key), DatasetSpec.model_fields)}")
        deps: list[str] = []
        inputs = [cfg.get("model")] + ([cfg["ref_model"]] if cfg.get("ref_model") else [])
        for key in ("model", "ref_model"):
            if cfg.get(key) is not None:
                cfg[key] = self.ref(f"{where}.{key}", cfg[key], deps, self.base)
        resolved = cfg
        if not any(p.startswith(where + ".") for p in self.problems):
            try:
                resolved = resolve(cfg, (), self.base)
            except UserError as e:
                self.problems.append(f"{where}: {_first(e)}")
        for i, d in enumerate(resolved.get("datasets") or []):
            p = Path(str(d.get("path", ""))) if isinstance(d, dict) else Path()
            if p.is_absolute() and not p.exists():
                self.notes.append(f"{where}.datasets[{i}]: {os.path.normpath(p)} does not "
                                  "exist yet (needed when the stage runs)")
        return StagePlan(name, "train", self.out / name, deps, [str(i) for i in inputs],
                         resolved)

    def _merge(self, name, stage):
        from solar_merge.merging import TOP_KEYS

        where = f"stages.{name}.merge"
        spec = copy.deepcopy(stage.merge)
        options = spec.pop("options", None) or {}
        file_base, from_file = self.base, set()
        if "file" in spec:
            file = Path(os.path.expanduser(str(spec.pop("file"))))
            file = file if file.is_absolute() else self.base / file
            loaded = None
            if not file.is_file():
                self.problems.append(f"{where}.file: {file} not found")
            else:
                try:
                    loaded = yaml.safe_load(file.read_text())
                except yaml.YAMLError as e:
                    self.problems.append(f"{where}.file: {file} is not valid YAML: {e}")
            file_cfg = loaded if isinstance(loaded, dict) else {}
            file_cfg.pop("name", None)
            from_file = set(file_cfg) - set(spec)
            file_base = file.parent
            # inline keys replace the file's top-level keys; `key: null` removes one
            spec = {k: v for k, v in {**file_cfg, **spec}.items() if v is not None}
        allowed = TOP_KEYS | {"file", "options"}
        for key in spec:
            if key not in TOP_KEYS:
                w = f"{where}.file" if key in from_file else where
                self.problems.append(f"{w}.{key}: unknown key{did_you_mean(str(key), allowed)}"
                                     f"; allowed here: {', '.join(sorted(allowed))}")
        deps: list[str] = []
        inputs: list[str] = []
        config = self._merge_refs(where, spec, deps, inputs,
                                  lambda key: file_base if key in from_file else self.base)
        return StagePlan(name, "merge", self.out / name, deps, inputs,
                         {"merge": config, "options": options})

    def _merge_refs(self, where, config, deps, inputs, base_of):
        """Resolve every model field of a mergekit config (models, base_model, slices,
        modules) and check the keys around them (mergekit would ignore unknown ones)."""
        from solar_merge.merging import MODEL_KEYS, SLICE_KEYS, SOURCE_KEYS

        def keys(w, value, allowed):
            if not isinstance(value, dict):
                self.problems.append(f"{w}: expected a mapping, got {value!r}")
                return False
            for k in value:
                if k not in allowed:
                    self.problems.append(f"{w}.{k}: unknown key{did_you_mean(str(k), allowed)}"
                                         f"; allowed here: {', '.join(sorted(allowed))}")
            return True

        def walk(top, w, value):
            base = base_of(top)

            def one(wm, ref):
                if isinstance(ref, str) and ref not in inputs:
                    inputs.append(ref)
                return self.ref(wm, ref, deps, base)

            def models(wm, entries):
                if not isinstance(entries, list):
                    self.problems.append(f"{wm}: expected a list")
                    return
                for i, e in enumerate(entries):
                    if keys(f"{wm}[{i}]", e, MODEL_KEYS):
                        if "model" not in e:
                            self.problems.append(f"{wm}[{i}].model: missing")
                        else:
                            e["model"] = one(f"{wm}[{i}].model", e["model"])

            def slices(ws, entries):
                if not isinstance(entries, list):
                    self.problems.append(f"{ws}: expected a list")
                    return
                for i, s in enumerate(entries):
                    if not keys(f"{ws}[{i}]", s, SLICE_KEYS):
                        continue
                    if s.get("base_model"):
                        s["base_model"] = one(f"{ws}[{i}].base_model", s["base_model"])
                    for j, src in enumerate(s.get("sources") or []):
                        wj = f"{ws}[{i}].sources[{j}]"
                        if keys(wj, src, SOURCE_KEYS):
                            if "model" not in src:
                                self.problems.append(f"{wj}.model: missing")
                            else:
                                src["model"] = one(f"{wj}.model", src["model"])

            if top == "base_model":
                return one(w, value)
            if top == "models":
                models(w, value)
            elif top == "slices":
                slices(w, value)
            elif top == "modules" and isinstance(value, dict):
                for mname, module in value.items():
                    if keys(f"{w}.{mname}", module, {"slices", "models", "parameters"}):
                        if module.get("models") is not None:
                            models(f"{w}.{mname}.models", module["models"])
                        if module.get("slices") is not None:
                            slices(f"{w}.{mname}.slices", module["slices"])
            return value

        config = copy.deepcopy(config)
        for top in ("base_model", "models", "slices", "modules"):
            if config.get(top) is not None:
                config[top] = walk(top, f"{where}.{top}", config[top])
        return config

    def _eval(self, name, stage):
        where = f"stages.{name}.eval"
        spec = copy.deepcopy(stage.eval)
        models = spec.pop("models", None)
        deps: list[str] = []
        if not isinstance(models, list) or not models:
            self.problems.append(f"{where}.models: list the stages (or model folders) to "
                                 "evaluate")
            models = []
        resolved_models = {str(m): self.ref(f"{where}.models", m, deps, self.base)
                           for m in models}
        try:
            from solar_merge.evaluate import parse_spec

            parsed = parse_spec(spec, where=where, base_dir=self.base)
            spec = parsed.model_dump(mode="json", exclude_none=True)
            for metric, opts in spec.items():
                for v in opts.values():
                    if isinstance(v, str) and os.path.isabs(v) and not os.path.exists(v):
                        self.notes.append(f"{where}.{metric}: {os.path.normpath(v)} does "
                                          "not exist yet")
        except ImportError:  # pragma: no cover - evaluate.py not there
            pass
        except UserError as e:
            self.problems.append(_first(e))
        return StagePlan(name, "eval", self.out / name, deps, [str(m) for m in models],
                         {"models": resolved_models, "spec": spec})

    # stage kinds: predicted output sizes, shape checks, memory -------------------------------
    def _size_upscale(self, plan, deps_plans):
        c = plan.config
        src = self.info(c["model"], deps_plans)
        if src is None:
            return
        n = src.n_layers
        from solar_merge.upscale import check_drop, check_every

        try:
            if c["method"] == "repeat":
                s = 2 * n
            elif c["method"] == "dus":
                check_drop(n, c["drop"])
                s = 2 * (n - c["drop"])
            else:
                check_every(n, c["every"])
                s = n + n // c["every"]
        except UserError as e:
            self.problems.append(f"stages.{plan.name}.upscale: {_first(e)}")
            return
        plan.info = _resized(src, s, plan.out_dir)
        plan.params_estimated = self.estimated([c["model"]], deps_plans)
        per_layer = src.per_layer_params or 0
        plan.memory = _out_bytes(plan.info) + per_layer * src.dtype_bytes + _OVERHEAD
        plan.memory_note = "output tensors + one input layer at a time (lazy) + overhead"

    def _size_train(self, plan, deps_plans):
        c = plan.config
        if not isinstance(c.get("model"), str):
            return
        info = self.info(c["model"], deps_plans)
        if c.get("ref_model") and c["ref_model"] != c["model"]:
            ref = self.info(c["ref_model"], deps_plans)
            if info and ref and info.vocab_size != ref.vocab_size:
                self.problems.append(f"stages.{plan.name}.train.ref_model: vocabulary "
                                     f"{ref.vocab_size} differs from the model's "
                                     f"{info.vocab_size}")
        if info is None:
            return
        layers = c.get("trainable_layers") or []
        if layers and max(layers) >= info.n_layers:
            self.problems.append(f"stages.{plan.name}.train.trainable_layers: layer "
                                 f"{max(layers)} does not exist, the model has "
                                 f"{info.n_layers} layers (0..{info.n_layers - 1})")
        plan.info = dataclasses.replace(info, source=str(plan.out_dir))
        plan.params_estimated = self.estimated([c["model"]], deps_plans)
        args = c.get("args") or {}
        b = 2 if args.get("bf16") or args.get("fp16") else 4
        p = info.params or 0
        trainable = p if not layers else (info.per_layer_params or 0) * len(layers)
        batch = int(args.get("per_device_train_batch_size", 8))
        seq = int(c.get("seq_len") or args.get("max_length") or 1024)
        dpo = c.get("stage") in ("dpo", "stepwise_dpo")
        seqs = batch * (2 if dpo else 1)
        act = seqs * seq * (info.hidden_size * info.n_layers * 16 + info.vocab_size * 2) * b
        if args.get("gradient_checkpointing") or args.get("activation_checkpointing"):
            act //= 8
        plan.memory = p * b + 3 * trainable * b + act + (p * b if dpo else 0) + _OVERHEAD
        plan.memory_note = ("weights + grads + AdamW states (4 x params x bytes) + activations"
                            + (" + reference model" if dpo else ""))

    def _size_merge(self, plan, deps_plans):
        config = plan.config.get("merge") or {}
        where = f"stages.{plan.name}.merge"
        aligned = bool(config.get("tokenizer") or config.get("tokenizer_source"))

        def key(i):
            return i.shape_key()[:2] if aligned else i.shape_key()

        def label(ref):
            for n, p in deps_plans.items():
                if str(p.out_dir) == ref:
                    return n
            return ref

        def describe(ref, i):
            return (f"`{label(ref)}` (hidden {i.hidden_size}, mlp {i.intermediate_size}, "
                    f"vocab {i.vocab_size}, {i.n_layers} layers)")

        out_info, total, used = None, None, []
        if config.get("models"):
            refs = [m.get("model") for m in config["models"] if isinstance(m, dict)]
            if config.get("base_model"):
                refs.append(config["base_model"])
            infos = [(r, self.info(r, deps_plans)) for r in refs if isinstance(r, str)]
            used = [r for r, _ in infos]
            known = [(r, i) for r, i in infos if i is not None]
            for r, i in known[1:]:
                r0, i0 = known[0]
                if key(i) != key(i0) or i.n_layers != i0.n_layers:
                    self.problems.append(f"{where}: {describe(r, i)} cannot be merged with "
                                         f"{describe(r0, i0)}: merge models of the same "
                                         "architecture and size")
            if known and len(known) == len(infos):
                base = config.get("base_model")
                out_info = next((i for r, i in known if r == base), known[0][1])
                total = out_info.n_layers
        elif config.get("slices"):
            total, first, complete = 0, None, True
            for k, s in enumerate(config["slices"]):
                for j, src in enumerate(s.get("sources") or []):
                    ref, lr = src.get("model"), src.get("layer_range")
                    info = self.info(ref, deps_plans) if isinstance(ref, str) else None
                    used.append(ref)
                    if info is None:
                        complete = False
                        continue
                    if (isinstance(lr, list) and len(lr) == 2
                            and not 0 <= lr[0] < lr[1] <= info.n_layers):
                        self.problems.append(
                            f"{where}.slices[{k}].sources[{j}].layer_range: {lr} is outside "
                            f"`{label(ref)}`'s {info.n_layers} layers (end-exclusive)")
                    if first is None:
                        first = (ref, info)
                    elif key(info) != key(first[1]):
                        self.problems.append(f"{where}.slices[{k}]: {describe(ref, info)} "
                                             f"cannot be merged with {describe(*first)}")
                lr = (s.get("sources") or [{}])[0].get("layer_range")
                if isinstance(lr, list) and len(lr) == 2:
                    total += lr[1] - lr[0]
            out_info = first[1] if first and complete else None
        if out_info is None:
            return
        plan.info = _resized(out_info, total, plan.out_dir)
        dtype = config.get("out_dtype") or config.get("dtype")
        if dtype:
            plan.info = dataclasses.replace(plan.info, dtype=str(dtype))
        plan.params_estimated = self.estimated(used, deps_plans)
        n_inputs = max(1, len(plan.inputs))
        layer = (out_info.per_layer_params or 0) * out_info.dtype_bytes
        plan.memory = _out_bytes(plan.info) + n_inputs * layer + _OVERHEAD
        plan.memory_note = "output tensors + one layer per input at a time (lazy) + overhead"

    def _size_eval(self, plan, deps_plans):
        sizes = [self.info(m, deps_plans) for m in plan.config["models"].values()]
        known = [i.params for i in sizes if i is not None and i.params]
        if known:
            plan.memory = max(known) * 4 + _OVERHEAD
            plan.memory_note = "the largest model in fp32 (one model at a time)"


_REACHABLE: list[bool] = []


def _hub_reachable() -> bool:
    """False when offline (HF_HUB_OFFLINE, or the Hub's host does not answer within 3 s)."""
    if not _REACHABLE:
        from urllib.parse import urlparse

        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
            _REACHABLE.append(False)
        else:
            import socket

            host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
            try:
                socket.create_connection((host, 443), timeout=3).close()
                _REACHABLE.append(True)
            except OSError:
                _REACHABLE.append(False)
    return _REACHABLE[0]


def _cached_config_dir(repo_id: str) -> str | None:
    """The local snapshot folder holding a Hub model's cached config.json, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a broken cache is the same as no cache here
        return None
    return str(Path(path).parent) if isinstance(path, str) else None


def _first(e: UserError) -> str:
    """The message of a UserError without its `fix:` line (problems are listed together)."""
    return str(e.message).split("\n  fix:")[0]


_OVERHEAD = 500 * 2**20  # python + torch + libraries


def _resized(info: ModelInfo, n_layers: int, out_dir: Path) -> ModelInfo:
    return dataclasses.replace(info, source=str(out_dir), n_layers=n_layers,
                               params=info.params_with_layers(n_layers))


def _out_bytes(info: ModelInfo) -> int:
    return (info.params or 0) * info.dtype_bytes


def _with_estimate(info: ModelInfo, ref: str) -> ModelInfo:
    """Parameters of a Llama/Mistral-style model from config.json alone (Hub models: no
    weights are read). Marked as an estimate."""
    try:
        cfg = read_config(ref)
    except UserError:
        return info
    cfg = cfg.get("text_config") or cfg
    h, v = info.hidden_size, info.vocab_size
    inter = info.intermediate_size or 4 * h
    heads = int(cfg.get("num_attention_heads") or 1)
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or h // heads)
    attn = h * heads * head_dim * 2 + 2 * h * kv * head_dim
    per_layer = attn + 3 * h * inter + 2 * h
    params = v * h * (1 if info.tied else 2) + h + per_layer * info.n_layers
    out = dataclasses.replace(info, params=params, per_layer_params=per_layer)
    return out


def plan(source, out=None, overrides=(), *, base_dir=None) -> Plan:
    """Load and check a recipe without running anything; raise UserError on any problem."""
    loaded = source if isinstance(source, Loaded) else load(source, overrides,
                                                           base_dir=base_dir)
    return _Planner(loaded, out).build()


def format_plan(p: Plan) -> str:
    """The stage graph in run order, with sizes and memory estimates, for `validate`."""
    rows = [("#", "stage", "kind", "inputs", "layers", "params", "memory (est.)")]
    for i, name in enumerate(p.order, 1):
        s = p.stages[name]
        kind = s.kind
        if kind == "train":
            kind = f"train:{s.config.get('stage', '?')}"
        elif kind == "upscale":
            kind = f"upscale:{s.config.get('method')}"
        elif kind == "merge":
            kind = f"merge:{(s.config.get('merge') or {}).get('merge_method', '?')}"
        inputs = ", ".join(dict.fromkeys(s.inputs)) or "-"
        if len(inputs) > 48:
            inputs = inputs[:45] + "..."
        if s.kind == "eval":
            layers = params = "-"
        elif s.info is None:
            layers = params = "unknown (offline)"
        else:
            layers = str(s.info.n_layers)
            params = ("~" if s.params_estimated else "") + human(s.info.params)
        memory = ("~" + human(s.memory, "B")) if s.memory else "unknown"
        rows.append((str(i), name + (" (final)" if name == p.final else ""), kind, inputs,
                     layers, params, memory))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"recipe `{p.name}` ({p.label}): {len(p.order)} stages -> {p.out}"]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    notes = dict.fromkeys((s.kind, s.memory_note) for s in p.stages.values() if s.memory_note)
    if notes:
        lines.append("memory is a rough estimate of peak RAM (or GPU memory) per stage:")
        lines += [f"  {kind}: {note}" for kind, note in notes]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)


# -- running ---------------------------------------------------------------------------------

Runner = Callable[[StagePlan], Any]


def _run_upscale(st: StagePlan):
    from solar_merge import upscale

    c = st.config
    if c["method"] == "dus":
        return upscale.upscale(c["model"], c["drop"], st.out_dir, options=c["options"])
    if c["method"] == "repeat":
        return upscale.upscale(c["model"], 0, st.out_dir, options=c["options"],
                               allow_repeat=True)
    return upscale.expand(c["model"], c["every"], st.out_dir, options=c["options"])


def _run_train(st: StagePlan):
    from solar_merge.stages import train

    return train(st.config, st.out_dir, base_dir=st.base_dir)


def _run_merge(st: StagePlan):
    from solar_merge.merging import merge

    return merge(st.config["merge"], st.out_dir,
                 options=st.config["options"], label=f"stages.{st.name}.merge")


def _run_eval(st: StagePlan):
    from solar_merge.evaluate import evaluate

    results = {name: evaluate(path, st.config["spec"])
               for name, path in st.config["models"].items()}
    with atomic_output(st.out_dir, st.hash) as work:
        (work / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


RUNNERS: dict[str, Runner] = {"upscale": _run_upscale, "train": _run_train,
                              "merge": _run_merge, "eval": _run_eval}


def stage_done(st: StagePlan) -> bool:
    """Complete and stamped with this very config hash."""
    if not is_complete(st.out_dir):
        return False
    try:
        return json.loads((st.out_dir / STAMP).read_text())["recipe_hash"] == st.hash
    except (OSError, ValueError, KeyError):
        return False


def _state(out: Path) -> dict:
    try:
        return json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _prepare(st: StagePlan, out: Path) -> None:
    """Before (re-)running a stage: if its last start was for another config, nothing left of
    that run may be taken for this one (the tools' own markers do not see upstream changes)."""
    state = _state(out)
    if state.get(st.name) != st.hash:
        work = partial_dir(st.out_dir)
        if work.exists():
            shutil.rmtree(work)
        (st.out_dir / MARKER).unlink(missing_ok=True)
        (st.out_dir / STAMP).unlink(missing_ok=True)
        state[st.name] = st.hash
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(out / STATE)


@dataclass
class RunResult:
    out: Path
    final: Path | None
    ran: list[str]
    skipped: list[str]
    metrics: dict[str, dict]


def run(source, out=None, overrides=(), *, runners: dict[str, Runner] | None = None,
        progress: bool = True, base_dir=None, card: bool = True) -> RunResult:
    """Run a recipe: stages in dependency order, finished ones skipped (see the module doc).

    `runners` replaces the function run for a kind (tests inject fakes). Returns which
    stages ran and which were skipped, and every eval stage's metrics."""
    p = source if isinstance(source, Plan) else plan(source, out, overrides, base_dir=base_dir)
    runners = {**RUNNERS, **(runners or {})}
    from tqdm.auto import tqdm

    ran, skipped, metrics = [], [], {}
    bar = tqdm(p.order, desc=p.name, unit="stage", disable=not progress, dynamic_ncols=True)
    for name in bar:
        st = p.stages[name]
        bar.set_description(f"{p.name}: {name} ({st.kind})")
        if stage_done(st):
            skipped.append(name)
        else:
            _prepare(st, p.out)
            runners[st.kind](st)
            if not is_complete(st.out_dir):
                raise UserError(f"stage {name} finished without a complete output in "
                                f"{st.out_dir}", fix="re-run; report a bug if it persists")
            (st.out_dir / STAMP).write_text(json.dumps({"stage": name,
                                                        "recipe_hash": st.hash}) + "\n")
            ran.append(name)
        if st.kind == "eval":
            metrics[name] = json.loads((st.out_dir / "metrics.json").read_text())
    bar.close()
    final = p.stages[p.final].out_dir if p.final else None
    if card and final is not None:
        _write_final_card(p, final, metrics)
    return RunResult(p.out, final, ran, skipped, metrics)


def _write_final_card(p: Plan, final: Path, metrics: dict) -> None:
    source = (f"# solar-merge run recipe.yaml   (recipe `{p.name}`, overrides applied)\n"
              + p.recipe_yaml)
    if (final / "recipe.yaml").is_file() and (final / "recipe.yaml").read_text() == source:
        return
    try:
        from solar_merge import hub
    except ImportError:  # pragma: no cover
        (final / "recipe.yaml").write_text(source)
        return
    lineage, bases, datasets = [], [], []
    for name in p.order:
        st = p.stages[name]
        if st.kind == "eval":
            continue
        lineage.append({"stage": name, "kind": st.kind, "inputs": st.inputs})
        bases += [i for i in st.inputs if i not in p.stages and i not in bases]
        if st.kind == "train":
            datasets += [d["path"] for d in st.config.get("datasets") or []
                         if d["path"] not in datasets]
    table = {}
    for results in metrics.values():
        for model, values in results.items():
            table.setdefault(model, {}).update(values)
    hub.write_card(final, kind="recipe", source_yaml=source, source_name="recipe.yaml",
                   base_models=bases, lineage=lineage, datasets=datasets,
                   eval_table=table or None, license=p.loaded.recipe.license if p.loaded
                   else None, description=p.loaded.recipe.description if p.loaded else None)
