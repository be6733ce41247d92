"""Training stages on tiny random models: a few TRL steps each, seconds per test."""

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from solar_merge import testhooks
from solar_merge.errors import UserError
from solar_merge.stages import STAGES, load_stage_config, resolve, train
from solar_merge.stages.logs import read_loss
from solar_merge.stages.models import checksum

ROOT = Path(__file__).resolve().parent.parent
# Small and fast on 2 CPU cores; every key is a plain trl.SFTConfig / DPOConfig field.
FAST = {"logging_steps": 1, "per_device_train_batch_size": 4, "gradient_checkpointing": False,
        "dataloader_num_workers": 0, "save_steps": 100}


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _losses(out: Path) -> list[float]:
    return [loss for _, loss in read_loss(out / "loss.jsonl")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: these models are small, and the 2 cores are shared (two threads
    spin-wait on each other under load: 3x the CPU time of one, measured on this file)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def hooks(monkeypatch):
    """Calls of the pre-train hook: (trainer, info) for every trainer.train() of a stage."""
    calls: list = []
    monkeypatch.setattr(testhooks, "TRAINER_HOOKS", [lambda t, info: calls.append((t, info))])
    return calls


class _Stop(Exception):
    """Raised by the `stopped` hook: the trainer is built (data tokenized), nothing trained."""


@pytest.fixture
def stopped(monkeypatch):
    """Like `hooks`, but every stage stops right before trainer.train()."""
    calls: list = []

    def stop(trainer, info):
        calls.append((trainer, info))
        raise _Stop

    monkeypatch.setattr(testhooks, "TRAINER_HOOKS", [stop])
    return calls


def _text_file(tmp_path: Path) -> Path:
    from pydoc_data.topics import topics

    text = "\n\n".join([next(iter(topics.values()))[:600]] * 6)  # a tiny set to overfit
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


QA = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."}
      for i in range(6)]
ORCA = [{"system_prompt": "Answer briefly.", "question": f"Name colour {i}.",
         "response": f"Colour number {i} is blue."} for i in range(3)]
CHAT = [{"messages": [{"role": "user", "content": f"Echo {w}"},
                      {"role": "assistant", "content": f"{w} {w}"}]} for w in ("red", "green")]
PREFS = [{"prompt": f"What is {i} times 2?", "chosen": f"{i} times 2 is {2 * i}.",
          "rejected": f"I do not know {i}."} for i in range(8)]


# -- config: schema, overrides, paths (no torch) -------------------------------------------

