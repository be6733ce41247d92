#!/usr/bin/env python
"""The up-scaling study: every initialisation at one budget, several seeds, one ranking.

    python benchmarks/upscale_study.py [--out runs/upscale_study] [--seeds 0,1,2]
                                       [--arms base,solar,...] [--steps N] [--eval-steps K]
                                       [--limit DOCS]
    python benchmarks/upscale_study.py --render       # re-write the report from OUT
    python benchmarks/upscale_study.py --timing       # + seconds per step by trained layers

Prepares OUT (a link to the embedded SmolLM2-135M-Instruct, the demo's training text, the
shipped held-out topics as data/heldout.jsonl) and writes OUT/upscale_study.yaml: the train and
eval stages of training/upscale_study.yaml once per seed (`<stage>_s<seed>`, the training's
args.seed = 42 + seed: the order of the training data), the up-scales once (each init drawn
once: LESA's predictor and the noise with the recipe's seed 0, so that every seed of an arm
starts from the same model), limited to the arms asked for. It runs that recipe with `solar-merge run` (finished stages are
skipped, so the study runs in parts: e.g. `--seeds 0`, then `--seeds 1,2`, or a few arms at a
time) and writes, in OUT and (for a full-size run) in benchmarks/:

    upscale_study.md    per arm: held-out perplexity at steps 0, 4 and 20 and lm-eval's word
                        perplexity, mean and spread over the seeds; each init's preparation
                        time; the ranking, with which differences exceed the seed spread; the
                        published orderings beside it; where growth pays off (curves.forecast)
    upscale_study.png   the held-out curves (mean and range over seeds) and the final values
    upscale_study.json  every number above, and every curve point

The report is rendered from whatever has finished, so a part of the study reads as such.
The load average is sampled every 30 s while the recipe runs (2 shared cores: a busy machine
slows every arm, and the timings with it; the perplexities do not depend on it).
"""

import argparse
import datetime
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPE = ROOT / "training" / "upscale_study.yaml"
NAME = "upscale_study"
BASE = "smollm2-135m-instruct"
STEPS = (0, 4, 20)  # the evaluation steps the table shows
SEED0 = 42          # the training seed of seed 0

# What each arm is, in the published papers' words, and the orderings they report.
LABELS = {"base": "base (30 layers)", "solar": "SOLAR stack", "solar_noise": "SOLAR + noise",
          "identity": "LLaMA Pro identity (top)", "average": "Avg-DeUS (top)",
          "aligned": "OpT-DeUS aligned (top)", "lesa": "LESA (top)"}
PUBLISHED = [
    (("OpT-DeUS (Cao et al. 2025, arXiv 2508.08011): Llama-3.1-8B -> 48 layers, continued "
     "pretraining, mean of 7 zero-shot accuracies: OpT-DeUS 68.87 > LLaMA Pro 68.56 > "
     "un-expanded base 66.20 > SOLAR-style 64.20"),
     ["aligned", "identity", "base", "solar"]),
    (("LESA (Yang et al., ACL 2025, arXiv 2502.13794): LESA ahead of LLaMA Pro and of "
     "SOLAR-style stacking after continued pretraining"),
     [("lesa", "identity"), ("lesa", "solar")]),
]


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- the recipe, once per seed -----------------------------------------------------------------

def arms_of(stages: dict) -> list[str]:
    """Arm names: the train stages `cpt_<arm>`, in the recipe's order."""
    return [n[len("cpt_"):] for n, s in stages.items() if "train" in s and n.startswith("cpt_")]


def expand(template: dict, seeds: list[int], arms: list[str] | None = None) -> dict:
    """The recipe with its seeded stages repeated per seed (see the module doc)."""
    import copy

    stages = template["stages"]
    arms = arms or arms_of(stages)
    unknown = set(arms) - set(arms_of(stages))
    if unknown:
        raise SystemExit(f"unknown arm(s) {sorted(unknown)}; the recipe has "
                         f"{', '.join(arms_of(stages))}")
    seeded = {n for n, s in stages.items() if "upscale" not in s}
    out: dict = {}
    for seed in seeds:
        def name(n, seed=seed):
            return f"{n}_s{seed}" if n in seeded else n

        for arm in arms:
            train = copy.deepcopy(stages[f"cpt_{arm}"]["train"])
            model = train["model"]
            if model in stages:
                out[model] = copy.deepcopy(stages[model])
            train["args"]["seed"] = SEED0 + seed
            out[name(f"cpt_{arm}")] = {"train": train}
            ev = copy.deepcopy(stages[f"eval_{arm}"]["eval"])
            ev["models"] = [name(m) for m in ev["models"]]
            out[name(f"eval_{arm}")] = {"eval": ev}
    return {**{k: v for k, v in template.items() if k != "stages"}, "stages": out}


