"""What every stage shares: resolved config -> TRL config, data checks, model loading (LoRA,
4-bit), layer freezing, the output folder owned by global rank 0, the final save, loss log,
plot and model card. It imports no stage module (stages/launch.py dispatches to them).

The training itself is TRL's (`SFTTrainer`, `DPOTrainer`); nothing here loops over batches.
"""

import json
import os
import re
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

import yaml

from solar_merge.errors import UserError, did_you_mean
from solar_merge.outputs import OWNED, atomic_output, crash_point, partial_dir

HASH_FILE = "resolved_hash"
LOSS_LOG = "loss.jsonl"
DATA_DIR = "data"  # the converted records, saved once so that every rank reuses one cache
ADAPTER_DIR = "adapter"
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")

# Test/extension hooks: each is called as hook(trainer, info) right before trainer.train();
# info = {"stage", "work", "model", "ref_model", "step"}. Tests use it to inject an interrupt
# or to inspect the trainer (masks, reference weights). SOLAR_MERGE_TRAINER_HOOK=FILE.py:NAME
# adds one in processes a test cannot reach (the ranks of a torchrun launch).
TRAINER_HOOKS: list = []


# -- the output folder, owned by global rank 0 ----------------------------------------------

def world_size() -> int:
    """Processes of this run (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Global rank 0: the one process that writes the output folder."""
    return int(os.environ.get("RANK", "0")) == 0


def distributed_state():
    """accelerate's process state, set up the way TRL's TrainingArguments will use it (gloo
    on CPU, nccl on GPUs), so that our barriers and TRL's share one process group."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def agreed(value):
    """Global rank 0's `value` on every rank (its decisions: skip, fail, go)."""
    if world_size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    distributed_state()
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        distributed_state().wait_for_everyone()


@contextmanager
def owned_output(out_dir: Path, h: str):
    """The work folder of `out_dir` (outputs.atomic_output, kept for resume, emptied if another
    config left it). Under torchrun/accelerate only global rank 0 takes the lock, makes and
    renames the folder and marks it complete; the other ranks get the same folder once rank 0
    has it ready (rank 0's failure to take it is raised on every rank) and return only when
    the finished folder is in place."""
    if world_size() == 1:
        with atomic_output(out_dir, h, keep_partial=True) as work:
            prepare_work(work, h)
            yield work
        return
    if not is_main():
        problem = agreed(None)
        if problem:
            raise UserError(problem)
        yield partial_dir(out_dir)
        barrier()
        return
    with ExitStack() as stack:
        try:
            work = stack.enter_context(atomic_output(out_dir, h, keep_partial=True))
            prepare_work(work, h)
        except UserError as e:  # e.g. another run holds the lock: every rank stops with it
            agreed(e.message)
            raise
        except BaseException as e:
            agreed(f"rank 0 could not prepare {out_dir}: {type(e).__name__}: {e}")
            raise
        agreed(None)
        yield work
    barrier()


def preflight(resolved: dict) -> None:
    """What resolve() could not check (paths may be created by earlier recipe steps):
    local models exist and hold safetensors, data files exist."""
    from solar_merge.checkpoints import require_safetensors

    for field in ("model", "ref_model"):
        value = resolved.get(field)
        if value and Path(value).is_absolute():
            folder = Path(value)
            if not folder.is_dir():
                raise UserError(f"{field}: {folder} not found",
                                fix="train or merge that model first, or fix the path")
            if not (folder / "config.json").is_file():
                raise UserError(f"{field}: {folder} has no config.json",
                                fix="point to a folder saved with save_pretrained()")
            require_safetensors(folder)
    sets = [(key, i, spec) for key in ("datasets", "eval_datasets")  # [UPSCALE] eval too
            for i, spec in enumerate(resolved.get(key) or [])]
    for key, i, spec in sets:
        if Path(spec["path"]).is_absolute() and not Path(spec["path"]).exists():
            raise UserError(f"{key}[{i}]: {spec['path']} not found",
                            fix="give an existing file or folder (relative paths resolve "
                                "against the stage config's folder), or a Hub dataset name")
    if resolved.get("load_in_4bit"):
        require_4bit()


