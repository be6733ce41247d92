"""New layers that need computing, written as a checkpoint that a stock mergekit config reads.

A mergekit config can copy, scale and average layers, but not fit a predictor or match neurons.
The initialisations here compute the new layers of an up-scale from the base model's weights
alone (no data) and write them as a small checkpoint folder:

    config.json          the base's, with num_hidden_layers = the number of new layers
    model.safetensors    layer j = the j-th new layer (the base's tensor names)
    new_layers.json      how each new layer was made: init, source layers, seed, seconds

The up-scale stays a `passthrough` slices config that stock `mergekit-yaml` runs: the base
layers come from the base model, the new ones from this folder (solar_merge.upscale writes it).

- `lesa`: LESA (Yang et al., ACL 2025, arXiv 2502.13794), as its public code does it. For each
  weight-matrix type (q/k/v/o/gate/up/down) the L layers' matrices are concatenated side by
  side and decomposed, [W_0 ... W_{L-1}] = U S V^T. Layer l is U S V_l, where V_l is its block
  of V^T (rank x in): the coefficients of its rows in a basis all layers share. A small MLP
  (2 hidden layers of 256, ReLU) learns V_l[i] from (V_{l-1}[i], V_{l+1}[i]) for every row i
  of every layer with two neighbours (AdamW lr 1e-3, 10 epochs, batches of 64, MSE plus 5e-4 x
  the squared difference of the batch norms); the layer between p and p+1 is U S f(V_p, V_p+1).
  Tensors that are not matrices (norms, biases) are the mean of the two neighbours.
- `aligned-average`: OpT-DeUS (Cao et al., arXiv 2508.08011). The lower of the two adjacent
  layers is re-ordered to match the upper one, then both are averaged; as in the paper, the new
  block's residual outputs (o_proj, down_proj) are zeroed, so it computes the identity until
  trained. Only re-orderings that leave the layer's function unchanged are used: MLP neurons
  (gate/up rows with the down_proj columns), and whole attention heads (a key/value head with
  its query heads, and the query heads within it, each with its o_proj columns). Each is the
  optimal transport between the two layers' units (uniform weights, squared distance between
  their weights), which for equal counts is a permutation (Birkhoff): solved exactly by
  scipy.optimize.linear_sum_assignment.
- `noise`: a copy of the source layer plus Gaussian noise on each weight matrix, of standard
  deviation `noise` x that matrix's own standard deviation (a zeroed matrix stays zero), seeded
  per (seed, new layer, tensor): duplicated layers stop being exact copies.
"""

import json
import logging
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from solar_merge.errors import UserError

log = logging.getLogger(__name__)

LAYERS_FILE = "new_layers.json"
RESIDUAL_OUTPUTS = ("o_proj", "down_proj")
# LESA's predictor and its training, as in the authors' train_LESA.ipynb
LESA = {"hidden": 256, "epochs": 10, "batch": 64, "lr": 1e-3, "norm_weight": 5e-4}
_LAYER_NAME = re.compile(r"^(.*\.layers\.)(\d+)\.(.+)$")


@dataclass(frozen=True)
class Job:
    """The new layers of one up-scale: how each is computed from the base's layers."""
    init: str                                # lesa | aligned-average | noise
    sources: tuple[tuple[int, ...], ...]     # per new layer: (p,) a copy, (p, p+1) between
    noise: float | None = None               # noise: relative standard deviation
    seed: int = 0
    outer: bool = False                      # also carry the base's other tensors (embeddings,
    #                                          final norm, head): mergekit takes those from the
    #                                          model of the first and last slices


# -- reading the base ---------------------------------------------------------------------------

