"""solar_merge.eval: lm-evaluation-harness's numbers, unchanged, for every model; our shipped
tasks on tiny models; h6 offline; bad input. One test uses the embedded SmolLM2 (marker)."""

import csv
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from solar_merge import eval as lm
from solar_merge.errors import UserError
from solar_merge.outputs import MARKER, partial_dir
from solar_merge.tasks import catalog

# what must be identical between our results.json and a direct simple_evaluate call (the rest
# is timing, dates and the environment)
SAME = ("results", "groups", "group_subtasks", "configs", "versions", "n-shot",
        "higher_is_better", "n-samples")


def _direct(model, tasks, **kw):
    """lm-eval's own Python API, as its documentation shows it, with our task folder."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=str(catalog.TASKS_DIR), include_defaults=False)
    return lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(model), **kw.pop(
        "model_args", {})}, tasks=tasks, task_manager=tm, device="cpu", log_samples=False, **kw)


def _same(ours: dict, direct: dict) -> None:
    for key in SAME:
        assert json.loads(json.dumps(ours.get(key), default=str)) == \
            json.loads(json.dumps(direct.get(key), default=str)), key


def _sha(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread, and a shared machine makes two threads
    spin against each other (measured: 0.41 s vs 0.044 s a forward at load 7)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def two_models(tiny_model_factory):
    return tiny_model_factory(seed=0), tiny_model_factory(seed=1)


@pytest.fixture(scope="module")
def evaluated(two_models, tmp_path_factory):
    """Both tiny models on all three shipped tasks (tag `solar`), 2 documents each."""
    out = tmp_path_factory.mktemp("eval") / "out"
    results = lm.evaluate(list(two_models), "solar", out=out, limit=2, batch_size=2,
                          device="cpu")
    return out, results


# -- the numbers are lm-eval's --------------------------------------------------------------------

@pytest.mark.smollm2
def test_our_json_equals_simple_evaluate_on_smollm2(tmp_path):
    from solar_merge.embedded import embedded_model

    model = embedded_model()
    lm.evaluate([model], "solar_manual_qa", out=tmp_path / "out", limit=2, batch_size=4,
                device="cpu")
    ours = json.loads((tmp_path / "out" / model.name / "results.json").read_text())
    direct = _direct(model, ["solar_manual_qa"], limit=2, batch_size=4,
                     model_args={"dtype": "auto"})
    _same(ours, direct)
    assert ours["results"]["solar_manual_qa"]["sample_len"] == 2
    assert ours["config"]["model_args"]["pretrained"] == str(model)  # lm-eval's own record


def test_every_model_gets_lm_evals_own_numbers(evaluated, two_models):
    """The second model is scored with task objects the first one used: still lm-eval's."""
    out, results = evaluated
    second = two_models[1]
    ours = json.loads((out / second.name / "results.json").read_text())
    assert ours == json.loads(json.dumps(results[second.name], default=str))
    direct = _direct(second, ["solar_manual_ppl", "solar_manual_qa", "solar_arith"], limit=2,
                     batch_size=2, model_args={"dtype": "auto"})
    _same(ours, direct)
    first = json.loads((out / two_models[0].name / "results.json").read_text())
    assert first["results"] != ours["results"]  # two different models, two sets of numbers


def test_shipped_tasks_report_their_metrics(evaluated, two_models):
    _, results = evaluated
    res = results[two_models[0].name]
    assert set(res["results"]) == set(catalog.OURS)
    ppl = res["results"]["solar_manual_ppl"]
    assert ppl["word_perplexity,none"] > ppl["byte_perplexity,none"] > 1
    assert ppl["bits_per_byte,none"] == pytest.approx(math.log2(ppl["byte_perplexity,none"]))
    qa, arith = res["results"]["solar_manual_qa"], res["results"]["solar_arith"]
    assert 0 <= qa["acc,none"] <= 1 and 0 <= qa["acc_norm,none"] <= 1
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(arith)
    assert res["n-shot"]["solar_arith"] == 3 and res["n-shot"]["solar_manual_qa"] == 0
    assert res["configs"]["solar_arith"]["output_type"] == "generate_until"
    assert all(r["sample_len"] == 2 for r in res["results"].values())


def test_table_csv_plot_and_metrics(evaluated, two_models):
    out, results = evaluated
    names = [m.name for m in two_models]
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == names and metrics == lm.table(results)
    key = "solar_manual_ppl word_perplexity,none"
    assert metrics[names[1]][key] == results[names[1]]["results"]["solar_manual_ppl"][
        "word_perplexity,none"]
    assert not any("stderr" in c for c in metrics[names[0]])
    rows = list(csv.reader((out / "results.csv").read_text().splitlines()))
    assert rows[0][0] == "model" and [r[0] for r in rows[1:]] == names
    assert float(rows[1][rows[0].index(key)]) == pytest.approx(metrics[names[0]][key])
    md = (out / "results.md").read_text()
    assert "word_perplexity ↓" in md and "exact_match (flexible-extract)" in md
    assert "lm-evaluation-harness 0.4" in md and "limit 2" in md
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / MARKER).is_file() and not partial_dir(out).exists()


