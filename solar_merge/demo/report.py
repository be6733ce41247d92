"""The demo's report: report.md (the stage x metric table, what the paper's claims look like in
this run, what each stage cost, the command and the machine) and report.png.

report.png has two rows. The up-scaling story: held-out perplexity of the base, the DUS model,
DUS + CPT and the control arm base + CPT as bars, the 60-layer repeat drawn off the scale and
marked as such; beside it the recovery: both CPT arms' held-out perplexity over their steps
(TRL's evaluations) with the fitted saturating laws and the expected crossing step
(solar_merge.curves). Below, one panel per metric over every stage that has it: bars for
perplexity, dots with 95% Wilson intervals for proportions of a few questions (so that one
question in 16 reads as the noise it is). Stages are rows of horizontal charts, so their names
never collide. `figure_data` returns what each panel plots; `_plot` only draws it.
"""

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
CHANCE = {QA: 0.25}  # 4-way multiple choice
# Which rows of the results play which part of the up-scaling story ("base": the first row).
ROLES = {"base": None, "repeat": "repeat", "dus": "dus", "cpt": "cpt", "control": "base_cpt"}
STORY = ("base", "dus", "cpt", "control")
STORY_LABELS = {"base": "base", "dus": "DUS", "cpt": "DUS + CPT", "control": "base + CPT",
                "repeat": "repeat"}
OFF_SCALE = 4.0  # a value over 4x the largest other one is drawn clipped and marked


