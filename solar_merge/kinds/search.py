"""`search:` an Optuna search of up-scaling layouts and merge weights (solar_merge.search):
a search space, as `solar-merge search` reads it from a file. The best trial's model, in
`<stage>/best`, is the stage's model.

    best: {search: {candidates: [sft_a, sft_b], trials: 20, score: {tasks: [solar_manual_qa]},
                    merge: {method: solar_average, weight: {low: 0.2, high: 0.8}}}}

The study (`<stage>/study.db` unless `storage:` names a database) resumes where it stopped;
a changed space starts a new one in the stage's folder.
"""

import copy

from solar_merge.errors import UserError
from solar_merge.kinds.context import OVERHEAD, Context, StagePlan, first_line, out_bytes, resized
from solar_merge.kinds.defaults import card, hub_results, metrics, training_data  # noqa: F401

MODEL = "best"
HOLDS = "a model"
DATA_FILES: dict[str, str] = {}


def resolve(name: str, body: dict, ctx: Context) -> StagePlan:
    from solar_merge.search import parse_space

    where = f"stages.{name}.search"
    deps: list[str] = []
    out_dir = ctx.out / name
    try:
        spec = parse_space(body, where)
    except UserError as e:
        ctx.problems.append(first_line(e))
        return StagePlan(name, "search", out_dir, deps, [], dict(body))
    config = copy.deepcopy(body)
    config.setdefault("study", name)
    inputs = [spec.model] if spec.model else list(spec.candidates)
    if spec.model:
        config["model"] = ctx.ref(f"{where}.model", spec.model, deps)
    else:
        config["candidates"] = [ctx.ref(f"{where}.candidates[{i}]", c, deps)
                                for i, c in enumerate(spec.candidates)]
    score = config["score"]
    if spec.score.perplexity is not None:
        score["perplexity"]["data"] = ctx.local_path(spec.score.perplexity.data)
    if spec.score.include_path:
        paths = spec.score.include_path
        score["include_path"] = [ctx.local_path(p)
                                 for p in ([paths] if isinstance(paths, str) else paths)]
    if spec.cpt is not None:
        config["cpt"]["config"] = ctx.local_path(spec.cpt.config)
    first = config.get("model") or config["candidates"][0]
    return StagePlan(name, "search", out_dir, deps, inputs, config,
                     record_dir=out_dir / MODEL, tokenizer=first)


def size(plan: StagePlan, ctx: Context) -> None:
    """A merge of candidates keeps their shape; a searched layout's layer count is what the
    search finds (unknown until then)."""
    refs = plan.config.get("candidates") or [plan.config.get("model")]
    infos = [ctx.info(r) for r in refs]
    if plan.config.get("layout") or any(i is None for i in infos):
        return
    first = infos[0]
    plan.info = resized(first, first.n_layers, plan.out_dir / MODEL)
    plan.params_estimated = ctx.estimated(refs)
    layer = (first.per_layer_params or 0) * first.dtype_bytes
    plan.memory = max(out_bytes(plan.info) + len(refs) * layer, (first.params or 0) * 4) \
        + OVERHEAD
    plan.memory_note = ("the larger of one trial's merge (output + one layer per input) and "
                        "its scoring (the merge in fp32)")


def run(plan: StagePlan) -> None:
    """The search in the stage's folder; a folder of an earlier search of this stage (ours:
    it holds search.json) is resumed for the same space, started afresh for another."""
    from solar_merge import search
    from solar_merge.outputs import overwriting

    spec = search.parse_space(plan.config, f"stages.{plan.name}.search")
    ours = (plan.out_dir / search.STATE_FILE).is_file()
    with overwriting(ours):
        search.run(spec, plan.out_dir, digest=plan.hash)


def describe(plan: StagePlan) -> str:
    return "search:" + ("layout" if plan.config.get("layout") else "merge")
