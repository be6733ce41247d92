#!/usr/bin/env python
"""Check solar-merge's GPU paths on one CUDA GPU in a few minutes, offline.

    python benchmarks/gpu_check.py                      # CUDA, a ~1B random Llama-shaped model
    python benchmarks/gpu_check.py --params 500M        # a smaller model
    python benchmarks/gpu_check.py --device cpu         # the same steps, tiny, on the CPU

Made for an air-gapped GPU node (docs/gpu.md: which wheels to bring and how). It builds its
own random-weight models and tokenizer on the device, downloads nothing, and runs the
commands a user runs, each as its own process:

    build      tokenizer (BPE on Python's reference manual) + two random Llama-shaped models
    dus        `solar-merge dus BASE --drop M -o dus.yaml`, then stock `mergekit-yaml --cuda`;
               every output tensor is checked against the layer it was copied from
    merge      solar_average / solar_slerp against mergekit's linear / slerp through stock
               `mergekit-yaml --cuda`: wall-time ratios, and the outputs must agree
    cpt        20 steps of `solar-merge train` (continued pretraining) with no precision set:
               the precision chosen must be the device's (bf16 on compute capability >= 8.0)
    lora_sft   an SFT stage with LoRA (peft), merged into the weights
    qlora_sft  the same with `load_in_4bit` (bitsandbytes, CUDA only)
    eval       `solar-merge eval` of the shipped lm-eval tasks on the device
    memory     peak memory of the cpt step against `solar-merge plan`'s estimate

Writes OUT/gpu_check.json (machine, versions, each step's status, seconds and figures, and
the error of a failed step) and prints a table; exits 1 naming every failed step. A step
whose package was not brought to the node (mergekit, trl, datasets, lm-eval, bitsandbytes)
is `skipped` with the reason; a missing part of the node's own stack (torch, transformers,
accelerate, peft) or of solar-merge fails. Each command's output is in OUT/logs/.
"""

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

CPT_STEPS = 20
# Packages the node is expected to have: a missing one fails the steps that need it.
NODE_STACK = ("torch", "transformers", "accelerate", "peft", "solar_merge")
# What each step imports beyond the node's stack: brought as wheels, else the step is skipped.
NEEDS = {"dus": ("mergekit",), "merge": ("mergekit",), "cpt": ("trl", "datasets"),
         "lora_sft": ("trl", "datasets"), "qlora_sft": ("trl", "datasets"),
         "eval": ("lm_eval", "datasets")}
MEMORY_ENV = "GPU_CHECK_MEMORY_JSON"  # where the trainer hook below writes the peak memory
# measured peak / estimate outside this band fails the memory step (CUDA only): the plan must
# not under-estimate (an OOM users did not plan for) nor over-estimate twofold
MEMORY_BAND = (0.5, 1.25)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


class Skipped(Exception):
    """A step that cannot run here, with the reason (not a failure)."""


class Failed(Exception):
    """A step that ran and failed; the message is what the JSON keeps."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- settings -------------------------------------------------------------------------------

def parse_count(text: str) -> int:
    """1B, 500M, 2.5M, 300k or a plain number -> an int."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMbB]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count such as 1B, 500M or 2M")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[m.group(2).lower()])


