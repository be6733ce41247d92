"""The main job: SOLAR's whole pipeline on the embedded SmolLM2-135M-Instruct, offline.

`run_demo()` imports the embedded model (solar_merge.embedded), writes the offline data
(demo/data.py), copies the shipped recipe training/smollm2_demo.yaml (solar_merge.recipes)
beside them, runs it as a recipe (every stage in its own process) and writes the report
(demo/report.py). `plan_demo()` does all but the running: `solar-merge demo --dry-run`.
"""

from pathlib import Path

from solar_merge import recipes
from solar_merge.demo.data import demo_data
from solar_merge.demo.report import ARITH, BPB, PPL, QA, claims, cost_table, write_report
from solar_merge.embedded import EMBEDDED_NAME, embedded_model

RECIPE = recipes.find("smollm2_demo").path

# --quick: the same pipeline as a smoke run (every stage, a step or two each, the smallest
# evaluations that still give each claim a number): 2 CPT steps of 2 x 64 tokens per arm with
# the held-out curve at steps 0, 1 and 2 on one chunk; 1 + 1 / 2 SFT records, 1 preference pair
# for DPO and 2 for sDPO (one per step; data.SIZES); perplexity on one chunk; the chat tasks
# on 4 questions for the final merge.
QUICK_OVERRIDES = [
    "stages.cpt.train.args.max_steps=2",
    "stages.cpt.train.args.eval_steps=1",
    "stages.cpt.train.args.per_device_train_batch_size=2",
    "stages.cpt.train.seq_len=64",
    "stages.cpt.train.eval_datasets.0.max_samples=1",
    "stages.sft_python.train.datasets.1.max_samples=1",
    "stages.dpo_avg.train.datasets.0.max_samples=1",
    "stages.eval_text.eval.models=[smollm2-135m-instruct, repeat, dus, cpt, base_cpt, final]",
    "stages.eval_text.eval.limit=1",
    "stages.eval_chat.eval.models=[final]",
    "stages.eval_chat.eval.limit=4",
]


def run_demo(out_dir=None, *, quick: bool = False, overrides=()) -> Path:
    """The main job: SOLAR's pipeline on the embedded SmolLM2, offline. Returns report.md.

    OUT gets the data (data/), a link to the imported model, the recipe (recipe.yaml, runnable
    by hand), one folder per stage (the final model is Hub-ready in final/) and the report.
    Re-running resumes: finished stages are skipped.
    """
    import time

    from solar_merge import recipe

    started = time.perf_counter()
    plan = plan_demo(out_dir, quick=quick, overrides=overrides)
    out, recipe_file = plan.out, plan.out / "recipe.yaml"
    command = "solar-merge demo" + (" --quick" if quick else "")
    result = recipe.run(plan, isolate=True)  # each stage in its own process: memory freed
    merged = {}
    for metrics in result.metrics.values():
        for model_name, values in metrics.items():
            merged.setdefault(model_name, {}).update(values)
    import yaml  # rows in pipeline order: the base model, then the recipe's stages

    from solar_merge.checkpoints import model_info

    order = [EMBEDDED_NAME, *yaml.safe_load(recipe_file.read_text())["stages"]]
    labels = {}  # model folder name -> the report's row name
    table = {}
    for k in sorted(merged, key=lambda k: order.index(k) if k in order else len(order)):
        info = model_info(str(out / k))
        labels[k] = BASE_LABEL if k == EMBEDDED_NAME else k
        table[labels[k]] = {"layers": info.n_layers, "params": info.params, **merged[k]}
    checks = [out / name / "contamination.md" for name in result.metrics]
    sections = {"Contamination check": [line for f in checks if f.is_file()
                                        for line in [f"`{f.parent.name}`:", "",
                                                     *f.read_text().splitlines(), ""]]}
    if not sections["Contamination check"]:
        del sections["Contamination check"]
    from solar_merge.curves import arms_section, eval_curve, forecast
    from solar_merge.precision import decide

    sections["Control arm: DUS + CPT vs base + CPT"], _ = arms_section(
        ("DUS + CPT", out / "cpt"), ("base + CPT", out / "base_cpt"), out / "control_arm.png",
        what=("The paper's claim needs this control: the base model given exactly the same "
              "continued pretraining (data, steps, learning rate) as the up-scaled one. Held-out "
              "perplexity = exp(TRL's eval_loss) on held-out reference-manual chunks, measured "
              "every few steps during CPT."))
    sections["What each stage cost"] = cost_table(
        recipe.stage_costs(plan), ran=result.ran, total=time.perf_counter() - started)
    counts = question_counts(out, list(result.metrics), labels)
    arms = {"DUS + CPT": eval_curve(out / "cpt"), "base + CPT": eval_curve(out / "base_cpt")}
    fc = forecast(*arms.values())
    claims_lines = claims(table, counts=counts, arms=arms, forecast=fc,
                          facts=training_facts(out, counts, BASE_LABEL))
    chosen = decide("auto")
    return write_report(table, out, cpt_curve=out / "cpt" / "loss.jsonl", command=command,
                        sections=sections, counts=counts, arms=arms, forecast=fc,
                        claims_lines=claims_lines,
                        machine={"precision (auto)": f"{chosen.precision}: {chosen.reason}"})