def test_one_scalar_per_model(evaluated, two_models):
    _, results = evaluated
    res = results[two_models[0].name]
    assert lm.score(res, "solar_manual_ppl") == res["results"]["solar_manual_ppl"][
        "word_perplexity,none"]
    assert lm.score(res, "solar_arith") == res["results"]["solar_arith"][
        "exact_match,flexible-extract"]
    assert lm.score(res, "solar_manual_qa", "acc,none") == res["results"]["solar_manual_qa"][
        "acc,none"]
    assert not lm.higher_is_better(res, "solar_manual_ppl")
    assert lm.higher_is_better(res, "solar_manual_qa")
    with pytest.raises(UserError, match="no `f1` for task `solar_arith`"):
        lm.score(res, "solar_arith", "f1")


def test_finished_output_is_read_back_and_interrupted_one_resumes(evaluated, two_models,
                                                                   tmp_path, monkeypatch):
    out, results = evaluated
    monkeypatch.setattr(lm, "_simple_evaluate", lambda *a: pytest.fail("re-ran lm-eval"))
    again = lm.evaluate(list(two_models), "solar", out=out, limit=2, batch_size=2,
                        device="cpu")
    assert json.dumps(again, default=str) == json.dumps(results, default=str)

    # an interruption after the first model: the re-run evaluates the second one only
    calls = []

    def fake(model, loaded, hf_args, settings):
        calls.append(Path(model).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return {"results": {"solar_arith": {"exact_match,flexible-extract": 0.5}}}

    monkeypatch.setattr(lm, "_simple_evaluate", fake)
    new = tmp_path / "new"
    with pytest.raises(KeyboardInterrupt):
        lm.evaluate(list(two_models), "solar_arith", out=new, limit=1, device="cpu")
    assert not new.exists() and (partial_dir(new) / two_models[0].name / "results.json").is_file()
    lm.evaluate(list(two_models), "solar_arith", out=new, limit=1, device="cpu")
    assert calls == [two_models[0].name, two_models[1].name, two_models[1].name]
    assert (new / MARKER).is_file()
    # another limit is another evaluation: nothing is taken from the old one
    lm.evaluate(list(two_models), "solar_arith", out=new, limit=2, device="cpu")
    assert len(calls) == 5


def test_perplexity_task_equals_a_direct_computation(tiny_model):
    """word_perplexity = exp(sum of token NLL / words), every token scored after lm-eval's
    prefix token (the tokenizer's BOS); one window (max_length above the text's length)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = lm.evaluate([tiny_model], "solar_manual_ppl", limit=1, batch_size=1, device="cpu",
                      model_args={"max_length": 2048})[tiny_model.name]
    text = catalog_first_ppl_doc()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert 100 < len(ids) < 2048
    inp = torch.tensor([[tok.bos_token_id] + ids[:-1]])
    with torch.inference_mode():
        logp = torch.log_softmax(model(inp).logits[0].double(), -1)
    nll = -logp[torch.arange(len(ids)), torch.tensor(ids)].sum().item()
    words = len(re.split(r"\s+", text))
    ours = res["results"]["solar_manual_ppl"]["word_perplexity,none"]
    assert math.log(ours) == pytest.approx(nll / words, rel=1e-4)
    byte_ppl = res["results"]["solar_manual_ppl"]["byte_perplexity,none"]
    assert math.log(byte_ppl) == pytest.approx(nll / len(text.encode()), rel=1e-4)


def catalog_first_ppl_doc() -> str:
    from solar_merge.tasks import loaders

    return loaders.records("manual_ppl.jsonl")[0]["text"]


def test_user_tasks_sit_beside_ours(tiny_model, tmp_path):
    """--include-path: a plain lm-eval YAML (data by absolute path) runs with ours."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("a b c", "d e f g")))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text(
        "task: my_ppl\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {data}\ntest_split: test\noutput_type: loglikelihood_rolling\n"
        "doc_to_text: ''\ndoc_to_target: text\nmetric_list:\n"
        "  - {metric: word_perplexity, aggregation: weighted_perplexity, "
        "higher_is_better: false}\n")
    res = lm.evaluate([tiny_model], "my_ppl,solar_manual_ppl", include_path=tasks, limit=1,
                      device="cpu")[tiny_model.name]
    assert set(res["results"]) == {"my_ppl", "solar_manual_ppl"}
    assert res["results"]["my_ppl"]["word_perplexity,none"] > 1


