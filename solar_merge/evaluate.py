"""Held-out metrics without lm-eval: perplexity, arithmetic exact match, answer loss.

Every public function takes a model folder (safetensors only, no remote code) and loads it
once in fp32, eval mode, under `torch.inference_mode()`. `evaluate(model_dir, spec)` runs
several metrics on one load and also reports `layers` and `params`:

    evaluate("out/dus", {"perplexity": {"text": "data/heldout.txt", "seq_len": 256},
                         "math_exact_match": {"problems": "data/eval_math.jsonl", "limit": 20},
                         "answer_loss": {"qa": "data/eval_python_qa.jsonl"}})
"""

import math
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from solar_merge.errors import UserError, did_you_mean

# -- spec ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PerplexitySpec(_Strict):
    text: Path
    seq_len: int = Field(256, ge=2)
    max_chunks: int | None = Field(16, ge=1)
    batch_size: int = Field(4, ge=1)


class MathSpec(_Strict):
    problems: Path
    field: str = "question"  # or rephrased_question
    limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(96, ge=1)
    batch_size: int = Field(8, ge=1)


class AnswerLossSpec(_Strict):
    qa: Path
    limit: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)


class EvalSpec(_Strict):
    perplexity: PerplexitySpec | None = None
    math_exact_match: MathSpec | None = None
    answer_loss: AnswerLossSpec | None = None


def parse_spec(spec: dict, *, where: str = "evaluation spec", base_dir=None) -> EvalSpec:
    """Validate a spec dict; unknown keys and bad values are UserErrors (with did-you-mean).
    Relative paths resolve against base_dir when given."""
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping of metric -> options, got "
                        f"{type(spec).__name__}", fix=f"use keys {', '.join(EvalSpec.model_fields)}")
    try:
        parsed = EvalSpec.model_validate(spec)
    except ValidationError as e:
        raise _user_error(e, where) from None
    if base_dir is not None:
        for sub, field in (("perplexity", "text"), ("math_exact_match", "problems"),
                           ("answer_loss", "qa")):
            obj = getattr(parsed, sub)
            if obj is not None and not getattr(obj, field).is_absolute():
                setattr(obj, field, Path(base_dir) / getattr(obj, field))
    return parsed


