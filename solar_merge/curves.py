"""Held-out perplexity curves of training runs, compared: who is ahead, and from which step.

A training stage that has a held-out set (`eval_datasets:` with `args.eval_strategy: steps`,
TRL's own evaluation) logs `eval_loss` into its loss.jsonl every `eval_steps` steps (and at
step 0 with `args.eval_on_start: true`). Its held-out perplexity at that step is
exp(eval_loss): the exponential of the mean token negative log-likelihood on the held-out
blocks. The demo's control arm (DUS + CPT against the base model + the same CPT) and the
up-scaling study plot several such curves on one figure and say where they cross.

Where growth pays off beyond the steps measured: `forecast` fits a saturating law to each
curve, held-out loss(t) = c + b (1 + t)^-a (log perplexity; c is the loss the run tends to),
with scipy.optimize.curve_fit, and finds the step from which the fitted treatment stays below
the fitted control, up to a horizon. Its interval comes from redrawing both laws' parameters
from their fits' covariances (a parametric bootstrap): the 5th-95th percentile of the
crossing step over the draws that cross, and the share of draws that cross at all.
"""

import math
from dataclasses import dataclass
from pathlib import Path

Curve = list[tuple[int, float]]  # (step, held-out perplexity), sorted by step


def eval_curve(stage_dir_or_log) -> Curve:
    """(step, exp(eval_loss)) from a stage folder's loss.jsonl (or the file itself); a step
    logged twice (a resumed run) keeps its last value; a line cut short by a kill is skipped."""
    from solar_merge.stages.logs import LOSS_LOG, read_loss

    path = Path(stage_dir_or_log)
    if path.is_dir():
        path = path / LOSS_LOG
    return [(step, math.exp(loss)) for step, loss in read_loss(path, "eval_loss")]


@dataclass
class Crossing:
    """How `treatment` fares against `control` at the steps both were evaluated at."""
    steps: list[int]             # common evaluation steps
    first_ahead: int | None      # first common step where treatment's perplexity is lower
    ahead_at_end: bool           # lower at the last common step
    last: tuple[int, float, float] | None  # (step, treatment, control) at the last one

    def sentence(self, treatment: str, control: str) -> str:
        if self.last is None:
            return (f"{treatment} and {control} have no evaluation step in common: no "
                    "comparison possible")
        step, t, c = self.last
        at_end = f"at step {step}: {treatment} {t:.3f} vs {control} {c:.3f} held-out perplexity"
        if self.first_ahead is None:
            return (f"{treatment} has NOT overtaken {control} within {step} steps ({at_end}; "
                    f"lower is better).")
        if not self.ahead_at_end:
            return (f"{treatment} was ahead of {control} from step {self.first_ahead} but is "
                    f"behind again {at_end}.")
        if self.first_ahead == self.steps[0]:
            return f"{treatment} was ahead of {control} from the first evaluation ({at_end})."
        return (f"{treatment} overtook {control} at step {self.first_ahead} and stays ahead "
                f"({at_end}).")


def crossing(treatment: Curve, control: Curve) -> Crossing:
    """first_ahead: if treatment ends ahead, the step from which it stays ahead; otherwise the
    first step it was ahead at all (None: never)."""
    t, c = dict(treatment), dict(control)
    steps = sorted(set(t) & set(c))
    ahead = [t[s] < c[s] for s in steps]
    if ahead and ahead[-1]:
        i = len(ahead) - 1
        while i > 0 and ahead[i - 1]:
            i -= 1
        first = steps[i]
    else:
        first = next((s for s, a in zip(steps, ahead) if a), None)
    last = (steps[-1], t[steps[-1]], c[steps[-1]]) if steps else None
    return Crossing(steps, first, bool(ahead) and ahead[-1], last)


def saturating(t, c, b, a):
    """The law fitted to a held-out loss curve: c + b (1 + t)^-a."""
    import numpy as np

    return c + b * np.power(1.0 + np.asarray(t, dtype=float), -a)


@dataclass
class Fit:
    params: tuple[float, float, float]  # c, b, a
    cov: list[list[float]]
    points: int


