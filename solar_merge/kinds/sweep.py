"""`sweep:` merge candidates at every point of a grid, score each merge with lm-eval, keep
the best (solar_merge.sweep): the best merge is the stage's output folder.

    best: {sweep: {models: [sft_a, sft_b], method: solar_slerp, grid: "0,0.5,1",
                   tasks: [solar_manual_qa]}}
"""

import copy

from solar_merge.errors import UserError
from solar_merge.kinds.context import OVERHEAD, Context, StagePlan, first_line, out_bytes, resized
from solar_merge.kinds.defaults import card, hub_results, metrics, training_data  # noqa: F401

MODEL = ""
HOLDS = "a model"
DATA_FILES: dict[str, str] = {}


def resolve(name: str, body: dict, ctx: Context) -> StagePlan:
    from solar_merge.sweep import grid_points, stage_spec

    where = f"stages.{name}.sweep"
    spec = copy.deepcopy(body)
    models = spec.pop("models", None)
    deps: list[str] = []
    if not isinstance(models, list) or len(models) < 2:
        ctx.problems.append(f"{where}.models: list two or more stages or model folders to "
                            "merge")
        models = models if isinstance(models, list) else []
    resolved = [ctx.ref(f"{where}.models[{i}]", m, deps) for i, m in enumerate(models)]
    try:
        spec = stage_spec(spec, where)
        if len(models) >= 2:
            grid_points(spec["method"], len(models), spec["grid"])
        include = spec.get("include_path")
        if include:
            spec["include_path"] = [ctx.local_path(p)
                                    for p in ([include] if isinstance(include, str) else include)]
    except UserError as e:
        message = first_line(e)
        ctx.problems.append(message if message.startswith(where) else f"{where}: {message}")
    return StagePlan(name, "sweep", ctx.out / name, deps, [str(m) for m in models],
                     {"models": resolved, **spec},
                     tokenizer=resolved[0] if resolved and isinstance(resolved[0], str)
                     else None)


def size(plan: StagePlan, ctx: Context) -> None:
    refs = plan.config["models"]
    infos = [ctx.info(r) for r in refs]
    if not infos or any(i is None for i in infos):
        return
    first = infos[0]
    for ref, i in zip(refs[1:], infos[1:]):
        if i.shape_key() != first.shape_key() or i.n_layers != first.n_layers:
            ctx.problems.append(
                f"stages.{plan.name}.sweep.models: `{ref}` (hidden {i.hidden_size}, "
                f"{i.n_layers} layers) cannot be merged with `{refs[0]}` (hidden "
                f"{first.hidden_size}, {first.n_layers} layers)")
            return
    plan.info = resized(first, first.n_layers, plan.out_dir)
    plan.params_estimated = ctx.estimated(refs)
    layer = (first.per_layer_params or 0) * first.dtype_bytes
    merging = out_bytes(plan.info) + len(refs) * layer + OVERHEAD
    scoring = (first.params or 0) * 4 + OVERHEAD
    plan.memory = max(merging, scoring)
    plan.memory_note = ("the larger of one merge (output + one layer per input) and one "
                        "lm-eval run (the merge in fp32)")


def run(plan: StagePlan) -> None:
    from solar_merge.sweep import run_stage

    spec = dict(plan.config)
    run_stage(spec.pop("models"), plan.out_dir, spec, digest=plan.hash)


def describe(plan: StagePlan) -> str:
    return "sweep"
