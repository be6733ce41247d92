"""Tiny random models and a tiny tokenizer, built once per session (seconds, no downloads)."""

from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pytest_configure(config):
    # kill points and trainer hooks (solar_merge/testhooks.py) work in this process and in
    # every process a test starts, which inherit the environment
    from solar_merge import testhooks

    testhooks.arm()
    # tests that need the embedded SmolLM2 (imported once to ~/.cache/solar-merge) or start
    # torchrun / accelerate processes: `-m "not smollm2 and not torchrun"` skips them
    config.addinivalue_line("markers", "smollm2: uses the embedded SmolLM2-135M-Instruct")
    config.addinivalue_line("markers", "torchrun: starts several processes (torchrun/accelerate)")
    config.addinivalue_line("markers", "xdist_group(name): tests pytest-xdist runs in one worker")


def pytest_collection_modifyitems(config, items):
    # pytest-xdist (`--dist loadgroup`) spreads whole files over its workers, so that a file's
    # fixtures are built once; the files that start torchrun/accelerate share one worker, as
    # their process groups would otherwise meet on the same default port.
    launching = {item.path for item in items if item.get_closest_marker("torchrun")}
    for item in items:
        group = "launching" if item.path in launching else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


def make_tokenizer(out: Path):
    """A byte-level BPE tokenizer (vocab 384) trained on Python's own reference text."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(topics.values())[:200], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def make_model(out: Path, arch: str = "llama", layers: int = 4, tied: bool = True,
               tokenizer_dir: Path | None = None, seed: int = 0, vocab: int = 384,
               hidden: int = 32) -> Path:
    """Save a tiny random causal LM (+ tokenizer) to `out` as safetensors; return `out`."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 2 * hidden,
                  "num_hidden_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                  "max_position_embeddings": 256, "tie_word_embeddings": tied,
                  "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        for f in Path(tokenizer_dir).iterdir():
            shutil.copy(f, Path(out) / f.name)
    return Path(out)


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    make_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory, tiny_tokenizer_dir):
    """factory(arch='llama', layers=4, tied=True, seed=0, vocab=384, hidden=32) -> path,
    cached per argument set. A vocab other than the tokenizer's makes a model no merge accepts
    with the others."""
    cache = {}

    def factory(arch="llama", layers=4, tied=True, seed=0, vocab=384, hidden=32):
        key = (arch, layers, tied, seed, vocab, hidden)
        if key not in cache:
            out = tmp_path_factory.mktemp(f"{arch}-{layers}-{'tied' if tied else 'untied'}-{seed}"
                                          f"-v{vocab}-h{hidden}")
            cache[key] = make_model(out, arch, layers, tied, tiny_tokenizer_dir, seed, vocab,
                                    hidden)
        return cache[key]

    return factory


@pytest.fixture(scope="session")
def tiny_model(tiny_model_factory) -> Path:
    return tiny_model_factory()
