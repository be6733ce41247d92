"""Synthetic math data the paper's way: rephrase seed problems and their answers with a model.

SOLAR's Synth. Math-Instruct / Synth. Math-Alignment were made "using a process similar to
MetaMath": a model rephrases each seed question (GSM8K) and rewrites its answer step by step;
a rephrased pair is kept only when it passes MetaMath-style checks. Then

- math_instruct.jsonl  {prompt: rephrased question, completion: rephrased answer}
- math_alignment.jsonl {prompt: rephrased question, chosen: rephrased answer,
                        rejected: original answer}

which the sft and dpo stages read as they are (prompt/completion and preference records).

Seeds: GSM8K ({question, answer ending in `#### N`}), MetaMathQA ({query, response ending in
`The answer is: N`}) or our own math format ({question, answer, final?}), from a local file, a
folder or a Hub dataset (`subset` for a Hub config such as GSM8K's `main`).

Checks, in this order (the first that fails is the reason a pair is dropped):
  empty         a generated text is empty
  runaway       a text hit its length limit (twice the seed's length plus some slack, or the
                token cap) without ending, or repeats itself
  unchanged     the "rephrased" question or answer is the seed's own text
  numbers       the rephrased question lost a number of the seed question, or added one
                (a question that already computes a step is not a rephrasing)
  no_question   the seed asks a question (`?`), the rephrased text does not
  final         the rephrased answer's final number is not the seed's final answer
  duplicate     the same pair was already kept for this problem (samples_per_problem > 1)

Resumable: every attempt (kept or dropped, with its reason) is appended to
`synth_attempts.jsonl` in the hidden work folder and fsynced per batch, then
`synth_progress.json` records how many problems are done and the file's length; a killed run
re-runs only the unfinished batch. Batches are cut from the problem list at fixed positions and
each batch's sampling seed is derived from `seed` and the batch's position, so a resumed run
writes what an uninterrupted one would have. Only a finished run gets the data files, the card
and the completion marker (solar_merge.outputs.atomic_output).

The generation boundary is `Generator.generate`: transformers (batched, left padding, KV
cache, greedy or sampled with a seed), or vLLM when it is installed and a GPU is present.
Tests replace it with a scripted fake. Nothing here imports torch at module import time.
"""

import json
import os
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

from solar_merge.errors import UserError

INSTRUCT = "math_instruct.jsonl"
ALIGNMENT = "math_alignment.jsonl"
ATTEMPTS = "synth_attempts.jsonl"
REPORT = "synth_report.json"
PROGRESS = "synth_progress.json"
CARD = "README.md"
OUTPUT_FILES = (INSTRUCT, ALIGNMENT, ATTEMPTS, REPORT, CARD)
REASONS = ("empty", "runaway", "unchanged", "numbers", "no_question", "final", "duplicate")
ENGINES = ("auto", "transformers", "vllm")
VERSION = 2  # bump when prompts or checks change: finished outputs are then redone

# Length limits of a generated text, in tokens: FACTOR x the seed text + SLACK. A rephrasing
# twice as long as its seed is not a rephrasing any more.
Q_FACTOR, Q_SLACK = 2, 32
A_FACTOR, A_SLACK = 3, 64


# -- seed problems ---------------------------------------------------------------------------

@dataclass
class Problem:
    index: int          # position in the seed data (after `limit`)
    question: str
    answer: str
    final: Fraction     # the seed's final answer


def read_seed(source, *, split: str = "train", subset: str | None = None,
              limit: int | None = None) -> tuple[list[Problem], Counter]:
    """The seed problems of `source` (file, folder or Hub dataset) and the count of records
    skipped because their final answer is not a number (MATH-style answers in MetaMathQA)."""
    records = _seed_records(source, split, subset, limit)
    if not records:
        raise UserError(f"seed data {source} is empty: it holds no records",
                        fix="give a file of math problems")
    problems, skipped = [], Counter()
    for n, record in enumerate(records):
        question, answer, final_text = _seed_fields(record, n, source)
        final = parse_number(final_text)
        if final is None:
            skipped["seed answer is not a number"] += 1
            continue
        problems.append(Problem(n, question, answer, final))
    if not problems:
        raise UserError(f"no record of {source} has a numeric final answer "
                        f"({sum(skipped.values())} records skipped)",
                        fix="give math word problems whose answers end in a number "
                            "(GSM8K: `#### 42`)")
    return problems, skipped


