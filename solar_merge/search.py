"""Search instead of guess: optimise up-scaling layouts and merge weights against held-out
scores with Optuna, in a study database that several workers share.

    solar-merge search SPACE.yaml -o OUT [--trials N] [--timeout T] [--storage URL] [--keep-all]

A search space (every key checked; a dimension is a fixed value, a list of choices, or a range
`{low: A, high: B[, step: S][, log: true]}`):

    model: base                       # (a) search an up-scaling layout of this model, or
    candidates: [sft_a, sft_b]        # (b) merge these; with `layout:` each candidate is
                                      #     up-scaled the same way and merged layer by layer,
                                      #     in one mergekit config
    layout:
      method: dus                     # dus | expand, or [dus, expand]
      drop: {low: 4, high: 12}        # dus: SOLAR's cut m (layers [0, n-m) + [m, n))
      repeat: {start: {low: 4, high: 16}, length: [4, 8]}   # dus instead of drop: layers
                                      #     [start, start + length) occur twice (the overlap)
      scale_overlap: [null, 0.5]      # the repeated layers' o_proj/down_proj times this
      blocks: [4, 8]                  # expand: new blocks, placed `where`, initialised `init`
      where: interleaved              # upscale.WHERE
      init: [identity, average]       # any of upscale.INIT (read when the space is checked)
    merge:
      method: solar_average           # or solar_slerp
      weight: {low: 0.0, high: 1.0}   # 2 candidates: the second's weight, the first's is 1 - w;
                                      # 3 or more: one weight per candidate (normalised)
      t: {low: 0.0, high: 1.0}        # solar_slerp: 0 is the first candidate, 1 the second
      groups: 1                       # > 1: one value per layer group (a mergekit gradient)
      filters: [self_attn, mlp]       # one value per filter and one for the other tensors
    score:
      tasks: [solar_manual_qa]        # lm-eval tasks: ours (offline), --include_path, lm-eval's
      metric: acc_norm                # default: the first task's main metric
      limit: 40                       # and num_fewshot, batch_size, device, include_path
      # perplexity: {data: heldout.txt, samples: 16, seq_len: 256}   # instead of tasks
    cpt: {config: cpt.yaml, overrides: [args.max_steps=10]}   # optional: train each trial first
    sampler: tpe                      # tpe | cmaes | random, or {name, seed, n_startup_trials}
    pruner: median                    # median | none (applies to perplexity scoring)
    default: {drop: 8, weight: 0.6}   # the hand-chosen point (else m = n/4, 0.4/0.6, t = 0.5)

Trial 0 of a new study is the hand-chosen default, so the report can set the best against it.
Parameters are named after their keys: `layout`, `drop`, `repeat.start`, `repeat.length`,
`scale_overlap`, `blocks`, `where`, `init`, `weight` / `t`, with `.<candidate>` (three or more
candidates), `.<filter>` (`.rest` for the others) and `.g<group>` appended.

OUT holds `study.db` (the Optuna study, unless --storage names another database), `search.json`
(which space it belongs to), `trials/trial-<n>` (a trial's model: deleted once scored unless
it is the best so far, or --keep-all), `evals/`, and at the end `best/` (the best trial's
model and card: what a next stage uses), `best.yaml` (its stock mergekit config), `report.md`,
`trials.csv`, `progress.png`, `importance.png`.

Many workers (processes or machines) on one study URL share the work: each asks Optuna for the
next trial until the study holds N finished ones. A trial whose process died is failed and
enqueued again (Optuna's heartbeat and RetryHeartbeatStaleTrialCallback; on this machine at once,
from the worker's process id), and its half-written folder is removed.
"""

import json
import logging
import math
import os
import re
import shutil
import socket
import time
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

from solar_merge.errors import UserError, did_you_mean
from solar_merge.search_report import how_found, size, write_report

log = logging.getLogger(__name__)

METHODS = ("solar_average", "solar_slerp")
LAYOUTS = ("dus", "expand")
SAMPLERS = ("tpe", "cmaes", "random")
# Inits whose configs are plain mergekit slices, which a merge of candidates can take over.
STACKABLE_INITS = ("identity", "average")
STUDY_DB = "study.db"
STATE_FILE = "search.json"
VERSION = 1                      # bump when a trial's meaning changes: older studies are refused
HEARTBEAT, GRACE = 20, 60        # seconds: a worker silent for GRACE is dead, its trial retried
RETRIES = 2                      # times a trial of a dead worker is tried again
MAX_FAILURES = 3                 # trials in a row that fail in one worker stop it
SCORER_HOOK = "SOLAR_MERGE_SEARCH_SCORER"  # FILE.py:NAME, for processes a test starts
_TRIAL_NAME = re.compile(r"^\.?trial-(\d+)(?:-cpt)?(?:\..*)?$")


# -- dimensions --------------------------------------------------------------------------------

_EXPECTED = {
    "int": "an integer, a list of integers, or a range {low: A, high: B[, step: S]}",
    "float": "a number, a list of numbers, or a range {low: A, high: B[, step: S][, log: true]}",
    "scale": "a positive number or null (no scaling), a list of them, or a range "
             "{low: A, high: B}",
    "str": "a name or a list of names",
}


