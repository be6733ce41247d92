"""`synth_math:` rephrased math data (solar_merge.synth_math), not a model: train stages name
its files in `datasets:` as `<stage>/math_instruct.jsonl` (sft) or
`<stage>/math_alignment.jsonl` (dpo).

    synth: {synth_math: {data: gsm8k_train.jsonl, limit: 200}}
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from solar_merge.errors import UserError
from solar_merge.kinds.context import OVERHEAD, Context, StagePlan, first_line
from solar_merge.kinds.defaults import hub_results, metrics, training_data  # noqa: F401
from solar_merge.synth_math import ALIGNMENT, INSTRUCT

MODEL = None
HOLDS = "data"
DATA_FILES = {INSTRUCT: "sft", ALIGNMENT: "dpo"}


class Spec(BaseModel):
    """The stage's body; solar_merge.synth_math.Options.check checks the values."""
    model_config = ConfigDict(extra="forbid")

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


def resolve(name: str, body: dict, ctx: Context) -> StagePlan:
    from solar_merge.precision import requested
    from solar_merge.synth_math import Options

    where = f"stages.{name}.synth_math"
    parsed = ctx.parse(Spec, body, where)
    deps: list[str] = []
    if parsed is None:
        return StagePlan(name, "synth_math", ctx.out / name, deps, [], dict(body))
    spec = parsed.model_dump()
    spec["precision"] = requested(spec["precision"])  # SOLAR_MERGE_PRECISION: another run
    inputs = [spec["data"]] + ([spec["model"]] if spec["model"] else [])
    if spec["model"] is not None:
        spec["model"] = ctx.ref(f"{where}.model", spec["model"], deps)
    data = Path(os.path.expanduser(spec["data"]))
    data = data if data.is_absolute() else ctx.base / data
    if data.exists():
        spec["data"] = os.path.normpath(data.absolute())
    elif spec["data"].startswith((".", "/", "~")) or data.suffix in (
            ".jsonl", ".json", ".parquet", ".txt"):
        ctx.problems.append(f"{where}.data: {os.path.normpath(data)} not found (a local file "
                            "or folder of seed problems, or a Hub dataset name)")
    try:
        Options(**{k: v for k, v in spec.items() if k != "data"}).check()
    except UserError as e:
        ctx.problems.append(f"{where}: {first_line(e)}")
    return StagePlan(name, "synth_math", ctx.out / name, deps, inputs, spec)


def size(plan: StagePlan, ctx: Context) -> None:
    from solar_merge.embedded import EMBEDDED_NAME, cache_root

    model = plan.config["model"]
    if model is None:  # the embedded model, once imported
        model = str(cache_root() / EMBEDDED_NAME)
        if not os.path.isdir(model):
            return
    info = ctx.info(model)
    if info is not None and info.params:
        plan.memory = info.params * 4 + OVERHEAD
        plan.memory_note = ("the generating model in fp32 (less in bf16/fp16, where the "
                            "device computes them natively) + overhead")


def run(plan: StagePlan) -> None:
    from solar_merge.synth_math import Options, synth_math

    options = dict(plan.config)
    data = options.pop("data")
    synth_math(data, plan.out_dir, Options(**options), digest=plan.hash)


def describe(plan: StagePlan) -> str:
    return "synth_math"


def card(plan: StagePlan) -> dict:
    """Its seed data is a data set of the lineage; its generating model is no base model."""
    return {"bases": [], "datasets": plan.inputs[:1]}
