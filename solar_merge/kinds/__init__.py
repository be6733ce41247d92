"""Recipe stage kinds: one module per kind, found through kinds/registry.py.

A stage of a recipe is one kind and its body, e.g. `cpt: {train: {stage: cpt, ...}}`. The
kind's module owns everything about it; the planner and the runner (solar_merge.recipe) only
order, hash, print and call. A kind module defines:

    MODEL        where its model is inside the stage's output folder ("" for the folder
                 itself), or None when it makes no model (later stages cannot name it as one)
    HOLDS        what its output holds, in a few words (for messages)
    DATA_FILES   {file: what it is for}: files it writes that train stages name in
                 `datasets:` as `<stage>/<file>` (that makes the stage a dependency)
    resolve(name, body, ctx) -> StagePlan
                 validate `body` with the tool's own checker, resolve references (ctx.ref,
                 ctx.data_ref) and paths; every problem goes to ctx.problems
    size(plan, ctx)
                 in dependency order: the predicted output (plan.info), shape checks against
                 the inputs, plan.memory and plan.memory_note
    run(plan)    the tool, on the resolved config, into plan.out_dir, its completion marked
                 with plan.hash (solar_merge.outputs: the one completion record)
    describe(plan) -> str
                 the kind column of `validate`/`plan`, e.g. `train:cpt`
    card(plan) -> dict | None
                 what it adds to the final model's card: {"bases": [...], "datasets": [...]};
                 None: not part of the final model's lineage
    training_data(body) -> list[str]
                 the data sets (as written) the stage trains on: an eval stage's
                 `contamination: {train: auto}` checks them all
    metrics(plan) -> tables.Table | None
                 its scores from its finished output (rows {model: {column: value}}, the
                 direction of each column), else None; a recipe run prints them joined
    hub_results(plan, model) -> list
                 the scores of `model` as model-index entries for the Hub card

A kind whose inputs are the base models of its output, that trains on no data set and writes
no scores, imports those four hooks from kinds/defaults.py as its own.

Adding a kind: one module defining the above, and one line in registry.py.
"""

from solar_merge.kinds.context import Context, StagePlan

__all__ = ["Context", "StagePlan"]
