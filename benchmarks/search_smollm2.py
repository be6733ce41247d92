"""A search on the embedded SmolLM2-135M-Instruct: SOLAR's cut m and the candidates' merge
weight, scored by our offline lm-eval tasks, sized for 15 minutes on 2 cores; its best
against the hand-chosen default (m = n/4 = 8 of 30 layers, weights 0.4/0.6).

    python benchmarks/search_smollm2.py [--trials 16] [--timeout 780] [--limit 24]

The two candidates: SmolLM2-135M-Instruct itself and the same model after --cpt-steps steps of
continued pretraining on the demo's reference-manual text (solar_merge.demo.data, none of the
tasks' held-out topics), built once into benchmarks/cache/ (its time is reported apart). Each
trial is one mergekit config: both candidates up-scaled by SOLAR's DUS with drop m in [4, 12]
and merged layer by layer with the CPT candidate's weight w in [0, 1] (the instruct model's:
1 - w); trial 0 is the default m = 8, w = 0.6. Scored by lm-eval on solar_manual_ppl
(held-out perplexity, which decides) and solar_manual_qa, --limit documents each.

`--timeout` stops starting trials after that many seconds, so the search ends within the
timeout plus one trial. Writes benchmarks/search_smollm2.json and .md (command, date, CPU,
every trial, best against default); the search folder (report.md, progress.png,
importance.png, best/) stays in benchmarks/cache/search_smollm2/.
"""

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"


def candidates(steps: int) -> tuple[str, str, float]:
    """(instruct model, its CPT copy, seconds the CPT took now: 0 when cached)."""
    from solar_merge.demo.data import demo_data
    from solar_merge.embedded import embedded_model
    from solar_merge.outputs import is_complete
    from solar_merge.stages import resolve, stage_hash, train

    base = str(embedded_model())
    data = demo_data(CACHE / "search_smollm2_data")
    config = {"stage": "cpt", "model": base, "seq_len": 128,
              "datasets": [{"path": str(data["cpt_train"]), "format": "text"}],
              "args": {"learning_rate": 1.0e-4, "lr_scheduler_type": "cosine",
                       "warmup_steps": 2, "max_steps": steps, "optim": "adafactor",
                       "per_device_train_batch_size": 4, "logging_steps": 1,
                       "save_steps": steps, "seed": 42}}
    out = CACHE / f"smollm2-cpt{steps}"
    cached = is_complete(out, stage_hash(resolve(config)))
    start = time.time()
    train(config, out)
    return base, str(out), 0.0 if cached else time.time() - start


def cpu() -> dict:
    from solar_merge.precision import cpu_flags, cpu_name

    return {"model": cpu_name(), "cores": os.cpu_count(),
            "flags": sorted(k for k, v in cpu_flags().items() if v)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=780, help="seconds (default 780)")
    ap.add_argument("--limit", type=int, default=24, help="documents per task (default 24)")
    ap.add_argument("--cpt-steps", type=int, default=16)
    ap.add_argument("--out", type=Path, default=CACHE / "search_smollm2")
    ap.add_argument("--json", type=Path, default=HERE / "search_smollm2.json")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    base, cpt, cpt_seconds = candidates(args.cpt_steps)
    args.out.mkdir(parents=True, exist_ok=True)
    space = args.out.parent / f"{args.out.name}.yaml"
    space.write_text(
        f"# python benchmarks/search_smollm2.py (writes this file and runs it):\n"
        f"# solar-merge search {space.name} -o {args.out.name} --trials {args.trials} "
        f"--timeout {args.timeout:g}\n" + yaml.safe_dump({
            "candidates": [base, cpt], "layout": {"drop": {"low": 4, "high": 12}},
            "merge": {"method": "solar_average", "weight": {"low": 0.0, "high": 1.0}},
            "score": {"tasks": ["solar_manual_ppl", "solar_manual_qa"],
                      "metric": "word_perplexity", "limit": args.limit},
            "study": "search_smollm2", "sampler": {"name": "tpe", "seed": 0,
                                                   "n_startup_trials": 4}}, sort_keys=False))
    command = [sys.executable, "-m", "solar_merge", "search", str(space), "-o", str(args.out),
               "--trials", str(args.trials), "--timeout", f"{args.timeout:g}"]
    start = time.time()
    subprocess.run(command, check=True)
    wall = time.time() - start

    import optuna

    study = optuna.load_study(study_name="search_smollm2",
                              storage=f"sqlite:///{args.out / 'study.db'}")
    rows = [{"trial": t.number, "state": t.state.name.lower(), "params": t.params,
             "default": bool(t.user_attrs.get("default")),
             "metrics": t.user_attrs.get("metrics", {}),
             "seconds": round((t.datetime_complete - t.datetime_start).total_seconds(), 1)
             if t.datetime_complete else None} for t in study.get_trials()]
    best = study.best_trial
    default = next(r for r in rows if r["default"])
    result = {"command": " ".join(["python", *sys.argv]), "search_command": " ".join(
                  ["solar-merge", *command[3:]]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "cpu": cpu(), "load_at_start": load, "cpt_seconds": round(cpt_seconds, 1),
              "search_wall_s": round(wall, 1), "metric": study.user_attrs.get("metric"),
              "best": {"trial": best.number, "value": best.value, "params": best.params},
              "default": {"trial": default["trial"], "params": default["params"],
                          "metrics": default["metrics"]},
              "trials": rows}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    metric = result["metric"]
    lines = ["# Search on SmolLM2-135M-Instruct: cut m and merge weight", "",
             (f"`{result['command']}` on {result['date']} ({result['cpu']['model']}, "
             f"{result['cpu']['cores']} cores, load {load:.1f} at start): the search took "
             f"{wall / 60:.1f} min ({len(rows)} trials), the CPT candidate "
             f"{cpt_seconds:.0f} s (0: cached)."), "",
             f"| | trial | m | w (CPT candidate) | {metric} | solar_manual_qa acc_norm |",
             "|---|---:|---:|---:|---:|---:|"]
    for label, trial in (("best", next(r for r in rows if r["trial"] == best.number)),
                         ("default", default)):
        m = trial["metrics"]
        lines.append(f"| {label} | {trial['trial']} | {trial['params'].get('drop')} | "
                     f"{trial['params'].get('weight', 0):.3f} | {m.get(metric, float('nan')):.3f}"
                     f" | {m.get('solar_manual_qa acc_norm,none', float('nan')):.3f} |")
    # the search's own report (every trial, progress and importance plots) kept beside this
    kept = args.json.with_suffix("")
    kept.mkdir(exist_ok=True)
    for name in ("report.md", "progress.png", "importance.png"):
        if (args.out / name).is_file():
            shutil.copy2(args.out / name, kept / name)
    lines += ["", (f"Every trial, the search's progress and each parameter's importance: "
                   f"[{kept.name}/report.md]({kept.name}/report.md) (the search folder: "
                   f"{args.out}).")]
    args.json.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
