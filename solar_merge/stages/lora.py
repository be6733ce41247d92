"""LoRA and QLoRA: peft's LoraConfig from the stage's `peft:`, the 4-bit NF4 base that needs a
CUDA GPU, and the adapter merged into a full checkpoint when the stage ends (the next merge
and stock mergekit take full checkpoints).
"""

import shutil
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.stages.distributed import is_main
from solar_merge.stages.models import load_model

ADAPTER_DIR = "adapter"


def lora_config(resolved: dict):
    """peft.LoraConfig from the stage's `peft:` (checked by name in resolve(); values here)."""
    if not resolved.get("peft"):
        return None
    from peft import LoraConfig

    try:
        return LoraConfig(task_type="CAUSAL_LM", **resolved["peft"])
    except (TypeError, ValueError) as e:
        raise UserError(f"peft: LoraConfig refused it: {e}",
                        fix="fix the value in the stage config's `peft:`") from None


def describe_lora(resolved: dict) -> str:
    """For the model card: what was trained and what was saved."""
    peft = resolved["peft"]
    targets = peft.get("target_modules") or "peft's default modules"
    text = (f"rank {peft.get('r', 8)}, alpha {peft.get('lora_alpha', 8)} on {targets}"
            + (", 4-bit base (QLoRA)" if resolved.get("load_in_4bit") else "")
            + "; merged into the weights (merge_and_unload)")
    return text + (f"; the adapter is kept in {ADAPTER_DIR}/"
                   if resolved.get("keep_adapter") else "")


def require_4bit() -> None:
    """QLoRA loads the base model in 4 bits with bitsandbytes, which needs a CUDA GPU."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UserError("load_in_4bit (QLoRA) needs a CUDA GPU: bitsandbytes' 4-bit weights "
                        "do not run on this machine (no GPU found)",
                        fix="remove load_in_4bit (LoRA on bf16/fp32 weights runs anywhere), "
                            "or run on a machine with a GPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError("load_in_4bit (QLoRA) needs the bitsandbytes package",
                        fix="pip install bitsandbytes")


def quantized(init_kwargs: dict) -> dict:
    """model_init_kwargs for a 4-bit NF4 base (QLoRA's recipe: double quantization, bf16
    compute)."""
    import torch
    from transformers import BitsAndBytesConfig

    return {**init_kwargs, "dtype": torch.bfloat16, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)}


def save_merged_lora(trainer, resolved: dict, work: Path) -> None:
    """The adapter merged into the base weights (merge_and_unload), saved as a full
    checkpoint; keep_adapter also keeps the adapter in work/adapter. A 4-bit base is not
    merged into: the base is loaded again in bf16 and the adapter applied to it."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_main():
        return
    adapter = work / ADAPTER_DIR
    if resolved.get("keep_adapter") or resolved.get("load_in_4bit"):
        model.save_pretrained(str(adapter))
    if resolved.get("load_in_4bit"):
        from peft import PeftModel

        base = load_model(resolved["model"], {"dtype": "bfloat16"})
        merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
        if not resolved.get("keep_adapter"):
            shutil.rmtree(adapter)
    else:
        merged = model.merge_and_unload()
    merged.save_pretrained(str(work), safe_serialization=True)