def llama_shape(params: int, vocab: int) -> dict:
    """A Llama-shaped config of about `params` parameters: the widest hidden size (a multiple
    of 64, head_dim 64, 4 query heads per KV head, MLP 2.75x as TinyLlama) that still gives
    at least hidden/128 layers and 8 (Llama 2 7B: 4096 x 32; 1B: 2048 x 21); untied
    embeddings."""
    for hidden in (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 128, 64):
        heads = hidden // 64
        kv_heads = max(1, heads // 4)
        inter = int(2.75 * hidden) // 64 * 64
        per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + 3 * hidden * inter \
            + 2 * hidden
        layers = round((params - 2 * vocab * hidden - hidden) / per_layer)
        if layers >= max(8, hidden // 128) or hidden == 64:
            layers = max(layers, 4)
            return {"hidden_size": hidden, "intermediate_size": inter,
                    "num_hidden_layers": layers, "num_attention_heads": heads,
                    "num_key_value_heads": kv_heads, "vocab_size": vocab,
                    "tie_word_embeddings": False, "max_position_embeddings": 2048}
    raise AssertionError("unreachable")


def settings(args) -> dict:
    """Sizes of every step for the device: the tiny CPU run keeps the steps, not the sizes."""
    cuda = args.device == "cuda"
    return {"device": args.device, "vocab": args.vocab or (8192 if cuda else 512),
            "batch": 4 if cuda else 2, "seq_len": 512 if cuda else 64,
            "sft_steps": 10 if cuda else 3, "eval_limit": None if cuda else 4,
            "dtype": "bfloat16" if cuda else "float32", "mergekit_device": ["--cuda"] if cuda
            else [], "tasks": "solar_manual_ppl,solar_manual_qa,solar_arith"}


def default_params(device: str) -> int:
    """1B, or as much as training it with AdamW in mixed precision (18 bytes a parameter,
    plus activations: 24 counted) fits in the GPU's memory; 2M on the CPU."""
    if device != "cuda":
        return 2_000_000
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    return int(min(1e9, total / 24) // 10**7 * 10**7)


# -- the machine ----------------------------------------------------------------------------

def version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as v

    try:
        return v(dist)
    except PackageNotFoundError:
        return None


def cpu_flags() -> list[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    line = re.search(r"^flags\s*:(.*)$", text, re.MULTILINE)
    flags = set(line.group(1).split()) if line else set()
    return sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "os": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cpu_flags": cpu_flags(),
            "cores": os.cpu_count(),
            "versions": {d: version(d) for d in (
                "torch", "transformers", "accelerate", "peft", "mergekit", "trl", "lm_eval",
                "datasets", "bitsandbytes", "safetensors", "solar-merge")}}
    try:
        model = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text())
        info["cpu"] = model.group(1).strip() if model else info["cpu"]
    except OSError:
        pass
    try:
        import torch
    except ImportError:
        return info
    info["torch_cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
    try:
        info["onednn_bf16"] = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        info["onednn_bf16"] = False
    if device == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}",
                       "memory_gb": round(p.total_memory / 1e9, 1),
                       "count": torch.cuda.device_count(), "driver": nvidia_smi_driver()}
    return info


def nvidia_smi_driver() -> str | None:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return None
    out = subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return out.splitlines()[0] if out else None


def expected_precision(info: dict, device: str) -> tuple[str, str]:
    """(precision, why) that `precision: auto` must choose here, from the device alone: bf16
    on CUDA compute capability >= 8.0 or a CPU computing bf16 natively (oneDNN bf16 and
    avx512_bf16/amx_bf16), fp16 on older CUDA GPUs, fp32 otherwise; SOLAR_MERGE_PRECISION
    forces its value."""
    forced = os.environ.get("SOLAR_MERGE_PRECISION", "").strip().lower()
    if forced and forced != "auto":
        return forced, f"SOLAR_MERGE_PRECISION={forced}"
    if device == "cuda":
        cc = info["gpu"]["capability"]
        major, minor = map(int, cc.split("."))
        return ("bf16", f"compute capability {cc} >= 8.0") if (major, minor) >= (8, 0) else \
            ("fp16", f"compute capability {cc} < 8.0")
    native = info.get("onednn_bf16") and {"avx512_bf16", "amx_bf16"} & set(info["cpu_flags"])
    if native:
        return "bf16", "CPU with native bf16"
    return "fp32", (f"CPU without native bf16 (oneDNN bf16: {info.get('onednn_bf16')}, "
                    f"flags: {', '.join(info['cpu_flags']) or 'none'})")


# -- running commands ------------------------------------------------------------------------

class Runner:
    """Runs the user's commands as processes, offline, each logged to OUT/logs/<name>.log."""

    def __init__(self, logs: Path, device: str):
        self.logs = logs
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                    "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        if device == "cpu":  # tiny models: one thread is as fast, and spares a shared machine
            self.env.setdefault("OMP_NUM_THREADS", "1")
        else:  # one GPU, the first visible: a one-process Trainer would use them all
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
            self.env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[0] if visible else "0"

    def tool(self, name: str) -> str:
        here = Path(sys.executable).parent / name
        found = str(here) if here.exists() else shutil.which(name)
        if not found:
            raise Failed(f"`{name}` is not on PATH (is its package installed?)")
        return found

    def __call__(self, name: str, cmd: list, env: dict | None = None) -> float:
        """Run `cmd` (its first item a console script); return its wall seconds. A non-zero
        exit raises Failed with the end of its output."""
        cmd = [self.tool(cmd[0])] + [str(c) for c in cmd[1:]]
        self.logs.mkdir(parents=True, exist_ok=True)
        logfile = self.logs / f"{name}.log"
        log(f"  $ {' '.join(cmd)}")
        t0 = time.perf_counter()
        with open(logfile, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=False,
                                  env={**self.env, **(env or {})}).returncode
        seconds = time.perf_counter() - t0
        if code != 0:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-25:]
            raise Failed(f"`{Path(cmd[0]).name} {' '.join(cmd[1:3])} ...` exited {code} "
                         f"after {seconds:.1f} s ({logfile}):\n" + "\n".join(tail))
        return seconds