def test_resolve_imports_no_torch_and_fills_defaults(tmp_path, tiny_model):
    (tmp_path / "d.jsonl").write_text("{}\n")
    code = (
        "import sys, json\nfrom solar_merge.stages import resolve\n"
        f"r = resolve({{'stage': 'cpt', 'model': {str(tiny_model)!r}, 'datasets': ['d.jsonl'],"
        " 'seq_len': 64}, base_dir=sys.argv[1])\n"
        "assert not {'torch', 'trl', 'transformers'} & set(sys.modules), 'heavy import'\n"
        "print(json.dumps(r))\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                         text=True, check=True)
    r = json.loads(out.stdout)
    assert r["datasets"][0]["path"] == str(tmp_path / "d.jsonl")
    assert r["args"]["max_length"] == 64 and r["args"]["packing"] is True
    assert r["args"]["report_to"] == "none" and r["precision"] == "auto"
    assert "bf16" not in r["args"]  # TRL's bf16/fp16: the precision decision's, at train time


def test_overrides_and_relative_paths(tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "m")
    _jsonl(tmp_path / "qa.jsonl", QA)
    config = {"stage": "sft", "model": "m", "datasets": [{"path": "qa.jsonl"}],
              "args": {"learning_rate": 1e-5}}
    r = resolve(config, ["args.learning_rate=1e-4", "seq_len=48", "datasets.0.max_samples=3",
                         "args.num_train_epochs=2"], base_dir=tmp_path)
    assert r["model"] == str(tmp_path / "m")
    assert r["args"]["learning_rate"] == 1e-4 and r["args"]["max_length"] == 48
    assert r["args"]["num_train_epochs"] == 2 and r["datasets"][0]["max_samples"] == 3
    assert r["args"]["completion_only_loss"] is True
    # top-level beta is args.beta
    r = resolve({"stage": "dpo", "model": "m", "datasets": ["qa.jsonl"], "beta": 0.3},
                base_dir=tmp_path)
    assert r["args"]["beta"] == 0.3 and r["ref_model"] == r["model"] and "beta" not in r


def test_paths_typed_on_the_command_line_are_relative_to_the_current_folder(
        tmp_path, tiny_model, monkeypatch):
    """`solar-merge train training/cpt.yaml model=runs/dus datasets.0.path=corpus.txt`: the
    paths in the YAML are the YAML's, the ones typed after it the shell's."""
    from solar_merge.stages.schema import command_line_overrides

    here, configs = tmp_path / "here", tmp_path / "configs"
    shutil.copytree(tiny_model, here / "runs" / "dus")
    _jsonl(here / "corpus.jsonl", QA)
    configs.mkdir()
    monkeypatch.chdir(here)
    typed = ["model=runs/dus", "datasets.0.path=corpus.jsonl", "output=out/cpt",
             "ref_model=HuggingFaceTB/SmolLM2-135M", "args.learning_rate=1e-4",
             "datasets.0.path=later.jsonl"]
    assert command_line_overrides(typed) == [
        f"model={here}/runs/dus", f"datasets.0.path={here}/corpus.jsonl",
        f"output={here}/out/cpt", "ref_model=HuggingFaceTB/SmolLM2-135M",
        "args.learning_rate=1e-4", f"datasets.0.path={here}/later.jsonl"]
    config = {"stage": "sft", "model": "m", "datasets": [{"path": "qa.jsonl"}]}
    r = resolve(config, command_line_overrides(typed[:2]), base_dir=configs)
    assert r["model"] == str(here / "runs" / "dus")
    assert r["datasets"][0]["path"] == str(here / "corpus.jsonl")


def test_launch_is_checked_and_not_part_of_the_hash(tmp_path, tiny_model):
    from solar_merge.stages import stage_hash

    _jsonl(tmp_path / "qa.jsonl", QA)
    config = {"stage": "sft", "model": str(tiny_model), "datasets": ["qa.jsonl"]}
    plain = resolve(config, base_dir=tmp_path)
    launched = resolve({**config, "launch": {"accelerate_config": "zero3", "num_processes": 8,
                                             "device_memory": "80GB"}}, base_dir=tmp_path)
    assert launched["launch"] == {"accelerate_config": "zero3", "num_processes": 8,
                                  "num_machines": 1, "machine_rank": 0,
                                  "device_memory": 80 * 10**9}
    assert "launch" not in plain and stage_hash(plain) == stage_hash(launched)
    for bad, message in (({"num_machines": 2}, "need the address of machine 0"),
                         ({"machine_rank": 1}, "machine_rank 1 of num_machines 1"),
                         ({"num_processes": 1, "num_machines": 2, "main_process_ip": "h"},
                          "cannot cover 2 machines"),
                         ({"device_memory": "lots"}, "is not a size"),
                         ({"num_proceses": 2}, "did you mean `num_processes`")):
        with pytest.raises(UserError, match=message):
            resolve({**config, "launch": bad}, base_dir=tmp_path)
    with pytest.raises(UserError, match="LoRA setting"):
        resolve({**config, "keep_adapter": True}, base_dir=tmp_path)
    with pytest.raises(UserError, match="trainable_layers and peft"):
        resolve({**config, "peft": {"r": 4}, "trainable_layers": [1]}, base_dir=tmp_path)
    with pytest.raises(UserError, match="adapter switched off"):
        resolve({**config, "stage": "dpo", "ref_model": str(tmp_path), "peft": {"r": 4}},
                base_dir=tmp_path)


@pytest.mark.parametrize("change, expected", [
    ({"trainable_layer": [1]}, "did you mean `trainable_layers`"),
    ({"args": {"lerning_rate": 1e-4}}, "did you mean `learning_rate`"),
    ({"args": {"output_dir": "x"}}, "set by solar-merge"),
    ({"datasets": [{"path": "qa.jsonl", "max_sample": 3}]}, "did you mean `max_samples`"),
    ({"stage": "sdpo"}, "stage"),
    ({"trainable_layers": [9]}, "layer 9 does not exist"),
    ({"steps": 3}, "only used by stepwise_dpo"),
])
def test_config_errors(tmp_path, tiny_model, change, expected):
    _jsonl(tmp_path / "qa.jsonl", QA)
    config = {"stage": "sft", "model": str(tiny_model), "datasets": ["qa.jsonl"], **change}
    with pytest.raises(UserError, match=expected):
        resolve(config, base_dir=tmp_path)


def test_shipped_stage_configs_are_valid():
    from solar_merge.stages import StageConfig, check_args

    seen = set()
    for name in STAGES:
        path = ROOT / "training" / f"{name}.yaml"
        assert path.read_text().startswith(f"# solar-merge train training/{name}.yaml")
        cfg = StageConfig.model_validate(load_stage_config(path))
        check_args(cfg.stage, cfg.args)
        seen.add(cfg.stage)
    assert seen == set(STAGES)


def test_activation_checkpointing_is_gradient_checkpointing_on_older_transformers(
        tmp_path, tiny_model, monkeypatch):
    """transformers < 5.23 knows the setting as `gradient_checkpointing` only."""
    from solar_merge.stages import schema

    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    config = {"stage": "cpt", "model": str(tiny_model), "datasets": ["d.jsonl"],
              "args": {"activation_checkpointing": True}}
    assert resolve(config, base_dir=tmp_path)["args"]["activation_checkpointing"] is True
    older = schema.trl_fields("cpt") - {"activation_checkpointing",
                                        "activation_checkpointing_kwargs"}
    monkeypatch.setitem(schema._FIELD_CACHE, "SFTConfig", older)
    args = resolve(config, base_dir=tmp_path)["args"]
    assert args["gradient_checkpointing"] is True and "activation_checkpointing" not in args


# -- cpt -----------------------------------------------------------------------------------

def test_cpt_packs_and_trains_only_chosen_layers(tmp_path, tiny_model, hooks):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

    saved = []

    class Saves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            saved.append(state.global_step)

    testhooks.TRAINER_HOOKS.append(lambda trainer, info: trainer.add_callback(Saves()))
    corpus = _text_file(tmp_path)
    trainer_config = {"stage": "cpt", "model": str(tiny_model), "datasets": [str(corpus)],
                      "seq_len": 32, "trainable_layers": [1, 2],
                      # TRL's default gradient checkpointing stays on: frozen inputs must work
                      "args": {**FAST, "gradient_checkpointing": True, "max_steps": 8,
                               "learning_rate": 3e-2}}
    out = train(trainer_config, tmp_path / "out")
    (trainer, _), = hooks
    # no full checkpoint after the last step (save_steps 100 > 8 steps): the model is saved
    # once, by save_final (a checkpoint there cost 14 bytes a parameter of writing for nothing)
    assert saved == [] and trainer.state.global_step == 8
    lengths = {len(x) for x in trainer.train_dataset["input_ids"]}
    assert max(lengths) == 32 and len(trainer.train_dataset) > 8  # packed into 32-token blocks
    losses = _losses(out)
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert sum(losses[-2:]) < sum(losses[:2]) - 0.05, losses  # frozen embeddings: slow
    before, after = _weights(tiny_model), _weights(out)
    assert before.keys() == after.keys()
    for name in before:
        changed = not before[name].equal(after[name])
        assert changed == (".layers.1." in name or ".layers.2." in name), name
    # a clean HF checkpoint: no trainer leftovers, tokenizer + chat template, tied stays tied
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "stage_config.yaml", "loss.jsonl",
            "loss.png"} <= names
    assert not [n for n in names if n.startswith("checkpoint-") or n.endswith(".bin")
                or n == "resolved_hash"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    assert "im_start" in tok.chat_template
    # documents are separated by the pretraining <|endoftext|>, never by the chat's <|im_end|>
    # (the tiny tokenizer's EOS, used by its chat template); the model keeps its own EOS
    ids = [i for row in trainer.train_dataset["input_ids"] for i in row]
    assert ids.count(tok.convert_tokens_to_ids("<|endoftext|>")) >= 5
    assert tok.convert_tokens_to_ids("<|im_end|>") not in ids
    assert tok.eos_token == "<|im_end|>" and model.config.eos_token_id == 2
    assert model.generation_config.eos_token_id == 2
    # the model card: base model, data with its sha256, the stage config, the loss curve
    import hashlib

    card = (out / "README.md").read_text()
    assert f"base model: `{tiny_model.name}` (local)" in card
    assert f"| `corpus.txt` (local) | auto | train | all | " \
           f"{hashlib.sha256(corpus.read_bytes()).hexdigest()} |" in card
    assert "document separator: `<|endoftext|>`" in card
    assert "![training loss](loss.png)" in card and f"{losses[-1]:.4g} at step 8" in card
    assert "trainable_layers:\n- 1\n- 2" in card and "tags:\n- mergekit" in card
    assert "- cpt" in card.split("---")[1]  # the kind is a tag in the front matter
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert str(tmp_path) not in card  # no local path travels with the card
    saved = load_stage_config(out / "stage_config.yaml")
    assert saved["trainable_layers"] == [1, 2] and saved["model"] == os.path.relpath(tiny_model, out)
    # the resolved config is itself a valid stage config; its paths are relative to the output
    assert _normpaths(resolve(saved, base_dir=out)) == _normpaths(
        resolve(trainer_config, base_dir=tmp_path))


@pytest.mark.smollm2
def test_cpt_separator_of_an_instruct_tokenizer_is_not_its_end_of_turn():
    """SmolLM2-Instruct's EOS is the chat's <|im_end|>: cpt packs with <|endoftext|>."""
    from transformers import AutoTokenizer

    from solar_merge.embedded import embedded_model
    from solar_merge.stages.cpt import document_separator

    tok = AutoTokenizer.from_pretrained(embedded_model())
    assert tok.eos_token == "<|im_end|>" and "<|im_end|>" in tok.chat_template
    assert document_separator(tok, tok.chat_template) == "<|endoftext|>"
    assert document_separator(tok, None) == "<|im_end|>"  # no chat: the EOS is a document end
    # Llama 3 Instruct's way: the template names `eos_token` instead of spelling it out
    assert document_separator(tok, "{{ m + eos_token }}") == "<|endoftext|>"


def _normpaths(value):
    """`value` with its absolute paths normalised (`out/../x` and `x` are one file)."""
    if isinstance(value, dict):
        return {k: _normpaths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normpaths(v) for v in value]
    return os.path.normpath(value) if isinstance(value, str) and os.path.isabs(value) else value


# -- sft -----------------------------------------------------------------------------------

def test_sft_masks_prompts_and_overfits(tmp_path, tiny_model, hooks):
    from transformers import AutoTokenizer

    data = [_jsonl(tmp_path / "qa.jsonl", QA), _jsonl(tmp_path / "orca.jsonl", ORCA),
            _jsonl(tmp_path / "chat.jsonl", CHAT)]
    out = train({"stage": "sft", "model": str(tiny_model), "seq_len": 64,
                 "datasets": [{"path": str(data[0]), "max_samples": 4}, str(data[1]),
                              {"path": str(data[2]), "format": "messages"}],
                 "args": {**FAST, "max_steps": 10, "learning_rate": 1e-2}},
                tmp_path / "out")
    (trainer, _), = hooks
    assert len(trainer.train_dataset) == 4 + 3 + 2  # max_samples honoured
    tok = AutoTokenizer.from_pretrained(tiny_model)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 4, 7)])
    # the expected labels, built independently: render the prompt (with the generation
    # prompt) and the whole exchange through the chat template; labels are the tokens after
    # the prompt (answer + <|im_end|>\n), -100 on the prompt and on the padding
    exchanges = [([{"role": "user", "content": QA[0]["instruction"]}], QA[0]["output"]),
                 ([{"role": "system", "content": ORCA[0]["system_prompt"]},
                   {"role": "user", "content": ORCA[0]["question"]}], ORCA[0]["response"]),
                 (CHAT[0]["messages"][:1], CHAT[0]["messages"][1]["content"])]
    width = batch["input_ids"].shape[1]
    for ids, labels, (prompt, answer) in zip(batch["input_ids"].tolist(),
                                             batch["labels"].tolist(), exchanges):
        def encode(text):
            return tok(text, add_special_tokens=False)["input_ids"]

        head = encode(tok.apply_chat_template(prompt, tokenize=False,
                                              add_generation_prompt=True))
        full = encode(tok.apply_chat_template(
            prompt + [{"role": "assistant", "content": answer}], tokenize=False))
        assert full[:len(head)] == head and ids[:len(full)] == full
        assert labels == [-100] * len(head) + full[len(head):] + [-100] * (width - len(full))
        assert tok.decode(full[len(head):]) == answer + "<|im_end|>\n"
    losses = _losses(out)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] * 0.8


