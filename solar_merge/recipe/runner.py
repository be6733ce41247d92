"""Running: stages in dependency order, each skipped when its output is complete for its
stage hash, else run by its kind on the planned config.

One completion record per stage: the kind passes the stage hash to its tool, whose atomic
output marks the folder complete with it (solar_merge.outputs.MARKER); the runner adds what
the stage cost (seconds, peak memory, training tokens/s) to that same record. A stage whose
hash changed (its config, its inputs' contents, or any stage upstream) is run again; its tool
never resumes a partial folder of another hash.
"""


import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from solar_merge.errors import UserError, during, failing_library
from solar_merge.kinds.context import StagePlan
from solar_merge.kinds.registry import KINDS
from solar_merge.outputs import (
    check_partial,
    check_replaceable,
    is_complete,
    read_record,
    record,
    relocate,
)
from solar_merge.recipe.planner import Plan, plan

log = logging.getLogger(__name__)

Runner = Callable[[StagePlan], Any]
RESULTS = "results.md"  # the run's results table, in the output root


# -- one stage, in this process or in a fresh one ------------------------------------------------

def in_fresh_process(fn, what: str = "a solar-merge step", fix: str = "re-run it", *,
                     log_file=None):
    """fn() in a fresh process, which exits with whatever it imported and held, so that this
    process stays small; fn's result (see `_in_child`). With `log_file`, what the libraries
    print there goes into that file (solar_merge.console.capture)."""
    return _in_child(fn, what, fix, log_file)[0]


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


def _in_child(fn, what: str, fix: str, log_file=None):
    """(fn(), peak RSS of its process in MB; of its largest child if larger, e.g. accelerate
    ranks), fn run in a fresh process (see `_context`). Its UserError is raised here as it is,
    any other error with the library it came from and its traceback; a process killed without
    a word (the OOM killer, a signal) is a UserError naming `what`, with `fix`. The lines it
    shows (solar_merge.console) are printed here, indented, as they come; what its libraries
    print goes to `log_file` (none: where this process's output goes)."""
    ctx = _context()
    receive, send = ctx.Pipe(duplex=False)
    from solar_merge import console

    # a forked process has the fork server's environment, folder and logging: ours are passed
    process = ctx.Process(target=_child, args=(fn, what, send, dict(os.environ), os.getcwd(),
                                               console.shown(), log_file))
    process.start()
    send.close()
    while True:
        try:
            report = receive.recv()
        except EOFError:  # died without a word
            report = None
        if report is None or "line" not in report:
            break
        console.echo("  " + report["line"])
    process.join()
    if report is None:
        raise UserError(f"{what} was killed (exit code {process.exitcode}) before it "
                        "finished", fix=fix)
    if "error" in report:
        raise report["error"]
    return report["result"], report["peak_rss_mb"]


def _child(fn, what: str, send, environ: dict, cwd: str, show: bool = False,
           log_file=None) -> None:
    """The body of _in_child's process: fn() with the caller's environment and folder (and
    solar-merge's messages sent to the caller if it shows them), what the libraries print in
    `log_file`, then its result and peak memory, or its error as an exception the parent can
    raise."""
    import resource
    import threading
    import traceback

    from solar_merge import console

    lock = threading.Lock()  # lines may come from other threads: one message at a time

    def post(message: dict) -> None:
        with lock:
            send.send(message)

    try:
        os.environ.clear()
        os.environ.update(environ)
        os.environ.pop(console.LOG, None)  # this process's output goes where it is told here
        os.chdir(cwd)
        if show:
            console.show()
            console.relay(lambda line: post({"line": line}))
        with console.capture(log_file, title=what) as logged:
            if logged or console.verbose():
                _replay_import_warnings()
            result = fn()
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        post({"result": result, "peak_rss_mb": round(max(own, children) / 1024)})
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        from solar_merge.stages.launch import LaunchFailed

        if not isinstance(e, (UserError, LaunchFailed)):
            library = failing_library(e)
            error = RuntimeError(f"{type(e).__name__}: {e}\n\n(in the process of {what})\n"
                                 f"{traceback.format_exc()}")
            error.solar_merge_library = library
            error._solar_merge_during = getattr(e, "_solar_merge_during", [])
            e = error
        post({"error": e})
    finally:
        send.close()


