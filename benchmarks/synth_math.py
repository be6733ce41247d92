# python benchmarks/synth_math.py [--problems 32] [--batch-size 8] [--threads 1] [--out DIR]
#
# Speed and yield of `solar-merge synth-math` on the embedded SmolLM2-135M-Instruct (greedy):
# problems per minute, kept fraction, tokens/s, with the machine load before and after.
# The seed problems are the demo's arithmetic problems (solar_merge.demo.data.math_problems, seed 0)
# written in GSM8K's layout (step-by-step answer ending in `#### N`), so the figure says
# whether the demo's math sets could come from this command within its time budget.
# Writes benchmarks/synth_math.json (every run appended) and prints a markdown row.
"""Measure solar-merge synth-math on SmolLM2 (never run by the test suite)."""

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent


def seed_file(path: Path, n: int) -> Path:
    from solar_merge.demo.data import math_problems

    _, problems = math_problems(0, n, seed=0)
    with open(path, "w") as f:
        for r in problems:
            steps = r["rephrased_answer"].split(" The answer is")[0]
            f.write(json.dumps({"question": r["question"],
                                "answer": f"{steps}\n#### {r['final']}"}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--problems", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="synth-math-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    seeds = seed_file(work / "seeds.jsonl", args.problems)
    out = work / "out"
    command = ["solar-merge", "synth-math", str(seeds), "-o", str(out),
               "--batch-size", str(args.batch_size)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    load_before = os.getloadavg()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    load_after = os.getloadavg()
    report = json.loads((out / "synth_report.json").read_text())
    row = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(command).replace(str(work), "$WORK"),
        "problems": report["problems"], "kept": report["kept"],
        "kept_fraction": report["kept_fraction"], "dropped": report["dropped"],
        "problems_per_minute": report["problems_per_minute"],
        "tokens_per_second": report["tokens_per_second"],
        "generation_seconds": report["generation_seconds"], "wall_seconds": round(wall, 1),
        "cpu_seconds": round(cpu, 1),  # the whole process, model load included; less load-bound
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in load_after], "cores": os.cpu_count(),
    }
    results = HERE / "synth_math.json"
    runs = json.loads(results.read_text()) if results.is_file() else []
    results.write_text(json.dumps(runs + [row], indent=1) + "\n")
    print(json.dumps(row, indent=1))
    print(f"| {row['problems']} problems, batch {args.batch_size}, threads "
          f"{args.threads or 'default'} | {row['problems_per_minute']} problems/min | "
          f"{100 * row['kept_fraction']:.1f}% kept ({row['kept']}) | "
          f"{row['tokens_per_second']} tokens/s | load {row['load_before'][0]} -> "
          f"{row['load_after'][0]} |")


if __name__ == "__main__":
    sys.exit(main())
