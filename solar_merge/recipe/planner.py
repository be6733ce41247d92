"""Planning: resolve every stage (references, paths, configs), order the graph, hash each
stage with its inputs, predict sizes and memory. Imports neither torch nor mergekit."""


import copy
import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from solar_merge.checkpoints import ModelInfo, human, is_hub_id, read_config
from solar_merge.errors import UserError, did_you_mean
from solar_merge.outputs import config_hash
from solar_merge.readers import read_yaml
from solar_merge.recipe.schema import Loaded, load

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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
    new_layers: list[int] | None = None  # output layers an up-scale created (issue 19)


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
        if out is None and not self.recipe.out and not _NAME.match(self.recipe.name):
            raise UserError(f"name: `{self.recipe.name}` names the default output folder "
                            "runs/<name>, so it uses letters, digits, `_`, `-` and `.` only",
                            fix="rename the recipe, or give --out DIR")
        if out is None and loaded.remote and self.recipe.out:
            _check_remote_out(self.recipe.out, loaded.label)
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
        self._kv: dict[str, int | None] = {}  # train outputs' key/value width (memory estimate)

    # references ----------------------------------------------------------------------------
    def ref(self, where: str, value, deps: list[str], base: Path, *, stage_only=False):
        """A stage name -> its output folder (recorded as a dependency); else a local path
        (absolute) or a Hub id. Problems are collected, not raised."""
        if not isinstance(value, str) or not value:
            self.problems.append(f"{where}: expected a stage name, a model folder or a Hub id, "
                                 f"got {value!r}")
            return value
        if value in self.recipe.stages:
            if self.recipe.stages[value].kind == "synth_math":
                from solar_merge.synth_math import INSTRUCT

                self.problems.append(f"{where}: `{value}` is a synth_math stage (data, not a "
                                     "model); name its files in a train stage's datasets, "
                                     f"e.g. {value}/{INSTRUCT}")
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

    def fingerprints(self, config) -> dict[str, str]:
        """What the local inputs outside the recipe hold (models, data files, templates):
        a stage is finished only for the exact contents it ran on. Earlier stages' outputs
        are covered by their own hashes."""
        from solar_merge.outputs import fingerprint

        stage_dirs = [str(self.out / n) for n in self.names]
        found: dict[str, str] = {}

        def walk(value):
            if isinstance(value, dict):
                for v in value.values():
                    walk(v)
            elif isinstance(value, list):
                for v in value:
                    walk(v)
            elif (isinstance(value, str) and os.path.isabs(value) and os.path.exists(value)
                  and not any(value == d or value.startswith(d + os.sep) for d in stage_dirs)):
                found[value] = fingerprint(value)

        walk(config)
        return found

    def build(self) -> Plan:
        r = self.recipe
        if self.loaded.remote:
            self.check_remote()
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
                                    or r.stages[r.final].kind in _NO_MODEL):
            models = [n for n in self.names if r.stages[n].kind not in _NO_MODEL]
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
                                     "inputs": {d: raw[d].hash for d in plan.deps},
                                     "files": self.fingerprints(plan.config)})
            getattr(self, f"_size_{plan.kind}")(plan, deps_plans)
        if self.problems:
            raise self.error()
        final = r.final or next((n for n in reversed(order) if raw[n].kind not in _NO_MODEL),
                                None)
        return Plan(r.name, self.loaded.label, self.out, order, raw, final,
                    notes=list(dict.fromkeys(self.notes)),
                    recipe_yaml=yaml.safe_dump(self.loaded.data, sort_keys=False),
                    loaded=self.loaded)

    def check_remote(self):
        """A recipe fetched from a URL or the Hub runs code paths chosen by someone else:
        it may not run their Python code, upload with the user's token, or log outside the
        output root."""
        refused = {"push_to_hub": "uploads with your token", "hub_model_id": "names an upload",
                   "hub_token": "carries a token", "logging_dir": "writes outside the output "
                   "root", "trust_remote_code": "runs Python code shipped with a model"}
        for name, stage in self.recipe.stages.items():
            for key, value in _walk_keys(stage.model_dump(exclude_none=True)):
                if key in refused and value not in (False, None):
                    self.problems.append(f"stages.{name}: `{key}` {refused[key]}; a recipe "
                                         f"from {self.loaded.label} may not set it")

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
        if self.recipe.launch or cfg.get("launch"):  # [TRAIN] the stage's keys win
            cfg["launch"] = {**(self.recipe.launch or {}), **(cfg.get("launch") or {})}
        deps: list[str] = []
        inputs = [cfg.get("model")] + ([cfg["ref_model"]] if cfg.get("ref_model") else [])
        for key in ("model", "ref_model"):
            if cfg.get(key) is not None:
                cfg[key] = self.ref(f"{where}.{key}", cfg[key], deps, self.base)
        if cfg.get("datasets") is not None:
            cfg["datasets"] = self.data_refs(where, cfg["datasets"], deps)
        resolved = cfg
        # `new` of a stage's output: from that stage (_size_train), not from a folder an
        # earlier run left there
        later = cfg.get("trainable_layers") == "new" and cfg.get("model") in (
            str(self.out / n) for n in self.names)
        if not any(p.startswith(where + ".") for p in self.problems):
            try:
                resolved = resolve({**cfg, "trainable_layers": None} if later else cfg, (),
                                   self.base)
                if later:
                    resolved["trainable_layers"] = "new"
            except UserError as e:
                self.problems.append(f"{where}: {_first(e)}")
        if resolved is not cfg:  # resolved: chat data needs a chat template, checked now
            from solar_merge.stages.common import chat_template_problem

            problem, note = chat_template_problem(resolved, self._template_of,
                                                  label=self._label(resolved["model"]))
            if problem:
                self.problems.append(f"{where}: {problem}; set args.chat_template_path to a "
                                     ".jinja file (e.g. training/chat_templates/"
                                     "solar_instruct.jinja) or a tokenizer that has one")
            if note:
                self.notes.append(f"{where}: {note}")
        for i, d in enumerate(resolved.get("datasets") or []):
            p = Path(str(d.get("path", ""))) if isinstance(d, dict) else Path()
            made = any(p.is_relative_to(self.out / d) for d in deps)  # by an earlier stage
            if p.is_absolute() and not p.exists() and not made:
                self.notes.append(f"{where}.datasets[{i}]: {os.path.normpath(p)} does not "
                                  "exist yet (needed when the stage runs)")
        return StagePlan(name, "train", self.out / name, deps, [str(i) for i in inputs],
                         resolved)

    def _label(self, ref: str) -> str:
        """`stage` for an earlier stage's output folder, else the reference itself."""
        return next((f"stage `{n}`'s output" for n in self.names if str(self.out / n) == ref),
                    ref)

    def _template_of(self, ref: str, depth: int = 0) -> bool | None:
        """stages.common.has_chat_template, following an earlier stage's output back to the
        model whose tokenizer it carries: an upscale's model; a train stage's
        args.chat_template_path or its model; a merge's chat_template, else its
        tokenizer_source, base_model or first model (mergekit copies that tokenizer)."""
        from solar_merge.stages.common import has_chat_template

        name = next((n for n in self.names if str(self.out / n) == ref), None)
        if name is None:
            return has_chat_template(ref)
        if depth > len(self.names):
            return None

        def up(value, base=self.base):
            if not isinstance(value, str):
                return None
            if value in self.recipe.stages:
                return self._template_of(str(self.out / value), depth + 1)
            path = Path(os.path.expanduser(value))
            path = path if path.is_absolute() else base / path
            return has_chat_template(str(path) if path.exists() else value)

        stage = self.recipe.stages[name]
        if stage.kind == "upscale":
            return up(stage.upscale.model)
        if stage.kind == "train":
            args = stage.train.get("args") or {}
            return up(args["chat_template_path"]) if args.get("chat_template_path") \
                else up(stage.train.get("model"))
        if stage.kind != "merge":
            return None
        spec, base = dict(stage.merge), self.base
        if spec.get("file"):
            file = Path(os.path.expanduser(str(spec["file"])))
            file = file if file.is_absolute() else self.base / file
            try:
                loaded = yaml.safe_load(file.read_text()) if file.is_file() else None
            except (OSError, yaml.YAMLError):
                loaded = None
            if isinstance(loaded, dict):
                spec, base = {**loaded, **spec}, file.parent
        if spec.get("chat_template"):
            return True
        source = spec.get("tokenizer_source")
        models = [m.get("model") for m in spec.get("models") or [] if isinstance(m, dict)]
        first = spec.get("base_model") or next(iter(models), None)
        if isinstance(source, str) and source not in ("base", "union"):
            first = source
        return up(first, base)

    def _merge(self, name, stage):
        from solar_merge.merging import TOP_KEYS

        where = f"stages.{name}.merge"
        spec = copy.deepcopy(stage.merge)
        options = {**(self.recipe.merge_options or {}),  # [TRAIN] the stage's options win
                   **(spec.pop("options", None) or {})}
        file_base, from_file = self.base, set()
        if "file" in spec:
            file = Path(os.path.expanduser(str(spec.pop("file"))))
            file = file if file.is_absolute() else self.base / file
            loaded = None
            if not file.is_file():
                self.problems.append(f"{where}.file: {file} not found")
            else:
                try:
                    loaded = read_yaml(file, what="merge config")
                except UserError as e:
                    self.problems.append(f"{where}.file: {_first(e)}")
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
                    sources = s.get("sources") or []
                    if not isinstance(sources, list):  # [HARDEN] `sources: true`: TypeError
                        self.problems.append(f"{ws}[{i}].sources: expected a list")
                        continue
                    for j, src in enumerate(sources):
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
        from solar_merge import eval as lm

        try:
            parsed = lm.parse_spec(spec, where=where)
        except UserError as e:
            self.problems.append(_first(e))
            parsed = None
        config = {"models": resolved_models, "tasks": [], "options": {}, "fingerprints": {}}
        if parsed is not None:
            config = {**config, **self._eval_options(where, parsed)}
        return StagePlan(name, "eval", self.out / name, deps, [str(m) for m in models],
                         config)

    def _eval_options(self, where, parsed) -> dict:
        """An eval stage's lm-eval options with paths resolved: include_path against the
        recipe, contamination `train: auto` to every training set of the recipe; tasks are
        checked now (lm-eval's index), not after hours of training."""
        from solar_merge.outputs import fingerprint
        from solar_merge.tasks import catalog

        options = parsed.model_dump(exclude={"tasks", "include_path", "contamination"})
        paths = parsed.include_path
        paths = [paths] if isinstance(paths, str) else paths or []
        include = [os.path.normpath(self.base / os.path.expanduser(p)) for p in paths]
        tasks = catalog.split_names(parsed.tasks)
        try:
            catalog.task_manager(tasks, include or None)
        except UserError as e:
            self.problems.append(f"{where}: {_first(e)}")
        contamination = None
        if parsed.contamination is not None:
            c = parsed.contamination
            train = self._train_datasets() if c.train == "auto" else (
                [c.train] if isinstance(c.train, str) else c.train)
            train = [self._data_path(t) for t in train]
            if not train:
                self.problems.append(f"{where}.contamination.train: auto found no training "
                                     "set in this recipe; list the data sets to check")
            contamination = {"train": train, "n": c.n, "fail_above": c.fail_above}
        data = [*include, *(contamination["train"] if contamination else [])]
        return {"tasks": tasks, "include_path": include, "contamination": contamination,
                "options": options,
                "fingerprints": {p: fingerprint(p) for p in data if os.path.exists(p)}}

    def _train_datasets(self) -> list[str]:
        """Every data set the recipe's train stages name (a `<stage>/<file>` of a synth_math
        stage as its future path), in recipe order."""
        found: list[str] = []
        for stage in self.recipe.stages.values():
            if stage.kind != "train":
                continue
            for d in stage.train.get("datasets") or []:
                path = d.get("path") if isinstance(d, dict) else d
                if not isinstance(path, str):
                    continue
                head = path.partition("/")[0]
                path = str(self.out / path) if head in self.recipe.stages \
                    else self._data_path(path)
                if path not in found:
                    found.append(path)
        return found

    def _data_path(self, value: str) -> str:
        """A data set named in the recipe: a local file or folder (relative to the recipe),
        else a Hub data set name. `data/x.jsonl` has the shape of a Hub id: a data file's
        suffix or an existing path decides."""
        from solar_merge.data import FILE_SUFFIXES

        local = self.base / os.path.expanduser(value)
        if local.exists() or Path(value).suffix in FILE_SUFFIXES or not is_hub_id(value):
            return os.path.normpath(local)
        return value

    # stage kinds: predicted output sizes, shape checks, memory -------------------------------
    def _size_upscale(self, plan, deps_plans):
        c = plan.config
        src = self.info(c["model"], deps_plans)
        if src is None:
            return
        from solar_merge.upscale import build_config, layer_count, new_layers, spec_options

        try:
            config = build_config(c["model"], src.n_layers, method=c["method"],
                                  **spec_options(c))
        except UserError as e:
            self.problems.append(f"stages.{plan.name}.upscale: {_first(e)}")
            return
        s = layer_count(config)
        plan.new_layers = new_layers(config)
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
        plan.new_layers = self._lineage_new_layers(c["model"], deps_plans)
        if c.get("trainable_layers") == "new":
            if not plan.new_layers:
                self.problems.append(
                    f"stages.{plan.name}.train.trainable_layers: `new` needs a model made by "
                    "an upscale stage of this recipe (directly or through train stages), or a "
                    "folder with the mergekit_config.yml of an up-scale; no new layers found "
                    f"for {c['model']}")
                return
            c["trainable_layers"] = list(plan.new_layers)  # after hashing: `new` is hashed
        if info is None:
            return
        layers = c.get("trainable_layers") or []
        if isinstance(layers, list) and layers and max(layers) >= info.n_layers:
            self.problems.append(f"stages.{plan.name}.train.trainable_layers: layer "
                                 f"{max(layers)} does not exist, the model has "
                                 f"{info.n_layers} layers (0..{info.n_layers - 1})")
        plan.info = dataclasses.replace(info, source=str(plan.out_dir))
        plan.params_estimated = self.estimated([c["model"]], deps_plans)
        # the formula the stage itself is checked with (solar_merge.memory)
        from solar_merge.memory import RUNTIME, Shape, from_stage

        kv = self._kv_dim(c["model"], deps_plans)
        self._kv[str(plan.out_dir)] = kv
        shape = Shape(params=info.params or 0, layers=info.n_layers, hidden=info.hidden_size,
                      intermediate=info.intermediate_size or 4 * info.hidden_size,
                      vocab=info.vocab_size, kv_dim=kv, per_layer=info.per_layer_params)
        launch = c.get("launch") or {}
        est = from_stage(c, shape, launch)
        plan.memory = est.total + RUNTIME
        auto = ("; precision auto: the larger of fp32 and bf16 mixed precision"
                if c.get("precision") == "auto" else "")
        plan.memory_note = (f"per device: {' + '.join(est.terms)} + runtime "
                            f"(solar_merge/memory.py{auto})")
        if launch.get("device_memory") and plan.memory > launch["device_memory"]:
            self.problems.append(
                f"stages.{plan.name}.train: needs about {human(plan.memory, 'B')} per device "
                f"({est.setup.strategy} on {est.setup.devices} device(s)), more than "
                f"launch.device_memory {human(launch['device_memory'], 'B')}; use a sharded "
                "launch (accelerate_config: zero3 or fsdp2), more processes, "
                "args.gradient_checkpointing or peft (LoRA)")

    def _kv_dim(self, ref: str, deps_plans) -> int | None:
        """num_key_value_heads * head_dim of `ref`: from its config.json, or from the model
        an earlier stage of the recipe started from (None: unknown, counted as full heads)."""
        from solar_merge.memory import Shape

        for plan in deps_plans.values():
            if str(plan.out_dir) == ref:
                if ref in self._kv:
                    return self._kv[ref]
                merge = plan.config.get("merge") or {}
                models = [m.get("model") for m in merge.get("models") or []
                          if isinstance(m, dict)]
                ref = plan.config.get("model") or merge.get("base_model") or next(
                    (m for m in models if isinstance(m, str)), ref)
                if ref in self._kv:
                    return self._kv[ref]
        source = ref if os.path.isdir(ref) else _cached_config_dir(ref) if is_hub_id(ref) \
            else None
        try:
            return Shape.from_config(read_config(source)).kv if source else None
        except (UserError, KeyError, TypeError, ValueError):
            return None

    def _lineage_new_layers(self, model: str, deps_plans) -> list[int] | None:
        """The layers an up-scale created in `model` (`trainable_layers: new`): from the
        stage that makes it (train stages keep the layout of their model), else from the
        folder's mergekit_config.yml."""
        for p in deps_plans.values():
            if str(p.out_dir) == model:
                return p.new_layers
        from solar_merge.upscale import new_layers_of

        try:
            return new_layers_of(model) if os.path.isdir(model) else None
        except UserError as e:
            self.problems.append(_first(e))
            return None

    def _merge_new_layers(self, config: dict, deps_plans) -> list[int] | None:
        """A slices merge creates layers as an up-scale does; a `models:` merge keeps the
        layout its inputs share."""
        from solar_merge.upscale import new_layers

        if config.get("slices"):
            return new_layers(config) or None
        refs = [m.get("model") for m in config.get("models") or [] if isinstance(m, dict)]
        found = [self._lineage_new_layers(r, deps_plans) for r in refs if isinstance(r, str)]
        return found[0] if found and all(f == found[0] for f in found) else None

    def _size_merge(self, plan, deps_plans):
        config = plan.config.get("merge") or {}
        plan.new_layers = self._merge_new_layers(config, deps_plans)
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

    # -- the synth_math stage (issue 17): rephrased math data, named by train stages' datasets --
    def data_refs(self, where, datasets, deps):
        """`<stage>/<file>` as a dataset path: a file of a synth_math stage's output folder
        (that stage becomes a dependency, as a stage named in a model field does)."""
        from solar_merge.synth_math import ALIGNMENT, INSTRUCT

        items = datasets if isinstance(datasets, list) else [datasets]
        out = []
        for i, d in enumerate(items):
            path = d.get("path") if isinstance(d, dict) else d
            stage, _, rest = path.partition("/") if isinstance(path, str) else ("", "", "")
            if stage in self.recipe.stages:
                kind = self.recipe.stages[stage].kind
                if kind != "synth_math":
                    self.problems.append(f"{where}.datasets[{i}]: `{stage}` is a {kind} stage; "
                                         "a dataset path may only name a file of a synth_math "
                                         f"stage, e.g. {stage}/{INSTRUCT}")
                elif rest not in (INSTRUCT, ALIGNMENT):
                    self.problems.append(f"{where}.datasets[{i}]: `{path}`: name a file of the "
                                         f"synth_math stage, {stage}/{INSTRUCT} (sft) or "
                                         f"{stage}/{ALIGNMENT} (dpo)")
                else:
                    if stage not in deps:
                        deps.append(stage)
                    path = str(self.out / stage / rest)
                    d = {**d, "path": path} if isinstance(d, dict) else path
            out.append(d)
        return out if isinstance(datasets, list) else out[0]

    def _synth_math(self, name, stage):
        from solar_merge.synth_math import Options

        where = f"stages.{name}.synth_math"
        spec = stage.synth_math.model_dump()
        from solar_merge.precision import requested

        spec["precision"] = requested(spec["precision"])  # SOLAR_MERGE_PRECISION: another run
        deps: list[str] = []
        inputs = [spec["data"]] + ([spec["model"]] if spec["model"] else [])
        if spec["model"] is not None:
            spec["model"] = self.ref(f"{where}.model", spec["model"], deps, self.base)
        data = Path(os.path.expanduser(spec["data"]))
        data = data if data.is_absolute() else self.base / data
        if data.exists():
            spec["data"] = os.path.normpath(data.absolute())
        elif spec["data"].startswith((".", "/", "~")) or data.suffix in (
                ".jsonl", ".json", ".parquet", ".txt"):
            self.problems.append(f"{where}.data: {os.path.normpath(data)} not found (a local "
                                 "file or folder of seed problems, or a Hub dataset name)")
        try:
            Options(**{k: v for k, v in spec.items() if k != "data"}).check()
        except UserError as e:
            self.problems.append(f"{where}: {_first(e)}")
        return StagePlan(name, "synth_math", self.out / name, deps, inputs, spec)

    def _size_synth_math(self, plan, deps_plans):
        from solar_merge.embedded import EMBEDDED_NAME, cache_root

        model = plan.config["model"]
        if model is None:  # the embedded model, once imported
            model = str(cache_root() / EMBEDDED_NAME)
            if not os.path.isdir(model):
                return
        info = self.info(model, deps_plans)
        if info is not None and info.params:
            plan.memory = info.params * 4 + _OVERHEAD
            plan.memory_note = ("the generating model in fp32 (less in bf16/fp16, where the "
                                "device computes them natively) + overhead")
    # -- end of the synth_math stage --

    # -- the sweep stage (issue 14): merge at every grid point, keep the best ----------------
    def _sweep(self, name, stage):
        where = f"stages.{name}.sweep"
        spec = copy.deepcopy(stage.sweep)
        models = spec.pop("models", None)
        deps: list[str] = []
        if not isinstance(models, list) or len(models) < 2:
            self.problems.append(f"{where}.models: list two or more stages or model folders "
                                 "to merge")
            models = models if isinstance(models, list) else []
        resolved = [self.ref(f"{where}.models[{i}]", m, deps, self.base)
                    for i, m in enumerate(models)]
        from solar_merge.sweep import grid_points, stage_spec

        try:
            spec = stage_spec(spec, where)
            if len(models) >= 2:
                grid_points(spec["method"], len(models), spec["grid"])
            include = spec.get("include_path")
            if include:
                spec["include_path"] = [os.path.normpath(self.base / os.path.expanduser(p))
                                        for p in ([include] if isinstance(include, str)
                                                  else include)]
        except UserError as e:
            message = _first(e)
            self.problems.append(message if message.startswith(where) else
                                 f"{where}: {message}")
        return StagePlan(name, "sweep", self.out / name, deps, [str(m) for m in models],
                         {"models": resolved, **spec})

    def _size_sweep(self, plan, deps_plans):
        refs = plan.config["models"]
        infos = [self.info(r, deps_plans) for r in refs]
        if not infos or any(i is None for i in infos):
            return
        first = infos[0]
        for ref, i in zip(refs[1:], infos[1:]):
            if i.shape_key() != first.shape_key() or i.n_layers != first.n_layers:
                self.problems.append(
                    f"stages.{plan.name}.sweep.models: `{ref}` (hidden {i.hidden_size}, "
                    f"{i.n_layers} layers) cannot be merged with `{refs[0]}` (hidden "
                    f"{first.hidden_size}, {first.n_layers} layers)")
                return
        plan.info = _resized(first, first.n_layers, plan.out_dir)
        plan.params_estimated = self.estimated(refs, deps_plans)
        layer = (first.per_layer_params or 0) * first.dtype_bytes
        merging = _out_bytes(plan.info) + len(refs) * layer + _OVERHEAD
        scoring = (first.params or 0) * 4 + _OVERHEAD
        plan.memory = max(merging, scoring)
        plan.memory_note = ("the larger of one merge (output + one layer per input) and one "
                            "lm-eval run (the merge in fp32)")
    # -- end of the sweep stage --


def _check_remote_out(out: str, label: str) -> None:
    parts = Path(out).parts
    if os.path.isabs(os.path.expanduser(out)) or ".." in parts:
        raise UserError(f"out: `{out}` points outside the current folder, and the recipe comes "
                        f"from {label}, not from your disk",
                        fix="give the output root yourself: solar-merge run RECIPE --out DIR")


def _walk_keys(value):
    """(key, value) for every mapping entry, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk_keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_keys(v)



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
_NO_MODEL = ("eval", "synth_math")  # stage kinds whose output is not a model


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
        if s.kind in _NO_MODEL:
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
