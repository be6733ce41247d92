"""The long fuzzing run: tests/test_fuzz_*.py under hypothesis' `long` profile.

    python benchmarks/fuzz.py            # all three files (~1 h on 2 busy cores)
    python benchmarks/fuzz.py -k recipes # pytest options pass through: a partial run

Writes benchmarks/fuzz_results.json: one entry per run (command, date, wall time, load,
pytest's summary, inputs tried per entry point) and their totals. A full run starts the file
afresh; a partial run (any option) is added to it. Prints a Markdown table for README.
"""

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = ["tests/test_fuzz_models.py", "tests/test_fuzz_configs.py", "tests/test_fuzz_data.py"]


def main(argv: list[str]) -> int:
    report = ROOT / "benchmarks" / "fuzz_counts.json"
    report.unlink(missing_ok=True)
    # 8 GiB of address space (imports take 2.3): a runaway allocation fails its example with
    # a MemoryError hypothesis reports, instead of the kernel's OOM killer ending the run.
    env = {**os.environ, "SOLAR_MERGE_FUZZ": "long", "SOLAR_MERGE_FUZZ_REPORT": str(report),
           "SOLAR_MERGE_FUZZ_AS_LIMIT": os.environ.get("SOLAR_MERGE_FUZZ_AS_LIMIT", "8")}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore",
               *FILES, *argv]
    load_before = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          check=False)
    wall = time.perf_counter() - start
    counts = json.loads(report.read_text()) if report.is_file() else {}
    report.unlink(missing_ok=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    result = {"command": "SOLAR_MERGE_FUZZ=long " + " ".join(["pytest", *FILES, *argv]),
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "wall_s": round(wall), "load_before": load_before, "load_after": os.getloadavg(),
              "exit_code": proc.returncode, "summary": summary, "inputs_per_entry_point": counts}
    out = ROOT / "benchmarks" / "fuzz_results.json"
    old = json.loads(out.read_text()) if argv and out.is_file() else {"runs": []}
    runs = old.get("runs", [old])  # (a file that holds one run at its top level)
    runs.append(result)
    totals: dict[str, int] = {}
    for run in runs:
        for name, n in run["inputs_per_entry_point"].items():
            totals[name] = totals.get(name, 0) + n
    out.write_text(json.dumps({"runs": runs, "totals": totals}, indent=1) + "\n")
    print("| entry point | inputs tried |\n|---|---:|")
    for name, n in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| `{name}` | {n:,} |")
    print(f"\n{summary}; {wall / 60:.0f} min; load {load_before[0]:.1f} -> "
          f"{result['load_after'][0]:.1f}; {out.relative_to(ROOT)}")
    if proc.returncode:
        print(proc.stdout[-6000:])
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