class Weights:
    """A model folder's tensors, read one at a time from its safetensors files."""

    def __init__(self, folder):
        from safetensors import safe_open

        from solar_merge.checkpoints import weight_files

        self.folder = Path(folder)
        self._open = {f: safe_open(str(f), framework="pt") for f in weight_files(self.folder)}
        self.where = {name: f for f, h in self._open.items() for name in h.keys()}  # noqa: SIM118
        self.prefix, self.n_layers, suffixes = None, 0, set()
        for name in self.where:
            m = _LAYER_NAME.match(name)
            if m:
                self.prefix = m.group(1)
                self.n_layers = max(self.n_layers, int(m.group(2)) + 1)
                if m.group(2) == "0":
                    suffixes.add(m.group(3))
        if self.prefix is None:
            raise UserError(f"{self.folder} holds no tensors named *.layers.N.*",
                            fix="new layers can be computed for decoder models whose layers "
                                "are named like Llama's (model.layers.N.*)")
        self.suffixes = sorted(suffixes)
        self.outer = sorted(n for n in self.where if not _LAYER_NAME.match(n))

    def get(self, name):
        return self._open[self.where[name]].get_tensor(name)

    def layer(self, i: int) -> dict:
        return {s: self.get(f"{self.prefix}{i}.{s}") for s in self.suffixes}

    def config(self) -> dict:
        return json.loads((self.folder / "config.json").read_text())