# A ChatML template whose assistant turns are marked for TRL's assistant_only_loss.
MARKED_CHATML = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}\n{% else %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TURNS = [{"messages": [{"role": "system", "content": "Answer in one word."},
                       {"role": "user", "content": f"Name a {thing}."},
                       {"role": "assistant", "content": first},
                       {"role": "user", "content": "Another one?"},
                       {"role": "assistant", "content": second}]}
         for thing, first, second in (("colour", "red", "blue"), ("fruit", "apple", "pear"))]


def _label_runs(trainer, rows) -> list[list[str]]:
    """Per row, the decoded runs of consecutive tokens that carry a label."""
    tok = trainer.processing_class
    batch = trainer.data_collator([trainer.train_dataset[i] for i in rows])
    out = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        runs, run = [], []
        for token, label in zip(ids, labels):
            if label != -100:
                assert label == token
                run.append(token)
            elif run:
                runs, run = runs + [tok.decode(run)], []
        out.append(runs + ([tok.decode(run)] if run else []))
    return out


def test_sft_trains_every_assistant_turn(tmp_path, tiny_model, stopped):
    template = tmp_path / "marked.jinja"
    template.write_text(MARKED_CHATML)
    data = [_jsonl(tmp_path / "turns.jsonl", TURNS), _jsonl(tmp_path / "qa.jsonl", QA[:1])]
    config = {"stage": "sft", "model": str(tiny_model), "seq_len": 96,
              "datasets": [str(d) for d in data],
              "args": {**FAST, "max_steps": 1, "chat_template_path": str(template)}}
    with pytest.raises(_Stop):
        train(config, tmp_path / "out")
    (trainer, _), = stopped
    assert trainer.args.assistant_only_loss
    assert _label_runs(trainer, [0, 1, 2]) == [["red<|im_end|>", "blue<|im_end|>"],
                                               ["apple<|im_end|>", "pear<|im_end|>"],
                                               [QA[0]["output"] + "<|im_end|>"]]
    # without generation markers (the tiny tokenizer's own template) the stage refuses
    config["args"].pop("chat_template_path")
    with pytest.raises(UserError, match=r"(?s)does not mark assistant turns.*\{% generation %\}"):
        train(config, tmp_path / "out2")
    assert len(stopped) == 1


# -- dpo -----------------------------------------------------------------------------------

def test_dpo_trains_against_explicit_reference(tmp_path, tiny_model_factory, hooks):
    model = tiny_model_factory(seed=0)
    ref = tiny_model_factory(seed=1)
    data = _jsonl(tmp_path / "prefs.jsonl", PREFS)
    out = train({"stage": "dpo", "model": str(model), "ref_model": str(ref), "beta": 0.5,
                 "datasets": [str(data)], "seq_len": 64,
                 "args": {**FAST, "max_steps": 4, "learning_rate": 5e-3}}, tmp_path / "out")
    (trainer, info), = hooks
    assert info["ref_model"] == str(ref) and trainer.args.beta == 0.5
    assert checksum(trainer.ref_model) == checksum(
        _load(ref)) != checksum(_load(model))
    losses = _losses(out)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert _weights(out).keys() == _weights(model).keys()


def test_trainable_layers_all_freezes_only_embeddings_head_and_final_norm(tmp_path, tiny_model,
                                                                         hooks):
    """The demo's SFT and DPO stages: every decoder layer trains; the tied embedding (whose
    gradient and optimizer update over the whole vocabulary were DPO's largest transients)
    and the final norm stay as they were. With checkpointing and the reference precomputed,
    as the demo runs them."""
    from solar_merge import memory

    data = _jsonl(tmp_path / "prefs.jsonl", PREFS)
    config = {"stage": "dpo", "model": str(tiny_model), "datasets": [str(data)],
              "seq_len": 64, "trainable_layers": "all",
              "args": {**FAST, "max_steps": 3, "learning_rate": 5e-3, "optim": "adafactor",
                       "gradient_checkpointing": True, "precompute_ref_log_probs": True}}
    out = train(config, tmp_path / "out")
    (trainer, _), = hooks
    assert trainer.ref_model is None  # the reference was scored once, not kept
    before, after = _weights(tiny_model), _weights(out)
    layers = [n for n in before if ".layers." in n]
    assert layers and all(not before[n].equal(after[n]) for n in layers)
    assert [n for n in before if ".layers." not in n] == ["model.embed_tokens.weight",
                                                          "model.norm.weight"]
    assert all(before[n].equal(after[n]) for n in before if ".layers." not in n)
    # the memory plan counts the same trainable parameters as the explicit list of every layer
    shape = memory.Shape.from_config(json.loads((tiny_model / "config.json").read_text()))
    resolved = resolve(config, base_dir=tmp_path)
    assert resolved["trainable_layers"] == "all"
    assert memory.from_stage(resolved, shape) == memory.from_stage(
        {**resolved, "trainable_layers": list(range(shape.layers))}, shape)
    assert memory.from_stage(resolved, shape).total < memory.from_stage(
        {**resolved, "trainable_layers": None}, shape).total


# HuggingFaceH4/ultrafeedback_binarized's layout: a prompt string, and conversations that
# already start with it; trl-lib/ultrafeedback_binarized's: the conversations only.
H4_PREFS = [{"prompt": f"What is {i} times 2?",
             "chosen": [{"role": "user", "content": f"What is {i} times 2?"},
                        {"role": "assistant", "content": f"{i} times 2 is {2 * i}."}],
             "rejected": [{"role": "user", "content": f"What is {i} times 2?"},
                          {"role": "assistant", "content": f"I do not know {i}."}]}
            for i in range(4)]
IMPLICIT_PREFS = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in H4_PREFS]