def test_the_command(tiny_model, tmp_path):
    code, output = _cli(["eval", tiny_model, "--tasks", "solar_manual_qa", "--limit", "1",
                         "--batch-size", "2", "--model-args", "dtype=float32",
                         "-o", tmp_path / "out"])
    assert code == 0, output
    assert f"| {tiny_model.name} |" in output and "solar_manual_qa acc_norm" in output
    res = json.loads((tmp_path / "out" / tiny_model.name / "results.json").read_text())
    assert res["config"]["model_args"]["dtype"] == "float32" and res["config"]["limit"] == 1
    code, output = _cli(["eval", "--prefetch", "--tasks", "solar"])
    assert code == 0 and "3 task(s) ready offline" in output, output


# -- h6 -------------------------------------------------------------------------------------------

def _h6_results() -> dict:
    """The shape lm-eval gives an h6 run (two MMLU subjects stand for 57)."""
    r = {"arc_challenge": {"acc,none": 0.5, "acc_norm,none": 0.6},
         "hellaswag": {"acc,none": 0.5, "acc_norm,none": 0.7},
         "mmlu": {"acc,none": 0.31}, "mmlu_stem": {"acc,none": 0.31},
         "mmlu_anatomy": {"acc,none": 0.2}, "mmlu_astronomy": {"acc,none": 0.4},
         "truthfulqa_mc2": {"acc,none": 0.45}, "winogrande": {"acc,none": 0.75},
         "gsm8k": {"exact_match,strict-match": 0.1, "exact_match,flexible-extract": 0.2},
         "h6": {"alias": "h6"}}
    return {"results": r, "group_subtasks": {
        "h6": ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2", "winogrande", "gsm8k"],
        "mmlu": ["mmlu_stem"], "mmlu_stem": ["mmlu_anatomy", "mmlu_astronomy"]},
        "n-shot": {"arc_challenge": 25, "gsm8k": 5},
        "configs": {"arc_challenge": {"dataset_path": "allenai/ai2_arc",
                                      "dataset_name": "ARC-Challenge", "test_split": "test"},
                    "mmlu_anatomy": {"dataset_path": "cais/mmlu", "dataset_name": "anatomy"}},
        "higher_is_better": {}}


def test_h6_is_the_leaderboards_average():
    scores = lm.h6_scores(_h6_results())
    assert scores["mmlu"] == pytest.approx(30.0)  # unweighted mean of the subjects, not 31
    assert scores == pytest.approx({"arc_challenge": 60, "hellaswag": 70, "mmlu": 30,
                                    "truthfulqa_mc2": 45, "winogrande": 75, "gsm8k": 20,
                                    "average": (60 + 70 + 30 + 45 + 75 + 20) / 6})
    row = lm.table({"m": _h6_results()})["m"]
    assert set(row) == {f"h6 {k}" for k in scores}  # members' raw metrics stay in the JSON
    assert lm.score(_h6_results(), "h6") == pytest.approx(50.0)
    index = lm.eval_results(_h6_results())
    arc = next(e for e in index if e.dataset_type == "allenai/ai2_arc")
    assert arc.dataset_args == {"num_few_shot": 25} and arc.metric_type == "acc_norm"
    assert arc.metric_value == 60.0 and arc.source_name == "lm-evaluation-harness"
    assert arc.dataset_split == "test" and arc.dataset_config == "ARC-Challenge"
    mmlu = next(e for e in index if e.dataset_name == "mmlu (5-shot)")
    assert mmlu.dataset_type == "cais/mmlu" and mmlu.metric_value == 30.0
    assert {e.metric_type for e in index} == {"acc_norm", "acc", "mc2", "exact_match", "average"}


def test_h6_shots_are_the_papers():
    text = (catalog.TASKS_DIR / "h6.yaml").read_text()
    for task, (shots, _) in catalog.H6.items():
        assert re.search(rf"\{{(task|group): {task}, num_fewshot: {shots}\}}", text), task


def test_h6_offline_is_one_clear_error(tiny_model, tmp_path):
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "solar_merge.cli", "eval", str(tiny_model),
                           "--tasks", "h6", "-o", str(tmp_path / "out")], check=False,
                          capture_output=True, text=True, env=env, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out and out.count("Error:") == 1
    for dataset in ("allenai/ai2_arc", "Rowan/hellaswag", "cais/mmlu", "truthfulqa/truthful_qa",
                    "allenai/winogrande", "openai/gsm8k"):
        assert dataset in out, dataset
    assert "HF_DATASETS_OFFLINE" in out and str(tmp_path / "hf") in out
    assert "cais/mmlu (57 subsets" in out
    assert "--prefetch" in out
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()


