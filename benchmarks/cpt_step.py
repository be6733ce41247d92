"""The calibration step: one continued-pretraining step of the demo's up-scaled model, fp32.

    python benchmarks/cpt_step.py [--steps 4] [--json FILE]

The workload every demo figure is scaled by: SmolLM2-135M-Instruct (the embedded model) depth
up-scaled to 44 layers (layers [0, 22) + [8, 30), as the demo's `dus` stage), one optimizer
step on a batch of 4 x 128 tokens of Python's reference manual, fp32, activation checkpointing,
Adafactor (as the Trainer's `optim: adafactor`). A CPU that takes less time for this step than
another runs the demo's fp32 path faster in about the same proportion, so a demo time measured
on one CPU is judged against a budget scaled by this step (12 min x step / 5.7 s, the step the
reference AVX2 EPYC takes when nothing else runs).

Prints one JSON object: the median wall and CPU (all threads) seconds of the timed steps after
one warm-up step (oneDNN builds its kernels on the first), the threads, the CPU model and
flags, what `precision: auto` chooses here, and the 1-minute load average before and after
(on a shared machine the wall time grows with the load; the CPU seconds less so).
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

KEEP, DROP, BATCH, SEQ = 22, 8, 4, 128  # the demo's DUS (m=8 of 30) and CPT batch
REFERENCE_STEP_S = 5.7  # the reference CPU's step (AMD EPYC Zen 3, AVX2, quiet, 2 threads)


def up_scaled(model_dir: Path):
    """The demo's 44-layer DUS model, built in memory from the 30-layer one."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    n = config.num_hidden_layers
    order = list(range(n - DROP)) + list(range(DROP, n))  # copy A's first, copy B's last
    config.num_hidden_layers = len(order)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in order]
    weights = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(str(f)))
    state = {}
    for key, value in weights.items():
        parts = key.split(".")
        if parts[:2] == ["model", "layers"]:
            for new, old in enumerate(order):
                if int(parts[2]) == old:
                    state[".".join(["model", "layers", str(new), *parts[3:]])] = value.clone()
        else:
            state[key] = value
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


def batch(model_dir: Path):
    """4 x 128 tokens of the reference manual (the demo's CPT text)."""
    from pydoc_data.topics import topics

    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("\n\n".join(topics[k] for k in sorted(topics))[:40000])["input_ids"]
    return torch.tensor(ids[: BATCH * SEQ]).view(BATCH, SEQ)


def measure(steps: int = 4, model_dir: Path | None = None) -> dict:
    import torch
    from transformers.optimization import Adafactor

    from solar_merge.embedded import embedded_model
    from solar_merge.precision import cpu_flags, cpu_name, decide

    model_dir = Path(model_dir or embedded_model())
    model = up_scaled(model_dir)
    model.config.use_cache = False
    model.gradient_checkpointing_enable()
    model.train()
    # what the Trainer builds for `optim: adafactor` with a learning rate
    opt = Adafactor(model.parameters(), lr=1e-4, scale_parameter=False, relative_step=False)
    x = batch(model_dir)
    load_before = os.getloadavg()[0]
    runs = []
    for _ in range(steps + 1):
        wall, cpu = time.perf_counter(), time.process_time()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        runs.append((time.perf_counter() - wall, time.process_time() - cpu))
    timed = runs[1:]
    step = statistics.median(w for w, _ in timed)
    decision = decide("auto")
    return {
        "what": (f"one fp32 CPT step of the demo's {len(model.model.layers)}-layer DUS model: "
                 f"{BATCH} x {SEQ} tokens, activation checkpointing, Adafactor"),
        "step_s": round(step, 2), "step_cpu_s": round(statistics.median(c for _, c in timed), 2),
        "steps_timed": len(timed), "warmup_s": round(runs[0][0], 2),
        "all_steps_s": [round(w, 2) for w, _ in runs],
        "threads": torch.get_num_threads(), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
        "precision_auto": decision.precision, "precision_reason": decision.reason,
        "torch": torch.__version__,
        "loadavg_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "reference_step_s": REFERENCE_STEP_S,
        "budget_scale": round(min(step / REFERENCE_STEP_S, 1.0), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="timed steps after the warm-up")
    ap.add_argument("--json", type=Path, help="also write the result here")
    a = ap.parse_args()
    result = measure(a.steps)
    text = json.dumps(result, indent=2)
    if a.json:
        a.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
