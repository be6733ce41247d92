"""solar_merge.tables: one table for every command's results, the best of each ranked column
in bold, in the direction lm-eval records for the metric."""

from solar_merge import eval as lm
from solar_merge.tables import Table, merged


def _results(ppl: float, acc: float) -> dict:
    """The parts of an lm-eval results dict the table reads (two tasks, their directions as
    lm-eval writes them)."""
    return {"results": {"solar_manual_ppl": {"word_perplexity,none": ppl,
                                             "word_perplexity_stderr,none": "N/A"},
                        "solar_manual_qa": {"acc,none": acc, "acc_stderr,none": 0.1}},
            "higher_is_better": {"solar_manual_ppl": {"word_perplexity": False},
                                 "solar_manual_qa": {"acc": True}},
            "n-shot": {"solar_manual_ppl": 0, "solar_manual_qa": 0},
            "config": {"limit": 8}, "lm_eval_version": "0.4.13"}


def _cells(lines: list[str], label: str) -> list[str]:
    row = next(line for line in lines if line.startswith(f"| {label} "))
    return [c.strip() for c in row.strip("|").split("|")]


def test_lower_perplexity_and_higher_accuracy_are_marked():
    table = lm.results_table({"base": _results(20.0, 0.25), "dus": _results(35.0, 0.5),
                              "cpt": _results(12.5, 0.375)})
    assert table.best("solar_manual_ppl word_perplexity,none") == {"cpt"}
    assert table.best("solar_manual_qa acc,none") == {"dus"}
    lines = table.markdown()
    assert lines[0].split("|")[2].strip() == "solar_manual_ppl word_perplexity ↓"
    assert lines[0].split("|")[3].strip() == "solar_manual_qa acc ↑"
    assert _cells(lines, "cpt")[1:] == ["**12.5000**", "0.3750"]
    assert _cells(lines, "dus")[1:] == ["35.0000", "**0.5000**"]
    assert _cells(lines, "base")[1:] == ["20.0000", "0.2500"]
    assert "lm-evaluation-harness 0.4.13" in lines[-1] and "limit 8" in lines[-1]
    # every row of the table has the same width: the columns line up in a terminal
    assert len({len(line) for line in lines[:5]}) == 1


def test_ties_unranked_columns_and_missing_values():
    table = Table({"a": {"x": 1.0, "y": 3, "z": "fp32"}, "b": {"x": 1.0, "y": 2},
                   "c": {"x": 1.0}}, better={"x": True, "y": False})
    assert table.best("x") == set()           # every row the same: nothing to mark
    assert table.best("y") == {"b"}            # lower is better; a missing value never wins
    assert table.best("z") == set()            # no direction: not ranked
    lines = table.markdown()
    assert _cells(lines, "c") == ["c", "1.0000", "–", "–"]
    assert "**bold**" in lines[-1]
    single = Table({"only": {"x": 2.0}}, better={"x": True})
    assert "**" not in single.text()          # one row: nothing to compare


def test_tables_of_several_eval_stages_join_by_model():
    text = lm.results_table({"dus": _results(30.0, 0.25), "cpt": _results(15.0, 0.5)})
    chat = Table({"cpt": {"chat acc": 0.5}, "sft": {"chat acc": 0.75}},
                 better={"chat acc": True})
    joined = merged([text, chat])
    assert list(joined.rows) == ["dus", "cpt", "sft"]
    assert joined.rows["cpt"] == {"solar_manual_ppl word_perplexity,none": 15.0,
                                  "solar_manual_qa acc,none": 0.5, "chat acc": 0.5}
    assert joined.best("chat acc") == {"sft"}
    assert joined.best("solar_manual_ppl word_perplexity,none") == {"cpt"}
    assert joined.notes == text.notes
