"""The model card of a trained stage: README.md (hub.write_card) with the base model, the data
and their sha256, the stage config (also written to stage_config.yaml, with paths relative to
the output so that it travels) and the loss curve.
"""

from pathlib import Path

import yaml

from solar_merge.stages.logs import LOSS_LOG, read_loss


def write_stage_card(work: Path, resolved: dict, facts: dict) -> None:
    """README.md (hub.write_card, kind = the stage) with the base model, the data and their
    sha256, the stage config (also written to stage_config.yaml) and the loss curve.
    facts: what the run decided (e.g. cpt's document separator), shown under Training."""
    from solar_merge import hub
    from solar_merge.outputs import portable

    stage = resolved["stage"]
    # paths relative to the output folder (`work` is its sibling: the same relative paths),
    # so that the config travels; `solar-merge train OUT/stage_config.yaml` resolves them back
    source = (f"# solar-merge train stage_config.yaml -o OUT   (resolved {stage} stage)\n"
              + yaml.safe_dump(portable(resolved, work), sort_keys=False))
    trainer = "DPOTrainer" if stage in ("dpo", "stepwise_dpo") else "SFTTrainer"
    training = [f"- stage: `{stage}`, trained with TRL's `{trainer}`",
                f"- base model: {_name(resolved['model'])}"]
    if resolved.get("ref_model"):
        training.append(f"- reference model: {_name(resolved['ref_model'])}")
    training += [f"- {key.replace('_', ' ')}: `{value}`" for key, value in facts.items()]
    data = ["| dataset | format | split | max_samples | sha256 |",
            "| --- | --- | --- | --- | --- |"]
    for spec in resolved["datasets"]:
        data.append(f"| {_name(spec['path'])} | {spec.get('format', 'auto')} | "
                    f"{spec.get('split', 'train')} | {spec.get('max_samples') or 'all'} | "
                    f"{data_sha256(spec['path'])} |")
    points = read_loss(work / LOSS_LOG)
    loss = ["![training loss](loss.png)", ""] if (work / "loss.png").is_file() else []
    loss.append(f"Training loss {points[0][1]:.4g} at step {points[0][0]}, {points[-1][1]:.4g} "
                f"at step {points[-1][0]} (every logged value: `loss.jsonl`)." if points
                else "No loss was logged (raise max_steps or lower logging_steps).")
    hub.write_card(work, kind=stage, source_yaml=source, source_name="stage_config.yaml",
                   base_models=[resolved["model"]],
                   datasets=[d["path"] for d in resolved["datasets"]],
                   sections={"Training": training, "Data checksums": data,
                             "Training loss": loss})


def _name(ref: str) -> str:
    """A Hub id as is, a local path by its last component (the card travels; paths do not)."""
    return f"`{Path(ref).name}` (local)" if Path(ref).is_absolute() else f"`{ref}`"


def data_sha256(path: str) -> str:
    """sha256 of a local data file (what `sha256sum FILE` prints); of a folder, sha256 over
    its data files' `<relative path> <sha256>` lines in sorted order; a Hub dataset is not
    hashed here (its revision is whatever `datasets` resolved)."""
    import hashlib

    from solar_merge.data import FILE_SUFFIXES

    def file_hash(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    p = Path(path)
    if p.is_file():
        return file_hash(p)
    if p.is_dir():
        lines = "".join(f"{f.relative_to(p)} {file_hash(f)}\n" for f in sorted(p.rglob("*"))
                        if f.is_file() and f.suffix in FILE_SUFFIXES)
        return hashlib.sha256(lines.encode()).hexdigest()
    return "Hub dataset (not hashed)"
