"""How long our lm-eval tasks take on SmolLM2 (the demo's sizes), and the numbers they give:

    python benchmarks/eval/lm_eval_tasks.py [--threads N] [--batch-size B]

One process; the model is the embedded SmolLM2-135M-Instruct (solar_merge.embedded.embedded_model).
Each row is one `solar_merge.eval.evaluate` call on one task (a fresh model load each time, as
the demo's eval stages do per model), wall time by perf_counter, the machine's 1-minute load
average before and after: the machine is shared, so compare rows of one run only.
"""
import argparse
import os
import sys
import tempfile
import time

parser = argparse.ArgumentParser()
parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
parser.add_argument("--batch-size", type=int, default=8)
args = parser.parse_args()

t0 = time.perf_counter()
import torch

from solar_merge import eval as lm
from solar_merge.embedded import embedded_model

if args.threads:
    torch.set_num_threads(args.threads)
model = embedded_model()
print(f"imports {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}; "
      f"python {sys.version.split()[0]}", flush=True)
# the demo's sizes (training/smollm2_demo.yaml): eval_text limit 4, eval_chat limit 16
rows = [("solar_manual_ppl", 4), ("solar_manual_qa", 16), ("solar_arith", 16),
        ("solar_manual_ppl,solar_manual_qa,solar_arith", None)]
print("| tasks | limit | wall s | load before | load after | metrics |")
print("|---|---:|---:|---:|---:|---|")
for tasks, limit in rows:
    with tempfile.TemporaryDirectory() as tmp:
        before = os.getloadavg()[0]
        t = time.perf_counter()
        res = lm.evaluate([model], tasks, out=f"{tmp}/out", limit=limit or 16,
                          batch_size=args.batch_size, device="cpu")
        wall = time.perf_counter() - t
        row = lm.table(res)[model.name]
    shown = ", ".join(f"{k.replace(',none', '')} {v:.4g}" for k, v in row.items())
    print(f"| {tasks} | {limit or 16} | {wall:.1f} | {before:.2f} | {os.getloadavg()[0]:.2f} "
          f"| {shown} |", flush=True)
