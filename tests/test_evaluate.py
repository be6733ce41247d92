"""Held-out metrics on tiny random models (seconds)."""

import json
import math
import random

import pytest

from solar_merge.errors import UserError
from solar_merge.evaluate import (
    answer_loss,
    answer_loss_terms,
    encode_qa,
    evaluate,
    extract_answer,
    generate_answers,
    load_model,
    math_exact_match,
    perplexity,
    text_chunks,
)

PREDICTABLE = "the cat sat on the mat. " * 200


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    d = tmp_path_factory.mktemp("texts")
    rng = random.Random(0)
    (d / "predictable.txt").write_text(PREDICTABLE)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789 .,;:!?") for _ in range(5000))
    (d / "random.txt").write_text(noise)
    return d


@pytest.fixture(scope="module")
def overfit_model(tmp_path_factory, tiny_model):
    """The tiny model after 25 Adam steps on PREDICTABLE."""
    import torch

    model, tok = load_model(tiny_model)
    model.train()
    ids = torch.tensor(text_chunks(tok, PREDICTABLE, 64, 2))
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    torch.manual_seed(0)
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path_factory.mktemp("overfit")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qa_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("qa")
    recs = [{"system_prompt": "", "question": "What is an assert statement?",
             "response": "Assert statements insert debugging assertions into a program."},
            {"system_prompt": "Be brief.", "question": "What does del do?",
             "response": "Deletion of a name removes its binding."},
            {"question": "What is a for loop?",
             "response": "The for statement iterates over the elements of a sequence."}]
    path = d / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@pytest.fixture(scope="module")
def problems_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("math")
    recs = [{"question": f"What is {a} + {b}?", "final": a + b} for a, b in
            [(1, 2), (3, 4), (10, 20), (7, 8), (5, 5)]]
    path = d / "problems.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


# -- perplexity ------------------------------------------------------------------------------

def test_perplexity_finite_and_above_one(tiny_model, texts):
    ppl = perplexity(tiny_model, texts / "random.txt", seq_len=32, max_chunks=4, batch_size=3)
    assert math.isfinite(ppl) and ppl > 1
    # A random model over a 384-token vocabulary is near-uniform.
    assert 50 < ppl < 5000


def test_overfit_model_prefers_its_text(overfit_model, texts):
    seen = perplexity(overfit_model, texts / "predictable.txt", seq_len=32, max_chunks=4)
    unseen = perplexity(overfit_model, texts / "random.txt", seq_len=32, max_chunks=4)
    assert 1 < seen < 20
    assert seen * 10 < unseen


def test_perplexity_chunks_are_non_overlapping_and_capped(tiny_model):
    _, tok = load_model(tiny_model)
    ids = tok(PREDICTABLE, add_special_tokens=False)["input_ids"]
    chunks = text_chunks(tok, PREDICTABLE, 16, 3)
    assert [len(c) for c in chunks] == [16, 16, 16]
    assert [t for c in chunks for t in c] == ids[:48]
    assert len(text_chunks(tok, "tiny", 16, 3)) == 1  # shorter than one chunk: one short chunk


def test_perplexity_batching_does_not_change_the_value(tiny_model, texts):
    a = perplexity(tiny_model, texts / "random.txt", seq_len=32, max_chunks=5, batch_size=1)
    b = perplexity(tiny_model, texts / "random.txt", seq_len=32, max_chunks=5, batch_size=4)
    assert a == pytest.approx(b, rel=1e-5)


def test_perplexity_missing_or_empty_text(tiny_model, tmp_path):
    with pytest.raises(UserError, match="not found"):
        perplexity(tiny_model, tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="too short"):
        perplexity(tiny_model, tmp_path / "empty.txt")


# -- answer loss -----------------------------------------------------------------------------