def _seed_records(source, split, subset, limit) -> list[dict]:
    from solar_merge.data import load_records

    path = Path(os.path.expanduser(str(source)))
    if subset is None or path.exists():
        return load_records(source, split=split, max_samples=limit)
    try:  # a Hub dataset with several configs (GSM8K: main, socratic)
        import datasets

        sl = split if limit is None else f"{split}[:{limit}]"
        return datasets.load_dataset(str(source), subset, split=sl).to_list()
    except Exception as e:  # noqa: BLE001 - offline, unknown name or config: the user's to fix
        raise UserError(f"seed data `{source}` (subset {subset}) cannot be loaded from the Hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                        fix="check the name and subset while online, or give a local "
                            ".jsonl/.json/.parquet file") from None


_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_METAMATH_FINAL = re.compile(r"The answer is:?\s*(.+?)\s*$", re.DOTALL | re.IGNORECASE)


def _seed_fields(record: dict, n: int, source) -> tuple[str, str, str]:
    """(question, answer, final answer text) of one seed record, or a UserError naming it."""
    where = f"seed data {source}, record {n}"
    if "question" in record and "answer" in record:  # GSM8K, or ours (with `final`)
        question, answer = record["question"], record["answer"]
        final = record.get("final")
        pattern, form = _GSM8K_FINAL, "end in `#### N` (GSM8K's form) or have a `final` field"
    elif "query" in record and "response" in record:  # MetaMathQA
        question, answer, final = record["query"], record["response"], None
        pattern, form = _METAMATH_FINAL, "end in `The answer is: N` (MetaMathQA's form)"
    else:
        raise UserError(f"{where} has keys {sorted(record)}: not a math problem",
                        fix="give GSM8K records (question, answer ending in `#### N`), "
                            "MetaMathQA records (query, response) or ours (question, answer, "
                            "final)")
    if not isinstance(question, str) or not isinstance(answer, str) or not question.strip():
        raise UserError(f"{where}: the question and answer must be non-empty strings",
                        fix="check the seed data")
    if final is None:
        found = pattern.search(answer)
        if not found:
            raise UserError(f"{where}: the answer has no final answer ({answer[-80:]!r})",
                            fix=f"every answer must {form}")
        final = found.group(1)
    return question, answer, str(final)


# -- numbers ---------------------------------------------------------------------------------

