"""Data helpers: loading local files, QA formats, the paper's math sets (no torch, instant)."""

import json

import pytest

from solar_merge.data import (
    detect_format,
    load_records,
    math_alignment_pairs,
    math_instruct_qa,
    to_preference,
    to_prompt_completion,
    to_text,
)
from solar_merge.errors import UserError

ROWS = [{"instruction": f"say {i}", "input": "", "output": str(i)} for i in range(5)]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_jsonl_json_parquet_txt(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert load_records(_jsonl(tmp_path / "a.jsonl", ROWS)) == ROWS
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    assert load_records(tmp_path / "a.json", max_samples=2) == ROWS[:2]
    (tmp_path / "b.json").write_text(json.dumps({"train": ROWS}))
    assert load_records(tmp_path / "b.json") == ROWS
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    assert load_records(tmp_path / "a.parquet", max_samples=3) == ROWS[:3]
    (tmp_path / "c.txt").write_text("first paragraph\nstill first\n\n\nsecond\n")
    assert load_records(tmp_path / "c.txt") == [{"text": "first paragraph\nstill first"},
                                                {"text": "second"}]
    # a folder: its files in sorted order, max_samples over all of them
    d = tmp_path / "dir"
    d.mkdir()
    _jsonl(d / "1.jsonl", ROWS[:2])
    _jsonl(d / "2.jsonl", ROWS[2:])
    assert load_records(d, max_samples=3) == ROWS[:3]


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{oops\n')
    with pytest.raises(UserError, match="line 2"):
        load_records(tmp_path / "bad.jsonl")
    with pytest.raises(UserError, match="max_samples"):
        load_records(_jsonl(tmp_path / "a.jsonl", ROWS), max_samples=0)
    (tmp_path / "list.jsonl").write_text("[1, 2]\n")
    with pytest.raises(UserError, match="JSON objects"):
        load_records(tmp_path / "list.jsonl")


def test_alpaca_openorca_messages_to_conversations():
    assert to_prompt_completion({"instruction": "Sum", "input": "1 2", "output": "3"}) == {
        "prompt": [{"role": "user", "content": "Sum\n\n1 2"}],
        "completion": [{"role": "assistant", "content": "3"}]}
    assert to_prompt_completion({"instruction": "Hi", "output": "Hello"})["prompt"] == [
        {"role": "user", "content": "Hi"}]
    orca = {"system_prompt": "Be brief.", "question": "2+2?", "response": "4"}
    assert to_prompt_completion(orca, "openorca") == {
        "prompt": [{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "2+2?"}],
        "completion": [{"role": "assistant", "content": "4"}]}
    assert to_prompt_completion(dict(orca, system_prompt=""))["prompt"] == [
        {"role": "user", "content": "2+2?"}]
    chat = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                         {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}
    # several assistant turns: kept as a conversation, so that every turn is trained
    assert to_prompt_completion(chat) == {"messages": chat["messages"]}
    single = {"messages": chat["messages"][2:]}
    assert to_prompt_completion(single) == {"prompt": [{"role": "user", "content": "c"}],
                                            "completion": [{"role": "assistant", "content": "d"}]}
    plain = {"prompt": "p", "completion": "c"}
    assert to_prompt_completion(plain) == plain


def test_format_errors_name_the_field():
    with pytest.raises(UserError, match="`output`"):
        to_prompt_completion({"instruction": "x", "outptu": "y"}, "alpaca")
    with pytest.raises(UserError, match="cannot tell the format"):
        detect_format({"foo": 1})
    with pytest.raises(UserError, match="no assistant turn"):
        to_prompt_completion({"messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(UserError, match="must be a string"):
        to_prompt_completion({"question": 3, "response": "x"}, "openorca")
    with pytest.raises(UserError, match="`rejected`"):
        to_preference({"prompt": "p", "chosen": "c"}, "preference")
    with pytest.raises(UserError, match="plain text"):
        to_text({"text": "x"}, "alpaca")


MATH = {"question": "What is 2+3?", "answer": "5",
        "rephrased_question": "Compute two plus three.",
        "rephrased_answer": "Two plus three: 2 + 3 = 5. The answer is 5."}


def test_math_builders():
    assert math_alignment_pairs([MATH]) == [{"prompt": MATH["rephrased_question"],
                                             "chosen": MATH["rephrased_answer"],
                                             "rejected": MATH["answer"]}]
    assert math_instruct_qa([MATH]) == [{"question": MATH["rephrased_question"],
                                         "response": MATH["rephrased_answer"]}]
    # the formats that stage configs use for them
    assert to_preference(MATH) == math_alignment_pairs([MATH])[0]
    assert to_prompt_completion(MATH, "math_instruct")["completion"][0]["content"] == \
        MATH["rephrased_answer"]
    with pytest.raises(UserError, match="rephrased_answer"):
        math_alignment_pairs([{k: v for k, v in MATH.items() if k != "rephrased_answer"}])