@dataclass(frozen=True)
class Dim:
    """One dimension of the space: a fixed value, a choice among values, or a range."""
    raw: Any                       # as written (what the space's hash and card show)
    kind: str                      # int | float | scale | str
    choices: tuple | None = None   # None: a range
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False

    @property
    def searched(self) -> bool:
        if self.choices is not None:
            return len(self.choices) > 1
        return self.low != self.high

    @property
    def fixed(self):
        return self.choices[0] if self.choices is not None else self.low

    def values(self) -> list:
        """The choices, or a range's ends (every value for a short integer range)."""
        if self.choices is not None:
            return list(self.choices)
        if self.kind == "int" and (self.high - self.low) / (self.step or 1) <= 256:
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        return [self.low, self.high]

    def contains(self, value) -> bool:
        if self.choices is not None:
            return value in self.choices
        return isinstance(value, (int, float)) and self.low <= value <= self.high

    def suggest(self, trial, name: str):
        if not self.searched:
            return self.fixed
        if self.choices is not None:
            return trial.suggest_categorical(name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(name, int(self.low), int(self.high),
                                     step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)


def _is_value(kind: str, v) -> bool:
    if kind == "str":
        return isinstance(v, str) and bool(v)
    if isinstance(v, bool):
        return False
    if kind == "int":
        return isinstance(v, int)
    if kind == "scale" and v is None:
        return True
    return isinstance(v, (int, float)) and math.isfinite(v)


def _dimension(value, kind: str):
    """A dimension from what the YAML holds; ValueError (pydantic names the field) if bad."""
    if value is None:
        return None
    if isinstance(value, dict):
        if kind == "str":
            raise ValueError(f"expected {_EXPECTED[kind]}, got a mapping")
        unknown = sorted(set(value) - {"low", "high", "step", "log"})
        if unknown or not {"low", "high"} <= set(value):
            raise ValueError(f"a range is {{low: A, high: B[, step: S][, log: true]}}, got "
                             f"{value!r}")
        low, high, step, log_ = value["low"], value["high"], value.get("step"), value.get("log")
        number = "int" if kind == "int" else "float"
        if not all(_is_value(number, v) for v in (low, high)) or (
                step is not None and not _is_value(number, step)):
            raise ValueError(f"low, high and step of this range must be "
                             f"{'integers' if kind == 'int' else 'numbers'}, got {value!r}")
        if log_ is not None and not isinstance(log_, bool):
            raise ValueError(f"log must be true or false, got {log_!r}")
        if low > high:
            raise ValueError(f"low {low} is above high {high}")
        if step is not None and step <= 0:
            raise ValueError(f"step {step} must be positive")
        if log_ and (low <= 0 or step is not None or kind == "int"):
            raise ValueError("log: true needs a float range with low > 0 and no step")
        return Dim(value, kind, None, low, high, step, bool(log_))
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list of choices: give at least one value")
        bad = [v for v in value if not _is_value(kind, v)]
        if bad:
            raise ValueError(f"expected {_EXPECTED[kind]}, got {bad[0]!r} in the list")
        if len({repr(v) for v in value}) != len(value):
            raise ValueError(f"the choices {value!r} repeat a value: list each once")
        return Dim(value, kind, tuple(value))
    if _is_value(kind, value):
        return Dim(value, kind, (value,))
    raise ValueError(f"expected {_EXPECTED[kind]}, got {value!r}")


def _dim_type(kind: str):
    return Annotated[Any, AfterValidator(partial(_dimension, kind=kind)),
                     PlainSerializer(lambda d: d.raw if d is not None else None)]


IntDim, FloatDim, ScaleDim, NameDim = (_dim_type(k) for k in ("int", "float", "scale", "str"))


# -- the space ---------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


class RepeatSpace(_Strict):
    start: IntDim
    length: IntDim


class LayoutSpace(_Strict):
    method: NameDim = "dus"
    drop: IntDim = None
    repeat: RepeatSpace | None = None
    scale_overlap: ScaleDim = None
    blocks: IntDim = None
    where: NameDim = None
    init: NameDim = None

    @model_validator(mode="after")
    def _consistent(self):
        from solar_merge import upscale

        for key, allowed in (("method", LAYOUTS), ("where", upscale.WHERE),
                             ("init", upscale.INIT)):
            dim = getattr(self, key)
            bad = [v for v in (dim.values() if dim else []) if v not in allowed]
            if bad:
                raise ValueError(f"{key}: unknown `{bad[0]}`{did_you_mean(bad[0], allowed)}; "
                                 f"one of {', '.join(allowed)}")
        methods = self.method.values()
        if "dus" in methods and (self.drop is None) == (self.repeat is None):
            raise ValueError("a dus layout needs exactly one of `drop` (SOLAR's cut m) and "
                             "`repeat` ({start, length}: the range that occurs twice)")
        if "dus" not in methods and (self.drop or self.repeat or self.scale_overlap):
            raise ValueError("drop, repeat and scale_overlap belong to method dus")
        if "expand" in methods and self.blocks is None:
            raise ValueError("an expand layout needs `blocks` (how many new blocks)")
        if "expand" not in methods and (self.blocks or self.where or self.init):
            raise ValueError("blocks, where and init belong to method expand")
        if self.scale_overlap and any(v is not None and v <= 0
                                      for v in self.scale_overlap.values()):
            raise ValueError("scale_overlap: every value must be positive (or null)")
        return self


class MergeSpace(_Strict):
    method: Literal["solar_average", "solar_slerp"]
    weight: FloatDim = None
    t: FloatDim = None
    groups: int = Field(1, ge=1, le=32)
    filters: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self):
        if self.method == "solar_average" and (self.weight is None or self.t is not None):
            raise ValueError("solar_average takes `weight` (not t)")
        if self.method == "solar_slerp" and (self.t is None or self.weight is not None):
            raise ValueError("solar_slerp takes `t` (not weight)")
        if self.t is not None and not all(0 <= v <= 1 for v in self.t.values()):
            raise ValueError("t: solar_slerp's t lies in [0, 1] (0: the first candidate)")
        bad = [f for f in self.filters if not f.strip() or f == "rest" or re.fullmatch(
            r"g\d+|\d+", f)]
        if bad or len(set(self.filters)) != len(self.filters):
            raise ValueError(f"filters: {self.filters!r}: give distinct tensor-name parts such as "
                             "self_attn, mlp (`rest` is the name of the other tensors' value)")
        return self


class PerplexitySpec(_Strict):
    data: str                                  # .txt, or .jsonl/.json/.parquet with `text`
    samples: int = Field(16, ge=1)
    seq_len: int = Field(256, ge=8)
    batch_size: int = Field(4, ge=1)


class ScoreSpec(_Strict):
    tasks: list[str] | str | None = None
    metric: str | None = None
    include_path: list[str] | str | None = None
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | float | None = Field(None, gt=0)
    batch_size: int | Literal["auto"] = 8
    device: str | None = None
    perplexity: PerplexitySpec | None = None
    direction: Literal["maximize", "minimize"] | None = None

    @model_validator(mode="after")
    def _one_score(self):
        if (self.tasks is None) == (self.perplexity is None):
            raise ValueError("give exactly one of `tasks` (lm-eval) and `perplexity` "
                             "(held-out text)")
        return self


class CptSpec(_Strict):
    config: str                                # a `solar-merge train` stage config, stage: cpt
    overrides: list[str] = Field(default_factory=list)


class SamplerSpec(_Strict):
    name: Literal["tpe", "cmaes", "random"] = "tpe"
    seed: int | None = None
    n_startup_trials: int | None = Field(None, ge=0)


class SearchSpec(_Strict):
    """A search space (the YAML file) and how to run it; `run(spec, out_dir)` runs it."""
    model: str | None = None
    candidates: list[str] | None = None
    layout: LayoutSpace | None = None
    merge: MergeSpace | None = None
    score: ScoreSpec
    cpt: CptSpec | None = None
    sampler: SamplerSpec = Field(default_factory=SamplerSpec)
    pruner: Literal["median", "none"] = "median"
    study: str | None = None
    default: dict[str, Any] = Field(default_factory=dict)
    dtype: str | None = None
    trials: int = Field(20, ge=1)
    timeout: float | None = Field(None, gt=0)
    storage: str | None = None
    keep_all: bool = False

    @model_validator(mode="before")
    @classmethod
    def _sampler_name(cls, data):
        if isinstance(data, dict) and isinstance(data.get("sampler"), str):
            data = {**data, "sampler": {"name": data["sampler"]}}
        return data

    @model_validator(mode="after")
    def _what(self):
        if (self.model is None) == (self.candidates is None):
            raise ValueError("give `model` (search a layout of one model) or `candidates` "
                             "(merge them, up-scaled by `layout` if given)")
        if self.model is not None and (self.layout is None or self.merge is not None):
            raise ValueError("`model` goes with `layout` (and no `merge`): to merge, name "
                             "`candidates`")
        if self.candidates is not None:
            if len(self.candidates) < 2 or len(set(self.candidates)) != len(self.candidates):
                raise ValueError("candidates: name two or more different models")
            if self.merge is None:
                raise ValueError("`candidates` need `merge` (method and weight or t)")
            if self.merge.method == "solar_slerp" and len(self.candidates) != 2:
                raise ValueError("solar_slerp interpolates exactly two candidates")
        return self


