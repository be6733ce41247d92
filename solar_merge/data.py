"""Datasets for the training stages: load records, normalise QA formats, build the math sets.

No torch here. Records are plain dicts; the stages turn lists of them into `datasets.Dataset`.

Formats (`to_prompt_completion`):
- `alpaca`   {instruction, input?, output}            -> user: instruction [+ "\\n\\n" + input]
- `openorca` {system_prompt?, question, response}     -> system (if non-empty), user: question
- `messages` {messages: [{role, content}, ...]}       -> one assistant turn, the last message:
                                                         prompt: the messages before it,
                                                         completion: that turn; several
                                                         assistant turns: {messages: [...]}
                                                         (every assistant turn is trained, by
                                                         TRL's assistant_only_loss)
- `prompt_completion` {prompt, completion}            -> returned as is (strings stay strings,
                                                         message lists stay message lists)
alpaca/openorca/messages come back in TRL's *conversational* prompt-completion form:
{"prompt": [{"role": "user", "content": ...}], "completion": [{"role": "assistant", ...}]},
so the tokenizer's chat template renders them and the loss can be put on the completion only.

Text files (`.txt`) give one {"text": paragraph} record per blank-line-separated paragraph.
`max_samples` keeps the first N records in file order (deterministic, no shuffling).
"""

import json
from pathlib import Path

from solar_merge.errors import UserError, did_you_mean

FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
FORMATS = ("auto", "text", "alpaca", "openorca", "messages", "prompt_completion", "preference",
           "math_alignment", "math_instruct")
MATH_KEYS = ("question", "answer", "rephrased_question", "rephrased_answer")


# -- loading -------------------------------------------------------------------------------

def load_records(path_or_name, *, split: str = "train", max_samples: int | None = None
                 ) -> list[dict]:
    """Records of a local file (.jsonl/.json/.parquet/.txt), a folder of such files (sorted),
    or a Hub dataset name (needs network or the local datasets cache)."""
    if max_samples is not None and max_samples < 1:
        raise UserError(f"max_samples of {path_or_name} is {max_samples}",
                        fix="give a positive number, or leave max_samples out for all records")
    path = Path(str(path_or_name)).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in FILE_SUFFIXES and p.is_file())
        if not files:
            raise UserError(f"dataset folder {path} holds no {'/'.join(FILE_SUFFIXES)} files",
                            fix="put data files in it, or point to a file")
        records: list[dict] = []
        for f in files:
            left = None if max_samples is None else max_samples - len(records)
            if left is not None and left <= 0:
                break
            records += _load_file(f, left)
        return records
    if path.is_file():
        return _load_file(path, max_samples)
    if path.suffix in FILE_SUFFIXES or str(path_or_name).startswith((".", "/", "~")):
        raise UserError(f"dataset file {path} not found",
                        fix="check the path (relative paths resolve against the config's folder)")
    return _load_hub(str(path_or_name), split, max_samples)


def _load_file(path: Path, max_samples: int | None) -> list[dict]:
    """The records of one local file; any damage (not UTF-8, not JSON, not Parquet, empty, a
    record that is not an object) is a UserError naming the file and, for .jsonl, the line."""
    suffix = path.suffix
    if suffix not in FILE_SUFFIXES:
        raise UserError(f"{path}: unsupported data file type `{suffix}`",
                        fix=f"use one of {', '.join(FILE_SUFFIXES)}")
    try:
        if suffix == ".jsonl":
            records = _load_jsonl(path, max_samples)
        elif suffix == ".parquet":
            records = _load_parquet(path)
        else:
            text = path.read_bytes().decode("utf-8")
            if suffix == ".txt":
                paragraphs = [p.strip() for p in text.replace("\r\n", "\n").split("\n\n")]
                records = [{"text": p} for p in paragraphs if p]
            else:
                records = _json_records(path, json.loads(text) if text.strip() else [])
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}: {e.reason})",
                        fix="re-encode it as UTF-8, or check that it is the file you meant"
                        ) from None
    except (ValueError, RecursionError) as e:
        raise UserError(f"{path} is not valid {suffix[1:].upper()} ({str(e)[:200]})",
                        fix="check the file (a cut-short download or a file renamed to "
                            f"{suffix}?)") from None
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or e}",
                        fix="check that the file is readable") from None
    if not records:
        raise UserError(f"{path} is empty: it holds no records",
                        fix="fill it, or remove it from the dataset")
    if suffix != ".jsonl":  # .jsonl names the line of a non-object itself
        bad = next((i for i, r in enumerate(records) if not isinstance(r, dict)), None)
        if bad is not None:
            raise UserError(f"{path}: records must be JSON objects, record {bad} is a "
                            f"{type(records[bad]).__name__}",
                            fix="make every record an object {\"key\": ...}")
    return records if max_samples is None else records[:max_samples]