def prepare(out: Path, seeds: list[int], arms: list[str] | None) -> Path:
    """OUT with the model link, the data and the expanded recipe; returns the recipe."""
    import yaml

    from solar_merge.demo.data import demo_data
    from solar_merge.embedded import embedded_model
    from solar_merge.tasks import loaders

    out.mkdir(parents=True, exist_ok=True)
    model = embedded_model()
    demo_data(out / "data")
    held = out / "data" / "heldout.jsonl"
    source = loaders.DATA_DIR / "manual_ppl.jsonl"
    if not held.is_file() or held.read_bytes() != source.read_bytes():
        shutil.copyfile(source, held)  # the topics lm-eval's solar_manual_ppl scores
    link = out / BASE
    if link.is_symlink() and link.resolve() != model:
        link.unlink()
    if not link.exists():
        link.symlink_to(model, target_is_directory=True)
    recipe = out / f"{NAME}.yaml"
    expanded = expand(yaml.safe_load(RECIPE.read_text()), seeds, arms)
    head = "".join(line + "\n" for line in RECIPE.read_text().splitlines()
                   if line.startswith("#"))
    recipe.write_text(head + f"# Expanded for seeds {seeds} by benchmarks/upscale_study.py.\n"
                      + yaml.safe_dump(expanded, sort_keys=False, width=100))
    return recipe


def run(recipe: Path, overrides: list[str]) -> dict:
    """`solar-merge run` as its own process, with the load sampled while it runs."""
    samples, stop = [], threading.Event()

    def sample():
        while not stop.wait(30):
            samples.append(load()[0])

    before = load()
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.monotonic()
    command = [sys.executable, "-m", "solar_merge.cli", "run", str(recipe), *overrides]
    log(" ".join(command))
    try:
        subprocess.run(command, check=True)
    finally:
        stop.set()
        thread.join()
    return {"wall_s": round(time.monotonic() - start, 1), "load_before": before,
            "load_after": load(), "load_1min_samples": samples}


# -- reading a finished run ---------------------------------------------------------------------

def train_seconds(stage_dir: Path) -> float | None:
    """Trainer's train_runtime minus the held-out evaluations it ran inside it."""
    rows = [json.loads(x) for x in (stage_dir / "loss.jsonl").read_text().splitlines()
            if x.startswith("{")]
    runtime = [r["train_runtime"] for r in rows if "train_runtime" in r]
    evals = {r["step"]: r["eval_runtime"] for r in rows if "eval_runtime" in r}
    return float(runtime[-1]) - sum(evals.values()) if runtime else None


def _stage_seconds(folder: Path) -> float | None:
    """The wall seconds the recipe recorded in a finished stage's completion marker."""
    from solar_merge.outputs import MARKER

    try:
        return json.loads((folder / MARKER).read_text()).get("seconds")
    except (OSError, ValueError):
        return None


def _eval_limit(folder: Path):
    """lm-eval's `limit` as it ran (its results.json), None: every document."""
    for results in sorted(folder.glob("*/results.json")):
        try:
            return json.loads(results.read_text()).get("config", {}).get("limit")
        except (OSError, ValueError):
            return None
    return None


