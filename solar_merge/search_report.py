"""The report of a search (solar_merge.search), read from its Optuna study: OUT/report.md,
trials.csv, progress.png (optuna.visualization.matplotlib's optimization history) and
importance.png (optuna.importance's default evaluator, PED-ANOVA), and the lines of the best
model's card that say how it was found. Any worker can write it at any time; each file is
replaced whole. The search hands it what it decided (the best and the default trial, the
disk the folder takes): nothing here reaches back into solar_merge.search."""

import csv
import io
import os
import warnings
from pathlib import Path


def _trials(study):
    return sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)


def _names(study) -> list[str]:
    return list(dict.fromkeys(k for t in _trials(study) for k in t.params))


def _value(t) -> str:
    return f"{t.value:.6g}" if t.value is not None else "–"


def _seconds(t) -> str:
    if t.datetime_start and t.datetime_complete:
        return f"{(t.datetime_complete - t.datetime_start).total_seconds():.1f}"
    return "–"


def _note(t) -> str:
    if t.user_attrs.get("default"):
        return "default"
    if t.user_attrs.get("surplus"):
        return "not run: the study was full"
    if "failed_trial" in t.system_attrs:
        return f"retry of trial {t.system_attrs['failed_trial']} (its worker died)"
    return (t.user_attrs.get("error") or "").splitlines()[0][:120] if t.user_attrs.get(
        "error") else ""


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def _sampler(plan) -> str:
    s = plan.spec.sampler
    return {"tpe": "TPE", "cmaes": "CMA-ES", "random": "random"}[s.name] + (
        f" (seed {s.seed})" if s.seed is not None else "")


def _scoring(plan) -> str:
    score = plan.spec.score
    if score.perplexity is not None:
        p = score.perplexity
        return (f"held-out perplexity of {p.samples} x {p.seq_len} tokens of "
                f"`{Path(p.data).name}`")
    tasks = ", ".join(plan.eval_spec.tasks) if plan.eval_spec else str(score.tasks)
    return f"lm-eval tasks {tasks}" + (f" (limit {score.limit})" if score.limit else "")


