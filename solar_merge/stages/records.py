"""A stage's training records: read from its datasets and converted to the stage's fields,
made one schema (plain strings or conversations, as a datasets.Dataset needs), and saved once
as the Dataset every rank of a launch loads.
"""

import shutil
from contextlib import ExitStack
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.stages.distributed import distributed_state, world_size

DATA_DIR = "data"  # the converted records, saved once so that every rank reuses one cache


def load_stage_records(resolved: dict, convert) -> list[dict]:
    """All records of the stage's datasets, converted with convert(record, fmt); clear errors
    (naming the dataset and record) for missing columns and empty data."""
    from solar_merge.data import load_records

    out: list[dict] = []
    for i, spec in enumerate(resolved["datasets"]):
        where = f"datasets[{i}] ({spec['path']})"
        try:
            records = load_records(spec["path"], split=spec.get("split", "train"),
                                   max_samples=spec.get("max_samples"))
        except UserError as e:
            raise UserError(f"{where}: {e.message}") from None
        if not records:
            raise UserError(f"{where} is empty: no records to train on",
                            fix="fill the dataset, or remove it from `datasets:`")
        for n, record in enumerate(records):
            try:
                out.append(convert(record, spec.get("format", "auto")))
            except UserError as e:
                raise UserError(f"{where}, record {n}: {e.message}") from None
    return out


def is_chat(value) -> bool:
    """A list of messages (a conversation), as opposed to a plain string."""
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def as_turns(value, role: str) -> list[dict]:
    """A prompt or completion as a list of messages (a string becomes one `role` turn)."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def unify_chat(records: list[dict], keys, tokenizer, args, stage: str) -> list[dict]:
    """Make every record either plain strings or conversations (a Dataset has one schema).

    String fields are wrapped as one user turn (prompt) / one assistant turn (answers) when any
    record is a conversation or the tokenizer has a chat template. Conversations need a chat
    template: a missing one is an error here, before any training."""
    has_template = bool(getattr(tokenizer, "chat_template", None)) or bool(
        getattr(args, "chat_template_path", None))
    any_chat = any(is_chat(r[k]) for r in records for k in keys)
    if any_chat and not has_template:
        raise UserError(f"{stage}: the data holds chat messages (alpaca/openorca/messages "
                        "records are rendered through a chat template), but the tokenizer of "
                        "the model has no chat template",
                        fix="use a tokenizer with a chat template, set args.chat_template_path "
                            "(a tokenizer folder or a .jinja file), or give plain prompt/"
                            "completion strings")
    if not (any_chat or has_template):
        return records
    out = []
    for r in records:
        r = dict(r)
        for k in keys:
            if isinstance(r[k], str):
                role = "user" if k == "prompt" else "assistant"
                r[k] = [{"role": role, "content": r[k]}]
            elif not is_chat(r[k]):
                raise UserError(f"{stage}: field `{k}` must be a string or a list of messages, "
                                f"got {type(r[k]).__name__}", fix="check the dataset")
        out.append(r)
    return out


def to_dataset(records: list[dict], work: Path | None = None, name: str = "train"):
    """A datasets.Dataset of the records. With a work folder it is saved there once (global
    rank 0 first, then each node's first rank, then the others: they load what exists) and
    loaded from disk, so that TRL's tokenization is cached beside it and done once, not on
    every rank; a resumed run reuses it (the stage hash keeps the folder to one config)."""
    import datasets

    if work is None:
        return datasets.Dataset.from_list(records)
    folder = Path(work) / DATA_DIR / name
    state = distributed_state() if world_size() > 1 else None
    with ExitStack() as stack:
        if state is not None:
            stack.enter_context(state.main_process_first())
            stack.enter_context(state.local_main_process_first())
        if not (folder / "dataset_info.json").is_file():
            tmp = folder.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            datasets.Dataset.from_list(records).save_to_disk(str(tmp))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    return datasets.load_from_disk(str(folder))