def fit_curve(curve: Curve) -> Fit | None:
    """The saturating law fitted to a curve's log perplexities (several values per step, e.g.
    one per seed, are all fitted); None with fewer than 4 points or when the fit fails."""
    import numpy as np
    from scipy.optimize import curve_fit

    if len(curve) < 4:
        return None
    t = np.array([s for s, _ in curve], dtype=float)
    y = np.log([p for _, p in curve])
    guess = (float(y.min()) * 0.9, float(y.max() - y.min() * 0.9), 0.5)
    try:
        params, cov = curve_fit(saturating, t, y, p0=guess, maxfev=20000,
                                bounds=([0.0, -np.inf, 1e-3], [np.inf, np.inf, 5.0]))
    except (RuntimeError, ValueError):
        return None
    if not np.all(np.isfinite(cov)):
        return None
    return Fit(tuple(float(x) for x in params), cov.tolist(), len(curve))


@dataclass
class Forecast:
    """When the treatment curve is expected to drop below the control curve for good."""
    step: float | None           # by the two fitted laws (None: not within the horizon)
    low: float | None            # 5th-95th percentile over all draws; inf: beyond the horizon
    high: float | None
    share: float                 # share of draws that cross within the horizon
    horizon: int
    last: int                    # the last measured step
    fits: dict[str, Fit | None]
    points: int = 0              # evaluation points of the shorter curve
    draws: int = 0

    def sentence(self, treatment: str, control: str) -> str:
        if any(f is None for f in self.fits.values()):
            return (f"No forecast of where {treatment} and {control} cross: a saturating law "
                    "needs at least 4 evaluation points per curve and a fit that converges"
                    + (f" (fewest points: {self.points})." if self.points < 4 else "."))
        names = {"treatment": treatment, "control": control}
        laws = "; ".join(f"{names[k]}: loss = {f.params[0]:.3f} + {f.params[1]:.3f} "
                         f"(1 + t)^-{f.params[2]:.3f}" for k, f in self.fits.items())
        share = (f"{self.share:.0%} of {self.draws} parameter draws cross within "
                 f"{self.horizon} steps")
        if self.step is None:
            return (f"{treatment} is **not expected to drop below** {control} within "
                    f"{self.horizon} steps: the fitted laws do not cross ({share}). Fits on "
                    f"steps 0-{self.last}: {laws}.")
        when = ("from the start of the fitted range" if self.step <= 0
                else f"for good from step **{self.step:.0f}**")
        def at(x):
            return f"beyond {self.horizon}" if math.isinf(x) else f"{x:.0f}"

        interval = (f"90% interval {at(self.low)} to {at(self.high)} over the parameter "
                    "draws; " if self.low is not None else "")
        doubt = (" Fewer than half of the draws cross: these points do not settle whether "
                 "the curves cross at all." if self.share < 0.5 else "")
        return (f"By the fitted laws, {treatment} drops below {control} {when} ({interval}"
                f"{share}).{doubt} Fits on steps 0-{self.last}: {laws}.")


def _first_for_good(diff, grid):
    """The first grid step from which diff (treatment - control) stays <= 0; None if never."""
    import numpy as np

    above = np.nonzero(diff > 0)[0]
    if len(above) == 0:
        return float(grid[0])
    if above[-1] == len(grid) - 1:
        return None
    return float(grid[above[-1] + 1])