def _user_error(e: ValidationError, where: str) -> UserError:
    errors = e.errors()
    # an unknown key often explains a missing one (`txt` for `text`): report it first
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    loc = [str(x) for x in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        model = EvalSpec
        for part in loc[:-1]:
            ann = model.model_fields[part].annotation
            model = next(a for a in getattr(ann, "__args__", (ann,)) if a is not type(None))
        choices = list(model.model_fields)
        return UserError(f"{where}: unknown key `{key}`{did_you_mean(loc[-1], choices)}",
                         fix=f"allowed keys{' under ' + '.'.join(loc[:-1]) if loc[:-1] else ''}:"
                             f" {', '.join(choices)}")
    return UserError(f"{where}: `{key}`: {err['msg']}", fix="check the value")


# -- answers -------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_answer(text: str):
    """The number a model answered: the first number after the last '####', else the last
    number in the text. '1,234' -> 1234, '-5' -> -5, '12.0' -> 12, '2.5' -> 2.5; None if none."""
    tail = text.rsplit("####", 1)[1] if "####" in text else None
    found = _NUMBER.findall(tail) if tail is not None else []
    if found:
        raw = found[0]
    else:
        found = _NUMBER.findall(text)
        if not found:
            return None
        raw = found[-1]
    raw = raw.replace(",", "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return int(value) if value.is_integer() else value


# -- loading -------------------------------------------------------------------------------

def load_model(model_dir):
    """(model, tokenizer) in fp32 eval mode; safetensors only, no remote code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{model_dir} is not a model folder (no config.json)",
                        fix="point to a finished stage's output folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                     use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError) as e:
        from solar_merge.checkpoints import remote_code_error

        if remote_code_error(model_dir, e):
            raise remote_code_error(model_dir, e) from None
        raise UserError(f"cannot load the model in {model_dir}: {str(e).splitlines()[0]}",
                        fix="evaluation needs safetensors weights and a tokenizer in the "
                            "folder") from None
    model.eval()
    return model, tokenizer


def _tqdm(iterable, **kw):
    from tqdm.auto import tqdm

    return tqdm(iterable, leave=False, **kw)


def _read_jsonl(path, limit=None) -> list[dict]:
    from solar_merge.data import load_records

    return load_records(Path(path), max_samples=limit)


# -- perplexity ----------------------------------------------------------------------------

def perplexity(model_dir, text_file, *, seq_len: int = 256, max_chunks: int | None = 16,
               batch_size: int = 4) -> float:
    """exp(mean token NLL) over the first `max_chunks` non-overlapping `seq_len`-token chunks."""
    model, tok = load_model(model_dir)
    return _perplexity(model, tok, text_file, seq_len=seq_len, max_chunks=max_chunks,
                       batch_size=batch_size)


def text_chunks(tokenizer, text: str, seq_len: int, max_chunks: int | None) -> list[list[int]]:
    """Non-overlapping chunks of seq_len tokens (a shorter text gives one shorter chunk)."""
    # Tokenize only as much text as the chunks can use (generously: >= 1 char per token).
    if max_chunks is not None:
        text = text[: seq_len * max_chunks * 12]
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not chunks and len(ids) >= 2:
        chunks = [ids]
    return chunks[:max_chunks] if max_chunks is not None else chunks


def _perplexity(model, tok, text_file, *, seq_len=256, max_chunks=16, batch_size=4) -> float:
    import torch

    path = Path(text_file)
    if not path.is_file():
        raise UserError(f"perplexity text {path} not found", fix="check the path")
    chunks = text_chunks(tok, path.read_text(encoding="utf-8"), seq_len, max_chunks)
    if not chunks:
        raise UserError(f"{path} is too short for perplexity (fewer than 2 tokens)",
                        fix="give a longer held-out text")
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in _tqdm(range(0, len(chunks), batch_size), desc="perplexity"):
            batch = torch.tensor(chunks[i:i + batch_size])  # equal lengths (or one chunk)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    batch[:, 1:].reshape(-1), reduction="sum")
            total += nll.item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)


# -- answer loss ---------------------------------------------------------------------------

def encode_qa(tokenizer, record: dict) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one QA record through the chat template; the prompt's labels
    are -100 so only the response (and its end-of-turn) is scored."""
    from solar_merge.data import to_prompt_completion

    pc = to_prompt_completion(record)
    prompt, completion = pc["prompt"], pc["completion"]
    if isinstance(prompt, str):  # plain prompt/completion strings
        prompt_text, full_text = prompt, prompt + completion
    else:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False,
                                                    add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
        if not full_text.startswith(prompt_text):
            raise UserError("the chat template renders the prompt differently once the answer "
                            "is appended; cannot mask the prompt",
                            fix="use a model whose chat template supports add_generation_prompt")
    p_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    c_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    return p_ids + c_ids, [-100] * len(p_ids) + c_ids


def answer_loss(model_dir, qa_file, *, limit: int | None = None, batch_size: int = 8) -> float:
    """Mean NLL per response token of held-out QA records (prompt masked)."""
    model, tok = load_model(model_dir)
    return _answer_loss(model, tok, qa_file, limit=limit, batch_size=batch_size)


def answer_loss_terms(model, tok, records, batch_size: int = 8) -> tuple[float, int]:
    """(summed NLL, number of scored tokens) over records."""
    import torch

    encoded = [encode_qa(tok, r) for r in records]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    total, count = 0.0, 0
    with torch.inference_mode():
        for i in _tqdm(range(0, len(encoded), batch_size), desc="answer loss"):
            part = encoded[i:i + batch_size]
            width = max(len(ids) for ids, _ in part)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in part])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in part])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in part])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                    target.reshape(-1), ignore_index=-100,
                                                    reduction="sum")
            total += nll.item()
            count += int((target != -100).sum())
    return total, count