def _replay_import_warnings() -> None:
    """The warnings the fork server's imports raised (recipe.preload), shown here as this
    process's imports would have shown them: into its log file, or on the terminal with
    --verbose."""
    import sys
    import warnings

    preload = sys.modules.get("solar_merge.recipe.preload")
    for w in getattr(preload, "IMPORT_WARNINGS", ()):
        warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def run_stage(run: Runner, st: StagePlan, *, isolate: bool = False) -> dict:
    """Run one stage; return what it cost: wall seconds, and with `isolate` the peak resident
    memory of its process (MB).

    `isolate` runs the stage in a fresh Python process (`in_fresh_process`) that exits when the
    stage is done, so that no stage's models, optimizer state or allocator caches outlive it:
    the recipe's peak memory is its largest stage's, not their sum. The imports are paid once,
    by the fork server (`_context`), not once per stage. What the libraries print there goes
    to the stage's log file (`stage_log`)."""
    import time

    start = time.perf_counter()
    if not isolate:
        run(st)
        return {"seconds": round(time.perf_counter() - start, 1)}
    _, peak = _in_child(partial(run, st), f"stage `{st.name}`", fix=(
        "if the machine ran out of memory, give the stage a smaller batch or sequence length; "
        "then re-run (finished stages are kept, training resumes from its last checkpoint)"),
        log_file=stage_log(st))
    return {"seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": peak}


def stage_done(st: StagePlan) -> bool:
    """Complete for this very stage hash."""
    return is_complete(st.record_dir, st.hash)


def stage_log(st: StagePlan) -> Path:
    """Where the libraries' output of a stage run in its own process goes: `<stage>.log`
    beside its output folder (solar_merge.console.log_beside)."""
    from solar_merge import console

    return console.log_beside(st.out_dir)


@dataclass
class RunResult:
    out: Path
    final: Path | None
    ran: list[str]
    skipped: list[str]
    metrics: dict[str, dict]
    table: Any = None                   # tables.Table: every scoring stage's rows, joined
    costs: dict[str, dict] | None = None  # stage_costs: what each finished stage cost

    def summary(self) -> str:
        """What a recipe run prints last: what each stage cost, then the results table
        (also in OUT/results.md)."""
        from solar_merge.tables import Table

        parts = []
        if self.costs:
            rows = {name: {"kind": c.get("kind"), "seconds": c.get("seconds"),
                           "peak MB": c.get("peak_rss_mb"),
                           "tokens/s": c.get("tokens_per_second"),
                           "this run": "ran" if name in self.ran else "earlier"}
                    for name, c in self.costs.items()}
            parts.append(Table(rows, corner="stage",
                               formats={"seconds": ".1f", "tokens/s": ".1f"}).text())
        if self.table is not None:
            parts.append(self.table.text())
        return "\n\n".join(parts)