# 1,234.5 | 1234 | .5, with an optional sign (not part of a word or of another number)
_NUMBER = re.compile(r"(?<![\w.])(-?)(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")
_FRACTION = re.compile(r"\\d?frac\{(-?\d+)\}\{(\d+)\}|(?<![\w./])(-?\d+)\s*/\s*(\d+)(?![\w./])")
_WORDS = {w: i for i, w in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty"))}
_WORDS.update({w: 10 * i for i, w in enumerate(
    ("thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"), start=3)})
_WORDS.update({"hundred": 100, "thousand": 1000})


def parse_number(text) -> Fraction | None:
    """The number `text` states (`1,234`, `-3.5`, `$18`, `50%`, `3/4`, `\\frac{1}{2}`), or None
    (`2\\sqrt{3}`, `(1, 2)`, a word)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return Fraction(str(text))
    text = str(text).strip().rstrip(".")
    for junk in ("\\$", "$", "\\%", "%", "\\!", "\\,"):
        text = text.replace(junk, "")
    text = text.strip()
    m = _FRACTION.fullmatch(text)
    if m:
        num, den = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        return Fraction(int(num), int(den)) if int(den) else None
    m = _NUMBER.fullmatch(text)
    return Fraction(m.group(1) + m.group(2).replace(",", "")) if m else None


def numbers_in(text: str, *, words: bool = False) -> set[Fraction]:
    """Every number written in `text`, without sign (a `-` is more often a minus between two
    numbers than a sign); number words too when `words`."""
    found = {Fraction(digits.replace(",", "")) for _, digits in _NUMBER.findall(text)}
    if words:
        found |= {Fraction(_WORDS[w]) for w in re.findall(r"[a-z]+", text.lower())
                  if w in _WORDS}
    return found


def final_answer(text: str) -> Fraction | None:
    """The final number of a generated answer: after the last `####`, else after the last
    `answer is`, else the last number (the rule our math evaluation uses too)."""
    for marker in ("####", "answer is"):
        at = text.lower().rfind(marker)
        if at >= 0:
            tail = text[at + len(marker):].lstrip(" :*")
            tail = tail.removeprefix("\\(").removeprefix("\\$").removeprefix("$")
            fraction = _FRACTION.match(tail)
            if fraction:
                return parse_number(fraction.group(0))
            found = _NUMBER.search(tail)
            if found and not tail[:found.start()].strip(" $*"):
                return Fraction(found.group(1) + found.group(2).replace(",", ""))
    numbers = _NUMBER.findall(text)
    return Fraction(numbers[-1][0] + numbers[-1][1].replace(",", "")) if numbers else None


def format_number(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else (
        f"{float(x):g}" if (10 ** 6 % x.denominator == 0) else f"{x.numerator}/{x.denominator}")


# -- prompts (few-shot chat: a 135M model answers a bare instruction instead of following it) --

_SHOTS = (
    {"question": "Tom has 12 red pens and buys 5 blue pens. How many pens does he have now?",
     "answer": "Tom has 12 + 5 = <<12+5=17>>17 pens.\n#### 17",
     "rephrased_question": "Tom owns 12 red pens. He then buys another 5 pens that are blue. "
                           "What is the total number of pens Tom has now?",
     "rephrased_answer": "Tom starts with 12 pens. He buys 5 more, so he has 12 + 5 = 17 "
                         "pens.\nThe answer is 17."},
    {"question": "A baker makes 30 muffins and sells 18 of them. How many muffins are left?",
     "answer": "30 - 18 = <<30-18=12>>12 muffins are left.\n#### 12",
     "rephrased_question": "There are 30 muffins made by a baker, and 18 of these muffins are "
                           "sold. How many muffins does the baker still have?",
     "rephrased_answer": "The baker makes 30 muffins. After selling 18, there are 30 - 18 = "
                         "12 muffins left.\nThe answer is 12."},
)
_ASK_QUESTION = "Rephrase this question in other words, keeping every number:\n{question}"
_ASK_ANSWER = ("Rewrite this solution step by step in your own words. End with "
               "\"The answer is\" and the number.\nQuestion: {question}\nSolution: {answer}")
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations


def _plain(answer: str) -> str:
    return _CALCULATOR.sub("", answer).strip()


def question_messages(p: Problem) -> list[dict]:
    messages = []
    for shot in _SHOTS:
        messages += [{"role": "user", "content": _ASK_QUESTION.format(**shot)},
                     {"role": "assistant", "content": shot["rephrased_question"]}]
    return messages + [{"role": "user", "content": _ASK_QUESTION.format(question=p.question)}]


def answer_messages(p: Problem) -> list[dict]:
    messages = []
    for shot in _SHOTS:
        messages += [{"role": "user", "content": _ASK_ANSWER.format(
                          question=shot["question"], answer=_plain(shot["answer"]))},
                     {"role": "assistant", "content": shot["rephrased_answer"]}]
    return messages + [{"role": "user", "content": _ASK_ANSWER.format(
        question=p.question, answer=_plain(p.answer))}]


# -- the generation boundary -----------------------------------------------------------------

@dataclass
class Generation:
    text: str
    finished: bool  # ended by the model (end of turn), not cut by the token limit
    tokens: int     # new tokens generated


class Generator:
    """Chat conversations in, `n` generations per conversation out."""

    name = "generator"

    def count_tokens(self, text: str) -> int:
        raise NotImplementedError

    def generate(self, conversations: list[list[dict]], *, max_new_tokens: int, n: int,
                 temperature: float, seed: int) -> list[list[Generation]]:
        raise NotImplementedError


def _require_chat_template(tokenizer, model: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"the tokenizer of {model} has no chat template: rephrasing asks a chat "
                        "model (few-shot turns through its template)",
                        fix="use an instruction-tuned model whose tokenizer has a chat "
                            "template (e.g. the default, SmolLM2-135M-Instruct)")


class TransformersGenerator(Generator):
    """transformers' batched generation: left padding, KV cache, greedy or seeded sampling."""

    name = "transformers"

    def __init__(self, model: str, threads: int | None = None, dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from solar_merge.checkpoints import remote_code_error, require_safetensors

        local = Path(model)
        if local.is_dir():
            require_safetensors(local)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=False)
        except Exception as e:  # noqa: BLE001 - a missing or broken tokenizer is the user's
            raise remote_code_error(model, e) or UserError(
                f"cannot load a tokenizer from {model} ({type(e).__name__}: {str(e)[:200]})",
                fix="give a model folder with its tokenizer, or a Hub id while online") from None
        _require_chat_template(self.tokenizer, model)
        self.tokenizer.padding_side = "left"  # batched decoding continues every row at the end
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.threads = threads
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.model = AutoModelForCausalLM.from_pretrained(
                model, dtype=getattr(torch, dtype), trust_remote_code=False
            ).to(self.device).eval()
        except Exception as e:  # noqa: BLE001
            raise remote_code_error(model, e) or UserError(
                f"cannot load {model} as a causal language model ({type(e).__name__}: "
                f"{str(e)[:200]})", fix="give a causal LM (a chat model) folder or Hub id"
            ) from None
        eos = self.model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos = sorted(i for i in eos if i is not None)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, conversations, *, max_new_tokens, n, temperature, seed):
        import torch

        texts = [self.tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                 for c in conversations]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True,
                             add_special_tokens=False).to(self.device)
        if temperature > 0:  # plain sampling: no top-k/top-p cut (MetaMath's setting)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": 1.0, "top_k": 0}
        else:
            sampling = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        torch.manual_seed(seed)
        # CPU threads for this call only. On a machine whose cores are busy, every thread
        # beyond the free cores costs more than it brings (OpenMP threads wait for each other).
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.model.generate(**enc, max_new_tokens=max_new_tokens,
                                          num_return_sequences=n, eos_token_id=self.eos,
                                          pad_token_id=self.tokenizer.pad_token_id, **sampling)
        finally:
            torch.set_num_threads(before)
        rows = []
        for row in out[:, enc["input_ids"].shape[1]:].tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos), None)
            kept = row if end is None else row[:end]
            rows.append(Generation(self.tokenizer.decode(kept, skip_special_tokens=True),
                                   end is not None, len(kept) + (end is not None)))
        return [rows[i * n:(i + 1) * n] for i in range(len(conversations))]