def _counts(study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in _trials(study):
        counts[t.state.name.lower()] = counts.get(t.state.name.lower(), 0) + 1
    return counts


def how_found(study, plan, best, default) -> list[str]:
    """The card's "How it was found" section: `best` and `default` (the hand-chosen point's
    trial, or None) are trials of `study`."""
    import optuna

    space = ", ".join(f"`{k}`: {_raw(d)}" for k, d in plan.dims.items() if d.searched)
    lines = [f"Searched with `solar-merge search` (Optuna {optuna.__version__}, "
             f"{_sampler(plan)} sampler, {plan.spec.pruner} pruner) over {space}; every trial "
             f"built out of core by mergekit and scored by {_scoring(plan)}"
             + (" after a short continued pretraining" if plan.cpt else "") + ".", "",
             (f"{sum(t.state.is_finished() for t in _trials(study))} trials; the best is trial "
             f"{best.number} with `{plan.metric}` = {best.value:.6g} "
             f"({'higher' if plan.direction == 'maximize' else 'lower'} is better).")]
    if default is not None:
        lines.append(f"The hand-chosen default (trial {default.number}: "
                     + ", ".join(f"{k}={_fmt(v)}" for k, v in default.params.items())
                     + f") scored {_value(default)}.")
    lines += ["", f"| trial | {plan.metric} | " + " | ".join(_names(study)) + " |",
              "|---:|---:|" + "---|" * len(_names(study))]
    for t in _trials(study):
        if t.state.is_finished() and t.value is not None:
            lines.append(f"| {t.number}{' (best)' if t.number == best.number else ''} | "
                         f"{_value(t)} | "
                         + " | ".join(_fmt(t.params.get(k)) for k in _names(study)) + " |")
    return lines


def _raw(dim) -> str:
    if dim.choices is not None:
        return "{" + ", ".join(_fmt(v) for v in dim.choices) + "}"
    return f"[{_fmt(dim.low)}, {_fmt(dim.high)}]" + (f" step {_fmt(dim.step)}" if dim.step
                                                    else "") + (" log" if dim.log else "")


def write_report(out: Path, study, plan, *, storage: str, asked: int, best, default,
                 disk_now: int) -> None:
    """OUT/report.md and trials.csv (and the plots it shows): `best` and `default` are trials
    of `study` (or None), `disk_now` the bytes OUT takes."""
    names = _names(study)
    counts = _counts(study)
    finished = counts.get("complete", 0) + counts.get("pruned", 0)
    better = "higher" if plan.direction == "maximize" else "lower"
    lines = [f"# Search `{study.study_name}`", "",
             f"`solar-merge search` with Optuna's {_sampler(plan)} sampler ({plan.spec.pruner} "
             f"pruner), study `{study.study_name}` in `{storage}`: {finished} of {asked} trials "
             f"finished (" + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + "); "
             f"scored by {_scoring(plan)}, decided by `{plan.metric}` ({better} is better).",
             "", "## Best against the hand-chosen default", "",
             "| | trial | " + plan.metric + " | " + " | ".join(names) + " |",
             "|---|---:|---:|" + "---|" * len(names)]
    for label, t in (("best", best), ("default (hand-chosen)", default)):
        if t is not None:
            lines.append(f"| {label} | {t.number} | {_value(t)} | "
                         + " | ".join(_fmt(t.params.get(k)) for k in names) + " |")
    if best is not None and default is not None and default.value is not None:
        gain = best.value - default.value
        if plan.direction == "minimize":
            gain = -gain
        if best.number == default.number or gain == 0:
            text = "No trial scored better than the hand-chosen default."
        else:
            relative = f" ({gain / abs(default.value):.1%} of its score)" if default.value \
                else ""
            text = f"The best scores {abs(gain):.4g} better than the default{relative}."
        lines += ["", text]
    progress = _plot_progress(study, plan, out / "progress.png")
    lines += ["", "## Progress", ""]
    lines += ["![progress](progress.png)"] if progress else [
        "No complete trial yet: no progress plot."]
    importances, why = _importances(study, out / "importance.png")
    lines += ["", "## Parameter importance", ""]
    if importances:
        lines += ["![importance](importance.png)", "",
                  (f"Importance of each parameter for `{plan.metric}` over the complete "
                   "trials (optuna.importance, PED-ANOVA: how much each parameter's values "
                   "set the best trials apart):"), "",
                  "| parameter | importance |", "|---|---:|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importances.items()]
    else:
        lines.append(f"Not estimated: {why}.")
    lines += ["", "## Every trial", "",
              f"| trial | state | {plan.metric} | " + " | ".join(names)
              + " | seconds | worker | note |",
              "|---:|---|---:|" + "---|" * len(names) + "---:|---|---|"]
    for t in _trials(study):
        worker = t.user_attrs.get("worker") or {}
        lines.append(f"| {t.number} | {t.state.name.lower()} | {_value(t)} | "
                     + " | ".join(_fmt(t.params.get(k)) for k in names)
                     + f" | {_seconds(t)} | {worker.get('host', '–')}:{worker.get('pid', '–')}"
                     f" | {_note(t)} |")
    peak = max([t.user_attrs.get("disk_bytes", 0) for t in _trials(study)] or [0])
    lines += ["", "## Disk", "",
              (f"Trials' models under `trials/` after a trial was scored: at most "
              f"{size(peak)} (the best so far and the trials still running; the others are "
              f"deleted once scored). This folder now takes {size(disk_now)}."), ""]
    _replace(out / "report.md", "\n".join(lines))
    _write_csv(out / "trials.csv", study, names)


def size(n: int) -> str:
    """Bytes for a person: `512 B`, `1.5 MB`."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _write_csv(path: Path, study, names: list[str]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["trial", "state", "value", *names, "seconds", "host", "pid", "note"])
    for t in _trials(study):
        worker = t.user_attrs.get("worker") or {}
        w.writerow([t.number, t.state.name.lower(), "" if t.value is None else repr(t.value),
                    *("" if t.params.get(k) is None else t.params.get(k) for k in names),
                    _seconds(t), worker.get("host", ""), worker.get("pid", ""), _note(t)])
    _replace(path, buf.getvalue())


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text if text.endswith("\n") else text + "\n")
    os.replace(tmp, path)


def _save(ax, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig = ax.figure
    fig.set_size_inches(7, 4)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.{os.getpid()}{path.suffix}")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def _plot_progress(study, plan, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.trial import TrialState

    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        path.unlink(missing_ok=True)
        return False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        ax = optuna.visualization.matplotlib.plot_optimization_history(
            study, target_name=plan.metric)
    _save(ax, path)
    return True


def _importances(study, path: Path) -> tuple[dict, str]:
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        path.unlink(missing_ok=True)
        return {}, "fewer than two complete trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            warnings.simplefilter("ignore", UserWarning)  # few trials: "importances equal"
            importances = optuna.importance.get_param_importances(study)
            if not importances:
                raise ValueError("no parameter varies across the complete trials")
            ax = optuna.visualization.matplotlib.plot_param_importances(study)
    except (ValueError, RuntimeError) as e:
        path.unlink(missing_ok=True)
        return {}, str(e).splitlines()[0][:200] or type(e).__name__
    _save(ax, path)
    return importances, ""