def _answer_loss(model, tok, qa_file, *, limit=None, batch_size=8) -> float:
    records = _read_jsonl(qa_file, limit)
    if not records:
        raise UserError(f"{qa_file} holds no QA records", fix="check the file")
    total, count = answer_loss_terms(model, tok, records, batch_size)
    if count == 0:
        raise UserError(f"{qa_file}: no response tokens to score", fix="check the records")
    return total / count


# -- math exact match ----------------------------------------------------------------------

def math_exact_match(model_dir, problems_file, *, max_new_tokens: int = 96,
                     limit: int | None = None, batch_size: int = 8,
                     field: str = "question") -> float:
    """Share of problems whose greedy answer (chat template) gives `final`: the number after
    the last '####', else the last number. `field` names the question to ask."""
    model, tok = load_model(model_dir)
    return _math_exact_match(model, tok, problems_file, max_new_tokens=max_new_tokens,
                             limit=limit, batch_size=batch_size, field=field)


def generate_answers(model, tok, questions: list[str], *, max_new_tokens: int = 96,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers through the chat template, batched with left padding."""
    import torch

    old_side = tok.padding_side
    tok.padding_side = "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    eos = tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None
    eos_ids = [i for i in {tok.eos_token_id, eos} if i is not None]
    answers: list[str] = []
    try:
        with torch.inference_mode():
            for i in _tqdm(range(0, len(questions), batch_size), desc="math generation"):
                prompts = [tok.apply_chat_template([{"role": "user", "content": q}],
                                                   tokenize=False, add_generation_prompt=True)
                           for q in questions[i:i + batch_size]]
                enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                     temperature=None, top_p=None, top_k=None,
                                     pad_token_id=pad, eos_token_id=eos_ids or None)
                new = out[:, enc["input_ids"].shape[1]:]
                answers += tok.batch_decode(new, skip_special_tokens=True)
    finally:
        tok.padding_side = old_side
    return answers


def _math_exact_match(model, tok, problems_file, *, max_new_tokens=96, limit=None,
                      batch_size=8, field="question") -> float:
    problems = _read_jsonl(problems_file, limit)
    if not problems:
        raise UserError(f"{problems_file} holds no problems", fix="check the file")
    bad = next((p for p in problems if field not in p or "final" not in p), None)
    if bad is not None:
        raise UserError(f"{problems_file}: a problem lacks `{field}` or `final` (keys "
                        f"{sorted(bad)})", fix=f"records need {field} and final (an integer)")
    answers = generate_answers(model, tok, [p[field] for p in problems],
                               max_new_tokens=max_new_tokens, batch_size=batch_size)
    hits = sum(extract_answer(a) == p["final"] for a, p in zip(answers, problems))
    return hits / len(problems)


# -- all at once ---------------------------------------------------------------------------

def evaluate(model_dir, spec: dict, *, base_dir=None) -> dict[str, float]:
    """Run the metrics named in `spec` on one load of the model; add `layers` and `params`."""
    parsed = parse_spec(spec, base_dir=base_dir)
    model, tok = load_model(model_dir)
    results: dict[str, float] = {
        "layers": int(getattr(model.config, "num_hidden_layers", 0)),
        "params": int(sum(p.numel() for p in model.parameters())),
    }
    if parsed.perplexity:
        s = parsed.perplexity
        results["perplexity"] = _perplexity(model, tok, s.text, seq_len=s.seq_len,
                                            max_chunks=s.max_chunks, batch_size=s.batch_size)
    if parsed.answer_loss:
        s = parsed.answer_loss
        results["answer_loss"] = _answer_loss(model, tok, s.qa, limit=s.limit,
                                              batch_size=s.batch_size)
    if parsed.math_exact_match:
        s = parsed.math_exact_match
        results["math_exact_match"] = _math_exact_match(
            model, tok, s.problems, max_new_tokens=s.max_new_tokens, limit=s.limit,
            batch_size=s.batch_size, field=s.field)
    return results
