"""Running: stages in dependency order, each skipped when its output is complete and stamped
with the same hash, else cleared of any other config's leftovers and run."""


import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from solar_merge.errors import UserError, during, failing_library
from solar_merge.outputs import (
    MARKER,
    check_replaceable,
    is_complete,
    partial_dir,
    relocate,
    remove_partial,
)
from solar_merge.recipe.planner import Plan, StagePlan, plan

STAMP = "recipe_stage.json"  # inside a finished stage folder: {"stage", "recipe_hash"}
STATE = ".recipe_state.json"  # in the output root: stage -> hash of the config last started


# -- running ---------------------------------------------------------------------------------

Runner = Callable[[StagePlan], Any]


def _run_upscale(st: StagePlan):
    from solar_merge.upscale import plan_upscale, spec_options

    c = st.config
    planned = plan_upscale(c["model"], c["method"], **spec_options(c))
    return planned.run(st.out_dir, options=c["options"])


def _run_train(st: StagePlan):
    from solar_merge.stages import train

    return train(st.config, st.out_dir, base_dir=st.base_dir)


def _run_merge(st: StagePlan):
    from solar_merge.merging import merge

    return merge(st.config["merge"], st.out_dir,
                 options=st.config["options"], label=f"stages.{st.name}.merge")


def _run_eval(st: StagePlan):
    """lm-eval on every model: their results.json, the table (metrics.json, read below) and
    the contamination report when asked (solar_merge.eval.evaluate)."""
    from solar_merge import eval as lm

    c = st.config
    results = lm.evaluate(c["models"], c["tasks"], out=st.out_dir,
                          include_path=c["include_path"] or None,
                          contamination=c["contamination"], **c["options"])
    return lm.table(results)


RUNNERS: dict[str, Runner] = {"upscale": _run_upscale, "train": _run_train,
                              "merge": _run_merge, "eval": _run_eval}


def _run_synth_math(st: StagePlan):  # issue 17: a data folder that train stages name
    from solar_merge.synth_math import Options, synth_math

    options = dict(st.config)
    data = options.pop("data")
    return synth_math(data, st.out_dir, Options(**options))


RUNNERS["synth_math"] = _run_synth_math


def _run_sweep(st: StagePlan):  # issue 14: the best merge is the stage's output folder
    from solar_merge.sweep import run_stage

    spec = dict(st.config)
    return run_stage(spec.pop("models"), st.out_dir, spec)


RUNNERS["sweep"] = _run_sweep


# -- one stage, in this process or in a fresh one ------------------------------------------------

def in_fresh_process(fn, what: str = "a solar-merge step", fix: str = "re-run it"):
    """fn() in a fresh process, which exits with whatever it imported and held, so that this
    process stays small; fn's result (see `_in_child`)."""
    return _in_child(fn, what, fix)[0]


