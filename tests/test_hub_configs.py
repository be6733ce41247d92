"""Checkpoints as the Hub ships them: config.json files written before transformers added
`layer_types` (Qwen2.5, Qwen3, Gemma 2, Gemma 3). transformers derives the per-layer pattern
when it loads them; an up-scale must carry the re-sliced pattern, for every such architecture.
"""

import json

import pytest

from solar_merge.merging import merge
from solar_merge.upscale import dus_config

SMALL = {"vocab_size": 384, "hidden_size": 32, "intermediate_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "max_position_embeddings": 256, "bos_token_id": 1, "eos_token_id": 2,
         "pad_token_id": 0}
# (config class name, its extra fields): each with a non-trivial layer pattern where the
# architecture has one, so that slicing the wrong part of it would show.
ARCHITECTURES = {
    "qwen2": ("Qwen2Config", {"use_sliding_window": True, "sliding_window": 16,
                              "max_window_layers": 4}),
    "qwen3": ("Qwen3Config", {"use_sliding_window": True, "sliding_window": 16,
                              "max_window_layers": 2}),
    "gemma2": ("Gemma2Config", {"sliding_window": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"sliding_window": 16, "sliding_window_pattern": 3}),
}


def hub_style_model(folder, arch: str, layers: int = 6):
    """A tiny random model saved, then its config.json stripped of `layer_types`, as the
    Hub's own files are."""
    import torch
    import transformers

    cls_name, extra = ARCHITECTURES[arch]
    config = getattr(transformers, cls_name)(num_hidden_layers=layers, **SMALL, **extra)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    path = folder / "config.json"
    raw = json.loads(path.read_text())
    raw.pop("layer_types", None)
    path.write_text(json.dumps(raw, indent=2))
    return folder


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_dus_of_a_hub_style_config(arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = hub_style_model(tmp_path / arch, arch)
    assert "layer_types" not in json.loads((model / "config.json").read_text())
    pattern = list(AutoConfig.from_pretrained(model).layer_types)  # what transformers derives
    out = merge(dus_config(str(model), 2, n_layers=6), tmp_path / "dus")

    written = json.loads((out / "config.json").read_text())
    assert written["num_hidden_layers"] == 8
    assert written["layer_types"] == pattern[0:4] + pattern[2:6]
    loaded = AutoModelForCausalLM.from_pretrained(out)  # the up-scaled model loads and runs
    assert loaded.config.layer_types == written["layer_types"]
    assert loaded(input_ids=__import__("torch").tensor([[1, 5, 9]])).logits.shape[1] == 3
