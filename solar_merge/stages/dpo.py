"""DPO and stepwise DPO (sDPO, arXiv 2403.19270) with TRL's DPOTrainer.

`dpo`: prompt/chosen/rejected data; the reference model is explicit (`ref_model`, default: a
second copy of `model`) and `args.beta` is TRL's beta.

`stepwise_dpo`: the preference data (in file order) is cut into `steps` contiguous chunks;
step i trains on chunk i, starting from step i-1's result, which is also its reference model
(step 1: `model` and `ref_model`). Each step is its own resumable output folder
`steps/step-<i>` inside the stage's work folder; `args` (max_steps, epochs, ...) apply to every
step. The final model is step k's; `keep_steps: true` keeps the intermediate models.
`steps.json` in the output lists, per step, its chunk of records, its model and reference
folders and sha256 checksums of the reference's parameters (as held by the DPOTrainer) and of
the step's result: step i's `ref_checksum` equals step i-1's `result_checksum`.
"""

import json
import logging
import shutil
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.outputs import MARKER, config_hash, is_complete
from solar_merge.stages.distributed import HASH_FILE, agreed, is_main, owned_output
from solar_merge.stages.logs import LOSS_LOG, read_loss
from solar_merge.stages.lora import lora_config, quantized
from solar_merge.stages.models import (
    check_same_vocab,
    checksum,
    freeze_except_layers,
    load_model,
    load_tokenizer,
    ref_tokenizer_if_any,
)
from solar_merge.stages.records import load_stage_records, to_dataset, unify_chat
from solar_merge.stages.training import fit, save_final, trl_args

log = logging.getLogger(__name__)

KEYS = ("prompt", "chosen", "rejected")
STEP_INFO = "step.json"


def run_stage(resolved: dict, work: Path) -> None:
    """The dpo or stepwise_dpo stage of `resolved`, into `work`."""
    import gc

    from solar_merge.data import to_preference

    trl_args(resolved, work, "DPOConfig")  # validate args before loading anything
    records = explicit_prompts(load_stage_records(resolved, to_preference))
    if resolved["stage"] == "dpo":
        train_once(resolved, work, resolved["model"], resolved["ref_model"], records, step=None)
        return
    k = resolved["steps"]
    if len(records) < k:
        raise UserError(f"stepwise_dpo: {len(records)} preference records cannot be split "
                        f"into {k} steps", fix="lower `steps` or add data")
    chunks = split_chunks(records, k)
    model, ref = resolved["model"], resolved["ref_model"]
    rows = []
    rows_steps: list[dict] = []
    offset = offset_records = 0
    for i, chunk in enumerate(chunks, 1):
        step_dir = work / "steps" / f"step-{i}"
        h = config_hash({"stage": resolved, "step": i, "model": model, "ref_model": ref})
        if not agreed(is_complete(step_dir, h)):  # global rank 0 decides
            with owned_output(step_dir, h) as sw:
                train_once(resolved, sw, model, ref, chunk, step=i)
                gc.collect()  # step i's model and trainer hold reference cycles: free them now
                if is_main():
                    (sw / HASH_FILE).unlink(missing_ok=True)
        else:
            log.info("stepwise_dpo: step %d already complete, skipping", i)
        info = json.loads((step_dir / STEP_INFO).read_text())
        for key in ("model", "ref_model"):  # step folders: relative to the stage output
            if info[key].startswith(str(work)):
                info[key] = str(Path(info[key]).relative_to(work))
        rows_steps.append({"step": i, "records": len(chunk), "first_record": offset_records,
                           **info})
        offset_records += len(chunk)
        last = 0
        for step, loss in read_loss(step_dir / LOSS_LOG):
            rows.append({"step": offset + step, "sdpo_step": i, "loss": loss})
            last = step
        offset += last
        model = ref = str(step_dir)
    if not is_main():
        return
    # The final model is the last step's: copy its files (not the step folders) to the root.
    last_dir = work / "steps" / f"step-{k}"
    for f in last_dir.iterdir():
        if f.is_file() and f.name not in (MARKER, LOSS_LOG, STEP_INFO):
            shutil.copy2(f, work / f.name)
    (work / LOSS_LOG).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (work / "steps.json").write_text(json.dumps(rows_steps, indent=1) + "\n")
    if not resolved.get("keep_steps"):
        shutil.rmtree(work / "steps")


def explicit_prompts(records: list[dict]) -> list[dict]:
    """Every record as {prompt, chosen, rejected}, by TRL's own `maybe_extract_prompt`: an
    implicit prompt (the turns chosen and rejected share) is moved out of the answers, and so
    is a `prompt` string that the conversations repeat (HuggingFaceH4/ultrafeedback_binarized),
    so that the prompt is scored once, as the answers' context."""
    from trl.data_utils import maybe_extract_prompt

    out = []
    for n, record in enumerate(records):
        extracted = maybe_extract_prompt(record)
        if not extracted["prompt"]:
            raise UserError(f"preference record {n} has no prompt: no `prompt` field that the "
                            "answers do not already hold, and chosen/rejected share no leading "
                            "turn to take it from",
                            fix="give a `prompt`, or start both conversations with the same "
                                "user turn")
        out.append(extracted)
    return out


def split_chunks(records: list, k: int) -> list[list]:
    """k contiguous, ordered chunks whose sizes differ by at most one."""
    n = len(records)
    bounds = [round(i * n / k) for i in range(k + 1)]
    return [records[bounds[i]:bounds[i + 1]] for i in range(k)]


def train_once(resolved: dict, work: Path, model_path: str, ref_path: str, records: list,
               step: int | None) -> None:
    from trl import DPOTrainer

    args, init_kwargs = trl_args(resolved, work, "DPOConfig")
    tokenizer = load_tokenizer(model_path)
    if ref_path != model_path:
        check_same_vocab(model_path, tokenizer, ref_path,
                                ref_tokenizer_if_any(ref_path))
    records = unify_chat(records, KEYS, tokenizer, args, resolved["stage"])
    dataset = to_dataset(records, work)
    if resolved.get("load_in_4bit"):
        init_kwargs = quantized(init_kwargs)
    model = load_model(model_path, init_kwargs)
    lora = lora_config(resolved)
    # No second model where the policy can score the reference itself: with LoRA (TRL switches
    # the adapter off), or when the reference IS the starting model and its log-probabilities
    # are computed once before training (args.precompute_ref_log_probs): one model in memory.
    self_reference = lora is not None or (args.precompute_ref_log_probs
                                          and ref_path == model_path)
    ref = None
    if not self_reference:
        ref = load_model(ref_path, init_kwargs, field="ref_model")
        ref.requires_grad_(False)
    freeze_except_layers(model, resolved.get("trainable_layers"))
    ref_sum = checksum(model) if self_reference and step is not None else None
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=lora)
    if ref is not None and step is not None:
        ref_sum = checksum(trainer.ref_model)  # the reference TRL really uses
    fit(trainer, work, {"stage": resolved["stage"], "work": work, "model": model_path,
                               "ref_model": ref_path, "step": step})
    save_final(trainer, tokenizer, work, resolved)
    if step is not None and is_main():  # the result as saved (any strategy)
        (work / STEP_INFO).write_text(json.dumps({
            "model": model_path, "ref_model": ref_path, "ref_checksum": ref_sum,
            "result_checksum": checksum(work)}) + "\n")