def _load_jsonl(path: Path, max_samples: int | None) -> list[dict]:
    records = []
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is named by its number
        for n, raw in enumerate(f, 1):
            if max_samples is not None and len(records) >= max_samples:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}, line {n}: not UTF-8 text ({e.reason})",
                                fix="re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise UserError(f"{path}, line {n}: not valid JSON ({str(e)[:200]})",
                                fix="one JSON object per line") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}, line {n}: records must be JSON objects, this is a "
                                f"{type(record).__name__}", fix="one JSON object per line")
            records.append(record)
    return records


def _json_records(path: Path, data) -> list:
    if isinstance(data, dict):  # {"train": [...]} or {"data": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else None
    if not isinstance(data, list):
        raise UserError(f"{path} is not a JSON list of records",
                        fix="write a list of objects (or use .jsonl)")
    return data


def _load_parquet(path: Path) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError, NotImplementedError,
            IndexError, KeyError) as e:  # pyarrow's errors for a file that is not Parquet
        raise UserError(f"{path} is not a readable Parquet file ({type(e).__name__}: "
                        f"{str(e)[:200]})",
                        fix="check the file (a cut-short download or a file renamed to "
                            ".parquet?)") from None


def _load_hub(name: str, split: str, max_samples: int | None) -> list[dict]:
    try:
        import datasets

        sl = split if max_samples is None else f"{split}[:{max_samples}]"
        ds = datasets.load_dataset(name, split=sl)
    except Exception as e:  # noqa: BLE001 - offline, unknown name, bad split: the user's to fix
        raise UserError(f"dataset `{name}`: not a local file and cannot be loaded from the Hub "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''})",
                        fix="give an existing local .jsonl/.json/.parquet/.txt path, or a Hub "
                            "dataset name while online") from None
    return ds.to_list()


# -- formats -------------------------------------------------------------------------------

def detect_format(record: dict) -> str:
    keys = set(record)
    if "messages" in keys:
        return "messages"
    if {"chosen", "rejected"} <= keys:  # the prompt may be implicit (inside both answers)
        return "preference"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"question", "response"} <= keys:
        return "openorca"
    if set(MATH_KEYS) <= keys:
        return "math_instruct"
    if "text" in keys:
        return "text"
    raise UserError(f"cannot tell the format of a record with keys {sorted(keys)}",
                    fix="use Alpaca (instruction/input/output), OpenOrca (system_prompt/question/"
                        "response), chat (messages), prompt/completion, prompt/chosen/rejected "
                        "or text records, or set `format:` on the dataset")


