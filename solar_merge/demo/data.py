"""The demo's offline data: Python's own reference manual (`pydoc_data.topics`) and synthetic
arithmetic, no downloads. `demo_data(out)` writes what the demo trains on; `build_task_data()`
built the held-out data that solar_merge/tasks ships as lm-eval tasks (committed), and the
training data are kept free of it.
"""

import hashlib
import json
import random
import re
import sys
from pathlib import Path

from solar_merge.outputs import atomic_output, config_hash, is_complete

DATA_VERSION = 4  # 3: training data share no 13-gram with the shipped lm-eval tasks;
#                   4: heldout.jsonl for the CPT arms' periodic held-out evaluation
HELDOUT_EVERY, HELDOUT_OFFSET = 10, 5  # topics sorted by name; index % 10 == 5 is held out
SYSTEM_PROMPT = "You are a helpful assistant who knows the Python reference manual."

# Sizes: what the demo recipe trains on (training/smollm2_demo.yaml's header says why so
# little), a little more CPT text than its steps read so that the two arms draw the same
# shuffled blocks from a larger pool. Quick (demo.QUICK_OVERRIDES) is the smoke run. The
# evaluation sets are the shipped lm-eval tasks; the recipe's `limit:` sizes them.
SIZES = {
    False: {"cpt_chars": 40_000, "sft_python": 8, "sft_math": 8, "dpo_math": 4},
    True: {"cpt_chars": 8_000, "sft_python": 1, "sft_math": 2, "dpo_math": 2},
}


