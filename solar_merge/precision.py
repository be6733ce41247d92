"""The one precision decision: which float format a stage trains or evaluates in, from what the
device computes natively. Importing this module imports no torch (recipes plan with it).

    decision = decide("auto")                 # a stage's `precision:` (default auto)
    decision.precision, decision.reason       # "fp32", "auto: CPU AMD EPYC has no native bf16 ..."
    decision.dtype                            # "float32": transformers' dtype name

`auto`:
- bf16 where the device computes it natively: a CUDA GPU of compute capability >= 8.0
  (A100, H100, RTX 30xx and later), or a CPU whose bf16 oneDNN runs in hardware (oneDNN reports
  bf16, `torch.ops.mkldnn._is_mkldnn_bf16_supported()`, and the CPU has avx512_bf16 or amx_bf16;
  on ARM, bf16). Training: bf16 autocast over fp32 weights (TRL's `bf16: true`).
- fp16 on older CUDA GPUs (V100 7.0, T4 7.5): training under fp16 autocast with loss scaling
  over fp32 weights (TRL's `fp16: true`); inference with fp16 weights.
- fp32 otherwise: a CPU that would only emulate bf16 (AVX2, or AVX-512 without avx512_bf16),
  Apple's MPS and other devices.

An explicit request (bf16 | fp16 | fp32) is honoured; a 16-bit format the device would only
emulate is logged once per process as a warning with the slowdown benchmarks/precision.py
measured (benchmarks/precision.md). SOLAR_MERGE_PRECISION (what the CLI's `--precision` sets)
forces a request over every stage's own, e.g. SOLAR_MERGE_PRECISION=fp32 measures the fp32
path on a CPU that computes bf16.
"""

import logging
import os
import platform
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from solar_merge.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

REQUESTS = ("auto", "bf16", "fp16", "fp32")
ENV = "SOLAR_MERGE_PRECISION"
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
# the CPU flags that decide its 16-bit speed, as /proc/cpuinfo names them (benchmarks record them)
X86_FLAGS = ("avx512_bf16", "amx_bf16", "avx512f", "avx2", "avx512_fp16", "amx_fp16")
ARM_FLAGS = ("bf16", "fphp")
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # bf16 arithmetic in hardware
FP16_FLAGS = ("avx512_fp16", "amx_fp16", "fphp")
_TORCH_NAMES = {"avx512_f": "avx512f", "fp16_arith": "fphp"}  # torch.cpu.get_capabilities()
CUDA_BF16 = (8, 0)  # Ampere: the first compute capability with bf16 tensor cores
# benchmarks/precision.md: a Linear(2048, 2048) forward + backward on 512 rows (its input's
# gradient included) under CPU autocast against fp32, on an AMD EPYC (Zen 3: AVX2, no AVX-512;
# oneDNN bf16 False) with torch 2.13, 1 and 2 threads on a busy machine
CPU_SLOWDOWN = {"bf16": "50-100x", "fp16": "50-100x"}

_warned: set = set()


@dataclass(frozen=True)
class Device:
    """What the decision needs of a device (`detect()` reads it; tests build one)."""

    kind: str                                 # cpu | cuda | mps | ...
    name: str = ""
    capability: tuple[int, int] | None = None  # CUDA compute capability
    flags: tuple[str, ...] = ()               # CPU flags present (see cpu_flags)
    onednn_bf16: bool = False                 # torch.ops.mkldnn._is_mkldnn_bf16_supported()

    @property
    def native_bf16(self) -> bool:
        if self.kind == "cuda":
            return tuple(self.capability or (0, 0)) >= CUDA_BF16
        if self.kind == "cpu":
            return self.onednn_bf16 and any(f in self.flags for f in BF16_FLAGS)
        return False

    @property
    def native_fp16(self) -> bool:
        if self.kind == "cuda":
            return True
        return self.kind == "cpu" and any(f in self.flags for f in FP16_FLAGS)

    def __str__(self) -> str:
        if self.kind == "cuda":
            cc = ".".join(map(str, self.capability)) if self.capability else "?"
            return f"CUDA GPU {self.name or '?'} (compute capability {cc})"
        if self.kind == "cpu":
            return f"CPU {self.name or '?'}"
        return self.kind.upper()


@dataclass(frozen=True)
class Decision:
    precision: str          # bf16 | fp16 | fp32
    request: str            # auto | bf16 | fp16 | fp32: what was asked, after SOLAR_MERGE_PRECISION
    reason: str
    device: Device

    @property
    def dtype(self) -> str:
        """transformers' name of the format (model dtype for inference, autocast in training)."""
        return DTYPES[self.precision]

    def __str__(self) -> str:
        return f"precision {self.precision} ({self.reason})"

    def record(self) -> dict:
        """For cards and results files."""
        return {"precision": self.precision, "request": self.request, "reason": self.reason,
                "device": str(self.device)}


def check(value, where: str = "precision") -> str:
    """`value` as a request, or a UserError naming `where`."""
    if value not in REQUESTS:
        raise UserError(f"{where}: `{value}` is not one of {', '.join(REQUESTS)}"
                        f"{did_you_mean(str(value), REQUESTS)}",
                        fix="auto (bf16 where the device computes it natively, fp16 on older "
                            "CUDA GPUs, else fp32), or bf16, fp16, fp32 to choose")
    return value


