"""Held-out perplexity curves of training runs, compared: who is ahead, and from which step.

A training stage that has a held-out set (`eval_datasets:` with `args.eval_strategy: steps`,
TRL's own evaluation) logs `eval_loss` into its loss.jsonl every `eval_steps` steps (and at
step 0 with `args.eval_on_start: true`). Its held-out perplexity at that step is
exp(eval_loss): the exponential of the mean token negative log-likelihood on the held-out
blocks. The demo's control arm (DUS + CPT against the base model + the same CPT) and the
up-scaling study plot several such curves on one figure and say where they cross.
"""

import math
from dataclasses import dataclass
from pathlib import Path

Curve = list[tuple[int, float]]  # (step, held-out perplexity), sorted by step


def eval_curve(stage_dir_or_log) -> Curve:
    """(step, exp(eval_loss)) from a stage folder's loss.jsonl (or the file itself); a step
    logged twice (a resumed run) keeps its last value; a line cut short by a kill is skipped."""
    from solar_merge.stages.common import LOSS_LOG, read_loss

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
        lines += ["", f"![held-out perplexity of both arms]({Path(png).name})"]
    return lines, cross