def prepare_work(work: Path, h: str) -> None:
    """A partial folder left by another config is emptied: never resume someone else's run."""
    stamp = work / HASH_FILE
    if stamp.is_file() and stamp.read_text().strip() != h or (
            not stamp.is_file() and any(p.name != OWNED for p in work.iterdir())):
        _say(f"{work} was left by a run with another config: starting over")
        for p in work.iterdir():
            if p.name == OWNED:  # keeps the folder ours (outputs.atomic_output)
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    stamp.write_text(h + "\n")


def _say(msg: str) -> None:
    import click

    click.echo(msg, err=True)


# -- TRL config ----------------------------------------------------------------------------

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


# -- data ----------------------------------------------------------------------------------

def load_stage_records(resolved: dict, convert) -> list[dict]:
    """All records of the stage's datasets, converted with convert(record, fmt); clear errors
    (naming the dataset and record) for missing columns and empty data."""
    from solar_merge.data import load_records

    out: list[dict] = []
    for i, spec in enumerate(resolved["datasets"]):
        where = f"datasets[{i}] ({spec['path']})"
        try:
            records = load_records(spec["path"], split=spec.get("split", "train"),
                                   max_samples=spec.get("max_samples"))
        except UserError as e:
            raise UserError(f"{where}: {e.message}") from None
        if not records:
            raise UserError(f"{where} is empty: no records to train on",
                            fix="fill the dataset, or remove it from `datasets:`")
        for n, record in enumerate(records):
            try:
                out.append(convert(record, spec.get("format", "auto")))
            except UserError as e:
                raise UserError(f"{where}, record {n}: {e.message}") from None
    return out


def is_chat(value) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def unify_chat(records: list[dict], keys, tokenizer, args, stage: str) -> list[dict]:
    """Make every record either plain strings or conversations (a Dataset has one schema).

    String fields are wrapped as one user turn (prompt) / one assistant turn (answers) when any
    record is a conversation or the tokenizer has a chat template. Conversations need a chat
    template: a missing one is an error here, before any training."""
    has_template = bool(getattr(tokenizer, "chat_template", None)) or bool(
        getattr(args, "chat_template_path", None))
    any_chat = any(is_chat(r[k]) for r in records for k in keys)
    if any_chat and not has_template:
        raise UserError(f"{stage}: the data holds chat messages (alpaca/openorca/messages "
                        "records are rendered through a chat template), but the tokenizer of "
                        "the model has no chat template",
                        fix="use a tokenizer with a chat template, set args.chat_template_path "
                            "(a tokenizer folder or a .jinja file), or give plain prompt/"
                            "completion strings")
    if not (any_chat or has_template):
        return records
    out = []
    for r in records:
        r = dict(r)
        for k in keys:
            if isinstance(r[k], str):
                role = "user" if k == "prompt" else "assistant"
                r[k] = [{"role": role, "content": r[k]}]
            elif not is_chat(r[k]):
                raise UserError(f"{stage}: field `{k}` must be a string or a list of messages, "
                                f"got {type(r[k]).__name__}", fix="check the dataset")
        out.append(r)
    return out


def as_turns(value, role: str) -> list[dict]:
    """A prompt or completion as a list of messages (a string becomes one `role` turn)."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def chat_template(tokenizer, args) -> str | None:
    """The template the trainer will render with: args.chat_template_path (a .jinja file or a
    tokenizer folder / Hub id, as TRL reads it) over the tokenizer's own."""
    path = getattr(args, "chat_template_path", None)
    if not path:
        template = getattr(tokenizer, "chat_template", None)
    elif Path(path).is_file():
        template = Path(path).read_text(encoding="utf-8")
    else:
        template = getattr(load_tokenizer(path, "args.chat_template_path"), "chat_template", None)
    return template.get("default") if isinstance(template, dict) else template


