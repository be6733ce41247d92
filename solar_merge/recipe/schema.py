"""The recipe file: a strict pydantic schema, and loading from a file, an output folder, a URL
or a Hub repo, with `dotted.key=value` overrides applied first."""


import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from solar_merge.errors import UserError, did_you_mean
from solar_merge.readers import load_yaml, read_text

KINDS = ("upscale", "train", "merge", "eval", "sweep", "synth_math")


# -- schema ----------------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UpscaleSpec(_Strict):
    model: str
    method: Literal["dus", "expand", "repeat"] = "dus"  # repeat: all 2n layers, a baseline
    drop: int | None = Field(default=None, ge=0, description="DUS: layers m dropped per copy")
    every: int | None = Field(default=None, ge=1, description="expand: a new block every N")
    # issue 19 (solar_merge.upscale.build_config checks the values):
    repeat: str | list[int] | None = None  # dus: "A:B" or [A, B], repeat layers A..B-1 once
    scale_overlap: float | None = None     # dus: o_proj/down_proj of repeated layers x ALPHA
    blocks: int | None = None              # expand: K new blocks
    where: Literal["interleaved", "top"] | None = None
    init: Literal["identity", "average", "lesa", "aligned-average"] | None = None
    # growth presets and symmetry breaking (values checked by upscale.build_upscale):
    preset: Literal["midas", "gstack"] | None = None  # dus: a growth preset to `layers`
    layers: int | None = None              # dus with preset: the layers to grow to
    noise: float | None = None             # symmetry-breaking noise on duplicated layers
    seed: int | None = None                # of `noise` and of LESA's predictor
    options: dict[str, Any] = Field(default_factory=dict)  # mergekit MergeOptions fields

    @model_validator(mode="after")
    def _method_fields(self):
        given = {k for k in ("drop", "every", "repeat", "scale_overlap", "blocks", "where",
                             "init", "preset", "layers", "noise", "seed")
                 if getattr(self, k) is not None}
        random = {"noise", "seed"}
        allowed = {"dus": {"drop", "repeat", "scale_overlap", "preset", "layers"} | random,
                   "expand": {"every", "blocks", "where", "init"} | random,
                   "repeat": random}[self.method]
        if given - allowed:
            raise ValueError(f"method {self.method} takes no "
                             f"{', '.join(f'`{k}`' for k in sorted(given - allowed))}"
                             + (f" (its keys: {', '.join(sorted(allowed))})" if allowed else ""))
        if self.method == "dus" and len(given & {"drop", "repeat", "preset"}) != 1:
            raise ValueError("method dus needs `drop` or `repeat` or `preset` (one of them)")
        if self.method == "expand" and len(given & {"every", "blocks"}) != 1:
            raise ValueError("method expand needs `every` or `blocks` (one of them)")
        return self


class SynthMathSpec(_Strict):  # issue 17: solar_merge.synth_math (checks the values too)
    data: str                          # the seed problems: file, folder or Hub dataset
    model: str | None = None           # a stage, folder or Hub id; default: embedded SmolLM2
    split: str = "train"
    subset: str | None = None          # a Hub dataset's config (GSM8K: main)
    limit: int | None = Field(default=None, ge=1)
    samples_per_problem: int = Field(default=1, ge=1)
    batch_size: int = Field(default=8, ge=1)
    temperature: float = Field(default=0.0, ge=0)
    max_new_tokens: int = Field(default=384, ge=1)
    seed: int = 0
    engine: Literal["auto", "transformers", "vllm"] = "auto"
    threads: int | None = Field(default=None, ge=1)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # solar_merge.precision


class Stage(_Strict):
    upscale: UpscaleSpec | None = None
    train: dict[str, Any] | None = None  # a stage config (solar_merge.stages), minus `output`
    merge: dict[str, Any] | None = None  # a mergekit config, or {file: ...} (+ overrides)
    eval: dict[str, Any] | None = None   # {models: [...], <solar_merge.eval.EvalSpec>}
    sweep: dict[str, Any] | None = None  # {models, method, grid, tasks, ...}: solar_merge.sweep
    synth_math: SynthMathSpec | None = None  # rephrased math data; train stages name its files

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
    # [TRAIN] issue 12: how train stages run (a stage's own `train.launch` wins, key by key;
    # keys of stages.schema.LaunchSpec) and mergekit options for every merge stage (a stage's
    # `merge.options` win), e.g. {cuda: true}
    launch: dict[str, Any] | None = None
    merge_options: dict[str, Any] | None = None
    stages: dict[str, Stage] = Field(min_length=1)


def _schema_error(e: ValidationError, label: str) -> UserError:
    lines = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc)
        if err["type"] == "extra_forbidden":
            model = Recipe if len(loc) == 1 else Stage if len(loc) == 3 else \
                {"synth_math": SynthMathSpec}.get(loc[2], UpscaleSpec)
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
    remote: bool = False  # fetched from a URL or the Hub: may write only under its output root


def load(source, overrides=(), *, base_dir=None) -> Loaded:
    """A recipe from a file, an output folder, a URL or a Hub repo (hub.load_recipe_text),
    or a mapping; `overrides` are `dotted.key=value` strings (values parsed as YAML)."""
    remote = False
    if isinstance(source, dict):
        data, label = copy.deepcopy(source), "recipe"
        base = Path(base_dir or os.getcwd())
    else:
        path = Path(os.path.expanduser(str(source)))
        if path.is_file():
            text, label = read_text(path, what="recipe"), str(source)
            base = path.absolute().parent
        else:
            try:
                from solar_merge.hub import load_recipe_text
            except ImportError:  # pragma: no cover - hub.py is optional for local files
                raise UserError(f"recipe {source} not found", fix="check the path") from None
            text, label = load_recipe_text(str(source))
            base = Path(os.getcwd())  # a recipe from a folder, URL or Hub repo: paths are ours
            remote = not Path(os.path.expanduser(str(source))).exists()
        data = load_yaml(text, label)
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
    return Loaded(data, recipe, base.absolute(), label, remote)
