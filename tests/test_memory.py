"""The training memory formula (solar_merge/memory.py): what the plan shows is what the stage
runs with; weights load in the dtype the stage trains in; sharded strategies against
DeepSpeed's published closed forms. The measured check on SmolLM2 is in test_scale.py."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from solar_merge import memory
from solar_merge.memory import Setup, Shape, estimate

ROOT = Path(__file__).resolve().parent.parent
MISTRAL = {"architectures": ["MistralForCausalLM"], "hidden_size": 4096,
           "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
           "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are small, and the 2 cores are shared (two threads
    spin-wait on each other under load: 3x the CPU time of one, measured on this file)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_memory_imports_no_torch():
    code = ("import sys, solar_merge.memory\n"
            "assert not {'torch', 'transformers', 'trl'} & set(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def _paper_plan(tmp_path, *overrides):
    from solar_merge import recipe

    mistral = tmp_path / "mistral"
    mistral.mkdir(exist_ok=True)
    (mistral / "config.json").write_text(json.dumps(MISTRAL))
    return recipe.plan(ROOT / "training/solar_10.7b.yaml", out=tmp_path / "runs",
                       overrides=[f"stages.dus.upscale.model={mistral}", *overrides])


def test_paper_recipe_plans_as_the_paper_and_deepspeed_count(tmp_path):
    p = _paper_plan(tmp_path, "stages.cpt.train.args.bf16=false",
                    "stages.dpo_avg.train.args.bf16=false")
    params = p.stages["cpt"].shape.params
    assert 10.70e9 < params < 10.75e9  # SOLAR's 10.7B: Mistral 7B's config, m = 8
    for name in ("cpt", "sft_orca", "dpo_avg"):
        est = p.stages[name].estimate  # what launch.start checks the stage against
        assert p.stages[name].memory == est.total + memory.RUNTIME
        # the recipe's launch: ZeRO-3 over 8 devices; DeepSpeed's own closed form for it
        assert est.setup.strategy == "zero3" and est.setup.devices == 8
        assert est.terms["model states shard"] + est.terms["gathered module"] == \
            deepspeed_zero3_gpu_bytes(params, 32000 * 4096, num_gpus_per_node=8)
    # one device (no launch): fp32 weights, gradients and two AdamW moments: 16 bytes a
    # parameter, ~172 GB for SOLAR's 10.7B (215 GB with DPO's reference)
    shape = p.stages["cpt"].shape
    cpt = memory.from_stage(p.stages["cpt"].config, shape).terms
    assert cpt["weights"] + cpt["gradients"] + cpt["optimizer moments"] == 16 * params
    assert 171e9 < 16 * params < 173e9
    dpo = memory.from_stage(p.stages["dpo_avg"].config, shape).terms
    assert dpo["reference model"] == 4 * params
    # the shipped recipe trains with args.bf16 (TRL's meaning: bf16 autocast over fp32
    # weights): fp32 weights, gradients and moments, plus the bf16 copies autocast makes
    bf16 = memory.from_stage(p.stages["sft_orca"].config, shape).terms
    assert p.stages["sft_orca"].config["precision"] == "bf16"
    assert bf16["weights"] == 4 * params and bf16["16-bit weight copies"] == 2 * params


@pytest.mark.parametrize("launch", [{}, {"accelerate_config": "zero3", "num_processes": 4}])
def test_a_recipe_plans_what_the_stage_checks_when_it_runs_alone(tmp_path, tiny_model, launch):
    """`validate` and `solar-merge train --dry-run` of the same stage give the same memory."""
    from solar_merge import recipe
    from solar_merge.checkpoints import safetensors_headers
    from solar_merge.stages import resolve
    from solar_merge.stages.launch import check_fit

    (tmp_path / "c.txt").write_text("some text\n\nmore text\n")
    stage = {"stage": "sft", "model": str(tiny_model), "datasets": [str(tmp_path / "c.txt")],
             "precision": "fp32", "seq_len": 64, "launch": launch,
             "args": {"per_device_train_batch_size": 2}}
    planned = recipe.plan({"name": "t", "stages": {"s": {"train": stage}}}, tmp_path / "runs",
                          base_dir=tmp_path).stages["s"]
    alone = check_fit(resolve(stage), launch)
    assert planned.memory == alone.total + memory.RUNTIME
    weights = safetensors_headers(tiny_model).values()
    assert planned.shape.params == alone.shape.params == sum(
        math.prod(w["shape"]) for w in weights)


@pytest.mark.parametrize("config, dtype, layout", [
    ({}, "float32", None),                                   # auto: decided on this machine
    ({"args": {"bf16": True}}, "float32", "mixed"),          # TRL's bf16: autocast, fp32 weights
    ({"precision": "bf16"}, "float32", "mixed"),
    ({"args": {"fp16": True}}, "float32", "mixed"),
    ({"args": {"model_init_kwargs": {"dtype": "bfloat16"}}}, "bfloat16", "bf16"),
    ({"precision": "fp32"}, "float32", "fp32")])
def test_weights_load_in_the_dtype_the_estimate_counts(tmp_path, tiny_model, config, dtype,
                                                       layout, monkeypatch):
    import torch

    from solar_merge import testhooks
    from solar_merge.stages import train
    from solar_merge.stages.schema import resolve
    from solar_merge.stages.training import decide_precision

    seen = []

    def stop(trainer, info):
        seen.append((trainer.model.dtype, trainer.args.bf16, trainer.args.fp16))
        raise KeyboardInterrupt

    monkeypatch.setattr(testhooks, "TRAINER_HOOKS", [stop])
    (tmp_path / "c.txt").write_text("some text to pack\n\n" * 40)
    if config.get("args", {}).get("fp16"):
        pytest.importorskip("torch").cuda.is_available() or pytest.skip("fp16 needs a GPU")
    stage = {"stage": "cpt", "model": str(tiny_model), "datasets": [str(tmp_path / "c.txt")],
             "seq_len": 16, **config, "args": {"max_steps": 1, **config.get("args", {})}}
    with pytest.raises(KeyboardInterrupt):
        train(stage, tmp_path / "out")
    resolved = resolve(stage)
    chosen = decide_precision(resolved).precision
    assert seen == [(getattr(torch, dtype), chosen == "bf16", chosen == "fp16")]
    expected = layout or ("fp32" if chosen == "fp32" else "mixed")
    assert memory.layout(resolved["args"], chosen) == expected
    assert memory.from_stage(resolved, Shape(1000, 2, 8, 16, 10), precision=chosen
                             ).setup.precision == expected


def deepspeed_zero3_gpu_bytes(total_params, largest_layer_params, num_gpus_per_node=1,
                              num_nodes=1):
    """DeepSpeed's documented closed form for ZeRO-3 without offload
    (deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs, cpu_offload=False):
    gpu_mem = 4 * largest_layer_params + int(18 * total_params / total_gpus).
    Written from their docs here (deepspeed is not installed)."""
    total_gpus = num_nodes * num_gpus_per_node
    return 4 * largest_layer_params + int(18 * total_params / total_gpus)


def deepspeed_zero2_gpu_bytes(total_params, num_gpus_per_node=1, num_nodes=1):
    """estimate_zero2_model_states_mem_needs, cpu_offload=False:
    gpu_mem = 4 * total_params + int(16 * total_params / total_gpus)."""
    return 4 * total_params + int(16 * total_params / (num_nodes * num_gpus_per_node))


@pytest.mark.parametrize("config, gpus, nodes", [(MISTRAL, 8, 1), (MISTRAL, 8, 2),
                                                 ({**MISTRAL, "num_hidden_layers": 48}, 8, 1),
                                                 ({**MISTRAL, "hidden_size": 2048,
                                                   "intermediate_size": 5632}, 4, 1)])
def test_sharded_model_states_match_deepspeeds_estimator(config, gpus, nodes):
    shape = Shape.from_config(config)
    n = gpus * nodes
    largest = 32000 * config["hidden_size"]  # the embedding: the largest single module
    assert shape.largest_module == largest
    z3 = estimate(shape, Setup(strategy="zero3", devices=n, precision="bf16")).terms
    assert abs(z3["model states shard"] + z3["gathered module"]
               - deepspeed_zero3_gpu_bytes(shape.params, largest, gpus, nodes)) <= 1
    z2 = estimate(shape, Setup(strategy="zero2", devices=n, precision="bf16")).terms
    assert abs(z2["weights"] + z2["gradients"] + z2["optimizer state shard"]
               - deepspeed_zero2_gpu_bytes(shape.params, gpus, nodes)) <= 1
    # more devices: less per device; activations do not shard
    z3_16 = estimate(shape, Setup(strategy="zero3", devices=2 * n, precision="bf16"))
    assert z3_16.terms["model states shard"] < z3["model states shard"]
    assert z3_16.terms["activations"] == z3["activations"]


def test_lora_and_checkpointing_shrink_the_estimate():
    shape = Shape.from_config(MISTRAL)
    full = estimate(shape, Setup(precision="bf16", batch=1, seq_len=2048))
    lora = estimate(shape, Setup(precision="bf16", batch=1, seq_len=2048, lora=True,
                                 trainable=memory.lora_params(shape, 16, "all-linear")))
    qlora = estimate(shape, Setup(precision="bf16", batch=1, seq_len=2048, lora=True,
                                  load_in_4bit=True,
                                  trainable=memory.lora_params(shape, 16, "all-linear")))
    # rank 16 on the 7 projections of 32 layers: 16*(in+out) each, ~42M parameters
    assert memory.lora_params(shape, 16, "all-linear") == 32 * 16 * (
        2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert lora.terms["gradients"] < full.terms["gradients"] / 100
    assert qlora.terms["weights"] < lora.terms["weights"] / 3
    ckpt = estimate(shape, Setup(precision="bf16", batch=1, seq_len=2048,
                                 activation_checkpointing=True))
    assert ckpt.terms["activations"] < full.terms["activations"] / 10


def test_recipe_launch_is_per_stage_overridable_and_sizes_the_plan(tmp_path, tiny_model):
    """Recipe-level `launch:` reaches every train stage; a stage's own keys win; the plan's
    memory is per device for that launch; `merge_options:` reach merges under their own."""
    from solar_merge import recipe

    (tmp_path / "c.txt").write_text("some text\n\nmore text\n")
    train = {"stage": "cpt", "model": str(tiny_model), "datasets": ["c.txt"]}
    data = {"name": "t", "launch": {"accelerate_config": "zero3", "num_processes": 2},
            "merge_options": {"cuda": True, "lazy_unpickle": True},
            "stages": {"a": {"train": train},
                       "b": {"train": {**train, "launch": {"num_processes": 4}}},
                       "m": {"merge": {"merge_method": "solar_average", "options": {"cuda": False},
                                       "models": [{"model": "a"}, {"model": "b"}]}}}}
    p = recipe.plan(data, tmp_path / "runs", base_dir=tmp_path)
    a, b = p.stages["a"].config["launch"], p.stages["b"].config["launch"]
    assert (a["accelerate_config"], a["num_processes"]) == ("zero3", 2)
    assert (b["accelerate_config"], b["num_processes"]) == ("zero3", 4)
    assert p.stages["a"].memory > p.stages["b"].memory  # the same model over more devices
    assert p.stages["m"].config["options"] == {"cuda": False, "lazy_unpickle": True}
    data["launch"]["device_memory"] = "1KB"
    with pytest.raises(Exception, match="more than launch.device_memory"):
        recipe.plan(data, tmp_path / "runs", base_dir=tmp_path)