def collect(out: Path) -> dict:
    """Every finished (arm, seed) in OUT, whichever part of the study ran it: curve, lm-eval,
    times. What a stage ran with (overrides included) is read from its own folder."""
    import yaml

    from solar_merge.curves import eval_curve
    from solar_merge.inits import record_of

    found = {p.name.rpartition("_s")[2] for p in out.glob("cpt_*_s*") if p.is_dir()}
    seeds = sorted(int(s) for s in found if s.isdigit())
    recipe = expand(yaml.safe_load(RECIPE.read_text()), seeds or [0])
    stages = recipe["stages"]
    runs = []
    for name, stage in stages.items():
        if "train" not in stage or not (out / name / "loss.jsonl").is_file():
            continue
        arm, _, seed = name[len("cpt_"):].rpartition("_s")
        train = yaml.safe_load((out / name / "stage_config.yaml").read_text())
        model = stage["train"]["model"]
        up = (stages.get(model) or {}).get("upscale")
        metrics = out / f"eval_{arm}_s{seed}" / "metrics.json"
        word_ppl = None
        if metrics.is_file():
            for values in json.loads(metrics.read_text()).values():
                word_ppl = next((v for k, v in values.items() if "word_perplexity" in k), None)
        record = record_of(out / f"{model}.layers") if up else None
        runs.append({
            "arm": arm, "seed": int(seed), "model": model, "upscale": up,
            "layers": _layers(out / model if up else out / BASE),
            "curve": eval_curve(out / name), "train_s": train_seconds(out / name),
            "args": train["args"], "eval_datasets": train.get("eval_datasets"),
            "lm_eval_word_ppl": word_ppl,
            "prepare_s": _stage_seconds(out / model) if up else None,
            "compute_s": record["seconds"] if record else None,
            "eval_limit": _eval_limit(out / f"eval_{arm}_s{seed}"),
        })
    return {"recipe": recipe, "runs": runs}


def _layers(folder: Path) -> int | None:
    try:
        return json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    except (OSError, ValueError, KeyError):
        return None


# -- statistics -----------------------------------------------------------------------------------

def summary(runs: list[dict]) -> dict:
    """Per arm: per evaluation step and for lm-eval, the per-seed values, mean and spread
    (sample standard deviation; 0 for one seed)."""
    arms: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: (r["arm"], r["seed"])):
        a = arms.setdefault(r["arm"], {"seeds": [], "steps": {}, "lm_eval": {},
                                       "layers": r["layers"], "prepare_s": [], "compute_s": [],
                                       "train_s": []})
        a["seeds"].append(r["seed"])
        for step, ppl in r["curve"]:
            a["steps"].setdefault(step, {})[r["seed"]] = ppl
        if r["lm_eval_word_ppl"] is not None:
            a["lm_eval"][r["seed"]] = r["lm_eval_word_ppl"]
        for key in ("prepare_s", "compute_s", "train_s"):
            if r[key] is not None:
                a[key].append(r[key])
    return arms


def stats(values: dict) -> tuple[float, float, int] | None:
    """(mean, sample standard deviation, n) of {seed: value}."""
    if not values:
        return None
    xs = list(values.values())
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def compare(a: dict, b: dict) -> dict:
    """Arm a against arm b over the seeds both have: the paired differences a - b, and
    whether a is lower beyond the seed spread: lower on every seed, and a paired t-test
    (scipy.stats.ttest_rel) gives p < 0.05. Needs 3 or more common seeds."""
    common = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in common]
    out = {"seeds": len(common), "mean_diff": statistics.fmean(diffs) if diffs else None,
           "p": None, "clear": False}
    if len(common) >= 3:
        from scipy.stats import ttest_rel

        p = ttest_rel([a[s] for s in common], [b[s] for s in common]).pvalue
        out["p"] = None if math.isnan(p) else float(p)
        out["clear"] = out["p"] is not None and out["p"] < 0.05 and (
            all(d < 0 for d in diffs) or all(d > 0 for d in diffs))
    return out


def ranking(arms: dict, key) -> list[dict]:
    """Arms ordered by mean (lowest first), each with how it compares to the next one down."""
    rows = [(name, key(a)) for name, a in arms.items()]
    rows = sorted([(n, v) for n, v in rows if v], key=lambda x: stats(x[1])[0])
    out = []
    for i, (name, values) in enumerate(rows):
        row = {"arm": name, "stats": stats(values)}
        if i + 1 < len(rows):
            row["vs_next"] = {"arm": rows[i + 1][0], **compare(values, rows[i + 1][1])}
        out.append(row)
    return out


def against_published(arms: dict, key) -> list[str]:
    """Each published pairwise order, checked against ours: agrees (beyond the seed spread),
    agrees within the spread, or reversed."""
    lines = []
    for text, order in PUBLISHED:
        pairs = order if isinstance(order[0], tuple) else list(itertools.pairwise(order))
        verdicts = []
        for better, worse in pairs:
            if better not in arms or worse not in arms:
                verdicts.append(f"{LABELS[better]} > {LABELS[worse]}: not run")
                continue
            c = compare(key(arms[better]), key(arms[worse]))
            if c["mean_diff"] is None:
                verdicts.append(f"{LABELS[better]} > {LABELS[worse]}: no common seed")
            elif c["mean_diff"] < 0:
                verdicts.append(f"{LABELS[better]} > {LABELS[worse]}: **agrees**"
                                + (" (beyond the seed spread)" if c["clear"]
                                   else " (within the seed spread)"))
            else:
                verdicts.append(f"{LABELS[better]} > {LABELS[worse]}: **reversed**"
                                + (" (beyond the seed spread)" if c["clear"]
                                   else " (within the seed spread)"))
        lines.append(f"- {text}. Ours: " + "; ".join(verdicts) + ".")
    return lines