_FIXES = {
    "drop": "e.g. drop: {low: 4, high: 12} or drop: [6, 8, 10]",
    "repeat": "e.g. repeat: {start: {low: 4, high: 16}, length: [4, 8]}",
    "scale_overlap": "e.g. scale_overlap: [null, 0.5, 0.75]",
    "weight": "e.g. weight: {low: 0.2, high: 0.8}",
    "t": "e.g. t: {low: 0.0, high: 1.0}",
    "tasks": "e.g. tasks: [solar_manual_qa] (ours ship offline), or perplexity: {data: FILE}",
    "sampler": f"one of {', '.join(SAMPLERS)}, or {{name: tpe, seed: 0, n_startup_trials: 5}}",
}


def parse_space(data, where: str = "search space") -> SearchSpec:
    """A SearchSpec from a mapping; a bad key or value is one UserError naming the field."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping with `model` or `candidates`, `score`, ...",
                        fix="see docs/search.md for a complete space")
    try:
        return SearchSpec.model_validate(data)
    except ValidationError as e:
        raise _schema_error(e, where) from None


def load_space(path) -> SearchSpec:
    """Read and check a search space YAML file; the study is named after the file."""
    from solar_merge.readers import read_yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"search space {path} not found", fix="check the path")
    spec = parse_space(read_yaml(path, what="search space"), where=str(path))
    return spec if spec.study else spec.model_copy(update={"study": path.stem})


def _schema_error(e: ValidationError, where: str) -> UserError:
    err = e.errors()[0]
    loc = []
    for part in err["loc"]:  # stop at a union member's tag (`list[str]`, `function-after[...]`)
        if isinstance(part, str) and not re.fullmatch(r"[a-z_][a-z0-9_]*", part):
            break
        loc.append(str(part))
    name = ".".join(loc)
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        keys = list(_model_at(loc[:-1]).model_fields)
        return UserError(f"{where}: unknown key `{name}`{did_you_mean(loc[-1], keys)}",
                         fix=f"keys here: {', '.join(keys)}")
    named = [p for p in loc if p in _FIXES]
    fix = _FIXES[named[-1]] if named else "see docs/search.md for every key of a search space"
    return UserError(f"{where}: {name + ': ' if name else ''}{msg}", fix=fix)


def _model_at(loc: list[str]) -> type[BaseModel]:
    import typing

    model: type[BaseModel] = SearchSpec
    for part in loc:
        field = model.model_fields.get(part)
        if field is None:
            break
        inner = [a for a in (typing.get_args(field.annotation) or (field.annotation,))
                 if isinstance(a, type) and issubclass(a, BaseModel)]
        if not inner:
            break
        model = inner[0]
    return model


# -- the plan: the space checked against the models, the scorer, the defaults ----------------

@dataclass
class Plan:
    spec: SearchSpec
    base_dir: Path
    model: str | None                # layout only
    candidates: list[str]
    info: Any                        # checkpoints.ModelInfo of the model / first candidate
    dims: dict[str, Dim]             # every parameter (searched or fixed) by name
    default: dict[str, Any]          # the hand-chosen point's searched parameters
    outside: list[str]               # its parameters that lie outside the space
    metric: str | None               # the column that decides (None: the scorer's first)
    direction: str                   # maximize | minimize
    eval_spec: Any = None            # sweep.EvalSpec (lm-eval scoring)
    text: str | None = None          # held-out text (perplexity scoring)
    cpt: dict | None = None          # the cpt stage config, and its folder
    cpt_base: Path | None = None
    space_hash: str = ""

    @property
    def n(self) -> int:
        return self.info.n_layers

    @property
    def searched(self) -> list[str]:
        return [k for k, d in self.dims.items() if d.searched]

    # define-by-run: which parameters a point has depends on the layout method chosen
    def walk(self, get) -> dict:
        """{name: value} of one point, `get(name, dim)` giving each value in turn."""
        values: dict[str, Any] = {}

        def take(name):
            values[name] = get(name, self.dims[name])
            return values[name]

        layout = self.spec.layout
        if layout is not None:
            if take("layout") == "dus":
                if layout.drop is not None:
                    take("drop")
                else:
                    take("repeat.start")
                    take("repeat.length")
                if layout.scale_overlap is not None:
                    take("scale_overlap")
            else:
                for name in ("blocks", "where", "init"):
                    if name in self.dims:
                        take(name)
        for name in merge_names(self.spec.merge, len(self.candidates)):
            take(name)
        return values

    def point(self, trial) -> dict:
        return self.walk(lambda name, dim: dim.suggest(trial, name))

    def point_of(self, params: dict) -> dict:
        """A point from a trial's parameters (fixed dimensions filled in)."""
        return self.walk(lambda name, dim: params.get(name, dim.fixed))

    # -- configs ------------------------------------------------------------------------------
    def config(self, point: dict, folder: Path | None = None):
        """(the mergekit config of a point, upscale.Planned for a layout of one model). An
        init that computes new layers keeps them beside `folder` (the trial's model)."""
        from solar_merge import upscale

        if self.model is not None:
            method, options = self._layout(point)
            planned = upscale.plan_upscale(self.model, method, base_dir=self.base_dir,
                                           **options)
            if planned.job is not None and folder is not None:
                planned = planned.placed(upscale.layers_dir_for(folder))
            return planned.config, planned
        dtype = self.spec.dtype or self.info.dtype
        if self.spec.layout is None:
            return self._models_config(point, dtype), None
        method, options = self._layout(point)
        layout = upscale.build_config(self.candidates[0], self.n, method=method, dtype=dtype,
                                      **options)
        upscale.check_residual_names(self.info, layout)
        return self._stacked_config(layout, point, dtype), None

    def _layout(self, point: dict) -> tuple[str, dict]:
        method = point["layout"]
        if method == "expand":
            return method, {k: point[k] for k in ("blocks", "where", "init") if k in point}
        options = {}
        if "drop" in point:
            options["drop"] = point["drop"]
        else:
            start = point["repeat.start"]
            options["repeat"] = [start, start + point["repeat.length"]]
        if point.get("scale_overlap") is not None:
            options["scale_overlap"] = point["scale_overlap"]
        return method, options

    def _tables(self, point: dict) -> list[dict]:
        """Per candidate: {filter or None: [value per layer group]} of its weight (or, for
        solar_slerp, one table: t)."""
        merge = self.spec.merge
        base = "weight" if merge.method == "solar_average" else "t"
        filters = [*merge.filters, "rest"] if merge.filters else [None]

        def table(owner):
            out = {}
            for f in filters:
                prefix = ".".join(p for p in (base, owner, f) if p)
                out[f] = [point[f"{prefix}.g{g}"] for g in range(merge.groups)] \
                    if merge.groups > 1 else [point[prefix]]
            return out

        if base == "t":
            return [table(None)]
        if len(self.candidates) == 2:
            second = table(None)
            return [{f: [1 - v for v in vs] for f, vs in second.items()}, second]
        return [table(str(i)) for i in range(len(self.candidates))]

    def _models_config(self, point: dict, dtype) -> dict:
        """A merge of whole candidates (the layout stays); gradients span the whole depth."""
        merge = self.spec.merge
        tables = self._tables(point)
        config = {"merge_method": merge.method, "base_model": self.candidates[0]}
        if merge.method == "solar_slerp":
            config["models"] = [{"model": c} for c in self.candidates]
            config["parameters"] = {"t": _setting(tables[0])}
        else:
            config["models"] = [{"model": c, "parameters": {"weight": _setting(tab)}}
                                for c, tab in zip(self.candidates, tables)]
        if dtype:
            config["dtype"] = dtype
        return config

    def _stacked_config(self, layout: dict, point: dict, dtype) -> dict:
        """The layout built on the first candidate, taken over by every candidate: each slice
        source becomes one source per candidate (same layer range). solar_average weights are
        normalised here (normalize: false), so a source that the layout scales (scale_overlap,
        identity blocks) or averages with another (average blocks) keeps exactly that factor:
        the result is the layout applied to the merge of the candidates, in one pass."""
        from solar_merge import upscale

        merge = self.spec.merge
        tables = self._tables(point)
        if merge.method == "solar_average":
            tables = _normalised(tables)
        slices = []
        for s in layout["slices"]:
            sources = []
            for src in s["sources"]:
                scale = (src.get("parameters") or {}).get("scale")
                twin = src["model"] != self.candidates[0]  # upscale.twin's other spelling
                for i, cand in enumerate(self.candidates):
                    entry = {"model": upscale.twin(cand) if twin else cand,
                             "layer_range": list(src["layer_range"])}
                    if merge.method == "solar_average":
                        entry["parameters"] = {"weight": _scaled(tables[i], scale,
                                                                 1 / len(s["sources"]))}
                    sources.append(entry)
            slices.append({"sources": sources})
        params = ({"normalize": False} if merge.method == "solar_average"
                  else {"t": _setting(tables[0])})
        config = {"slices": slices, "merge_method": merge.method,
                  "base_model": self.candidates[0], "parameters": params}
        if dtype:
            config["dtype"] = dtype
        return config


