"""The demo's report: report.md (the paper-style stage x metric table, what each stage cost,
the command and the machine) and report.png."""

import os
from pathlib import Path

# Columns of solar_merge.eval's table (lm-eval's metric keys) shown in the report; the other
# metrics of our tasks stay in each eval stage's results.md.
PPL, BPB = "solar_manual_ppl word_perplexity,none", "solar_manual_ppl bits_per_byte,none"
QA, ARITH = "solar_manual_qa acc_norm,none", "solar_arith exact_match,flexible-extract"
METRIC_ORDER = ("layers", "params", PPL, BPB, QA, ARITH)
METRIC_LABELS = {"layers": "layers", "params": "params", PPL: "held-out word PPL ↓",
                 BPB: "bits/byte ↓", QA: "QA acc_norm ↑", ARITH: "arith EM ↑"}
_PERCENT = (QA, ARITH)


def write_report(results: dict, out_dir, *, cpt_curve=None, command: str | None = None,
           title: str = "solar-merge demo: SOLAR's recipe on SmolLM2-135M",
           sections: dict[str, list[str]] | None = None) -> Path:
    """Write report.md (stage x metric table, command, machine) and report.png; return report.md.

    results: {stage: {column: value}} in stage order, columns as solar_merge.eval.table names
    them (plus "layers", "params"). cpt_curve: [(step, loss), ...] or a stage's loss.jsonl
    path. sections: heading -> markdown lines, after the table (e.g. the contamination check).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    ours = ("solar_manual_ppl ", "solar_manual_qa ", "solar_arith ")
    metrics += sorted({m for r in results.values() for m in r if not m.startswith(ours)}
                      - set(METRIC_ORDER))
    curve = _curve(cpt_curve)

    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += ["| stage | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics) + " |",
              "|---|" + "---:|" * len(metrics)]
    for stage, r in results.items():
        lines.append(f"| {stage} | " + " | ".join(_fmt(m, r.get(m)) for m in metrics) + " |")
    lines += ["", ("All scores are lm-evaluation-harness's, on solar-merge's shipped tasks "
              "(solar_merge/tasks; each eval stage folder holds lm-eval's results.json per "
              "model and every metric in results.md). Word PPL and bits/byte: "
              "solar_manual_ppl, held-out reference-manual topics (never trained on). QA: "
              "solar_manual_qa, 4-way multiple choice on held-out topics (chance 25%). Arith "
              "EM: solar_arith, GSM8K-style exact match (3-shot, greedy, last number)."), ""]
    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", *body, ""]
    if curve:
        lines += [(f"CPT loss: {curve[0][1]:.3f} at step {curve[0][0]} -> {curve[-1][1]:.3f} "
                  f"at step {curve[-1][0]} ({len(curve)} points)."), ""]
    lines += ["![metrics across stages](report.png)", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info().items()]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(results, metrics, curve, out / "report.png", title)
    return md


def cost_table(costs: dict[str, dict], *, ran: list[str], total: float) -> list[str]:
    """Markdown lines: wall time, peak resident memory and training throughput of every stage
    (each ran in its own process: recipe.run(isolate=True)), then this run's total."""
    lines = ["| stage | kind | wall | peak RSS | tokens/s |", "|---|---|---:|---:|---:|"]
    for name, c in costs.items():
        seconds = c.get("seconds")
        lines.append(f"| {name}{'' if name in ran else ' (earlier run)'} | {c.get('kind', '')} | "
                     f"{_duration(seconds) if seconds is not None else '–'} | "
                     f"{_mb(c.get('peak_rss_mb'))} | {c.get('tokens_per_second', '–')} |")
    peak = max((c.get("peak_rss_mb") or 0 for c in costs.values()), default=0)
    lines += ["", (f"This run: {_duration(total)} wall, the embedded model's import and the data "
                   f"included; the largest stage process peaked at {_mb(peak)}. Peak RSS is the "
                   "stage process's own (getrusage), tokens/s what TRL logged (num_tokens / "
                   "train_runtime).")]
    return lines


def _duration(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{seconds:.1f} s"


def _mb(value) -> str:
    return f"{value / 1024:.2f} GB" if value else "–"


def _fmt(metric: str, v) -> str:
    if v is None:
        return "–"
    if metric == "params":
        return f"{v / 1e6:.1f}M" if v >= 1e5 else str(int(v))
    if metric == "layers":
        return str(int(v))
    if metric in _PERCENT:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _curve(cpt_curve) -> list[tuple[float, float]]:
    if cpt_curve is None:
        return []
    if isinstance(cpt_curve, (str, Path)):
        from solar_merge.stages.logs import LOSS_LOG, read_loss

        path = Path(cpt_curve)
        return read_loss(path / LOSS_LOG if path.is_dir() else path)
    return [(int(s) if float(s).is_integer() else float(s), float(v)) for s, v in cpt_curve]


def machine_info() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info = {"cores": os.cpu_count()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["RAM"] = f"{pages * size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    info["platform"] = platform.platform()
    info["python"] = platform.python_version()
    for pkg in ("solar-merge", "torch", "transformers", "trl", "mergekit"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    return info


def _plot(results: dict, metrics, curve, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if m not in ("layers", "params")] or list(metrics)[:1]
    stages = list(results)
    ncols = max(len(shown), 1)
    fig = plt.figure(figsize=(4.2 * ncols, 7.5 if curve else 4))
    grid = fig.add_gridspec(2 if curve else 1, ncols)
    for i, m in enumerate(shown):
        ax = fig.add_subplot(grid[0, i])
        xs = [j for j, s in enumerate(stages) if results[s].get(m) is not None]
        ys = [results[stages[j]][m] for j in xs]
        ax.plot(xs, ys, marker="o")
        for x, y in zip(xs, ys):
            ax.annotate(_fmt(m, y), (x, y), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=7)
        if m == PPL and ys and max(ys) / max(min(ys), 1e-9) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels(stages, rotation=35, ha="right", fontsize=8)
        ax.set_title(METRIC_LABELS.get(m, m))
        ax.grid(alpha=0.3)
    if curve:
        ax = fig.add_subplot(grid[1, :])
        ax.plot([s for s, _ in curve], [v for _, v in curve])
        ax.set_xlabel("CPT step")
        ax.set_ylabel("training loss")
        ax.set_title("continued pretraining after depth up-scaling: recovery")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
