"""Scale: the measured memory of real steps on the embedded SmolLM2 against the estimate, and
the same stage on 2 processes through torchrun and `solar-merge train
--num-processes`, killed and resumed, LoRA, launches that cannot fit.

Every test here loads SmolLM2 (marker `smollm2`) and/or starts processes (marker `torchrun`);
they share one 1-process reference run (module fixture). OMP_NUM_THREADS=1 keeps two ranks
from fighting over the 2 cores."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from solar_merge import memory

# The stage every run here trains: continued pretraining of SmolLM2 on the Python reference
# manual, 32-token blocks, 3 updates of a global batch of 2, constant lr, fixed seed.
ARGS = {"max_steps": 3, "learning_rate": 1e-4, "lr_scheduler_type": "constant",
        "warmup_steps": 0, "logging_steps": 1, "save_steps": 2, "seed": 42,
        "dataloader_num_workers": 0, "gradient_checkpointing": False}

# Run one stage in a fresh interpreter and report its peak memory: the baseline is taken after
# torch, transformers, TRL, datasets and matplotlib are imported (the estimate leaves the
# runtime out), the peak is the kernel's high-water mark of resident memory (VmHWM, reset
# right after the baseline) read after every optimizer step, i.e. before the final save.
MEASURE = r"""
import json, sys
import torch, transformers, datasets, matplotlib.pyplot
from trl import SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
from solar_merge import testhooks
from solar_merge.stages import train

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

config, out = json.loads(sys.argv[1]), sys.argv[2]
base = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident size
peaks = []

class Peak(transformers.TrainerCallback):
    def on_step_end(self, *args, **kwargs):
        peaks.append(status("VmHWM") - base)

testhooks.TRAINER_HOOKS.append(lambda trainer, info: trainer.add_callback(Peak()))
train(config, out)
print("PEAKS", json.dumps(peaks))
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are small, and the 2 cores are shared (two threads
    spin-wait on each other under load: 3x the CPU time of one, measured on this file)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _corpus(folder: Path) -> Path:
    from pydoc_data.topics import topics

    path = folder / "manual.txt"
    path.write_text("\n\n".join(list(topics.values())[:2]))
    return path


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def smollm2():
    from solar_merge.embedded import embedded_model

    return embedded_model()


@pytest.fixture(scope="module")
def single(tmp_path_factory, smollm2):
    """The 1-process run (batch 2) in its own interpreter: (config, output, peaks)."""
    folder = tmp_path_factory.mktemp("single")
    config = {"stage": "cpt", "model": str(smollm2), "datasets": [str(_corpus(folder))],
              "seq_len": 32, "precision": "fp32",
              "args": {**ARGS, "per_device_train_batch_size": 2, "save_steps": 1000}}
    out = folder / "out"
    proc = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(config), str(out)],
                          capture_output=True, text=True, env=_env(), timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.split("PEAKS", 1)[1])
    return config, out, peaks


@pytest.mark.smollm2
def test_peak_memory_of_real_steps_matches_the_estimate(single, smollm2):
    """fp32 full training of SmolLM2 (134.5M parameters): the estimate is dominated by 16
    bytes a parameter (weights, gradients, two AdamW moments: 2.15 GB) plus the optimizer's
    scratch tensors, activations and logits of 2x32 tokens.

    Tolerance: the measured high-water mark within -10% / +15% of the estimate. Resident
    memory also holds what the formula leaves out on purpose: freed blocks the allocator keeps
    (glibc does not return every freed gradient to the system between steps), the tokenized
    dataset and the Trainer's bookkeeping; and the estimate's activation count is within 10%
    of what autograd saves (memory.py)."""
    config, _, peaks = single
    shape = memory.Shape.from_config(json.loads((smollm2 / "config.json").read_text()))
    est = memory.from_stage(config, shape)
    assert est.setup.precision == "fp32" and shape.params == 134_515_008
    peak = max(peaks)
    assert len(peaks) == 3
    assert 0.90 * est.total < peak < 1.15 * est.total, (peak, est.describe())


