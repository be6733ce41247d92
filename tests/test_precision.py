"""The precision decision (solar_merge/precision.py) over faked devices, the forcing switch
(SOLAR_MERGE_PRECISION, --precision), the emulation warning, and what the stages, eval and
synth-math take from it. A real train stage on this machine: tests/test_stages.py."""

import logging
import subprocess
import sys

import pytest

from solar_merge import precision
from solar_merge.errors import UserError
from solar_merge.precision import ENV, Device, decide

A100 = Device("cuda", "NVIDIA A100", capability=(8, 0))
H100 = Device("cuda", "NVIDIA H100", capability=(9, 0))
V100 = Device("cuda", "Tesla V100", capability=(7, 0))
T4 = Device("cuda", "Tesla T4", capability=(7, 5))
SAPPHIRE = Device("cpu", "Xeon 8480", flags=("avx512_bf16", "amx_bf16", "avx512f", "avx2"),
                  onednn_bf16=True)
SKYLAKE = Device("cpu", "Xeon 6148", flags=("avx512f", "avx2"), onednn_bf16=True)
ZEN3 = Device("cpu", "AMD EPYC", flags=("avx2",), onednn_bf16=False)
GRAVITON3 = Device("cpu", "Neoverse-V1", flags=("bf16", "fphp"), onednn_bf16=True)
MPS = Device("mps", "mps")


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    """No forcing from the caller's environment; every test warns as if first."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(precision, "_warned", set())


@pytest.mark.parametrize("device, training, expected", [
    (A100, True, "bf16"), (H100, True, "bf16"), (V100, True, "fp16"), (T4, True, "fp16"),
    (T4, False, "fp16"), (SAPPHIRE, True, "bf16"), (GRAVITON3, True, "bf16"),
    (SKYLAKE, True, "fp32"), (ZEN3, True, "fp32"), (ZEN3, False, "fp32"), (MPS, True, "fp32"),
])
def test_auto_follows_native_support(device, training, expected):
    d = decide("auto", device, training=training)
    assert (d.precision, d.request) == (expected, "auto")
    assert d.dtype == {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[expected]
    assert d.reason.startswith("auto: ") and str(device) in d.reason


def test_the_reasons_say_why():
    assert "compute capability 7.5" in decide("auto", T4).reason
    assert "loss scaling over fp32 weights" in decide("auto", T4, training=True).reason
    assert "fp16 weights" in decide("auto", T4, training=False).reason
    assert "avx512_bf16/amx_bf16" in decide("auto", SAPPHIRE).reason
    assert "oneDNN reports no bf16" in decide("auto", ZEN3).reason
    assert "no avx512_bf16 or amx_bf16" in decide("auto", SKYLAKE).reason  # oneDNN emulates


@pytest.mark.parametrize("request_", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("device", [A100, T4, SAPPHIRE, ZEN3, MPS])
def test_explicit_requests_are_honoured(request_, device):
    d = decide(request_, device)
    assert (d.precision, d.request) == (request_, request_)
    assert d.reason == f"asked for (precision: {request_})"


def test_emulated_bf16_warns_once_naming_the_slowdown_and_auto(caplog):
    with caplog.at_level(logging.WARNING, logger="solar_merge.precision"):
        for _ in range(3):
            assert decide("bf16", ZEN3).precision == "bf16"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert precision.CPU_SLOWDOWN["bf16"] in warnings[0]
    assert "`precision: auto`" in warnings[0] and "chooses fp32 here" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="solar_merge.precision"):
        decide("bf16", T4)  # another device: its own warning, naming what it would choose
        decide("bf16", SAPPHIRE)
        decide("fp16", A100)
        decide("fp32", ZEN3)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "Tesla T4" in warnings[0] and "chooses fp16" in warnings[0]


def test_the_environment_forces_a_request(monkeypatch):
    monkeypatch.setenv(ENV, "fp32")
    d = decide("bf16", SAPPHIRE)
    assert d.precision == "fp32" and ENV in d.reason
    assert decide("auto", A100).precision == "fp32"
    monkeypatch.setenv(ENV, "auto")
    assert decide("bf16", ZEN3).precision == "fp32"
    monkeypatch.setenv(ENV, "fp16")
    assert precision.requested("auto") == "fp16"
    monkeypatch.setenv(ENV, "bf17")
    with pytest.raises(UserError, match=f"{ENV}: `bf17` is not one of auto, bf16, fp16, fp32"):
        decide("auto", ZEN3)
    monkeypatch.delenv(ENV)
    with pytest.raises(UserError, match="did you mean `fp16`"):
        decide("fp61", ZEN3)


def test_detect_reads_torch(monkeypatch):
    """detect() over torch's answers: a CUDA device's name and capability; on a CPU, oneDNN's
    bf16 and the CPU's flags."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Tesla T4 #{i}")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: (7, 5))
    assert precision.detect() == Device("cuda", "Tesla T4 #0", capability=(7, 5))
    assert precision.detect("cuda:1").name == "Tesla T4 #1"
    assert decide("auto").precision == "fp16"
    assert precision.detect("cpu").kind == "cpu" and precision.detect("mps") == MPS
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "cpu_flags", lambda: {"avx512_bf16": True, "avx2": True,
                                                         "amx_bf16": False})
    cpu = precision.detect("cpu")
    assert cpu.flags == ("avx512_bf16", "avx2") and cpu.native_bf16
    assert decide("auto", cpu).precision == "bf16"