def merge_names(merge: MergeSpace | None, n_candidates: int) -> list[str]:
    """The merge's parameter names: `weight` or `t`, then `.<candidate>` (solar_average of
    three or more), `.<filter>` (and `.rest`), `.g<layer group>`."""
    if merge is None:
        return []
    base = "weight" if merge.method == "solar_average" else "t"
    owners = [str(i) for i in range(n_candidates)] if (
        base == "weight" and n_candidates > 2) else [None]
    filters = [*merge.filters, "rest"] if merge.filters else [None]
    groups = [f"g{g}" for g in range(merge.groups)] if merge.groups > 1 else [None]
    return [".".join(p for p in (base, o, f, g) if p)
            for o in owners for f in filters for g in groups]


def _setting(table: dict):
    """A mergekit parameter value: a number, a gradient list, or [{filter, value}, ...]."""
    def value(vs):
        return vs[0] if len(vs) == 1 else list(vs)

    if list(table) == [None]:
        return value(table[None])
    return [{"filter": f, "value": value(vs)} for f, vs in table.items() if f != "rest"] + \
        [{"value": value(table["rest"])}]


def _normalised(tables: list[dict]) -> list[dict]:
    """Weights divided by their sum over the candidates, element by element."""
    out = [{f: list(vs) for f, vs in t.items()} for t in tables]
    for f in tables[0]:
        for g in range(len(tables[0][f])):
            total = sum(t[f][g] for t in tables)
            if abs(total) < 1e-12:
                raise UserError(f"the candidates' weights sum to 0 ({[t[f][g] for t in tables]})"
                                ", so they cannot be normalised",
                                fix="give merge.weight a range of positive values")
            for t in out:
                t[f][g] /= total
    return out


def _scaled(table: dict, scale, factor: float):
    """A weight table times `factor`, and times a layout's `scale` filters if any."""
    times = {f: [v * factor for v in vs] for f, vs in table.items()}
    if scale is None:
        return _setting(times)
    if list(times) != [None]:  # refused in prepare(): filters of two kinds do not compose
        raise UserError("merge.filters with a scaled layout", fix="drop one of them")
    values = times[None]
    out = []
    for entry in scale:
        scaled = [v * entry["value"] for v in values]
        item = {"value": scaled[0] if len(scaled) == 1 else scaled}
        if "filter" in entry:
            item = {"filter": entry["filter"], **item}
        out.append(item)
    return out


def prepare(spec: SearchSpec, base_dir=None, *, scorer_given: bool = False) -> Plan:
    """Check the space against the models, tasks and data it names; nothing is written.
    Raises one UserError naming the field and the fix."""
    from solar_merge.checkpoints import local_dir, model_info

    base = Path(base_dir or os.getcwd()).absolute()

    def local(ref: str, where: str) -> str:
        folder = local_dir(ref, base)
        if folder is None:
            raise UserError(f"{where}: `{ref}` is not a local model folder: a search builds "
                            "and scores it many times", fix="download it first")
        return str(folder)

    model = local(spec.model, "model") if spec.model else None
    candidates = [local(c, f"candidates[{i}]") for i, c in enumerate(spec.candidates or [])]
    info = model_info(model or candidates[0], field="model" if model else "candidates[0]")
    dims = _dims(spec, info.n_layers, len(candidates))
    if not any(d.searched for d in dims.values()):
        raise UserError("the search space is empty: every dimension has one value",
                        fix="give a dimension a list of choices or a range {low, high}, e.g. "
                            "drop: {low: 4, high: 12} or weight: {low: 0.2, high: 0.8}")
    _check_layout(spec, dims, info.n_layers)
    plan = Plan(spec, base, model, candidates, info, dims, {}, [], spec.score.metric,
                spec.score.direction or "maximize")
    plan.default, plan.outside = _default_point(plan)
    config, _ = plan.config(plan.point_of(plan.default))
    if model is None:  # models exist, same shapes, known keys: before any trial runs
        from solar_merge.merging import check_config

        check_config(config, base, label="the default point's merge config")
    _check_score(plan, scorer_given)
    if spec.cpt is not None:
        _check_cpt(plan)
    plan.space_hash = _space_hash(plan)
    return plan


def _dims(spec: SearchSpec, n: int, n_candidates: int) -> dict[str, Dim]:
    dims: dict[str, Dim] = {}
    layout = spec.layout
    if layout is not None:
        dims["layout"] = layout.method
        for key in ("drop", "scale_overlap", "blocks", "where", "init"):
            if getattr(layout, key) is not None:
                dims[key] = getattr(layout, key)
        if layout.repeat is not None:
            dims["repeat.start"], dims["repeat.length"] = layout.repeat.start, \
                layout.repeat.length
    if spec.merge is not None:
        dim = spec.merge.weight if spec.merge.method == "solar_average" else spec.merge.t
        for name in merge_names(spec.merge, n_candidates):
            dims[name] = dim
    return dims