def split_topics() -> tuple[list[str], list[str]]:
    """(train topics, held-out topics) of pydoc_data.topics, by name; every 10th is held out.
    The rule that chose the shipped tasks' topics (tasks/data/manifest.json lists them)."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    held = [n for i, n in enumerate(names) if i % HELDOUT_EVERY == HELDOUT_OFFSET]
    return [n for n in names if n not in held], held


def demo_data(out_dir, *, quick: bool = False, seed: int = 0) -> dict[str, Path]:
    """Write the demo's training data into `out_dir` (deterministic in `seed`); return
    name -> path. Everything the shipped lm-eval tasks evaluate on (solar_merge/tasks/data:
    held-out topics, their QA, the arithmetic test and few-shot problems) is kept out, and so
    is any paragraph or record that shares a 13-gram with their documents (the test
    `solar-merge contamination` applies; e.g. a training problem with a test problem's numbers).

    - cpt_train     .txt  reference-manual topics other than the tasks' held-out ones, minus
                          every paragraph that also occurs in the held-out text
    - heldout       .jsonl the held-out chunks of `solar_manual_ppl` ({topic, text}): what the
                          CPT arms are evaluated on every few steps (never trained on)
    - sft_python    .jsonl OpenOrca QA {system_prompt, question, response} from train topics
    - math_train    .jsonl synthetic arithmetic {question, answer, rephrased_question,
                           rephrased_answer, final}, for SFT and DPO (disjoint halves)
    - sft_math      .jsonl math instruct QA (rephrased question -> step-by-step answer)
    - dpo_math      .jsonl math alignment {prompt, chosen: rephrased answer, rejected: original}
    - manifest      .json  seed, sizes, topic split, sha256 of every file
    A finished folder (same seed/size/Python docs/tasks) is reused; an interrupted one is redone.
    """
    from pydoc_data.topics import topics

    from solar_merge import contamination
    from solar_merge.tasks import catalog, loaders

    sizes = SIZES[bool(quick)]
    docs_sha = hashlib.sha256(json.dumps(topics, sort_keys=True).encode()).hexdigest()[:16]
    shipped = json.loads((loaders.DATA_DIR / "manifest.json").read_text())
    want = config_hash({"version": DATA_VERSION, "seed": seed, "sizes": sizes, "docs": docs_sha,
                        "tasks": shipped["sha256"]})
    out = Path(out_dir).expanduser().absolute()
    names = ("cpt_train", "heldout", "sft_python", "math_train", "sft_math", "dpo_math",
             "manifest")
    files = {"cpt_train": "cpt_train.txt", "heldout": "heldout.jsonl",
             "sft_python": "sft_python_qa.jsonl",
             "math_train": "math_train.jsonl", "sft_math": "sft_math_instruct.jsonl",
             "dpo_math": "dpo_math_alignment.jsonl", "manifest": "manifest.json"}
    paths = {n: out / files[n] for n in names}
    if is_complete(out, want):
        return paths

    rng = random.Random(seed)
    _, tasks = catalog.load(list(catalog.OURS))
    dirty = contamination.Index(contamination.documents(tasks["tasks"])).dirty
    held_topics = shipped["heldout_topics"]
    train_topics = [n for n in sorted(topics) if n not in held_topics]

    # The manual repeats text across topics (e.g. "specialnames" contains "customization"),
    # so every paragraph that also occurs in the held-out text is removed from the training
    # side (also when this Python's manual differs from the one the tasks were built from).
    held_text = "\n\n".join(r["text"] for r in loaders.records("manual_ppl.jsonl"))
    held_paras = {_norm(p) for p in held_text.split("\n\n")} - {""}
    held_flat = _norm(held_text)

    # CPT text: train topics in a seeded order until the character budget is reached.
    order = list(train_topics)
    rng.shuffle(order)
    cpt_topics, parts, total = [], [], 0
    for name in order:
        if total >= sizes["cpt_chars"]:
            break
        kept = [p.strip("\n") for p in topics[name].strip().split("\n\n")
                if _norm(p) and _norm(p) not in held_paras and not dirty(p)]
        if kept:
            cpt_topics.append(name)
            parts.append("\n\n".join(kept))
            total += len(parts[-1]) + 2
    cpt_text = _cut("\n\n".join(parts) + "\n", sizes["cpt_chars"])

    held_questions = {r["question"] for r in loaders.records("manual_qa.jsonl")}
    qa_train = [r for r in _python_qa(topics, train_topics)
                if r["question"] not in held_questions and _norm(r["response"]) not in held_flat
                and not dirty(r)]
    rng.shuffle(qa_train)
    qa_train = qa_train[: sizes["sft_python"]]

    n_train = sizes["sft_math"] + sizes["dpo_math"]
    tested = {r["question"] for name in ("arith.jsonl", "arith_fewshot.jsonl")
              for r in loaders.records(name)}
    _, candidates = math_problems(0, 3 * n_train, seed=seed, exclude=tested)
    train_math = [r for r in candidates if not dirty(r)][:n_train]
    if len(train_math) < n_train:  # pragma: no cover - the generator has ~10^6 problems
        raise RuntimeError("too few arithmetic problems free of the tasks' 13-grams")
    instruct = _instruct_qa(train_math[: sizes["sft_math"]])
    pairs = _alignment_pairs(train_math[sizes["sft_math"]:])

    with atomic_output(out, want) as work:
        (work / files["cpt_train"]).write_text(cpt_text, encoding="utf-8")
        # the held-out chunks solar_manual_ppl scores, one record each: the CPT arms' eval set
        (work / files["heldout"]).write_bytes((loaders.DATA_DIR / "manual_ppl.jsonl"
                                               ).read_bytes())
        _write_jsonl(work / files["sft_python"], qa_train)
        _write_jsonl(work / files["math_train"], train_math)
        _write_jsonl(work / files["sft_math"], instruct)
        _write_jsonl(work / files["dpo_math"], pairs)
        manifest = {
            "seed": seed, "quick": bool(quick), "sizes": sizes, "data_version": DATA_VERSION,
            "python": sys.version.split()[0], "pydoc_topics_sha256": docs_sha,
            "heldout_topics": held_topics, "heldout_source": "solar_merge/tasks/data",
            "train_topics": train_topics, "cpt_topics": cpt_topics,
            "records": {"sft_python": len(qa_train), "math_train": len(train_math),
                        "sft_math": len(instruct), "dpo_math": len(pairs)},
            "chars": {"cpt_train": len(cpt_text)},
            "sha256": {n: hashlib.sha256((work / files[n]).read_bytes()).hexdigest()
                       for n in names if n != "manifest"},
        }
        (work / files["manifest"]).write_text(json.dumps(manifest, indent=1) + "\n")
    return paths


# The held-out data, shipped as lm-eval tasks (solar_merge/tasks). Built once from the reference
# Python's manual and committed, so that every machine evaluates on the same documents.
PPL_CHUNK_CHARS = 1200
ARITH_SEED, N_ARITH, N_ARITH_FEWSHOT = "eval", 48, 6


def build_task_data(out_dir=None) -> Path:
    """Write the shipped tasks' data (default: solar_merge/tasks/data) from this Python's
    reference manual and the math generator; deterministic. Rebuild with
    `python -c "from solar_merge.demo import build_task_data; build_task_data()"`.

    - manual_ppl.jsonl    {topic, text}: held-out topics cut at paragraph ends into chunks of
                          at most PPL_CHUNK_CHARS (a longer paragraph stays whole), ordered
                          round-robin over the topics so that the first N span them
    - manual_qa.jsonl     {topic, question, choices, gold}: the held-out topics' QA, the right
                          answer among three answers to other held-out questions
    - arith.jsonl         {question, answer, final}: test problems (their own seed); `answer`
                          is the worked solution ending in "#### N"
    - arith_fewshot.jsonl the same form, for few-shot examples (not in the test split)
    - manifest.json       Python version, held-out topics, sha256 of every file
    """
    from pydoc_data.topics import topics

    from solar_merge.tasks import loaders

    out = Path(out_dir) if out_dir is not None else loaders.DATA_DIR
    out.mkdir(parents=True, exist_ok=True)
    _, held = split_topics()
    per_topic = [_chunks(topics[n].strip(), PPL_CHUNK_CHARS) for n in held]
    ppl = [{"topic": held[t], "text": chunks[i]}
           for i in range(max(len(c) for c in per_topic))
           for t, chunks in enumerate(per_topic) if i < len(chunks)]

    rng = random.Random("solar-merge-manual-qa")
    qa = _python_qa(topics, held)
    mc = []
    for i, r in enumerate(qa):
        others = rng.sample([x["response"] for j, x in enumerate(qa)
                             if j != i and x["response"] != r["response"]], 3)
        gold = rng.randrange(4)
        choices = others[:gold] + [r["response"]] + others[gold:]
        mc.append({"topic": r["topic"], "question": r["question"], "choices": choices,
                   "gold": gold})

    problems, _ = math_problems(N_ARITH + N_ARITH_FEWSHOT, 0, seed=ARITH_SEED)
    arith = [{"question": r["question"], "answer": r["rephrased_answer"], "final": r["final"]}
             for r in problems]
    files = {"manual_ppl.jsonl": ppl, "manual_qa.jsonl": mc, "arith.jsonl": arith[:N_ARITH],
             "arith_fewshot.jsonl": arith[N_ARITH:]}
    for name, recs in files.items():
        _write_jsonl(out / name, recs)
    manifest = {
        "python": sys.version.split()[0],
        "pydoc_topics_sha256": hashlib.sha256(json.dumps(topics, sort_keys=True).encode()
                                              ).hexdigest()[:16],
        "heldout_rule": f"sorted topic index % {HELDOUT_EVERY} == {HELDOUT_OFFSET}",
        "heldout_topics": held,
        "records": {name: len(recs) for name, recs in files.items()},
        "sha256": {name: hashlib.sha256((out / name).read_bytes()).hexdigest()
                   for name in files},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


def _chunks(text: str, max_chars: int) -> list[str]:
    """`text` cut at paragraph ends into pieces of at most max_chars (longer paragraphs whole)."""
    out: list[str] = []
    for para in (p.strip("\n") for p in text.split("\n\n")):
        if not para.strip():
            continue
        if out and len(out[-1]) + 2 + len(para) <= max_chars:
            out[-1] += "\n\n" + para
        else:
            out.append(para)
    return out


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _cut(text: str, max_chars: int) -> str:
    """At most max_chars, ending on a paragraph boundary."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars].rstrip() + "\n"


def _write_jsonl(path: Path, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)


# Python reference QA: a heading or a definition line, then the first prose sentences.
_UNDERLINE = re.compile(r"^([=*\-~^])\1{3,}$")
_DEFINITION = re.compile(r"^[A-Za-z_][\w.]*\(.*\)$")
_QUESTIONS = (
    "What does the Python reference manual say about {}?",
    "According to the Python language reference, what is {}?",
    "Explain {} as described in the Python reference manual.",
)


def _python_qa(topics, names) -> list[dict]:
    out = []
    for name in names:
        lines = topics[name].replace("\r\n", "\n").split("\n")
        for i, line in enumerate(lines):
            subject = None
            if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1].strip()) and line.strip():
                head = line.strip()
                subject = head if '"' in head else f'"{head}"'
                start = i + 2
            elif _DEFINITION.match(line) and i + 2 < len(lines) and lines[i + 1] == "" \
                    and lines[i + 2].startswith("   "):
                subject = f'`{line.strip()}`'
                start = i + 2
            if subject is None:
                continue
            answer = _first_sentences(lines, start)
            if answer:
                q = _QUESTIONS[len(out) % len(_QUESTIONS)].format(subject)
                out.append({"system_prompt": SYSTEM_PROMPT, "question": q, "response": answer,
                            "topic": name})
    return out