def _context():
    """A fork server that has imported what stages import (solar_merge.recipe.preload) where
    the OS has one, else spawn. The server never runs torch, so a stage forked from it starts
    with torch's thread pools unborn, as a fresh process would, in milliseconds."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["solar_merge.recipe.preload"])  # read when it starts
    return ctx


def _in_child(fn, what: str, fix: str):
    """(fn(), peak RSS of its process in MB; of its largest child if larger, e.g. accelerate
    ranks), fn run in a fresh process (see `_context`). Its UserError is raised here as it is,
    any other error with the library it came from and its traceback; a process killed without
    a word (the OOM killer, a signal) is a UserError naming `what`, with `fix`."""
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    from solar_merge import precision

    # a forked process has the fork server's environment, folder and logging: ours are passed
    process = ctx.Process(target=_child, args=(fn, what, send, dict(os.environ), os.getcwd(),
                                               precision.shown_on_stderr()))
    process.start()
    send.close()
    try:
        report = receive.recv()
    except EOFError:  # died without a word
        report = None
    process.join()
    if report is None:
        raise UserError(f"{what} was killed (exit code {process.exitcode}) before it "
                        "finished", fix=fix)
    if "error" in report:
        raise report["error"]
    return report["result"], report["peak_rss_mb"]


def _child(fn, what: str, send, environ: dict, cwd: str, show_precision: bool = False) -> None:
    """The body of _in_child's process: fn() with the caller's environment and folder (and
    the precision decisions on stderr if the caller shows them), then its result and peak
    memory, or its error as an exception the parent can raise."""
    import resource
    import traceback

    try:
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        if show_precision:
            from solar_merge import precision

            precision.show_on_stderr()
        result = fn()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        send.send({"result": result, "peak_rss_mb": round(max(own, children) / 1024)})
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        if not isinstance(e, UserError):
            library = failing_library(e)
            error = RuntimeError(f"{type(e).__name__}: {e}\n\n(in the process of {what})\n"
                                 f"{traceback.format_exc()}")
            error.solar_merge_library = library
            error._solar_merge_during = getattr(e, "_solar_merge_during", [])
            e = error
        send.send({"error": e})
    finally:
        send.close()


def run_stage(run: Runner, st: StagePlan, *, isolate: bool = False) -> dict:
    """Run one stage; return what it cost: wall seconds, and with `isolate` the peak resident
    memory of its process (MB).

    `isolate` runs the stage in a fresh Python process (`in_fresh_process`) that exits when the
    stage is done, so that no stage's models, optimizer state or allocator caches outlive it:
    the recipe's peak memory is its largest stage's, not their sum. The imports are paid once,
    by the fork server (`_context`), not once per stage."""
    import time

    start = time.perf_counter()
    if not isolate:
        run(st)
        return {"seconds": round(time.perf_counter() - start, 1)}
    _, peak = _in_child(partial(run, st), f"stage `{st.name}`", fix=(
        "if the machine ran out of memory, give the stage a smaller batch or sequence length; "
        "then re-run (finished stages are kept, training resumes from its last checkpoint)"))
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak}


def stage_done(st: StagePlan) -> bool:
    """Complete and stamped with this very config hash."""
    if not is_complete(st.out_dir):
        return False
    try:
        return json.loads((st.out_dir / STAMP).read_text())["recipe_hash"] == st.hash
    except (OSError, ValueError, KeyError):
        return False


def _state(out: Path) -> dict:
    try:
        return json.loads((out / STATE).read_text())
    except (OSError, ValueError):
        return {}


def _prepare(st: StagePlan, out: Path) -> None:
    """Before (re-)running a stage: if its last start was for another config, nothing left of
    that run may be taken for this one (the tools' own markers do not see upstream changes)."""
    state = _state(out)
    if state.get(st.name) != st.hash:
        if not remove_partial(st.out_dir):
            raise UserError(f"{partial_dir(st.out_dir)} was not created by solar-merge, so it "
                            "is left alone and the stage cannot run",
                            fix="delete it if it is an old solar-merge work folder, or choose "
                                "another output root (--out)")
        if is_complete(st.out_dir):  # still ours to replace, but never taken for this config
            (st.out_dir / MARKER).write_text(json.dumps({"config_hash": "superseded"}) + "\n")
        (st.out_dir / STAMP).unlink(missing_ok=True)
        state[st.name] = st.hash
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (STATE + ".tmp")
        tmp.write_text(json.dumps(state, indent=1, sort_keys=True))
        tmp.replace(out / STATE)


@dataclass
class RunResult:
    out: Path
    final: Path | None
    ran: list[str]
    skipped: list[str]
    metrics: dict[str, dict]


def run(source, out=None, overrides=(), *, runners: dict[str, Runner] | None = None,
        progress: bool = True, base_dir=None, card: bool = True,
        merge_options: dict | None = None, isolate: bool = False) -> RunResult:
    """Run a recipe: stages in dependency order, finished ones skipped (see the module doc).

    `runners` replaces the function run for a kind (tests inject fakes). Returns which
    stages ran and which were skipped, and every eval stage's metrics. `merge_options`
    (mergekit's, from the command line: --cuda, ...) apply to every merge stage as it runs;
    they choose where a merge computes, not what it is, so they are not in the hashes.
    `isolate` runs every stage in a fresh process (see `run_stage`); each stage's cost (wall
    time, peak memory, training tokens/s) is kept in its stamp, `stage_costs` reads them."""
    p = source
    if not isinstance(source, Plan):
        planning = partial(plan, source, out, overrides, base_dir=base_dir)
        # checking eval tasks imports lm-eval (datasets, pandas: ~150 MB), kept out of this
        # process when the stages run in their own
        p = in_fresh_process(planning, "planning the recipe") if isolate else planning()
    runners = {**RUNNERS, **(runners or {})}
    for st in p.stages.values():  # [TRAIN] issue 12: after hashing
        if merge_options and st.kind == "merge":
            st.config = {**st.config, "options": {**st.config["options"], **merge_options}}
    from tqdm.auto import tqdm

    for name in p.order:  # refuse a user's folder before hours of earlier stages, not after
        if not stage_done(p.stages[name]):
            check_replaceable(p.stages[name].out_dir)
    ran, skipped, metrics = [], [], {}
    bar = tqdm(p.order, desc=p.name, unit="stage", disable=not progress, dynamic_ncols=True)
    for name in bar:
        st = p.stages[name]
        bar.set_description(f"{p.name}: {name} ({st.kind})")
        if stage_done(st):
            skipped.append(name)
        else:
            _prepare(st, p.out)
            with during(f"stage `{name}` ({st.kind}) of {', '.join(st.inputs) or '-'}"):
                cost = run_stage(runners[st.kind], st, isolate=isolate)
            if not is_complete(st.out_dir):
                raise UserError(f"stage {name} finished without a complete output in "
                                f"{st.out_dir}", fix="re-run; report a bug if it persists")
            cost.update(_tokens_per_second(st.out_dir))
            (st.out_dir / STAMP).write_text(json.dumps({"stage": name, "recipe_hash": st.hash,
                                                        "kind": st.kind, **cost}) + "\n")
            ran.append(name)
        if st.kind == "eval":
            metrics[name] = json.loads((st.out_dir / "metrics.json").read_text())
    bar.close()
    final = p.stages[p.final].out_dir if p.final else None
    if card and final is not None:
        _write_final_card(p, final, metrics)
    return RunResult(p.out, final, ran, skipped, metrics)


def _tokens_per_second(out_dir: Path) -> dict:
    """A training stage's throughput as TRL logged it (num_tokens / train_runtime)."""
    tokens = runtime = None
    log = out_dir / "loss.jsonl"
    for line in log.read_text().splitlines() if log.is_file() else ():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        tokens = row.get("num_tokens", tokens)
        runtime = row.get("train_runtime", runtime)
    return {"tokens_per_second": round(tokens / runtime, 1)} if tokens and runtime else {}


def stage_costs(p: Plan) -> dict[str, dict]:
    """stage -> {kind, seconds, peak_rss_mb, tokens_per_second} of the run that made it."""
    costs = {}
    for name in p.order:
        try:
            stamp = json.loads((p.stages[name].out_dir / STAMP).read_text())
        except (OSError, ValueError):
            continue
        costs[name] = {k: stamp[k] for k in ("kind", "seconds", "peak_rss_mb",
                                             "tokens_per_second") if k in stamp}
    return costs


def travelling_recipe(p: Plan, folder: Path) -> str:
    """The recipe as YAML for a copy stored in `folder`: its local paths rewritten relative to
    `folder` and `out:` pointing at the output root, so that the copy re-runs (and resumes)
    as the original did, and carries no `/home/...` paths when pushed."""
    import yaml

    if p.loaded is None:
        return p.recipe_yaml
    data = relocate(p.loaded.data, p.loaded.base_dir, folder, names=set(p.stages))
    return yaml.safe_dump({**data, "out": os.path.relpath(p.out, folder)}, sort_keys=False)


def _write_final_card(p: Plan, final: Path, metrics: dict) -> None:
    source = (f"# solar-merge run recipe.yaml   (recipe `{p.name}`, overrides applied)\n"
              + travelling_recipe(p, final))
    if (final / "recipe.yaml").is_file() and (final / "recipe.yaml").read_text() == source:
        return
    try:
        from solar_merge import hub
    except ImportError:  # pragma: no cover
        (final / "recipe.yaml").write_text(source)
        return
    lineage, bases, datasets = [], [], []
    for name in p.order:
        st = p.stages[name]
        if st.kind == "eval":
            continue
        lineage.append({"stage": name, "kind": st.kind, "inputs": st.inputs})
        if st.kind == "synth_math":  # its seed data is a data set, its generator no base model
            datasets += [st.inputs[0]] if st.inputs[0] not in datasets else []
            continue
        bases += [i for i in st.inputs if i not in p.stages and i not in bases]
        if st.kind == "train":
            datasets += [d["path"] for d in st.config.get("datasets") or []
                         if d["path"] not in datasets]
    table = {}
    for results in metrics.values():
        for model, values in results.items():
            table.setdefault(model, {}).update(values)
    hub.write_card(final, kind="recipe", source_yaml=source, source_name="recipe.yaml",
                   base_models=bases, lineage=lineage, datasets=datasets,
                   eval_table=table or None, license=p.loaded.recipe.license if p.loaded
                   else None, description=p.loaded.recipe.description if p.loaded else None,
                   eval_results=_final_eval_results(p))


def _final_eval_results(p: Plan) -> list:
    """The final model's lm-eval results as the Hub's model-index entries (EVAL)."""
    from solar_merge import eval as lm

    found = []
    for st in p.stages.values():
        res = st.out_dir / (p.final or "") / lm.RESULTS
        if st.kind == "eval" and p.final in st.config.get("models", {}) and res.is_file():
            found += lm.eval_results(json.loads(res.read_text()))
    return found
