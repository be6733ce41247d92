"""benchmarks/gpu_check.py stays alive between GPU visits: its CPU run takes the same steps at a
tiny size, and a device it cannot use fails loudly."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
STEPS = ["build", "dus", "merge", "cpt", "lora_sft", "qlora_sft", "eval", "memory"]


def run_check(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "SOLAR_MERGE_PRECISION"}
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], env=env,
                          check=False, capture_output=True, text=True, timeout=900)


def cpu_precision() -> str:
    """What `precision: auto` must choose on this CPU: bf16 only where it is native."""
    import torch

    flags = set(re.findall(r"\b(avx512_bf16|amx_bf16)\b", Path("/proc/cpuinfo").read_text()))
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() and flags else "fp32"


@pytest.mark.slow
def test_cpu_run_passes_every_step(tmp_path):
    proc = run_check(tmp_path, "--device", "cpu")
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    steps = result["steps"]
    assert list(steps) == STEPS
    assert proc.returncode == 0, f"{result['failed']}:\n{proc.stderr[-3000:]}"
    assert result["failed"] == []
    assert {k: v["status"] for k, v in steps.items() if k != "qlora_sft"} == \
        dict.fromkeys(set(STEPS) - {"qlora_sft"}, "passed")
    assert steps["qlora_sft"]["status"] == "skipped"
    assert "CUDA" in steps["qlora_sft"]["reason"]
    assert all(v["seconds"] >= 0 for v in steps.values())

    assert steps["cpt"]["steps"] == 20
    assert steps["cpt"]["precision"] == steps["cpt"]["expected_precision"] == cpu_precision()
    assert steps["lora_sft"]["max_change_eps"] > 0
    assert steps["dus"]["tensors_checked"] > 0
    for pair in ("solar_average_vs_linear", "solar_slerp_vs_slerp"):
        assert steps["merge"][pair]["max_diff_eps"] <= 2
        assert steps["merge"][pair]["wall_ratio"] > 0
    ppl = steps["eval"]["metrics"]["solar_manual_ppl word_perplexity,none"]
    assert math.isfinite(ppl) and ppl > 1
    assert steps["memory"]["estimate_bytes"] > 0 and steps["memory"]["peak_rss"] > 0
    assert result["machine"]["versions"]["torch"]

    table = proc.stdout
    assert all(re.search(rf"^{name}\s+(passed|skipped)\s", table, re.MULTILINE)
               for name in STEPS)
    assert not (tmp_path / "work").exists()  # models and configs removed unless --keep


def test_a_missing_gpu_fails_and_names_the_step(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_check(tmp_path, "--device", "cuda")
    assert proc.returncode == 1
    assert "FAILED: build" in proc.stderr
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["failed"] == ["build"]
    assert "no CUDA device" in result["steps"]["build"]["error"]
    assert {result["steps"][k]["status"] for k in STEPS[1:]} == {"skipped"}
