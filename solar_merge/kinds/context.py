"""What a stage kind plans against (Context) and what it plans (StagePlan).

The planner (solar_merge.recipe.planner) makes one Context per recipe and hands it to every
kind's `resolve` and `size`. The Context turns references into folders (a stage name stands
for that stage's output and makes it a dependency), predicts what earlier stages' outputs will
hold (their layers, parameters, tokenizer, new layers), and collects problems and notes, so
that `validate` lists every mistake of a recipe at once. It knows no kind by name: what a kind
makes (a model, data files) is declared by the kind module (see solar_merge.kinds).
"""

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

from solar_merge.checkpoints import ModelInfo, is_hub_id
from solar_merge.errors import UserError, did_you_mean

OVERHEAD = 500 * 2**20  # python + torch + libraries, in every stage's memory estimate


@dataclass
class StagePlan:
    name: str
    kind: str
    out_dir: Path
    deps: list[str]
    inputs: list[str]                   # as written (stage names or models)
    config: dict                        # resolved: what the tool runs (hashed)
    hash: str = ""                      # the stage's completion record (outputs.MARKER)
    info: ModelInfo | None = None       # predicted output model (None: unknown, or no model)
    params_estimated: bool = False
    memory: int | None = None           # bytes, a rough estimate
    memory_note: str = ""
    new_layers: list[int] | None = None  # output layers an up-scale created
    tokenizer: str | bool | None = None  # the model whose tokenizer the output carries;
    #                                      True: the stage sets a chat template itself
    estimate: object = None             # the memory estimate behind `memory`, for the tool
    runtime: dict = field(default_factory=dict)  # settings of this run, not hashed: where a
    #                                              stage computes, not what it makes
    record_dir: Path | None = None      # the folder whose completion record (outputs.MARKER)
    #                                     says the stage is done; default: out_dir

    def __post_init__(self):
        self.record_dir = self.record_dir or self.out_dir

    @property
    def shape(self):
        """The sizing.Shape of the predicted output model (None: unknown, or no model)."""
        return self.info.shape if self.info is not None else None


def first_line(e: UserError) -> str:
    """The message of a UserError without its `fix:` line (problems are listed together)."""
    return str(e.message).split("\n  fix:")[0]


def strict_problems(e, where: str, model) -> list[str]:
    """A pydantic ValidationError of a strict kind schema as problems, each naming its field;
    an unknown key names what is allowed there."""
    problems = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join([where, *loc])
        if err["type"] == "extra_forbidden":
            allowed = _fields_at(model, loc[:-1])
            problems.append(f"{path}: unknown key{did_you_mean(loc[-1], allowed)}; allowed "
                            f"here: {', '.join(allowed)}")
        elif err["type"] == "missing":
            problems.append(f"{path}: missing")
        else:
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {message}")
    return problems


def _fields_at(model, loc: list[str]) -> list[str]:
    """The field names of the (nested) pydantic model at `loc`."""
    for part in loc:
        annotation = model.model_fields[part].annotation if part in model.model_fields else None
        nested = [a for a in getattr(annotation, "__args__", (annotation,))
                  if isinstance(a, type) and hasattr(a, "model_fields")]
        if not nested:
            break
        model = nested[0]
    return list(model.model_fields)


