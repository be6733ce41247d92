"""Merge weights from data: merge the candidates at every grid point, score each merge with
lm-eval, keep the best.

    solar-merge sweep A B --method solar_slerp --grid 0,0.25,0.5,0.75,1 --tasks T -o DIR

Grid points:
- `solar_slerp` (two candidates): t in [0, 1]; t = 0 is A, t = 1 is B.
- `solar_average`, two candidates: t is B's weight, A's is 1 - t (t = 0 is A, t = 1 is B);
  values outside [0, 1] extrapolate (weights still sum to 1).
- `solar_average`, three or more: every combination of grid values summing to 1 (a simplex
  grid), one weight per candidate.

Each point is a mergekit merge (solar_merge.merging.merge: out of core, checked, atomic) into
DIR/points/<label>, then scored (solar_merge.eval, lm-eval); the score is written to
DIR/scores/<label>.json before anything else happens, so a killed sweep resumes at the first
unscored point and never merges a scored point again. Only the best merge so far is kept on
disk (unless --keep-all). At the end: DIR/sweep.csv (grid value, every metric), DIR/sweep.png,
and the best merge in DIR/best with a model card holding the whole table. The work happens in
the hidden partial folder of DIR (outputs.atomic_output, kept across kills); DIR appears, with
its completion marker, only when the sweep is finished.
"""

import itertools
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from solar_merge.errors import UserError

METHODS = ("solar_average", "solar_slerp")
BEST = "best"


# -- the grid ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Point:
    label: str                    # names the folder and the CSV row
    t: float | None               # two candidates: the grid value
    weights: tuple[float, ...]    # one per candidate (slerp: (1 - t, t), for the table)


def parse_grid(grid) -> list[float]:
    """"0,0.25,1" or [0, 0.25, 1] -> [0.0, 0.25, 1.0] (order kept)."""
    items = grid.split(",") if isinstance(grid, str) else list(grid or [])
    try:
        values = [float(str(v).strip()) for v in items if str(v).strip()]
    except ValueError:
        raise UserError(f"--grid {grid!r}: not a comma-separated list of numbers",
                        fix="e.g. --grid 0,0.25,0.5,0.75,1") from None
    if not values:
        raise UserError("--grid is empty", fix="e.g. --grid 0,0.25,0.5,0.75,1")
    if any(not math.isfinite(v) for v in values):
        raise UserError(f"--grid {grid!r} holds a non-finite value", fix="use finite numbers")
    if len(set(values)) != len(values):
        raise UserError(f"--grid {grid!r} repeats a value", fix="list each value once")
    return values


def grid_points(method: str, n_candidates: int, grid) -> list[Point]:
    values = parse_grid(grid)
    if method not in METHODS:
        from solar_merge.errors import did_you_mean

        raise UserError(f"--method {method}: unknown{did_you_mean(method, METHODS)}",
                        fix=f"use one of {', '.join(METHODS)}")
    if n_candidates < 2:
        raise UserError(f"a sweep merges two or more candidates; {n_candidates} given",
                        fix="name at least two model folders")
    if method == "solar_slerp":
        if n_candidates != 2:
            raise UserError(f"solar_slerp interpolates between exactly two models; "
                            f"{n_candidates} given",
                            fix="give two candidates, or use --method solar_average")
        outside = [v for v in values if not 0 <= v <= 1]
        if outside:
            raise UserError(f"--grid {','.join(f'{v:g}' for v in outside)}: solar_slerp's t "
                            "must lie in [0, 1] (0 is the first model, 1 the second)",
                            fix="use values between 0 and 1")
    if n_candidates == 2:
        return [Point(f"t={v:g}", v, (1 - v, v)) for v in values]
    points = []
    for combo in itertools.product(values, repeat=n_candidates):
        if abs(sum(combo) - 1) < 1e-9:
            points.append(Point("w=" + "_".join(f"{w:g}" for w in combo), None, combo))
    if not points:
        raise UserError(f"--grid {','.join(f'{v:g}' for v in values)}: no combination of "
                        f"{n_candidates} grid values sums to 1",
                        fix="include values that can sum to 1, e.g. 0,0.25,0.5,0.75,1")
    return points