BASE_LABEL = "base (SmolLM2-135M-Instruct)"
_COLUMNS = {"solar_manual_ppl": [PPL, BPB], "solar_manual_qa": [QA], "solar_arith": [ARITH]}


def question_counts(out: Path, eval_stages, labels: dict) -> dict:
    """{row: {column: documents scored}} from lm-eval's n-samples in each eval stage's
    results.json per model (the proportions' denominators; the chunks of a perplexity)."""
    import json

    counts: dict[str, dict] = {}
    for stage in eval_stages:
        for res in sorted((out / stage).glob("*/results.json")):
            data = json.loads(res.read_text())
            row = labels.get(res.parent.name, res.parent.name)
            for task, n in data.get("n-samples", {}).items():
                for column in _COLUMNS.get(task, []):
                    counts.setdefault(row, {})[column] = n.get("effective", n.get("original"))
    return counts


def training_facts(out: Path, counts: dict, base_label: str) -> dict:
    """What the claims quote from the training logs: CPT's steps and tokens, the held-out
    chunks, DPO's and sDPO's optimizer steps, loss and (where logged) reward margin, first and
    last, on their training pairs."""
    from solar_merge.stages.logs import LOSS_LOG, read_loss

    facts: dict = {}
    cpt = read_loss(out / "cpt" / LOSS_LOG)
    if cpt:
        facts["cpt_steps"] = cpt[-1][0]
        tokens = read_loss(out / "cpt" / LOSS_LOG, "num_tokens")
        if tokens:
            facts["cpt_tokens"] = int(tokens[-1][1])
    chunks = counts.get(base_label, {}).get(PPL)
    if chunks:
        facts["eval_chunks"] = chunks
    for stage in ("dpo_avg", "sdpo_slerp"):
        logged = read_loss(out / stage / LOSS_LOG)
        if logged:
            d = facts.setdefault("dpo", {})[stage] = {
                "steps": len(logged), "loss": (logged[0][1], logged[-1][1])}
            # dpo logs reward margins; stepwise_dpo's log keeps each step's loss
            margins = read_loss(out / stage / LOSS_LOG, "rewards/margins")
            if margins:
                d["margin"] = (margins[0][1], margins[-1][1])
    return facts


def plan_demo(out_dir=None, *, quick: bool = False, overrides=()):
    """Everything the demo does before its first stage, and the plan of its stages (a
    recipe.Plan): imports the embedded model (once; cached), writes the data, the link to the
    model and the recipe (OUT/recipe.yaml) into OUT."""
    from functools import partial

    from solar_merge import recipe
    from solar_merge.recipe.runner import in_fresh_process

    out = Path(out_dir or ("runs/demo-quick" if quick else "runs/demo")).absolute()
    # Both in a process of their own: what they import and hold (~1 GB for the model's import)
    # leaves with it, and this process stays at ~35 MB while the stages run.
    model = in_fresh_process(embedded_model, "the embedded model's import")
    in_fresh_process(partial(demo_data, out / "data", quick=quick), "the demo data")
    link = out / EMBEDDED_NAME
    if link.is_symlink() and link.resolve() != model:
        link.unlink()
    if not link.exists():
        link.symlink_to(model, target_is_directory=True)
    recipe_file = out / "recipe.yaml"
    recipe_file.write_text(RECIPE.read_text())
    overrides = control_arm_overrides([*(QUICK_OVERRIDES if quick else []), *overrides])
    return in_fresh_process(partial(recipe.plan, str(recipe_file), overrides=overrides),
                            "planning the recipe")


def control_arm_overrides(overrides) -> list[str]:
    """Every `stages.cpt.train.*` override is also applied to the control arm `base_cpt`
    (except its model), so that both arms always get the same CPT."""
    out = list(overrides)
    for item in overrides:
        key = str(item).partition("=")[0]
        if key.startswith("stages.cpt.train.") and key != "stages.cpt.train.model":
            out.append("stages.base_cpt.train." + str(item)[len("stages.cpt.train."):])
    return out