@dataclass(frozen=True)
class Heads:
    """Attention shape of a layer, from config.json."""
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict) -> "Heads":
        cfg = config.get("text_config") or config
        heads = int(cfg["num_attention_heads"])
        return cls(heads, int(cfg.get("num_key_value_heads") or heads),
                   int(cfg.get("head_dim") or cfg["hidden_size"] // heads))

    @property
    def group(self) -> int:  # query heads per key/value head
        return self.heads // self.kv_heads


# -- LESA ---------------------------------------------------------------------------------------

def lesa_matrices(mats: list, between: list[int], *, seed: int = 0, hp: dict = LESA) -> list:
    """The matrices LESA predicts between layers p and p+1 for each p in `between`, from the
    same-typed matrices `mats` of all layers (see the module doc)."""
    import torch

    n = len(mats)
    if n < 3:
        raise UserError(f"LESA learns a layer from its two neighbours, which needs at least 3 "
                        f"layers; the model has {n}", fix="use --init average for it")
    d = mats[0].shape[1]
    u, s, vh = torch.linalg.svd(torch.cat([m.float() for m in mats], dim=1),
                                full_matrices=False)
    v = vh.reshape(vh.shape[0], n, d)  # v[:, l] = V_l, layer l's block of V^T
    net = _fit_predictor(v, seed=seed, hp=hp)
    with torch.no_grad():
        return [(u * s) @ net(torch.cat([v[:, p], v[:, p + 1]], dim=1)) for p in between]


def _fit_predictor(v, *, seed: int, hp: dict):
    """An MLP (V_{l-1}[i], V_{l+1}[i]) -> V_l[i], trained on every row i and inner layer l."""
    import torch
    from torch import nn

    rank, n, d = v.shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(2 * d, hp["hidden"]), nn.ReLU(),
                            nn.Linear(hp["hidden"], hp["hidden"]), nn.ReLU(),
                            nn.Linear(hp["hidden"], d))
    optimizer = torch.optim.AdamW(net.parameters(), lr=hp["lr"])
    rows = torch.arange(rank).repeat(n - 2)
    mids = torch.arange(1, n - 1).repeat_interleave(rank)
    order_rng = torch.Generator().manual_seed(seed)
    w = hp["norm_weight"]
    for _ in range(hp["epochs"]):
        order = torch.randperm(rows.numel(), generator=order_rng)
        for start in range(0, rows.numel(), hp["batch"]):
            pick = order[start:start + hp["batch"]]
            i, mid = rows[pick], mids[pick]
            x = torch.cat([v[i, mid - 1], v[i, mid + 1]], dim=1)
            y = v[i, mid]
            out = net(x)
            loss = ((1 - w) * nn.functional.mse_loss(out, y)
                    + w * nn.functional.mse_loss(out.norm(), y.norm()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return net.eval()


def lesa_layers(weights: Weights, between: list[int], *, seed: int = 0,
                hp: dict = LESA, layers: list[int] | None = None,
                types: list[str] | None = None) -> list[dict]:
    """LESA's new layer between p and p+1 for each p in `between`, learnt from `layers` (all
    of the model's by default; indices into that list); `types` limits it to the tensors
    whose names contain one of them (e.g. ["k_proj"])."""
    chosen = list(range(weights.n_layers)) if layers is None else list(layers)
    out: list[dict] = [{} for _ in between]
    for suffix in weights.suffixes:
        if types and not any(t in suffix for t in types):
            continue
        mats = [weights.get(f"{weights.prefix}{i}.{suffix}") for i in chosen]
        if mats[0].ndim == 2:
            predicted = lesa_matrices(mats, between, seed=seed, hp=hp)
        else:  # norms, biases: the neighbours' mean
            predicted = [(mats[p].float() + mats[p + 1].float()) / 2 for p in between]
        for layer, tensor in zip(out, predicted):
            layer[suffix] = tensor.to(mats[0].dtype)
    return out


def lesa_holdout(weights: Weights, layer: int, *, seed: int = 0, hp: dict = LESA,
                 types: list[str] | None = None) -> dict:
    """How well LESA reproduces an existing layer it did not see: fitted on every other layer,
    it predicts the one between `layer`-1 and `layer`+1. Per matrix type and over all of
    them: relative Frobenius error ||W_pred - W|| / ||W|| of LESA and of the neighbours' mean."""
    import torch

    if not 0 < layer < weights.n_layers - 1:
        raise UserError(f"held-out layer {layer} needs a neighbour on each side: pick one of "
                        f"1..{weights.n_layers - 2}")
    others = [i for i in range(weights.n_layers) if i != layer]
    predicted = lesa_layers(weights, [layer - 1], seed=seed, hp=hp, layers=others,
                            types=types)[0]
    result, sums = {}, {"lesa": 0.0, "mean": 0.0, "norm": 0.0}
    for suffix, pred in predicted.items():
        true = weights.get(f"{weights.prefix}{layer}.{suffix}").float()
        if true.ndim != 2:
            continue
        mean = (weights.get(f"{weights.prefix}{layer - 1}.{suffix}").float()
                + weights.get(f"{weights.prefix}{layer + 1}.{suffix}").float()) / 2
        norm = torch.linalg.norm(true).item()
        errors = {"lesa": torch.linalg.norm(pred.float() - true).item(),
                  "mean": torch.linalg.norm(mean - true).item()}
        result[suffix] = {k: e / norm for k, e in errors.items()}
        for k, e in errors.items():
            sums[k] += e * e
        sums["norm"] += norm * norm
    result["all"] = {k: (sums[k] / sums["norm"]) ** 0.5 for k in ("lesa", "mean")}
    return result


def lesa_cost(shape, *, hp: dict = LESA, types: list[str] | None = None) -> dict:
    """What LESA's fit costs for a model of `shape` (solar_merge.sizing.Shape): floating-point
    operations of the SVDs (thin SVD of an m x n matrix, m <= n: ~4 m^2 n + 8 m^3) and of the
    predictors' training (6 x parameters per row and epoch), and the bytes of the largest
    matrix type held at once in fp32 (the concatenation, then U and V^T). `types` limits it
    to those matrices (e.g. ["k_proj"])."""
    n = shape.layers
    svd = fit = peak = 0
    hidden = hp["hidden"]
    for name, (in_dim, out_dim) in shape.matrices.items():
        if types and name not in types:
            continue
        m, width = sorted((out_dim, n * in_dim))
        svd += 4 * m * m * width + 8 * m ** 3
        rank = min(out_dim, n * in_dim)
        params = 2 * in_dim * hidden + hidden * hidden + hidden * in_dim
        fit += 6 * params * rank * (n - 2) * hp["epochs"]
        peak = max(peak, 4 * (2 * out_dim * n * in_dim + out_dim * rank))
    return {"svd_flops": svd, "fit_flops": fit, "peak_bytes": peak}


# -- OpT-DeUS: aligned average ------------------------------------------------------------------

def _find(layer: dict, part: str, kind: str = "weight") -> str | None:
    return next((s for s in layer if f"{part}.{kind}" in s), None)


def _assign(cost):
    """perm with new position k <- old unit perm[k], for the rows of `cost` (lower's units)
    matched to its columns (upper's) at least total cost."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(np.asarray(cost, dtype=np.float64))
    perm = np.empty(len(cols), dtype=np.int64)
    perm[cols] = rows
    return perm


def _head_features(layer: dict, heads: Heads):
    """Per query head: its q rows, q bias and o_proj columns; per key/value head: its k and v
    rows and biases. Flattened, in fp32."""
    import torch

    def rows(part, count):
        found = [layer[s].float().reshape(count, -1) for s in
                 (_find(layer, part), _find(layer, part, "bias")) if s]
        return torch.cat(found, dim=1)

    o = layer[_find(layer, "o_proj")].float()
    q = torch.cat([rows("q_proj", heads.heads), o.t().reshape(heads.heads, -1)], dim=1)
    kv = torch.cat([rows("k_proj", heads.kv_heads), rows("v_proj", heads.kv_heads)], dim=1)
    return q, kv


def match_units(lower: dict, upper: dict, heads: Heads) -> dict:
    """The permutations that re-order `lower`'s units to match `upper`'s: {"mlp": neurons,
    "kv": key/value heads, "q": query heads (all of them, in the new order)}; each maps a new
    position to the unit of `lower` that goes there."""
    import numpy as np
    import torch

    def mlp_features(layer):
        gate, up, down = (layer[_find(layer, p)].float() for p in
                          ("gate_proj", "up_proj", "down_proj"))
        return torch.cat([gate, up, down.t()], dim=1)

    mlp = _assign(torch.cdist(mlp_features(lower), mlp_features(upper)) ** 2)
    q_a, kv_a = _head_features(lower, heads)
    q_b, kv_b = _head_features(upper, heads)
    g = heads.group
    q_cost = (torch.cdist(q_a, q_b) ** 2).numpy()
    inner = {}  # (lower group a, upper group b) -> (cost, within-group perm)
    kv_cost = (torch.cdist(kv_a, kv_b) ** 2).numpy()
    for a in range(heads.kv_heads):
        for b in range(heads.kv_heads):
            block = q_cost[a * g:(a + 1) * g, b * g:(b + 1) * g]
            perm = _assign(block)
            inner[a, b] = (block[perm, np.arange(g)].sum(), perm)
            kv_cost[a, b] += inner[a, b][0]
    kv = _assign(kv_cost)
    q = np.concatenate([kv[b] * g + inner[kv[b], b][1] for b in range(heads.kv_heads)])
    return {"mlp": torch.as_tensor(mlp), "kv": torch.as_tensor(kv), "q": torch.as_tensor(q)}


def permute_layer(layer: dict, perms: dict, heads: Heads) -> dict:
    """`layer` with its units re-ordered by `perms` (match_units' form): computes the same
    function. Norms (and per-head-dim norms such as Qwen3's q_norm) are left as they are."""
    out = dict(layer)

    def by_rows(suffix, perm, count):
        t = layer[suffix]
        out[suffix] = t.reshape(count, -1, *t.shape[1:])[perm].reshape(t.shape)

    for kind in ("weight", "bias"):
        for part, perm, count in (("q_proj", perms["q"], heads.heads),
                                  ("k_proj", perms["kv"], heads.kv_heads),
                                  ("v_proj", perms["kv"], heads.kv_heads),
                                  ("gate_proj", perms["mlp"], None),
                                  ("up_proj", perms["mlp"], None)):
            suffix = _find(layer, part, kind)
            if suffix:
                by_rows(suffix, perm, count or len(perm))
    o, down = _find(layer, "o_proj"), _find(layer, "down_proj")
    t = layer[o]
    out[o] = t.reshape(t.shape[0], heads.heads, -1)[:, perms["q"]].reshape(t.shape)
    out[down] = layer[down][:, perms["mlp"]]
    return out


def aligned_average(lower: dict, upper: dict, heads: Heads) -> dict:
    """OpT-DeUS's new block between `lower` and `upper` (see the module doc)."""
    import torch

    known = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for suffix, t in lower.items():
        if t.ndim == 2 and not any(k in suffix for k in known):
            raise UserError(f"aligned-average does not know how to align the matrix `{suffix}` "
                            "(it aligns Llama-style attention heads and MLP neurons)",
                            fix="use --init average or identity for this architecture")
    aligned = permute_layer(lower, match_units(lower, upper, heads), heads)
    out = {}
    for s, t in upper.items():
        mean = ((aligned[s].float() + t.float()) / 2).to(t.dtype)
        out[s] = torch.zeros_like(t) if any(f"{r}." in s for r in RESIDUAL_OUTPUTS) else mean
    return out


# -- noise --------------------------------------------------------------------------------------

def noisy_copy(layer: dict, std: float, seed: int, index: int) -> dict:
    """`layer` plus Gaussian noise on each matrix: std x the matrix's own standard deviation,
    from a generator seeded by (seed, index, tensor name)."""
    import torch

    out = {}
    for suffix, t in layer.items():
        if t.ndim != 2 or not t.is_floating_point():
            out[suffix] = t
            continue
        gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{index}/{suffix}".encode()))
        x = t.float()
        out[suffix] = (x + std * x.std() * torch.randn(x.shape, generator=gen)).to(t.dtype)
    return out


# -- the checkpoint -----------------------------------------------------------------------------

def compute(job: Job, weights: Weights) -> list[dict]:
    """The new layers of `job`, in order."""
    if job.init == "noise":
        return [noisy_copy(weights.layer(src[0]), job.noise, job.seed, j)
                for j, src in enumerate(job.sources)]
    if job.init == "lesa":
        return lesa_layers(weights, [src[0] for src in job.sources], seed=job.seed)
    if job.init == "aligned-average":
        heads = Heads.of(weights.config())
        return [aligned_average(weights.layer(a), weights.layer(b), heads)
                for a, b in job.sources]
    raise ValueError(job.init)


def write_layers(base, job: Job, out_dir) -> Path:
    """Compute `job`'s new layers from the model folder `base` into the checkpoint `out_dir`
    (atomic; a re-run with the same base and job finds it done). Returns `out_dir`."""
    import torch
    from safetensors.torch import save_file

    from solar_merge.outputs import atomic_output, config_hash, fingerprint, is_complete

    base, out_dir = Path(base), Path(out_dir).absolute()
    record = {"init": job.init, "sources": [list(s) for s in job.sources], "noise": job.noise,
              "seed": job.seed, "outer": job.outer,
              "predictor": LESA if job.init == "lesa" else None}
    digest = config_hash({"base": fingerprint(base), **record, "format": 1})
    if is_complete(out_dir, digest):
        return out_dir
    with atomic_output(out_dir, digest) as work:
        start = time.perf_counter()
        weights = Weights(base)
        layers = compute(job, weights)
        tensors = {f"{weights.prefix}{j}.{s}": t.contiguous()
                   for j, layer in enumerate(layers) for s, t in layer.items()}
        if job.outer:
            tensors.update({name: weights.get(name) for name in weights.outer})
        save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
        config = weights.config()
        text = config.get("text_config") or config
        types = text.get("layer_types")
        text["num_hidden_layers"] = len(layers)
        if types is not None:
            text["layer_types"] = [types[src[0]] for src in job.sources]
        if text.get("max_window_layers") is not None:
            text["max_window_layers"] = min(text["max_window_layers"], len(layers))
        (work / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        seconds = round(time.perf_counter() - start, 2)
        (work / LAYERS_FILE).write_text(json.dumps(
            {**record, "base": str(base), "seconds": seconds,
             "threads": torch.get_num_threads()}, indent=1) + "\n")
        log.info("computed %d %s layers in %.1f s into %s", len(layers), job.init, seconds,
                 out_dir)
    return out_dir


def record_of(folder) -> dict | None:
    """new_layers.json of a checkpoint folder (None: not one)."""
    path = Path(folder) / LAYERS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