def merge_config(method: str, candidates: list[str], point: Point,
                 dtype: str | None = None) -> dict:
    """The mergekit config of one grid point. The first candidate is the base model: it gives
    the output's config.json (mergekit picks one at random without it) and is t = 0."""
    if method == "solar_slerp":
        config = {"merge_method": method, "base_model": candidates[0],
                  "models": [{"model": c} for c in candidates],
                  "parameters": {"t": point.t}}
    else:
        config = {"merge_method": method, "base_model": candidates[0],
                  "models": [{"model": c, "parameters": {"weight": w}}
                             for c, w in zip(candidates, point.weights)]}
    if dtype:
        config["dtype"] = dtype
    return config


# -- scoring -----------------------------------------------------------------------------------

@dataclass
class EvalSpec:
    """What every point is scored on (the same for all): lm-eval tasks and their options."""
    tasks: list[str]
    include_path: list[str] = field(default_factory=list)
    num_fewshot: int | None = None
    limit: float | None = None
    batch_size: int | str = 8
    device: str | None = None

    def as_dict(self) -> dict:
        return {"tasks": self.tasks, "include_path": self.include_path,
                "num_fewshot": self.num_fewshot, "limit": self.limit,
                "batch_size": self.batch_size, "device": self.device}


# scorer(model_dir) -> (metrics {column: value}, higher_is_better {column: bool}); columns are
# solar_merge.eval's table columns, "task metric,filter" (e.g. "solar_arith exact_match,none").
Scorer = Callable[[Path], tuple[dict[str, float], dict[str, bool]]]


def lm_eval_scorer(spec: EvalSpec, work: Path) -> Scorer:
    """Score with solar_merge.eval (lm-eval); lm-eval's own results.json of every point is
    kept under work/evals/<point>/."""
    from solar_merge import eval as lm

    def score(model_dir: Path):
        label = Path(model_dir).name
        results = lm.evaluate({label: str(model_dir)}, spec.tasks, out=work / "evals" / label,
                              include_path=spec.include_path or None,
                              num_fewshot=spec.num_fewshot, limit=spec.limit,
                              batch_size=spec.batch_size, device=spec.device)[label]
        row = lm.table({label: results})[label]
        higher = {col: lm.higher_is_better(results, *col.split(" ", 1)) for col in row}
        return row, higher

    return score


def default_metric(tasks: list[str]) -> str | None:
    """The column that decides when --metric is not given: the first task's primary metric
    (solar_merge.eval.PRIMARY; h6: the leaderboard average)."""
    from solar_merge.eval import PRIMARY

    first = tasks[0]
    return f"{first} {PRIMARY[first]}" if first in PRIMARY else None


def pick_metric(metrics: dict[str, float], wanted: str | None,
                default: str | None = None) -> str:
    """The metric that decides the best point: `wanted` (a full column name, or any
    unambiguous part of one), else `default` if reported, else the first column."""
    names = list(metrics)
    if not names:
        raise UserError("the evaluation returned no metric", fix="check --tasks")
    if wanted is None:
        return default if default in metrics else names[0]
    if wanted in metrics:
        return wanted
    hits = [n for n in names if wanted in n]
    if len(hits) == 1:
        return hits[0]
    raise UserError(f"--metric {wanted}: {'ambiguous' if hits else 'no such metric'}; "
                    f"the evaluation reports {', '.join(names)}",
                    fix="give one of those names in full")


# -- the sweep ---------------------------------------------------------------------------------

@dataclass
class Row:
    point: Point
    metrics: dict[str, float]


@dataclass
class SweepResult:
    out: Path
    best_dir: Path
    metric: str
    higher_is_better: bool
    rows: list[Row]
    best: Row
    merged: list[str]       # points merged by this call (finished ones were not)
    skipped: bool = False   # the whole sweep was already finished
    directions: dict[str, bool] = field(default_factory=dict)  # metric -> higher is better

    def summary(self) -> str:
        """Where the best merge went and why, then the table of every point (results.md)."""
        arrow = "higher" if self.higher_is_better else "lower"
        lines = []
        values = {r.metrics.get(self.metric) for r in self.rows}
        if len(values) == 1:
            lines.append(f"every point scores the same {self.metric}: the data do not decide; "
                         "the first point is kept")
        lines.append(f"best: {self.best.point.label} ({arrow} {self.metric} is better) -> "
                     f"{self.best_dir}")
        lines.append(f"table: {self.out / 'sweep.csv'}, plot: {self.out / 'sweep.png'}"
                     + (" (already finished)" if self.skipped else
                        f"; merged {len(self.merged)} point(s) in this run"))
        table = sweep_table(self.rows, self.metric, {self.metric: self.higher_is_better,
                                                      **self.directions})
        return "\n".join(lines) + "\n\n" + table.text()