def forced() -> str | None:
    """The request SOLAR_MERGE_PRECISION forces over every stage's own (None: not set)."""
    value = os.environ.get(ENV, "").strip().lower()
    return check(value, ENV) if value else None


def requested(value: str = "auto") -> str:
    """What a stage asking for `value` gets asked: SOLAR_MERGE_PRECISION over it."""
    return forced() or check(value)


def decide(request: str = "auto", device: Device | None = None, *, training: bool = True
           ) -> Decision:
    """bf16, fp16 or fp32 for `request` on `device` (default: `detect()`), with the reason.
    training: fp16 means fp16 autocast with loss scaling over fp32 weights; otherwise fp16
    weights (inference)."""
    env = forced()
    request = env or check(request)
    device = device or detect()
    if request == "auto":
        return _auto(device, training)
    asked = f"--precision / {ENV}={env}" if env else f"precision: {request}"
    _warn_if_emulated(request, device, asked)
    return Decision(request, request, f"asked for ({asked})", device)


def _auto(device: Device, training: bool) -> Decision:
    if device.native_bf16:
        how = (f"compute capability >= {CUDA_BF16[0]}.{CUDA_BF16[1]}" if device.kind == "cuda"
               else "oneDNN bf16 and " + "/".join(f for f in BF16_FLAGS if f in device.flags))
        return Decision("bf16", "auto", f"auto: {device} computes bf16 natively ({how})", device)
    if device.kind == "cuda":
        fp16 = ("fp16 autocast with loss scaling over fp32 weights" if training
                else "fp16 weights")
        return Decision("fp16", "auto", f"auto: {device} has no native bf16 (needs compute "
                        f"capability {CUDA_BF16[0]}.{CUDA_BF16[1]}): {fp16}", device)
    if device.kind == "cpu":
        missing = ("oneDNN reports no bf16" if not device.onednn_bf16
                   else "no " + " or ".join(BF16_FLAGS[:2]))
        return Decision("fp32", "auto", f"auto: {device} has no native bf16 ({missing})",
                        device)
    return Decision("fp32", "auto", f"auto: fp32 on {device} (solar-merge picks a 16-bit format "
                    "only for CUDA GPUs and CPUs; ask for one explicitly)", device)


def announce(decision: Decision, what: str) -> None:
    """`what: precision X (reason)` at INFO, once at the start of each stage or evaluation."""
    log.info("%s: %s", what, decision)


def _warn_if_emulated(request: str, device: Device, asked: str) -> None:
    """One warning per process and (format, device) for a 16-bit format the device emulates."""
    native = {"bf16": device.native_bf16, "fp16": device.native_fp16}.get(request, True)
    if native or device.kind not in ("cpu", "cuda") or (request, str(device)) in _warned:
        return
    _warned.add((request, str(device)))
    cost = (f"a Linear layer's forward + backward took {CPU_SLOWDOWN[request]} as long as in "
            "fp32 on an AVX2 CPU (benchmarks/precision.md)" if device.kind == "cpu"
            else f"native bf16 needs compute capability {CUDA_BF16[0]}.{CUDA_BF16[1]}")
    log.warning("%s: %s does not compute %s natively, so it is emulated: %s. `precision: "
                "auto` (--precision auto) chooses %s here", asked, device, request, cost,
                _auto(device, training=True).precision)


# -- the device ----------------------------------------------------------------------------

def detect(device: str | None = None) -> Device:
    """The device a stage runs on: `device` ("cpu", "cuda", "cuda:1", "mps"); default the
    first CUDA GPU when there is one, else the CPU (as the stages choose)."""
    import torch

    kind = str(device or ("cuda" if torch.cuda.is_available() else "cpu")).split(":")[0]
    if kind == "cuda":
        index = torch.device(device).index if device and ":" in str(device) else None
        index = torch.cuda.current_device() if index is None else index
        return Device("cuda", torch.cuda.get_device_name(index),
                      capability=tuple(torch.cuda.get_device_capability(index)))
    if kind == "cpu":
        return Device("cpu", cpu_name(), flags=tuple(f for f, on in cpu_flags().items() if on),
                      onednn_bf16=onednn_bf16())
    return Device(kind, kind)


def onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 on this CPU (also true where it emulates it with AVX-512)."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@lru_cache(maxsize=1)
def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    m = re.search(r"^model name\s*:\s*(.+)$", _cpuinfo(), re.MULTILINE)
    return m.group(1).strip() if m else (platform.processor() or platform.machine())


def cpu_flags() -> dict[str, bool]:
    """{flag: present} for X86_FLAGS (ARM_FLAGS on ARM), from /proc/cpuinfo; elsewhere from
    torch.cpu.get_capabilities()."""
    m = re.search(r"^(?:flags|Features)\s*:\s*(.*)$", _cpuinfo(), re.MULTILINE)
    if m:
        present = set(m.group(1).split())
    else:
        try:
            import torch

            caps = torch.cpu.get_capabilities()
        except (ImportError, AttributeError, RuntimeError):
            caps = {}
        present = {_TORCH_NAMES.get(k, k) for k, v in caps.items() if v is True}
    arm = platform.machine().lower() in ("aarch64", "arm64")
    return {f: f in present for f in (ARM_FLAGS if arm else X86_FLAGS)}