# -- 2 processes (gloo) vs 1 ---------------------------------------------------------------

SOLAR_MERGE = str(Path(sys.executable).parent / "solar-merge")
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
# Loaded by every rank (SOLAR_MERGE_TRAINER_HOOK): what each rank trained with.
RECORD_HOOK = r'''
import json, os

def record(trainer, info):
    row = {"rank": int(os.environ.get("RANK", "0")), "world": trainer.args.world_size,
           "data": sorted(c["filename"] for c in trainer.train_dataset.cache_files)}
    with open(os.path.join(os.environ["RECORDS"], f"rank{row['rank']}.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
'''


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _relative_distance(a: dict, b: dict, origin: dict) -> float:
    """||a - b|| / ||b - origin|| over all tensors: how far apart two training runs end,
    measured in units of the update they made."""
    import torch

    num = sum(float(torch.sum((a[k].float() - b[k].float()) ** 2)) for k in b)
    den = sum(float(torch.sum((b[k].float() - origin[k].float()) ** 2)) for k in b)
    return (num / den) ** 0.5


@pytest.mark.smollm2
@pytest.mark.torchrun
def test_two_processes_killed_and_resumed_end_like_one_process(single, smollm2, tmp_path):
    """`solar-merge train --num-processes 2` (accelerate launch, gloo), rank 1 killed inside
    step 3 (after checkpoint-2), then the same stage under plain `torchrun --nproc-per-node 2`:
    it resumes from checkpoint-2 and ends with one complete output and nothing else.

    Against the 1-process run with the same global batch (2 x 1 vs 1 x 2, same seed): the
    final weights differ by less than 1% of the update the 1-process run made. Measured here:
    1.0e-5 (2026-11-30). Every sequence is a full 32-token block (packing), so the mean of the
    two ranks' per-token losses is the 1-process mean and only float summation order differs;
    Adam's first steps scale each coordinate's update to about the learning rate whatever its
    gradient, which can turn such noise in near-zero gradients into visible differences (NOTES'
    4.9% for plain TRL is the issue's bound). 1% is 1000x the measured distance and 5x under
    that bound, while a wrong data split, a lost or repeated step, or a resume from the wrong
    state moves the weights by a third of the update or more (one of three steps)."""
    import yaml

    config, single_out, _ = single
    config = {**config, "args": {**config["args"], "per_device_train_batch_size": 1,
                                 "save_steps": 2}}
    stage = tmp_path / "cpt.yaml"
    stage.write_text(yaml.safe_dump(config))
    (tmp_path / "hook.py").write_text(RECORD_HOOK)
    (tmp_path / "records").mkdir()
    out = tmp_path / "out"
    env = {**_env(), "SOLAR_MERGE_TRAINER_HOOK": f"{tmp_path / 'hook.py'}:record",
           "RECORDS": str(tmp_path / "records")}
    killed = subprocess.run([SOLAR_MERGE, "train", str(stage), "-o", str(out),
                             "--num-processes", "2"], capture_output=True, text=True,
                            env={**env, "SOLAR_MERGE_KILL_AT": "before-update-3",
                                 "SOLAR_MERGE_KILL_RANK": "1"}, timeout=600, check=False)
    assert killed.returncode != 0, killed.stderr[-3000:]
    assert "the training processes exited with code" in killed.stderr
    partial = tmp_path / ".out.partial"
    assert (partial / "checkpoint-2" / "trainer_state.json").is_file() and not out.exists()

    resumed = subprocess.run([TORCHRUN, "--nproc-per-node", "2", SOLAR_MERGE, "train",
                              str(stage), "-o", str(out)], capture_output=True, text=True,
                             env=env, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-2" in resumed.stderr
    # one complete output and the command's log beside it; no partial folder, lock or
    # checkpoint left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cpt.yaml", "hook.py", "out",
                                                          "out.log", "records"]
    assert (out / "solar_merge_complete.json").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(("checkpoint-", "data"))]
    assert [s for s, _ in _read_loss(out)] == [1, 2, 3]
    assert "processes: `2 (MULTI_CPU" in (out / "README.md").read_text()
    # every rank of both launches trained with world size 2, on data prepared once: the
    # tokenized dataset is one set of cache files, made by rank 0, loaded by rank 1
    rows = [json.loads(line) for f in sorted((tmp_path / "records").iterdir())
            for line in f.read_text().splitlines()]
    assert sorted((r["rank"], r["world"]) for r in rows) == [(0, 2), (0, 2), (1, 2), (1, 2)]
    assert all(r["data"] and r["data"] == rows[0]["data"] for r in rows)
    assert all(str(partial / "data") in name for r in rows for name in r["data"])
    distance = _relative_distance(_weights(out), _weights(single_out), _weights(smollm2))
    assert distance < 0.01, distance


