"""Decide the up-scaling seam from data, and size a model from its config.json alone.

Seam: run the model over a text sample and measure, for every pair of hidden states, their
angular distance: the mean over all tokens of arccos(cos(h_i, h_j)) / pi, where h_0..h_n are
transformers' `output_hidden_states` (h_l enters decoder layer l; h_n is the last layer's
output after the model's final norm, transformers' convention). 0 means the same direction,
0.5 orthogonal.

A depth up-scaling that repeats layers [A, B) (output = layers [0, B) then [A, n)) feeds the
state leaving layer B-1, h_B, into layer A, which was trained on h_A: its seam distance is
d(h_A, h_B). SOLAR's stack with m layers dropped per copy is the case A = m, B = n - m (copy A
keeps [0, n-m), copy B keeps [m, n)). `recommend` picks, for a target layer count, SOLAR's m
and the repeated range of the same length whose seam joins the most similar states (Yi-9B's
criterion; `solar-merge dus --repeat A:B`).

Plan: parameter count (solar_merge.sizing), weight bytes per dtype and training memory per
strategy (solar_merge.memory) from config.json alone (no torch, no weights read).

Nothing here imports torch or transformers at module import time.
"""

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.sizing import Shape

SEAM_VERSION = 1  # bump when the measurement changes: finished seam folders are redone


# -- measuring ---------------------------------------------------------------------------------

def read_text(data_file) -> str:
    """The text of a .txt file, or the `text` fields of a .jsonl/.json/.parquet file."""
    path = Path(data_file)
    if not path.is_file():
        raise UserError(f"--data {path} not found", fix="give a text file (.txt, or .jsonl "
                                                        "with a `text` field)")
    if path.suffix == ".txt" or path.suffix not in (".jsonl", ".json", ".parquet"):
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"--data {path} is not UTF-8 text ({e.reason})",
                            fix="re-encode it as UTF-8") from None
    from solar_merge.data import load_records, to_text

    records = load_records(path)
    return "\n\n".join(to_text(r)["text"] for r in records)


def token_samples(tokenizer, text: str, samples: int, seq_len: int, *, where: str = "--data"
                  ) -> list[list[int]]:
    """Up to `samples` non-overlapping chunks of exactly `seq_len` tokens from the start of the
    text; a text too short for one chunk is a UserError."""
    text = text[: samples * seq_len * 16]  # enough characters for the tokens we keep
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    chunks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples]
    if not chunks:
        raise UserError(f"{where} holds {len(ids)} tokens, too short for one sample of "
                        f"--seq-len {seq_len} tokens",
                        fix=f"give a longer text, or lower --seq-len (at most {len(ids)})")
    return chunks