class VLLMGenerator(Generator):  # pragma: no cover - needs vLLM and a GPU (not on CI)
    """vLLM's offline engine (continuous batching); chosen by `engine: auto` on a GPU."""

    name = "vllm"

    def __init__(self, model: str, dtype: str = "auto"):
        from vllm import LLM

        self.llm = LLM(model=model, dtype=dtype, trust_remote_code=False)
        self.tokenizer = self.llm.get_tokenizer()
        _require_chat_template(self.tokenizer, model)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate(self, conversations, *, max_new_tokens, n, temperature, seed):
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens,
                                seed=seed)
        outs = self.llm.chat(conversations, params, use_tqdm=False)
        return [[Generation(o.text, o.finish_reason == "stop", len(o.token_ids))
                 for o in out.outputs] for out in outs]


def pick_engine(engine: str) -> str:
    """`auto`: vLLM when it is installed and a GPU is present, else transformers."""
    if engine not in ENGINES:
        raise UserError(f"engine `{engine}` is not one of {', '.join(ENGINES)}",
                        fix="use auto, transformers or vllm")
    if engine != "auto":
        return engine
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return "transformers"
    import torch

    return "vllm" if torch.cuda.is_available() else "transformers"


def load_generator(model: str, engine: str, threads: int | None = None,
                   dtype: str = "float32") -> Generator:
    if engine == "vllm":
        try:
            return VLLMGenerator(model, dtype)
        except ImportError:
            raise UserError("engine vllm: the vllm package is not installed",
                            fix="pip install vllm (needs a GPU), or use --engine transformers"
                            ) from None
    return TransformersGenerator(model, threads, dtype)


