"""How large a decoder-only model is, from its config.json alone: its parameters (in all, per
decoder layer, in the embeddings), the matrices of a decoder layer, and the same for any layer
count. This is solar-merge's only parameter count: `plan`, `seam --budget`, `validate` (the
recipe planner) and a train stage's memory check all size models with it, and
solar_merge.memory turns a Shape into bytes per device. No torch, no weights read.

    shape = Shape.from_config(read_config("mistralai/Mistral-7B-v0.1"))
    shape.params, shape.per_layer, shape.embeddings   # 7.24B, 218M, 262M
    shape.with_layers(48).params                      # 10.73B: SOLAR's up-scale
    shape.matrices                                    # {"q_proj": (4096, 4096), ...}: (in, out)

Counted exactly (tests/test_sizing.py compares with the numel of the models transformers builds)
for the families in FAMILIES:

- a decoder layer: attention q (hidden -> heads x head_dim), k and v (hidden -> kv_heads x
  head_dim), o (back to hidden); a gated MLP (gate, up: hidden -> intermediate; down); RMSNorms
  of the hidden size (two per layer, four in Gemma 2 and 3), and of head_dim on queries and
  keys (Qwen3, Gemma 3);
- biases where the architecture has them: q, k, v and o with `attention_bias` (Llama, Qwen3,
  Gemma), q, k and v always (Qwen2), gate, up and down with `mlp_bias` (Llama);
- fused projections (Phi-3's qkv_proj and gate_up_proj) hold the same parameters as the
  separate ones; only the matrices' names and shapes differ;
- the embeddings, the output head unless the embeddings are tied (`tie_word_embeddings`), and
  the final norm.

A key that config.json leaves out takes its architecture's default, as transformers' config
class gives it: Gemma ties its embeddings, the others do not; Qwen3's head_dim is 128 and
Gemma's 256 whatever the hidden size, the others' hidden / heads.

Another model type is counted as a Llama-style block (`Shape.exact` is False, and `plan` says
so). A multimodal config is sized by its language model (`text_config`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from solar_merge.errors import UserError


@dataclass(frozen=True)
class Family:
    """What a transformers architecture adds to a Llama-style decoder layer."""

    attention_bias: bool = False   # honours config.attention_bias (q, k, v and o biases)
    qkv_bias: bool = False         # q, k and v carry biases whatever the config says
    mlp_bias: bool = False         # honours config.mlp_bias (gate, up and down biases)
    norms: int = 2                 # RMSNorms of the hidden size per layer
    qk_norm: bool = False          # RMSNorms of head_dim on queries and keys
    fused: bool = False            # qkv_proj and gate_up_proj instead of q/k/v and gate/up
    tied: bool = False             # tie_word_embeddings when config.json does not give it
    head_dim: int | None = None    # head_dim when config.json does not give it (None: h / heads)


FAMILIES = {
    "llama": Family(attention_bias=True, mlp_bias=True),
    "mistral": Family(),
    "qwen2": Family(qkv_bias=True),
    "qwen3": Family(attention_bias=True, qk_norm=True, head_dim=128),
    "gemma": Family(attention_bias=True, tied=True, head_dim=256),
    "gemma2": Family(attention_bias=True, norms=4, tied=True, head_dim=256),
    "gemma3_text": Family(attention_bias=True, norms=4, qk_norm=True, tied=True, head_dim=256),
    "phi3": Family(fused=True),
}
LLAMA_STYLE = FAMILIES["llama"]

# largest value each key may take: a damaged config.json must not size a model of 10^30
_LIMITS = {"hidden_size": 10_000_000, "num_hidden_layers": 100_000, "vocab_size": 100_000_000,
           "intermediate_size": 100_000_000, "num_attention_heads": 100_000,
           "num_key_value_heads": 100_000, "head_dim": 100_000}
_FIX = ("solar-merge sizes decoder-only models from the usual transformers config keys "
        "(hidden_size, num_hidden_layers, vocab_size, ...): re-download config.json "
        "(`hf download REPO config.json --force`) or re-save the model with save_pretrained()")


@dataclass(frozen=True)
class Shape:
    """What sizing and the memory formula need of a model: from config.json (`from_config`)
    or given (tests, studies)."""

    params: int
    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_dim: int | None = None       # num_key_value_heads * head_dim (None: = hidden)
    per_layer: int | None = None    # parameters of one decoder layer
    q_dim: int | None = None        # num_attention_heads * head_dim (None: = hidden)
    embeddings: int | None = None   # input embeddings + the output head unless tied
    fused: bool = False             # Phi-3's qkv_proj and gate_up_proj
    exact: bool = True              # False: an unknown model type, counted as Llama-style
    model_type: str = ""

    @property
    def kv(self) -> int:
        return self.kv_dim or self.hidden

    @property
    def q(self) -> int:
        return self.q_dim or self.hidden

    @property
    def largest_module(self) -> int:
        """Parameters held by the largest single module (its own, not its children's, as
        DeepSpeed counts it): the embedding, or an MLP projection if that is larger."""
        return max(self.vocab * self.hidden, self.hidden * self.intermediate)

    @property
    def matrices(self) -> dict[str, tuple[int, int]]:
        """The weight matrices of one decoder layer, name -> (in, out features), as
        transformers names the Linear modules (peft's `target_modules` use these names)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q, self.kv
        if self.fused:
            return {"qkv_proj": (h, q + 2 * kv), "o_proj": (q, h), "gate_up_proj": (h, 2 * i),
                    "down_proj": (i, h)}
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def with_layers(self, layers: int) -> Shape:
        """The same model with `layers` decoder layers (an up-scale adds whole layers)."""
        return dataclasses.replace(self, layers=layers,
                                   params=self.params + (layers - self.layers) * self.per_layer)

    @classmethod
    def from_config(cls, config: dict, params: int | None = None, *,
                    where: str = "config.json") -> Shape:
        """From a config.json mapping; `params`, when given, replaces the count (e.g. exact,
        from the weights' headers). A key it needs that is missing or no size is a UserError
        naming it, after `where` (the file)."""
        cfg = text_config(config)
        model_type = str(cfg.get("model_type") or config.get("model_type") or "")
        family = FAMILIES.get(model_type, LLAMA_STYLE)

        def size(key: str, default: int | None = None) -> int:
            return _size(cfg, key, default, where)

        h = size("hidden_size")
        layers = size("num_hidden_layers")
        vocab = size("vocab_size")
        inter = size("intermediate_size", 4 * h)
        heads = size("num_attention_heads", 1)
        head_dim = size("head_dim", family.head_dim or max(1, h // heads))
        q = heads * head_dim
        kv = size("num_key_value_heads", heads) * head_dim
        per_layer = 2 * h * q + 2 * h * kv + 3 * h * inter + family.norms * h
        if family.qkv_bias:
            per_layer += q + 2 * kv
        elif family.attention_bias and cfg.get("attention_bias"):
            per_layer += q + 2 * kv + h
        if family.mlp_bias and cfg.get("mlp_bias"):
            per_layer += 2 * inter + h
        if family.qk_norm:
            per_layer += 2 * head_dim
        embeddings = vocab * h * (1 if tied_embeddings(config) else 2)
        if params is None:
            params = embeddings + h + layers * per_layer
        return cls(params, layers, h, inter, vocab, kv, per_layer, q, embeddings, family.fused,
                   model_type in FAMILIES, model_type)


def text_config(config: dict) -> dict:
    """The language model's part of a config.json (multimodal configs keep it in
    `text_config`)."""
    text = config.get("text_config")
    return text if isinstance(text, dict) else config


def tied_embeddings(config: dict) -> bool:
    """Whether the output head shares the input embeddings: `tie_word_embeddings` of the
    config (the outer one first: the model that holds the head reads it), else of its
    text_config, else the architecture's default (FAMILIES)."""
    for where in (config, text_config(config)):
        if where.get("tie_word_embeddings") is not None:
            return bool(where["tie_word_embeddings"])
    model_type = text_config(config).get("model_type") or config.get("model_type")
    return FAMILIES.get(str(model_type), LLAMA_STYLE).tied


def _size(cfg: dict, key: str, default: int | None, where: str) -> int:
    value = cfg.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise UserError(f"{where} has no `{key}`", fix=_FIX)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _LIMITS[key]:
        raise UserError(f"{where}: `{key}` is {repr(value)[:40]}, not an integer from 1 to "
                        f"{_LIMITS[key]:,}", fix=_FIX)
    return value
