"""`eval:` lm-evaluation-harness on several models (solar_merge.eval): `models:` plus the
options of solar_merge.eval.EvalSpec (tasks, num_fewshot, limit, include_path, batch_size,
device, precision, contamination, ...).

    eval: {eval: {models: [dus, cpt, final], tasks: [solar_manual_ppl, solar_arith]}}

Tasks are checked when the recipe is planned (lm-eval's index), not after hours of training;
`contamination: {train: auto}` checks every data set the recipe trains on.
"""

import copy
import json
import os

from solar_merge.errors import UserError
from solar_merge.kinds.context import OVERHEAD, Context, StagePlan, first_line
from solar_merge.kinds.defaults import training_data  # noqa: F401

MODEL = None
HOLDS = "lm-eval scores"
DATA_FILES: dict[str, str] = {}


def resolve(name: str, body: dict, ctx: Context) -> StagePlan:
    from solar_merge import eval as lm

    where = f"stages.{name}.eval"
    spec = copy.deepcopy(body)
    models = spec.pop("models", None)
    deps: list[str] = []
    if not isinstance(models, list) or not models:
        ctx.problems.append(f"{where}.models: list the stages (or model folders) to evaluate")
        models = []
    resolved = {str(m): ctx.ref(f"{where}.models", m, deps) for m in models}
    config = {"models": resolved, "tasks": [], "options": {}, "fingerprints": {}}
    try:
        parsed = lm.parse_spec(spec, where=where)
    except UserError as e:
        ctx.problems.append(first_line(e))
    else:
        config.update(_options(where, parsed, ctx))
    return StagePlan(name, "eval", ctx.out / name, deps, [str(m) for m in models], config)


def _options(where: str, parsed, ctx: Context) -> dict:
    """lm-eval's options with paths resolved: include_path against the recipe, contamination
    `train: auto` to every data set the recipe trains on; the tasks are looked up now."""
    from solar_merge.outputs import fingerprint
    from solar_merge.tasks import catalog

    options = parsed.model_dump(exclude={"tasks", "include_path", "contamination"})
    paths = parsed.include_path
    paths = [paths] if isinstance(paths, str) else paths or []
    include = [ctx.local_path(p) for p in paths]
    tasks = catalog.split_names(parsed.tasks)
    try:
        catalog.task_manager(tasks, include or None)
    except UserError as e:
        ctx.problems.append(f"{where}: {first_line(e)}")
    contamination = None
    if parsed.contamination is not None:
        c = parsed.contamination
        if c.train == "auto":
            written = [p for n in ctx.names
                       for p in ctx.kinds[ctx.kind_of(n)].training_data(ctx.body_of(n))]
        else:
            written = [c.train] if isinstance(c.train, str) else c.train
        train = list(dict.fromkeys(ctx.data_path(p) for p in written))
        if not train:
            ctx.problems.append(f"{where}.contamination.train: auto found no training set in "
                                "this recipe; list the data sets to check")
        contamination = {"train": train, "n": c.n, "fail_above": c.fail_above}
    data = [*include, *(contamination["train"] if contamination else [])]
    return {"tasks": tasks, "include_path": include, "contamination": contamination,
            "options": options,
            "fingerprints": {p: fingerprint(p) for p in data if os.path.exists(p)}}


def size(plan: StagePlan, ctx: Context) -> None:
    sizes = [ctx.info(m) for m in plan.config["models"].values()]
    known = [i.params for i in sizes if i is not None and i.params]
    if known:
        plan.memory = max(known) * 4 + OVERHEAD
        plan.memory_note = "the largest model in fp32 (one model at a time)"


def run(plan: StagePlan) -> None:
    """lm-eval on every model: their results.json, the table (metrics.json) and the
    contamination report when asked (solar_merge.eval.evaluate)."""
    from solar_merge import eval as lm

    c = plan.config
    lm.evaluate(c["models"], c["tasks"], out=plan.out_dir, include_path=c["include_path"] or None,
                contamination=c["contamination"], digest=plan.hash, **c["options"])


def describe(plan: StagePlan) -> str:
    return "eval"


def card(plan: StagePlan) -> None:
    return None


def metrics(plan: StagePlan):
    from solar_merge.eval import read_table

    return read_table(plan.out_dir)


def hub_results(plan: StagePlan, model: str) -> list:
    from solar_merge import eval as lm

    results = plan.out_dir / model / lm.RESULTS
    if model not in plan.config.get("models", {}) or not results.is_file():
        return []
    return lm.eval_results(json.loads(results.read_text()))