def test_dpo_takes_hub_layouts_as_trl_does(tmp_path, tiny_model, stopped):
    """Both layouts tokenize exactly as TRL's own DPOTrainer tokenizes the implicit rows:
    the prompt once (as context), the answers without it."""
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    ours = {}
    for name, rows in (("h4", H4_PREFS), ("implicit", IMPLICIT_PREFS)):
        data = _jsonl(tmp_path / f"{name}.jsonl", rows)
        with pytest.raises(_Stop):
            train({"stage": "dpo", "model": str(tiny_model), "datasets": [str(data)],
                   "seq_len": 64, "args": {**FAST, "max_steps": 1}}, tmp_path / name)
        ours[name] = stopped[-1][0].train_dataset
    tok = AutoTokenizer.from_pretrained(tiny_model)
    args = DPOConfig(output_dir=str(tmp_path / "trl"), max_length=64, use_cpu=True,
                     report_to="none", bf16=False)
    theirs = DPOTrainer(model=_load(tiny_model), ref_model=_load(tiny_model), args=args,
                        train_dataset=datasets.Dataset.from_list(IMPLICIT_PREFS),
                        processing_class=tok).train_dataset
    columns = ("prompt_ids", "chosen_ids", "rejected_ids")
    for name, dataset in ours.items():
        for col in columns:
            assert dataset[col] == theirs[col], (name, col)
    text = tok.decode(theirs[0]["prompt_ids"] + theirs[0]["chosen_ids"])
    assert text.count("What is 0 times 2?") == 1 and "0 times 2 is 0." in text