def run(source, out=None, overrides=(), *, runners: dict[str, Runner] | None = None,
        progress: bool = True, base_dir=None, card: bool = True,
        merge_options: dict | None = None, isolate: bool = False) -> RunResult:
    """Run a recipe: stages in dependency order, finished ones skipped (see the module doc).

    `runners` replaces the function run for a kind (tests inject fakes). Returns which
    stages ran and which were skipped, and the scores of every stage that has some.
    `merge_options` (mergekit's, from the command line: --cuda, ...) apply to every merge
    stage as it runs; they choose where a merge computes, not what it is, so they are not in
    the hashes. `isolate` runs every stage in a fresh process (see `run_stage`); each stage's
    cost is kept in its completion record, `stage_costs` reads them."""
    p = source
    if not isinstance(source, Plan):
        planning = partial(plan, source, out, overrides, base_dir=base_dir)
        # checking eval tasks imports lm-eval (datasets, pandas: ~150 MB), kept out of this
        # process when the stages run in their own
        p = in_fresh_process(planning, "planning the recipe") if isolate else planning()
    runners = {**{kind: module.run for kind, module in KINDS.items()}, **(runners or {})}
    for st in p.stages.values():
        st.runtime["merge_options"] = dict(merge_options or {})
    from tqdm.auto import tqdm

    for name in p.order:  # refuse a user's folder before hours of earlier stages, not after
        if not stage_done(p.stages[name]):
            check_replaceable(p.stages[name].record_dir)
            check_partial(p.stages[name].record_dir)
    from solar_merge import console, tables

    ran, skipped, metrics, scored = [], [], {}, []
    bar = tqdm(p.order, desc=p.name, unit="stage", disable=not progress, dynamic_ncols=True,
               file=console.terminal())
    for name in bar:
        st = p.stages[name]
        bar.set_description(f"{p.name}: {name} ({st.kind})")
        what = f"{name} ({KINDS[st.kind].describe(st)})" + (
            f" from {', '.join(st.inputs)}" if st.inputs else "")
        if stage_done(st):
            skipped.append(name)
            log.info("%s: finished earlier, skipped", what)
        else:
            logged = isolate and not console.verbose()
            log.info("%s%s", what, f" · log: {console.shown_path(stage_log(st))}"
                     if logged else "")
            with during(f"stage `{name}` ({st.kind}) of {', '.join(st.inputs) or '-'}"):
                cost = run_stage(runners[st.kind], st, isolate=isolate)
            if not stage_done(st):
                raise UserError(f"stage {name} finished without a complete output in "
                                f"{st.record_dir}", fix="re-run; report a bug if it persists")
            record(st.record_dir, stage=name, kind=st.kind, **cost,
                   **_tokens_per_second(st.record_dir))
            ran.append(name)
        scores = KINDS[st.kind].metrics(st)
        if scores is not None:
            metrics[name] = scores.rows
            scored.append(scores)
    bar.close()
    final = p.stages[p.final].record_dir if p.final else None  # a model stage's record is
    #                                                          kept in its model's folder
    if card and final is not None:
        _write_final_card(p, final, metrics)
    table = tables.merged(scored) if scored else None
    if table is not None:
        table.write(p.out / RESULTS)
    return RunResult(p.out, final, ran, skipped, metrics, table, stage_costs(p))


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
        found = read_record(p.stages[name].record_dir)
        if found and "seconds" in found:
            costs[name] = {k: found[k] for k in ("kind", "seconds", "peak_rss_mb",
                                                 "tokens_per_second") if k in found}
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
    from solar_merge import hub

    lineage, bases, datasets = [], [], []
    for name in p.order:
        st = p.stages[name]
        part = KINDS[st.kind].card(st)
        if part is None:
            continue
        lineage.append({"stage": name, "kind": st.kind, "inputs": st.inputs})
        bases += [i for i in part["bases"] if i not in p.stages and i not in bases]
        datasets += [d for d in part["datasets"] if d not in datasets]
    table = {}
    for results in metrics.values():
        for model, values in results.items():
            table.setdefault(model, {}).update(values)
    results = [r for st in p.stages.values() for r in KINDS[st.kind].hub_results(st, p.final)]
    hub.write_card(final, kind="recipe", source_yaml=source, source_name="recipe.yaml",
                   base_models=bases, lineage=lineage, datasets=datasets,
                   eval_table=table or None, license=p.loaded.recipe.license if p.loaded
                   else None, description=p.loaded.recipe.description if p.loaded else None,
                   eval_results=results)