def sweep_table(rows: list["Row"], metric: str, directions: dict[str, bool]):
    """Every grid point's scores as a tables.Table (points as rows, the picking metric
    first)."""
    from solar_merge.eval import header
    from solar_merge.tables import Table

    columns = [metric, *dict.fromkeys(k for r in rows for k in r.metrics if k != metric)]
    return Table({r.point.label: {c: r.metrics[c] for c in columns if c in r.metrics}
                  for r in rows}, better={c: directions[c] for c in columns if c in directions},
                 headers={c: header(c) for c in columns}, corner="point",
                 notes=[f"the best merge is picked by {header(metric)}"])


def sweep(candidates: list[str], out_dir, *, method: str, grid, tasks=None,
          include_path=None, num_fewshot: int | None = None, limit: float | None = None,
          batch_size: int | str = 8, device: str | None = None, metric: str | None = None,
          keep_all: bool = False, dtype: str | None = None, options: dict | None = None,
          best_name: str | None = BEST, base_dir=None, scorer: Scorer | None = None,
          progress: bool = True, digest: str | None = None) -> SweepResult:
    """Run (or resume) a sweep into out_dir; see the module doc.

    best_name=None puts the best merge at out_dir itself (the recipe's `sweep:` stage, whose
    output later stages use as a model). `scorer` replaces lm-eval (benchmarks, tests of the
    merge loop). `digest` marks out_dir complete (a recipe's stage hash; default: the hash
    of the candidates' contents and the sweep's settings)."""
    from solar_merge.merging import check_config
    from solar_merge.outputs import (
        atomic_output,
        config_hash,
        fingerprint,
        is_complete,
    )

    base = Path(base_dir or os.getcwd())
    points = grid_points(method, len(candidates), grid)
    refs = [_absolute(c, base) for c in candidates]
    if len(set(refs)) != len(refs):
        raise UserError("the same candidate is named twice", fix="name each model once")
    # Checked before anything is written: models exist, same shapes, known keys, and the
    # tasks load (lm-eval reads their data here, so a typo fails now, not after a merge).
    check_config(merge_config(method, refs, points[0], dtype), base, label="sweep")
    spec, default = None, None
    if scorer is None:
        from solar_merge.tasks import catalog

        if (limit is not None and not limit > 0) or (num_fewshot is not None
                                                    and num_fewshot < 0):
            raise UserError(f"--limit {limit} / --num-fewshot {num_fewshot}: need limit > 0 "
                            "and num_fewshot >= 0", fix="e.g. --limit 100 --num-fewshot 0")
        spec = EvalSpec(catalog.split_names(tasks),
                        [str(p) for p in catalog.include_paths(include_path)],
                        num_fewshot, limit, batch_size, device)
        catalog.load(spec.tasks, spec.include_path or None)
        default = default_metric(spec.tasks)
    digest = digest or config_hash({
        "candidates": {r: fingerprint(r) for r in refs}, "method": method,
        "points": [p.label for p in points], "dtype": dtype,
        "eval": spec.as_dict() if spec else "custom", "metric": metric, "keep_all": keep_all,
        "best_name": best_name})
    out = Path(out_dir).absolute()
    best_dir = out / best_name if best_name else out
    if is_complete(out, digest):
        rows, m, hib = _read_table(out)
        best = _best(rows, m, hib)
        higher = {}
        for scored in sorted((out / "scores").glob("*.json")):
            higher.update(json.loads(scored.read_text()).get("higher_is_better", {}))
        return SweepResult(out, best_dir, m, hib, rows, best, [], skipped=True,
                           directions=higher)

    merged: list[str] = []
    from solar_merge import testhooks
    from solar_merge.stages.distributed import HASH_FILE, prepare_work

    with atomic_output(out, digest, keep_partial=True) as work:
        prepare_work(work, digest)  # never resume the scores of another sweep's config
        score = scorer or lm_eval_scorer(spec, work)
        (work / "scores").mkdir(exist_ok=True)
        rows: list[Row] = []
        higher: dict[str, bool] = {}
        from tqdm.auto import tqdm

        from solar_merge.console import terminal

        for point in tqdm(points, desc="sweep", unit="point", disable=not progress,
                          file=terminal()):
            saved = _read_score(work, point)
            if saved is None:
                folder = work / "points" / point.label
                from solar_merge.merging import merge

                merge(merge_config(method, refs, point, dtype), folder, base_dir=base,
                      options=options, label=f"sweep point {point.label}")
                merged.append(point.label)
                metrics, hib = score(folder)
                saved = {"label": point.label, "metrics": metrics, "higher_is_better": hib}
                _write_json(work / "scores" / f"{point.label}.json", saved)
                testhooks.crash_point("sweep-scored")  # kill tests: killed after one point
            rows.append(Row(point, saved["metrics"]))
            higher.update(saved["higher_is_better"])
            m = pick_metric(rows[0].metrics, metric, default)
            if not keep_all:
                _keep_only(work / "points", _best(rows, m, higher[m]).point.label)
        m = pick_metric(rows[0].metrics, metric, default)
        best = _best(rows, m, higher[m])
        _publish(work, best, best_name, keep_all)
        _write_table(work, rows, m, higher[m], best, candidates)
        sweep_table(rows, m, higher).write(work / "results.md")
        _card(work / best_name if best_name else work, method, refs, rows, best, m,
              merge_config(method, refs, best.point, dtype))
        (work / HASH_FILE).unlink(missing_ok=True)
    return SweepResult(out, best_dir, m, higher[m], rows, best, merged, directions=higher)