def test_dpo_refuses_a_record_without_any_prompt(tmp_path, tiny_model, stopped):
    rows = [{"chosen": [{"role": "assistant", "content": "a"}],
             "rejected": [{"role": "assistant", "content": "b"}]}]
    data = _jsonl(tmp_path / "p.jsonl", rows)
    with pytest.raises(UserError, match="record 0 has no prompt"):
        train({"stage": "dpo", "model": str(tiny_model), "datasets": [str(data)],
               "args": {**FAST, "max_steps": 1}}, tmp_path / "out")
    assert stopped == []


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def test_stepwise_dpo_uses_previous_step_as_reference(tmp_path, tiny_model, hooks):
    data = _jsonl(tmp_path / "prefs.jsonl", PREFS)
    out = train({"stage": "stepwise_dpo", "model": str(tiny_model), "datasets": [str(data)],
                 "steps": 2, "keep_steps": True, "beta": 0.1, "seq_len": 64,
                 "args": {**FAST, "max_steps": 2, "learning_rate": 5e-3}}, tmp_path / "out")
    steps = json.loads((out / "steps.json").read_text())
    assert [s["records"] for s in steps] == [4, 4] and [s["first_record"] for s in steps] == [0, 4]
    # step 1: reference = the starting model; step 2: reference = step 1's result
    assert steps[0]["ref_checksum"] == checksum(_load(tiny_model))
    step1 = out / "steps" / "step-1"
    assert steps[0]["ref_model"] == steps[0]["model"] == str(tiny_model)
    assert steps[1]["ref_model"] == "steps/step-1" == steps[1]["model"]
    assert steps[1]["ref_checksum"] == steps[0]["result_checksum"] == checksum(
        _load(step1))
    assert steps[1]["ref_checksum"] != steps[0]["ref_checksum"]  # step 1 did change the weights
    assert checksum(_load(out)) == steps[1]["result_checksum"]
    # the trainers really got those references, and the data chunks in order
    assert [checksum(t.ref_model) for t, _ in hooks] == [s["ref_checksum"] for s in steps]
    assert [t.train_dataset.num_rows for t, _ in hooks] == [4, 4]
    assert len(_losses(out)) == 4


