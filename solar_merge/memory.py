"""Training memory per device: the one formula behind `validate`, the stages' dry run and
`plan`. No torch here (it runs where only config.json is known). The model's size and shapes
come from solar_merge.sizing.

    shape = Shape.from_config(json.load(open("config.json")))      # sizing.Shape
    est = estimate(shape, Setup(stage="dpo", precision="bf16", batch=2, seq_len=4096,
                                strategy="zero3", devices=8, activation_checkpointing=True))
    est.total            # bytes per device
    est.terms            # {"weights": ..., "gradients": ..., ...}: what the total is made of
    print(est.describe())

`from_stage(resolved_stage_config, shape, launch)` builds the Setup from a stage config (its
`precision`, `args`, `peft`, `trainable_layers`) the way the stage itself will run, so that the
estimate and the run follow one rule (`layout()`: the stage's precision decision, bf16/fp16
autocast over fp32 weights as TRL does, 16-bit weights only from args.model_init_kwargs.dtype).
A stage with `precision: auto` is decided on its device when it runs; before that (plans,
no torch) its estimate is the larger of fp32 and mixed precision.

The terms, per device, for P parameters of which T are trained, N devices, w bytes per weight
(4 in fp32 and mixed precision, 2 in bf16), a bytes per activation (2 under bf16/autocast, 4 in
fp32), B sequences of S tokens per device (DPO: 2B, chosen and rejected):

- weights: P*w (a 4-bit QLoRA base: P*0.5625, NF4 plus its block scales);
- gradients: T*w (the Trainer keeps gradients in the weights' dtype);
- optimizer moments: 2*T*w (torch AdamW: exp_avg and exp_avg_sq, in the weights' dtype);
  with `args.optim: adafactor` (transformers' Adafactor as the Trainer builds it: no first
  moment, the second one factored into a row and a column vector per matrix) only those
  vectors: 4 bytes per row and column of every weight matrix, a few MB for a 1B model;
- 16-bit weight copies (mixed precision only): P*2. Autocast casts every weight to bf16/fp16
  for the matmuls and the backward pass keeps those copies;
- reference model (DPO, unless it is the model's own start and args.precompute_ref_log_probs
  scores it once before training; with LoRA TRL uses the base with the adapter switched off,
  so none): P*w (bf16 under DeepSpeed/FSDP, sharded by zero3
  and fsdp as TRL prepares it like the policy);
- activations: B*S*L*(8h + 4i + 4kv)*a, i.e. what autograd saves per token and decoder layer
  of a Llama-style block with SDPA attention (norm inputs and outputs, q, rotated q and k,
  v, attention output: ~8h + 4kv; gate, up, act(gate), act*up: 4i). Counted with
  torch.autograd.graph.saved_tensors_hooks on SmolLM2's shape (h=576, i=1536, kv=192): 19.4h
  elements in fp32 and 21.4h in bf16 (RMSNorm computes in fp32), against 20h by the formula.
  With activation checkpointing only each layer's input is kept, plus one layer recomputed:
  B*S*(L*h + 8h + 4i + 4kv)*a;
- logits: 3*B*S*V*4: the fp32 logits kept for the loss's backward, their gradient, and one
  temporary of the same size (log-softmax / TRL's entropy and accuracy metrics);
- optimizer step temporaries: torch AdamW allocates scratch tensors per parameter tensor when
  it steps; counted as 2 copies of the largest tensor (the embedding, V*h) in the moments' dtype.

Sharded strategies change where the model states live (activations and logits stay per device):

- ddp (also one device): as above; every device holds everything, and with more than one
  device DDP's gradient buckets too: T*w (accelerate's DDP keeps gradient_as_bucket_view off,
  so the buckets are a second copy of the gradients).
- zero1 / zero2 / zero3 (DeepSpeed, bf16 mixed precision as TRL's presets set it: bf16 weights,
  fp32 master weights and moments kept by DeepSpeed's optimizer): zero1 shards the 12 bytes of
  fp32 optimizer state per trained parameter (master 4 + moments 8) over N: 2P + 2T + 12T/N;
  zero2 also the gradients, counted as DeepSpeed's own estimator does
  (estimate_zero2_model_states_mem_needs): 2P + 2T + 16T/N; zero3 also the weights, again as
  DeepSpeed's estimator (estimate_zero3_model_states_mem_needs_all_live): 18 bytes per
  parameter over N (2 weights + 2 gradients + 12 optimizer + 2 of DeepSpeed's buffers) plus
  4 bytes per parameter of the largest module while it is gathered: 18P/N + 4*largest;
- fsdp (accelerate's FSDP2 full shard, mixed precision): accelerate keeps the sharded weights
  in fp32, so weights 4P/N, gradients 4T/N, moments 8T/N, plus the bf16 weights of two
  gathered units (the one computing and the one prefetched): 2*2*max(layer, embedding).

Not counted: the CUDA context / interpreter (`RUNTIME`, shown separately), the data loader,
allocator fragmentation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from solar_merge.sizing import Shape

STRATEGIES = ("ddp", "zero1", "zero2", "zero3", "fsdp")
PRECISIONS = ("fp32", "bf16", "mixed")
RUNTIME = 512 * 2**20  # CUDA context or interpreter + torch: shown beside the estimate
# peft's default LoRA targets (its TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING) for the
# families solar_merge.sizing counts; fused projections have one query-key-value matrix
LORA_DEFAULT_TARGETS = ("q_proj", "v_proj")
LORA_DEFAULT_FUSED = ("qkv_proj",)


@dataclass(frozen=True)
class Setup:
    """How the stage runs (per device)."""

    stage: str = "sft"                  # cpt | sft | dpo | stepwise_dpo
    precision: str = "fp32"             # fp32 | bf16 | mixed (see layout())
    batch: int = 8                      # sequences per device and step (before DPO's x2)
    seq_len: int = 1024
    trainable: int | None = None        # None: every parameter (full fine-tuning)
    lora: bool = False                  # `trainable` are adapter parameters; the base is frozen
    load_in_4bit: bool = False          # QLoRA base weights
    activation_checkpointing: bool = False
    reference: bool | None = None       # DPO's reference in memory (None: for dpo stages)
    optimizer: str = "adamw"            # adamw | adafactor (args.optim)
    strategy: str = "ddp"
    devices: int = 1


@dataclass
class Estimate:
    total: int                              # bytes per device, RUNTIME not included
    terms: dict[str, int] = field(default_factory=dict)
    setup: Setup | None = None
    shape: Shape | None = None              # the model it is for

    def describe(self) -> str:
        from solar_merge.checkpoints import human

        parts = ", ".join(f"{k} {human(v, 'B')}" for k, v in self.terms.items() if v)
        return f"{human(self.total, 'B')} per device ({parts})"


def estimate(shape: Shape, setup: Setup) -> Estimate:
    """Peak training memory per device (see the module doc for every term)."""
    if setup.strategy not in STRATEGIES:
        raise ValueError(f"strategy {setup.strategy!r} is not one of {STRATEGIES}")
    if setup.precision not in PRECISIONS:
        raise ValueError(f"precision {setup.precision!r} is not one of {PRECISIONS}")
    p, n = shape.params, max(1, setup.devices)
    t = p if setup.trainable is None else setup.trainable
    w = 2 if setup.precision == "bf16" else 4
    a = 4 if setup.precision == "fp32" else 2
    dpo = setup.stage in ("dpo", "stepwise_dpo")
    reference = dpo if setup.reference is None else setup.reference
    if setup.lora:
        reference = False  # TRL scores the reference with the adapter disabled
    base = p * 0.5625 if setup.load_in_4bit else p * w
    terms: dict[str, float] = {}
    s = setup.strategy
    if s == "ddp":
        terms["weights"] = base
        terms["gradients"] = t * w
        terms["optimizer moments"] = (_factored(shape, t) if setup.optimizer == "adafactor"
                                      else 2 * t * w)
        if setup.precision == "mixed":
            terms["16-bit weight copies"] = p * 2
        if n > 1:
            terms["gradient buckets"] = t * w
        terms["optimizer step temporaries"] = 2 * min(t, shape.largest_module) * w
    elif s in ("zero1", "zero2"):
        terms["weights"] = 2 * p
        terms["gradients"] = 2 * t
        terms["optimizer state shard"] = (12 if s == "zero1" else 16) * t / n
    elif s == "zero3":
        terms["model states shard"] = 2 * p / n + 16 * t / n
        terms["gathered module"] = 4 * shape.largest_module
    else:  # fsdp
        terms["weights shard"] = 4 * p / n
        terms["gradients shard"] = 4 * t / n
        terms["optimizer moments shard"] = 8 * t / n
        terms["gathered units"] = 2 * 2 * max(shape.per_layer or 0, shape.largest_module)
    if reference:  # TRL prepares it like the policy: sharded by zero3 and fsdp, in bf16
        terms["reference model"] = p * w if s == "ddp" else (
            2 * p / n if s in ("zero3", "fsdp") else 2 * p)
    seqs = setup.batch * (2 if dpo else 1)
    tokens = seqs * setup.seq_len
    per_layer = 8 * shape.hidden + 4 * shape.intermediate + 4 * shape.kv
    if setup.activation_checkpointing:
        terms["activations"] = tokens * (shape.layers * shape.hidden + per_layer) * a
    else:
        terms["activations"] = tokens * shape.layers * per_layer * a
    terms["logits"] = 3 * tokens * shape.vocab * 4
    ints = {k: int(v) for k, v in terms.items()}
    return Estimate(sum(ints.values()), ints, setup, shape)


def _factored(shape: Shape, trainable: int) -> int:
    """Adafactor's factored second moments: a row and a column vector (fp32) per weight
    matrix (the embedding and every matrix of each layer), scaled to the trained share."""
    per_layer = sum(a + b for a, b in shape.matrices.values())
    full = 4 * (shape.vocab + shape.hidden + shape.layers * per_layer)
    return int(full * min(1.0, trainable / max(1, shape.params)))


# -- from a stage config ---------------------------------------------------------------------

def layout(args: dict, precision: str) -> str:
    """How a stage with these TRL `args` trains at a decided `precision` (bf16 | fp16 | fp32,
    solar_merge.precision): bf16 when args.model_init_kwargs.dtype loads 16-bit weights
    (weights, gradients and moments in 16 bits), mixed for bf16/fp16 (autocast over fp32
    weights, TRL's default dtype), else fp32."""
    init = args.get("model_init_kwargs") or {}
    dtype = str(init.get("dtype") or init.get("torch_dtype") or "") if isinstance(init, dict) \
        else ""
    if dtype.removeprefix("torch.") in ("bfloat16", "float16"):
        return "bf16"
    return "fp32" if precision == "fp32" else "mixed"


def parse_bytes(value) -> int:
    """80GB, 80 GB, 24GiB, 512MiB or a number of bytes -> bytes (ValueError otherwise)."""
    import re

    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    match = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ValueError(value)
    unit = (match.group(2) or "B").upper()
    scale = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    return int(float(match.group(1)) * scale)


def lora_params(shape: Shape, rank: int, targets=None) -> int:
    """Adapter parameters of LoRA rank `rank` on the given Linear names of every layer
    (peft's default: q_proj and v_proj, or qkv_proj where they are fused; "all-linear": every
    matrix of the layer, sizing.Shape.matrices)."""
    dims = shape.matrices
    if targets in (None, ()):
        targets = LORA_DEFAULT_FUSED if shape.fused else LORA_DEFAULT_TARGETS
    elif targets == "all-linear":
        targets = list(dims)
    elif isinstance(targets, str):
        targets = [targets]
    per_layer = sum(rank * sum(dims[name]) for name in targets if name in dims)
    return per_layer * shape.layers


def from_stage(resolved: dict, shape: Shape, launch: dict | None = None,
               precision: str | None = None) -> Estimate:
    """The estimate for a resolved stage config (solar_merge.stages.resolve) run with
    `launch` ({num_processes, num_machines, accelerate_config: preset name or path}):
    the strategy is read from the preset (zero1/2/3 -> DeepSpeed, fsdp1/2 -> fsdp).
    precision: the decided one (bf16 | fp16 | fp32) where the device is known; otherwise the
    stage's request, and for `auto` the larger of the fp32 and bf16 estimates."""
    args = resolved.get("args") or {}
    request = precision or resolved.get("precision") or "auto"
    if request == "auto":
        return max((from_stage(resolved, shape, launch, p) for p in ("fp32", "bf16")),
                   key=lambda e: e.total)
    launch = launch or {}
    devices = int(launch.get("num_processes") or 1)
    strategy = strategy_of(launch.get("accelerate_config"))
    peft = resolved.get("peft") or None
    layers = resolved.get("trainable_layers") or []
    trainable = None
    if peft:
        trainable = lora_params(shape, _count(peft.get("r"), 8), peft.get("target_modules"))
    elif layers:
        trainable = (shape.per_layer or 0) * (shape.layers if layers == "all" else len(layers))
    # args are TRL's to check when the stage runs: an estimate never crashes on them
    batch = _count(args.get("per_device_train_batch_size"), 8)
    seq = _count(resolved.get("seq_len") or args.get("max_length"), 1024)
    checkpointing = bool(args.get("gradient_checkpointing") or
                         args.get("activation_checkpointing"))
    setup = Setup(stage=resolved.get("stage", "sft"), precision=layout(args, request),
                  batch=batch, seq_len=seq, trainable=trainable, lora=bool(peft),
                  load_in_4bit=bool(resolved.get("load_in_4bit")),
                  activation_checkpointing=checkpointing,
                  # the reference is the policy's own start: scored once, not kept in memory
                  reference=False if args.get("precompute_ref_log_probs") and resolved.get(
                      "ref_model") in (None, resolved.get("model")) else None,
                  optimizer="adafactor" if str(args.get("optim", "")).startswith("adafactor")
                  else "adamw", strategy=strategy, devices=devices)
    return estimate(shape, setup)


def _count(value, default: int) -> int:
    """A positive integer from a user's value, else `default` (None, \"abc\", -1, inf)."""
    try:
        n = int(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return n if n > 0 else default


def strategy_of(accelerate_config) -> str:
    """ddp / zero1-3 / fsdp for a TRL preset name or an accelerate config file (read as YAML
    when it exists; DeepSpeed's zero_stage, FSDP's distributed_type)."""
    if not accelerate_config:
        return "ddp"
    name = str(accelerate_config)
    if name in ("zero1", "zero2", "zero3"):
        return name
    if name in ("fsdp1", "fsdp2"):
        return "fsdp"
    if name in ("multi_gpu", "single_gpu"):
        return "ddp"
    try:
        import yaml

        with open(name, encoding="utf-8") as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, ValueError):
        return "ddp"
    kind = str(cfg.get("distributed_type", "")).upper()
    if kind == "DEEPSPEED":
        return f"zero{int((cfg.get('deepspeed_config') or {}).get('zero_stage', 2))}"
    return "fsdp" if kind == "FSDP" else "ddp"


def with_strategy(est: Estimate, **changes) -> Estimate:
    """The same stage under other settings (e.g. strategy="zero3", devices=8), for advice."""
    return estimate(est.shape, dataclasses.replace(est.setup, **changes))