# -- the report ---------------------------------------------------------------------------------

def render(data: dict, dest: list[Path]) -> None:
    from solar_merge.curves import forecast_paragraph

    runs = data["runs"]
    arms = summary(runs)
    steps = sorted({s for a in arms.values() for s in a["steps"]})
    last = steps[-1] if steps else None
    shown = [s for s in STEPS if s in steps] or steps[:1]
    if last is not None and last not in shown:
        shown.append(last)
    run_info = data.get("run") or {}
    samples = run_info.get("load_1min_samples") or []
    args = runs[0]["args"] if runs else {}
    held = (runs[0]["eval_datasets"] or [{}])[0] if runs else {}
    seeds = sorted({r["seed"] for r in runs})
    lines = [("# Up-scaling study: SmolLM2-135M-Instruct, 30 -> 36 layers, every initialisation, "
             f"{len(seeds)} seed(s)"), "",
             (f"Command: `{data.get('command', 'python benchmarks/upscale_study.py')}`; date "
             f"{data.get('date', '?')}; machine: {data.get('machine', '?')}; recipe: "
             "training/upscale_study.yaml, expanded per seed."),
             (f"Load average (1/5/15 min) before: {run_info.get('load_before')}, after: "
             f"{run_info.get('load_after')}; 1-min load sampled every 30 s: median "
             f"{_median(samples)}, max {max(samples or [0])}; this run "
             f"{_minutes(run_info.get('wall_s'))} (stages finished earlier were skipped)."), ""]
    if runs:
        lines += [
            (f"Every arm: {args.get('max_steps')} steps of "
            f"{args.get('per_device_train_batch_size')} x 128 tokens of the demo's reference-manual text, AdamW lr "
            f"{args.get('learning_rate')} ({args.get('lr_scheduler_type')}, "
            f"{args.get('warmup_steps')} warm-up steps), fp32, all parameters trained; seeds "
            f"{seeds} (training seed 42 + seed: the data order; each init drawn once, LESA's "
            "predictor and the noise with seed 0). "
            f"Held-out perplexity = exp(TRL's eval_loss) on the first {held.get('max_samples')} "
            f"held-out chunks in 128-token blocks, every {args.get('eval_steps')} steps and at "
            f"step 0; lm-eval = word perplexity of solar_manual_ppl (loglikelihood_rolling) on "
            f"its first {runs[0].get('eval_limit') or 'all'} held-out chunks after training. "
            "Mean ± sample standard deviation over the seeds."), ""]
    head = ["arm", "layers", "seeds", *(f"PPL step {s}" for s in shown), "lm-eval word PPL",
            "prepare s (compute s)", "train s/step"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def final(a):
        return a["steps"].get(last, {})

    order = sorted(arms, key=lambda n: (stats(final(arms[n])) or (1e9,))[0])
    for name in order:
        a = arms[name]
        prep = (f"{statistics.fmean(a['prepare_s']):.0f}" if a["prepare_s"] else "–") + (
            f" ({statistics.fmean(a['compute_s']):.1f})" if a["compute_s"] else "")
        per_step = (statistics.fmean(a["train_s"]) / args["max_steps"]
                    if a["train_s"] and args.get("max_steps") else None)
        lines.append("| " + " | ".join([
            LABELS.get(name, name), str(a["layers"]), str(len(a["seeds"])),
            *(_ms(stats(a["steps"].get(s, {}))) for s in shown), _ms(stats(a["lm_eval"])),
            prep, _f(per_step, 2)]) + " |")
    lines += ["", ("Prepare s: the up-scale stage (new layers computed, then the merge); in "
              "brackets the computing alone (new_layers.json). Train s/step excludes the "
              "held-out evaluations; wall times depend on the load above."), ""]
    for title, key in ((f"held-out perplexity at step {last}", final),
                       ("lm-eval word perplexity", lambda a: a["lm_eval"])):
        rank = ranking(arms, key)
        if not rank:
            continue
        parts = []
        for row in rank:
            mean, sd, _ = row["stats"]
            part = f"{LABELS.get(row['arm'], row['arm'])} {mean:.2f}±{sd:.2f}"
            nxt = row.get("vs_next")
            if nxt:
                sign = "<" if nxt["clear"] else "≈"
                p = f" (p {nxt['p']:.3f})" if nxt["p"] is not None else ""
                part += f" **{sign}**{p}"
            parts.append(part)
        lines.append(f"- **Ranking by {title}**, lowest first (`<`: lower on every seed and "
                     "paired t-test p < 0.05; `≈`: within the seed spread): "
                     + " ".join(parts))
        against = compare_all(arms, key)
        if against:
            lines.append(f"  Beyond the seed spread against the base: {against}.")
    lines += ["", "Published orderings beside ours (by held-out perplexity at the last step):",
              ""]
    lines += against_published(arms, final)
    lines += ["", "## Where growth pays off", ""]
    if "solar" in arms and "base" in arms:
        pooled = {n: [(s, p) for s, by in sorted(arms[n]["steps"].items())
                      for p in by.values()] for n in ("solar", "base")}
        lines += forecast_paragraph(("DUS + CPT", pooled["solar"]), ("base + CPT",
                                                                     pooled["base"]))
        lines += ["", ("(All seeds' points pooled in each fit; the same law for every arm "
                  "against the base is in upscale_study.json.)")]
        data["forecasts"] = forecasts(arms)
    else:
        lines.append("Needs the `solar` and `base` arms.")
    text = "\n".join(lines) + "\n"
    for folder in dest:
        (folder / f"{NAME}.md").write_text(text)
        (folder / f"{NAME}.json").write_text(json.dumps(
            {**data, "summary": arms}, indent=1, default=str) + "\n")
        plot(arms, folder / f"{NAME}.png", last)
    print(text)


def compare_all(arms: dict, key) -> str:
    if "base" not in arms:
        return ""
    out = []
    for name, a in arms.items():
        if name == "base":
            continue
        c = compare(key(a), key(arms["base"]))
        if c["clear"]:
            out.append(f"{LABELS.get(name, name)} {'lower' if c['mean_diff'] < 0 else 'higher'}"
                       f" ({c['mean_diff']:+.2f}, p={c['p']:.3f})")
    return "; ".join(out) or "none"


def forecasts(arms: dict) -> dict:
    from solar_merge.curves import forecast

    def pooled(n):
        return [(s, p) for s, by in sorted(arms[n]["steps"].items()) for p in by.values()]

    out = {}
    for name in arms:
        if name != "base" and "base" in arms:
            f = forecast(pooled(name), pooled("base"))
            out[name] = {"step": f.step, "low": f.low, "high": f.high, "share": f.share,
                         "horizon": f.horizon, "sentence": f.sentence(name, "base")}
    return out


def plot(arms: dict, path: Path, last) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.6), dpi=110,
                                 gridspec_kw={"width_ratios": [3, 2]})
    order = sorted(arms, key=lambda n: (stats(arms[n]["steps"].get(last, {})) or (1e9,))[0])
    for i, name in enumerate(order):
        a = arms[name]
        xs = sorted(a["steps"])
        means = [stats(a["steps"][s])[0] for s in xs]
        color = f"C{i % 10}"
        style = ":" if name == "base" else "-"
        ax.plot(xs, means, style, marker="o", ms=3, color=color, label=LABELS.get(name, name))
        ax.fill_between(xs, [min(a["steps"][s].values()) for s in xs],
                        [max(a["steps"][s].values()) for s in xs], color=color, alpha=0.15)
        ys = list(a["steps"].get(last, {}).values())
        bx.scatter(ys, [i] * len(ys), color=color, s=18)
        if ys:
            bx.plot([statistics.fmean(ys)] * 2, [i - 0.3, i + 0.3], color=color, lw=2)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("training step (4 x 128 tokens each)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("mean over seeds; band: min-max", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    bx.set_yticks(range(len(order)), [LABELS.get(n, n) for n in order], fontsize=7)
    bx.invert_yaxis()
    bx.set_xlabel(f"held-out perplexity at step {last} (dots: seeds; bar: mean)")
    bx.grid(alpha=0.3, axis="x")
    fig.suptitle("SmolLM2-135M up-scaled to 36 layers, same continued pretraining", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _ms(s) -> str:
    return "–" if s is None else f"{s[0]:.2f} ± {s[1]:.2f}"


def _f(v, digits=2):
    return "–" if v is None else f"{v:.{digits}f}"


def _median(values):
    if not values:
        return None
    values = sorted(values)
    return values[len(values) // 2]


def _minutes(seconds):
    return "?" if seconds is None else f"{int(seconds // 60)} min {int(seconds % 60)} s"


def machine() -> str:
    import platform

    cores = os.cpu_count()
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.machine())
    return f"{cores} cores ({cpu}), {ram:.1f} GiB, no GPU"


# -- what one training step costs, by which layers train ----------------------------------------

TIMED = [("base, all layers", BASE, False), ("identity, all layers", "identity", False),
         ("identity, new only", "identity", True)]


def step_times(out: Path, rounds: int = 3) -> dict:
    """Seconds per training step (forward, backward, AdamW update; 4 x 128 tokens of the
    training text) of the base and the identity-block model, trained whole or only in its new
    layers. The arms take turns, one step each, `rounds` times (median kept), so that load from
    other jobs falls on all of them alike."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_merge.stages.models import freeze_except_layers
    from solar_merge.upscale import new_layers_of

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(out / BASE)
    ids = tok((out / "data" / "cpt_train.txt").read_text()[:20_000],
              return_tensors="pt").input_ids[0][: 4 * 128].reshape(4, 128)
    arms = []
    for label, folder, new_only in TIMED:
        model = AutoModelForCausalLM.from_pretrained(out / folder, dtype=torch.float32)
        freeze_except_layers(model, new_layers_of(out / folder) if new_only else None)
        params = [p for p in model.parameters() if p.requires_grad]
        arms.append((label, model, torch.optim.AdamW(params, lr=1e-6),
                     sum(p.numel() for p in params)))
    times = {label: [] for label, *_ in arms}
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for label, model, optimizer, _n in arms:
            start = time.perf_counter()
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            times[label].append(time.perf_counter() - start)
    return {label: {"s_per_step": round(statistics.median(times[label][1:]), 2),
                    "trainable_params": n, "samples": [round(t, 2) for t in times[label]]}
            for label, _m, _o, n in arms}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/upscale_study")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--arms", help="comma-separated arms (default: all of the recipe's)")
    parser.add_argument("--steps", type=int, help="override max_steps of every arm")
    parser.add_argument("--eval-steps", type=int, help="override eval_steps of every arm")
    parser.add_argument("--limit", type=int, help="override lm-eval's documents per arm")
    parser.add_argument("--render", action="store_true", help="only re-write the report")
    parser.add_argument("--timing", action="store_true",
                        help="measure seconds per step by trained layers (after a run of "
                             "seed 0's base and identity arms)")
    parser.add_argument("overrides", nargs="*", help="more recipe key=value overrides")
    a = parser.parse_args()
    out = Path(a.out).absolute()
    saved = out / f"{NAME}.json"
    full = not (a.steps or a.eval_steps or a.limit or a.overrides)
    if a.render or a.timing:
        data = json.loads(saved.read_text()) if saved.is_file() else {}
        data.update(collect(out))
        if a.timing:
            before = load()
            data["step_times"] = step_times(out)
            data["timing_note"] = (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, load average "
                                   f"{before} before, {load()} after")
        render(data, [out, HERE] if data.get("full") else [out])
        return
    seeds = [int(s) for s in a.seeds.split(",")]
    arms = a.arms.split(",") if a.arms else None
    recipe = prepare(out, seeds, arms)
    import yaml

    stages = yaml.safe_load(recipe.read_text())["stages"]
    overrides = list(a.overrides)
    for key, value in (("max_steps", a.steps), ("eval_steps", a.eval_steps)):
        if value is not None:
            overrides += [f"stages.{n}.train.args.{key}={value}" for n, s in stages.items()
                          if "train" in s]
    if a.limit is not None:
        overrides += [f"stages.{n}.eval.limit={a.limit}" for n, s in stages.items()
                      if "eval" in s]
    command = "python benchmarks/upscale_study.py " + " ".join(sys.argv[1:])
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    info = run(recipe, overrides)
    data = {"command": command.strip(), "date": date, "machine": machine(), "run": info,
            "overrides": overrides, "full": full, **collect(out)}
    render(data, [out, HERE] if full else [out])


if __name__ == "__main__":
    main()
