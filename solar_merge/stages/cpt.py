"""Continued pretraining: causal LM on plain text, packed to `seq_len` tokens (TRL SFTTrainer).

Packing uses TRL's `wrapped` strategy by default (texts concatenated, each followed by a
document separator, and cut into `seq_len` blocks, the classic pretraining layout);
`trainable_layers` freezes everything else.

The separator is TRL's `eos_token` argument. Its default, the tokenizer's EOS, is a chat
end-of-turn token in instruct models (SmolLM2-Instruct, Qwen2.5-Instruct: `<|im_end|>`;
Llama 3 Instruct: `<|eot_id|>`): packing with it would teach the model to end a turn inside
plain text. So the separator is the tokenizer's EOS unless the chat template uses it, and
otherwise the first pretraining end-of-document token the vocabulary has (`<|endoftext|>`,
`<|end_of_text|>`, `</s>`, `<eos>`, ...) that the template does not use. `args.eos_token`
chooses it explicitly. Either way the model's own EOS (tokenizer, config, generation config)
is saved unchanged: the separator is a property of the data, not of the model.
"""

import logging
from pathlib import Path

from solar_merge.stages.chat import chat_template
from solar_merge.stages.models import load_tokenizer
from solar_merge.stages.records import load_stage_records
from solar_merge.stages.training import train_sft, trl_args

log = logging.getLogger(__name__)

# End-of-document tokens of common pretraining vocabularies, in order of preference.
PRETRAINING_SEPARATORS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>",
                          "<|end▁of▁sentence|>", "<|end_of_document|>")


def document_separator(tokenizer, template: str | None) -> str:
    """The token packed between documents (see the module doc)."""
    def chat_token(token: str) -> bool:
        return bool(template) and (token in template or (
            token == tokenizer.eos_token and "eos_token" in template))

    eos = tokenizer.eos_token
    if eos and not chat_token(eos):
        return eos
    vocab = tokenizer.get_vocab()
    for token in PRETRAINING_SEPARATORS:
        if token in vocab and not chat_token(token):
            return token
    log.info("cpt: the EOS %r is also the chat template's end of turn and the vocabulary has "
             "no other end-of-document token: packing with it (set args.eos_token to choose "
             "another)", eos)
    return eos


def run_stage(resolved: dict, work: Path) -> dict:
    from solar_merge.data import to_text

    field = resolved["args"].get("dataset_text_field", "text")
    args, init_kwargs = trl_args(resolved, work, "SFTConfig")
    records = load_stage_records(
        resolved, lambda r, fmt: {field: to_text(r, fmt, field)["text"]})
    tokenizer = load_tokenizer(resolved["model"])
    if args.eos_token is None:
        args.eos_token = document_separator(tokenizer, chat_template(tokenizer, args))
    log.info("cpt: documents are separated by %r", args.eos_token)
    held_out = None
    if resolved.get("eval_datasets"):  # held-out text, packed like the training text
        held_out = load_stage_records(
            {"datasets": resolved["eval_datasets"]},
            lambda r, fmt: {field: to_text(r, fmt, field)["text"]})
    train_sft(resolved, work, args, init_kwargs, records, tokenizer, "cpt",
                     keep_eos=True, eval_records=held_out)
    return {"document_separator": args.eos_token}