# -- resume, skip, re-run ------------------------------------------------------------------

def test_killed_stage_resumes_to_the_same_weights(tmp_path, tiny_model, hooks, caplog):
    import torch

    corpus = _text_file(tmp_path)
    config = {"stage": "cpt", "model": str(tiny_model), "datasets": [str(corpus)],
              "seq_len": 32, "args": {**FAST, "max_steps": 6, "save_steps": 3, "seed": 7,
                                      "per_device_train_batch_size": 2,
                                      "learning_rate": 1e-3}}
    killed = tmp_path / "killed"
    script = ("import json, sys\nfrom solar_merge.stages import train\n"
              "train(json.loads(sys.argv[1]), sys.argv[2])\n")
    env = dict(os.environ, SOLAR_MERGE_KILL_AT="after-checkpoint-3", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script, json.dumps(config), str(killed)],
                          env=env, capture_output=True, text=True, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = killed.parent / f".{killed.name}.partial"
    assert (partial / "checkpoint-3").is_dir() and not killed.exists()

    with caplog.at_level(logging.INFO, logger="solar_merge.stages"):
        train(config, killed)
    assert f"cpt: resuming from {partial / 'checkpoint-3'}" in caplog.text
    straight = train(config, tmp_path / "straight")
    a, b = _weights(killed), _weights(straight)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6, rtol=0), name
    assert [s for s, _ in read_loss(killed / "loss.jsonl")] == [1, 2, 3, 4, 5, 6]

    # finished + same config: skipped; a changed config runs again (stopped in the pre-train
    # hook here to save time: the finished output stays untouched until a new one is complete)
    n = len(hooks)
    marker = (straight / "solar_merge_complete.json").read_text()
    assert train(config, straight) == straight and len(hooks) == n

    def stop(trainer, info):
        raise KeyboardInterrupt

    testhooks.TRAINER_HOOKS.append(stop)
    with pytest.raises(KeyboardInterrupt):
        train(config, straight, overrides=["args.max_steps=2"])
    assert len(hooks) == n + 1 and trainer_max_steps(hooks[-1][0]) == 2
    assert (straight / "solar_merge_complete.json").read_text() == marker


