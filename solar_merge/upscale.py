"""Depth up-scaling (SOLAR, arXiv 2312.15166) as a stock mergekit passthrough config.

From an n-layer model keep layers [0, n-m) of copy A and [m, n) of copy B and stack them:
s = 2(n-m) layers. Output layer i is source layer i for i < n-m, else i - (n-2m).
"""

from pathlib import Path

import yaml

from solar_merge.checkpoints import ModelInfo, human, model_info
from solar_merge.errors import UserError


def check_drop(n: int, m: int, *, allow_repeat: bool = False) -> None:
    """1 <= m < n/2: m >= 1 so a seam is removed (m = 0 repeats all 2n layers, which the paper
    shows is too wide a seam to recover from); m < n/2 so the result is deeper than the input
    (s = 2(n-m) > n)."""
    low = 0 if allow_repeat else 1
    if not isinstance(m, int) or not low <= m or not 2 * m < n:
        raise UserError(
            f"--drop {m} is out of range for a {n}-layer model: allowed {low} <= m < n/2 = "
            f"{n / 2:g} (m layers are dropped at the seam of each copy; s = 2(n-m) must exceed "
            f"n, and m = 0 repeats all {2 * n} layers, which SOLAR shows does not recover)",
            fix=f"pick m in [1, {(n - 1) // 2}]; SOLAR uses m = n/4 (8 of 32 layers)")


def layer_map(n: int, m: int) -> list[tuple[int, str, int]]:
    """[(output layer, copy, source layer)] for a DUS of an n-layer model dropping m."""
    keep = n - m
    return ([(i, "A", i) for i in range(keep)]
            + [(keep + j, "B", m + j) for j in range(keep)])


def dus_config(model: str, drop: int, *, n_layers: int, dtype: str | None = None,
               allow_repeat: bool = False) -> dict:
    """The mergekit passthrough config for a DUS of `model` (n_layers layers) dropping `drop`."""
    check_drop(n_layers, drop, allow_repeat=allow_repeat)
    config = {
        "slices": [
            {"sources": [{"model": model, "layer_range": [0, n_layers - drop]}]},
            {"sources": [{"model": model, "layer_range": [drop, n_layers]}]},
        ],
        "merge_method": "passthrough",
    }
    if dtype:
        config["dtype"] = dtype
    return config


def dus_yaml(model: str, drop: int, info: ModelInfo, *, out_name: str = "dus.yaml") -> str:
    """The config as YAML, opening with the command that runs it (stock mergekit works)."""
    out_name = Path(out_name).name
    n = info.n_layers
    s = 2 * (n - drop)
    head = (f"# mergekit-yaml {out_name} OUT --copy-tokenizer   (or: solar-merge yaml {out_name} OUT)\n"
            f"# Depth up-scaling (SOLAR, arXiv 2312.15166) of {model}: n={n}, m={drop} -> s={s}"
            " layers.\n"
            f"# Copy A keeps layers [0, {n - drop}), copy B keeps [{drop}, {n}); ranges are"
            " end-exclusive.\n")
    body = dus_config(model, drop, n_layers=n, dtype=info.dtype)
    return head + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def describe(model: str, drop: int, info: ModelInfo) -> str:
    """The layer map and parameter counts, for people."""
    n, s = info.n_layers, 2 * (info.n_layers - drop)
    rows = layer_map(n, drop)
    lines = [f"{model}: {n} layers -> {s} layers (drop m={drop} at the seam of each copy)",
             f"  output [0, {n - drop}) <- copy A layers [0, {n - drop})",
             f"  output [{n - drop}, {s}) <- copy B layers [{drop}, {n})",
             (f"  seam: output {n - drop - 1} (A{rows[n - drop - 1][2]}) -> output {n - drop} "
             f"(B{rows[n - drop][2]})"),
             f"  parameters: {human(info.params)} -> {human(info.params_with_layers(s))}"]
    return "\n".join(lines)


def upscale(model: str, drop: int, out_dir, *, base_dir=None, options: dict | None = None,
            allow_repeat: bool = False) -> Path:
    """Run the DUS through solar-merge's mergekit runner (atomic, resumable, fixed)."""
    from solar_merge.merging import merge

    info = model_info(model, base_dir)
    config = dus_config(info.source, drop, n_layers=info.n_layers, dtype=info.dtype,
                        allow_repeat=allow_repeat)
    return merge(config, out_dir, base_dir=base_dir, options=options,
                 label=f"DUS of {model}", kind="dus")


# -- LLaMA Pro block expansion (Wu et al., 2024, arXiv 2401.02415) --
# After every `every` layers, insert a copy of the group's last block whose output projections
# (attention o_proj, MLP down_proj) are scaled to zero: the new block adds nothing to the
# residual stream, so the expanded model computes exactly what the base did until trained.

ZERO_OUTPUTS = [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0},
                {"value": 1.0}]


def check_every(n: int, every: int) -> None:
    if not isinstance(every, int) or not 1 <= every <= n or n % every:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise UserError(f"--every {every} must divide the model's {n} layers into equal groups",
                        fix=f"use one of {divisors} (LLaMA Pro: every 4 of 32 -> 40 layers)")


def expand_config(model: str, every: int, *, n_layers: int, dtype: str | None = None) -> dict:
    """A stock mergekit passthrough config: n + n/every layers, new blocks zero-output."""
    check_every(n_layers, every)
    slices = []
    for start in range(0, n_layers, every):
        end = start + every
        slices.append({"sources": [{"model": model, "layer_range": [start, end]}]})
        slices.append({"sources": [{"model": model, "layer_range": [end - 1, end],
                                    "parameters": {"scale": ZERO_OUTPUTS}}]})
    config = {"slices": slices, "merge_method": "passthrough"}
    if dtype:
        config["dtype"] = dtype
    return config


def expand_yaml(model: str, every: int, info: ModelInfo, *, out_name: str = "expand.yaml"
                ) -> str:
    """The expansion config as YAML, opening with the command that runs it."""
    n = info.n_layers
    config = expand_config(model, every, n_layers=n, dtype=info.dtype)
    head = (f"# mergekit-yaml {Path(out_name).name} OUT --copy-tokenizer --clone-tensors\n"
            f"# LLaMA Pro block expansion of {model}: {n} -> {n + n // every} layers; new "
            f"blocks (o_proj, down_proj zeroed) at {new_block_layers(n, every)}\n")
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def new_block_layers(n_layers: int, every: int) -> list[int]:
    """Output indices of the inserted blocks (the ones to train, LLaMA Pro style)."""
    return [(g + 1) * (every + 1) - 1 for g in range(n_layers // every)]


def expand(model: str, every: int, out_dir, *, base_dir=None, options: dict | None = None
           ) -> Path:
    from solar_merge.merging import merge

    info = model_info(model, base_dir)
    config = expand_config(info.source, every, n_layers=info.n_layers, dtype=info.dtype)
    return merge(config, out_dir, base_dir=base_dir, options=options,
                 label=f"block expansion of {model}", kind="expand")
