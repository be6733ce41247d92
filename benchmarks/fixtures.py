"""Checkpoints the benchmarks run on, built locally and cached in benchmarks/cache/.

- mistral_7b_shape(): random bf16 weights with Mistral-7B's shapes, written shard by shard
  (never the whole model in RAM).
- smollm2(): the embedded SmolLM2-135M-Instruct as fp32 safetensors
  (solar_merge.embedded.embedded_model(), cached under ~/.cache/solar-merge).
- perturbed(src): a copy of `src` with small noise added to every tensor (a second model).
"""

import json
import shutil
import sys
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"


def mistral_7b_shape(folder: Path | None = None, shard_bytes: int = 5 * 10**9) -> Path:
    import torch
    from transformers import MistralConfig

    folder = Path(folder or CACHE / "mistral-7b-shape")
    if (folder / "model.safetensors.index.json").is_file() and (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = MistralConfig(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                        num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                        tie_word_embeddings=False, dtype="bfloat16",
                        architectures=["MistralForCausalLM"])  # mergekit needs architectures
    h, i, kv = 4096, 14336, 1024
    bf = torch.bfloat16
    gen = torch.Generator().manual_seed(0)

    def w(*shape):
        return torch.empty(*shape, dtype=bf).normal_(0, 0.02, generator=gen)

    def groups():
        yield {"model.embed_tokens.weight": w(32000, h)}
        for n in range(32):
            p = f"model.layers.{n}."
            yield {p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
                   p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
                   p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
                   p + "mlp.down_proj.weight": w(h, i),
                   p + "input_layernorm.weight": torch.ones(h, dtype=bf),
                   p + "post_attention_layernorm.weight": torch.ones(h, dtype=bf)}
        yield {"model.norm.weight": torch.ones(h, dtype=bf), "lm_head.weight": w(32000, h)}

    shards, current, size, total = [], {}, 0, 0
    for g in groups():
        gsize = sum(t.numel() * t.element_size() for t in g.values())
        if current and size + gsize > shard_bytes:
            shards.append(current)
            _flush(tmp, shards, len(shards))
            current, size = {}, 0
        current.update(g)
        size += gsize
        total += gsize
    shards.append(current)
    _flush(tmp, shards, len(shards))
    n = len(shards)
    weight_map = {}
    for k, names in enumerate(shards, 1):
        old = tmp / f"model-{k:05d}.safetensors"
        new = tmp / f"model-{k:05d}-of-{n:05d}.safetensors"
        old.rename(new)
        weight_map.update({name: new.name for name in names})
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    cfg.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def _flush(tmp: Path, shards: list, k: int) -> None:
    """Write shard k and drop its tensors (keep only the names)."""
    from safetensors.torch import save_file

    tensors = shards[-1]
    save_file(tensors, str(tmp / f"model-{k:05d}.safetensors"), metadata={"format": "pt"})
    shards[-1] = list(tensors)
    print(f"  wrote shard {k}", file=sys.stderr, flush=True)


def smollm2() -> Path:
    """The embedded SmolLM2 as fp32 safetensors."""
    from solar_merge.embedded import embedded_model

    return Path(embedded_model())


def perturbed(src: Path, scale: float = 0.1) -> Path:
    """`src` with N(0, scale * std) noise added to every float tensor, as a second model.

    scale 0.1 keeps rows at cos ~ 0.995 < 0.9995, so SLERP takes its real (not lerp) path."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = CACHE / (Path(src).name + "-perturbed")
    if (folder / "config.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors", "*.index.json",
                                                             "solar_merge_complete.json"))
    gen = torch.Generator().manual_seed(1)
    for f in sorted(Path(src).glob("*.safetensors")):
        tensors = load_file(str(f))
        for k, t in tensors.items():
            if t.is_floating_point():
                noise = torch.randn(t.shape, generator=gen, dtype=torch.float32)
                tensors[k] = (t.float() + noise * (scale * float(t.float().std() + 1e-8))).to(t.dtype)
        save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
    for f in Path(src).glob("*.index.json"):
        shutil.copy(f, tmp / f.name)
    tmp.rename(folder)
    return folder


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what in ("smollm2", "all"):
        print(perturbed(smollm2()))
    if what in ("mistral", "all"):
        print(mistral_7b_shape())