def trainer_max_steps(trainer) -> int:
    return trainer.args.max_steps


# -- bad input: clear errors before any training -------------------------------------------

def _no_template_model(tmp_path, tiny_model):
    m = tmp_path / "no-template"
    shutil.copytree(tiny_model, m)
    (m / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    return m


def _other_vocab_model(tmp_path, tiny_model):
    m = tmp_path / "other-vocab"
    shutil.copytree(tiny_model, m)
    cfg = json.loads((m / "config.json").read_text())
    cfg["vocab_size"] = 512
    (m / "config.json").write_text(json.dumps(cfg))
    return m


@pytest.mark.parametrize("case", ["missing-column", "empty", "no-chat-template",
                                  "ref-vocab", "bad-arg-value", "pickle-only",
                                  "missing-file", "missing-model"])
def test_bad_input_fails_before_training(tmp_path, tiny_model, hooks, case):
    model, ref, stage, args = str(tiny_model), None, "sft", dict(FAST, max_steps=1)
    data = _jsonl(tmp_path / "qa.jsonl", QA)
    expected = {"missing-column": r"record 0: alpaca record is missing `output`",
                "empty": "is empty", "no-chat-template": "no chat template",
                "ref-vocab": "vocab_size 512", "bad-arg-value": "zigzag is not a valid SchedulerType",
                "pickle-only": "pickle", "missing-file": "not found",
                "missing-model": "not found"}[case]
    if case == "missing-column":
        data = _jsonl(tmp_path / "bad.jsonl", [{"instruction": "x", "answer": "y"}])
        data = {"path": str(data), "format": "alpaca"}
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        data = tmp_path / "empty.jsonl"
    elif case == "no-chat-template":
        model = str(_no_template_model(tmp_path, tiny_model))
    elif case == "ref-vocab":
        stage, ref = "dpo", str(_other_vocab_model(tmp_path, tiny_model))
        data = _jsonl(tmp_path / "prefs.jsonl", PREFS)
    elif case == "bad-arg-value":
        args["lr_scheduler_type"] = "zigzag"
    elif case == "missing-file":
        data = tmp_path / "nothere.jsonl"
    elif case == "missing-model":
        model = str(tmp_path / "no-model")
    elif case == "pickle-only":
        m = tmp_path / "pickled"
        shutil.copytree(tiny_model, m)
        (m / "model.safetensors").rename(m / "pytorch_model.bin")
        model = str(m)
    config = {"stage": stage, "model": model, "datasets": [data if isinstance(data, dict)
                                                          else str(data)], "args": args}
    if ref:
        config["ref_model"] = ref
    with pytest.raises(UserError, match=expected):
        train(config, tmp_path / "out")
    assert hooks == [] and not (tmp_path / "out").exists()


def test_cli_train_reports_user_errors(tmp_path, tiny_model):
    from solar_merge.cli import main

    _jsonl(tmp_path / "qa.jsonl", QA)
    cfg = tmp_path / "sft.yaml"
    cfg.write_text(f"stage: sft\nmodel: {tiny_model}\ndatasets: [qa.jsonl]\n")
    result = CliRunner().invoke(main, ["train", str(cfg), "args.lerning_rate=1e-4",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "did you mean `learning_rate`" in result.output


def test_a_stage_reports_the_precision_it_chose(tmp_path, tiny_model, hooks):
    """A real cpt stage (2 steps) through the CLI: its output and its card name the precision
    it trained in and why, TRL got the matching bf16/fp16, the weights loaded in float32.
    On a CPU without avx512_bf16 / amx_bf16 (this machine: AMD EPYC, AVX2) auto is fp32."""
    import torch

    from solar_merge import precision
    from solar_merge.cli import main

    corpus = _text_file(tmp_path)
    cfg = tmp_path / "cpt.yaml"
    cfg.write_text(f"stage: cpt\nmodel: {tiny_model}\ndatasets: [{corpus}]\nseq_len: 16\n"
                   "args: {max_steps: 2, logging_steps: 1, per_device_train_batch_size: 2}\n")
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["train", str(cfg), "-o", str(out)])
    assert result.exit_code == 0, result.output
    chosen = precision.decide("auto")
    line = f"cpt: precision {chosen.precision} ({chosen.reason})"
    assert line in result.output
    assert f"- precision: `{chosen.precision} ({chosen.reason})`" in (out / "README.md").read_text()
    (trainer, _), = hooks
    assert (trainer.args.bf16, trainer.args.fp16) == (chosen.precision == "bf16",
                                                      chosen.precision == "fp16")
    assert trainer.model.dtype == torch.float32  # autocast or not, the weights are fp32
    flags = precision.cpu_flags()
    if not torch.cuda.is_available() and not any(flags.get(f) for f in precision.BF16_FLAGS):
        assert chosen.precision == "fp32" and not trainer.args.bf16, chosen


# -- validate: chat data needs a chat template, checked before anything runs ----------------

def test_validate_checks_chat_templates_before_anything_runs(tmp_path, tiny_model,
                                                             monkeypatch):
    """The paper's recipe: Mistral-7B-v0.1 (a base model) has no chat template; its SFT stages
    ship SOLAR's (args.chat_template_path) and pass; without it validate fails on them, and the
    DPO stages inherit the template through the merges."""
    from solar_merge import recipe
    from solar_merge.kinds import context

    mistral = tmp_path / "mistral"  # config.json and tokenizer files as the Hub has them
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "torch_dtype": "bfloat16"}))
    (mistral / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    import yaml

    paper = yaml.safe_load((ROOT / "training/solar_10.7b.yaml").read_text())
    paper["stages"] = {k: v for k, v in paper["stages"].items() if "eval" not in v}  # faster
    over = [f"stages.dus.upscale.model={mistral}"]
    p = recipe.plan(paper, tmp_path / "runs", over, base_dir=ROOT / "training")
    assert p.stages["sft_orca"].config["args"]["chat_template_path"] == str(
        ROOT / "training/chat_templates/solar_instruct.jinja")
    with pytest.raises(UserError) as e:
        recipe.plan(paper, tmp_path / "runs", over + [
            "stages.sft_orca.train.args.chat_template_path=null"], base_dir=ROOT / "training")
    assert "stages.sft_orca.train: its data is rendered as chat" in e.value.message
    assert "stage `cpt`'s output has no chat template" in e.value.message
    assert "stages.dpo_avg" not in e.value.message  # string preference data needs none

    # a Hub model that is not in the local cache: a note, not a failure
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(context, "_REACHABLE", [False])
    _jsonl(tmp_path / "qa.jsonl", QA)
    data = {"name": "t", "stages": {"sft": {"train": {
        "stage": "sft", "model": "someone/not-cached-7b", "datasets": ["qa.jsonl"]}}}}
    p = recipe.plan(data, tmp_path / "runs2", base_dir=tmp_path)
    assert any("cannot check that the tokenizer of someone/not-cached-7b has a chat template"
               in n for n in p.notes), p.notes
    # a local model without a template and alpaca records: refused; plain strings: fine
    data["stages"]["sft"]["train"]["model"] = str(_no_template_model(tmp_path, tiny_model))
    with pytest.raises(UserError, match="has no chat template"):
        recipe.plan(data, tmp_path / "runs2", base_dir=tmp_path)
    _jsonl(tmp_path / "pc.jsonl", [{"prompt": "a", "completion": "b"}])
    data["stages"]["sft"]["train"]["datasets"] = ["pc.jsonl"]
    recipe.plan(data, tmp_path / "runs2", base_dir=tmp_path)