# -- bad input -------------------------------------------------------------------------------------

def _cli(args):
    from click.testing import CliRunner

    from solar_merge.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture
def no_tokenizer(tiny_model, tmp_path):
    import shutil

    folder = tmp_path / "no_tok"
    folder.mkdir()
    for f in tiny_model.iterdir():
        if "token" not in f.name and f.name not in ("vocab.json", "merges.txt"):
            shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.parametrize("case", ["unknown task", "missing include path",
                                  "model without tokenizer", "h6 with num-fewshot",
                                  "not a model", "Hub model offline"])
def test_bad_input_exits_2_with_one_message(case, tiny_model, no_tokenizer, tmp_path,
                                            monkeypatch):
    model, tasks, extra = tiny_model, "solar_arith", []
    expect = {"unknown task": ["unknown task: `solar_arth`", "did you mean `solar_arith`"],
              "missing include path": ["--include-path", "no such folder"],
              "model without tokenizer": ["has no tokenizer", "tokenizer.save_pretrained"],
              "h6 with num-fewshot": ["h6 fixes its own shots"],
              "not a model": ["has no config.json"],
              "Hub model offline": ["not in the local Hugging Face cache", "hf download"]}[case]
    if case == "unknown task":
        tasks = "solar_arth"
    elif case == "missing include path":
        extra = ["--include-path", tmp_path / "nowhere"]
    elif case == "model without tokenizer":
        model = no_tokenizer
    elif case == "h6 with num-fewshot":
        tasks, extra = "h6", ["--num-fewshot", "3"]
    elif case == "Hub model offline":
        model = Path("someone/not-cached")
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    else:
        model = tmp_path
    before = _sha(model)
    code, output = _cli(["eval", model, "--tasks", tasks, *extra, "-o", tmp_path / "out"])
    assert code == 2, output
    assert output.count("Error:") == 1 and "Traceback" not in output and "fix:" in output
    for text in expect:
        assert text in output, (text, output)
    assert not (tmp_path / "out").exists() and not partial_dir(tmp_path / "out").exists()
    assert _sha(model) == before


def test_recipe_eval_stage_options(tiny_model, tmp_path):
    """Planning resolves the stage: tasks checked, include_path and `train: auto` as paths;
    the old metric keys and misspellings are errors that say what to write."""
    from solar_merge import recipe

    (tmp_path / "corpus.txt").write_text("some text\n")
    (tmp_path / "data").mkdir()  # data/x.jsonl has the shape of a Hub id: still a file here
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "t.yaml").write_text((catalog.TASKS_DIR / "solar_arith.yaml")
                                                .read_text().replace("solar_arith", "my_arith"))
    stages = {"cpt": {"train": {"stage": "cpt", "model": str(tiny_model),
                                "datasets": ["corpus.txt", "data/later.jsonl"]}},
              "ev": {"eval": {"models": ["cpt"], "tasks": "solar_arith,my_arith", "limit": 4,
                              "include_path": "tasks", "contamination": {"fail_above": 1}}}}
    p = recipe.plan({"stages": stages}, tmp_path / "runs", base_dir=tmp_path)
    c = p.stages["ev"].config
    assert c["tasks"] == ["solar_arith", "my_arith"] and c["options"]["limit"] == 4
    assert c["include_path"] == [str(tmp_path / "tasks")]
    assert c["contamination"] == {"train": [str(tmp_path / "corpus.txt"),
                                            str(tmp_path / "data" / "later.jsonl")],
                                  "n": 13, "fail_above": 1}
    assert p.stages["ev"].deps == ["cpt"]
    stages["ev"]["eval"]["contamination"] = {"train": ["corpus.txt", "HuggingFaceH4/no_robots"]}
    c = recipe.plan({"stages": stages}, tmp_path / "runs", base_dir=tmp_path).stages["ev"].config
    assert c["contamination"]["train"] == [str(tmp_path / "corpus.txt"), "HuggingFaceH4/no_robots"]
    for bad, message in [({"perplexity": {"text": "x"}}, "now runs lm-eval tasks"),
                         ({"tasks": "solar_arith", "limt": 2}, "did you mean `limit`"),
                         ({"tasks": "solar_arith", "contamination": {"fail_abov": 1}},
                          "did you mean `fail_above`"),
                         ({"tasks": "solar_arith", "batch_size": 0}, "batch_size"),
                         ({"tasks": "solar_arth"}, "did you mean `solar_arith`")]:
        stages["ev"] = {"eval": {"models": ["cpt"], **bad}}
        with pytest.raises(UserError, match=re.escape(message)):
            recipe.plan({"stages": stages}, tmp_path / "runs", base_dir=tmp_path)