def test_encode_qa_scores_exactly_the_response_tokens(tiny_model):
    _, tok = load_model(tiny_model)
    rec = {"question": "What is an assert statement?",
           "response": "Assert statements insert debugging assertions."}
    ids, labels = encode_qa(tok, rec)
    prompt = tok.apply_chat_template([{"role": "user", "content": rec["question"]}],
                                     tokenize=False, add_generation_prompt=True)
    n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    scored = [x for x in labels if x != -100]
    # the response plus the template's end of turn ("<|im_end|>\n"), nothing of the prompt
    response_part = tok(rec["response"] + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert scored == response_part == ids[n_prompt:]
    assert tok.decode(scored).startswith(rec["response"])


def test_answer_loss_masks_prompt(tiny_model, qa_file):
    model, tok = load_model(tiny_model)
    rec = {"question": "What is a for loop?", "response": "It iterates over a sequence."}
    longer = dict(rec, question="Please explain in detail what a for loop is in Python?")
    n_response = len([x for x in encode_qa(tok, rec)[1] if x != -100])
    total_a, count_a = answer_loss_terms(model, tok, [rec])
    total_b, count_b = answer_loss_terms(model, tok, [longer])
    # a longer prompt changes the loss (conditioning) but not what is scored
    assert count_a == count_b == n_response
    assert total_a != total_b
    loss = answer_loss(tiny_model, qa_file)
    assert math.isfinite(loss) and 0 < loss < 10


def test_answer_loss_padding_does_not_change_the_value(tiny_model, qa_file):
    from solar_merge.evaluate import _answer_loss

    model, tok = load_model(tiny_model)
    one = _answer_loss(model, tok, qa_file, batch_size=1)
    three = _answer_loss(model, tok, qa_file, batch_size=3)
    assert one == pytest.approx(three, rel=1e-5)


# -- exact match -----------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [
    ("#### 42", 42),
    ("Tom has 3 + 4 = 7 apples.\n#### 7", 7),
    ("the answer is 42.", 42),
    ("It drops to -5 degrees.", -5),
    ("#### -12", -12),
    ("We get 1,234 in total", 1234),
    ("#### 18 apples, since 9 * 2 = 18", 18),
    ("12 + 30 = 42. #### 42\n(3 steps)", 42),
    ("The result is 12.0", 12),
    ("about 2.5 each", 2.5),
    ("no number here", None),
    ("####", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_math_exact_match_runs_and_scores(tiny_model, problems_file):
    score = math_exact_match(tiny_model, problems_file, max_new_tokens=4, limit=3)
    assert 0.0 <= score <= 1.0


def test_left_padded_batches_match_single_generation(tiny_model):
    model, tok = load_model(tiny_model)
    questions = ["What is 1 + 2?", "A much longer question about the number of apples?", "Hi"]
    batched = generate_answers(model, tok, questions, max_new_tokens=6, batch_size=3)
    single = [generate_answers(model, tok, [q], max_new_tokens=6)[0] for q in questions]
    assert batched == single
    assert tok.padding_side == "right" or tok.padding_side == load_model(tiny_model)[1].padding_side


def test_math_exact_match_requires_final(tiny_model, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"question": "1+1?"}) + "\n")
    with pytest.raises(UserError, match="final"):
        math_exact_match(tiny_model, p, max_new_tokens=2)


# -- evaluate() ------------------------------------------------------------------------------

def test_evaluate_all_metrics_on_one_load(tiny_model, texts, qa_file, problems_file):
    res = evaluate(tiny_model, {
        "perplexity": {"text": str(texts / "random.txt"), "seq_len": 32, "max_chunks": 2},
        "math_exact_match": {"problems": str(problems_file), "limit": 2, "max_new_tokens": 3},
        "answer_loss": {"qa": str(qa_file)},
    })
    assert set(res) == {"layers", "params", "perplexity", "math_exact_match", "answer_loss"}
    assert res["layers"] == 4
    # tied embeddings are counted once
    import torch  # noqa: F401
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert res["params"] == sum(p.numel() for p in m.parameters())


def test_evaluate_relative_paths_resolve_against_base_dir(tiny_model, texts):
    res = evaluate(tiny_model, {"perplexity": {"text": "random.txt", "seq_len": 16,
                                               "max_chunks": 1}}, base_dir=texts)
    assert res["perplexity"] > 1


@pytest.mark.parametrize("spec,match", [
    ({"perplexty": {"text": "x.txt"}}, "did you mean `perplexity`"),
    ({"perplexity": {"txt": "x.txt"}}, "did you mean `text`"),
    ({"math_exact_match": {"problems": "p.jsonl", "limt": 5}}, "did you mean `limit`"),
    ({"answer_loss": {"qa": "q.jsonl", "batch_size": 0}}, "batch_size"),
    ({"perplexity": {}}, "perplexity.text"),
])
def test_evaluate_rejects_bad_specs(tiny_model, spec, match):
    with pytest.raises(UserError, match=match):
        evaluate(tiny_model, spec)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(UserError, match="not a model folder"):
        perplexity(tmp_path, tmp_path / "x.txt")