def _read_loss(folder: Path):
    from solar_merge.stages.logs import read_loss

    return read_loss(folder / "loss.jsonl")


# -- LoRA ------------------------------------------------------------------------------------

@pytest.mark.smollm2
def test_lora_stage_is_a_full_checkpoint_that_stock_mergekit_merges(smollm2, tmp_path):
    """peft: LoRA on SmolLM2's q_proj/v_proj, 2 steps; the output is a plain full checkpoint
    (merge_and_unload) whose logits equal the kept adapter applied to the base (within 1e-4:
    fp32 merge W + BA*s vs. computing BA*s*x apart), and stock mergekit (run_merge, the
    methods that solar_merge's plugin registers) averages it with the base."""
    import torch
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_merge.stages import train

    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"What is {i} + {i}?",
                                        "output": f"{i} + {i} = {2 * i}."}) + "\n"
                            for i in range(8)))
    out = train({"stage": "sft", "model": str(smollm2), "datasets": [str(data)], "seq_len": 48,
                 "peft": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
                          "target_modules": ["q_proj", "v_proj"]},
                 "keep_adapter": True,
                 "args": {**ARGS, "max_steps": 2, "learning_rate": 1e-2, "save_steps": 100,
                          "per_device_train_batch_size": 2}}, tmp_path / "lora")
    assert (out / "adapter" / "adapter_config.json").is_file()
    names = set(load_file(str(out / "model.safetensors")))
    assert names == set(load_file(str(smollm2 / "model.safetensors")))  # no lora_A/B: merged
    assert "LoRA: `rank 8, alpha 16 on ['q_proj', 'v_proj']" in (out / "README.md").read_text()

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("What is 3 + 3? 3 + 3 = 6.", return_tensors="pt").input_ids
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(out).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(smollm2).eval()
        plain = base(ids).logits
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()(ids).logits
    assert (merged - adapted).abs().max() < 1e-4
    assert (merged - plain).abs().max() > 1e-2  # the adapter did train something

    config = MergeConfiguration.model_validate({
        "merge_method": "solar_average", "dtype": "float32",
        "models": [{"model": str(out), "parameters": {"weight": 0.5}},
                   {"model": str(smollm2), "parameters": {"weight": 0.5}}]})
    run_merge(config, str(tmp_path / "avg"), MergeOptions(copy_tokenizer=True))
    a, b = load_file(str(out / "model.safetensors")), load_file(str(smollm2 / "model.safetensors"))
    avg = load_file(str(tmp_path / "avg" / "model.safetensors"))
    key = "model.layers.3.self_attn.q_proj.weight"
    assert torch.allclose(avg[key], (a[key] + b[key]) / 2, atol=1e-6)
    assert not torch.equal(a[key], b[key])


# -- bad input: exit 2, one message with the fix, nothing written --------------------------

