"""Contamination check: n-gram overlap between training sets and evaluation documents.

The definition is lm-evaluation-harness's decontamination test (lm_eval/decontamination/ and
its docs/decontamination.md, after GPT-3's Appendix C, Brown et al. 2020, which used n of 8
to 13 by data set where lm-eval uses 13): the n-gram form of the contamination test the
SOLAR paper ran on its training data.

- text is normalized with lm-eval's `Janitor.normalize_string` (ASCII letters lowercased,
  punctuation deleted) and split on whitespace into words;
- an n-gram is n consecutive words (`word_ngrams`), n = 13 by default;
- an evaluation document (what the model is shown for it: lm-eval's decontamination query,
  else its prompt, plus its reference answer) is contaminated by a training set when any of
  its n-grams occurs in any training record;
- our one addition: a document shorter than n words (it has no n-gram, so lm-eval's test
  never flags it) counts as one n-gram of its own length, i.e. it is contaminated when it
  occurs whole;
- training records count with all their text fields (nested conversations included), each
  field on its own (no n-gram runs across two fields).

`check` returns one row per (training set, task) pair with the share of contaminated
documents, and every offending document with the n-gram found and where.
"""

import contextlib
import csv
import io
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from solar_merge.errors import UserError

N = 13
EXAMPLES = "contamination_examples.jsonl"


@contextlib.contextmanager
def _quiet():
    # lm-eval's janitor prints a warning and a traceback when its optional C++ helper is
    # missing; the Python path it falls back to is the one we use.
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null), \
            contextlib.redirect_stderr(null):
        yield


def _janitor():
    with _quiet():
        from lm_eval.decontamination.janitor import Janitor, word_ngrams
    return Janitor(ngram_n=N), word_ngrams


def ngrams(text: str, n: int = N) -> set[str]:
    """The n-grams of `text` as lm-eval forms them ("w1 w2 ... wn"); a text shorter than n
    words gives itself (if not empty)."""
    janitor, word_ngrams = _janitor()
    norm = janitor.normalize_string(text)
    found = set(word_ngrams(norm, n))
    if not found and norm.split():
        found = {" ".join(norm.split())}
    return found


# -- the documents ------------------------------------------------------------------------------

def documents(tasks: dict) -> dict[str, list[str]]:
    """{task name: [document text]} for lm-eval Task objects (all evaluation documents)."""
    return {name: [document_text(task, doc) for doc in task.eval_docs]
            for name, task in tasks.items()}


def document_text(task, doc) -> str:
    """What the model is shown for `doc` (lm-eval's decontamination query if the task has one,
    else its prompt) plus the reference answer."""
    choices = task.doc_to_choice(doc) if task.config.doc_to_choice is not None else None
    shown = (task.doc_to_decontamination_query(doc) if task.should_decontaminate()
             else task.doc_to_text(doc))
    shown, answer = _text(shown, choices), _text(task.doc_to_target(doc), choices)
    return shown if answer in shown else f"{shown} {answer}".strip()


def _text(value, choices) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int) and choices is not None and 0 <= value < len(choices):
        return str(choices[value])
    if isinstance(value, (list, tuple)):
        return " ".join(_text(v, choices) for v in value)
    return str(value)


def record_texts(record) -> list[str]:
    """Every string in a training record (nested lists and dicts included)."""
    if isinstance(record, str):
        return [record]
    if isinstance(record, dict):
        return [t for v in record.values() for t in record_texts(v)]
    if isinstance(record, (list, tuple)):
        return [t for v in record for t in record_texts(v)]
    return []


# -- the check ----------------------------------------------------------------------------------

@dataclass
class Report:
    n: int
    rows: list[dict] = field(default_factory=list)   # {train, task, documents, contaminated, percent}
    hits: list[dict] = field(default_factory=list)   # one per contaminated (train, task, document)

    def worst(self) -> dict | None:
        return max(self.rows, key=lambda r: r["percent"], default=None)


class Index:
    """The n-grams of a set of documents ({task: [text]}), to look training text up in."""

    def __init__(self, docs: dict[str, list[str]], n: int = N):
        if n < 1:
            raise UserError(f"n-gram size is {n}", fix="give 1 or more (lm-eval uses 13)")
        self.docs, self.n = docs, n
        self.grams: dict[str, list[tuple[str, int]]] = {}  # n-gram -> [(task, document)]
        self.lengths = {n}  # plus the lengths of documents shorter than n words
        for task, texts in docs.items():
            for i, text in enumerate(texts):
                for gram in ngrams(text, n):
                    self.grams.setdefault(gram, []).append((task, i))
                    self.lengths.add(len(gram.split()))

    def hits(self, text: str):
        """(task, document index, n-gram) for every document sharing an n-gram with `text`."""
        janitor, word_ngrams = _janitor()
        norm = janitor.normalize_string(text)
        for k in self.lengths:
            for gram in word_ngrams(norm, k):
                for task, i in self.grams.get(gram, ()):
                    yield task, i, gram

    def dirty(self, record) -> bool:
        """Whether any text of a training record shares an n-gram with a document."""
        return any(next(self.hits(t), None) for t in record_texts(record))


