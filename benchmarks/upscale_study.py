#!/usr/bin/env python
"""The up-scaling study (issue 19): every up-scaling method at 40 layers, same CPT, curves.

    python benchmarks/upscale_study.py [--out runs/upscale_study] [--steps N] [--eval-steps K]
    python benchmarks/upscale_study.py --render       # re-write the report from a finished run
    python benchmarks/upscale_study.py --timing       # + seconds per step by trained layers

Prepares OUT (a link to the embedded SmolLM2-135M-Instruct, the demo's training text, the
shipped held-out topics as data/heldout.jsonl, a copy of training/upscale_study.yaml), runs the
recipe with `solar-merge run OUT/upscale_study.yaml` (finished stages are skipped on a re-run)
and writes, in OUT and in benchmarks/:

    upscale_study.md    the table (perplexity at step 0, at the first evaluation, at the end;
                        lm-eval's word perplexity at the end; training time), the rankings at
                        the first evaluation and at the end, the command, date, machine, load
    upscale_study.png   one plot: every held-out perplexity curve
    upscale_study.json  every number above, and every curve point

The load average is sampled every 30 s while the recipe runs (2 shared cores: a busy machine
slows every arm, and the timings with it; the perplexities do not depend on it).
"""

import argparse
import datetime
import json
import math
import os
import shutil
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


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- preparing and running -------------------------------------------------------------------

def prepare(out: Path) -> Path:
    """OUT with the model link, the data and the recipe; returns the recipe copy."""
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
    recipe.write_text(RECIPE.read_text())
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


# -- reading a finished run ------------------------------------------------------------------

def curve(stage_dir: Path) -> list[tuple[int, float]]:
    """(step, held-out perplexity = exp(eval_loss)) from TRL's log; the last value of a step
    wins (a resumed run logs a step twice)."""
    by_step = {}
    log_file = stage_dir / "loss.jsonl"
    for line in log_file.read_text().splitlines() if log_file.is_file() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "eval_loss" in row:
            by_step[int(row["step"])] = math.exp(float(row["eval_loss"]))
    return sorted(by_step.items())


def train_seconds(stage_dir: Path) -> float | None:
    """Trainer's train_runtime minus the held-out evaluations it ran inside it."""
    rows = [json.loads(x) for x in (stage_dir / "loss.jsonl").read_text().splitlines()
            if x.startswith("{")]
    runtime = [r["train_runtime"] for r in rows if "train_runtime" in r]
    evals = {r["step"]: r["eval_runtime"] for r in rows if "eval_runtime" in r}
    return float(runtime[-1]) - sum(evals.values()) if runtime else None


def collect(out: Path) -> dict:
    import yaml

    from solar_merge.checkpoints import model_info

    recipe = yaml.safe_load((out / f"{NAME}.yaml").read_text())
    stages = recipe["stages"]
    lm_eval = {}
    metrics = out / "eval_final" / "metrics.json"
    if metrics.is_file():
        for label, values in json.loads(metrics.read_text()).items():
            for key, value in values.items():
                if key.startswith("solar_manual_ppl") and "word_perplexity" in key:
                    lm_eval[label] = value
    arms = {}
    for name, stage in stages.items():
        train = stage.get("train")
        if not train or not (out / name / "loss.jsonl").is_file():
            continue
        model = train["model"]
        info = model_info(str(out / name))
        up = (stages.get(model) or {}).get("upscale")
        points = curve(out / name)
        seconds = train_seconds(out / name)
        ran = yaml.safe_load((out / name / "stage_config.yaml").read_text())  # overrides in
        steps = ran["args"]["max_steps"]
        new = ran.get("trainable_layers")
        arms[name] = {
            "model": model, "upscale": up, "layers": info.n_layers, "params": info.params,
            "trainable": f"new layers {new}" if new else "all", "args": ran["args"],
            "eval_datasets": ran.get("eval_datasets"),
            "curve": points, "train_s": seconds,
            "s_per_step": round(seconds / steps, 2) if seconds else None,
            "lm_eval_word_ppl": lm_eval.get(name),
        }
    return {"recipe": recipe, "arms": arms}


