"""Instruction tuning on QA data (Alpaca, OpenOrca, chat messages, prompt/completion) with
TRL's SFTTrainer.

The loss is on what the assistant says only: on the completion of prompt/completion records
(`completion_only_loss: true`), and on every assistant turn of a conversation with several
(TRL's `assistant_only_loss`, which needs a chat template that marks assistant turns with
`{% generation %}`; TRL swaps in its own training template for the models it knows).
"""

from pathlib import Path

from solar_merge.stages.chat import require_assistant_masks
from solar_merge.stages.models import load_tokenizer
from solar_merge.stages.records import as_turns, load_stage_records, unify_chat
from solar_merge.stages.training import train_sft, trl_args


def run_stage(resolved: dict, work: Path) -> None:
    from solar_merge.data import to_prompt_completion

    records = load_stage_records(resolved, to_prompt_completion)
    conversations = any("messages" in r for r in records)
    if conversations:  # one schema per Dataset: every record becomes a conversation
        records = [r if "messages" in r else {"messages": as_turns(r["prompt"], "user")
                                              + as_turns(r["completion"], "assistant")}
                   for r in records]
        resolved = {**resolved, "args": {"assistant_only_loss": True, **resolved["args"]}}
    args, init_kwargs = trl_args(resolved, work, "SFTConfig")
    tokenizer = load_tokenizer(resolved["model"])
    keys = ("messages",) if conversations else ("prompt", "completion")
    records = unify_chat(records, keys, tokenizer, args, "sft")
    if conversations and args.assistant_only_loss:
        require_assistant_masks(tokenizer, args, resolved["model"])
    train_sft(resolved, work, args, init_kwargs, records, tokenizer, "sft")