def forecast(treatment: Curve, control: Curve, *, horizon: int | None = None,
             draws: int = 2000, seed: int = 0) -> Forecast:
    """Fit the saturating law to both curves and find where the treatment stays below the
    control, up to `horizon` steps (default 50 x the last measured step)."""
    import numpy as np

    last = int(max([s for s, _ in treatment] + [s for s, _ in control] + [0]))
    horizon = horizon or max(50 * last, 100)
    fits = {"treatment": fit_curve(treatment), "control": fit_curve(control)}
    points = min(len(treatment), len(control))
    if any(f is None for f in fits.values()):
        return Forecast(None, None, None, 0.0, horizon, last, fits, points)
    grid = np.unique(np.concatenate([np.arange(0, last + 1),
                                     np.geomspace(max(last, 1), horizon, 500)]))
    ft, fc = fits["treatment"], fits["control"]
    step = _first_for_good(saturating(grid, *ft.params) - saturating(grid, *fc.params), grid)
    rng = np.random.default_rng(seed)
    pt = rng.multivariate_normal(ft.params, ft.cov, size=draws)
    pc = rng.multivariate_normal(fc.params, fc.cov, size=draws)
    pt[:, 2], pc[:, 2] = np.clip(pt[:, 2], 1e-3, None), np.clip(pc[:, 2], 1e-3, None)
    found = [_first_for_good(saturating(grid, *a) - saturating(grid, *b), grid)
             for a, b in zip(pt, pc)]
    # A draw that does not cross within the horizon counts as crossing beyond it (inf), so
    # the interval is over every draw, not only over those that happen to cross.
    every = np.array([np.inf if x is None else x for x in found])
    crossed = int(np.isfinite(every).sum())
    low, high = ((float(np.percentile(every, 5, method="inverted_cdf")),
                  float(np.percentile(every, 95, method="inverted_cdf")))
                 if crossed else (None, None))
    return Forecast(step, low, high, crossed / draws, horizon, last, fits, points, draws)


def forecast_paragraph(treatment: tuple[str, Curve], control: tuple[str, Curve]) -> list[str]:
    """Markdown lines: where growth is expected to pay off, with the caveat that goes with it."""
    (t_name, t), (c_name, c) = treatment, control
    result = forecast(t, c)
    lines = [f"**Where growth pays off.** {result.sentence(t_name, c_name)}"]
    if all(result.fits.values()):
        lines[0] += (" An extrapolation of the runs as trained: a learning-rate schedule that "
                     "decays to zero at the last step flattens both curves, so the laws "
                     "describe these runs continued at their final rate, not longer runs "
                     "with their own schedules.")
    return lines


def plot(curves: dict[str, Curve], path, *, title: str = "held-out perplexity during "
         "continued pretraining", mark: tuple[int, float] | None = None) -> Path:
    """All curves on one figure (log scale when they span more than 5x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=110)
    values = []
    for name, curve in curves.items():
        if curve:
            xs, ys = zip(*curve)
            values += ys
            ax.plot(xs, ys, marker="o", ms=3, label=name)
    if mark is not None:
        ax.axvline(mark[0], color="gray", ls="--", lw=1)
        ax.annotate(f"crossover: step {mark[0]}", mark, textcoords="offset points",
                    xytext=(6, 8), fontsize=8)
    if values and max(values) / max(min(values), 1e-9) > 5:
        ax.set_yscale("log")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out perplexity exp(eval_loss) ↓")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def arms_section(treatment: tuple[str, Path], control: tuple[str, Path], png: Path,
                 *, what: str = "") -> tuple[list[str], Crossing]:
    """Markdown lines (the verdict, a step table, the figure) comparing two training runs'
    held-out perplexity curves, and the figure itself at `png`."""
    (t_name, t_dir), (c_name, c_dir) = treatment, control
    t, c = eval_curve(t_dir), eval_curve(c_dir)
    cross = crossing(t, c)
    mark = (cross.first_ahead, dict(t)[cross.first_ahead]) if cross.first_ahead is not None \
        and cross.ahead_at_end else None
    plot({t_name: t, c_name: c}, png, mark=mark)
    lines = ([what, ""] if what else []) + [f"**{cross.sentence(t_name, c_name)}**", ""]
    if cross.steps:
        tv, cv = dict(t), dict(c)
        lines += [f"| step | {t_name} | {c_name} |", "|---:|---:|---:|"]
        lines += [f"| {s} | {tv[s]:.3f} | {cv[s]:.3f} |" for s in cross.steps]
        lines += ["", f"![held-out perplexity of both arms]({Path(png).name})", ""]
        lines += forecast_paragraph((t_name, t), (c_name, c))
    return lines, cross