def _check_layout(spec: SearchSpec, dims: dict, n: int) -> None:
    """Every value a layout dimension can take must make a valid up-scale of n layers."""
    from solar_merge import upscale

    layout = spec.layout
    if layout is None:
        return
    if "drop" in dims:
        bad = [m for m in dims["drop"].values() if not 1 <= m < n / 2]
        if bad:
            raise UserError(f"layout.drop: {bad[0]} is out of range for a {n}-layer model: "
                            f"1 <= m < n/2 (s = 2(n-m) layers must exceed n)",
                            fix=f"use values in [1, {(n - 1) // 2}]; SOLAR uses m = n/4")
    if "repeat.start" in dims:
        start, length = dims["repeat.start"].values(), dims["repeat.length"].values()
        if min(start) < 0 or min(length) < 1 or max(start) + max(length) > n:
            raise UserError(f"layout.repeat: start up to {max(start)} plus length up to "
                            f"{max(length)} must stay within the model's {n} layers "
                            f"(start >= 0, length >= 1)",
                            fix=f"lower start.high or length.high so that they sum to <= {n}")
    if "blocks" in dims:
        wheres = dims["where"].values() if "where" in dims else ["interleaved"]
        inits = dims["init"].values() if "init" in dims else ["identity"]
        for b in dims["blocks"].values():
            for w in wheres:
                for i in inits:
                    try:
                        upscale.check_blocks(n, b, w, i)
                    except UserError as e:
                        raise UserError(f"layout.blocks {b} with where {w}, init {i}: "
                                        + e.message.split("\n  fix:")[0],
                                        fix="list only block counts valid for every where/init "
                                            "of the space") from None
    if spec.merge is None:
        return
    inits = dims["init"].values() if "init" in dims else []
    if "expand" in dims["layout"].values() and "init" not in dims:
        inits = ["identity"]
    odd = [i for i in inits if i not in STACKABLE_INITS]
    if odd:
        raise UserError(f"layout.init {odd[0]} cannot be merged across candidates in one "
                        "mergekit config", fix=f"use init {' or '.join(STACKABLE_INITS)}, or "
                                               "search the layout of one model (`model:`)")
    scaled = "identity" in inits or any(
        v is not None for v in (dims["scale_overlap"].values() if "scale_overlap" in dims
                                else []))
    if spec.merge.method == "solar_slerp" and (scaled or "average" in inits):
        raise UserError("merge.method solar_slerp with a layout that scales or averages layers "
                        "(scale_overlap, expand blocks): SLERP takes two sources per layer",
                        fix="use merge.method solar_average, or a dus layout without "
                            "scale_overlap")
    if scaled and spec.merge.filters:
        raise UserError("merge.filters with a layout that scales o_proj/down_proj "
                        "(scale_overlap, identity blocks): the two filter lists do not compose",
                        fix="drop merge.filters, or the scaling")


def _default_point(plan: Plan) -> tuple[dict, list[str]]:
    """The hand-chosen point: SOLAR's m = n/4 (its repeat [m, n-m)), no scaling, the
    candidates at 0.4/0.6 (three or more: equal), t = 0.5; `default:` overrides any of it."""
    spec, n = plan.spec, plan.n
    m = max(1, int(n / 4 + 0.5))
    given = dict(spec.default)
    unknown = [k for k in given if k not in plan.dims or not plan.dims[k].searched]
    if unknown:
        raise UserError(f"default: `{unknown[0]}` is not a searched parameter"
                        f"{did_you_mean(unknown[0], plan.searched)}",
                        fix=f"searched parameters: {', '.join(plan.searched)}")

    def guess(name: str, dim: Dim):
        if name in given:
            return given[name]
        if name == "layout":
            return "dus" if "dus" in dim.values() else dim.values()[0]
        if name == "drop":
            return m
        if name == "repeat.start":
            return m
        if name == "repeat.length":
            return n - 2 * m
        if name == "scale_overlap":
            return None if dim.contains(None) else 1.0
        if name.startswith("weight"):
            return 0.6 if len(plan.candidates) == 2 else 1.0
        if name.startswith("t"):
            return 0.5
        return dim.values()[0]

    point = plan.walk(guess)
    searched = {k: v for k, v in point.items() if plan.dims[k].searched}
    outside = [k for k, v in searched.items() if not plan.dims[k].contains(v)]
    return searched, outside


def _check_score(plan: Plan, scorer_given: bool) -> None:
    from solar_merge.sweep import EvalSpec, default_metric, pick_metric
    from solar_merge.tasks import catalog

    score = plan.spec.score
    if score.perplexity is not None:
        from solar_merge import analysis

        data = _path(score.perplexity.data, plan.base_dir)
        try:
            plan.text = analysis.read_text(data)
        except UserError as e:
            raise UserError("score.perplexity.data: " + e.message.split("\n  fix:")[0]
                            .replace("--data ", ""), fix="give a text file (.txt, or .jsonl "
                                                         "with a `text` field)") from None
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(plan.model or plan.candidates[0])
        p = score.perplexity
        analysis.token_samples(tokenizer, plan.text, p.samples, p.seq_len,
                               where="score.perplexity.data")
        plan.metric, plan.direction = "perplexity", score.direction or "minimize"
        return
    names = catalog.split_names(score.tasks)
    include = catalog.include_paths(
        [_path(p, plan.base_dir) for p in ([score.include_path] if isinstance(
            score.include_path, str) else score.include_path or [])] or None)
    _, loaded = catalog.load(names, include or None)  # reads the data: offline or not, now
    plan.eval_spec = EvalSpec(names, [str(p) for p in include], score.num_fewshot, score.limit,
                              score.batch_size, score.device)
    if scorer_given:
        return
    columns = _columns(names, loaded)
    try:
        plan.metric = pick_metric(columns, score.metric, default_metric(names))
    except UserError as e:
        raise UserError("score." + e.message.split("\n  fix:")[0].lstrip("-"),
                        fix="give one of those names in full") from None
    plan.direction = score.direction or ("maximize" if columns[plan.metric] else "minimize")


def _columns(names: list[str], loaded: dict) -> dict[str, bool]:
    """Every `task metric,filter` column lm-eval will report (solar_merge.eval.table's names),
    with whether higher is better, read from the task configs before any model runs."""
    from solar_merge.tasks import catalog

    def of_task(task) -> dict[str, bool]:
        filters = [f["name"] for f in (task.config.filter_list or [])] or ["none"]
        return {f"{m},{f}": bool(h) for m, h in task.higher_is_better().items() for f in filters}

    columns: dict[str, bool] = {}
    for name in names:
        if name == "h6":
            columns.update({f"h6 {k}": True for k in (*catalog.H6, "average")})
        elif name in loaded["tasks"]:
            columns.update({f"{name} {k}": h for k, h in of_task(loaded["tasks"][name]).items()})
        else:  # a group or tag: its own aggregate, or its tasks' rows
            for task in loaded["tasks"].values():
                for k, h in of_task(task).items():
                    columns.setdefault(f"{name} {k}", h)
                    columns.setdefault(f"{task.config.task} {k}", h)
    return columns


def _check_cpt(plan: Plan) -> None:
    from solar_merge.stages import load_stage_config, resolve

    path = _path(plan.spec.cpt.config, plan.base_dir)
    config = load_stage_config(path)
    if config.get("stage") != "cpt":
        raise UserError(f"cpt.config: {path} is a `{config.get('stage')}` stage",
                        fix="name a stage config with `stage: cpt` (training/cpt.yaml)")
    probe = plan.model or plan.candidates[0]
    resolve(config, [*plan.spec.cpt.overrides, f"model={probe}"], Path(path).parent)
    plan.cpt, plan.cpt_base = config, Path(path).parent


def _path(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(str(value)))
    return str(p if p.is_absolute() else base / p)


def _space_hash(plan: Plan) -> str:
    """What the study's trials mean: the space and the contents (not the paths) of the
    models and data it names, so that machines with their own copies agree."""
    from solar_merge.outputs import config_hash, fingerprint

    spec = plan.spec
    space = spec.model_dump(mode="json", exclude={"trials", "timeout", "storage", "keep_all",
                                                  "study", "model", "candidates"})
    if spec.score.perplexity is not None:
        space["score"]["perplexity"]["data"] = fingerprint(
            _path(spec.score.perplexity.data, plan.base_dir))
    if spec.score.include_path:
        space["score"]["include_path"] = plan.eval_spec.include_path and [
            fingerprint(p) for p in plan.eval_spec.include_path]
    if plan.cpt is not None:
        space["cpt"] = {"config": {k: v for k, v in plan.cpt.items() if k not in (
            "model", "output")}, "overrides": spec.cpt.overrides}
    return config_hash({"version": VERSION, "space": space,
                        "models": [fingerprint(m) for m in
                                   ([plan.model] if plan.model else plan.candidates)]})