@pytest.mark.smollm2  # its config.json and weights' size, for the memory check
@pytest.mark.parametrize("extra, message", [
    (["--accelerate-config", "zero4"],
     "neither a file nor one of TRL's presets (did you mean `zero3`?)"),
    (["--num-processes", "0"], "launch.num_processes is 0: it must be at least 1"),
    (["peft.lora_alpah=8"],
     "peft.lora_alpah is not a peft.LoraConfig field (did you mean `lora_alpha`?)"),
    (["peft.r=8", "load_in_4bit=true"], "load_in_4bit (QLoRA) needs a CUDA GPU"),
    (["--device-memory", "2GB"], "more than the 2.00GB given (device_memory)"),
])
def test_bad_launches_fail_before_anything_runs(smollm2, tmp_path, extra, message):
    import hashlib

    from click.testing import CliRunner

    from solar_merge.cli import main

    corpus = _corpus(tmp_path)
    stage = tmp_path / "cpt.yaml"
    stage.write_text(json.dumps({"stage": "cpt", "model": str(smollm2),
                                 "datasets": [str(corpus)], "seq_len": 32, "args": ARGS}))
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    result = CliRunner().invoke(main, ["train", str(stage), "-o", str(tmp_path / "out"),
                                       *extra])
    assert result.exit_code == 2, result.output
    assert message in result.output, result.output
    assert result.output.count("Error:") == 1 and "fix:" in result.output
    assert "Traceback" not in result.output
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert after == before  # nothing written, inputs untouched


# -- a recipe: train stages launched, merges here -------------------------------------------

@pytest.mark.torchrun
def test_recipe_launches_train_stages_and_merges_in_process(tiny_model, tmp_path):
    """Recipe-level `launch: {num_processes: 2}`: `solar-merge run` starts the cpt stage with
    accelerate launch (2 processes) and runs the merge in its own process; a re-run skips
    both without launching anything."""
    import torch
    import yaml
    from click.testing import CliRunner
    from safetensors.torch import load_file

    from solar_merge.cli import main

    corpus = _corpus(tmp_path)
    recipe = {"name": "scale", "launch": {"num_processes": 2},
              "merge_options": {"out_shard_size": 10**9},
              "stages": {
                  "cpt": {"train": {"stage": "cpt", "model": str(tiny_model),
                                    "datasets": [str(corpus)], "seq_len": 16,
                                    "args": {**ARGS, "max_steps": 2, "learning_rate": 1e-2,
                                             "save_steps": 100,
                                             "per_device_train_batch_size": 1}}},
                  "avg": {"merge": {"merge_method": "solar_average", "models": [
                      {"model": "cpt", "parameters": {"weight": 0.5}},
                      {"model": str(tiny_model), "parameters": {"weight": 0.5}}]}}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    runs = tmp_path / "runs"
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(runs)])
    assert result.exit_code == 0, result.output
    assert "processes: `2 (MULTI_CPU" in (runs / "cpt" / "README.md").read_text()
    cpt, base = load_file(str(runs / "cpt" / "model.safetensors")), load_file(
        str(tiny_model / "model.safetensors"))
    avg = load_file(str(runs / "avg" / "model.safetensors"))
    key = "model.layers.1.mlp.down_proj.weight"
    assert not torch.equal(cpt[key], base[key])
    assert torch.allclose(avg[key], (cpt[key] + base[key]) / 2, atol=1e-6)
    again = CliRunner().invoke(main, ["run", str(path), "--out", str(runs)])
    assert again.exit_code == 0 and "ran 0 stage(s), skipped 2" in again.output, again.output



def test_run_passes_mergekit_options_to_every_merge(tiny_model_factory, tmp_path):
    """`solar-merge run RECIPE --out-shard-size 100K -j 2`: mergekit's own options reach each
    merge stage (run in its own process), over the recipe's `merge_options:`."""
    import yaml
    from click.testing import CliRunner

    from solar_merge.cli import main

    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    recipe = {"name": "opts", "merge_options": {"out_shard_size": 10**9, "lazy_unpickle": False},
              "stages": {"avg": {"merge": {"merge_method": "solar_average", "models": [
                  {"model": str(m), "parameters": {"weight": 0.5}} for m in (a, b)]}}}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "one" / "avg").glob("*.safetensors")] == [
        "model.safetensors"]  # the recipe's 1 GB shards: one file
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "many"),
                                       "--out-shard-size", "100K", "--lazy-unpickle", "-j", "2"])
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "many" / "avg").glob("model-*.safetensors"))) > 1