def load_model(model_dir):
    """(model, tokenizer), fp32, eval mode; safetensors only, never the model's own code."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from solar_merge.checkpoints import remote_code_error, require_safetensors

    folder = Path(model_dir)
    if not (folder / "config.json").is_file():
        raise UserError(f"{folder} is not a model folder (no config.json)",
                        fix="point to a folder saved with save_pretrained()")
    require_safetensors(folder)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                     use_safetensors=True,
                                                     trust_remote_code=False)
    except (OSError, ValueError) as e:
        if remote_code_error(folder, e):
            raise remote_code_error(folder, e) from None
        raise UserError(f"cannot load {folder}: {str(e).splitlines()[0][:200]}",
                        fix="the folder needs safetensors weights and a tokenizer") from None
    return model.eval(), tokenizer


def angular_distances(model, chunks: list[list[int]], *, batch_size: int = 4):
    """(n+1) x (n+1) float64 array: entry [i, j] is the mean over all tokens of
    arccos(cos(h_i, h_j)) / pi, h = output_hidden_states (h_0 = embeddings)."""
    import numpy as np
    import torch

    total, tokens = None, 0
    with torch.inference_mode():
        for i in range(0, len(chunks), batch_size):
            batch = torch.tensor(chunks[i:i + batch_size])
            states = model(input_ids=batch, output_hidden_states=True).hidden_states
            h = torch.stack([s.reshape(-1, s.shape[-1]).double() for s in states])
            h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            n1 = h.shape[0]
            sums = torch.zeros(n1, n1, dtype=torch.float64)
            for k in range(1, n1):
                u, v = h[:-k], h[k:]
                # = arccos(u.v) for unit vectors, without arccos' loss of precision near 0
                angle = 2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1))
                idx = torch.arange(n1 - k)
                sums[idx, idx + k] = angle.sum(dim=-1)
            total = sums if total is None else total + sums
            tokens += h.shape[1]
    d = (total / tokens / math.pi).numpy()
    return np.maximum(d, d.T), tokens


# -- candidates and the recommendation -----------------------------------------------------------

@dataclass
class Seam:
    """Repeat layers [start, end): the output stacks layers [0, end) and then [start, n)."""
    start: int
    end: int
    layers: int
    distance: float      # d(h_start, h_end): what layer `start` receives vs. was trained on
    drop: int | None     # SOLAR's m when the layout is symmetric (start = m, end = n - m)
    params: int | None = None

    @property
    def option(self) -> str:
        return f"--drop {self.drop}" if self.drop is not None else \
            f"--repeat {self.start}:{self.end}"


def seam_of(dist, n: int, start: int, end: int, params_of=None) -> Seam:
    layers = n + end - start
    drop = start if start == n - end else None
    return Seam(start, end, layers, float(dist[start, end]), drop,
                params_of(layers) if params_of else None)


def dus_candidates(dist, n: int, params_of=None) -> list[Seam]:
    """SOLAR's stack for every valid m (1 <= m < n/2), scored by its seam distance."""
    return [seam_of(dist, n, m, n - m, params_of) for m in range(1, (n + 1) // 2)
            if 2 * m < n]


def best_repeat(dist, n: int, new_layers: int, params_of=None) -> Seam:
    """The range [A, A + new_layers) whose repeat joins the most similar states
    (ties: the most central range). For `solar-merge dus --repeat A:B`."""
    check_new_layers(n, new_layers)
    options = [seam_of(dist, n, a, a + new_layers, params_of)
               for a in range(n - new_layers + 1)]
    centre = (n - new_layers) / 2
    return min(options, key=lambda s: (round(s.distance, 12), abs(s.start - centre)))


def check_new_layers(n: int, new_layers: int) -> None:
    if not 1 <= new_layers <= n - 2:
        raise UserError(f"a {n + new_layers}-layer target is out of range for a {n}-layer "
                        f"model: up-scaling adds 1 to {n - 2} layers ({n + 1} to {2 * n - 2} "
                        "in all; all 2n layers repeat the whole model, which SOLAR shows does "
                        "not recover)",
                        fix=f"give --layers between {n + 1} and {2 * n - 2}")


def parse_budget(text: str) -> int:
    """'10B' -> 10_000_000_000; also M, k, T, plain numbers and 1e10."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(text))
    if not m:
        raise UserError(f"--budget {text!r} is not a parameter count",
                        fix="write e.g. 10B, 10.7B, 500M or 7e9")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


@dataclass
class Target:
    layers: int
    why: str


def choose_target(n: int, *, layers: int | None = None, budget: int | None = None,
                  params_of=None) -> Target:
    """The layer count to recommend for: --layers S, the largest SOLAR stack within --budget
    parameters, or SOLAR's own proportion (m = n/4) when neither is given."""
    if layers is not None and budget is not None:
        raise UserError("--layers and --budget both given", fix="give one of them")
    if layers is not None:
        check_new_layers(n, layers - n)
        return Target(layers, f"--layers {layers}")
    if budget is not None:
        if params_of is None or params_of(n) is None:
            raise UserError("--budget needs the model's parameter count, which its folder "
                            "does not give", fix="use --layers S instead")
        fits = [m for m in range(1, (n + 1) // 2) if 2 * m < n
                and params_of(2 * (n - m)) <= budget]
        if not fits:
            smallest = params_of(2 * (n - (n - 1) // 2))
            raise UserError(f"no depth up-scaling of this {n}-layer model fits in "
                            f"{_human(budget)} parameters (the smallest, {2 * (n - (n - 1) // 2)}"
                            f" layers, has {_human(smallest)})",
                            fix="raise --budget, or give --layers")
        m = min(fits)
        s = 2 * (n - m)
        return Target(s, f"the largest SOLAR stack within {_human(budget)} parameters "
                         f"({_human(params_of(s))})")
    m = max(1, int(n / 4 + 0.5))
    if 2 * m >= n:
        m = (n - 1) // 2
    return Target(2 * (n - m), "SOLAR's proportion m = n/4 (no --layers or --budget given)")


@dataclass
class Recommendation:
    target: Target
    drop: Seam | None      # SOLAR's stack at the target size (None when the size is odd)
    repeat: Seam           # the most similar seam of the same size
    reason: str = ""

    @property
    def best(self) -> Seam:
        if self.drop is not None and self.drop.distance <= self.repeat.distance:
            return self.drop
        return self.repeat


def recommend(dist, n: int, target: Target, params_of=None) -> Recommendation:
    r = target.layers - n
    repeat = best_repeat(dist, n, r, params_of)
    m = (n - r) // 2
    drop = seam_of(dist, n, m, n - m, params_of) if (n - r) % 2 == 0 else None
    rec = Recommendation(target, drop, repeat)
    parts = []
    if drop is not None:
        parts.append(f"--drop {drop.drop} is SOLAR's stack at {target.layers} layers "
                     f"({target.why}); its seam feeds h_{drop.end} (leaving copy A's last kept "
                     f"layer {drop.end - 1}) into layer {drop.start} (copy B's first kept layer, "
                     f"trained on h_{drop.start}): angular distance {drop.distance:.4f}")
    else:
        parts.append(f"no --drop gives {target.layers} layers ({target.why}): SOLAR's stack "
                     "has an even number of layers")
    if drop is not None and repeat.start == drop.start:
        parts.append("no other range of the same length joins more similar states")
    else:
        parts.append(f"of all {r}-layer ranges, repeating [{repeat.start}, {repeat.end}) joins "
                     f"the two most similar states (h_{repeat.end} into layer {repeat.start}: "
                     f"{repeat.distance:.4f})" + (
                         f", {drop.distance - repeat.distance:.4f} closer than --drop "
                         f"{drop.drop}" if drop is not None else ""))
    rec.reason = "; ".join(parts)
    return rec


# -- the command -------------------------------------------------------------------------------

@dataclass
class SeamResult:
    out: Path
    model: str
    n_layers: int
    tokens: int
    samples: int
    recommendation: Recommendation
    candidates: list[Seam] = field(default_factory=list)
    skipped: bool = False

    def summary(self) -> str:
        """The recommendation and why, then the table of SOLAR's candidate seams."""
        rec = self.recommendation
        lines = [f"{self.model}: {self.n_layers} layers, {self.samples} samples, "
                 f"{self.tokens} tokens" + (" (already measured)" if self.skipped else "")]
        if rec.drop is not None:
            lines.append(f"recommended --drop {rec.drop.drop}")
        lines.append(f"recommended --repeat {rec.repeat.start}:{rec.repeat.end}")
        lines.append(f"reason: {rec.reason}")
        lines.append(f"the more similar seam at {rec.target.layers} layers: {rec.best.option}")
        lines.append(f"wrote {self.out}/seam.csv, seam.png, candidates.csv, seam.json, "
                     "results.md")
        return "\n".join(lines) + "\n\n" + self.table().text()

    def table(self):
        """SOLAR's candidate seams (--drop m) as a tables.Table: the smaller the distance,
        the more alike the states the seam joins."""
        from solar_merge.tables import Table

        rec = self.recommendation
        return Table({f"--drop {c.drop}": {"layers": c.layers, "params": _human(c.params),
                                           "seam distance": c.distance}
                      for c in self.candidates}, better={"seam distance": False},
                     corner="candidate", formats={"seam distance": ".4f"},
                     notes=[("seam distance: the angular distance between the hidden state "
                             "copy B's first kept layer m receives (h_n-m) and the one it was "
                             "trained on (h_m)")]
                     + ([f"recommended at {rec.target.layers} layers: --drop {rec.drop.drop}"]
                        if rec.drop is not None else []))


def _params_fn(model: str):
    """layers -> parameter count: the weights' own count (their headers) grown by whole
    decoder layers as solar_merge.sizing counts them."""
    from solar_merge.checkpoints import model_info, read_config
    from solar_merge.sizing import Shape

    shape = Shape.from_config(read_config(model), params=model_info(model).params)
    return lambda layers: shape.with_layers(layers).params


def _input_hash(model_dir: Path, data_file: Path, options: dict) -> str:
    """What the measurement depends on: the model's and the data's contents, the options."""
    from solar_merge.outputs import config_hash, fingerprint

    return config_hash({"version": SEAM_VERSION, "model": fingerprint(model_dir),
                        "data": fingerprint(data_file), **options})


def seam(model: str, data_file, out_dir, *, samples: int = 8, seq_len: int = 256,
         layers: int | None = None, budget: str | int | None = None,
         batch_size: int = 4) -> SeamResult:
    """Measure, score and recommend (see the module doc); write seam.csv, seam.png,
    candidates.csv and seam.json into out_dir (atomically; a finished folder for the same
    model, data and options is reused)."""
    from solar_merge.checkpoints import local_dir, model_info, read_config
    from solar_merge.outputs import atomic_output, config_hash, is_complete

    if samples < 1 or seq_len < 2:
        raise UserError(f"--samples {samples} / --seq-len {seq_len}: need at least 1 sample "
                        "of at least 2 tokens", fix="e.g. --samples 8 --seq-len 256")
    folder = local_dir(model)
    if folder is None:
        raise UserError(f"seam needs the model's weights on disk; `{model}` is not a local "
                        "folder", fix="download it first (huggingface-cli download ...)")
    info = model_info(str(folder))
    n = info.n_layers
    config = read_config(str(folder))
    context = (config.get("text_config") or config).get("max_position_embeddings")
    if context and seq_len > int(context):
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {context} tokens",
                        fix=f"use --seq-len {min(256, int(context))} or less")
    params_of = _params_fn(str(folder))
    target = choose_target(n, layers=layers,
                           budget=parse_budget(budget) if isinstance(budget, str) else budget,
                           params_of=params_of)
    text = read_text(data_file)
    options = {"samples": samples, "seq_len": seq_len}
    measured = _input_hash(folder, Path(data_file), options)
    digest = config_hash({"measurement": measured, "target": target.layers})
    out = Path(out_dir).absolute()
    saved = _saved(out, measured)
    if saved is not None:  # the same measurement: reuse it (for another target, re-score)
        import numpy as np

        dist = np.array(saved["distances"], dtype=float)
        result = _result(out, model, n, saved["tokens"], saved["samples"], dist, target,
                         params_of, skipped=True)
        if is_complete(out, digest):
            return result
    else:
        model_obj, tokenizer = load_model(folder)
        chunks = token_samples(tokenizer, text, samples, seq_len)
        dist, tokens = angular_distances(model_obj, chunks, batch_size=batch_size)
        if dist.shape[0] != n + 1:
            raise UserError(f"{folder}: the model returned {dist.shape[0]} hidden states for "
                            f"{n} layers", fix="seam supports decoder-only transformers models")
        result = _result(out, model, n, tokens, len(chunks), dist, target, params_of)
    with atomic_output(out, digest) as work:
        _write(work, result, dist, data_file, {**options, "measurement": measured})
    return result


def _saved(out: Path, measured: str) -> dict | None:
    """seam.json of a finished folder holding the same measurement, else None."""
    from solar_merge.outputs import is_complete

    try:
        saved = json.loads((out / "seam.json").read_text()) if is_complete(out) else None
    except (OSError, ValueError):
        return None
    return saved if saved and saved.get("measurement") == measured else None


def _result(out, model, n, tokens, samples, dist, target, params_of, skipped=False):
    rec = recommend(dist, n, target, params_of)
    return SeamResult(out, model, n, tokens, samples, rec, dus_candidates(dist, n, params_of),
                      skipped)


def _write(work: Path, r: SeamResult, dist, data_file, options: dict) -> None:
    import csv

    n = r.n_layers
    with open(work / "seam.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["layer"] + [f"k={k}" for k in range(1, n + 1)])
        for layer in range(n):
            w.writerow([layer] + [f"{dist[layer, layer + k]:.6f}" if layer + k <= n else ""
                                  for k in range(1, n + 1)])
    with open(work / "candidates.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["drop", "layers", "params", "copy_a_keeps", "copy_b_keeps",
                    "seam_distance"])
        for c in r.candidates:
            w.writerow([c.drop, c.layers, c.params if c.params is not None else "",
                        f"0:{c.end}", f"{c.start}:{n}", f"{c.distance:.6f}"])
    rec = r.recommendation
    summary = {
        "model": r.model, "data": str(Path(data_file).absolute()), **options,
        "n_layers": n, "tokens": r.tokens, "samples": r.samples,
        "definition": "mean over tokens of arccos(cos(h_i, h_j))/pi; h = transformers' "
                      "output_hidden_states (h_0 embeddings, h_n after the final norm)",
        "target": asdict(rec.target),
        "recommended_drop": rec.drop.drop if rec.drop else None,
        "recommended_repeat": [rec.repeat.start, rec.repeat.end],
        "best": rec.best.option, "reason": rec.reason,
        "candidates": [asdict(c) for c in r.candidates],
        "distances": [[round(float(x), 8) for x in row] for row in dist],
    }
    (work / "seam.json").write_text(json.dumps(summary, indent=1) + "\n")
    r.table().write(work / "results.md")
    plot(dist, r, work / "seam.png")


def plot(dist, r: SeamResult, path: Path) -> None:
    """The l x k heatmap of d(h_l, h_{l+k}), SOLAR's candidate seams and the picks marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = r.n_layers
    grid = np.full((n, n), np.nan)
    for layer in range(n):
        for k in range(1, n - layer + 1):
            grid[layer, k - 1] = dist[layer, layer + k]
    fig, ax = plt.subplots(figsize=(7, 6), dpi=100)
    im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis",
                   extent=(0.5, n + 0.5, -0.5, n - 0.5))
    fig.colorbar(im, ax=ax, label="angular distance arccos(cos)/π")
    cands = r.candidates
    ax.scatter([c.end - c.start for c in cands], [c.start for c in cands], s=18,
               facecolors="none", edgecolors="magenta", label="SOLAR seams (--drop m)")
    rec = r.recommendation
    if rec.drop is not None:
        ax.scatter([rec.drop.end - rec.drop.start], [rec.drop.start], marker="s", s=80,
                   facecolors="none", edgecolors="red", linewidths=2,
                   label=f"--drop {rec.drop.drop}")
    ax.scatter([rec.repeat.end - rec.repeat.start], [rec.repeat.start], marker="*", s=160,
               color="orange", edgecolors="black",
               label=f"--repeat {rec.repeat.start}:{rec.repeat.end}")
    ax.set_xlabel("offset k (state entering layer l+k)")
    ax.set_ylabel("layer l (state entering it)")
    ax.set_title(f"{Path(r.model).name}: angular distance of hidden states "
                 f"({r.tokens} tokens)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _human(n) -> str:
    from solar_merge.checkpoints import human

    return human(n)


# -- plan: sizes of an up-scaled model from config.json alone -----------------------------------

WEIGHT_BYTES = {"float32": 4, "bfloat16 / float16": 2, "int8": 1, "int4": 0.5}
# plan's --precision: a train stage's `precision` (TRL's bf16/fp16: autocast over fp32 weights)
# or bf16 weights (model_init_kwargs.dtype bfloat16), as memory.py's layouts
PLAN_PRECISIONS = {"bf16": "mixed", "fp16": "mixed", "fp32": "fp32", "bf16-weights": "bf16"}


@dataclass
class PlanResult:
    model: str
    n_layers: int
    layers: int
    how: str                     # the layout, in words
    base: Shape
    shape: Shape                 # of the planned model
    weights: dict[str, int]      # dtype -> bytes of the weights alone
    memory: dict = field(default_factory=dict)  # strategy -> memory.Estimate (per device)
    setup: str = ""              # the training setup the memory is for, in words

    def format(self) -> str:
        b, p = self.base, self.shape
        source = "from config.json" if p.exact else (
            f"from config.json, model type `{p.model_type or 'unknown'}` counted as a "
            "Llama-style decoder")
        lines = [f"{self.model}: {self.how}",
                 (f"  parameters: {_billions(b.params)} -> {_billions(p.params)} "
                 f"({self.layers} layers x {_billions(p.per_layer)} + embeddings and norms "
                 f"{_billions(p.params - self.layers * p.per_layer)}; {source})"),
                 "  weights alone: " + ", ".join(f"{dtype} {_gb(n)}"
                                                 for dtype, n in self.weights.items())]
        if self.memory:
            lines += ["", (f"training memory per device ({self.setup}; solar_merge.memory, "
                           "runtime not included):"), "", self.table().text()]
        return "\n".join(lines)

    def table(self):
        """Training memory per device for each strategy as a tables.Table (the least is
        marked)."""
        from solar_merge.checkpoints import human
        from solar_merge.tables import Table

        return Table({name: {"GB per device": est.total / 1e9,
                             "of which": ", ".join(f"{k} {human(v, 'B')}"
                                                   for k, v in est.terms.items() if v)}
                      for name, est in self.memory.items()},
                     better={"GB per device": False}, corner="strategy",
                     formats={"GB per device": ".4g"})


def _billions(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def planned_layers(n: int, *, drop: int | None = None, layers: int | None = None,
                   every: int | None = None) -> tuple[int, str]:
    """(output layer count, the layout in words) for one of --drop / --layers / --every."""
    from solar_merge.upscale import check_drop, check_every

    given = [k for k, v in (("--drop", drop), ("--layers", layers), ("--every", every))
             if v is not None]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} both given", fix="give one of them")
    if drop is not None:
        check_drop(n, drop)
        s = 2 * (n - drop)
        return s, (f"{n} -> {s} layers (--drop {drop}: copy A keeps [0, {n - drop}), "
                   f"copy B keeps [{drop}, {n}))")
    if every is not None:
        check_every(n, every)
        return n + n // every, (f"{n} -> {n + n // every} layers (--every {every}: a new "
                                f"block after every {every})")
    if layers is not None:
        if not n <= layers <= 2 * n:
            raise UserError(f"--layers {layers} is out of range for a {n}-layer model",
                            fix=f"give --layers between {n} and {2 * n}")
        return layers, f"{n} -> {layers} layers (--layers {layers})"
    return n, f"{n} layers (as is)"


def plan(model: str, *, drop: int | None = None, layers: int | None = None,
         every: int | None = None, launch: str | None = None, devices: int = 8,
         stage: str = "sft", precision: str = "bf16", batch: int = 1, seq_len: int = 2048,
         checkpointing: bool = True) -> PlanResult:
    """Parameters, weight bytes and training memory of MODEL up-scaled as asked, from
    config.json alone (a local folder, or a Hub id: config.json only is fetched). Memory is
    solar_merge.memory's formula, per device, for every strategy or the one of `launch` (a
    TRL accelerate preset name or an accelerate config file)."""
    from solar_merge import memory
    from solar_merge.checkpoints import read_config

    base = Shape.from_config(read_config(model))
    n = base.layers
    s, how = planned_layers(n, drop=drop, layers=layers, every=every)
    shape = base.with_layers(s)
    weights = {dtype: int(shape.params * size) for dtype, size in WEIGHT_BYTES.items()}
    if devices < 1 or batch < 1 or seq_len < 1:
        raise UserError(f"--num-processes {devices}, --batch {batch}, --seq-len {seq_len}: "
                        "each must be at least 1", fix="e.g. --num-processes 8 --batch 1")
    if precision not in PLAN_PRECISIONS:
        raise UserError(f"--precision {precision} is not one of {', '.join(PLAN_PRECISIONS)}",
                        fix="bf16 or fp16 (a train stage's precision: autocast over fp32 "
                            "weights), fp32, or bf16-weights (args.model_init_kwargs.dtype "
                            "bfloat16: weights, gradients and moments in bf16)")
    strategies = [memory.strategy_of(launch)] if launch else list(memory.STRATEGIES)
    estimates = {}
    for strategy in strategies:
        count = 1 if strategy == "ddp" and not launch else devices
        setup = memory.Setup(stage=stage, precision=PLAN_PRECISIONS[precision], batch=batch,
                             seq_len=seq_len, activation_checkpointing=checkpointing,
                             strategy=strategy, devices=count)
        name = f"{strategy} x{count}" if strategy != "ddp" or count > 1 else "1 device"
        estimates[name] = memory.estimate(shape, setup)
    words = (f"{stage}, {precision}, batch {batch} x {seq_len} tokens, activation "
             f"checkpointing {'on' if checkpointing else 'off'}, full fine-tuning"
             + (f", --launch {launch}" if launch else ""))
    return PlanResult(model, n, s, how, base, shape, weights, estimates, words)