# -- the study ---------------------------------------------------------------------------------

def masked(url: str) -> str:
    """A study URL without its password (for reports, cards and messages)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy parses: shown without credentials
        return re.sub(r"//[^@/]*@", "//***@", url)


def open_storage(url: str):
    """Optuna's RDBStorage on `url`, with heartbeats (a dead worker's trial is failed and
    retried); a URL that cannot be opened is a UserError."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else \
        {"pool_pre_ping": True}
    for attempt in range(5):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT,
                                  grace_period=GRACE, heartbeat_stale_trial_callback=(
                                      RetryHeartbeatStaleTrialCallback(RETRIES)))
        except Exception as e:  # noqa: BLE001 - sqlalchemy's many kinds, a missing driver
            # two workers creating the tables of a new database at once: one of them loses
            racing = any(w in str(e) for w in ("already exists", "UNIQUE constraint", "locked"))
            if racing and attempt < 4:
                time.sleep(0.5 + attempt)
                continue
            text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
            raise UserError(f"--storage {masked(url)}: cannot open the study database "
                            f"({type(e).__name__}: {text})",
                            fix="install the URL's database driver: postgresql+psycopg2:// "
                                "needs `pip install psycopg2-binary`, postgresql:// (psycopg 3 "
                                "with SQLAlchemy 2.1) `pip install \"psycopg[binary]\"`"
                                if isinstance(e, ImportError) else
                                "check the URL (e.g. sqlite:///OUT/study.db, "
                                "postgresql+psycopg2://USER:PASSWORD@HOST/DB) and that the "
                                "server runs and the database exists") from None


def _sampler(spec: SamplerSpec, seed: int | None):
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        startup = {} if spec.n_startup_trials is None else {
            "n_startup_trials": spec.n_startup_trials}
        if spec.name == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False,
                                                **startup)
        if spec.name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # multivariate + group: joint models of dependent and conditional parameters;
        # constant_liar: running trials of other workers count, so workers spread out
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          constant_liar=True, **startup)


def _pruner(name: str):
    import optuna

    if name == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0)


def open_study(storage, name: str, plan: Plan):
    """Create the study (this worker then enqueues the default point as trial 0) or join it;
    a study made for another space is refused."""
    import optuna

    seed = plan.spec.sampler.seed
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=plan.direction,
                                    sampler=_sampler(plan.spec.sampler, seed),
                                    pruner=_pruner(plan.spec.pruner))
        created = True
    except optuna.exceptions.DuplicatedStudyError:
        # another worker's sampler: its own random stream, or both would propose the same
        study = optuna.load_study(study_name=name, storage=storage, pruner=_pruner(
            plan.spec.pruner), sampler=_sampler(plan.spec.sampler, None if seed is None
                                                else seed + os.getpid()))
        created = False
    if created:
        study.set_user_attr("space_hash", plan.space_hash)
        study.set_user_attr("metric", plan.metric)
        study.set_user_attr("space", plan.spec.model_dump(
            mode="json", exclude={"trials", "timeout", "storage", "keep_all"}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            study.enqueue_trial(plan.default, user_attrs={"default": True})
        return study
    theirs = study.user_attrs.get("space_hash")
    if theirs not in (None, plan.space_hash) or study.direction.name.lower() != plan.direction:
        raise UserError(f"study `{name}` in {masked(storage.url)} belongs to another search "
                        "space (or other models or data)",
                        fix="give this space another `study:` name, or delete that study: "
                            f"optuna delete-study --study-name {name} --storage URL")
    return study


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,
                                                        TrialState.PRUNED)))


def _best(study):
    """The best complete trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None


# -- workers -----------------------------------------------------------------------------------

def _worker() -> dict:
    """Who runs a trial: enough to tell, on the same machine, whether it is still alive."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "pid": os.getpid(),
            "start": _start_ticks(os.getpid())}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    try:  # field 22 of /proc/PID/stat: when the process started (tells reused pids apart)
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _dead(worker: dict | None) -> bool:
    """True only when the worker ran on this machine since its last boot and is gone."""
    me = _worker()
    if not worker or worker.get("host") != me["host"] or worker.get("boot") != me["boot"]:
        return False
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return False
    started = _start_ticks(pid)
    if started is None:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return worker.get("start") is not None and started != worker["start"]


def fail_dead_trials(study) -> list[int]:
    """Fail (and enqueue again, as Optuna's heartbeat would after its grace period) the
    running trials whose worker process on this machine has died; return their numbers."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    storage = study._storage
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not _dead(trial.user_attrs.get("worker")):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id,
                                                                   trial.number)
        try:
            if not storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker failed it first
        RetryHeartbeatStaleTrialCallback(RETRIES)(study, storage.get_trial(trial_id))
        failed.append(trial.number)
    if failed:
        log.warning("trial(s) %s: their worker died; failed and enqueued again", failed)
    return failed


class _Surplus(Exception):
    """The study already holds its trials (another worker asked at the same moment)."""


class _TrialFailed(Exception):
    """A trial raised; its error is in the trial's user attribute `error`."""


