"""One run of a TRL trainer: its config from the stage's `args` (validated by TRL itself) and
the precision decision, the run (resumed from the last checkpoint in the work folder), and the
clean Hugging Face checkpoint it leaves. The training loop is TRL's; nothing here loops over
batches.
"""

import json
import logging
import re
import shutil
from pathlib import Path

from solar_merge import testhooks
from solar_merge.errors import UserError, did_you_mean
from solar_merge.stages.distributed import is_main
from solar_merge.stages.logs import loss_logger
from solar_merge.stages.lora import lora_config, quantized, save_merged_lora
from solar_merge.stages.models import freeze_except_layers, load_model
from solar_merge.stages.records import DATA_DIR, to_dataset

log = logging.getLogger(__name__)


def decide_precision(resolved: dict):
    """solar_merge.precision's decision for the stage's `precision:` request, on the device
    it trains on (every rank of a launch sees the same kind)."""
    from solar_merge.precision import decide

    return decide(resolved.get("precision", "auto"), training=True)


def trl_args(resolved: dict, work: Path, cls_name: str):
    """(trl config, model_init_kwargs) from the stage's `args`, validated by TRL itself.
    bf16/fp16 are the precision decision's (`decide_precision`); weights load in float32
    (TRL's default) unless args.model_init_kwargs.dtype says otherwise."""
    import dataclasses

    import torch
    import trl

    cls = getattr(trl, cls_name)
    kwargs = dict(resolved["args"])
    init_kwargs = kwargs.pop("model_init_kwargs", None) or {}
    if isinstance(init_kwargs, str):
        init_kwargs = json.loads(init_kwargs)
    if "use_cpu" not in kwargs and not torch.cuda.is_available():
        kwargs["use_cpu"] = True
    chosen = decide_precision(resolved).precision
    kwargs.update(bf16=chosen == "bf16", fp16=chosen == "fp16")
    init_kwargs.setdefault("dtype", "float32")
    try:
        args = cls(output_dir=str(work), **kwargs)
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not m:
            raise
        valid = [f.name for f in dataclasses.fields(cls) if f.init]
        raise UserError(f"args.{m.group(1)} is not a trl.{cls_name} argument"
                        f"{did_you_mean(m.group(1), valid)}",
                        fix=f"use a field of trl.{cls_name}") from None
    except ValueError as e:
        raise UserError(f"args: trl.{cls_name} refused them: {e}",
                        fix="fix the value in the stage config's `args:`") from None
    return args, init_kwargs


def last_checkpoint(work: Path) -> str | None:
    """The newest complete `checkpoint-<step>` in `work` (one with trainer_state.json)."""
    best = None
    for p in work.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file() and (
                best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return str(best[1]) if best else None


def fit(trainer, work: Path, info: dict) -> None:
    """trainer.train(), resuming from the last checkpoint in `work` if there is one; the loss
    goes to work/loss.jsonl. info ({stage, work, model, ref_model, step}) is what the test
    hooks see (solar_merge.testhooks)."""
    trainer.add_callback(loss_logger(work))
    trainer.add_callback(_no_checkpoint_at_the_end())
    for callback in testhooks.trainer_callbacks():
        trainer.add_callback(callback)
    for hook in testhooks.trainer_hooks():
        hook(trainer, info)
    ckpt = last_checkpoint(work)
    if ckpt:
        log.info("%s: resuming from %s", info["stage"], ckpt)
    trainer.train(resume_from_checkpoint=ckpt)


def _no_checkpoint_at_the_end():
    """transformers saves a full checkpoint (weights + optimizer state: 14 bytes a parameter
    in bf16) after the last step; save_final writes the model right after and deletes
    checkpoints, so that one is skipped. A periodic save at the last step stays; a crash
    before save_final resumes from the checkpoint before."""
    from transformers import TrainerCallback

    class NoCheckpointAtTheEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if (state.global_step >= state.max_steps and args.save_strategy == "steps"
                    and (not state.save_steps or state.global_step % state.save_steps)):
                control.should_save = False
            return control

    return NoCheckpointAtTheEnd()


def save_final(trainer, tokenizer, work: Path, resolved: dict | None = None) -> None:
    """A clean HF checkpoint in `work`: safetensors, config, tokenizer + chat template. With
    LoRA the adapter is merged into the weights (a full checkpoint, as the next merge and
    stock mergekit take it). Every rank calls it (DeepSpeed and FSDP gather the weights
    together); only global rank 0 writes."""
    if resolved and resolved.get("peft"):
        save_merged_lora(trainer, resolved, work)
    else:
        trainer.save_model(str(work))
    if not is_main():
        return
    # args.chat_template_path may have replaced the tokenizer inside the trainer
    (getattr(trainer, "processing_class", None) or tokenizer).save_pretrained(str(work))
    for p in work.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(work / DATA_DIR, ignore_errors=True)
    (work / "training_args.bin").unlink(missing_ok=True)  # a pickle; not part of the model
    # TRL's auto card names the partial folder and "None" as the base model: drop it (the
    # hub module writes real cards from stage_config.yaml).
    (work / "README.md").unlink(missing_ok=True)


def train_sft(resolved: dict, work, args, init_kwargs: dict, records, tokenizer,
              stage: str, keep_eos: bool = False, eval_records=None) -> None:
    """The part cpt and sft share: load, freeze, SFTTrainer, train (resumable), save.

    keep_eos: args.eos_token only separates the training documents; the model is saved with
    its own EOS (TRL writes args.eos_token into the tokenizer and the model's configs)."""
    import copy

    from trl import SFTTrainer

    if resolved.get("load_in_4bit"):
        init_kwargs = quantized(init_kwargs)
    model = load_model(resolved["model"], init_kwargs)
    freeze_except_layers(model, resolved.get("trainable_layers"))
    own_eos = (tokenizer.eos_token, copy.deepcopy(model.config.get_text_config().eos_token_id),
               copy.deepcopy(model.generation_config.eos_token_id))
    trainer = SFTTrainer(model=model, args=args, train_dataset=to_dataset(records, work),
                         eval_dataset=to_dataset(eval_records, work, "eval") if eval_records
                         else None, processing_class=tokenizer,
                         peft_config=lora_config(resolved))
    fit(trainer, work, {"stage": stage, "work": work, "model": resolved["model"],
                        "ref_model": None, "step": None})
    if keep_eos:
        tokenizer.eos_token = own_eos[0]
        model.config.get_text_config().eos_token_id = own_eos[1]
        model.generation_config.eos_token_id = own_eos[2]
    save_final(trainer, tokenizer, work, resolved)
