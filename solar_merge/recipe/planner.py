"""Planning: each stage resolved by its kind (solar_merge.kinds), the graph ordered, each stage
hashed with its inputs, then sized in dependency order; and the plan printed for `validate`.
Imports neither torch nor mergekit, and never downloads weights (Hub models: config.json at
most)."""


import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from solar_merge.checkpoints import human
from solar_merge.errors import UserError, did_you_mean
from solar_merge.kinds.context import Context, StagePlan
from solar_merge.kinds.registry import KINDS
from solar_merge.outputs import config_hash, fingerprint
from solar_merge.recipe.schema import Loaded, load

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# keys a recipe fetched from a URL or the Hub may not set, and why
_REFUSED_REMOTE = {"push_to_hub": "uploads with your token", "hub_model_id": "names an upload",
                   "hub_token": "carries a token", "logging_dir": "writes outside the output "
                   "root", "trust_remote_code": "runs Python code shipped with a model"}


@dataclass
class Plan:
    name: str
    label: str
    out: Path
    order: list[str]
    stages: dict[str, StagePlan]
    final: str | None
    notes: list[str] = field(default_factory=list)
    recipe_yaml: str = ""
    loaded: Loaded | None = None


def plan(source, out=None, overrides=(), *, base_dir=None) -> Plan:
    """Load and check a recipe without running anything; raise UserError on any problem."""
    loaded = source if isinstance(source, Loaded) else load(source, overrides,
                                                           base_dir=base_dir)
    recipe = loaded.recipe
    ctx = Context(recipe, loaded.base_dir, _output_root(loaded, out), KINDS)
    if loaded.remote:
        _check_remote(loaded, ctx.problems)
    for name, stage in recipe.stages.items():
        if not _NAME.match(name):
            ctx.problems.append(f"stages.{name}: a stage name uses letters, digits, `_`, `-` "
                                "and `.` only (it names a folder)")
        ctx.plans[name] = KINDS[stage.kind].resolve(name, stage.body, ctx)
    models = [n for n in ctx.names if KINDS[ctx.kind_of(n)].MODEL is not None]
    if recipe.final is not None and recipe.final not in models:
        ctx.problems.append(f"final: `{recipe.final}` is not a model-producing stage"
                            f"{did_you_mean(recipe.final, models)}; choose one of "
                            f"{', '.join(models)}")
    if ctx.problems:  # unknown references make the graph meaningless
        raise _error(loaded, ctx.problems)
    order = _order({n: p.deps for n, p in ctx.plans.items()})
    stage_dirs = [str(ctx.out / n) for n in ctx.names]
    for name in order:  # hashes and sizes flow downstream
        st = ctx.plans[name]
        st.hash = config_hash({"kind": st.kind, "config": st.config,
                               "inputs": {d: ctx.plans[d].hash for d in st.deps},
                               "files": _fingerprints(st.config, stage_dirs)})
        KINDS[st.kind].size(st, ctx)
    if ctx.problems:
        raise _error(loaded, ctx.problems)
    final = recipe.final or next((n for n in reversed(order) if n in models), None)
    return Plan(recipe.name, loaded.label, ctx.out, order, ctx.plans, final,
                notes=list(dict.fromkeys(ctx.notes)),
                recipe_yaml=yaml.safe_dump(loaded.data, sort_keys=False), loaded=loaded)


def _output_root(loaded: Loaded, out) -> Path:
    """--out (relative to where the command runs), else the recipe's `out:` (relative to its
    file), else runs/<name>."""
    recipe = loaded.recipe
    if out is None and not recipe.out and not _NAME.match(recipe.name):
        raise UserError(f"name: `{recipe.name}` names the default output folder runs/<name>, "
                        "so it uses letters, digits, `_`, `-` and `.` only",
                        fix="rename the recipe, or give --out DIR")
    if out is None and loaded.remote and recipe.out:
        parts = Path(recipe.out).parts
        if os.path.isabs(os.path.expanduser(recipe.out)) or ".." in parts:
            raise UserError(f"out: `{recipe.out}` points outside the current folder, and the "
                            f"recipe comes from {loaded.label}, not from your disk",
                            fix="give the output root yourself: solar-merge run RECIPE --out DIR")
    root = Path(os.path.expanduser(str(out if out is not None
                                       else recipe.out or f"runs/{recipe.name}")))
    root = root if root.is_absolute() or out is not None else loaded.base_dir / root
    return Path(os.path.normpath(root.absolute()))


