"""`merge:` a mergekit config, inline or from a file, run by solar_merge.merging.

    avg:   {merge: {merge_method: solar_average, models: [{model: sft_a}, {model: sft_b}]}}
    slerp: {merge: {file: ../merge_configs/sft_slerp.yaml, options: {out_shard_size: 2B}}}

With `file:`, inline keys replace the file's top-level keys (`key: null` removes one) and
the file's relative paths resolve against its folder. `options:` are mergekit's MergeOptions
fields; the recipe's `merge_options:` give every merge stage its defaults.
"""

import copy
import os
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.kinds.context import OVERHEAD, Context, StagePlan, first_line, out_bytes, resized
from solar_merge.kinds.defaults import card, hub_results, metrics, training_data  # noqa: F401

MODEL = ""
HOLDS = "a model"
DATA_FILES: dict[str, str] = {}


def resolve(name: str, body: dict, ctx: Context) -> StagePlan:
    from solar_merge.merging import Checker
    from solar_merge.readers import read_yaml

    where = f"stages.{name}.merge"
    spec = copy.deepcopy(body)
    options = spec.pop("options", None) or {}
    if not isinstance(options, dict):
        ctx.problems.append(f"{where}.options: expected a mapping of mergekit options")
        options = {}
    options = {**(ctx.recipe.merge_options or {}), **options}
    file_base, from_file = ctx.base, set()
    if "file" in spec:
        file = Path(os.path.expanduser(str(spec.pop("file"))))
        file = file if file.is_absolute() else ctx.base / file
        loaded = None
        if not file.is_file():
            ctx.problems.append(f"{where}.file: {file} not found")
        else:
            try:
                loaded = read_yaml(file, what="merge config")
            except UserError as e:
                ctx.problems.append(f"{where}.file: {first_line(e)}")
        file_cfg = loaded if isinstance(loaded, dict) else {}
        file_cfg.pop("name", None)
        from_file = set(file_cfg) - set(spec)
        file_base = file.parent
        spec = {k: v for k, v in {**file_cfg, **spec}.items() if v is not None}

    def base_of(key: str) -> Path:
        return file_base if key in from_file else ctx.base

    deps: list[str] = []
    inputs: list[str] = []

    def model(field: str, ref) -> str:
        if isinstance(ref, str) and ref not in inputs:
            inputs.append(ref)
        top = field[len(where) + 1:].split(".")[0].split("[")[0]
        return ctx.ref(field, ref, deps, base_of(top))

    checker = Checker(ctx.base, where=where, resolve=model)
    config = checker.structure(spec)
    ctx.problems += checker.problems
    return StagePlan(name, "merge", ctx.out / name, deps, inputs,
                     {"merge": config, "options": options},
                     tokenizer=_tokenizer(config, base_of("tokenizer_source"), ctx))


def _tokenizer(config: dict, base: Path, ctx: Context) -> str | bool | None:
    """The model whose tokenizer mergekit gives the output: a chat template set here (True),
    else tokenizer_source, base_model, or the first model."""
    if config.get("chat_template"):
        return True
    source = config.get("tokenizer_source")
    if isinstance(source, str) and source not in ("base", "union"):
        if source in ctx.recipe.stages:
            return str(ctx.model_dir(source))
        path = base / os.path.expanduser(source)
        return os.path.normpath(path) if path.exists() else source
    models = config.get("models") if isinstance(config.get("models"), list) else []
    models = [m.get("model") for m in models if isinstance(m, dict)]
    first = config.get("base_model") or next(iter(models), None)
    return first if isinstance(first, str) else None


def size(plan: StagePlan, ctx: Context) -> None:
    from solar_merge.merging import Checker
    from solar_merge.upscale import new_layers

    config = plan.config["merge"]
    checker = Checker(ctx.base, where=f"stages.{plan.name}.merge", info=ctx.info)
    checker.shapes(config)
    ctx.problems += checker.problems
    models = [m["model"] for m in config.get("models") or []]
    sources = [src["model"] for s in config.get("slices") or [] for src in s["sources"]]
    if config.get("slices"):  # a slices merge creates layers as an up-scale does
        plan.new_layers = new_layers(config) or None
    else:  # a `models:` merge keeps the layout its inputs share
        found = [ctx.new_layers(r) for r in models if isinstance(r, str)]
        plan.new_layers = found[0] if found and all(f == found[0] for f in found) else None
    origin, total, used = None, None, []  # the model whose config the output keeps
    if models:
        used = [r for r in models + [config.get("base_model")] if isinstance(r, str)]
        if all(ctx.info(r) is not None for r in used):
            origin = config.get("base_model") or used[0]
            total = ctx.info(origin).n_layers
    elif config.get("slices"):
        used = sources
        if all(ctx.info(r) is not None for r in used):
            origin = used[0]
            total = sum(b - a for a, b in (s["sources"][0]["layer_range"]
                                           for s in config["slices"]))
    if origin is None:
        return
    out_info = ctx.info(origin)
    plan.info = resized(out_info, total, plan.out_dir)
    dtype = config.get("out_dtype") or config.get("dtype")
    if dtype:
        from dataclasses import replace

        plan.info = replace(plan.info, dtype=str(dtype))
    plan.params_estimated = ctx.estimated(used)
    layer = (out_info.per_layer_params or 0) * out_info.dtype_bytes
    plan.memory = out_bytes(plan.info) + max(1, len(plan.inputs)) * layer + OVERHEAD
    plan.memory_note = "output tensors + one layer per input at a time (lazy) + overhead"


def run(plan: StagePlan) -> None:
    from solar_merge import merging

    options = {**plan.config["options"], **plan.runtime.get("merge_options", {})}
    merging.run(plan.config["merge"], plan.out_dir, options=options, digest=plan.hash)


def describe(plan: StagePlan) -> str:
    return f"merge:{(plan.config.get('merge') or {}).get('merge_method', '?')}"
