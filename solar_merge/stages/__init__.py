"""Training stages (cpt, sft, dpo, stepwise_dpo) as thin wrappers around TRL's trainers.

    schema.py       the stage config: schema, `key=value` overrides, resolve(), stage_hash()
    launch.py       train() / start(): in this process, or on N processes / machines via
                    `accelerate launch`; the memory check and the checks before a run
    distributed.py  several processes, one output folder: global rank 0 owns it
    records.py      the stage's datasets as records and as the Dataset every rank loads
    chat.py         chat templates: the one a stage renders with, and the plan-time check
    models.py       tokenizer and model loading, layer freezing, weight checksums
    lora.py         LoRA / QLoRA: peft's config, the 4-bit base, the merged adapter
    training.py     one TRL trainer run: its args, resume, the final checkpoint
    logs.py         loss.jsonl and loss.png
    card.py         the model card and stage_config.yaml
    cpt.py, sft.py, dpo.py (dpo and stepwise_dpo): each stage's run_stage()

Importing this package imports neither torch nor TRL (recipes plan with it).
"""

from solar_merge.stages.schema import (
    DATA_FORMATS,
    PRESETS,
    STAGES,
    DatasetSpec,
    LaunchSpec,
    StageConfig,
    apply_overrides,
    check_args,
    load_stage_config,
    resolve,
    stage_hash,
    trl_fields,
)


def train(config: dict, out_dir=None, *, overrides=(), base_dir=None):
    """Run one stage (see stages/launch.py): resumable, skipped when finished."""
    from solar_merge.stages.launch import train as launch_train

    return launch_train(config, out_dir, overrides=overrides, base_dir=base_dir)


__all__ = [
    "DATA_FORMATS",
    "PRESETS",
    "STAGES",
    "DatasetSpec",
    "LaunchSpec",
    "StageConfig",
    "apply_overrides",
    "check_args",
    "load_stage_config",
    "resolve",
    "stage_hash",
    "train",
    "trl_fields",
]