# -- build: tokenizer and models on the device ----------------------------------------------

def corpus() -> str:
    """Python's reference manual (pydoc_data.topics): text every Python install has."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def build(work: Path, s: dict, params: int) -> dict:
    from pydoc_data.topics import topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    t0 = time.perf_counter()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe.train_from_iterator(list(topics.values()), trainers.BpeTrainer(
        vocab_size=s["vocab"], special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                  eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    tokenizer_s = time.perf_counter() - t0

    shape = llama_shape(params, len(tok))
    config = LlamaConfig(**shape, bos_token_id=0, eos_token_id=0, pad_token_id=0, head_dim=64,
                         architectures=["LlamaForCausalLM"])
    dtype = getattr(torch, s["dtype"])
    built = {}
    for seed, name in ((0, "base"), (1, "other")):  # two different models for the merges
        torch.manual_seed(seed)
        with torch.device(s["device"]):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        count = sum(p.numel() for p in model.parameters())
        folder = work / name
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        built[name] = folder
        del model
    if s["device"] == "cuda":
        torch.cuda.empty_cache()
    return {"models": {k: str(v) for k, v in built.items()}, "parameters": count,
            "layers": shape["num_hidden_layers"], "hidden": shape["hidden_size"],
            "vocab": len(tok), "dtype": s["dtype"], "tokenizer_s": round(tokenizer_s, 1),
            "summary": f"{count / 1e6:.1f}M parameters, {shape['num_hidden_layers']} layers x "
                       f"{shape['hidden_size']}, vocab {len(tok)}, {s['dtype']}"}


# -- checks on saved weights -----------------------------------------------------------------

def tensors(folder: Path) -> dict:
    """{name: (file, key)} of a safetensors checkpoint (one or many shards)."""
    from safetensors import safe_open

    where = {}
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            where.update(dict.fromkeys(f.keys(), shard))
    return where


def load(where: dict, name: str):
    from safetensors import safe_open

    with safe_open(str(where[name]), framework="pt") as f:
        return f.get_tensor(name)


LAYER = re.compile(r"(\.layers\.)(\d+)(\.)")


def check_dus(base: Path, out: Path, n: int, m: int) -> dict:
    """Output layer k is input layer k for k < n-m, input layer k-(n-m)+m after it (SOLAR's
    layout); every other tensor is copied as is. Bit-for-bit."""
    config = json.loads((out / "config.json").read_text())
    if config["num_hidden_layers"] != 2 * (n - m):
        raise Failed(f"DUS output has num_hidden_layers {config['num_hidden_layers']}, "
                     f"expected {2 * (n - m)}")
    src, dst = tensors(base), tensors(out)
    for name in dst:
        match = LAYER.search(name)
        source = name
        if match:
            k = int(match.group(2))
            j = k if k < n - m else k - (n - m) + m
            source = f"{name[:match.start(2)]}{j}{name[match.end(2):]}"
        if source not in src:
            raise Failed(f"DUS output tensor {name} has no source {source} in the input")
        a, b = load(dst, name), load(src, source)
        if a.shape != b.shape or a.dtype != b.dtype or not bool((a == b).all()):
            raise Failed(f"DUS output tensor {name} differs from input {source}")
    return {"tensors_checked": len(dst), "layers": config["num_hidden_layers"]}


def compare(a_dir: Path, b_dir: Path) -> dict:
    """Largest difference between two checkpoints of the same names, relative to the largest
    value of each tensor, in units of the dtype's epsilon."""
    import torch

    a, b = tensors(a_dir), tensors(b_dir)
    if set(a) != set(b):
        raise Failed(f"{a_dir.name} and {b_dir.name} hold different tensors: "
                     f"{sorted(set(a) ^ set(b))[:3]}")
    worst, worst_name, eps = 0.0, None, None
    for name in sorted(a):
        x, y = load(a, name), load(b, name)
        if x.shape != y.shape:
            raise Failed(f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
        eps = torch.finfo(y.dtype).eps
        scale = float(y.float().abs().max()) or 1.0
        diff = float((x.float() - y.float()).abs().max()) / scale / eps
        if diff > worst:
            worst, worst_name = diff, name
    return {"max_diff_eps": round(worst, 2), "worst_tensor": worst_name, "tensors": len(a)}


# -- the steps -------------------------------------------------------------------------------

class Check:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out).absolute()
        self.work = self.out / "work"
        self.run = Runner(self.out / "logs", args.device)
        self.s = settings(args)
        self.info = machine(args.device)
        self.results: dict = {}
        self.built: dict = {}          # name -> model folder, once the build step passed
        self.built_figures: dict = {}  # the build step's figures (layers, ...)
        self.trained: dict = {}        # the cpt step's precision and memory, once it trained

    def write(self, name: str, text: str) -> Path:
        path = self.work / name
        path.write_text(text)
        return path

    def step(self, name: str, fn) -> None:
        log(f"{name} ...")
        row: dict = {"status": "passed"}
        t0 = time.perf_counter()
        try:
            missing = [p for p in NEEDS.get(name, ()) if importlib.util.find_spec(p) is None]
            if missing:
                raise Skipped(f"not installed: {', '.join(missing)} (docs/gpu.md: which "
                              "wheels to bring)")
            row.update(fn() or {})
        except Skipped as e:
            row = {"status": "skipped", "reason": str(e)}
        except Failed as e:
            row = {"status": "failed", "error": str(e)}
        except Exception as e:  # noqa: BLE001 - a step's crash is its failure, kept whole
            import traceback

            row = {"status": "failed", "error": f"{type(e).__name__}: {e}\n"
                   + "".join(traceback.format_exc().splitlines(True)[-12:])}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        self.results[name] = row
        log(f"{name}: {row['status']} in {row['seconds']} s"
            + (f": {row.get('reason') or row.get('error', '').splitlines()[0]}"
               if row["status"] != "passed" else ""))

    def need_build(self) -> None:
        if not self.built:
            raise Skipped("the build step failed")

    # -- build
    def build(self) -> dict:
        missing = [p for p in NODE_STACK if importlib.util.find_spec(p) is None]
        if missing:
            raise Failed(f"not installed: {', '.join(missing)}: the GPU check needs them")
        if self.args.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise Failed(f"no CUDA device (torch {torch.__version__}, CUDA build "
                             f"{torch.version.cuda}); --device cpu runs the tiny check")
        self.s["params"] = self.args.params or default_params(self.args.device)
        figures = build(self.work, self.s, self.s["params"])
        self.built = {k: Path(v) for k, v in figures.pop("models").items()}
        self.built_figures = figures
        return figures

    # -- 1: DUS through stock mergekit
    def dus(self) -> dict:
        self.need_build()
        base, n = self.built["base"], self.built_figures["layers"]
        m = max(1, n // 4)  # SOLAR: 8 of 32
        config, out = self.work / "dus.yaml", self.work / "dus"
        plan_s = self.run("dus_config", ["solar-merge", "dus", base, "--drop", m, "-o", config])
        merge_s = self.run("dus_mergekit", ["mergekit-yaml", config, out, "--copy-tokenizer",
                                            "--clone-tensors", *self.s["mergekit_device"]])
        figures = check_dus(base, out, n, m)
        shutil.rmtree(out)
        return {**figures, "drop": m, "config_s": round(plan_s, 1),
                "mergekit_s": round(merge_s, 1),
                "summary": f"{n} -> {figures['layers']} layers (--drop {m}), "
                           f"{figures['tensors_checked']} tensors = their source"}

    # -- 2: our merge methods against mergekit's
    def merge(self) -> dict:
        import yaml

        self.need_build()
        a, b = self.built["base"], self.built["other"]
        configs = {
            "solar_average": {"models": [{"model": str(a), "parameters": {"weight": 0.5}},
                                         {"model": str(b), "parameters": {"weight": 0.5}}],
                              "merge_method": "solar_average", "dtype": self.s["dtype"]},
            "solar_slerp": {"models": [{"model": str(a)}, {"model": str(b)}],
                            "base_model": str(a), "merge_method": "solar_slerp",
                            "parameters": {"t": 0.5}, "dtype": self.s["dtype"]}}
        configs["linear"] = {**configs["solar_average"], "merge_method": "linear"}
        configs["slerp"] = {**configs["solar_slerp"], "merge_method": "slerp"}
        figures, problems = {}, []
        # ours first: the first merge reads its inputs from a colder page cache
        for ours, theirs in (("solar_average", "linear"), ("solar_slerp", "slerp")):
            seconds = {}
            for method in (ours, theirs):
                config = self.write(f"{method}.yaml", yaml.safe_dump(configs[method]))
                seconds[method] = self.run(f"merge_{method}", [
                    "mergekit-yaml", config, self.work / method, *self.s["mergekit_device"]])
            agree = compare(self.work / ours, self.work / theirs)
            for method in (ours, theirs):
                shutil.rmtree(self.work / method)
            # both compute in fp32 and round once to the output dtype: at most an ulp apart
            if agree["max_diff_eps"] > 2:
                problems.append(f"{ours} and {theirs} disagree: {agree['max_diff_eps']} eps "
                                f"of {self.s['dtype']} in {agree['worst_tensor']}")
            figures[f"{ours}_vs_{theirs}"] = {
                f"{ours}_s": round(seconds[ours], 1), f"{theirs}_s": round(seconds[theirs], 1),
                "wall_ratio": round(seconds[ours] / seconds[theirs], 3), **agree}
        if problems:
            raise Failed("; ".join(problems))
        figures["summary"] = ", ".join(
            f"{k.replace('_vs_', '/')} {v['wall_ratio']:.2f}x wall, {v['max_diff_eps']} eps"
            for k, v in figures.items())
        return figures

    # -- 3: continued pretraining with precision auto
    def train_cpt(self) -> dict:
        import yaml

        self.need_build()
        corpus_file = self.work / "corpus.txt"
        corpus_file.write_text(corpus(), encoding="utf-8")
        stage = {"stage": "cpt", "model": str(self.built["base"]),
                 "datasets": [{"path": str(corpus_file), "format": "text"}],
                 "seq_len": self.s["seq_len"],
                 "args": {"max_steps": CPT_STEPS, "per_device_train_batch_size": self.s["batch"],
                          "learning_rate": 1e-4, "logging_steps": 1, "save_steps": 1000,
                          "gradient_checkpointing": True, "seed": 42, "report_to": "none"}}
        config, out = self.write("cpt.yaml", yaml.safe_dump(stage, sort_keys=False)), \
            self.work / "cpt"
        memory_json = self.work / "cpt_memory.json"
        hook = f"{Path(__file__).resolve()}:record_peak_memory"
        seconds = self.run("cpt", ["solar-merge", "train", config, "-o", out],
                           env={"SOLAR_MERGE_TEST_HOOKS": "1", "SOLAR_MERGE_TRAINER_HOOK": hook,
                                MEMORY_ENV: str(memory_json)})
        losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
        steps = [r for r in losses if "loss" in r]
        if len(steps) != CPT_STEPS or not all(math.isfinite(r["loss"]) for r in steps):
            raise Failed(f"expected {CPT_STEPS} finite losses in loss.jsonl, got "
                         f"{[r.get('loss') for r in steps]}")
        chosen = chosen_precision(out)
        expected, why = expected_precision(self.info, self.args.device)
        weights = json.loads((out / "config.json").read_text()).get("dtype")
        runtime = next((r["train_runtime"] for r in losses if "train_runtime" in r), None)
        tokens = CPT_STEPS * self.s["batch"] * self.s["seq_len"]
        self.trained = {"precision": chosen, "weights_dtype": weights,
                    "memory": json.loads(memory_json.read_text()) if memory_json.is_file()
                    else None}
        figures = {"steps": len(steps), "first_loss": round(steps[0]["loss"], 3),
                   "last_loss": round(steps[-1]["loss"], 3), "precision": chosen,
                   "expected_precision": expected, "why": why, "weights_dtype": weights,
                   "process_s": round(seconds, 1), "train_runtime_s": runtime,
                   "tokens_per_s": round(tokens / runtime) if runtime else None}
        shutil.rmtree(out)
        if chosen != expected:
            raise Failed(f"precision auto chose {chosen!r}, expected {expected!r} ({why})")
        figures["summary"] = (f"{CPT_STEPS} steps, loss {figures['first_loss']} -> "
                              f"{figures['last_loss']}, precision {chosen} ({why}), "
                              f"{figures['tokens_per_s']} tokens/s")
        return figures

    # -- 4: LoRA and QLoRA SFT
    def sft(self, four_bit: bool) -> dict:
        import yaml

        self.need_build()
        if four_bit and self.args.device != "cuda":
            raise Skipped("load_in_4bit (bitsandbytes) needs a CUDA GPU")
        if four_bit and importlib.util.find_spec("bitsandbytes") is None:
            raise Skipped("not installed: bitsandbytes (QLoRA's 4-bit weights)")
        from pydoc_data.topics import topics

        data = self.work / "sft.jsonl"
        data.write_text("".join(
            json.dumps({"prompt": f"What does Python's reference manual say about `{key}`?",
                        "completion": topics[key][:400].strip()}) + "\n"
            for key in sorted(topics)[:64]))
        name = "qlora_sft" if four_bit else "lora_sft"
        stage = {"stage": "sft", "model": str(self.built["base"]),
                 "datasets": [{"path": str(data), "format": "prompt_completion"}],
                 "seq_len": self.s["seq_len"],
                 "peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                 "load_in_4bit": four_bit,
                 "args": {"max_steps": self.s["sft_steps"],
                          "per_device_train_batch_size": self.s["batch"],
                          "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 1000,
                          "seed": 42, "report_to": "none"}}
        config, out = self.write(f"{name}.yaml", yaml.safe_dump(stage, sort_keys=False)), \
            self.work / name
        seconds = self.run(name, ["solar-merge", "train", config, "-o", out])
        # the adapter was merged into full weights: they must differ from the base's
        changed = compare(out, self.built["base"])
        if changed["max_diff_eps"] == 0:
            raise Failed(f"{name}: the merged weights equal the base's (no LoRA update)")
        chosen = chosen_precision(out)
        shutil.rmtree(out)
        return {"process_s": round(seconds, 1), "precision": chosen,
                "max_change_eps": changed["max_diff_eps"],
                "summary": f"{self.s['sft_steps']} steps, LoRA r 8 on all linears"
                           + (" over a 4-bit base" if four_bit else "")
                           + f", merged; precision {chosen}"}

    # -- 5: lm-eval on the device
    def eval(self) -> dict:
        self.need_build()
        out = self.work / "eval"
        cmd = ["solar-merge", "eval", self.built["base"], "--tasks", self.s["tasks"],
               "--device", self.args.device, "--batch-size", "8", "-o", out]
        if self.s["eval_limit"]:
            cmd += ["--limit", self.s["eval_limit"]]
        seconds = self.run("eval", cmd)
        metrics = json.loads((out / "metrics.json").read_text())
        scores = next(iter(metrics.values()))
        ppl = next((v for k, v in scores.items() if "word_perplexity" in k), None)
        if ppl is None or not math.isfinite(ppl):
            raise Failed(f"solar_manual_ppl gave no finite word_perplexity: {scores}")
        return {"process_s": round(seconds, 1), "metrics": scores,
                "summary": f"{self.s['tasks']} on {self.args.device}, word perplexity "
                           f"{ppl:.4g} (random weights)"}

    # -- 6: peak training memory against the plan
    def memory(self) -> dict:
        if not self.trained:
            raise Skipped("the cpt step did not train")
        measured = self.trained["memory"]
        if not measured:
            raise Failed("the cpt step's trainer hook wrote no memory figures")
        chosen, weights = self.trained["precision"], self.trained["weights_dtype"]
        # plan's words: bf16 / fp16 = autocast over fp32 weights, bf16-weights = bf16 weights
        precision = "bf16-weights" if chosen == "bf16" and weights == "bfloat16" else chosen
        run = self.run("plan", ["solar-merge", "plan", self.built["base"], "--stage", "cpt",
                                "--precision", precision, "--batch", self.s["batch"],
                                "--seq-len", self.s["seq_len"], "--checkpointing"])
        text = (self.out / "logs" / "plan.log").read_text()
        # plan's table row: | 1 device | 2.469 | of which ... | (GB per device; best in bold)
        m = re.search(r"\|\s*1 device\s*\|\s*\**([0-9.]+)\**\s*\|", text)
        if not m or "GB per device" not in text:
            raise Failed(f"no `1 device` estimate in `solar-merge plan`'s output:\n{text[-800:]}")
        estimate = float(m.group(1)) * 1e9
        figures = {"plan_precision": precision, "estimate_bytes": int(estimate),
                   "plan_s": round(run, 1), **measured}
        if measured["device"] == "cuda":
            peak = measured["max_memory_allocated"]
            ratio = peak / estimate
            figures["ratio"] = round(ratio, 3)
            figures["summary"] = (f"peak {peak / 1e9:.2f} GB allocated vs plan "
                                  f"{estimate / 1e9:.2f} GB ({precision}): {ratio:.2f}x")
            if not MEMORY_BAND[0] <= ratio <= MEMORY_BAND[1]:
                raise Failed(figures["summary"] + f", outside {MEMORY_BAND}")
        else:
            grown = measured["peak_rss"] - measured["rss_at_train_begin"]
            figures["summary"] = (f"CPU: peak RSS {measured['peak_rss'] / 1e9:.2f} GB "
                                  f"(+{grown / 1e6:.0f} MB while training) vs plan "
                                  f"{estimate / 1e6:.1f} MB; not compared (RSS holds the "
                                  "interpreter and libraries)")
        return figures

    def all(self) -> dict:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        t0 = time.perf_counter()
        self.step("build", self.build)
        self.step("dus", self.dus)
        self.step("merge", self.merge)
        self.step("cpt", self.train_cpt)
        self.step("lora_sft", lambda: self.sft(False))
        self.step("qlora_sft", lambda: self.sft(True))
        self.step("eval", self.eval)
        self.step("memory", self.memory)
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return {"machine": self.info, "settings": self.s,
                "steps": self.results, "seconds": round(time.perf_counter() - t0, 1),
                "failed": [k for k, v in self.results.items() if v["status"] == "failed"],
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def chosen_precision(stage_dir: Path) -> str | None:
    """The precision a finished stage reports on its card (README.md: "- precision: `bf16
    (auto: ...)`")."""
    card = stage_dir / "README.md"
    m = re.search(r"^- precision: `(bf16|fp16|fp32)\b", card.read_text() if card.is_file()
                  else "", re.MULTILINE)
    return m.group(1) if m else None


# -- the trainer hook (runs inside `solar-merge train`, see SOLAR_MERGE_TRAINER_HOOK) --------

def record_peak_memory(trainer, info) -> None:
    """Writes the process's peak memory when training ends to $GPU_CHECK_MEMORY_JSON: CUDA's
    max_memory_allocated/reserved, or on the CPU the peak RSS and the RSS when training began."""
    import resource

    import torch
    from transformers import TrainerCallback

    path = os.environ.get(MEMORY_ENV)

    def rss() -> int:
        fields = Path("/proc/self/statm").read_text().split()
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")

    class PeakMemory(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.begin = rss()

        def on_train_end(self, args, state, control, **kwargs):
            if not path or not state.is_world_process_zero:
                return
            if torch.cuda.is_available() and args.device.type == "cuda":
                row = {"device": "cuda", "max_memory_allocated": torch.cuda.max_memory_allocated(),
                       "max_memory_reserved": torch.cuda.max_memory_reserved()}
            else:
                row = {"device": "cpu", "rss_at_train_begin": self.begin,
                       "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
            Path(path).write_text(json.dumps(row))

    trainer.add_callback(PeakMemory())


# -- report ----------------------------------------------------------------------------------

def table(result: dict) -> str:
    rows = [("step", "status", "seconds", "result")]
    for name, r in result["steps"].items():
        what = r.get("summary") or r.get("reason") or (r.get("error") or "").splitlines()[0]
        rows.append((name, r["status"], f"{r['seconds']:.1f}", what))
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{width[0]}}  {b:<{width[1]}}  {c:>{width[2]}}  {d}" for a, b, c, d in rows]
    m = result["machine"]
    gpu = m.get("gpu")
    where = (f"{gpu['name']} (compute capability {gpu['capability']}, {gpu['memory_gb']} GB, "
             f"driver {gpu['driver']}, CUDA {m.get('torch_cuda')})" if gpu else m["cpu"])
    v = m["versions"]
    return "\n".join([f"gpu_check on {where}",
                      "torch {torch}, transformers {transformers}, accelerate {accelerate}, "
                      "peft {peft}, mergekit {mergekit}, trl {trl}, lm-eval {lm_eval}".format(**v),
                      *lines, f"total {result['seconds']:.1f} s"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cuda: the first visible GPU (choose it with CUDA_VISIBLE_DEVICES); "
                        "cpu: the same steps at a tiny size")
    p.add_argument("--params", type=parse_count,
                   help="size of the random model, e.g. 1B, 500M (default: 1B, less when the "
                        "GPU has under 24 GB; 2M on the CPU)")
    p.add_argument("--vocab", type=int, help="tokenizer size (default 8192; 512 on the CPU)")
    p.add_argument("--out", default="runs/gpu_check",
                   help="folder for gpu_check.json, logs/ and the models (work/)")
    p.add_argument("--keep", action="store_true", help="keep OUT/work (models, configs)")
    args = p.parse_args(argv)
    check = Check(args)
    result = check.all()
    out = Path(args.out) / "gpu_check.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table(result))
    print(f"results: {out}")
    if result["failed"]:
        print(f"FAILED: {', '.join(result['failed'])} (errors in {out}, logs in "
              f"{Path(args.out) / 'logs'})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
