"""`upscale:` a deeper model from one model (solar_merge.upscale): SOLAR's depth up-scaling,
a range repeat or a growth preset (dus), block expansion (expand), or the naive 2n repeat.

    dus: {upscale: {model: mistralai/Mistral-7B-v0.1, drop: 8}}
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from solar_merge.kinds.context import OVERHEAD, Context, StagePlan, first_line, out_bytes, resized
from solar_merge.kinds.defaults import card, hub_results, metrics, training_data  # noqa: F401

MODEL = ""
HOLDS = "a model"
DATA_FILES: dict[str, str] = {}


class Spec(BaseModel):
    """The stage's body; solar_merge.upscale.build_upscale checks the values."""
    model_config = ConfigDict(extra="forbid")

    model: str
    method: Literal["dus", "expand", "repeat"] = "dus"  # repeat: all 2n layers, a baseline
    drop: int | None = Field(default=None, ge=0, description="DUS: layers m dropped per copy")
    every: int | None = Field(default=None, ge=1, description="expand: a new block every N")
    repeat: str | list[int] | None = None  # dus: "A:B" or [A, B], repeat layers A..B-1 once
    scale_overlap: float | None = None     # dus: o_proj/down_proj of repeated layers x ALPHA
    blocks: int | None = None              # expand: K new blocks
    where: Literal["interleaved", "top"] | None = None
    init: Literal["identity", "average", "lesa", "aligned-average"] | None = None
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


def resolve(name: str, body: dict, ctx: Context) -> StagePlan:
    where = f"stages.{name}.upscale"
    spec = ctx.parse(Spec, body, where)
    deps: list[str] = []
    if spec is None:
        return StagePlan(name, "upscale", ctx.out / name, deps, [], dict(body))
    model = ctx.ref(f"{where}.model", spec.model, deps)
    return StagePlan(name, "upscale", ctx.out / name, deps, [spec.model],
                     {**spec.model_dump(), "model": model}, tokenizer=model)


def size(plan: StagePlan, ctx: Context) -> None:
    c = plan.config
    src = ctx.info(c["model"])
    if src is None:
        return
    from solar_merge.errors import UserError
    from solar_merge.upscale import build_config, layer_count, new_layers, spec_options

    try:
        config = build_config(c["model"], src.n_layers, method=c["method"], **spec_options(c))
    except UserError as e:
        ctx.problems.append(f"stages.{plan.name}.upscale: {first_line(e)}")
        return
    plan.new_layers = new_layers(config)
    plan.info = resized(src, layer_count(config), plan.out_dir)
    plan.params_estimated = ctx.estimated([c["model"]])
    plan.memory = out_bytes(plan.info) + (src.per_layer_params or 0) * src.dtype_bytes + OVERHEAD
    plan.memory_note = "output tensors + one input layer at a time (lazy) + overhead"


def run(plan: StagePlan) -> None:
    """The up-scale's mergekit config is built here, from the model as it is now: an earlier
    stage's output may differ from its prediction (its dtype), and computed layers (LESA,
    aligned averages, noise) are read from its weights."""
    from solar_merge.upscale import plan_upscale, spec_options

    c = plan.config
    planned = plan_upscale(c["model"], c["method"], **spec_options(c))
    planned.run(plan.out_dir, options=c["options"], digest=plan.hash)


def describe(plan: StagePlan) -> str:
    return f"upscale:{plan.config.get('method')}"