# -- what one training step costs, by where the trained layers sit ---------------------------

TIMED = [("base, all layers", BASE, False), ("pro (interleaved), all layers", "pro", False),
         ("pro (interleaved), new only", "pro", True), ("pro_top, all layers", "pro_top", False),
         ("pro_top, new only", "pro_top", True)]


def step_times(out: Path, rounds: int = 3) -> dict:
    """Seconds per training step (forward, backward, AdamW update; 4 x 128 tokens of the
    training text) of the base and the identity-block models, trained whole or only in their
    new layers. The arms take turns, one step each, `rounds` times (median kept), so that load
    from other jobs falls on all of them alike: the ratios hold where the study's wall times
    (each arm alone, minutes apart) do not."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_merge.stages.common import freeze_except_layers
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


# -- the report ------------------------------------------------------------------------------

def ranking(arms: dict, step: int) -> list[tuple[str, float]]:
    at = {n: dict(a["curve"]).get(step) for n, a in arms.items()}
    return sorted(((n, v) for n, v in at.items() if v is not None), key=lambda x: x[1])


def render(data: dict, dest: list[Path]) -> None:
    arms = data["arms"]
    steps = sorted({s for a in arms.values() for s, _ in a["curve"]})
    first = next((s for s in steps if s > 0), None)
    last = steps[-1] if steps else None
    run_info = data.get("run") or {}
    samples = run_info.get("load_1min_samples") or []
    train = data["recipe"]["stages"]["cpt_base"]["train"]
    args = next(iter(arms.values()))["args"] if arms else train["args"]  # as run
    held = (next(iter(arms.values()))["eval_datasets"] or [{}])[0] if arms else {}
    command = data.get("command", "python benchmarks/upscale_study.py")
    title = "# Up-scaling study: SmolLM2-135M-Instruct, 30 -> 40 layers, same continued pretraining"
    when = (f"Command: `{command}`; date {data.get('date', '?')}; machine: "
            f"{data.get('machine', '?')}; recipe: training/upscale_study.yaml.")
    busy = (f"Load average (1/5/15 min) before: {run_info.get('load_before')}, after: "
            f"{run_info.get('load_after')}; 1-min load sampled every 30 s during the run: "
            f"median {_median(samples)}, max {max(samples or [0])}; whole run "
            f"{_minutes(run_info.get('wall_s'))}.")
    setup = (f"Every arm: {args['max_steps']} steps of {args['per_device_train_batch_size']} x "
             f"{train['seq_len']} tokens of the demo's reference-manual text, AdamW lr "
             f"{args['learning_rate']} ({args['lr_scheduler_type']}, {args['warmup_steps']} "
             f"warm-up steps), seed {args['seed']}, fp32. Held-out perplexity = exp(TRL's "
             f"eval_loss) on the first {held.get('max_samples')} held-out chunks (~1,200 "
             f"characters each) packed in {train['seq_len']}-token blocks, every "
             f"{args['eval_steps']} steps and at step 0; lm-eval = word perplexity of "
             "solar_manual_ppl (all held-out topics, loglikelihood_rolling) after training.")
    lines = [title, "", when, busy, "", setup, ""]
    head = ["arm", "layers", "params", "trains", "PPL step 0", f"PPL step {first}",
            f"PPL step {last}", "lm-eval word PPL", "train s (no evals)", "s/step"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, a in sorted(arms.items(), key=lambda x: dict(x[1]["curve"]).get(last, 1e9)):
        c = dict(a["curve"])
        lines.append("| " + " | ".join([
            name, str(a["layers"]), f"{a['params'] / 1e6:.1f}M",
            "all" if a["trainable"] == "all" else "new only",
            _f(c.get(0)), _f(c.get(first)), _f(c.get(last)), _f(a["lm_eval_word_ppl"]),
            _f(a["train_s"], 0), _f(a["s_per_step"], 2)]) + " |")
    lines.append("")
    for label, step in (("step 0 (before training)", 0), (f"the first evaluation (step {first})",
                                                           first), (f"the end (step {last})",
                                                                    last)):
        order = ranking(arms, step)
        lines.append(f"- Ranking at {label}, lowest perplexity first: "
                     + ", ".join(f"{n} {v:.2f}" for n, v in order) + ".")
    lm = sorted(((n, a["lm_eval_word_ppl"]) for n, a in arms.items()
                 if a["lm_eval_word_ppl"] is not None), key=lambda x: x[1])
    if lm:
        lines.append("- Ranking by lm-eval word perplexity at the end: "
                     + ", ".join(f"{n} {v:.2f}" for n, v in lm) + ".")
    timing = data.get("step_times")
    if timing:
        base = timing["base, all layers"]["s_per_step"]
        lines += ["", f"Seconds per training step, arms taking turns ({data.get('timing_note')}):",
                  "", "| model, trained layers | trainable params | s/step | vs base |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['trainable_params'] / 1e6:.1f}M | {v['s_per_step']:.2f} | "
                  f"{v['s_per_step'] / base:.2f}x |" for k, v in timing.items()]
    text = "\n".join(lines) + "\n"
    for folder in dest:
        (folder / f"{NAME}.md").write_text(text)
        (folder / f"{NAME}.json").write_text(json.dumps(data, indent=1, default=str) + "\n")
        plot(arms, folder / f"{NAME}.png")
    print(text)


def plot(arms: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 5), dpi=110)
    for name, a in sorted(arms.items()):
        if not a["curve"]:
            continue
        steps, ppl = zip(*a["curve"])
        style = "--" if a["trainable"] != "all" else "-"
        style = ":" if name == "cpt_base" else style
        ax.plot(steps, ppl, style, marker="o", markersize=3,
                label=f"{name} ({a['layers']} layers)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("training step (4 x 128 tokens each)")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("SmolLM2-135M up-scaled to 40 layers: continued pretraining")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    return f"{cores} cores, {ram:.1f} GiB, {platform.machine()}, no GPU"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/upscale_study")
    parser.add_argument("--steps", type=int, help="override max_steps of every arm")
    parser.add_argument("--eval-steps", type=int, help="override eval_steps of every arm")
    parser.add_argument("--render", action="store_true", help="only re-write the report")
    parser.add_argument("--timing", action="store_true",
                        help="measure seconds per step by trained layers (after a run)")
    parser.add_argument("overrides", nargs="*", help="more recipe key=value overrides")
    a = parser.parse_args()
    out = Path(a.out).absolute()
    saved = out / f"{NAME}.json"
    if a.render or a.timing:
        data = json.loads(saved.read_text())
        data.update(collect(out))
        if a.timing:
            before = load()
            data["step_times"] = step_times(out)
            data["timing_note"] = (f"{datetime.datetime.now():%Y-%m-%d %H:%M}, load average "
                                   f"{before} before, {load()} after; `python "
                                   "benchmarks/upscale_study.py --timing`")
        render(data, [out, HERE])
        return
    recipe = prepare(out)
    import yaml

    trains = [n for n, s in yaml.safe_load(recipe.read_text())["stages"].items() if "train" in s]
    overrides = list(a.overrides)
    for key, value in (("max_steps", a.steps), ("eval_steps", a.eval_steps)):
        if value is not None:
            overrides += [f"stages.{n}.train.args.{key}={value}" for n in trains]
    command = "python benchmarks/upscale_study.py " + " ".join(sys.argv[1:])
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    info = run(recipe, overrides)
    data = {"command": command.strip(), "date": date, "machine": machine(), "run": info,
            "overrides": overrides, **collect(out)}
    render(data, [out, HERE] if not overrides else [out])


if __name__ == "__main__":
    main()
