#!/usr/bin/env python
"""What LESA costs, measured on SmolLM2-135M and sized for a 7B model; how well it predicts.

    python benchmarks/lesa_cost.py [--held-out 15] [--threads N] [--types k_proj,v_proj]

On the embedded SmolLM2-135M-Instruct (30 layers): LESA fitted without layer --held-out (the
paper's settings, solar_merge.inits.LESA; all seven matrix types), its seconds (the SVDs timed
on their own, the predictors' training the rest), their floating-point operations
(inits.lesa_cost) and so the rates this CPU reached; then the same operation counts for a
Mistral-7B-shaped model (its config.json's sizes, as the planner counts them:
solar_merge.sizing.Shape) turned into hours at those rates, and the largest memory held at
once. The same fit gives LESA's held-out error: how close its prediction from that layer's
neighbours comes to the real layer, against the neighbours' mean.
--types limits the fit to some matrix types (a quicker measurement: the rates, and so the 7B
estimate for all types, then come from those alone). Writes benchmarks/lesa_cost.md and .json
(command, date, CPU, load).
"""

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Mistral-7B-v0.1's config.json sizes (the planner check in shared/NOTES.md)
SEVEN_B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
           "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
           "tie_word_embeddings": False}


def svd_seconds(weights, types=None) -> float:
    """Seconds of LESA's SVDs over the matrix types (all, or `types`) of all layers."""
    import torch

    total = 0.0
    for suffix in weights.suffixes:
        if types and not any(t in suffix for t in types):
            continue
        mats = [weights.get(f"{weights.prefix}{i}.{suffix}") for i in range(weights.n_layers)]
        if mats[0].ndim == 2:
            start = time.perf_counter()
            torch.linalg.svd(torch.cat([m.float() for m in mats], dim=1), full_matrices=False)
            total += time.perf_counter() - start
    return round(total, 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--held-out", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--types", help="only these matrix types, e.g. k_proj,v_proj")
    a = parser.parse_args()
    import torch

    from solar_merge.embedded import embedded_model
    from solar_merge.inits import LESA, Weights, lesa_cost, lesa_holdout
    from solar_merge.sizing import Shape

    if a.threads:
        torch.set_num_threads(a.threads)
    load_before = os.getloadavg()
    weights = Weights(embedded_model())
    config = weights.config()
    # the held-out fit learns from the other 29 layers: its cost is counted for 29
    small = Shape.from_config({**config, "num_hidden_layers": weights.n_layers - 1})
    types = a.types.split(",") if a.types else None
    svd_s = svd_seconds(weights, types)
    start = time.perf_counter()
    errors = lesa_holdout(weights, a.held_out, types=types)
    holdout_s = round(time.perf_counter() - start, 1)
    measured = {"svd_s": svd_s, "fit_s": round(holdout_s - svd_s, 1)}
    cost_small, cost_7b = lesa_cost(small, types=types), lesa_cost(Shape.from_config(SEVEN_B))
    svd_rate = cost_small["svd_flops"] / measured["svd_s"]
    fit_rate = cost_small["fit_flops"] / measured["fit_s"]
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    data = {"command": "python benchmarks/lesa_cost.py " + " ".join(sys.argv[1:]),
            "date": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "cpu": cpu,
            "threads": torch.get_num_threads(), "load_before": load_before,
            "load_after": os.getloadavg(), "hp": LESA, "smollm2": {**measured, **cost_small},
            "rates": {"svd_flops_per_s": svd_rate, "fit_flops_per_s": fit_rate},
            "seven_b": {**cost_7b, "svd_h": cost_7b["svd_flops"] / svd_rate / 3600,
                        "fit_h": cost_7b["fit_flops"] / fit_rate / 3600},
            "held_out": {"layer": a.held_out, "seconds": holdout_s, "errors": errors}}
    s, b = data["smollm2"], data["seven_b"]
    lines = [
        "# LESA's cost and held-out error", "",
        (f"Command: `{data['command'].strip()}`; date {data['date']}; CPU {cpu}, "
        f"{data['threads']} torch threads; load average {load_before} before, "
        f"{data['load_after']} after. Predictor as in LESA's code: {LESA}."), "",
        "| model | SVD GFLOP | predictor GFLOP | SVD time | predictor time | peak fp32 memory |",
        "|---|---:|---:|---:|---:|---:|",
        (f"| SmolLM2-135M ({', '.join(types) if types else 'all 7 matrix types'}; fit on 29 "
         f"layers), measured | {s['svd_flops'] / 1e9:.0f} | "
        f"{s['fit_flops'] / 1e9:.0f} | {s['svd_s']:.1f} s | {s['fit_s']:.1f} s | "
        f"{s['peak_bytes'] / 2**30:.2f} GiB |"),
        (f"| Mistral-7B shape (all 7 types, 32 layers), estimated at these rates | "
         f"{b['svd_flops'] / 1e9:.0f} | "
        f"{b['fit_flops'] / 1e9:.0f} | {b['svd_h']:.1f} h | {b['fit_h']:.1f} h | "
        f"{b['peak_bytes'] / 2**30:.1f} GiB |"), "",
        (f"Rates reached here: SVD {svd_rate / 1e9:.1f} GFLOP/s, predictor training "
        f"{fit_rate / 1e9:.1f} GFLOP/s (the 7B figures assume the same rates; a GPU runs both "
        "far faster, and the 7B SVDs need the memory shown)."), "",
        (f"Held-out layer {a.held_out} (LESA fitted on the other 29 layers, predicted from layers "
        f"{a.held_out - 1} and {a.held_out + 1}): relative Frobenius error"),
        "", "| matrix | LESA | neighbours' mean |", "|---|---:|---:|"]
    lines += [f"| {k} | {v['lesa']:.4f} | {v['mean']:.4f} |" for k, v in errors.items()]
    text = "\n".join(lines) + "\n"
    (HERE / "lesa_cost.md").write_text(text)
    (HERE / "lesa_cost.json").write_text(json.dumps(data, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    main()