class _Worker:
    """One process's share of a study: the objective and what runs after each trial."""

    def __init__(self, plan: Plan, study, out: Path, trials: int, keep_all: bool,
                 scorer):
        self.plan, self.study, self.out, self.trials = plan, study, out, trials
        self.keep_all, self.scorer = keep_all, scorer
        self.me = _worker()
        self.failures: list[BaseException] = []  # consecutive, in this worker
        self.ran: list[int] = []
        self.disk_peak = 0

    # the objective
    def __call__(self, trial):
        import optuna

        trial.set_user_attr("worker", self.me)
        if self._surplus(trial):
            trial.set_user_attr("surplus", True)
            self.study.stop()
            raise _Surplus(f"trial {trial.number}: the study already holds {self.trials}")
        point = self.plan.point(trial)
        try:
            model = self.build(trial.number, point, trial)
            from solar_merge.testhooks import crash_point

            crash_point("search-built")  # kill tests: a worker dies inside a trial
            value, metrics = self.score(model, trial)
        except optuna.TrialPruned:
            raise
        except Exception as e:
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            self.failures.append(e)
            raise _TrialFailed(str(e)) from e
        self.failures.clear()
        trial.set_user_attr("metrics", metrics)
        self.disk_peak = max(self.disk_peak, disk_bytes(self.out / "trials"))
        trial.set_user_attr("disk_bytes", self.disk_peak)
        return value

    def _surplus(self, trial) -> bool:
        from optuna.trial import TrialState

        before = self.study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        return sum(t.number < trial.number for t in before) >= self.trials

    def build(self, number: int, point: dict, trial=None) -> Path:
        """The trial's model: a mergekit merge (out of core, atomic), then the CPT if any."""
        folder = self.out / "trials" / f"trial-{number}"
        config, planned = self.plan.config(point, folder)
        if trial is not None:
            trial.set_user_attr("config", config)
        if planned is not None:
            planned.run(folder)
        else:
            from solar_merge.merging import merge

            merge(config, folder, base_dir=self.plan.base_dir, label=f"trial {number}")
        if self.plan.cpt is None:
            return folder
        from solar_merge.stages import train

        trained = train(self.plan.cpt, folder.with_name(f"trial-{number}-cpt"),
                        overrides=[*self.plan.spec.cpt.overrides, f"model={folder}"],
                        base_dir=self.plan.cpt_base)
        if not self.keep_all:  # the merge was only the CPT's start (best.yaml rebuilds it)
            shutil.rmtree(folder)
        return trained

    def score(self, model: Path, trial) -> tuple[float, dict]:
        import optuna

        plan = self.plan
        if self.scorer is None and plan.text is not None:
            def report(step, value):
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned(f"perplexity {value:.4g} after batch {step}")

            value = held_out_perplexity(model, plan.text, plan.spec.score.perplexity, report)
            return value, {"perplexity": value}
        if self.scorer is None:
            from solar_merge.sweep import lm_eval_scorer

            metrics, _ = lm_eval_scorer(plan.eval_spec, self.out)(model)
        else:
            metrics, _ = self.scorer(model)
        from solar_merge.sweep import pick_metric

        column = pick_metric(metrics, plan.metric)
        if plan.metric is None:  # a scorer's first column: the same for every worker
            plan.metric = column
            self.study.set_user_attr("metric", column)
        return float(metrics[column]), metrics

    # after each trial (Optuna calls it with the finished trial)
    def after(self, study, trial) -> None:
        from optuna.trial import TrialState

        from solar_merge.testhooks import crash_point

        if trial.user_attrs.get("worker", {}).get("pid") == self.me["pid"]:
            self.ran.append(trial.number)
        fail_dead_trials(study)
        with _lock(self.out):
            tidy(self.out, study, self.keep_all)
        done = study.get_trials(deepcopy=False, states=(
            TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        if len(done) >= self.trials or len(self.failures) >= MAX_FAILURES:
            study.stop()
        crash_point("search-trial-done")  # kill tests: a worker dies between trials

    def optimize(self, timeout: float | None) -> None:
        fail_dead_trials(self.study)
        with _lock(self.out):
            tidy(self.out, self.study, self.keep_all)
        if _finished(self.study) >= self.trials:
            return
        self.study.optimize(self, timeout=timeout, callbacks=[self.after],
                            catch=(_TrialFailed, _Surplus), gc_after_trial=True)
        if len(self.failures) >= MAX_FAILURES:
            last = self.failures[-1]
            raise UserError(f"{MAX_FAILURES} trials in a row failed; the last: "
                            f"{type(last).__name__}: {str(last).splitlines()[0][:300]}",
                            fix="the trials' errors are in the study (user attribute `error`, "
                                "and trials.csv); correct the space or the inputs and re-run: "
                                "finished trials are kept") from last


def held_out_perplexity(model_dir, text: str, spec: PerplexitySpec, report=None) -> float:
    """exp(mean token negative log-likelihood) on the first `samples` chunks of `seq_len`
    tokens of `text`; `report(batch, running perplexity)` after every batch (pruning)."""
    import torch

    from solar_merge import analysis

    model, tokenizer = analysis.load_model(model_dir)
    chunks = analysis.token_samples(tokenizer, text, spec.samples, spec.seq_len,
                                    where="score.perplexity.data")
    nll, tokens = 0.0, 0
    with torch.inference_mode():
        for step, i in enumerate(range(0, len(chunks), spec.batch_size)):
            ids = torch.tensor(chunks[i:i + spec.batch_size])
            loss = model(input_ids=ids, labels=ids).loss  # mean over B * (L - 1) tokens
            count = ids.shape[0] * (ids.shape[1] - 1)
            nll, tokens = nll + float(loss) * count, tokens + count
            if report is not None:
                report(step, math.exp(nll / tokens))
    return math.exp(nll / tokens)


# -- the output folder -------------------------------------------------------------------------

def _lock(out: Path):
    """Serialises the workers of one OUT folder around deleting and publishing."""
    from filelock import FileLock

    return FileLock(str(out / ".search.lock"), timeout=3600)


def disk_bytes(path: Path) -> int:
    """Bytes the files below `path` take (hard links counted once)."""
    seen, total = set(), 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def tidy(out: Path, study, keep_all: bool) -> None:
    """Delete the trial folders nobody needs: failed and pruned trials (with whatever a killed
    worker left half-written), and complete ones that are not the best (unless keep_all).
    Folders of running or waiting trials, and of other studies, are left alone."""
    from optuna.trial import TrialState

    folder = out / "trials"
    if not folder.is_dir():
        return
    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    best = _best(study)
    for p in folder.iterdir():
        match = _TRIAL_NAME.match(p.name)
        if not match or int(match.group(1)) not in states:
            continue
        number, state = int(match.group(1)), states[int(match.group(1))]
        if state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        finished = not p.name.startswith(".")
        if state == TrialState.COMPLETE and finished and (
                keep_all or (best is not None and number == best.number)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _check_out(out: Path, plan: Plan) -> None:
    """OUT is new, empty, or this space's search folder (resumed); anything else is refused
    before anything is written (--overwrite: started afresh)."""
    from solar_merge.outputs import check_replaceable, overwrite_allowed

    if not out.exists() and not out.is_symlink():
        if not os.access(_existing_parent(out), os.W_OK):
            raise UserError(f"cannot create {out}: its folder is not writable",
                            fix="choose a writable output folder")
        return
    if out.is_symlink() or not out.is_dir():
        check_replaceable(out)
    state = out / STATE_FILE
    for _ in range(100):  # another worker is making it (only its temporary file is there)
        names = [p.name for p in out.iterdir()]
        if state.is_file() or not names or not all(n.startswith(".search") for n in names):
            break
        time.sleep(0.1)
    if state.is_file():
        try:
            theirs = json.loads(state.read_text()).get("space_hash")
        except (OSError, ValueError):
            theirs = None
        if theirs == plan.space_hash or overwrite_allowed():
            return
        raise UserError(f"{out} holds a search of another space (or other models or data)",
                        fix="choose another output folder, or add --overwrite to start afresh "
                            "(its study and trials are deleted)")
    if any(out.iterdir()):
        check_replaceable(out)  # refused unless --overwrite


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _claim(out: Path, plan: Plan, url: str) -> None:
    """Make OUT this space's search folder (emptied first when --overwrite allowed a foreign
    or other-space folder)."""
    from solar_merge.outputs import overwrite_allowed

    state = out / STATE_FILE
    ours = state.is_file() and json.loads(state.read_text()).get("space_hash") == \
        plan.space_hash
    if (out.exists() or out.is_symlink()) and not ours and overwrite_allowed():
        shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    if not ours:  # first, so that a worker starting beside this one knows the folder
        _write_text(state, json.dumps({"space_hash": plan.space_hash, "study": plan.spec.study,
                                       "storage": masked(url)}, indent=1) + "\n")
    (out / "trials").mkdir(exist_ok=True)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # `.search.json.*` for search.json
    tmp.write_text(text)
    os.replace(tmp, path)


# -- running -----------------------------------------------------------------------------------

@dataclass
class SearchResult:
    out: Path
    best_dir: Path
    study: str
    storage: str                     # masked
    metric: str
    direction: str
    finished: int                    # complete + pruned trials in the study
    asked: int
    best: dict                       # number, value, params
    default: dict | None             # the hand-chosen point's trial
    ran: list[int]                   # trials this process ran
    disk_peak: int                   # bytes under OUT/trials after this process's trials

    def summary(self) -> str:
        lines = [(f"study `{self.study}` ({self.storage}): {self.finished} of {self.asked} "
                  f"trials finished, {len(self.ran)} run by this process")]
        better = "higher" if self.direction == "maximize" else "lower"
        lines.append(f"best: trial {self.best['number']}, {self.metric} = "
                     f"{self.best['value']:.6g} ({better} is better), {_params(self.best)}")
        if self.default:
            lines.append(f"default (trial {self.default['number']}): "
                         + (f"{self.default['value']:.6g}" if self.default["value"] is not None
                            else self.default["state"]) + f", {_params(self.default)}")
        lines.append(f"model: {self.best_dir}; config: {self.out / 'best.yaml'}; report: "
                     f"{self.out / 'report.md'}; disk peak of trials/: {size(self.disk_peak)}")
        return "\n".join(lines)


def _params(row: dict) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in row["params"].items()) or "no parameter"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _scorer_hook():
    """The test suite's scorer for processes it starts (SOLAR_MERGE_SEARCH_SCORER=FILE:NAME);
    None (lm-eval or perplexity scoring) when unset."""
    spec = os.environ.get(SCORER_HOOK)
    if not spec:
        return None
    import runpy

    file, _, name = spec.rpartition(":")
    return runpy.run_path(file)[name]


def run(spec: SearchSpec, out_dir, *, base_dir=None, trials: int | None = None,
        timeout: float | None = None, storage: str | None = None,
        keep_all: bool | None = None, scorer=None, digest: str | None = None) -> SearchResult:
    """Run (or resume, or join) the search of `spec` into `out_dir` until its study holds
    `trials` finished trials (or `timeout` seconds pass); publish the best to out_dir/best.

    Arguments given here win over the spec's. `scorer(model_dir) -> (metrics,
    higher_is_better)` replaces lm-eval (tests, benchmarks); the metric is then `score.metric`
    (default: the first column) and the direction `score.direction` (default: maximize).
    `digest` marks out_dir/best complete (a recipe's stage hash; default: the space, the
    study and the best trial)."""
    trials = trials or spec.trials
    timeout = timeout if timeout is not None else spec.timeout
    keep_all = spec.keep_all if keep_all is None else keep_all
    scorer = scorer or _scorer_hook()
    plan = prepare(spec, base_dir, scorer_given=scorer is not None)
    out = Path(out_dir).absolute()
    _check_out(out, plan)
    url = storage or spec.storage
    given = open_storage(url) if url else None  # a bad URL fails here, before OUT exists
    url = url or f"sqlite:///{out / STUDY_DB}"
    _claim(out, plan, url)
    name = spec.study or "search"
    study = open_study(given or open_storage(url), name, plan)
    if plan.outside:
        log.warning("the default point lies outside the space for %s", ", ".join(plan.outside))
    worker = _Worker(plan, study, out, trials, keep_all, scorer)
    worker.optimize(timeout)
    plan.metric = plan.metric or study.user_attrs.get("metric") or "score"
    best = _best(study)
    if best is None:
        raise UserError(f"study `{name}` has no complete trial yet",
                        fix="re-run the search (it resumes), or see trials.csv for errors")
    with _lock(out):
        tidy(out, study, keep_all)
        publish(out, study, plan, best, digest)
        write_report(out, study, plan, storage=masked(url), asked=trials, best=best,
                     default=_default_trial(study), disk_now=disk_bytes(out))
    return SearchResult(out, out / "best", name, masked(url), plan.metric or "score",
                        plan.direction, _finished(study), trials, _row(best), _row(
                            _default_trial(study)), worker.ran, worker.disk_peak)


def _row(trial) -> dict | None:
    if trial is None:
        return None
    return {"number": trial.number, "value": trial.value, "params": dict(trial.params),
            "state": trial.state.name.lower(), "metrics": trial.user_attrs.get("metrics", {})}


def _default_trial(study):
    from optuna.trial import TrialState

    rows = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("default")]
    done = [t for t in rows if t.state == TrialState.COMPLETE]
    return (done or rows or [None])[0]


def publish(out: Path, study, plan: Plan, best, digest: str | None = None) -> Path:
    """OUT/best: the best trial's model (hard links to its trial folder; rebuilt from its
    parameters if another machine ran it), with a card that says how it was found, and
    OUT/best.yaml, its stock mergekit config."""
    import yaml

    from solar_merge.outputs import MARKER, atomic_output, config_hash, is_complete, portable

    best_dir = out / "best"
    digest = digest or config_hash({"space": plan.space_hash, "study": study.study_name,
                                    "trial": best.number})
    point = plan.point_of(best.params)
    config, _ = plan.config(point, out / "trials" / f"trial-{best.number}")
    header = ("# mergekit-yaml best.yaml OUT --copy-tokenizer --clone-tensors\n"
              f"# The best of the search `{study.study_name}` (trial {best.number}, "
              f"{plan.metric} = {best.value:.6g})"
              + (", before its continued pretraining (cpt: in the search space)" if plan.cpt
                 else "") + ".\n")
    _write_text(out / "best.yaml", header + yaml.safe_dump(config, sort_keys=False))
    if is_complete(best_dir, digest):
        return best_dir
    worker = _Worker(plan, study, out, 0, True, None)
    source = out / "trials" / f"trial-{best.number}{'-cpt' if plan.cpt else ''}"
    if not is_complete(source):
        log.warning("trial %d's model is not on this machine: building it again", best.number)
        source = worker.build(best.number, point)
    with atomic_output(best_dir, digest) as work:
        for f in source.rglob("*"):
            rel = f.relative_to(source)
            if f.is_dir() or rel.name == MARKER:
                continue
            (work / rel).parent.mkdir(parents=True, exist_ok=True)
            try:  # weights: hard links (no second copy on disk); the card is written anew
                if f.suffix not in (".safetensors", ".bin"):
                    raise OSError
                os.link(f, work / rel)
            except OSError:
                shutil.copy2(f, work / rel)
        _card(work, study, plan, best, yaml.safe_dump(portable(config, best_dir),
                                                      sort_keys=False))
    return best_dir


def _card(work: Path, study, plan: Plan, best, config_yaml: str) -> None:
    from solar_merge.hub import write_card

    default = _default_trial(study)
    table = {f"best (trial {best.number})": best.user_attrs.get("metrics", {})}
    if default is not None and default.number != best.number and default.user_attrs.get(
            "metrics"):
        table[f"default (trial {default.number})"] = default.user_attrs["metrics"]
    inputs = [plan.model] if plan.model else plan.candidates
    method = "passthrough" if plan.model else plan.spec.merge.method
    write_card(work, kind="merge" if plan.spec.merge else "dus",
               source_yaml="# mergekit-yaml mergekit_config.yml OUT --copy-tokenizer "
                           "--clone-tensors\n" + config_yaml,
               source_name="mergekit_config.yml", base_models=inputs, merge_method=method,
               lineage=[{"stage": "best", "kind": "search", "inputs": inputs}],
               eval_table=table, extra_tags=["search", "optuna"],
               description=f"The best of {_finished(study)} trials of an Optuna search "
                           f"(`solar-merge search`), by `{plan.metric}`.",
               sections={"How it was found": how_found(study, plan, best, default)})