# -- the checks ------------------------------------------------------------------------------

def _repeats(text: str, n: int = 6, times: int = 3) -> bool:
    """The same n words `times` times or more: a model stuck in a loop."""
    words = text.split()
    grams = Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))
    return bool(grams) and max(grams.values()) >= times


def check(problem: Problem, question: Generation, answer: Generation, *, q_limit: int,
          a_limit: int, kept: set) -> str | None:
    """The reason to drop this rephrased pair (see the module doc), or None to keep it."""
    rq, ra = question.text.strip(), answer.text.strip()
    if not rq or not ra:
        return "empty"
    if (not question.finished or not answer.finished or question.tokens > q_limit
            or answer.tokens > a_limit or _repeats(rq) or _repeats(ra)):
        return "runaway"
    if _norm(rq) == _norm(problem.question) or _norm(ra) in (
            _norm(problem.answer), _norm(_plain(problem.answer))):  # the prompt's own copy
        return "unchanged"
    if numbers_in(problem.question) - numbers_in(rq, words=True) or \
            numbers_in(rq) - numbers_in(problem.question, words=True):
        return "numbers"
    if "?" in problem.question and "?" not in rq:
        return "no_question"
    if final_answer(ra) != problem.final:
        return "final"
    if (_norm(rq), _norm(ra)) in kept:
        return "duplicate"
    return None


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def finish_answer(text: str, final: Fraction) -> str:
    """A kept answer ends in GSM8K's `#### N` line (what our math evaluation reads first)."""
    text = text.strip()
    return text if "####" in text else f"{text}\n#### {format_number(final)}"


# -- the run ---------------------------------------------------------------------------------

@dataclass
class Options:
    model: str | None = None      # None: the embedded SmolLM2-135M-Instruct
    limit: int | None = None
    samples_per_problem: int = 1
    batch_size: int = 8
    seed: int = 0
    temperature: float = 0.0
    max_new_tokens: int = 384     # cap per generated text
    split: str = "train"
    subset: str | None = None
    engine: str = "auto"
    threads: int | None = None    # CPU threads of transformers' generation (None: torch's)
    license: str | None = None
    precision: str = "auto"       # the generating model's dtype (solar_merge.precision)

    def check(self) -> None:
        from solar_merge.precision import check

        check(self.precision)
        if self.limit is not None and self.limit < 1:
            raise UserError(f"limit is {self.limit}: no problem would be rephrased",
                            fix="give a positive number of seed problems, or leave it out")
        for name in ("samples_per_problem", "batch_size", "max_new_tokens", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"{name} is {getattr(self, name)}", fix=f"give {name} >= 1")
        if self.temperature < 0:
            raise UserError(f"temperature is {self.temperature}", fix="give 0 (greedy) or more")
        if self.samples_per_problem > 1 and self.temperature == 0:
            raise UserError(f"samples_per_problem is {self.samples_per_problem} with greedy "
                            "decoding (temperature 0): every sample would be the same",
                            fix="set a temperature > 0 (MetaMath sampled at 0.7), or one "
                                "sample per problem")


@dataclass
class Result:
    out: Path
    problems: int
    attempts: int
    kept: int
    dropped: dict[str, int]
    skipped_seeds: dict[str, int]
    new_tokens: int
    seconds: float                    # generation time of this run (resumed part only)
    report: dict = field(default_factory=dict)
    skipped: bool = False             # the output was already complete

    @property
    def kept_fraction(self) -> float:
        return self.kept / self.attempts if self.attempts else 0.0

    def summary(self) -> str:
        r = self.report
        dropped = ", ".join(f"{k} {v}" for k, v in self.dropped.items()) or "none"
        skipped = sum(self.skipped_seeds.values())
        lines = [f"{self.out}: " + ("already complete; " if self.skipped else "")
                 + f"kept {self.kept} of {self.attempts} rephrased pairs "
                 f"({100 * self.kept_fraction:.1f}%) from {self.problems} seed problems"
                 + (f" ({skipped} seed records without a numeric answer skipped)"
                    if skipped else ""),
                 f"dropped: {dropped}",
                 (f"generation: {r['new_tokens']} new tokens in {r['generation_seconds']:.1f} s "
                  f"({r['tokens_per_second']:.1f} tokens/s, {r['problems_per_minute']} "
                  "problems/min)"),
                 f"files: {INSTRUCT}, {ALIGNMENT}, {ATTEMPTS}, {REPORT}, {CARD}"]
        return "\n".join(lines)