def _absolute(ref: str, base: Path) -> str:
    from solar_merge.checkpoints import local_dir

    folder = local_dir(ref, base)
    if folder is None:
        raise UserError(f"candidate `{ref}` is not a local model folder: a sweep merges and "
                        "evaluates it many times", fix="download it first")
    return str(folder)


def _best(rows: list[Row], metric: str, higher_is_better: bool) -> Row:
    """The best row by `metric` (ties: the first in grid order; NaN never wins)."""
    def key(r: Row):
        v = r.metrics.get(metric, float("nan"))
        if math.isnan(v):
            return math.inf
        return -v if higher_is_better else v

    return min(rows, key=key)


def _read_score(work: Path, point: Point) -> dict | None:
    path = work / "scores" / f"{point.label}.json"
    try:
        saved = json.loads(path.read_text())
        return saved if saved.get("label") == point.label else None
    except (OSError, ValueError):
        return None


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _keep_only(points_dir: Path, label: str) -> None:
    """Delete every merged point except `label` (the best so far), and merges' leftovers."""
    if not points_dir.is_dir():
        return
    for p in points_dir.iterdir():
        if p.name != label:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()


def _publish(work: Path, best: Row, best_name: str | None, keep_all: bool) -> None:
    """Move the best merge to work/best_name (or into work itself)."""
    src = work / "points" / best.point.label
    if best_name:
        dst = work / best_name
        if dst.exists():
            shutil.rmtree(dst)
        src.rename(dst)
        if keep_all:
            src.symlink_to(Path("..") / best_name, target_is_directory=True)
    else:
        for f in src.iterdir():
            target = work / f.name
            if target.is_dir():
                shutil.rmtree(target)
            f.rename(target)
        src.rmdir()
    if not keep_all:
        shutil.rmtree(work / "points", ignore_errors=True)


