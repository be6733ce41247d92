"""Every way solar-merge grows a model's depth, each written as a stock mergekit config.

- SOLAR's depth up-scaling (arXiv 2312.15166): layers [0, n-m) of copy A + [m, n) of copy B,
  s = 2(n-m) layers. Output layer i is source layer i for i < n-m, else i - (n-2m).
- A range repeat (Yi-9B): [0, B) + [A, n), so layers [A, B) occur twice; SOLAR is the repeat
  of [m, n-m). `scale` multiplies the residual output projections (attention o_proj, MLP
  down_proj) of every layer that occurs twice by ALPHA, in both occurrences (0.5 keeps their
  summed contribution at the original's). Both are `passthrough` configs (`scale` filters).
- Block expansion: K new blocks placed `interleaved` (one after every n/K layers, LLaMA Pro,
  arXiv 2401.02415) or at the `top` (in the gaps between the last K+1 layers, where OpT-DeUS,
  arXiv 2508.08011, found new layers train faster). `identity` blocks copy the layer below with
  o_proj and down_proj zeroed (the model computes what the base did); `average` blocks are
  the mean of the two adjacent layers (Avg-DeUS), a slice merge with `solar_average`.
- Inits that need computing (solar_merge.inits): `lesa` and `aligned-average` blocks (in the
  places `average` blocks take), and `noise` on the layers a layout duplicates. Their new
  layers are written as a checkpoint folder (`layers_dir`), and the config is a passthrough
  slices config that names the base as `base_model` and takes each new layer from that folder.
- Growth presets: `midas` (Saunshi et al., NeurIPS 2024: the middle block of K layers
  duplicated next to itself, one growth stage of MIDAS; for n - K even it is SOLAR's layout
  with m = (n - K) / 2) and `gstack` (Du et al., NeurIPS 2024: the whole model stacked g times,
  g = 4 in the paper), both to a target depth `layers`.

`new_layers(config)` reads back which output layers an up-scale created, from the config alone
(the output folder's mergekit_config.yml): that is what `trainable_layers: new` trains. A
config with a `base_model` counts every layer taken from another model as new.
No torch or mergekit imports here, except in the functions that run a merge.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from solar_merge.checkpoints import ModelInfo, human, is_hub_id, model_info
from solar_merge.errors import UserError
from solar_merge.inits import LAYERS_FILE, Job

# The residual output projections of a Llama/Mistral/Qwen-style block (mergekit matches a
# filter as a substring of the tensor name).
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")
WHERE = ("interleaved", "top")
INIT = ("identity", "average", "lesa", "aligned-average")
BETWEEN = ("average", "lesa", "aligned-average")  # made from the layers below and above
COMPUTED = ("lesa", "aligned-average")            # written by solar_merge.inits
PRESETS = ("midas", "gstack")
GSTACK_FACTOR = 4  # Du et al.: "we fix g = 4"
NEW_LAYERS = "new-layers"  # stands for the checkpoint folder until its place is known


def scale_outputs(alpha: float) -> list[dict]:
    """mergekit `scale` filters: the residual output projections times alpha, the rest 1."""
    return [{"filter": f, "value": alpha} for f in RESIDUAL_OUTPUTS] + [{"value": 1.0}]


ZERO_OUTPUTS = scale_outputs(0.0)


# -- checks: each raises one UserError naming the option and the fix ------------------------

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


def parse_range(text: str) -> tuple[int, int]:
    """`A:B` -> (A, B), an end-exclusive layer range as in mergekit's layer_range."""
    a, sep, b = str(text).partition(":")
    try:
        if not sep:
            raise ValueError
        return int(a), int(b)
    except ValueError:
        raise UserError(f"--repeat {text}: expected A:B, two layer indices (end-exclusive, "
                        "like mergekit's layer_range)",
                        fix="e.g. --repeat 12:22 repeats layers 12..21") from None


def check_repeat(n: int, start: int, end: int) -> None:
    if not (0 <= start < n and start < end <= n):
        why = ("is empty" if start >= end and 0 <= start < n and 0 <= end <= n
               else f"is outside the model's layers [0, {n})")
        raise UserError(f"--repeat {start}:{end} {why}: A:B repeats layers A..B-1, so "
                        f"0 <= A < B <= {n}",
                        fix=f"pick 0 <= A < B <= {n}; `solar-merge seam` recommends a range")