def _first_sentences(lines, start: int, max_chars: int = 320) -> str | None:
    """The first prose paragraph after `start` (skipping grammar/code and version notes),
    cut to whole sentences within max_chars."""
    para: list[str] = []
    for line in lines[start:]:
        s = line.strip()
        if not s:
            if para:
                break
            continue
        if _UNDERLINE.match(s):
            return None  # ran into the next heading
        if para and line.startswith("      "):
            break
        if not para and (s.startswith(("New in version", "Changed in version", "Deprecated", "Added in version", "Note:", "See also:", ">>>", "...")) or "::=" in s or not s[0].isalpha()):
            continue
        para.append(s)
    if not para:
        return None
    text = re.sub(r"\s+", " ", " ".join(para)).strip()
    text = re.sub(r"(\w)- (\w)", r"\1-\2", text)  # words hyphenated across wrapped lines
    sentences = re.split(r"(?<=[.!?:])\s+(?=[A-Z\"(*])", text)
    chosen: list[str] = []
    for s in sentences:
        if chosen and len(" ".join(chosen)) + 1 + len(s) > max_chars:
            break
        chosen.append(s)
    while len(chosen) > 1 and chosen[-1].endswith(":"):
        chosen.pop()
    answer = " ".join(chosen)
    if len(answer) < 20 or answer[-1] not in ".!?":
        return None
    return answer


