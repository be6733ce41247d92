"""Instruction tuning on QA data (Alpaca, OpenOrca, chat messages, prompt/completion) with
TRL's SFTTrainer; the loss is on the completion only (`completion_only_loss: true`)."""

from pathlib import Path

from solar_merge.stages import common


def run_stage(resolved: dict, work: Path) -> None:
    from solar_merge.data import to_prompt_completion

    args, init_kwargs = common.trl_args(resolved, work, "SFTConfig")
    records = common.load_stage_records(resolved, to_prompt_completion)
    tokenizer = common.load_tokenizer(resolved["model"])
    records = common.unify_chat(records, ("prompt", "completion"), tokenizer, args, "sft")
    common.train_sft(resolved, work, args, init_kwargs, records, tokenizer, "sft")
