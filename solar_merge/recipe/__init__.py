"""Recipes: one YAML file of named stages (upscale, train, merge, eval), run in dependency order.

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

Each stage has exactly one kind. A model field whose value is a stage name stands for that
stage's output folder `<out>/<stage>` and makes it a dependency; any other value is a local
path (relative to the recipe file; for `merge: {file: ...}`, relative to that file) or a Hub
id. A `merge` stage is a mergekit config, inline or `file:` (inline keys replace the file's
top-level keys, `key: null` removes one) plus optional mergekit `options:`. An `eval`
stage runs lm-evaluation-harness (solar_merge.eval.EvalSpec: tasks, num_fewshot, limit,
include_path, batch_size, ..., contamination).

A `synth_math` stage (solar_merge.synth_math) writes rephrased math data, not a model: train
stages name its files in `datasets:` as `<stage>/math_instruct.jsonl` (sft) or
`<stage>/math_alignment.jsonl` (dpo), which makes it a dependency as a stage named in a model
field does.

Resume: each stage's config is resolved (paths absolute, stage references replaced by their
output folder *and* their hash) and hashed. A stage whose output is complete and stamped
with the same hash (`recipe_stage.json`) is skipped; a changed stage re-runs, and so does
everything downstream (their hashes include it). Planning imports neither torch nor mergekit
and never downloads weights (Hub models: config.json at most).
"""

from solar_merge.recipe.planner import Plan, StagePlan, format_plan, plan
from solar_merge.recipe.runner import RUNNERS, RunResult, run, stage_costs, stage_done
from solar_merge.recipe.schema import KINDS, Loaded, Recipe, load

__all__ = ["KINDS", "RUNNERS", "Loaded", "Plan", "Recipe", "RunResult", "StagePlan",
           "format_plan", "load", "plan", "run", "stage_costs", "stage_done"]