class Context:
    """One recipe's planning state, shared by its kinds (see the module doc)."""

    def __init__(self, recipe, base: Path, out: Path, kinds: dict):
        self.recipe = recipe       # solar_merge.recipe.schema.Recipe
        self.base = base           # relative paths of the recipe resolve against it
        self.out = out             # the output root: stage `x` writes <out>/x
        self.kinds = kinds         # kind name -> kind module (solar_merge.kinds.registry)
        self.names = list(recipe.stages)
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.plans: dict[str, StagePlan] = {}  # resolved so far
        self._infos: dict[str, ModelInfo | None] = {}
        self._estimated: set[str] = set()  # refs whose parameters come from config.json

    # the recipe's stages ----------------------------------------------------------------------
    def kind_of(self, name: str) -> str:
        return self.recipe.stages[name].kind

    def body_of(self, name: str) -> dict:
        return self.recipe.stages[name].body

    def model_dir(self, name: str) -> Path:
        """Where stage `name`'s model will be (its kind's MODEL folder inside its output);
        its output folder for a kind that makes no model."""
        return self.out / name / (self.kinds[self.kind_of(name)].MODEL or "")

    def plan_of(self, ref) -> StagePlan | None:
        """The plan of the stage whose model (or output folder) `ref` is."""
        for plan in self.plans.values():
            if ref in (str(plan.out_dir), str(self.model_dir(plan.name))):
                return plan
        return None

    def label(self, ref: str) -> str:
        """`stage x's output` for an earlier stage's model folder, else the reference."""
        plan = self.plan_of(ref)
        return f"stage `{plan.name}`'s output" if plan else ref

    def parse(self, schema, body, where: str):
        """`body` validated by the pydantic `schema`; None (with the problems noted) if not."""
        from pydantic import ValidationError

        try:
            return schema.model_validate(body)
        except ValidationError as e:
            self.problems += strict_problems(e, where, schema)
            return None

    # references ---------------------------------------------------------------------------------
    def ref(self, where: str, value, deps: list[str], base: Path | None = None) -> str:
        """A stage name -> its model folder (recorded as a dependency); else a local path
        (absolute) or a Hub id. Problems are collected, not raised."""
        if not isinstance(value, str) or not value:
            self.problems.append(f"{where}: expected a stage name, a model folder or a Hub id, "
                                 f"got {value!r}")
            return value
        if value in self.recipe.stages:
            kind = self.kind_of(value)
            module = self.kinds[kind]
            if module.MODEL is None:
                article = "an" if kind[0] in "aeiou" else "a"
                files = list(module.DATA_FILES)
                hint = (f"name its files in a train stage's `datasets`, e.g. {value}/{files[0]}"
                        if files else "name a stage that makes a model")
                self.problems.append(f"{where}: `{value}` is {article} {kind} stage "
                                     f"({module.HOLDS}, not a model); {hint}")
            if value not in deps:
                deps.append(value)
            return str(self.model_dir(value))
        path = Path(os.path.expanduser(value))
        path = path if path.is_absolute() else (base or self.base) / path
        if path.exists():
            return os.path.normpath(path.absolute())
        if is_hub_id(value):
            return value
        self.problems.append(f"{where}: `{value}` is not a known stage, model folder or Hub id"
                             f"{did_you_mean(value, self.names)}; stages: {', '.join(self.names)}")
        return value

    def data_ref(self, where: str, value, deps: list[str]):
        """A data set's path as written -> absolute. `<stage>/<file>` names a file an earlier
        stage writes (its kind's DATA_FILES): that stage becomes a dependency."""
        path = value.get("path") if isinstance(value, dict) else value
        stage, _, rest = path.partition("/") if isinstance(path, str) else ("", "", "")
        if stage not in self.recipe.stages:
            return value
        kind = self.kind_of(stage)
        files = self.kinds[kind].DATA_FILES
        writers = [n for n in self.names if self.kinds[self.kind_of(n)].DATA_FILES]
        if not files:
            example = ""
            if writers:
                written = next(iter(self.kinds[self.kind_of(writers[0])].DATA_FILES))
                example = f", e.g. {writers[0]}/{written}"
            self.problems.append(f"{where}: `{stage}` is a {kind} stage; a dataset path may "
                                 f"only name a file of a stage that writes data{example}")
            return value
        if rest not in files:
            choices = " or ".join(f"{stage}/{f} ({use})" for f, use in files.items())
            self.problems.append(f"{where}: `{path}`: name a file of the {kind} stage, "
                                 f"{choices}")
            return value
        if stage not in deps:
            deps.append(stage)
        path = str(self.out / stage / rest)
        return {**value, "path": path} if isinstance(value, dict) else path

    def data_path(self, value: str) -> str:
        """A data set named in the recipe: `<stage>/<file>` as its future path, a local file
        or folder (relative to the recipe), else a Hub data set name. `data/x.jsonl` has the
        shape of a Hub id: a data file's suffix or an existing path decides."""
        from solar_merge.data import FILE_SUFFIXES

        if value.partition("/")[0] in self.recipe.stages:
            return str(self.out / value)
        local = self.base / os.path.expanduser(value)
        if local.exists() or Path(value).suffix in FILE_SUFFIXES or not is_hub_id(value):
            return os.path.normpath(local)
        return value

    def local_path(self, value: str) -> str:
        """A path as written in the recipe, absolute (relative to the recipe's folder)."""
        return os.path.normpath(self.base / os.path.expanduser(value))

    # what earlier stages will make -----------------------------------------------------------
    def info(self, ref: str) -> ModelInfo | None:
        """The model `ref` is or will be: an earlier stage's predicted output, else read from
        its config.json and weight headers (Hub models: a cached config.json; offline and not
        cached: None, with a note)."""
        plan = self.plan_of(ref)
        if plan is not None:
            return plan.info
        if ref not in self._infos:
            from solar_merge.checkpoints import model_info

            try:
                source = ref
                if is_hub_id(ref) and not hub_reachable():  # skip the Hub's retries (~25 s)
                    source = cached_config_dir(ref)
                    if source is None:
                        raise UserError("offline")
                info = dataclasses.replace(model_info(source), source=ref)
                if info.params is None:  # config.json alone: counted by sizing
                    info = dataclasses.replace(info, params=info.shape.params,
                                               per_layer_params=info.shape.per_layer)
                    self._estimated.add(ref)
            except UserError as e:
                info = None
                if is_hub_id(ref):
                    self.notes.append(f"sizes of `{ref}` unknown (offline: config.json could "
                                      "not be fetched)")
                else:
                    self.problems.append(first_line(e))
            self._infos[ref] = info
        return self._infos[ref]

    def estimated(self, refs) -> bool:
        """Whether any of `refs` has its parameter count estimated from config.json."""
        found = [(r, self.plan_of(r)) for r in refs]
        return any(p.params_estimated if p else r in self._estimated for r, p in found)

    def new_layers(self, model: str) -> list[int] | None:
        """The layers an up-scale created in `model` (`trainable_layers: new`): from the stage
        that makes it, else from the folder's mergekit_config.yml."""
        plan = self.plan_of(model)
        if plan is not None:
            return plan.new_layers
        from solar_merge.upscale import new_layers_of

        try:
            return new_layers_of(model) if os.path.isdir(model) else None
        except UserError as e:
            self.problems.append(first_line(e))
            return None

    def has_chat_template(self, ref: str, depth: int = 0) -> bool | None:
        """Whether `ref` (a model folder, a .jinja file, a Hub id, or an earlier stage's
        output) comes with a chat template: an earlier stage's output carries the tokenizer
        of the model its kind names (StagePlan.tokenizer). None: unknown."""
        from solar_merge.stages.chat import has_chat_template

        plan = self.plan_of(ref)
        if plan is None:
            return has_chat_template(ref)
        if plan.tokenizer is True or plan.tokenizer is None or depth > len(self.names):
            return True if plan.tokenizer is True else None
        return self.has_chat_template(plan.tokenizer, depth + 1)


def resized(info: ModelInfo, n_layers: int, out_dir: Path) -> ModelInfo:
    """`info` with another layer count (the model a stage makes from it, in `out_dir`)."""
    return dataclasses.replace(info, source=str(out_dir), n_layers=n_layers,
                               params=info.params_with_layers(n_layers),
                               shape=info.shape.with_layers(n_layers) if info.shape else None)


def out_bytes(info: ModelInfo) -> int:
    return (info.params or 0) * info.dtype_bytes


_REACHABLE: list[bool] = []


def hub_reachable() -> bool:
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


def cached_config_dir(repo_id: str) -> str | None:
    """The local snapshot folder holding a Hub model's cached config.json, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - a broken cache is the same as no cache here
        return None
    return str(Path(path).parent) if isinstance(path, str) else None