def check_alpha(alpha) -> None:
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0 \
            or alpha == float("inf"):
        raise UserError(f"--scale-overlap {alpha} must be a positive number: it multiplies the "
                        "residual output projections of every repeated layer",
                        fix="use 0.5 to keep a repeated layer's summed contribution at the "
                            "original's (1 changes nothing)")


def check_overlap(n: int, drop: int) -> None:
    """--scale-overlap needs layers that occur twice: [m, n-m) must not be empty."""
    if isinstance(drop, int) and 0 <= drop and 2 * drop >= n:
        raise UserError(f"--scale-overlap with --drop {drop}: copies [0, {n - drop}) and "
                        f"[{drop}, {n}) of a {n}-layer model share no layer, so there is "
                        "nothing to scale",
                        fix=f"use --drop m with m < n/2 = {n / 2:g}, or leave out "
                            "--scale-overlap")


def check_every(n: int, every: int) -> None:
    if not isinstance(every, int) or not 1 <= every <= n or n % every:
        divisors = [d for d in range(1, n + 1) if n % d == 0]
        raise UserError(f"--every {every} must divide the model's {n} layers into equal groups",
                        fix=f"use one of {divisors} (LLaMA Pro: every 4 of 32 -> 40 layers)")


def check_blocks(n: int, blocks: int, where: str, init: str) -> None:
    if where not in WHERE:
        raise UserError(f"--where {where}: expected one of {', '.join(WHERE)}",
                        fix="interleaved (LLaMA Pro) or top (OpT-DeUS)")
    if init not in INIT:
        raise UserError(f"--init {init}: expected one of {', '.join(INIT)}",
                        fix="identity (LLaMA Pro), average (Avg-DeUS), lesa (LESA) or "
                            "aligned-average (OpT-DeUS)")
    if where == "interleaved":
        low = 2 if init in BETWEEN else 1  # a block made from its neighbours needs one above
        ok = [k for k in range(1, n + 1) if n % k == 0 and n // k >= low]
        if not isinstance(blocks, int) or blocks not in ok:
            raise UserError(
                f"--blocks {blocks} with --where interleaved must divide the model's {n} layers "
                "into equal groups (one new block after each group)"
                + (f" of at least 2 layers (an {init} block needs a layer above it)"
                   if init in BETWEEN else ""),
                fix=f"use one of {ok}, or --where top (any K from 1 to {n - 1})")
    elif not isinstance(blocks, int) or not 1 <= blocks <= n - 1:
        raise UserError(f"--blocks {blocks} with --where top must be 1..{n - 1}: each new "
                        f"block fills one gap between the last K+1 of the {n} layers",
                        fix=f"pick K in [1, {n - 1}]")


# -- configs --------------------------------------------------------------------------------

def _config(slices: list[dict], method: str, dtype: str | None, **extra) -> dict:
    config = {"slices": slices, "merge_method": method, **extra}
    if dtype:
        config["dtype"] = dtype
    return config


def _source(model: str, start: int, end: int, scale: list | None = None) -> dict:
    source = {"model": model, "layer_range": [start, end]}
    if scale is not None:
        source["parameters"] = {"scale": scale}
    return source


def stack_config(model: str, *, n_layers: int, start: int, end: int,
                 scale: float | None = None, dtype: str | None = None) -> dict:
    """Layers [0, end) then [start, n): [start, end) occurs twice. With `scale`, the residual
    output projections of both occurrences are multiplied by it."""
    n = n_layers
    if scale is None:
        slices = [{"sources": [_source(model, 0, end)]}, {"sources": [_source(model, start, n)]}]
    else:
        scaled = scale_outputs(scale)
        ranges = [(0, start, None), (start, end, scaled), (start, end, scaled), (end, n, None)]
        slices = [{"sources": [_source(model, a, b, s)]} for a, b, s in ranges if a < b]
    return _config(slices, "passthrough", dtype)


def dus_config(model: str, drop: int, *, n_layers: int, dtype: str | None = None,
               allow_repeat: bool = False, scale: float | None = None) -> dict:
    """The mergekit passthrough config for a DUS of `model` (n_layers layers) dropping `drop`."""
    if scale is not None:
        check_alpha(scale)
        check_overlap(n_layers, drop)
    check_drop(n_layers, drop, allow_repeat=allow_repeat)
    return stack_config(model, n_layers=n_layers, start=drop, end=n_layers - drop, scale=scale,
                        dtype=dtype)


def repeat_config(model: str, start: int, end: int, *, n_layers: int,
                  dtype: str | None = None, scale: float | None = None) -> dict:
    """Repeat layers [start, end) once (Yi-9B style): n + (end - start) layers."""
    if scale is not None:
        check_alpha(scale)
    check_repeat(n_layers, start, end)
    return stack_config(model, n_layers=n_layers, start=start, end=end, scale=scale,
                        dtype=dtype)


def block_positions(n: int, blocks: int, where: str = "interleaved",
                    init: str = "identity") -> list[int]:
    """The base layers p after which a new block goes (output: base p, then the new block)."""
    check_blocks(n, blocks, where, init)
    if where == "top":
        return list(range(n - blocks - 1, n - 1))
    group = n // blocks
    after = [(g + 1) * group - 1 for g in range(blocks)]
    if init in BETWEEN:  # the top group's block goes below the top layer: it needs p + 1
        after[-1] = n - 2
    return after


def twin(model: str) -> str:
    """Another spelling of the local folder `model`: mergekit 0.1.5 refuses the same model
    twice in one slice ("Duplicate merge inputs"), but merges two spellings of one folder.
    Built from the real path, so that `..` cannot step out of a symlinked folder."""
    real = os.path.realpath(model)
    return os.path.join(real, "..", os.path.basename(real))


def expand_config(model: str, every: int | None = None, *, n_layers: int,
                  dtype: str | None = None, blocks: int | None = None,
                  where: str = "interleaved", init: str = "identity") -> dict:
    """n + K layers: K new blocks after the base layers block_positions() names. `every` is
    the LLaMA Pro spelling of `blocks = n / every, where = interleaved`."""
    n = n_layers
    if every is not None:
        check_every(n, every)
        blocks, where = n // every, "interleaved"
    if init in BETWEEN and is_hub_id(model):
        why = ("the slice merge names the model twice, which mergekit allows for a folder only"
               if init == "average" else "its new layers are computed from the weights")
        raise UserError(f"--init {init} needs a local copy of {model}: {why}",
                        fix=f"download it first (hf download {model} --local-dir DIR) and "
                            "expand DIR")
    after = block_positions(n, blocks, where, init)
    slices, start = [], 0
    for p in after:
        slices.append({"sources": [_source(model, start, p + 1)]})
        if init == "identity":
            slices.append({"sources": [_source(model, p, p + 1, ZERO_OUTPUTS)]})
        else:
            slices.append({"sources": [_source(model, p, p + 1),
                                       _source(twin(model), p + 1, p + 2)]})
        start = p + 1
    if start < n:
        slices.append({"sources": [_source(model, start, n)]})
    if init == "identity":
        return _config(slices, "passthrough", dtype)
    # weight 1 everywhere: one-source slices stay exact copies, two-source slices the mean.
    # (lesa and aligned-average blocks sit where these means do: take_new_layers() replaces
    # them by the computed layers.)
    return _config(slices, "solar_average", dtype, parameters={"weight": 1.0})


def preset_config(model: str, preset: str, *, n_layers: int, layers: int | None,
                  dtype: str | None = None, scale: float | None = None) -> dict:
    """A growth preset to `layers` output layers (see the module doc)."""
    n = n_layers
    if preset not in PRESETS:
        raise UserError(f"--preset {preset}: expected one of {', '.join(PRESETS)}",
                        fix="midas (the middle block duplicated) or gstack (the whole model "
                            "stacked)")
    if preset == "midas":
        if not isinstance(layers, int) or not n < layers <= 2 * n:
            raise UserError(f"--preset midas needs --layers S with {n} < S <= {2 * n}: the "
                            f"middle block of S - {n} layers is duplicated",
                            fix=f"e.g. --layers {n + n // 4 * 2}")
        k = layers - n
        start = (n - k) // 2
        return repeat_config(model, start, start + k, n_layers=n, dtype=dtype, scale=scale)
    layers = GSTACK_FACTOR * n if layers is None else layers
    if not isinstance(layers, int) or layers < 2 * n or layers % n:
        raise UserError(f"--preset gstack --layers {layers}: G_stack stacks the whole {n}-layer "
                        "model g times, so S must be a multiple of it, at least twice",
                        fix=f"use --layers {GSTACK_FACTOR * n} (g = {GSTACK_FACTOR}, the "
                            f"paper's) or {2 * n} (g = 2)")
    if scale is not None:
        raise UserError("--scale-overlap does not go with --preset gstack: every layer occurs "
                        f"{layers // n} times", fix="leave out --scale-overlap")
    slices = [{"sources": [_source(model, 0, n)]} for _ in range(layers // n)]
    return _config(slices, "passthrough", dtype)


# -- reading a config back ------------------------------------------------------------------

def output_layers(config: dict) -> list[list[tuple[str, int]]]:
    """For each output layer, its (model, source layer) inputs, in order; a model as its
    normalised path (mergekit's expanded form read, a `+lora` suffix dropped)."""
    return [[(_path(model), layer) for model, layer, _ in inputs]
            for inputs in output_layers_with_parameters(config)]


def _path(ref) -> str:
    if isinstance(ref, dict):  # mergekit's expanded form {model: {path: ...}}
        ref = (ref.get("model") or {}).get("path", "")
    ref = str(ref).partition("+")[0]
    return os.path.normpath(ref) if not is_hub_id(ref) else ref


def new_layers(config: dict) -> list[int]:
    """Output layers the up-scale created: a (model, layer) seen before (the second copy of a
    repeated layer, an identity block), a layer merged from several sources (an average
    block), or, when the config names a `base_model`, a layer taken from another model (a
    computed one). The first copy of a layer is the base one, whatever comes before it. Empty
    for a `models:` merge, which keeps the layout."""
    base = _path(config["base_model"]) if config.get("base_model") else None
    seen, new = set(), []
    for i, inputs in enumerate(output_layers(config)):
        if len(inputs) > 1 or inputs[0] in seen or (base and inputs[0][0] != base):
            new.append(i)
        if len(inputs) == 1:  # a mean copies neither of its inputs
            seen.add(inputs[0])
    return new


def take_new_layers(config: dict, model: str, layers_dir: str) -> tuple[dict, list]:
    """`config` (a layout of `model`) as a passthrough config that takes its j-th new layer
    from layer j of the checkpoint folder `layers_dir`, keeping each layer's parameters (an
    identity block's zeroed outputs, a scaled overlap); and, per new layer, the base layers it
    is made from: (p,) for a copy, (p, p+1) for a block between two layers."""
    new = set(new_layers(config))
    rows, sources = [], []
    for i, inputs in enumerate(output_layers_with_parameters(config)):
        if i in new:
            params = inputs[0][2] if len(inputs) == 1 else None
            rows.append((layers_dir, len(sources), params))
            sources.append(tuple(layer for _, layer, _ in inputs))
        else:
            rows.append(inputs[0])
    slices = []
    for ref, layer, params in rows:
        last = slices[-1]["sources"][0] if slices else None
        if last and last["model"] == ref and last.get("parameters") == params \
                and last["layer_range"][1] == layer:
            last["layer_range"][1] += 1
            continue
        source = {"model": ref, "layer_range": [layer, layer + 1]}
        if params:
            source["parameters"] = params
        slices.append({"sources": [source]})
    out = {"slices": slices, "merge_method": "passthrough", "base_model": model}
    if config.get("dtype"):
        out["dtype"] = config["dtype"]
    return out, sources


def output_layers_with_parameters(config: dict) -> list[list[tuple]]:
    """For each output layer, its (model as written, source layer, source parameters) inputs,
    in order."""
    out = []
    for s in config.get("slices") or []:
        sources = s.get("sources") or []
        if not sources:
            continue
        a, b = sources[0]["layer_range"]
        out += [[(src["model"], src["layer_range"][0] + k, src.get("parameters"))
                 for src in sources] for k in range(b - a)]
    return out


def new_layers_of(folder) -> list[int] | None:
    """new_layers() of the mergekit_config.yml mergekit wrote into `folder`, None without one
    (a folder not made by a merge, e.g. a training stage's output)."""
    from solar_merge.readers import read_yaml

    path = Path(folder) / "mergekit_config.yml"
    if not path.is_file():
        return None
    fix = "restore it from the up-scale command, or list trainable_layers as indices"
    try:
        config = read_yaml(path, what="mergekit config")
    except UserError as e:  # not UTF-8, too deep, an alias bomb: the fix says what to do here
        raise UserError(e.message.split("\n  fix:")[0], fix=fix) from None
    if not isinstance(config, dict):
        return None
    base = path.parent

    def local(ref):  # relative paths: relative to the file
        return str(base / ref) if isinstance(ref, str) and not os.path.isabs(ref) \
            and not is_hub_id(ref) else ref

    try:  # a damaged file (a slice that is not a mapping, a range that is not two numbers)
        for s in config.get("slices") or []:  # is named, not a traceback
            for src in s.get("sources") or []:
                if isinstance(src.get("model"), str):
                    src["model"] = local(src["model"])
        if isinstance(config.get("base_model"), str):
            config["base_model"] = local(config["base_model"])
        return new_layers(config)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError) as e:
        raise UserError(f"{path} is not a mergekit config of slices solar-merge can read "
                        f"({type(e).__name__}: {str(e)[:120]})", fix=fix) from None


def resolve_new_layers(model: str) -> list[int] | str:
    """`trainable_layers: new` for a model folder: the layers its up-scale created, read from
    the mergekit_config.yml in it. A folder that does not exist yet (a later stage of a
    recipe) stays `new`: the recipe planner resolves it from the stage that makes it."""
    if not os.path.isabs(model) and is_hub_id(model):
        raise UserError(f"trainable_layers: new needs a local up-scaled model, not the Hub id "
                        f"{model}", fix="list the layer indices, or download the model first")
    if not os.path.isdir(model):
        return "new"
    layers = new_layers_of(model)
    if layers is None:
        raise UserError(f"trainable_layers: new, but {model} holds no mergekit_config.yml, so "
                        "which layers an up-scale created is not known (a training stage's "
                        "output does not carry it)",
                        fix="train the up-scale's output folder itself, run the stages as one "
                            "recipe (the planner follows the up-scale through train stages), "
                            "or list the indices")
    if not layers:
        raise UserError(f"trainable_layers: new, but the mergekit_config.yml of {model} "
                        "creates no layer (every output layer is its inputs' first copy)",
                        fix="list the layer indices to train, or remove trainable_layers")
    return layers


def layer_count(config: dict) -> int:
    return len(output_layers(config))


# -- one entry point for the CLI, recipes and the planner -----------------------------------

def build_config(model: str, n_layers: int, **options) -> dict:
    """The mergekit config of one up-scale, from the options of `dus`/`expand` (or a recipe's
    `upscale:` stage): build_upscale's config. Raises UserError on any bad option, before
    anything is written."""
    return build_upscale(model, n_layers, **options)[0]


def check_noise(noise, seed, init: str | None) -> None:
    if noise is not None:
        if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not noise > 0 \
                or noise == float("inf"):
            raise UserError(f"--noise {noise} must be a positive number: the standard deviation "
                            "of the noise relative to each weight matrix's own",
                            fix="e.g. --noise 0.01 (1% of each matrix's standard deviation)")
        if init in BETWEEN:
            raise UserError(f"--noise breaks the symmetry of duplicated layers, and --init "
                            f"{init} duplicates none (its blocks are made from two layers)",
                            fix="use --noise with dus, a --preset, or identity blocks")
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise UserError(f"--seed {seed} must be a whole number >= 0",
                            fix="e.g. --seed 0")
        if noise is None and init != "lesa":
            raise UserError("--seed seeds --noise and LESA's predictor; this up-scale draws "
                            "nothing at random", fix="add --noise STD, or leave out --seed")


def build_upscale(model: str, n_layers: int, *, method: str = "dus", drop: int | None = None,
                  repeat=None, scale_overlap: float | None = None, every: int | None = None,
                  blocks: int | None = None, where: str | None = None, init: str | None = None,
                  preset: str | None = None, layers: int | None = None,
                  noise: float | None = None, seed: int | None = None, dtype: str | None = None,
                  layers_dir=None) -> tuple[dict, Job | None]:
    """The mergekit config of one up-scale, and the new layers it takes from the checkpoint
    folder `layers_dir` (a Job for solar_merge.inits; None when the config copies, scales and
    averages the base alone). Raises UserError on any bad option, before anything is written."""
    check_noise(noise, seed, init)
    layout = _layout(model, n_layers, method=method, drop=drop, repeat=repeat,
                     scale_overlap=scale_overlap, every=every, blocks=blocks, where=where,
                     init=init, preset=preset, layers=layers, dtype=dtype)
    if init not in COMPUTED and noise is None:
        return layout, None
    if is_hub_id(model):
        raise UserError(f"--{'init ' + init if init in COMPUTED else 'noise'} needs a local "
                        f"copy of {model}: the new layers are computed from its weights",
                        fix=f"download it first (hf download {model} --local-dir DIR)")
    config, sources = take_new_layers(layout, model, str(layers_dir or NEW_LAYERS))
    rows = output_layers(config)
    outer = any(rows[i][0][0] != _path(model) for i in (0, -1))
    job = Job(init if init in COMPUTED else "noise", tuple(sources), noise, seed or 0, outer)
    return config, job


def _layout(model: str, n_layers: int, *, method: str, drop, repeat, scale_overlap, every,
            blocks, where, init, preset, layers, dtype) -> dict:
    """Where every output layer comes from: the config of build_upscale before computed layers
    take the places of the new ones."""
    if method != "dus" and (preset is not None or layers is not None):
        raise UserError("--preset and --layers are growth presets of dus",
                        fix="solar-merge dus MODEL --preset midas --layers S")
    if method in ("dus", "repeat") and init is not None:
        raise UserError(f"--init {init} chooses how expand makes its new blocks; {method} "
                        "copies existing layers",
                        fix="use solar-merge expand MODEL --blocks K --init ..., or --noise "
                            "STD --seed S to break the symmetry of copied layers")
    if method == "repeat":  # the naive 2n repeat, a baseline
        return dus_config(model, 0, n_layers=n_layers, dtype=dtype, allow_repeat=True)
    if method == "dus":
        if (layers is not None) and preset is None:
            raise UserError("--layers S goes with --preset midas|gstack",
                            fix="add --preset, or use --drop M / --repeat A:B")
        if sum(x is not None for x in (drop, repeat, preset)) != 1:
            raise UserError("dus needs exactly one of --drop M (SOLAR), --repeat A:B (one "
                            "range) and --preset midas|gstack",
                            fix="e.g. --drop 8, --repeat 12:22, or --preset midas --layers 48")
        if preset is not None:
            return preset_config(model, preset, n_layers=n_layers, layers=layers, dtype=dtype,
                                 scale=scale_overlap)
        if repeat is not None:
            if isinstance(repeat, str):
                start, end = parse_range(repeat)
            elif isinstance(repeat, (list, tuple)) and len(repeat) == 2 and all(
                    isinstance(x, int) for x in repeat):
                start, end = repeat
            else:
                raise UserError(f"repeat: {repeat!r} is not a layer range",
                                fix='write "A:B" or [A, B] (end-exclusive)')
            return repeat_config(model, start, end, n_layers=n_layers, dtype=dtype,
                                 scale=scale_overlap)
        return dus_config(model, drop, n_layers=n_layers, dtype=dtype, scale=scale_overlap)
    if (every is None) == (blocks is None):
        raise UserError("expand needs exactly one of --every N and --blocks K",
                        fix="e.g. --every 4 (LLaMA Pro), or --blocks 8 --where top")
    if every is not None and (where or init):
        raise UserError("--every N is LLaMA Pro's layout (identity blocks, interleaved); "
                        "--where and --init go with --blocks K",
                        fix="replace --every N by --blocks n/N")
    return expand_config(model, every, n_layers=n_layers, dtype=dtype, blocks=blocks,
                         where=where or "interleaved", init=init or "identity")


def config_yaml(config: dict, model: str, info: ModelInfo, title: str, *,
                out_name: str = "upscale.yaml", job: Job | None = None) -> str:
    """The config as YAML, opening with the command that runs it."""
    name = Path(out_name).name
    command = (f"# mergekit-yaml {name} OUT --copy-tokenizer --clone-tensors"
               f"   (or: solar-merge yaml {name} OUT)\n")
    if config["merge_method"] == "solar_average":
        command += ("# solar_average is solar-merge's method: installing solar-merge registers "
                    "it with stock mergekit.\n")
    head = (command + f"# {title} of {model}: {info.n_layers} -> {layer_count(config)} "
            f"layers; new layers {_ranges(new_layers(config))}\n")
    if config["merge_method"] == "solar_average":
        head += ("# The second source of each average names the same folder by another "
                 "spelling (DIR/../NAME):\n# mergekit 0.1.5 refuses one model twice in a "
                 "slice.\n")
    if job is not None:
        folder = next(src["model"] for s in config["slices"] for src in s["sources"]
                      if src["model"] != config["base_model"])
        head += (f"# The new layers ({job.init}) are read from {folder}: solar-merge computed "
                 f"them from the base's weights\n# (how: {Path(folder) / LAYERS_FILE}).\n")
    return head + yaml.safe_dump(config, sort_keys=False, default_flow_style=None)


def title(method: str = "dus", *, drop=None, repeat=None, scale_overlap=None, every=None,
          blocks=None, where=None, init=None, preset=None, layers=None, noise=None,
          seed=None) -> str:
    """A short human name for an up-scale, for config headers and cards."""
    noisy = f", noise {noise:g} (seed {seed or 0})" if noise is not None else ""
    if method == "repeat":
        return "Naive 2n repeat" + noisy
    if method == "dus":
        if repeat is not None and not isinstance(repeat, str):
            repeat = f"{repeat[0]}:{repeat[1]}"
        what = (f"MIDAS growth to {layers} layers" if preset == "midas"
                else f"G_stack growth to {layers or 'g=4 x'} layers" if preset == "gstack"
                else f"Depth up-scaling (SOLAR), m={drop}" if repeat is None
                else f"Range repeat {repeat}")
        return what + (f", repeated layers' o_proj/down_proj x{scale_overlap:g}"
                       if scale_overlap is not None else "") + noisy
    if every is not None:
        return f"Block expansion (LLaMA Pro), identity block every {every}" + noisy
    return (f"Block expansion, {blocks} {init or 'identity'} blocks, {where or 'interleaved'}"
            + (f", seed {seed or 0}" if init == "lesa" else "") + noisy)


def _ranges(layers: list[int]) -> str:
    """[3, 4, 5, 9] -> '3-5, 9'."""
    parts, run = [], []
    for i in layers:
        if run and i != run[-1] + 1:
            parts.append(run)
            run = []
        run.append(i)
    if run:
        parts.append(run)
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in parts) or "none"


def describe_config(config: dict, model: str, info: ModelInfo, title_text: str,
                    job: Job | None = None) -> str:
    """The layer map in ranges, the new layers and the parameter counts, for people."""
    rows = output_layers(config)
    n, s = info.n_layers, len(rows)
    base = _path(config["base_model"]) if job is not None else None
    seen: set = set()
    runs: list[list] = []  # [kind, first output, first source, length]
    for i, inputs in enumerate(rows):
        layers = [layer for _, layer in inputs]
        if base and inputs[0][0] != base:  # a computed layer: what it is made from
            layers = list(job.sources[inputs[0][1]])
            kind = "between" if len(layers) > 1 else "noisy"
        else:
            kind = "mean" if len(inputs) > 1 else "copy" if inputs[0] in seen else "layer"
        if len(inputs) == 1:
            seen.add(inputs[0])
        last = runs[-1] if runs else None
        if last and kind not in ("mean", "between") and last[0] == kind \
                and layers[0] == last[2] + last[3]:
            last[3] += 1
        else:
            runs.append([kind, i, layers[0], 1])
    lines = [f"{model}: {n} layers -> {s} layers ({title_text})"]
    for kind, first, src, length in runs:
        outs = f"[{first}, {first + length})" if length > 1 else f"{first}"
        srcs = f"layers [{src}, {src + length})" if length > 1 else f"layer {src}"
        what = {"layer": srcs, "copy": f"second copy of {srcs}",
                "mean": f"mean of layers {src} and {src + 1}",
                "noisy": f"{srcs} + noise (computed)",
                "between": f"{job.init if job else ''} block between layers {src} and "
                           f"{src + 1} (computed)"}[kind]
        lines.append(f"  output {outs} <- {what}")
    scaled = _scaled_layers(config)
    zeroed = _scaled_layers(config, zero=True)
    if scaled:
        lines.append(f"  o_proj/down_proj scaled in output layers {_ranges(scaled)}")
    if zeroed:
        lines.append(f"  o_proj/down_proj zeroed (identity blocks) in {_ranges(zeroed)}")
    lines.append(f"  new layers (trainable_layers: new): {_ranges(new_layers(config))}")
    lines.append(f"  parameters: {human(info.params)} -> {human(info.params_with_layers(s))}")
    return "\n".join(lines)


def _scaled_layers(config: dict, zero: bool = False) -> list[int]:
    out, i = [], 0
    for s in config.get("slices") or []:
        a, b = s["sources"][0]["layer_range"]
        scale = (s["sources"][0].get("parameters") or {}).get("scale")
        if scale is not None and (scale == ZERO_OUTPUTS) == zero:
            out += list(range(i, i + b - a))
        i += b - a
    return out


def check_residual_names(info: ModelInfo, config: dict) -> None:
    """`scale` filters match tensor names; a model that names its residual projections
    otherwise would silently get nothing scaled (mergekit ignores filters that match nothing)."""
    if not any(s["sources"][0].get("parameters") for s in config.get("slices") or []):
        return
    folder = Path(info.source)
    if not folder.is_dir():
        return  # a Hub model: its tensor names are not known without downloading
    from solar_merge.checkpoints import safetensors_headers

    names = list(safetensors_headers(folder))
    missing = [f for f in RESIDUAL_OUTPUTS if names and not any(f in n for n in names)]
    if missing:
        raise UserError(f"{info.source} has no tensors named *{missing[0]}*: its residual "
                        "output projections are named differently, so they cannot be scaled",
                        fix="scaled overlaps and identity blocks support Llama, Mistral, Qwen "
                            "and other models with o_proj/down_proj")


# -- the CLI's and the recipes' entry points ------------------------------------------------

@dataclass
class Planned:
    """One up-scale, validated: its mergekit config, YAML text and description."""
    model: str
    info: ModelInfo
    config: dict
    title: str
    kind: str
    job: Job | None = None          # new layers to compute into layers_dir first
    layers_dir: Path | None = None  # None: beside the output folder, chosen by run()
    spec: dict | None = None        # the options it was built from

    def yaml(self, out_name: str = "upscale.yaml") -> str:
        return config_yaml(self.config, self.model, self.info, self.title, out_name=out_name,
                           job=self.job)

    def describe(self) -> str:
        return describe_config(self.config, self.model, self.info, self.title, self.job)

    def placed(self, layers_dir) -> "Planned":
        """The same up-scale with its computed layers in `layers_dir`."""
        layers_dir = Path(layers_dir).absolute()
        config, job = build_upscale(self.info.source, self.info.n_layers, dtype=self.info.dtype,
                                    layers_dir=layers_dir, **self.spec)
        return Planned(self.model, self.info, config, self.title, self.kind, job, layers_dir,
                       self.spec)

    def write_layers(self) -> Path:
        """Compute the new layers into layers_dir (a no-op when they are there already)."""
        from solar_merge.inits import write_layers

        return write_layers(self.info.source, self.job, self.layers_dir)

    def run(self, out_dir, *, base_dir=None, options: dict | None = None,
            fast: bool = True, digest: str | None = None) -> Path:
        """Write the up-scale into `out_dir` (solar_merge.merging); `digest` marks it
        complete (a recipe's stage hash; default: merging's hash of config and inputs)."""
        planned = self
        if self.job is not None:
            planned = self if self.layers_dir else self.placed(layers_dir_for(out_dir))
            planned.write_layers()
        check_residual_names(self.info, planned.config)
        return run_config(planned.config, out_dir, base_dir=base_dir, options=options,
                          label=f"{self.title} of {self.model}", kind=self.kind, fast=fast,
                          digest=digest)


def layers_dir_for(out) -> Path:
    """Where an up-scale into `out` (a folder, or a config file) keeps its computed layers:
    `<out>.layers` beside it (a config file's suffix dropped)."""
    out = Path(out).absolute()
    name = out.stem if out.suffix in (".yaml", ".yml") else out.name
    return out.parent / f"{name}.layers"


SPEC_KEYS = ("drop", "repeat", "scale_overlap", "every", "blocks", "where", "init", "preset",
             "layers", "noise", "seed")


def spec_options(spec: dict) -> dict:
    """The up-scale options of a recipe's `upscale:` stage (None: not given)."""
    return {k: spec[k] for k in SPEC_KEYS if spec.get(k) is not None}


def plan_upscale(model: str, method: str = "dus", *, base_dir=None, layers_dir=None,
                 **spec) -> Planned:
    """Read MODEL's config.json (no weights) and build the config `spec` asks for: the
    options of `dus`/`expand` or of a recipe's `upscale:` stage (SPEC_KEYS). Computed layers
    go to `layers_dir` (default: chosen by Planned.run beside its output folder). Raises
    UserError before anything is written."""
    spec = {k: v for k, v in spec.items() if v is not None}
    info = model_info(model, base_dir)
    layers_dir = Path(layers_dir).absolute() if layers_dir else None
    config, job = build_upscale(info.source, info.n_layers, method=method, dtype=info.dtype,
                                layers_dir=layers_dir, **spec)
    kind = "expand" if method == "expand" else "dus"
    return Planned(model, info, config, title(method, **spec), kind, job, layers_dir,
                   {"method": method, **spec})


# -- running --------------------------------------------------------------------------------

def run_config(config: dict, out_dir, *, base_dir=None, options: dict | None = None,
               label: str = "up-scale", kind: str = "upscale", fast: bool = True,
               digest: str | None = None) -> Path:
    """Check and run an up-scale config through solar-merge's mergekit runner (atomic,
    resumable): by copying tensor bytes when it only slices and stacks
    (solar_merge.stacking), unless `fast` is False."""
    from solar_merge import merging

    resolved = merging.check_config(config, base_dir, label=label)
    return merging.run(resolved, out_dir, options=options, kind=kind, fast=fast, digest=digest)
