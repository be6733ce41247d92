"""`train:` one training stage (cpt, sft, dpo, stepwise_dpo: solar_merge.stages): a stage
config without `output` (the recipe places it under `out:`), validated and resolved by the
stages' own resolve(), run on that resolved config.

    cpt: {train: {stage: cpt, model: dus, datasets: [data/corpus.txt], args: {max_steps: 40}}}

The recipe's `launch:` gives every train stage its defaults, key by key (a stage's own
`launch:` wins).
"""

import copy
import dataclasses
import os
from pathlib import Path

from solar_merge.errors import UserError, did_you_mean
from solar_merge.kinds.context import Context, StagePlan, first_line
from solar_merge.kinds.defaults import hub_results, metrics  # noqa: F401

MODEL = ""
HOLDS = "a model"
DATA_FILES: dict[str, str] = {}


def resolve(name: str, body: dict, ctx: Context) -> StagePlan:
    from solar_merge.stages import DatasetSpec, StageConfig
    from solar_merge.stages import resolve as resolve_stage

    where = f"stages.{name}.train"
    cfg = copy.deepcopy(body)
    known = len(ctx.problems)
    allowed = [k for k in StageConfig.model_fields if k != "output"]
    for key in cfg:
        if key not in allowed:
            extra = (" (the recipe places outputs under `out:`)" if key == "output"
                     else did_you_mean(str(key), allowed))
            ctx.problems.append(f"{where}.{key}: unknown key{extra}; allowed here: "
                                f"{', '.join(allowed)}")
    for i, d in enumerate(cfg["datasets"] if isinstance(cfg.get("datasets"), list) else []):
        for key in d if isinstance(d, dict) else ():
            if key not in DatasetSpec.model_fields:
                ctx.problems.append(f"{where}.datasets[{i}].{key}: unknown key"
                                    f"{did_you_mean(str(key), DatasetSpec.model_fields)}")
    if ctx.recipe.launch or cfg.get("launch"):
        cfg["launch"] = {**(ctx.recipe.launch or {}), **(cfg.get("launch") or {})}
    deps: list[str] = []
    inputs = [cfg.get("model")] + ([cfg["ref_model"]] if cfg.get("ref_model") else [])
    for key in ("model", "ref_model"):
        if cfg.get(key) is not None:
            cfg[key] = ctx.ref(f"{where}.{key}", cfg[key], deps)
    if cfg.get("datasets") is not None:
        items = cfg["datasets"] if isinstance(cfg["datasets"], list) else [cfg["datasets"]]
        items = [ctx.data_ref(f"{where}.datasets[{i}]", d, deps) for i, d in enumerate(items)]
        cfg["datasets"] = items if isinstance(cfg["datasets"], list) else items[0]
    resolved = cfg
    # `new` layers of an earlier stage's output come from that stage's plan (size), not from
    # whatever folder an earlier run left there
    later = cfg.get("trainable_layers") == "new" and isinstance(body.get("model"), str) \
        and body["model"] in ctx.recipe.stages
    if len(ctx.problems) == known:
        try:
            resolved = resolve_stage({**cfg, "trainable_layers": None} if later else cfg, (),
                                     ctx.base)
            if later:
                resolved["trainable_layers"] = "new"
        except UserError as e:
            ctx.problems.append(f"{where}: {first_line(e)}")
    sets = resolved.get("datasets") if isinstance(resolved.get("datasets"), list) else []
    for i, d in enumerate(sets):
        p = Path(str(d.get("path", ""))) if isinstance(d, dict) else Path()
        made = any(p.is_relative_to(ctx.out / dep) for dep in deps)  # by an earlier stage
        if p.is_absolute() and not p.exists() and not made:
            ctx.notes.append(f"{where}.datasets[{i}]: {os.path.normpath(p)} does not exist "
                             "yet (needed when the stage runs)")
    args = resolved.get("args") if isinstance(resolved.get("args"), dict) else {}
    template = args.get("chat_template_path") or resolved.get("model")
    return StagePlan(name, "train", ctx.out / name, deps, [str(i) for i in inputs], resolved,
                     tokenizer=template if isinstance(template, str) else None)