def require_assistant_masks(tokenizer, args, model: str) -> None:
    """TRL's assistant_only_loss finds assistant tokens through `{% generation %}` markers in
    the chat template; for templates without them it knows training versions of some (Qwen,
    Llama 3, Gemma, Phi, ...). Anything else would fail inside TRL after the model loaded."""
    import copy

    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = chat_template(tokenizer, args)
    if template and has_generation_markers(template):
        return
    probe = copy.copy(tokenizer)
    probe.chat_template = template
    try:
        get_training_chat_template(probe)
        return
    except ValueError:
        pass
    raise UserError(f"sft: the data holds conversations with several assistant turns, and the "
                    f"chat template of {model} does not mark assistant turns, so TRL's "
                    "assistant_only_loss cannot tell which tokens to train on",
                    fix="set args.chat_template_path to a .jinja copy of the template with "
                        "each assistant message wrapped in {% generation %}...{% endgeneration "
                        "%} (see training/chat_templates/solar_instruct.jinja), or split the "
                        "conversations into records that end with their only assistant turn")


# -- the plan-time check (recipe validate): no torch, no weights ----------------------------

CHAT_FORMATS = ("alpaca", "openorca", "messages", "math_instruct")


def data_is_chat(resolved: dict) -> bool | None:
    """Whether the stage's records are rendered through a chat template (as unify_chat will
    decide): always for alpaca/openorca/messages/math_instruct; for prompt_completion and
    preference records when their fields are message lists (read from the first record of a
    local file); never for cpt. None: a Hub dataset in `auto`/`prompt_completion`/`preference`
    format, which cannot be read without downloading it."""
    from solar_merge.data import detect_format, load_records

    if resolved["stage"] == "cpt":
        return False
    unknown = False
    for spec in resolved["datasets"]:
        fmt = spec.get("format", "auto")
        if fmt in CHAT_FORMATS:
            return True
        if fmt in ("text", "math_alignment"):
            continue
        if not Path(spec["path"]).exists():
            unknown = True
            continue
        try:
            first = load_records(spec["path"], max_samples=1)[:1]
        except UserError:
            continue  # the stage reports a broken file itself, with its fix
        if first and fmt == "auto" and resolved["stage"] == "sft" and \
                detect_format(first[0]) in CHAT_FORMATS:
            return True
        if first and any(is_chat(v) and v for v in first[0].values()):
            return True
    return None if unknown else False


def has_chat_template(ref: str) -> bool | None:
    """Whether a model folder (tokenizer_config.json's `chat_template`, chat_template.jinja or
    .json) or a .jinja file holds a chat template; a Hub id is looked up in the local Hub cache
    only. None: unknown (a Hub model not in the cache)."""
    from solar_merge.checkpoints import is_hub_id

    path = Path(ref)
    if path.is_file():
        return path.suffix in (".jinja", ".j2") and bool(path.read_text(encoding="utf-8",
                                                                      errors="replace").strip())
    if path.is_dir():
        folder = path
    elif is_hub_id(ref):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(ref, "tokenizer_config.json")
        except Exception:  # noqa: BLE001 - a broken cache is an unknown template
            return None
        if not isinstance(cached, str):
            return None
        folder = Path(cached).parent
    else:
        return None
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            return True
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(config.get("chat_template")) if isinstance(config, dict) else False


def chat_template_problem(resolved: dict, template_of=has_chat_template, label: str = ""
                          ) -> tuple[str | None, str | None]:
    """(problem, note) for a stage whose data is rendered as chat: a problem when neither
    args.chat_template_path nor the model's tokenizer gives a template, a note when that
    cannot be known offline. `template_of(ref)` answers for a model (a recipe passes one that
    follows earlier stages' outputs back to the model whose tokenizer they carry)."""
    chat = data_is_chat(resolved)
    if chat is False:
        return None, None
    path = (resolved.get("args") or {}).get("chat_template_path")
    found = template_of(path) if path else template_of(resolved["model"])
    where = (f"args.chat_template_path {path}" if path
             else f"the tokenizer of {label or resolved['model']}")
    if found is None:
        return None, (f"cannot check that {where} has a chat template (not in the local Hub "
                      "cache); the stage needs one" + ("" if chat else " if its data is chat"))
    if found:
        return None, None
    if chat is None:
        return None, (f"{where} has no chat template: the stage fails if its Hub data holds "
                      "chat messages")
    problem = (f"its data is rendered as chat (alpaca/openorca/messages records or message "
               f"lists), but {where} has no chat template")
    return problem, None


