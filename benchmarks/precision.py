"""What a 16-bit format costs on this CPU when it is not computed natively: a Linear(2048, 2048)
forward + backward on 512 rows, in fp32 and under torch.autocast("cpu", bf16 / fp16), with the
CPU model, its flags and what `precision: auto` chooses here (solar_merge.precision). Twice:
with the input's gradient (a layer inside a network) and without it (the first layer), since
the backward's matmul for the input's gradient takes a far slower path in bf16 here.

    python benchmarks/precision.py [--repeats 3] [--threads N] [--json FILE]

Prints one Markdown section (`benchmarks/run.py --only precision` puts it in results.md): the
median wall seconds of each format and the process's CPU seconds (all threads; steadier than
wall time on a shared machine). The slowdown solar_merge.precision's warning names comes from
here.
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path


def step(torch, layer, x, dtype) -> tuple[float, float]:
    """(wall, CPU) seconds of one forward + backward under autocast to `dtype` (None: fp32)."""
    layer.zero_grad(set_to_none=True)
    wall, cpu = time.perf_counter(), time.process_time()
    if dtype is None:
        layer(x).sum().backward()
    else:
        with torch.autocast("cpu", dtype=dtype):
            out = layer(x)
        out.float().sum().backward()
    return time.perf_counter() - wall, time.process_time() - cpu


def measure(repeats: int, threads: int | None = None) -> dict:
    import torch

    from solar_merge.precision import cpu_flags, cpu_name, decide

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    layer = torch.nn.Linear(2048, 2048)
    formats = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    load_before = os.getloadavg()[0]
    wall, cpu = {}, {}
    for case, grad in (("input_grad", True), ("no_input_grad", False)):
        x = torch.randn(512, 2048, requires_grad=grad)
        for name, dtype in formats.items():
            step(torch, layer, x, dtype)  # warm-up: oneDNN builds its kernels on the first call
            runs = [step(torch, layer, x, dtype) for _ in range(repeats)]
            wall[f"{name} {case}"] = statistics.median(w for w, _ in runs)
            cpu[f"{name} {case}"] = statistics.median(c for _, c in runs)
    decision = decide("auto")
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "repeats": repeats, "seconds": wall, "cpu_seconds": cpu,
            "slowdown": {k: v / wall["fp32 " + k.split()[1]] for k, v in wall.items()},
            "cpu_slowdown": {k: v / cpu["fp32 " + k.split()[1]] for k, v in cpu.items()},
            "loadavg_1m_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "auto": {"precision": decision.precision, "reason": decision.reason}}


def markdown(r: dict) -> str:
    w, c, x, xc = r["seconds"], r["cpu_seconds"], r["slowdown"], r["cpu_slowdown"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["cpu_flags"].items())
    rows = [f"| {name} | {w[name + ' input_grad']:.3f} | {x[name + ' input_grad']:.0f} | "
            f"{c[name + ' input_grad']:.3f} | {xc[name + ' input_grad']:.0f} | "
            f"{w[name + ' no_input_grad']:.3f} | {x[name + ' no_input_grad']:.0f} |"
            for name in ("fp32", "bf16", "fp16")]
    return "\n".join([
        "## Precision: 16-bit formats on this CPU", "",
        (f"`python benchmarks/precision.py --repeats {r['repeats']} --threads {r['threads']}` "
         f"on {r['date']} (load average {r['loadavg_1m_before_after']} before/after) on "
         f"{r['cpu']} ({flags}; oneDNN bf16 {r['onednn_bf16']}), torch {r['torch']}: a "
         "`Linear(2048, 2048)` forward + backward on 512 rows, fp32 against "
         "`torch.autocast(\"cpu\", dtype)`, median of "
         f"{r['repeats']} after a warm-up; CPU s: the process's CPU time, all threads."), "",
        ("| format | with the input's gradient: wall s | × fp32 | CPU s | × fp32 | "
         "without it: wall s | × fp32 |"),
        "|---|---|---|---|---|---|---|", *rows, "",
        f"`precision: auto` here: {r['auto']['precision']} ({r['auto']['reason']}).", ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    ap.add_argument("--json", type=Path, help="also write the measurement here")
    a = ap.parse_args()
    result = measure(a.repeats, a.threads)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
