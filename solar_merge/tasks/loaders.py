"""Data loaders that our task YAMLs name with `custom_dataset: !function loaders.jsonl`.

lm-eval hands a task's `dataset_kwargs` (plus its metadata) to the function. Ours read JSONL
files shipped beside the YAMLs in `data/`, so the tasks run without a download and from any
working directory (a plain `data_files:` path would be read relative to the current folder).
"""

import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"


def records(name: str) -> list[dict]:
    """The records of one shipped file, e.g. records("arith.jsonl")."""
    with open(DATA_DIR / name, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def jsonl(*, splits: dict, **_metadata):
    """A DatasetDict with one split per entry of `splits` (split name -> file in data/)."""
    import datasets

    return datasets.DatasetDict({split: datasets.Dataset.from_list(records(name))
                                 for split, name in splits.items()})