def size(plan: StagePlan, ctx: Context) -> None:
    c = plan.config
    if not isinstance(c.get("model"), str) or "stage" not in c:
        return
    where = f"stages.{plan.name}.train"
    _check_chat_template(plan, ctx)
    info = ctx.info(c["model"])
    if c.get("ref_model") and c["ref_model"] != c["model"]:
        ref = ctx.info(c["ref_model"])
        if info and ref and info.vocab_size != ref.vocab_size:
            ctx.problems.append(f"{where}.ref_model: vocabulary {ref.vocab_size} differs from "
                                f"the model's {info.vocab_size}")
    plan.new_layers = ctx.new_layers(c["model"])
    if c.get("trainable_layers") == "new":
        if not plan.new_layers:
            ctx.problems.append(
                f"{where}.trainable_layers: `new` needs a model made by an upscale stage of "
                "this recipe (directly or through train stages), or a folder with the "
                f"mergekit_config.yml of an up-scale; no new layers found for {c['model']}")
            return
        c["trainable_layers"] = list(plan.new_layers)  # after hashing: `new` is hashed
    if info is None:
        return
    layers = c.get("trainable_layers") or []
    if isinstance(layers, list) and layers and max(layers) >= info.n_layers:
        ctx.problems.append(f"{where}.trainable_layers: layer {max(layers)} does not exist, the "
                            f"model has {info.n_layers} layers (0..{info.n_layers - 1})")
    plan.info = dataclasses.replace(info, source=str(plan.out_dir))
    plan.params_estimated = ctx.estimated([c["model"]])
    if info.shape is None:
        return
    from solar_merge.checkpoints import human
    from solar_merge.memory import RUNTIME, from_stage

    launch = c.get("launch") or {}
    est = plan.estimate = from_stage(c, info.shape, launch)
    plan.memory = est.total + RUNTIME
    auto = ("; precision auto: the larger of fp32 and bf16 mixed precision"
            if c.get("precision") == "auto" else "")
    plan.memory_note = (f"per device: {' + '.join(est.terms)} + runtime "
                        f"(solar_merge/memory.py{auto})")
    if launch.get("device_memory") and plan.memory > launch["device_memory"]:
        ctx.problems.append(
            f"{where}: needs about {human(plan.memory, 'B')} per device ({est.setup.strategy} "
            f"on {est.setup.devices} device(s)), more than launch.device_memory "
            f"{human(launch['device_memory'], 'B')}; use a sharded launch (accelerate_config: "
            "zero3 or fsdp2), more processes, args.gradient_checkpointing or peft (LoRA)")


def _check_chat_template(plan: StagePlan, ctx: Context) -> None:
    """Chat data needs a chat template: from args.chat_template_path or the tokenizer the
    model carries (an earlier stage's output: the one its kind passes on)."""
    from solar_merge.stages.chat import chat_template_problem

    where = f"stages.{plan.name}.train"
    problem, note = chat_template_problem(plan.config, ctx.has_chat_template,
                                          label=ctx.label(plan.config["model"]))
    if problem:
        ctx.problems.append(f"{where}: {problem}; set args.chat_template_path to a .jinja file "
                            "(e.g. training/chat_templates/solar_instruct.jinja) or a tokenizer "
                            "that has one")
    if note:
        ctx.notes.append(f"{where}: {note}")


def run(plan: StagePlan) -> None:
    from solar_merge.stages.launch import start

    start(plan.config, plan.out_dir, digest=plan.hash, estimate=plan.estimate)


def describe(plan: StagePlan) -> str:
    return f"train:{plan.config.get('stage', '?')}"


def card(plan: StagePlan) -> dict:
    return {"bases": plan.inputs,
            "datasets": [d["path"] for d in plan.config.get("datasets") or []]}


def training_data(body: dict) -> list[str]:
    sets = body.get("datasets") if isinstance(body, dict) else None
    sets = sets if isinstance(sets, list) else [sets] if sets else []
    return [p for d in sets if isinstance(p := d.get("path") if isinstance(d, dict) else d, str)]