def to_dataset(records: list[dict], work: Path | None = None, name: str = "train"):
    """A datasets.Dataset of the records. With a work folder it is saved there once (global
    rank 0 first, then each node's first rank, then the others: they load what exists) and
    loaded from disk, so that TRL's tokenization is cached beside it and done once, not on
    every rank; a resumed run reuses it (the stage hash keeps the folder to one config)."""
    import datasets

    if work is None:
        return datasets.Dataset.from_list(records)
    folder = Path(work) / DATA_DIR / name
    state = distributed_state() if world_size() > 1 else None
    with ExitStack() as stack:
        if state is not None:
            stack.enter_context(state.main_process_first())
            stack.enter_context(state.local_main_process_first())
        if not (folder / "dataset_info.json").is_file():
            tmp = folder.with_name(f".{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            datasets.Dataset.from_list(records).save_to_disk(str(tmp))
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    return datasets.load_from_disk(str(folder))


# -- models --------------------------------------------------------------------------------

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


def decide_precision(resolved: dict):
    """solar_merge.precision's decision for the stage's `precision:` request, on the device
    it trains on (every rank of a launch sees the same kind)."""
    from solar_merge.precision import decide

    return decide(resolved.get("precision", "auto"), training=True)


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


# -- training and saving -------------------------------------------------------------------

def last_checkpoint(work: Path) -> str | None:
    """The newest complete `checkpoint-<step>` in `work` (one with trainer_state.json)."""
    best = None
    for p in work.glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / "trainer_state.json").is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), p)
    return str(best[1]) if best else None