def test_this_machine(caplog):
    """What auto chooses here follows the CPU's flags (/proc/cpuinfo): this kind of machine
    (AMD EPYC Zen 3: AVX2, no avx512_bf16 or amx_bf16) trains and evaluates in fp32."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the CPU is not what decides")
    flags = precision.cpu_flags()
    assert set(flags) >= {"avx512_bf16", "amx_bf16", "avx512f", "avx2"} or "bf16" in flags
    d = decide()
    native = (flags.get("avx512_bf16") or flags.get("amx_bf16") or flags.get("bf16")) and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert d.precision == ("bf16" if native else "fp32"), d
    assert d.device.name == precision.cpu_name()


def test_importing_it_imports_no_torch():
    code = ("import sys, solar_merge.precision, solar_merge.stages\n"
            "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- where the request comes from: a stage's config ------------------------------------------

@pytest.mark.parametrize("stated, args, expected", [
    ("auto", {}, "auto"),
    ("bf16", {}, "bf16"),
    ("auto", {"bf16": True}, "bf16"),                 # TRL's own keys are explicit choices
    ("auto", {"fp16": True, "bf16": False}, "fp16"),
    ("auto", {"bf16": False}, "fp32"),
    ("auto", {"model_init_kwargs": {"dtype": "bfloat16"}}, "bf16"),   # bf16 weights
    ("bf16", {"bf16": True, "model_init_kwargs": {"dtype": "float32"}}, "bf16"),
    ("fp32", {"model_init_kwargs": {"dtype": "float32"}}, "fp32"),
])
def test_a_stage_request_folds_trls_args(stated, args, expected):
    from solar_merge.stages.schema import fold_precision

    rest, request = fold_precision(stated, args)
    assert request == expected
    assert "bf16" not in rest and "fp16" not in rest  # one place: the precision decision
    assert rest.get("model_init_kwargs") == args.get("model_init_kwargs")


@pytest.mark.parametrize("stated, args, expected", [
    ("fp32", {"bf16": True}, "precision: fp32 and args.bf16: true disagree"),
    ("bf16", {"bf16": False}, "precision: bf16 and args.bf16: false disagree"),
    ("fp32", {"model_init_kwargs": {"dtype": "bfloat16"}},
     "precision: fp32 and args.model_init_kwargs.dtype bfloat16 disagree"),
    ("auto", {"bf16": True, "fp16": True}, "args.bf16 and args.fp16 are both true"),
    ("auto", {"fp16": True, "model_init_kwargs": {"dtype": "bfloat16"}},
     "args.model_init_kwargs.dtype bfloat16 and args.fp16: true disagree"),
])
def test_disagreeing_settings_are_refused(stated, args, expected):
    from solar_merge.stages.schema import fold_precision

    with pytest.raises(UserError, match=expected):
        fold_precision(stated, args)


def test_forcing_reaches_the_stage_hash_and_16_bit_weights(tmp_path, tiny_model, monkeypatch):
    """SOLAR_MERGE_PRECISION is part of the resolved stage (a forced run is another result:
    its hash differs); forcing fp32 also loads bf16 weights in float32."""
    from solar_merge.stages import resolve, stage_hash

    (tmp_path / "c.txt").write_text("text\n")
    config = {"stage": "cpt", "model": str(tiny_model), "datasets": ["c.txt"],
              "args": {"model_init_kwargs": {"dtype": "bfloat16", "attn_implementation":
                                             "eager"}}}
    plain = resolve(config, base_dir=tmp_path)
    assert plain["precision"] == "bf16"
    monkeypatch.setenv(ENV, "fp32")
    forced = resolve(config, base_dir=tmp_path)
    assert forced["precision"] == "fp32"
    assert forced["args"]["model_init_kwargs"] == {"attn_implementation": "eager"}
    assert stage_hash(forced) != stage_hash(plain)
    with pytest.raises(UserError, match="`precision`: Input should be 'auto', 'bf16', 'fp16' or"):
        resolve({**config, "precision": "bf17"}, base_dir=tmp_path)


# -- what runs: TRL's args, the memory estimate, accelerate launch ---------------------------

def _resolved(tmp_path, tiny_model, **extra):
    from solar_merge.stages import resolve

    (tmp_path / "c.txt").write_text("text\n")
    return resolve({"stage": "cpt", "model": str(tiny_model), "datasets": ["c.txt"],
                    **extra}, base_dir=tmp_path)


@pytest.mark.parametrize("extra, device, bf16, fp16, weights, layout", [
    ({}, ZEN3, False, False, "float32", "fp32"),
    ({}, SAPPHIRE, True, False, "float32", "mixed"),     # bf16 autocast over fp32 weights
    ({}, T4, False, True, "float32", "mixed"),           # fp16 autocast + loss scaling
    ({"precision": "bf16"}, ZEN3, True, False, "float32", "mixed"),
    ({"args": {"bf16": True}}, ZEN3, True, False, "float32", "mixed"),  # TRL's meaning
    ({"args": {"model_init_kwargs": {"dtype": "bfloat16"}}}, ZEN3, True, False, "bfloat16",
     "bf16"),
    ({"precision": "fp32"}, A100, False, False, "float32", "fp32"),
])
def test_trl_args_and_the_estimate_follow_the_decision(tmp_path, tiny_model, monkeypatch,
                                                       extra, device, bf16, fp16, weights,
                                                       layout):
    from solar_merge import memory
    from solar_merge.stages.training import decide_precision, trl_args

    monkeypatch.setattr(precision, "detect", lambda device_=None: device)
    resolved = _resolved(tmp_path, tiny_model, **extra)
    chosen = decide_precision(resolved)
    if device.kind == "cpu":
        args, init = trl_args(resolved, tmp_path / "work", "SFTConfig")
        assert (args.bf16, args.fp16, init["dtype"]) == (bf16, fp16, weights)
    assert (chosen.precision == "bf16", chosen.precision == "fp16") == (bf16, fp16)
    assert memory.layout(resolved["args"], chosen.precision) == layout
    shape = memory.Shape(params=10_000, layers=2, hidden=64, intermediate=128, vocab=100)
    est = memory.from_stage(resolved, shape, precision=chosen.precision)
    assert est.setup.precision == layout


def test_plans_without_a_device_take_the_larger_estimate(tmp_path, tiny_model):
    from solar_merge import memory

    resolved = _resolved(tmp_path, tiny_model, seq_len=8)
    shape = memory.Shape(params=10_000_000, layers=2, hidden=64, intermediate=128, vocab=100)
    auto = memory.from_stage(resolved, shape)
    both = [memory.from_stage(resolved, shape, precision=p) for p in ("fp32", "bf16")]
    assert auto.total == max(e.total for e in both) and auto.total > min(e.total for e in both)


@pytest.mark.parametrize("device, flag", [(ZEN3, "no"), (SAPPHIRE, "bf16"), (T4, "fp16")])
def test_accelerate_launch_gets_the_decision(tmp_path, tiny_model, monkeypatch, device, flag):
    from solar_merge.stages.launch import launch_command

    monkeypatch.setattr(precision, "detect", lambda device_=None: device)
    resolved = _resolved(tmp_path, tiny_model, launch={"num_processes": 2})
    cmd = launch_command(resolved, tmp_path / "s.yaml", tmp_path / "out")
    assert cmd[cmd.index("--mixed_precision") + 1] == flag


# -- the CLI: --precision, the printed decision ----------------------------------------------

def test_cli_precision_flag_forces_and_restores(tmp_path, tiny_model, monkeypatch):
    """`train --precision fp16 --dry-run` prints the forced choice and the emulation warning;
    the variable it sets ends with the command."""
    from click.testing import CliRunner

    from solar_merge.cli import main

    monkeypatch.setattr(precision, "detect", lambda device_=None: ZEN3)
    (tmp_path / "c.txt").write_text("text\n")
    cfg = tmp_path / "cpt.yaml"
    cfg.write_text(f"stage: cpt\nmodel: {tiny_model}\ndatasets: [c.txt]\n")
    runner = CliRunner()
    result = runner.invoke(main, ["train", str(cfg), "--dry-run", "--precision", "fp16"])
    assert result.exit_code == 0, result.output
    assert f"precision fp16 (asked for (--precision / {ENV}=fp16))" in result.output
    assert "warning: " in result.output and precision.CPU_SLOWDOWN["fp16"] in result.output
    import os

    assert ENV not in os.environ
    result = runner.invoke(main, ["train", str(cfg), "--dry-run"])
    assert "precision fp32 (auto: CPU AMD EPYC has no native bf16" in result.output
    result = runner.invoke(main, ["train", str(cfg), "--dry-run", "--precision", "bf32"])
    assert result.exit_code == 2 and "bf32" in result.output
    for command in ("run", "demo", "eval", "synth-math", "train"):
        assert "--precision [auto|bf16|fp16|fp32]" in runner.invoke(
            main, [command, "--help"]).output, command


def test_plan_speaks_the_stage_words(tmp_path):
    """`plan --precision bf16` sizes what a train stage with `precision: bf16` holds (fp32
    weights under autocast); bf16-weights is model_init_kwargs.dtype bfloat16."""
    import json

    from solar_merge import memory
    from solar_merge.analysis import plan

    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 256, "intermediate_size": 512,
        "num_attention_heads": 4, "num_hidden_layers": 4, "vocab_size": 1000}))
    one = {p: plan(str(folder), precision=p).memory["1 device"]
           for p in ("bf16", "fp16", "fp32", "bf16-weights")}
    assert one["bf16"].setup.precision == one["fp16"].setup.precision == "mixed"
    assert one["fp32"].setup.precision == "fp32"
    assert one["bf16-weights"].setup.precision == "bf16"
    assert one["bf16"].terms["16-bit weight copies"] > 0
    assert one["bf16-weights"].total < one["fp32"].total
    with pytest.raises(UserError, match="--precision mixed is not one of"):
        plan(str(folder), precision="mixed")
    assert memory.PRECISIONS == ("fp32", "bf16", "mixed")


# -- eval and synth-math: the models' dtype, recorded ----------------------------------------

@pytest.mark.parametrize("device, model_args, dtype", [
    (ZEN3, {}, "float32"), (SAPPHIRE, {}, "bfloat16"), (A100, {}, "bfloat16"),
    (T4, {}, "float16"), (ZEN3, {"dtype": "bfloat16", "max_length": 64}, "bfloat16"),
    (A100, {"dtype": "float32"}, "float32")])
def test_eval_dtype(monkeypatch, device, model_args, dtype):
    from solar_merge import eval as lm

    monkeypatch.setattr(precision, "detect", lambda device_=None: device)
    hf_args, record = lm.model_dtype("auto", "cpu", model_args)
    assert hf_args == {**model_args, "dtype": dtype} and record["dtype"] == dtype
    explicit = f"model_args dtype={dtype} (explicit)"
    assert record["reason"] == explicit if "dtype" in model_args else \
        record["reason"].startswith("auto: ")


def test_eval_runs_and_records_its_dtype(tmp_path, tiny_model, monkeypatch, caplog):
    import json

    from solar_merge import eval as lm

    with caplog.at_level(logging.INFO, logger="solar_merge.precision"):
        res = lm.evaluate([tiny_model], "solar_manual_qa", out=tmp_path / "e", limit=1,
                          batch_size=1, device="cpu")
    chosen = decide("auto", precision.detect("cpu"), training=False)
    assert res[tiny_model.name]["config"]["model_args"]["dtype"] == chosen.dtype
    written = json.loads((tmp_path / "e" / lm.PRECISION).read_text())
    assert written == {"dtype": chosen.dtype, **chosen.record()}
    assert f"eval: {chosen}" in caplog.text
    monkeypatch.setenv(ENV, "bf16")  # forced: another result, not the finished one
    res = lm.evaluate([tiny_model], "solar_manual_qa", out=tmp_path / "e", limit=1,
                      batch_size=1, device="cpu")
    assert res[tiny_model.name]["config"]["model_args"]["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "e" / lm.PRECISION).read_text())["request"] == "bf16"


def test_synth_math_loads_and_records_its_dtype(tmp_path, tiny_model, monkeypatch):
    import json

    import torch

    from solar_merge import synth_math as sm

    seed = tmp_path / "seed.jsonl"
    seed.write_text(json.dumps({"question": "Tom has 2 apples and buys 2. How many?",
                                "answer": "2 + 2 = 4\n#### 4"}) + "\n")
    loaded = []
    real = sm.TransformersGenerator.__init__

    def spy(self, *args, **kwargs):
        real(self, *args, **kwargs)
        loaded.append(self.model.dtype)

    monkeypatch.setattr(sm.TransformersGenerator, "__init__", spy)
    options = sm.Options(model=str(tiny_model), max_new_tokens=4, batch_size=1,
                         engine="transformers")
    result = sm.synth_math(seed, tmp_path / "out", options, progress=False)
    chosen = decide("auto", training=False)
    assert loaded == [getattr(torch, chosen.dtype)]
    assert result.report["precision"] == chosen.record()
    card = (tmp_path / "out" / "README.md").read_text()
    assert f"| precision | {chosen.precision} ({chosen.reason}) |" in card
    monkeypatch.setenv(ENV, "bf16")
    result = sm.synth_math(seed, tmp_path / "out", options, progress=False)
    assert not result.skipped and loaded[-1] == torch.bfloat16
    assert result.report["precision"]["request"] == "bf16"


def test_a_recipe_hashes_the_request_and_the_forcing(tmp_path, tiny_model, monkeypatch):
    """The planner imports no torch: train, eval and synth_math stages are hashed with their
    request (auto), never a decision; SOLAR_MERGE_PRECISION changes the request, so every
    such stage is planned anew, and the rest stays as it was."""
    import json

    import yaml

    from solar_merge import recipe

    (tmp_path / "c.txt").write_text("text\n")
    (tmp_path / "seed.jsonl").write_text(json.dumps({"question": "1 + 1?",
                                                      "answer": "#### 2"}) + "\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"stages": {
        "dus": {"upscale": {"model": str(tiny_model), "method": "dus", "drop": 1}},
        "math": {"synth_math": {"data": "seed.jsonl", "model": str(tiny_model)}},
        "cpt": {"train": {"stage": "cpt", "model": "dus", "datasets": ["c.txt"]}},
        "ev": {"eval": {"models": ["cpt"], "tasks": "solar_manual_qa"}}}}))
    plain = recipe.plan(tmp_path / "r.yaml", out=tmp_path / "runs")
    assert plain.stages["cpt"].config["precision"] == "auto"
    assert plain.stages["ev"].config["options"]["precision"] == "auto"
    assert plain.stages["math"].config["precision"] == "auto"
    monkeypatch.setenv(ENV, "fp32")
    forced = recipe.plan(tmp_path / "r.yaml", out=tmp_path / "runs")
    changed = {n for n in plain.stages if plain.stages[n].hash != forced.stages[n].hash}
    assert changed == {"math", "cpt", "ev"}
    assert forced.stages["ev"].config["options"]["precision"] == "fp32"