# Synthetic math (the paper's Synth. Math-Instruct in miniature).
_NAMES = ("Ana", "Ben", "Chloe", "David", "Emma", "Farid", "Grace", "Hiro", "Ines", "Jonas",
          "Kira", "Liam", "Maya", "Noah", "Olga", "Pedro", "Quinn", "Rosa", "Sam", "Tara")
_ITEMS = ("apple", "book", "marble", "pencil", "sticker", "cookie", "card", "shell", "coin",
          "flower", "stamp", "toy car")


def math_problems(n_heldout: int, n_train: int, *, seed: int | str = 0,
                  exclude=()) -> tuple[list, list]:
    """(held-out, train) arithmetic problems; no question appears in both (or twice), nor
    any question in `exclude` (e.g. an evaluation set's)."""
    rng = random.Random(f"solar-merge-math-{seed}")
    seen: set[str] = set(exclude)
    out: list[dict] = []
    kinds = (_add, _sub, _mul, _two_step, _share, _change)
    while len(out) < n_heldout + n_train:
        rec = kinds[len(out) % len(kinds)](rng)
        if rec["question"] in seen:
            continue
        seen.add(rec["question"])
        out.append(rec)
    # Interleaved kinds; held-out takes every k-th so both sets cover every kind.
    held_idx = set(range(0, len(out), max(1, len(out) // max(1, n_heldout)))[:n_heldout]) \
        if n_heldout else set()
    held = [r for i, r in enumerate(out) if i in held_idx]
    train = [r for i, r in enumerate(out) if i not in held_idx]
    return held, train


def _rec(question, rephrased, steps: list[str], final: int) -> dict:
    return {"question": question, "answer": f"#### {final}",
            "rephrased_question": rephrased,
            "rephrased_answer": " ".join(steps) + f" The answer is {final}.\n#### {final}",
            "final": final}


def _pick(rng):
    a, b = rng.sample(_NAMES, 2)
    return a, b, rng.choice(_ITEMS)


def _pl(item: str) -> str:
    return item + "s"


def _add(rng):
    name, _, item = _pick(rng)
    a, b = rng.randint(2, 60), rng.randint(2, 40)
    return _rec(f"{name} has {a} {_pl(item)} and gets {b} more. How many {_pl(item)} now?",
                f"{name} starts with {a} {_pl(item)}. Then {name} is given {b} more "
                f"{_pl(item)}. How many {_pl(item)} does {name} have now? Think step by step.",
                [f"{name} starts with {a} {_pl(item)}.",
                 f"Getting {b} more gives {a} + {b} = {a + b}."], a + b)


def _sub(rng):
    name, other, item = _pick(rng)
    a = rng.randint(10, 80)
    b = rng.randint(1, a - 1)
    return _rec(f"{name} has {a} {_pl(item)} and gives {b} to {other}. How many are left?",
                f"{name} owns {a} {_pl(item)}. {name} gives {b} of them to {other}. How many "
                f"{_pl(item)} does {name} keep? Think step by step.",
                [f"{name} starts with {a} {_pl(item)}.",
                 f"After giving away {b}, {name} has {a} - {b} = {a - b}."], a - b)


def _mul(rng):
    name, _, item = _pick(rng)
    a, b = rng.randint(2, 9), rng.randint(2, 12)
    return _rec(f"{name} buys {a} boxes of {b} {_pl(item)}. How many {_pl(item)} in total?",
                f"{name} buys {a} boxes. Every box holds {b} {_pl(item)}. How many "
                f"{_pl(item)} does {name} buy in total? Think step by step.",
                [f"There are {a} boxes with {b} {_pl(item)} each.",
                 f"So the total is {a} * {b} = {a * b}."], a * b)


def _two_step(rng):
    name, other, item = _pick(rng)
    a, b = rng.randint(5, 50), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    return _rec(f"{name} has {a} {_pl(item)}, finds {b} more, then gives {c} to {other}. "
                f"How many are left?",
                f"{name} has {a} {_pl(item)}. Later {name} finds another {b}. Then {name} gives "
                f"{c} {_pl(item)} to {other}. How many {_pl(item)} does {name} have at the end? "
                f"Think step by step.",
                [f"First, {a} + {b} = {a + b}.",
                 f"Then {name} gives away {c}, so {a + b} - {c} = {a + b - c}."], a + b - c)


def _share(rng):
    name, _, item = _pick(rng)
    per, k = rng.randint(2, 12), rng.randint(2, 8)
    total = per * k
    return _rec(f"{name} shares {total} {_pl(item)} equally among {k} friends. How many does "
                f"each get?",
                f"{name} has {total} {_pl(item)} and splits them equally between {k} friends. "
                f"How many {_pl(item)} does each friend receive? Think step by step.",
                [f"There are {total} {_pl(item)} for {k} friends.",
                 f"Each friend gets {total} / {k} = {per}."], per)


def _change(rng):
    name, _, item = _pick(rng)
    price, k = rng.randint(2, 9), rng.randint(2, 6)
    paid = price * k + rng.randint(1, 20)
    return _rec(f"A {item} costs {price} dollars. {name} buys {k} and pays {paid} dollars. "
                f"What is the change?",
                f"One {item} has a price of {price} dollars. {name} buys {k} {_pl(item)} and "
                f"hands over {paid} dollars. How many dollars does {name} get back? "
                f"Think step by step.",
                [f"{k} {_pl(item)} cost {k} * {price} = {k * price} dollars.",
                 f"The change is {paid} - {k * price} = {paid - k * price} dollars."],
                paid - k * price)


def _instruct_qa(records) -> list[dict]:
    try:
        from solar_merge.data import math_instruct_qa
    except ImportError:  # data.py is optional here; same tuples
        return [{"question": r["rephrased_question"], "response": r["rephrased_answer"]}
                for r in records]
    return math_instruct_qa(records)


def _alignment_pairs(records) -> list[dict]:
    try:
        from solar_merge.data import math_alignment_pairs
    except ImportError:
        return [{"prompt": r["rephrased_question"], "chosen": r["rephrased_answer"],
                 "rejected": r["answer"]} for r in records]
    return math_alignment_pairs(records)