def loss_logger(work: Path):
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        """Appends every `logs` dict (with its step) to loss.jsonl; survives resume."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                with open(work / LOSS_LOG, "a") as f:
                    f.write(json.dumps(row, default=float) + "\n")

        def on_step_end(self, args, state, control, **kwargs):
            # transformers saves a full checkpoint (weights + optimizer state: 14 bytes a
            # parameter in bf16) after the last step; save_final writes the model right after
            # and deletes checkpoints, so that one is skipped. A periodic save at the last step
            # stays; a crash before save_final resumes from the checkpoint before.
            if (state.global_step >= state.max_steps and args.save_strategy == "steps"
                    and (not state.save_steps or state.global_step % state.save_steps)):
                control.should_save = False
            return control

        def on_save(self, args, state, control, **kwargs):
            # kill tests: SOLAR_MERGE_KILL_AT=after-checkpoint-<step> dies right after the save
            if _kill_this_rank():
                crash_point(f"after-checkpoint-{state.global_step}")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            # SOLAR_MERGE_KILL_AT=before-update-<step>: dies inside that step, after its
            # gradients were all-reduced, i.e. once every rank is past the previous checkpoint
            if _kill_this_rank():
                crash_point(f"before-update-{state.global_step + 1}")

    return LossLog()


def _kill_this_rank() -> bool:
    """Kill tests pick one rank with SOLAR_MERGE_KILL_RANK (default: every rank)."""
    wanted = os.environ.get("SOLAR_MERGE_KILL_RANK")
    return wanted is None or wanted == os.environ.get("RANK", "0")


def _env_hooks() -> list:
    """SOLAR_MERGE_TRAINER_HOOK=FILE.py:NAME, a hook for processes a test starts (ranks)."""
    spec = os.environ.get("SOLAR_MERGE_TRAINER_HOOK")
    if not spec:
        return []
    import runpy

    file, _, name = spec.rpartition(":")
    return [runpy.run_path(file)[name]]


def fit(trainer, work: Path, info: dict) -> None:
    """trainer.train(), resuming from the last checkpoint in `work` if there is one."""
    trainer.add_callback(loss_logger(work))
    for hook in TRAINER_HOOKS + _env_hooks():
        hook(trainer, info)
    ckpt = last_checkpoint(work)
    if ckpt:
        _say(f"{info['stage']}: resuming from {ckpt}")
    trainer.train(resume_from_checkpoint=ckpt)


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


# -- LoRA / QLoRA ----------------------------------------------------------------------------

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


def finish(work: Path, resolved: dict, facts: dict | None = None) -> None:
    """Loss plot, stage_config.yaml and the model card, once the weights are saved."""
    plot_loss(work / LOSS_LOG, work / "loss.png", title=resolved["stage"])
    write_stage_card(work, resolved, facts or {})
    (work / HASH_FILE).unlink(missing_ok=True)


def write_stage_card(work: Path, resolved: dict, facts: dict) -> None:
    """README.md (hub.write_card, kind = the stage) with the base model, the data and their
    sha256, the stage config (also written to stage_config.yaml) and the loss curve.
    facts: what the run decided (e.g. cpt's document separator), shown under Training."""
    from solar_merge import hub
    from solar_merge.outputs import portable

    stage = resolved["stage"]
    # paths relative to the output folder (`work` is its sibling: the same relative paths),
    # so that the config travels; `solar-merge train OUT/stage_config.yaml` resolves them back
    source = (f"# solar-merge train stage_config.yaml -o OUT   (resolved {stage} stage)\n"
              + yaml.safe_dump(portable(resolved, work), sort_keys=False))
    trainer = "DPOTrainer" if stage in ("dpo", "stepwise_dpo") else "SFTTrainer"
    training = [f"- stage: `{stage}`, trained with TRL's `{trainer}`",
                f"- base model: {_name(resolved['model'])}"]
    if resolved.get("ref_model"):
        training.append(f"- reference model: {_name(resolved['ref_model'])}")
    training += [f"- {key.replace('_', ' ')}: `{value}`" for key, value in facts.items()]
    data = ["| dataset | format | split | max_samples | sha256 |", "| --- | --- | --- | --- | --- |"]
    for spec in resolved["datasets"]:
        data.append(f"| {_name(spec['path'])} | {spec.get('format', 'auto')} | "
                    f"{spec.get('split', 'train')} | {spec.get('max_samples') or 'all'} | "
                    f"{data_sha256(spec['path'])} |")
    points = read_loss(work / LOSS_LOG)
    loss = ["![training loss](loss.png)", ""] if (work / "loss.png").is_file() else []
    loss.append(f"Training loss {points[0][1]:.4g} at step {points[0][0]}, {points[-1][1]:.4g} "
                f"at step {points[-1][0]} (every logged value: `loss.jsonl`)." if points
                else "No loss was logged (raise max_steps or lower logging_steps).")
    hub.write_card(work, kind=stage, source_yaml=source, source_name="stage_config.yaml",
                   base_models=[resolved["model"]],
                   datasets=[d["path"] for d in resolved["datasets"]],
                   sections={"Training": training, "Data checksums": data,
                             "Training loss": loss})


def _name(ref: str) -> str:
    """A Hub id as is, a local path by its last component (the card travels; paths do not)."""
    return f"`{Path(ref).name}` (local)" if Path(ref).is_absolute() else f"`{ref}`"


def data_sha256(path: str) -> str:
    """sha256 of a local data file (what `sha256sum FILE` prints); of a folder, sha256 over
    its data files' `<relative path> <sha256>` lines in sorted order; a Hub dataset is not
    hashed here (its revision is whatever `datasets` resolved)."""
    import hashlib

    from solar_merge.data import FILE_SUFFIXES

    def file_hash(f: Path) -> str:
        h = hashlib.sha256()
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    p = Path(path)
    if p.is_file():
        return file_hash(p)
    if p.is_dir():
        lines = "".join(f"{f.relative_to(p)} {file_hash(f)}\n" for f in sorted(p.rglob("*"))
                        if f.is_file() and f.suffix in FILE_SUFFIXES)
        return hashlib.sha256(lines.encode()).hexdigest()
    return "Hub dataset (not hashed)"


def read_loss(log: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, row[key]) pairs of a loss log (key "eval_loss": TRL's held-out evaluations),
    deduplicated by step (the last entry wins, e.g. after a resume)."""
    by_step: dict[int, float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if key in row and "step" in row:
                by_step[int(row["step"])] = float(row[key])
    return sorted(by_step.items())


def plot_loss(log: Path, png: Path, title: str = "") -> None:
    """`png` from the loss log; none where matplotlib is not installed (an offline node that
    brought only the wheels the stages need, docs/gpu.md): the values stay in the log."""
    try:
        import matplotlib
    except ImportError:
        _say(f"matplotlib is not installed: no {png.name} (the losses are in {log.name})")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = read_loss(log)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="." if len(points) < 50 else None)
    else:
        ax.text(0.5, 0.5, "no loss logged (raise max_steps or lower logging_steps)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{title} loss" if title else "loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


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
