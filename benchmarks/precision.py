"""What a 16-bit format costs on this CPU when it is not computed natively: a Linear(2048, 2048)
forward + backward on 512 rows, in fp32 and under torch.autocast("cpu", bf16 / fp16), with the
CPU model, its flags and what `precision: auto` chooses here (solar_merge.precision). Twice:
with the input's gradient (a layer inside a network) and without it (the first layer), since
the backward's matmul for the input's gradient takes a far slower path in bf16 here.

    python benchmarks/precision.py [--repeats 3] [--json benchmarks/precision.json]

Prints one Markdown section (benchmarks/results.md keeps the latest) and the median seconds of
each format; the slowdown that solar_merge.precision's warning names comes from here.
"""

import argparse
import json
import platform
import statistics
import time
from pathlib import Path


def step(torch, layer, x, dtype) -> float:
    """Seconds of one forward + backward, under autocast to `dtype` (None: plain fp32)."""
    layer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    if dtype is None:
        layer(x).sum().backward()
    else:
        with torch.autocast("cpu", dtype=dtype):
            out = layer(x)
        out.float().sum().backward()
    return time.perf_counter() - start


def measure(repeats: int) -> dict:
    import torch

    from solar_merge.precision import cpu_flags, cpu_name, decide

    torch.manual_seed(0)
    layer = torch.nn.Linear(2048, 2048)
    formats = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    seconds = {}
    for case, grad in (("input_grad", True), ("no_input_grad", False)):
        x = torch.randn(512, 2048, requires_grad=grad)
        for name, dtype in formats.items():
            step(torch, layer, x, dtype)  # warm-up: oneDNN builds its kernels on the first call
            seconds[f"{name} {case}"] = statistics.median(
                step(torch, layer, x, dtype) for _ in range(repeats))
    decision = decide("auto")
    return {"cpu": cpu_name(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "repeats": repeats, "seconds": seconds,
            "slowdown": {k: v / seconds["fp32 " + k.split()[1]] for k, v in seconds.items()},
            "auto": {"precision": decision.precision, "reason": decision.reason}}


def markdown(r: dict) -> str:
    s, x = r["seconds"], r["slowdown"]
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in r["cpu_flags"].items())
    return "\n".join([
        "## Precision: 16-bit formats on this CPU", "",
        (f"`python benchmarks/precision.py --repeats {r['repeats']}` (also `benchmarks/run.py "
         f"--only precision`) on {r['cpu']} ({flags}; oneDNN bf16 {r['onednn_bf16']}), "
         f"{r['threads']} torch threads, torch {r['torch']}: a `Linear(2048, 2048)` forward + "
         f"backward on 512 rows, median of {r['repeats']} after a warm-up."), "",
        "| format | with the input's gradient: s | × fp32 | without it: s | × fp32 |",
        "|---|---|---|---|---|",
        *(f"| {name} | {s[name + ' input_grad']:.3f} | {x[name + ' input_grad']:.0f} | "
          f"{s[name + ' no_input_grad']:.3f} | {x[name + ' no_input_grad']:.0f} |"
          for name in ("fp32", "bf16", "fp16")), "",
        f"`precision: auto` here: {r['auto']['precision']} ({r['auto']['reason']}).", ""])


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write the measurement here")
    a = ap.parse_args()
    result = measure(a.repeats)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
