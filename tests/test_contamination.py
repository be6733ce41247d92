"""solar_merge.contamination: lm-eval's 13-gram overlap test between training sets and the
documents of evaluation tasks (no model; our shipped tasks' data)."""

import json

import pytest

from solar_merge import contamination
from solar_merge.errors import UserError
from solar_merge.tasks import loaders

SENTENCE = ("the quick brown fox jumps over the lazy dog while the cat sleeps on the warm "
            "mat all day")  # 19 words


def _cli(args):
    from click.testing import CliRunner

    from solar_merge.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# -- the definition -------------------------------------------------------------------------------

def test_ngrams_are_lm_evals():
    """13 consecutive words after lm-eval's normalization (lowercase, no punctuation)."""
    from lm_eval.decontamination.janitor import Janitor, word_ngrams

    text = "Hello, World! " + SENTENCE
    assert contamination.ngrams(text) == set(word_ngrams(Janitor().normalize_string(text), 13))
    assert len(contamination.ngrams(SENTENCE)) == 19 - 13 + 1
    assert contamination.ngrams("Only three words.") == {"only three words"}  # short: whole
    assert contamination.ngrams("...") == set()


def test_overlap_rule():
    docs = {"t": [SENTENCE, "A short question?"]}
    words = SENTENCE.split()

    def hits(text):
        return contamination.check({"train": [{"text": text}]}, docs).rows[0]["contaminated"]

    assert hits(" ".join(words[2:15]).upper() + "!!") == 1          # 13 words, any case/punct
    assert hits("prefix " + " ".join(words[2:14]) + " suffix") == 0  # 12 words are not enough
    assert hits("Is this a short question, then?") == 1              # a short document, whole
    assert hits("a short") == 0
    # every text field counts, nested conversations too; no n-gram spans two fields
    nested = {"messages": [{"role": "user", "content": "x"},
                           {"role": "assistant", "content": " ".join(words[:13])}]}
    assert contamination.check({"train": [nested]}, docs).rows[0]["contaminated"] == 1
    split = {"a": " ".join(words[:7]), "b": " ".join(words[7:14])}
    assert contamination.check({"train": [split]}, docs).rows[0]["contaminated"] == 0


def test_documents_are_what_the_model_is_shown_plus_the_answer():
    from solar_merge.tasks import catalog

    _, loaded = catalog.load(list(catalog.OURS))
    docs = contamination.documents(loaded["tasks"])
    arith, qa = loaders.records("arith.jsonl"), loaders.records("manual_qa.jsonl")
    assert len(docs["solar_arith"]) == len(arith) and len(docs["solar_manual_qa"]) == len(qa)
    assert docs["solar_arith"][0] == f"{arith[0]['question']} {arith[0]['answer']}"
    assert docs["solar_manual_qa"][0] == \
        f"{qa[0]['question']} {qa[0]['choices'][qa[0]['gold']]}"
    assert docs["solar_manual_ppl"][0] == loaders.records("manual_ppl.jsonl")[0]["text"]


# -- the command ----------------------------------------------------------------------------------

def test_planted_duplicate_is_found_and_a_clean_set_reports_zero(tmp_path):
    arith = loaders.records("arith.jsonl")
    clean = _jsonl(tmp_path / "clean.jsonl",
                   [{"question": "What is 2 + 2?", "answer": "2 + 2 = 4. #### 4"},
                    {"text": SENTENCE}])
    planted = arith[7]
    dirty = _jsonl(tmp_path / "dirty.jsonl",
                   [{"question": "What is 2 + 2?", "answer": "#### 4"},
                    {"instruction": planted["question"], "output": planted["answer"]}])
    code, output = _cli(["contamination", "--train", clean, "--train", dirty,
                         "--tasks", "solar", "-o", tmp_path / "out"])
    assert code == 0, output
    rows = list(json.loads((tmp_path / "out" / "contamination.json").read_text())["rows"])
    table = {(r["train"].rsplit("/", 1)[-1], r["task"]): r for r in rows}
    assert len(table) == 6 and sum(r["contaminated"] for r in rows) == 1
    found = table[("dirty.jsonl", "solar_arith")]
    assert found["contaminated"] == 1 and found["percent"] == pytest.approx(100 / len(arith))
    assert all(r["percent"] == 0 for k, r in table.items() if k[0] == "clean.jsonl")
    examples = (tmp_path / "out" / contamination.EXAMPLES).read_text().splitlines()
    assert len(examples) == 1
    example = json.loads(examples[0])
    assert example["document"] == 7 and example["train_record"] == 1
    assert planted["question"] in example["document_text"]
    md = (tmp_path / "out" / "contamination.md").read_text()
    assert "| dirty.jsonl | solar_arith | 48 | 1 | 2.1 |" in md and "13-grams" in md
    assert "| dirty.jsonl | solar_arith | 48 | 1 | 2.1 |" in output

    # --fail-above: a finding, exit 1, after the report is written and shown
    code, output = _cli(["contamination", "--train", dirty, "--tasks", "solar_arith",
                         "--fail-above", "1", "-o", tmp_path / "strict"])
    assert code == 1, output
    assert "2.1% > 1.0%" in output and "solar_arith" in output and "dirty.jsonl" in output
    assert (tmp_path / "strict" / "contamination.md").is_file()
    code, output = _cli(["contamination", "--train", clean, "--tasks", "solar",
                         "--fail-above", "0", "-o", tmp_path / "ok"])
    assert code == 0, output


def test_recipe_option_stops_above_the_threshold(tiny_model, tmp_path):
    """An eval stage's `contamination:` runs before any model is evaluated."""
    from solar_merge import eval as lm

    planted = loaders.records("arith.jsonl")[0]
    dirty = _jsonl(tmp_path / "dirty.jsonl", [planted])
    with pytest.raises(contamination.ContaminationError, match="2.1% > 0"):
        lm.evaluate([tiny_model], "solar_arith", out=tmp_path / "out",
                    contamination={"train": [str(dirty)], "fail_above": 0})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--train", "nowhere.jsonl", "--tasks", "solar"], "no such file or folder"),
    (["--train", "{train}", "--tasks", "solar", "--include-path", "nowhere"], "no such folder"),
    (["--train", "{train}", "--tasks", "solar", "-n", "0"], "n-gram size is 0"),
])
def test_bad_input(args, message, tmp_path):
    train = _jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    args = [a.format(train=train) for a in args]
    code, output = _cli(["contamination", *args, "-o", tmp_path / "out"])
    assert code == 2, output
    assert message in output and output.count("Error:") == 1 and "Traceback" not in output
    assert not (tmp_path / "out").exists()


def test_enforce_threshold_semantics():
    report = contamination.Report(n=13, rows=[{"train": "a", "task": "t", "documents": 4,
                                               "contaminated": 1, "percent": 25.0}])
    contamination.enforce(report, None)
    contamination.enforce(report, 25.0)  # at the threshold: fine
    with pytest.raises(UserError, match="25.0% > 24.9%"):
        contamination.enforce(report, 24.9)
