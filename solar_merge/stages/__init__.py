"""Training stages (cpt, sft, dpo, stepwise_dpo) as thin wrappers around TRL's trainers.

    schema.py   the stage config: schema, `key=value` overrides, resolve(), stage_hash()
    launch.py   train(): in this process, or on N processes / machines via `accelerate launch`;
                global rank 0 owns the output folder
    common.py   what the stages share (data, models, LoRA, the trainer run, saving, the card);
                it imports no stage
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
