"""The one parameter count (solar_merge/sizing.py) against the models transformers builds: every
family it claims, tied and untied, with and without biases, fused projections; and the config
forms the Hub ships (keys left at their defaults)."""

import subprocess
import sys

import pytest

from solar_merge.errors import UserError
from solar_merge.sizing import FAMILIES, Shape, tied_embeddings

SMALL = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 3,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}

CASES = [
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"tie_word_embeddings": False}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("llama", {"head_dim": 16}),                       # heads x head_dim != hidden
    ("mistral", {"tie_word_embeddings": False}),
    ("mistral", {"tie_word_embeddings": True, "attention_bias": True}),  # key ignored: no bias
    ("qwen2", {"tie_word_embeddings": True}),          # q, k, v biases always
    ("qwen2", {"tie_word_embeddings": False, "attention_bias": False}),
    ("qwen3", {"head_dim": 16}),                       # q_norm, k_norm of head_dim
    ("qwen3", {"attention_bias": True, "tie_word_embeddings": True}),
    ("gemma", {"head_dim": 16}),                       # tied by default
    ("gemma2", {"head_dim": 8, "tie_word_embeddings": False}),  # four norms per layer
    ("gemma3_text", {"head_dim": 8}),                  # four norms + q/k norms
    ("phi3", {"tie_word_embeddings": False}),          # fused qkv_proj, gate_up_proj
    ("phi3", {"tie_word_embeddings": True}),
]


def _build(model_type: str, extra: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**SMALL, **extra})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _numel(params) -> int:
    return sum(p.numel() for p in params)


@pytest.mark.parametrize("model_type, extra", CASES,
                         ids=[f"{t}-{'-'.join(map(str, e.items()))}" for t, e in CASES])
def test_count_is_the_numel_of_the_model_transformers_builds(model_type, extra):
    model = _build(model_type, extra)
    shape = Shape.from_config(model.config.to_dict())
    assert shape.exact and shape.model_type == model_type
    assert shape.params == _numel(model.parameters())  # tied weights counted once
    layer = model.model.layers[0]
    assert shape.per_layer == _numel(layer.parameters())
    linears = {name.rsplit(".", 1)[-1]: (m.in_features, m.out_features)
               for name, m in layer.named_modules() if isinstance(m, type(model.lm_head))}
    assert shape.matrices == linears
    assert shape.embeddings == _numel(model.get_input_embeddings().parameters()) + (
        0 if model.config.tie_word_embeddings else _numel(model.lm_head.parameters()))
    deeper = _build(model_type, {**extra, "num_hidden_layers": 5})
    assert shape.with_layers(5).params == _numel(deeper.parameters())


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_a_config_without_its_default_keys_counts_as_the_model_it_loads(model_type):
    """Hub config.json files leave keys at their defaults out (tie_word_embeddings,
    attention_bias, head_dim): the count follows the architecture's defaults."""
    model = _build(model_type, {})
    config = {k: v for k, v in model.config.to_dict().items()
              if k in SMALL or k in ("model_type", "architectures")}
    assert "tie_word_embeddings" not in config
    assert tied_embeddings(config) == model.config.tie_word_embeddings
    assert Shape.from_config(config).params == _numel(model.parameters())


def test_multimodal_config_is_sized_by_its_language_model():
    text = {**SMALL, "model_type": "qwen2"}
    outer = {"model_type": "some_vlm", "text_config": text, "tie_word_embeddings": False}
    assert Shape.from_config(outer).params == Shape.from_config(
        {**text, "tie_word_embeddings": False}).params


def test_unknown_model_type_is_counted_llama_style_and_says_so():
    shape = Shape.from_config({**SMALL, "model_type": "mixtral"})
    assert not shape.exact
    assert shape.params == Shape.from_config({**SMALL, "model_type": "llama"}).params


def test_given_parameter_count_wins_and_grows_by_whole_layers():
    shape = Shape.from_config({**SMALL, "model_type": "llama"}, params=10_000)
    assert shape.params == 10_000
    assert shape.with_layers(5).params == 10_000 + 2 * shape.per_layer


@pytest.mark.parametrize("config, words", [
    ({k: v for k, v in SMALL.items() if k != "hidden_size"}, "no `hidden_size`"),
    ({**SMALL, "num_hidden_layers": "32"}, "`num_hidden_layers` is '32'"),
    ({**SMALL, "vocab_size": 10**12}, "`vocab_size` is 1000000000000"),
    ({**SMALL, "num_attention_heads": True}, "`num_attention_heads` is True"),
])
def test_a_damaged_config_is_a_user_error_naming_the_key(config, words):
    with pytest.raises(UserError, match="config.json") as e:
        Shape.from_config(config)
    assert words in e.value.message and "fix:" in e.value.message


def test_sizing_imports_no_torch():
    code = ("import sys, solar_merge.sizing, solar_merge.memory\n"
            "assert not {'torch', 'transformers', 'trl'} & set(sys.modules)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_model_info_carries_the_shape_with_the_weights_count(tiny_model_factory, tmp_path):
    import json
    import shutil

    from solar_merge.checkpoints import model_info

    folder = tiny_model_factory(arch="qwen2", layers=4, tied=False)
    info = model_info(str(folder))
    assert info.shape.params == info.params and info.shape.exact
    assert info.shape.per_layer == info.per_layer_params  # config's count = layer 0's weights
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    config = json.loads((damaged / "config.json").read_text())
    (damaged / "config.json").write_text(json.dumps({**config, "num_attention_heads": "4"}))
    with pytest.raises(UserError, match=r"model: .*damaged/config.json: `num_attention_heads` "
                                        r"is '4'"):
        model_info(str(damaged))