def check(train, docs: dict[str, list[str]], *, n: int = N, max_records: int | None = None
          ) -> Report:
    """Overlap of each training set with each task's documents.

    train: data set paths / Hub names (read with solar_merge.data.load_records) or a mapping
    {name: [records]}. docs: {task: [document text]} (see `documents`)."""
    index = Index(docs, n)
    sets = train if isinstance(train, dict) else {str(t): None for t in train}
    report = Report(n=n)
    for name, records in sets.items():
        if records is None:
            from solar_merge.data import load_records

            records = load_records(name, max_samples=max_records)
        found: dict[tuple[str, int], dict] = {}
        for r_index, record in enumerate(records):
            for text in record_texts(record):
                for task, i, gram in index.hits(text):
                    if (task, i) not in found:  # the first training record that shows it
                        found[(task, i)] = {
                            "train": name, "task": task, "document": i, "ngram": gram,
                            "train_record": r_index, "document_text": docs[task][i][:500],
                            "train_text": _around(text, gram)}
        for task, texts in docs.items():
            hits = sorted((h for (t, _), h in found.items() if t == task),
                          key=lambda h: h["document"])
            report.rows.append({"train": name, "task": task, "documents": len(texts),
                                "contaminated": len(hits),
                                "percent": 100 * len(hits) / len(texts) if texts else 0.0})
            report.hits += hits
    return report


def _around(text: str, gram: str, width: int = 300) -> str:
    """The part of a training text around the matched n-gram (its first word)."""
    first = gram.split()[0]
    at = text.lower().find(first)
    start = max(0, at - width // 3) if at >= 0 else 0
    return text[start:start + width]


# -- reporting ----------------------------------------------------------------------------------

def write_report(report: Report, folder) -> Path:
    """contamination.md (the per-pair table and the definition), contamination.csv,
    contamination.json and the offending documents in contamination_examples.jsonl."""
    folder = Path(folder)
    (folder / "contamination.json").write_text(json.dumps(asdict(report), indent=1) + "\n")
    with open(folder / EXAMPLES, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(h, ensure_ascii=False) + "\n" for h in report.hits)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, ["train", "task", "documents", "contaminated", "percent"],
                            lineterminator="\n")
    writer.writeheader()
    writer.writerows(report.rows)
    (folder / "contamination.csv").write_text(buf.getvalue())
    md = folder / "contamination.md"
    md.write_text("\n".join(markdown(report)) + "\n")
    return md


def markdown(report: Report) -> list[str]:
    lines = ["| training set | task | documents | contaminated | % |", "|---|---|---:|---:|---:|"]
    lines += [f"| {Path(r['train']).name} | {r['task']} | {r['documents']} | "
              f"{r['contaminated']} | {r['percent']:.1f} |" for r in report.rows]
    lines += ["", (f"A document is contaminated when one of its {report.n}-grams (lm-eval's "
                   "decontamination normalization: lowercase, no punctuation, whitespace words; "
                   f"documents under {report.n} words whole) occurs in a training record. "
                   f"Offending documents: {EXAMPLES}.")]
    return lines


def enforce(report: Report, fail_above: float | None, *, where: str = "") -> None:
    """Raise when any pair's share of contaminated documents exceeds `fail_above` percent."""
    worst = report.worst()
    if fail_above is None or worst is None or worst["percent"] <= fail_above:
        return
    raise ContaminationError(
        f"contamination {worst['percent']:.1f}% > {fail_above}%: {worst['contaminated']} of "
        f"{worst['documents']} documents of task `{worst['task']}` share a {report.n}-gram "
        f"with {worst['train']}" + (f" (see {where}/{EXAMPLES})" if where else ""))


class ContaminationError(UserError):
    """Above the threshold the user set: not a usage mistake, a finding (exit code 1)."""
    exit_code = 1


# -- the command --------------------------------------------------------------------------------

def run(train, tasks, *, include_path=None, n: int = N, out=None,
        max_records: int | None = None) -> Report:
    """`solar-merge contamination`: check `train` against the documents of `tasks` and write
    the report into `out` (an output folder); `enforce` then applies a threshold."""
    from solar_merge.outputs import atomic_output, config_hash, fingerprint
    from solar_merge.tasks import catalog

    train = [str(t) for t in train]
    if not train:
        raise UserError("no training set given", fix="--train DATASET (repeat for more)")
    for t in train:
        p = Path(os.path.expanduser(t))
        if not p.exists() and (p.suffix or t.startswith((".", "/", "~"))):
            raise UserError(f"--train {t}: no such file or folder",
                            fix="give a data file (.jsonl/.json/.parquet/.txt), a folder of "
                                "them, or a Hub data set name")
    names = catalog.split_names(tasks)
    _, loaded = catalog.load(names, include_path)
    report = check(train, documents(loaded["tasks"]), n=n, max_records=max_records)
    if out is not None:
        want = config_hash({"train": [fingerprint(t) for t in train], "tasks": names, "n": n,
                            "max_records": max_records,
                            "include_path": [fingerprint(p) for p in
                                             catalog.include_paths(include_path)]})
        with atomic_output(out, want) as work:
            write_report(report, work)
    return report
