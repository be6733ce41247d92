"""Chat templates: the one a stage renders its data with, whether TRL can find the assistant
turns in it, and, when a recipe is planned (no torch, no weights), whether a stage whose data
is chat has one at all.
"""

import json
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.stages.models import load_tokenizer
from solar_merge.stages.records import is_chat


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


# -- when a recipe is planned: no torch, no weights ---------------------------------

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