def synth_math(source, out_dir, options: Options | None = None, *,
               generator: Generator | None = None, progress: bool = True,
               digest: str | None = None) -> Result:
    """Rephrase the seed problems of `source` into `out_dir` (see the module doc); resumes a
    killed run, skips a finished one. `generator` replaces the model (tests). `digest`
    marks `out_dir` complete (a recipe's stage hash; default: the hash of the seed data, the
    model and the options)."""
    from solar_merge.outputs import (
        atomic_output,
        check_replaceable,
        config_hash,
        fingerprint,
        is_complete,
    )

    o = options or Options()
    o.check()
    problems, skipped_seeds = read_seed(source, split=o.split, subset=o.subset, limit=o.limit)
    model = o.model
    engine = generator.name if generator is not None else pick_engine(o.engine)
    if model is None and generator is None:
        from solar_merge.embedded import embedded_model

        model = str(embedded_model())
    model_id = model or generator.name
    if os.path.exists(str(model_id)):
        model_id = str(Path(model_id).absolute())
    out = Path(os.path.expanduser(str(out_dir))).absolute()
    from solar_merge import precision

    request = precision.requested(o.precision)
    want = digest or config_hash({
        "version": VERSION, "seed_data": fingerprint(source), "split": o.split,
        "subset": o.subset, "limit": o.limit, "precision": request,
        "model": fingerprint(model_id) if os.path.exists(model_id) else model_id,
        "engine": engine, **{k: getattr(o, k) for k in (
            "samples_per_problem", "batch_size", "seed", "temperature", "max_new_tokens")}})
    if is_complete(out, want):
        report = json.loads((out / REPORT).read_text())
        return _result(out, report, skipped=True)
    # Refused before anything is written: a folder we may not replace, a model that does not
    # load, a tokenizer without a chat template.
    check_replaceable(out)
    chosen = precision.decide(request, training=False)
    precision.announce(chosen, "synth-math")
    gen = generator or load_generator(model, engine, o.threads, chosen.dtype)
    with atomic_output(out, want, keep_partial=True) as work:
        state = _resume(work, want)
        t0 = time.perf_counter()
        state = _generate(problems, gen, o, work, state, progress)
        seconds = time.perf_counter() - t0
        report = _write_outputs(work, state, problems, skipped_seeds, o, source, model_id,
                                engine, seconds, chosen.record())
    return _result(out, report, seconds=seconds)


def _resume(work: Path, want: str) -> dict:
    """The progress of an earlier, killed run of the same config (its attempts file cut back
    to the last finished batch), or a fresh start."""
    progress = work / PROGRESS
    attempts = work / ATTEMPTS
    state = {"config_hash": want, "done": 0, "bytes": 0, "new_tokens": 0, "seconds": 0.0}
    try:
        old = json.loads(progress.read_text())
    except (OSError, ValueError):
        old = None
    if old and old.get("config_hash") == want and attempts.is_file() \
            and attempts.stat().st_size >= old["bytes"]:
        state = old
    with open(attempts, "a+b") as f:  # lines of a batch whose progress was never recorded
        f.truncate(state["bytes"])
    return state


