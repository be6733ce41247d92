"""Recipes: one YAML file of named stages, run in dependency order.

    # solar-merge run training/demo.yaml
    name: demo
    out: runs/demo                 # output root (relative: the recipe's folder); --out wins
    final: dpo                     # the pipeline's final model (gets the recipe card)
    stages:
      dus:   {upscale: {model: HuggingFaceTB/SmolLM2-135M-Instruct, drop: 8}}
      cpt:   {train: {stage: cpt, model: dus, datasets: [data/corpus.txt]}}
      avg:   {merge: {merge_method: solar_average, models: [{model: cpt, ...}, ...]}}
      slerp: {merge: {file: ../merge_configs/sft_slerp.yaml, models: [...]}}
      dpo:   {train: {stage: dpo, model: avg, datasets: [...]}}
      eval:  {eval: {models: [dus, cpt, dpo], tasks: [solar_manual_ppl, solar_arith]}}

Each stage has exactly one kind; what a kind's body holds, how it is checked, sized and run
is its module's (solar_merge.kinds: upscale, train, merge, eval, sweep, synth_math). A model
field whose value is a stage name stands for that stage's model and makes it a dependency;
any other value is a local path (relative to the recipe file) or a Hub id.

    schema.py   the recipe file: its strict schema, loading, `key=value` overrides
    planner.py  plan(): each stage resolved by its kind, the graph ordered, each stage hashed
                with its inputs (resolved config, earlier stages' hashes, the contents of local
                files it reads) and sized; format_plan() for `validate`
    runner.py   run(): stages in order, each skipped when complete for its hash, else run by
                its kind (in a fresh process with `isolate`); the final model's card

Resume: a stage whose output is complete for its hash (solar_merge.outputs: the completion
record its tool writes) is skipped; a changed stage re-runs, and so does everything
downstream (their hashes include it). Planning imports neither torch nor mergekit and never
downloads weights (Hub models: config.json at most).
"""

from solar_merge.kinds.context import StagePlan
from solar_merge.recipe.planner import Plan, format_plan, plan
from solar_merge.recipe.runner import RunResult, run, stage_costs, stage_done
from solar_merge.recipe.schema import Loaded, Recipe, load

__all__ = ["Loaded", "Plan", "Recipe", "RunResult", "StagePlan", "format_plan", "load",
           "plan", "run", "stage_costs", "stage_done"]