def _need(record: dict, keys, fmt: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        hint = did_you_mean(missing[0], record)
        raise UserError(f"{fmt} record is missing {', '.join(f'`{k}`' for k in missing)}{hint} "
                        f"(it has {sorted(record)})",
                        fix=f"give every {fmt} record the keys {', '.join(keys)}, or set the "
                            "dataset's `format:`")


def _str(value, key: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"field `{key}` must be a string, got {type(value).__name__}",
                        fix="check the dataset")
    return value


def to_prompt_completion(record: dict, fmt: str = "auto") -> dict:
    """One QA record -> {"prompt": [...messages], "completion": [...messages]}, or
    {"messages": [...]} for a conversation with several assistant turns (see module doc)."""
    if fmt == "auto":
        fmt = detect_format(record)
    if fmt == "alpaca":
        _need(record, ("instruction", "output"), fmt)
        user = _str(record["instruction"], "instruction")
        extra = record.get("input") or ""
        if _str(extra, "input").strip():
            user = f"{user}\n\n{extra}"
        return {"prompt": [{"role": "user", "content": user}],
                "completion": [{"role": "assistant", "content": _str(record["output"], "output")}]}
    if fmt in ("openorca", "math_instruct"):
        if fmt == "math_instruct":
            record = math_instruct_qa([record])[0]
        _need(record, ("question", "response"), "openorca")
        prompt = []
        system = record.get("system_prompt") or ""
        if _str(system, "system_prompt").strip():
            prompt.append({"role": "system", "content": system})
        prompt.append({"role": "user", "content": _str(record["question"], "question")})
        return {"prompt": prompt,
                "completion": [{"role": "assistant",
                                "content": _str(record["response"], "response")}]}
    if fmt == "messages":
        _need(record, ("messages",), fmt)
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise UserError("`messages` must be a list of {role, content} objects",
                            fix="check the chat records")
        turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if not turns:
            raise UserError("a `messages` record has no assistant turn to train on",
                            fix="every chat record needs at least one assistant message")
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        if turns == [len(messages) - 1]:  # exactly prompt -> completion, any chat template
            return {"prompt": plain[:-1], "completion": plain[-1:]}
        return {"messages": plain}  # several assistant turns: each one is trained
    if fmt == "prompt_completion":
        _need(record, ("prompt", "completion"), fmt)
        return {"prompt": record["prompt"], "completion": record["completion"]}
    raise UserError(f"format `{fmt}` is not a QA format{did_you_mean(fmt, FORMATS)}",
                    fix="use auto, alpaca, openorca, messages or prompt_completion for sft")


def to_text(record: dict, fmt: str = "auto", field: str = "text") -> dict:
    """A plain-text record {"text": ...} for continued pretraining."""
    if fmt not in ("auto", "text"):
        raise UserError(f"cpt takes plain text, not `{fmt}` records",
                        fix="use format: text (a `text` field, or .txt files)")
    _need(record, (field,), "text")
    return {"text": _str(record[field], field)}


def to_preference(record: dict, fmt: str = "auto") -> dict:
    """A preference record {prompt?, chosen, rejected} (strings or message lists).

    The prompt may be implicit, as in `trl-lib/ultrafeedback_binarized` (only chosen/rejected
    conversations that share their first turns), or given twice, as in
    `HuggingFaceH4/ultrafeedback_binarized` (a `prompt` string and conversations that already
    start with it). The dpo stage resolves both with TRL's own `maybe_extract_prompt`, so the
    prompt is trained on once; this function only checks and keeps the fields."""
    if fmt == "auto":
        fmt = "math_alignment" if set(MATH_KEYS) <= set(record) else "preference"
    if fmt == "math_alignment":
        return math_alignment_pairs([record])[0]
    if fmt != "preference":
        raise UserError(f"dpo takes preference records, not `{fmt}`",
                        fix="use format: preference (prompt/chosen/rejected, or chosen/rejected "
                            "conversations with the prompt inside) or math_alignment")
    _need(record, ("chosen", "rejected"), "preference")
    return {k: record[k] for k in ("prompt", "chosen", "rejected") if k in record}


# -- the paper's math sets -----------------------------------------------------------------

def math_alignment_pairs(records) -> list[dict]:
    """SOLAR's synthetic math alignment set: the rephrased answer is preferred.

    {question, answer, rephrased_question, rephrased_answer} ->
    {prompt: rephrased_question, chosen: rephrased_answer, rejected: answer}
    """
    out = []
    for r in records:
        _need(r, MATH_KEYS, "math")
        out.append({"prompt": _str(r["rephrased_question"], "rephrased_question"),
                    "chosen": _str(r["rephrased_answer"], "rephrased_answer"),
                    "rejected": _str(r["answer"], "answer")})
    return out


def math_instruct_qa(records) -> list[dict]:
    """SOLAR's math instruct set in OpenOrca QA style: {question: rephrased_question,
    response: rephrased_answer} (no system prompt)."""
    out = []
    for r in records:
        _need(r, ("rephrased_question", "rephrased_answer"), "math")
        out.append({"question": _str(r["rephrased_question"], "rephrased_question"),
                    "response": _str(r["rephrased_answer"], "rephrased_answer")})
    return out