def _generate(problems: list[Problem], gen: Generator, o: Options, work: Path, state: dict,
              progress: bool) -> dict:
    from tqdm.auto import tqdm

    from solar_merge.testhooks import crash_point

    kept_count = _count_kept(work / ATTEMPTS)
    bar = tqdm(total=len(problems), initial=state["done"], desc="synth-math", unit="problem",
               disable=not progress, dynamic_ncols=True)
    run_tokens, run_seconds = 0, 0.0
    try:
        for start in range(state["done"], len(problems), o.batch_size):
            batch = problems[start:start + o.batch_size]
            t0 = time.perf_counter()
            rows, tokens = _one_batch(batch, gen, o, seed=o.seed * 1_000_003 + start)
            run_seconds += time.perf_counter() - t0
            run_tokens += tokens
            with open(work / ATTEMPTS, "ab") as f:
                f.write("".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n"
                                for r in rows).encode())
                f.flush()
                os.fsync(f.fileno())
            crash_point("synth-before-progress")
            state = {**state, "done": start + len(batch),
                     "bytes": (work / ATTEMPTS).stat().st_size,
                     "new_tokens": state["new_tokens"] + tokens,
                     "seconds": state["seconds"] + time.perf_counter() - t0}
            _write_json(work / PROGRESS, state)
            crash_point("synth-after-batch")
            kept_count += sum(r["kept"] for r in rows)
            bar.update(len(batch))
            bar.set_postfix(kept=kept_count, tok_s=f"{run_tokens / max(run_seconds, 1e-9):.1f}")
    finally:
        bar.close()
    return state


def _one_batch(batch: list[Problem], gen: Generator, o: Options, seed: int):
    """Rephrase one batch (questions, then answers); every attempt as a record with its
    verdict, and the number of new tokens. Two calls, each as long as its own texts need: one
    call for both (max of the two lengths for every row) took 28 CPU-s instead of 24 for 8
    SmolLM2 problems, since a decoding step costs in proportion to the rows on a CPU."""
    q_limits = [Q_FACTOR * gen.count_tokens(p.question) + Q_SLACK for p in batch]
    a_limits = [A_FACTOR * gen.count_tokens(_plain(p.answer)) + A_SLACK for p in batch]
    n = o.samples_per_problem
    questions = gen.generate([question_messages(p) for p in batch], n=n, seed=seed,
                             max_new_tokens=min(o.max_new_tokens, max(q_limits)),
                             temperature=o.temperature)
    answers = gen.generate([answer_messages(p) for p in batch], n=n, seed=seed + 1,
                           max_new_tokens=min(o.max_new_tokens, max(a_limits)),
                           temperature=o.temperature)
    rows, tokens = [], 0
    for p, qs, as_, ql, al in zip(batch, questions, answers, q_limits, a_limits):
        kept: set = set()
        for k, (q, a) in enumerate(zip(qs, as_)):
            tokens += q.tokens + a.tokens
            reason = check(p, q, a, q_limit=min(ql, o.max_new_tokens),
                           a_limit=min(al, o.max_new_tokens), kept=kept)
            if reason is None:
                kept.add((_norm(q.text), _norm(a.text)))
            rows.append({"index": p.index, "sample": k, "question": p.question,
                         "answer": p.answer, "final": format_number(p.final),
                         "rephrased_question": q.text.strip(),
                         "rephrased_answer": (finish_answer(a.text, p.final) if reason is None
                                              else a.text.strip()),
                         "kept": reason is None, "reason": reason,
                         "tokens": q.tokens + a.tokens})
    return rows, tokens


