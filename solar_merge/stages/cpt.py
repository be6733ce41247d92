"""Continued pretraining: causal LM on plain text, packed to `seq_len` tokens (TRL SFTTrainer).

Packing uses TRL's `wrapped` strategy by default (texts concatenated with EOS and cut into
`seq_len` blocks, the classic pretraining layout); `trainable_layers` freezes everything else.
"""

from pathlib import Path

from solar_merge.stages import common


def run_stage(resolved: dict, work: Path) -> None:
    from solar_merge.data import to_text

    field = resolved["args"].get("dataset_text_field", "text")
    args, init_kwargs = common.trl_args(resolved, work, "SFTConfig")
    records = common.load_stage_records(
        resolved, lambda r, fmt: {field: to_text(r, fmt, field)["text"]})
    tokenizer = common.load_tokenizer(resolved["model"])
    common.train_sft(resolved, work, args, init_kwargs, records, tokenizer, "cpt")