def _write_table(work: Path, rows: list[Row], metric: str, hib: bool, best: Row,
                 candidates: list[str]) -> None:
    import csv

    names = list(dict.fromkeys(k for r in rows for k in r.metrics))
    two = rows[0].point.t is not None
    weight_cols = [f"w_{i}" for i in range(len(candidates))]
    with open(work / "sweep.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["point", *(["t"] if two else []), *weight_cols, *names, "best"])
        for r in rows:
            w.writerow([r.point.label, *([f"{r.point.t:g}"] if two else []),
                        *(f"{x:g}" for x in r.point.weights),
                        *(repr(r.metrics[n]) if n in r.metrics else "" for n in names),
                        int(r is best)])
    _write_json(work / "sweep.json", {"metric": metric, "higher_is_better": hib,
                                      "best": best.point.label,
                                      "candidates": [str(c) for c in candidates]})
    _plot(rows, names, metric, best, work / "sweep.png")


def _read_table(out: Path) -> tuple[list[Row], str, bool]:
    import csv

    meta = json.loads((out / "sweep.json").read_text())
    with open(out / "sweep.csv") as f:
        reader = csv.DictReader(f)
        rows = []
        for rec in reader:
            weights = tuple(float(rec[k]) for k in rec if k.startswith("w_"))
            t = float(rec["t"]) if "t" in rec else None
            skip = {"point", "t", "best"} | {k for k in rec if k.startswith("w_")}
            metrics = {k: float(v) for k, v in rec.items() if k not in skip and v != ""}
            rows.append(Row(Point(rec["point"], t, weights), metrics))
    return rows, meta["metric"], meta["higher_is_better"]


def _plot(rows: list[Row], names: list[str], metric: str, best: Row, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [metric] + [n for n in names if n != metric][:3]
    two = rows[0].point.t is not None
    fig, axes = plt.subplots(1, len(shown), figsize=(4.2 * len(shown), 3.6), dpi=100,
                             squeeze=False)
    for ax, name in zip(axes[0], shown):
        xs = [r.point.t if two else i for i, r in enumerate(rows)]
        ys = [r.metrics.get(name, float("nan")) for r in rows]
        ax.plot(xs, ys, marker="o")
        bx = best.point.t if two else rows.index(best)
        ax.plot([bx], [best.metrics.get(name, float("nan"))], marker="*", ms=14,
                color="orange", mec="black", ls="none", label=f"best by {metric}")
        if not two:
            ax.set_xticks(range(len(rows)))
            ax.set_xticklabels([r.point.label for r in rows], rotation=40, ha="right",
                               fontsize=7)
        ax.set_xlabel("t (0: first candidate, 1: second)" if two else "weights")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _card(best_dir: Path, method: str, refs: list[str], rows: list[Row], best: Row,
          metric: str, config: dict) -> None:
    """The best merge's card: its mergekit config, lineage, and the whole sweep table."""
    import yaml

    from solar_merge.hub import write_card

    source = ("# solar-merge yaml mergekit_config.yml OUT   (the best point of a solar-merge "
              f"sweep, by {metric})\n" + yaml.safe_dump(config, sort_keys=False))
    table = {r.point.label + (" (best)" if r is best else ""): r.metrics for r in rows}
    write_card(best_dir, kind="merge", source_yaml=source, source_name="mergekit_config.yml",
               base_models=refs, merge_method=method,
               lineage=[{"stage": best_dir.name, "kind": "merge", "inputs": refs}],
               eval_table=table, extra_tags=["sweep"],
               description=f"The best of {len(rows)} `{method}` merges of the candidates, "
                           f"chosen by `{metric}` (table below: every grid point).")


# -- the recipe stage --------------------------------------------------------------------------

def stage_spec(spec: dict, where: str) -> dict:
    """A recipe `sweep:` mapping checked strictly (without `models`, which the planner
    resolves); returns it with defaults filled in."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    class SweepSpec(BaseModel):
        model_config = ConfigDict(extra="forbid")
        method: str
        grid: list[float] | str = "0,0.25,0.5,0.75,1"
        tasks: list[str] | str
        include_path: list[str] | str | None = None
        num_fewshot: int | None = Field(default=None, ge=0)
        limit: float | None = Field(default=None, gt=0)
        batch_size: int | str = 8
        metric: str | None = None
        dtype: str | None = None
        keep_all: bool = False
        options: dict = Field(default_factory=dict)  # mergekit MergeOptions fields

    try:
        parsed = SweepSpec.model_validate(spec)
    except ValidationError as e:
        from solar_merge.errors import did_you_mean

        err = e.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        hint = did_you_mean(key, SweepSpec.model_fields) if err["type"] == "extra_forbidden" \
            else ""
        raise UserError(f"{where}.{key}: {err['msg']}{hint}",
                        fix=f"keys of a sweep stage: models, {', '.join(SweepSpec.model_fields)}"
                        ) from None
    return parsed.model_dump()


def run_stage(models: list[str], out_dir, spec: dict, *, digest: str | None = None
              ) -> SweepResult:
    """The recipe's `sweep:` stage: the best merge becomes the stage's output folder itself
    (with sweep.csv, sweep.png and scores/ beside its weights), so later stages use it;
    `digest` (the stage hash) marks it complete."""
    return sweep(models, out_dir, method=spec["method"], grid=spec["grid"], tasks=spec["tasks"],
                 include_path=spec.get("include_path"), num_fewshot=spec.get("num_fewshot"),
                 limit=spec.get("limit"), batch_size=spec.get("batch_size", 8),
                 metric=spec.get("metric"), keep_all=spec.get("keep_all", False),
                 dtype=spec.get("dtype"), options=spec.get("options") or None, best_name=None,
                 progress=False, digest=digest)