def _count_kept(path: Path) -> int:
    return sum(r["kept"] for r in _read_jsonl(path)) if path.is_file() else 0


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _write_json(path: Path, data) -> None:
    """Replace `path` atomically and durably (a kill leaves the old or the new file)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _write_outputs(work: Path, state: dict, problems, skipped_seeds: Counter, o: Options,
                   source, model_id: str, engine: str, seconds: float, chosen: dict) -> dict:
    attempts = _read_jsonl(work / ATTEMPTS)
    kept = [r for r in attempts if r["kept"]]
    _write_lines(work / INSTRUCT, [{"prompt": r["rephrased_question"],
                                    "completion": r["rephrased_answer"]} for r in kept])
    _write_lines(work / ALIGNMENT, [{"prompt": r["rephrased_question"],
                                     "chosen": r["rephrased_answer"],
                                     "rejected": r["answer"]} for r in kept])
    dropped = Counter(r["reason"] for r in attempts if not r["kept"])
    minutes = state["seconds"] / 60
    report = {
        "seed_data": str(source), "model": model_id, "engine": engine, "precision": chosen,
        "problems": len(problems), "attempts": len(attempts), "kept": len(kept),
        "kept_fraction": round(len(kept) / len(attempts), 4) if attempts else 0.0,
        "dropped": {r: dropped[r] for r in REASONS if dropped[r]},
        "skipped_seed_records": dict(skipped_seeds),
        "new_tokens": state["new_tokens"], "generation_seconds": round(state["seconds"], 2),
        "tokens_per_second": round(state["new_tokens"] / max(state["seconds"], 1e-9), 2),
        "problems_per_minute": round(len(problems) / minutes, 2) if minutes else None,
        "options": {k: v for k, v in asdict(o).items() if k != "model"},
    }
    _write_json(work / REPORT, report)
    _write_card(work, report, o, source)
    (work / PROGRESS).unlink(missing_ok=True)
    return report


def _write_lines(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def _result(out: Path, report: dict, *, seconds: float = 0.0, skipped: bool = False) -> Result:
    return Result(out, report["problems"], report["attempts"], report["kept"],
                  report["dropped"], report["skipped_seed_records"], report["new_tokens"],
                  seconds, report, skipped)


# -- the dataset card ------------------------------------------------------------------------

def _write_card(work: Path, report: dict, o: Options, source) -> None:
    """README.md with the Hub's dataset metadata (two configs, one per file), so that
    `solar-merge push DIR owner/name` uploads it as a dataset repo."""
    from huggingface_hub import DatasetCard, DatasetCardData

    from solar_merge.checkpoints import is_hub_id

    hub = [str(x) for x in (source, report["model"]) if is_hub_id(str(x))]
    n = report["kept"]
    size = ("n<1K" if n < 1000 else "1K<n<10K" if n < 10_000 else "10K<n<100K"
            if n < 100_000 else "100K<n<1M")
    data = DatasetCardData(
        language=["en"], license=o.license, pretty_name="Synthetic math (MetaMath-style "
        "rephrasings)", task_categories=["text-generation", "question-answering"],
        tags=["synthetic", "math", "solar-merge", "metamath"], size_categories=[size],
        source_datasets=[str(source)] if is_hub_id(str(source)) else None,
        configs=[{"config_name": "math_instruct", "default": True,
                  "data_files": [{"split": "train", "path": INSTRUCT}]},
                 {"config_name": "math_alignment",
                  "data_files": [{"split": "train", "path": ALIGNMENT}]}],
    )
    dropped = ", ".join(f"{k} {v}" for k, v in report["dropped"].items()) or "none"

    def name(x: str) -> str:  # local paths by their name only: a card travels
        return x if is_hub_id(x) else Path(x).name

    body = [
        "# Synthetic math: rephrased questions and answers", "",
        ("Made with `solar-merge synth-math` (SOLAR's Synth. Math-Instruct / Math-Alignment, "
         "\"a process similar to MetaMath\"): a model rephrases each seed question and "
         "rewrites its answer step by step; a pair is kept only when the rewritten answer's "
         "final number is the seed's, the rephrased question keeps every number of the "
         "original (and adds none), and neither text is empty, unchanged or runaway."), "",
        ("- `math_instruct` (math_instruct.jsonl): {prompt: rephrased question, completion: "
         "rephrased answer}"),
        ("- `math_alignment` (math_alignment.jsonl): {prompt: rephrased question, chosen: "
         "rephrased answer, rejected: original answer}"),
        "- synth_attempts.jsonl: every attempt with its verdict; synth_report.json: the counts",
        "", "| | |", "|---|---|",
        f"| seed data | {name(str(source))} |", f"| model | {name(report['model'])} |",
        (f"| precision | {report['precision']['precision']} "
         f"({report['precision']['reason']}) |"),
        f"| seed problems | {report['problems']} |",
        (f"| attempts | {report['attempts']} ({o.samples_per_problem} per problem, "
         f"temperature {o.temperature}, seed {o.seed}) |"),
        f"| kept | {report['kept']} ({100 * report['kept_fraction']:.1f}%) |",
        f"| dropped | {dropped} |", "",
        "Check the licenses of the seed data and of the model before sharing."
        + (f" Hub sources: {', '.join(hub)}." if hub else ""),
    ]
    DatasetCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body) + "\n").save(work / CARD)