def wilson(k: int, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k / n (scipy's binomtest)."""
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=0.95, method="wilson")
    return float(ci.low), float(ci.high)


def figure_data(results: dict, *, counts: dict | None = None, arms: dict | None = None,
                forecast=None, roles: dict | None = None) -> dict:
    """What each panel of report.png plots.

    results: {stage: {column: value}} in stage order (as `write_report` takes it); counts:
    {stage: {column: questions}} for the proportion metrics; arms: {name: [(step, held-out
    perplexity), ...]} of the CPT arms, treatment first; forecast: their
    solar_merge.curves.Forecast. Returns {"upscaling": ..., "recovery": ..., "metrics": [...]}
    (a panel with nothing to show is None, or absent from "metrics").
    """
    return {"upscaling": _upscaling(results, roles),
            "recovery": _recovery(arms, forecast),
            "metrics": [p for m in _shown(results) if (p := _metric(results, m, counts))]}


def _role_rows(results: dict, roles: dict | None) -> dict[str, str]:
    roles = {**ROLES, **(roles or {})}
    if roles["base"] is None and results:
        roles["base"] = next(iter(results))
    return {role: stage for role, stage in roles.items() if stage in results}


def _upscaling(results: dict, roles: dict | None) -> dict | None:
    rows = _role_rows(results, roles)
    bars = []
    for role in ("base", "repeat", "dus", "cpt", "control"):
        stage = rows.get(role)
        value = results.get(stage, {}).get(PPL) if stage else None
        if value is not None:
            layers = results[stage].get("layers")
            label = STORY_LABELS[role] + (f" ({int(layers)} layers)" if layers else "")
            bars.append({"role": role, "stage": stage, "label": label, "value": float(value)})
    if not {"base", "dus"} <= {b["role"] for b in bars}:
        return None
    return {"bars": bars, **_scale([b["value"] for b in bars])}


def _scale(values: list[float]) -> dict:
    """The axis limit that keeps every value but the outliers (> OFF_SCALE x the largest
    other) in view, and which values are off it."""
    top = max(values)
    rest = sorted(values)[:-1]
    if rest and top > OFF_SCALE * max(rest):
        limit = 1.3 * max(rest)
    else:
        limit = 1.18 * top
    return {"limit": limit, "off_scale": [v > limit for v in values]}


def _recovery(arms: dict | None, forecast) -> dict | None:
    if not arms or not any(arms.values()):
        return None
    from solar_merge.curves import crossing

    names = list(arms)
    out = {"curves": {k: [(int(s), float(v)) for s, v in c] for k, c in arms.items()},
           "crossing": None, "forecast": None}
    if len(names) == 2:
        cross = crossing(arms[names[0]], arms[names[1]])
        if cross.first_ahead is not None and cross.ahead_at_end:
            out["crossing"] = cross.first_ahead
    if forecast is not None and all(forecast.fits.values()):
        out["forecast"] = {"step": forecast.step, "low": forecast.low, "high": forecast.high,
                           "share": forecast.share, "horizon": forecast.horizon,
                           "last": forecast.last,
                           "laws": {names[0]: forecast.fits["treatment"].params,
                                    names[1]: forecast.fits["control"].params}}
    return out


def _shown(results: dict) -> list[str]:
    metrics = _columns(results)
    return [m for m in metrics if m not in ("layers", "params", BPB)] or metrics[:1]


def _metric(results: dict, metric: str, counts: dict | None) -> dict | None:
    points = [{"stage": s, "value": float(r[metric])} for s, r in results.items()
              if isinstance(r.get(metric), (int, float))]
    if not points:
        return None
    panel = {"metric": metric, "title": METRIC_LABELS.get(metric, metric), "points": points}
    if metric in _PERCENT:
        panel["kind"] = "proportion"
        panel["chance"] = CHANCE.get(metric)
        for p in points:
            n = (counts or {}).get(p["stage"], {}).get(metric)
            if n:
                p["n"] = int(n)
                p["k"] = round(p["value"] * n)
                p["low"], p["high"] = wilson(p["k"], p["n"])
        return panel
    panel["kind"] = "value"
    if all(p["value"] > 0 for p in points):
        scale = _scale([p["value"] for p in points])
        panel["limit"] = scale["limit"]
        for p, off in zip(points, scale["off_scale"]):
            p["off_scale"] = off
    return panel


# -- the claims -------------------------------------------------------------------------------

def claims(results: dict, *, counts: dict | None = None, arms: dict | None = None,
           forecast=None, facts: dict | None = None, roles: dict | None = None) -> list[str]:
    """Markdown paragraphs: what each of the paper's claims shows in this run, and where the
    run is too small to say. facts: {"cpt_steps", "cpt_tokens", "eval_chunks", "dpo":
    {stage: {"steps", "margin": (first, last), "accuracy": (first, last)}}} as far as known."""
    facts = facts or {}
    rows = _role_rows(results, roles)
    ppl = {role: results[stage].get(PPL) for role, stage in rows.items()}
    out = []
    base, dus, cpt, rep, ctl = (ppl.get(k) for k in ("base", "dus", "cpt", "repeat", "control"))
    chunks = facts.get("eval_chunks")
    on = (f"on {chunks} held-out chunk{'s' * (chunks != 1)} of the reference manual" if chunks
          else "on held-out reference-manual text")
    if base and dus:
        text = (f"**Depth up-scaling drops, continued pretraining recovers.** DUS (keep the first "
                f"n - m layers of one copy and the last n - m of another) moved held-out word "
                f"perplexity {on} from {base:.1f} (base) to {dus:.1f} (x{dus / base:.2f})")
        if cpt:
            steps = facts.get("cpt_steps")
            budget = (f"{steps} CPT steps" + (f" ({facts['cpt_tokens']:,} tokens)"
                                              if facts.get("cpt_tokens") else "")
                      if steps else "CPT")
            where = ("below the base's" if cpt < base else
                     "back within 10% of the base's" if cpt < 1.1 * base else
                     "still above the base's")
            text += f"; {budget} brought it to {cpt:.1f}, {where} {base:.1f}"
            if dus > base:
                text += (f": {100 * (dus - cpt) / (dus - base):.0f}% of what up-scaling lost "
                         "was recovered")
            text += ". The drop and the recovery are the paper's point."
        else:
            text += "."
        out.append(text)
    if rep and base:
        out.append(f"**Repeating every layer breaks the model.** The naive 2n stack (the whole "
                   f"model twice) scores {rep:,.0f}, x{rep / base:,.0f} the base's perplexity"
                   + (f", where DUS's seam (m layers dropped from each copy) keeps it at "
                      f"{dus:.1f}" if dus else "")
                   + ". Off the scale in the figure.")
    if cpt and ctl:
        ahead = cpt < ctl
        text = (f"**The control arm: base + CPT.** Given exactly the same continued pretraining, "
                f"the 30-layer base reaches {ctl:.1f} against DUS + CPT's {cpt:.1f}: at this "
                f"budget the up-scaled model is {'ahead' if ahead else 'behind'}.")
        fc = (_recovery(arms, forecast) or {}).get("forecast")
        if forecast is not None and fc is None:  # too few points, or no fit
            text += " " + forecast.sentence("DUS + CPT", "base + CPT")
        if fc and fc["step"] is not None:
            text += (f" The saturating laws fitted to both arms' held-out curves put the step "
                     f"from which DUS + CPT stays ahead at about {fc['step']:.0f}"
                     + (f" (90% interval {fc['low']:.0f}-{fc['high']:.0f})"
                        if fc["low"] is not None else "")
                     + f", {fc['step'] / max(fc['last'], 1):.0f}x the {fc['last']} steps run: "
                     "an extrapolation, not a measurement.")
        elif fc:
            text += (f" The fitted saturating laws do not cross within {fc['horizon']} steps.")
        text += (" What the paper implies, that the up-scaled model ends ahead of its base "
                 "given the same continued pretraining, needs far more tokens than this demo "
                 "trains on: this run shows the trend, not the outcome." if not ahead else "")
        out.append(text)
    out += _tuning_claims(results, counts, facts)
    return out


def _prop(results, counts, stage, metric) -> str:
    v = results.get(stage, {}).get(metric)
    if v is None:
        return "–"
    n = (counts or {}).get(stage, {}).get(metric)
    if not n:
        return f"{100 * v:.0f}%"
    k = round(v * n)
    low, high = wilson(k, n)
    return f"{k}/{n} ({100 * low:.0f}-{100 * high:.0f}%)"


def _separable(results, counts, metric, stages) -> bool | None:
    """Whether any two of `stages` have disjoint 95% intervals on `metric` (None: unknown)."""
    spans = []
    for s in stages:
        v, n = results.get(s, {}).get(metric), (counts or {}).get(s, {}).get(metric)
        if v is None or not n:
            continue
        spans.append(wilson(round(v * n), n))
    if len(spans) < 2:
        return None
    return any(a[1] < b[0] or b[1] < a[0] for a in spans for b in spans)


def _tuning_claims(results: dict, counts: dict | None, facts: dict) -> list[str]:
    out = []
    tuned = [s for s in ("sft_python", "sft_math", "sft_avg", "sft_slerp", "final")
             if s in results and (QA in results[s] or ARITH in results[s])]
    if not tuned:
        return out
    reference = next((s for s in results if s not in tuned and
                      (QA in results[s] or ARITH in results[s])), None)
    stages = ([reference] if reference else []) + tuned
    n_qa = max(((counts or {}).get(s, {}).get(QA) or 0 for s in stages), default=0)
    noise = ("" if not n_qa else
             f" With {n_qa} questions a task, one answer moves a score by "
             f"{100 / n_qa:.0f} points, and the 95% interval of half right spans "
             f"{100 * wilson(n_qa // 2, n_qa)[0]:.0f}-{100 * wilson(n_qa // 2, n_qa)[1]:.0f}%.")
    sep = [_separable(results, counts, m, stages) for m in (QA, ARITH)]
    verdict = ("Some intervals are disjoint: look at which in the figure." if any(sep) else
               "Every interval overlaps every other: this run is too small to say whether "
               "SFT, merging or DPO changed either skill.")
    cands = [s for s in ("sft_python", "sft_math") if s in tuned]
    merges = [s for s in ("sft_avg", "sft_slerp") if s in tuned]
    text = None if not cands + merges else ("**SFT candidates and their merges.** "
            + "; ".join(f"{s}: QA {_prop(results, counts, s, QA)}, arith "
                        f"{_prop(results, counts, s, ARITH)}"
                        for s in ([reference] if reference else []) + cands + merges)
            + "." + noise + " " + verdict
            + (" The paper merges candidates tuned on different data (weighted average and "
               "SLERP) to keep both skills; here the merges run and are scored, but the skills "
               "they should combine are not measurable at this size." if merges else ""))
    if text:
        out.append(text)
    dpo = facts.get("dpo") or {}
    if dpo:
        parts = []
        for stage, d in dpo.items():
            steps = d.get("steps", 0)
            bits = [f"{steps} optimizer step{'s' * (steps != 1)}"]
            if d.get("loss"):
                bits.append(f"DPO loss {d['loss'][0]:.4f} -> {d['loss'][1]:.4f}")
            if d.get("margin"):
                bits.append(f"reward margin {d['margin'][0]:.4f} -> {d['margin'][1]:.4f}")
            held = results.get(stage, {}).get(PPL)
            if held is not None:
                bits.append(f"held-out PPL {held:.1f}")
            parts.append(f"{stage}: " + ", ".join(bits))
        out.append("**DPO and stepwise DPO.** " + "; ".join(parts) + " (on their training "
                   "pairs, as TRL logged them; a loss of log 2 = 0.6931 and a margin of 0 mean "
                   "no preference yet, as at every first step, where the policy is still its "
                   "reference). A held-out gain from so few pairs is below what these "
                   "evaluations can see.")
    if "final" in results:
        r = results["final"]
        bits = []
        if r.get(PPL) is not None:
            bits.append(f"held-out PPL {r[PPL]:.1f}")
        if r.get(QA) is not None or r.get(ARITH) is not None:
            bits.append(f"QA {_prop(results, counts, 'final', QA)}, arith "
                        f"{_prop(results, counts, 'final', ARITH)}")
        out.append("**The final merge** of the two aligned candidates (solar_average): "
                   + ", ".join(bits) + "; Hub-ready in `final/` with its card."
                   + ("" if text else noise))
    return out


# -- the report -------------------------------------------------------------------------------

def write_report(results: dict, out_dir, *, cpt_curve=None, command: str | None = None,
                 title: str = "solar-merge demo: SOLAR's recipe on SmolLM2-135M",
                 sections: dict[str, list[str]] | None = None, counts: dict | None = None,
                 arms: dict | None = None, forecast=None, claims_lines: list[str] | None = None,
                 machine: dict | None = None) -> Path:
    """Write report.md (stage x metric table, the claims, sections, command, machine) and
    report.png; return report.md.

    results: {stage: {column: value}} in stage order, columns as solar_merge.eval.table names
    them (plus "layers", "params"). cpt_curve: [(step, loss), ...] or a stage's loss.jsonl
    path (its first and last training loss are quoted). sections: heading -> markdown lines,
    after the claims (e.g. the contamination check). counts, arms, forecast: see
    `figure_data`. claims_lines: see `claims`. machine: more facts for the Machine list.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = _columns(results)
    curve = _curve(cpt_curve)

    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += ["![the up-scaling story, the recovery, and every stage's scores](report.png)", ""]
    lines += ["| stage | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics) + " |",
              "|---|" + "---:|" * len(metrics)]
    for stage, r in results.items():
        lines.append(f"| {stage} | " + " | ".join(
            _fmt(m, r.get(m), (counts or {}).get(stage, {}).get(m)) for m in metrics) + " |")
    lines += ["", ("All scores are lm-evaluation-harness's, on solar-merge's shipped tasks "
              "(solar_merge/tasks; each eval stage folder holds lm-eval's results.json per "
              "model and every metric in results.md). Word PPL and bits/byte: "
              "solar_manual_ppl, held-out reference-manual topics (never trained on). QA: "
              "solar_manual_qa, 4-way multiple choice on held-out topics (chance 25%). Arith "
              "EM: solar_arith, GSM8K-style exact match (greedy, last number). A proportion "
              "shows as correct/asked; the figure draws its 95% Wilson interval."), ""]
    if claims_lines:
        lines += ["## What the paper's claims look like here", ""]
        for paragraph in claims_lines:
            lines += [paragraph, ""]
    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", *body, ""]
    if curve:
        lines += [(f"CPT training loss: {curve[0][1]:.3f} at step {curve[0][0]} -> "
                   f"{curve[-1][1]:.3f} at step {curve[-1][0]} ({len(curve)} points)."), ""]
    lines += ["## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in {**machine_info(), **(machine or {})}.items()]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(figure_data(results, counts=counts, arms=arms, forecast=forecast), out / "report.png",
          title)
    return md


def _columns(results: dict) -> list[str]:
    metrics = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    ours = ("solar_manual_ppl ", "solar_manual_qa ", "solar_arith ")
    return metrics + sorted({m for r in results.values() for m in r if not m.startswith(ours)}
                            - set(METRIC_ORDER))


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


def _fmt(metric: str, v, n: int | None = None) -> str:
    if v is None:
        return "–"
    if metric == "params":
        return f"{v / 1e6:.1f}M" if v >= 1e5 else str(int(v))
    if metric == "layers":
        return str(int(v))
    if metric in _PERCENT:
        return f"{100 * v:.1f}%" + (f" ({round(v * n)}/{n})" if n else "")
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

    from solar_merge.precision import cpu_flags, cpu_name

    info = {"cores": os.cpu_count(), "CPU": cpu_name(),
            "CPU flags": ", ".join(f for f, on in cpu_flags().items() if on) or "none listed"}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["RAM"] = f"{pages * size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    info["load average (1 min) at the end"] = f"{os.getloadavg()[0]:.1f}"
    info["platform"] = platform.platform()
    info["python"] = platform.python_version()
    for pkg in ("solar-merge", "torch", "transformers", "trl", "mergekit", "lm_eval"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    return info


# -- drawing ----------------------------------------------------------------------------------

def _plot(data: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = [k for k in ("upscaling", "recovery") if data.get(k)]
    panels = data["metrics"]
    stages = max((len(p["points"]) for p in panels), default=1)
    ncols = max(len(panels), 2 if top else 1)
    heights = ([4.2] if top else []) + [max(2.6, 0.34 * stages + 1.3)]
    fig = plt.figure(figsize=(5.2 * ncols, sum(heights) + 1.0))
    grid = fig.add_gridspec(len(heights), ncols * 2, height_ratios=heights)
    if top:
        widths = [ncols * 2] if len(top) == 1 else [ncols, ncols]
        start = 0
        for key, width in zip(top, widths):
            ax = fig.add_subplot(grid[0, start:start + width])
            (_draw_upscaling if key == "upscaling" else _draw_recovery)(ax, data[key])
            start += width
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(grid[len(heights) - 1, 2 * i:2 * i + 2])
        (_draw_proportion if panel["kind"] == "proportion" else _draw_values)(ax, panel)
    fig.suptitle(title, fontsize=13)
    fig.tight_layout(w_pad=2.5)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _num(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}" if abs(v) >= 1 else f"{v:.3g}"


def _draw_upscaling(ax, panel: dict) -> None:
    bars, limit = panel["bars"], panel["limit"]
    colors = {"base": "#7f7f7f", "repeat": "#d62728", "dus": "#ff7f0e", "cpt": "#1f77b4",
              "control": "#2ca02c"}
    xs = range(len(bars))
    for x, b, off in zip(xs, bars, panel["off_scale"]):
        height = limit if off else b["value"]
        ax.bar(x, height, color=colors[b["role"]], width=0.65,
               hatch="//" if off else None, edgecolor="white" if off else None)
        if off:
            ax.text(x, limit * 0.5, f"off scale: {_num(b['value'])} ↑", ha="center",
                    va="center", rotation=90, fontsize=9, color="white", fontweight="bold")
        else:
            ax.text(x, height + limit * 0.015, _num(b["value"]), ha="center", va="bottom",
                    fontsize=9)
    ax.set_xticks(list(xs))
    ax.set_xticklabels([b["label"].replace(" (", "\n(") for b in bars], fontsize=8)
    ax.set_ylim(0, limit)
    ax.set_ylabel("held-out word perplexity ↓")
    ax.set_title("Up-scaling: DUS drops, CPT recovers; the 60-layer repeat breaks",
                 fontsize=10.5)
    ax.grid(axis="y", alpha=0.3)


def _draw_recovery(ax, panel: dict) -> None:
    import numpy as np

    from solar_merge.curves import saturating

    colors = ["#1f77b4", "#2ca02c", "#9467bd", "#8c564b"]
    fc = panel.get("forecast")
    last = max(s for c in panel["curves"].values() for s, _ in c) if any(
        panel["curves"].values()) else 1
    right = last
    if fc and fc["step"] is not None:
        right = max(last, min(fc["horizon"], (fc["high"] or fc["step"]) * 1.15))
    for color, (name, curve) in zip(colors, panel["curves"].items()):
        if not curve:
            continue
        xs, ys = zip(*curve)
        ax.plot(xs, ys, "o-", color=color, ms=4, lw=1.5, label=f"{name} (measured)")
        if fc and name in fc["laws"] and right > last:
            grid = np.linspace(0, right, 300)
            ax.plot(grid, np.exp(saturating(grid, *fc["laws"][name])), "--", color=color,
                    lw=1, alpha=0.8, label=f"{name} (fitted law)")
    if panel.get("crossing") is not None:
        ax.axvline(panel["crossing"], color="gray", ls=":", lw=1)
    note = None
    if fc and fc["step"] is not None:
        ax.axvline(fc["step"], color="black", ls="--", lw=0.8)
        if fc["low"] is not None:
            ax.axvspan(fc["low"], fc["high"], color="gray", alpha=0.15, lw=0)
        note = (f"expected crossing: step {fc['step']:.0f}"
                + (f"\n90% interval {fc['low']:.0f}-{fc['high']:.0f}"
                   if fc["low"] is not None else "")
                + f"\n(measured: steps 0-{fc['last']})")
    elif fc:
        note = f"fitted laws do not cross\nwithin {fc['horizon']} steps"
    if note:
        ax.text(0.98, 0.97, note, transform=ax.transAxes, ha="right", va="top", fontsize=8.5,
                bbox={"facecolor": "white", "edgecolor": "0.7", "alpha": 0.9})
    if right > 8 * max(last, 1):  # the measured steps linear, the extrapolation logarithmic
        ax.set_xscale("symlog", linthresh=max(last, 1), linscale=1.5)
        measured = sorted({s for c in panel["curves"].values() for s, _ in c})
        ticks = measured[::max(1, len(measured) // 4)] + [
            t for t in (20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
            if 2 * last < t <= right]
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    values = [v for c in panel["curves"].values() for _, v in c]
    if values and max(values) / max(min(values), 1e-9) > 5:
        ax.set_yscale("log")
    ax.set_xlim(0, right * 1.02)
    ax.set_xlabel("CPT step" + (" (log scale past the measured steps)"
                                if right > 8 * max(last, 1) else ""))
    ax.set_ylabel("held-out perplexity exp(eval_loss) ↓")
    ax.set_title("Recovery: DUS + CPT vs base + CPT on held-out text", fontsize=10.5)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower left")


def _draw_values(ax, panel: dict) -> None:
    points = panel["points"]
    limit = panel.get("limit") or max(max(p["value"] for p in points) * 1.18, 1e-9)
    ys = range(len(points))
    for y, p in zip(ys, points):
        off = p.get("off_scale")
        ax.barh(y, limit if off else p["value"], color="#d62728" if off else "#1f77b4",
                height=0.6, hatch="//" if off else None, edgecolor="white" if off else None)
        if off:
            ax.text(limit * 0.98, y, f"off scale: {_num(p['value'])} →", ha="right",
                    va="center", fontsize=8, color="white", fontweight="bold")
        else:
            ax.text(p["value"] + limit * 0.01, y, _num(p["value"]), va="center", fontsize=8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([p["stage"] for p in points], fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, limit * 1.1)
    ax.set_title(panel["title"], fontsize=10.5)
    ax.grid(axis="x", alpha=0.3)


def _draw_proportion(ax, panel: dict) -> None:
    points = panel["points"]
    ys = list(range(len(points)))
    for y, p in zip(ys, points):
        if "low" in p:
            ax.errorbar(p["value"], y, xerr=[[p["value"] - p["low"]], [p["high"] - p["value"]]],
                        fmt="o", color="#1f77b4", ecolor="#1f77b4", capsize=3, ms=5)
        else:
            ax.plot(p["value"], y, "o", color="#1f77b4", ms=5)
        ax.annotate(f"{p['k']}/{p['n']}" if "n" in p else f"{100 * p['value']:.0f}%",
                    (1.0, y), xycoords=("axes fraction", "data"), xytext=(4, 0),
                    textcoords="offset points", va="center", fontsize=8)
    if panel.get("chance") is not None:
        ax.axvline(panel["chance"], color="gray", ls="--", lw=1)
        ax.text(panel["chance"], -0.6, " chance", fontsize=7.5, color="gray", va="bottom")
    ax.set_yticks(ys)
    ax.set_yticklabels([p["stage"] for p in points], fontsize=8.5)
    ax.set_ylim(len(points) - 0.4, -0.9)
    ax.set_xlim(0, 1)
    ax.xaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}%")
    ax.set_title(panel["title"] + "  (dot: score; bar: 95% interval)", fontsize=10.5)
    ax.grid(axis="x", alpha=0.3)