def _check_remote(loaded: Loaded, problems: list[str]) -> None:
    """A recipe fetched from a URL or the Hub runs code paths chosen by someone else: it may
    not run their Python code, upload with the user's token, or log outside the output
    root."""
    for name, stage in loaded.recipe.stages.items():
        for key, value in _walk_keys(stage.body):
            if key in _REFUSED_REMOTE and value not in (False, None):
                problems.append(f"stages.{name}: `{key}` {_REFUSED_REMOTE[key]}; a recipe from "
                                f"{loaded.label} may not set it")


def _walk_keys(value):
    """(key, value) for every mapping entry, at any depth."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k, v
            yield from _walk_keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk_keys(v)


def _order(deps: dict[str, list[str]]) -> list[str]:
    """The stages in dependency order (recipe order among independent ones)."""
    order, state = [], {}

    def visit(name, path):
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            cycle = path[path.index(name):] + [name]
            raise UserError(f"stages form a cycle: {' -> '.join(cycle)}",
                            fix="a stage can only use the outputs of stages that do not "
                                "depend on it")
        state[name] = "active"
        for d in deps[name]:
            visit(d, path + [name])
        state[name] = "done"
        order.append(name)

    for name in deps:
        visit(name, [])
    return order


def _fingerprints(config, stage_dirs: list[str]) -> dict[str, str]:
    """What the local inputs outside the recipe hold (models, data files, templates): a stage
    is finished only for the exact contents it ran on. Earlier stages' outputs are covered by
    their own hashes."""
    found: dict[str, str] = {}

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif (isinstance(value, str) and os.path.isabs(value) and os.path.exists(value)
              and not any(value == d or value.startswith(d + os.sep) for d in stage_dirs)):
            found[value] = fingerprint(value)

    walk(config)
    return found


def _error(loaded: Loaded, problems: list[str]) -> UserError:
    return UserError(f"{loaded.label} has {len(problems)} problem(s):\n  - "
                     + "\n  - ".join(problems),
                     fix="correct the stages named above; nothing has been run")


def format_plan(p: Plan) -> str:
    """The stage graph in run order, with sizes and memory estimates, for `validate`."""
    rows = [("#", "stage", "kind", "inputs", "layers", "params", "memory (est.)")]
    for i, name in enumerate(p.order, 1):
        s = p.stages[name]
        inputs = ", ".join(dict.fromkeys(s.inputs)) or "-"
        if len(inputs) > 48:
            inputs = inputs[:45] + "..."
        if KINDS[s.kind].MODEL is None:
            layers = params = "-"
        elif s.info is None:  # offline (see the notes), or decided when the stage runs
            layers = params = "unknown"
        else:
            layers = str(s.info.n_layers)
            params = ("~" if s.params_estimated else "") + human(s.info.params)
        memory = ("~" + human(s.memory, "B")) if s.memory else "unknown"
        rows.append((str(i), name + (" (final)" if name == p.final else ""),
                     KINDS[s.kind].describe(s), inputs, layers, params, memory))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = [f"recipe `{p.name}` ({p.label}): {len(p.order)} stages -> {p.out}"]
    lines += ["  " + "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    notes = dict.fromkeys((s.kind, s.memory_note) for s in p.stages.values() if s.memory_note)
    if notes:
        lines.append("memory is a rough estimate of peak RAM (or GPU memory) per stage:")
        lines += [f"  {kind}: {note}" for kind, note in notes]
    lines += [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
