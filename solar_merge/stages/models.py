"""The models a stage trains: tokenizer and weights loaded from safetensors without running a
model's own code, the reference model's vocabulary check, freezing all but some decoder
layers, and a checksum of the weights (stepwise DPO records its references' with it).
"""

import re
from pathlib import Path

from solar_merge.errors import UserError

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def load_tokenizer(model: str, field: str = "model"):
    from transformers import AutoTokenizer

    from solar_merge.checkpoints import remote_code_error

    try:
        return AutoTokenizer.from_pretrained(model, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - missing/broken tokenizer files are the user's to fix
        if remote_code_error(model, e):
            raise remote_code_error(model, e) from None
        raise UserError(f"{field}: cannot load a tokenizer from {model} ({type(e).__name__}: "
                        f"{str(e)[:200]})",
                        fix="save the tokenizer next to the model (--copy-tokenizer for "
                            "mergekit outputs)") from None


def load_model(model: str, init_kwargs: dict | None = None, field: str = "model"):
    """The model in model_init_kwargs.dtype (float32 unless given, as trl_args does)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(init_kwargs or {})
    kwargs.setdefault("dtype", "float32")
    kwargs.setdefault("trust_remote_code", False)  # opt in via args.model_init_kwargs
    kwargs.setdefault("use_safetensors", True)  # never unpickle Hub .bin weights by default
    try:
        return AutoModelForCausalLM.from_pretrained(model, **kwargs)
    except (OSError, ValueError) as e:
        from solar_merge.checkpoints import remote_code_error

        if remote_code_error(model, e):
            raise remote_code_error(model, e) from None
        raise UserError(f"{field}: cannot load {model} ({type(e).__name__}: {str(e)[:200]})",
                        fix="point to a Hugging Face causal LM folder") from None


def check_same_vocab(model: str, tokenizer, ref: str, ref_tokenizer=None) -> None:
    """A reference model must score the same token ids as the policy."""
    from transformers import AutoConfig

    a = AutoConfig.from_pretrained(model, trust_remote_code=False).get_text_config().vocab_size
    b = AutoConfig.from_pretrained(ref, trust_remote_code=False).get_text_config().vocab_size
    same_tok = ref_tokenizer is None or ref_tokenizer.get_vocab() == tokenizer.get_vocab()
    if a != b or not same_tok:
        what = (f"vocab_size {b} vs {a}" if a != b else "a different tokenizer vocabulary")
        raise UserError(f"ref_model {ref} has {what} of the model {model}: DPO compares their "
                        "log-probabilities token by token",
                        fix="use a reference model with the same tokenizer (usually the SFT "
                            "model that `model` starts from)")


def ref_tokenizer_if_any(ref: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(ref, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - a reference without tokenizer files uses the model's
        return None


def checksum(model) -> str:
    """sha256 of a model's parameters (sorted by name; tied weights counted once), or of the
    tensors a saved model folder holds (the same value for the same weights)."""
    import hashlib

    h = hashlib.sha256()

    def add(name, tensor):
        h.update(name.encode())
        h.update(memoryview(tensor.detach().float().cpu().contiguous().numpy()).cast("B"))

    if isinstance(model, (str, Path)):
        from safetensors import safe_open

        # One tensor in memory at a time, and the file opened anew for each: safetensors maps
        # the file, and the pages read through one mapping stay resident until it is closed
        # (+0.7 GB for a 184M fp32 model, while the trained model is still loaded).
        where = {}
        for shard in sorted(Path(model).glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), shard))
        for name in sorted(where):
            with safe_open(str(where[name]), framework="pt") as f:
                add(name, f.get_tensor(name))
    else:
        for name, p in sorted(model.named_parameters(), key=lambda x: x[0]):
            add(name, p)
    return h.hexdigest()[:16]


def freeze_except_layers(model, layers) -> int:
    """requires_grad only for parameters of the listed decoder layers (`all`: every one, so
    that only embeddings, lm_head and the final norm are frozen); returns their count."""
    if not layers:
        return sum(p.numel() for p in model.parameters())
    n_layers = model.config.get_text_config().num_hidden_layers
    if layers == "all":
        layers = range(n_layers)
    bad = [i for i in layers if i >= n_layers]
    if bad:
        raise UserError(f"trainable_layers: layer {bad[0]} does not exist, the model has "
                        f"{n_layers} layers (0..{n_layers - 1})",
                        fix="choose layer indices below num_hidden_layers")
    wanted = set(layers)
    count = 0
    for name, p in model.named_parameters():
        m = _LAYER.search(name)
        p.requires_grad_(bool(m) and int(m.group(1)) in wanted)
        count += p.numel() if p.requires_grad else 0
    if count == 0:
        raise UserError("trainable_layers matched no parameters (no `layers.<i>.` names)",
                        fix="this model's parameter names are unusual; remove trainable_layers")
    return count
