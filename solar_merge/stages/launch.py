"""Where a training stage runs: in this process, or on N processes and machines that
`accelerate launch` starts (DDP, DeepSpeed ZeRO, FSDP), the way `trl sft --accelerate_config`
does it; and the run of one stage in one process, where global rank 0 owns the output folder.

    train(config, out_dir, overrides=(), base_dir=None) -> Path
        resolve the stage config, then start() it.
    start(resolved, out_dir, digest=None, estimate=None) -> Path
        check that the stage fits the device memory (memory.py); then either start
        `accelerate launch [--config_file PRESET] --num_processes N ... -m solar_merge train
        STAGE.yaml -o OUT` and wait (the stage's `launch:` asks for more than this process),
        or run() here. `digest` keys the output's completion record (default: the stage's
        own hash), `estimate` is a memory estimate made already (a recipe's plan).
    run(resolved, out_dir, digest=None) -> Path
        one process, or one rank of a torchrun / accelerate launch (WORLD_SIZE > 1): rank 0
        takes the lock and the `.partial` folder, renames it, writes the marker, card and
        loss log; the others wait on barriers (stages/distributed.py).
    dry_run(config, out_dir, ...) -> str
        what `solar-merge train --dry-run` prints: the plan and the memory estimate.

Inside a launched process (WORLD_SIZE set, or SOLAR_MERGE_LAUNCHED from the parent) a stage
never launches again: `launch:` only says how the parent starts it.
"""

import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path

from solar_merge.errors import UserError, during
from solar_merge.stages.card import write_stage_card
from solar_merge.stages.distributed import (
    HASH_FILE,
    agreed,
    distributed_state,
    is_main,
    owned_output,
    world_size,
)
from solar_merge.stages.logs import LOSS_LOG, plot_loss
from solar_merge.stages.lora import describe_lora, require_4bit
from solar_merge.stages.schema import resolve, stage_hash
from solar_merge.stages.training import decide_precision

log = logging.getLogger(__name__)

LAUNCHED = "SOLAR_MERGE_LAUNCHED"
STAGE_MODULES = {"cpt": "solar_merge.stages.cpt", "sft": "solar_merge.stages.sft",
                 "dpo": "solar_merge.stages.dpo", "stepwise_dpo": "solar_merge.stages.dpo"}


class LaunchFailed(Exception):
    """The launched training processes exited with an error: the end of their output (from
    the log file they wrote into, else shown above) and how to resume."""

    def __init__(self, returncode: int, out_dir: Path, log: Path | None = None):
        self.returncode, self.out_dir, self.log = returncode, out_dir, log
        super().__init__(returncode, out_dir, log)  # the arguments: it pickles whole

    def __str__(self) -> str:
        from solar_merge.console import shown_path, tail

        ending = tail(self.log, lines=10_000).splitlines() if self.log else []
        # a rank's own error message (the CLI's `Error: ...` and its fix) says most; else
        # the last lines (a traceback's end, the launcher's report)
        first = next((i for i, line in enumerate(ending) if line.startswith("Error: ")), None)
        shown = ending[first:first + 8] if first is not None else ending[-15:]
        if first is not None:
            fix = next((i for i, line in enumerate(shown) if line.startswith("  fix: ")), None)
            shown = shown[:fix + 1] if fix is not None else shown[:1]
        where = (f"; their output is in {shown_path(self.log)}, where they said:\n"
                 + "\n".join("    " + line for line in shown)
                 if shown else " (their output is above)")
        return (f"the training processes exited with code {self.returncode}{where}\n"
                "  fix: correct what they report, then re-run the same command: it resumes "
                f"{self.out_dir} from its last checkpoint")


def train(config: dict, out_dir=None, *, overrides=(), base_dir=None,
          digest: str | None = None) -> Path:
    """Run one stage described by `config`; return the finished output folder.

    A finished stage with the same resolved config and inputs is not re-run; an interrupted
    one resumes from its last checkpoint."""
    resolved, out_dir = prepare(config, out_dir, overrides, base_dir)
    return start(resolved, out_dir, digest=digest)


def dry_run(config: dict, out_dir=None, *, overrides=(), base_dir=None) -> str:
    """Resolve and check the stage, estimate its memory, run nothing: what to print."""
    resolved, out_dir = prepare(config, out_dir, overrides, base_dir)
    launch = resolved.get("launch") or {}
    return describe(resolved, launch, check_fit(resolved, launch), out_dir)


def prepare(config: dict, out_dir, overrides, base_dir) -> tuple[dict, Path]:
    """(the resolved stage config, its absolute output folder: `out_dir`, else the config's
    `output:`)."""
    resolved = resolve(config, overrides, base_dir)
    out_dir = out_dir or resolved.get("output")
    if not out_dir:
        raise UserError("no output folder for the stage",
                        fix="pass -o OUT (or set `output:` in the stage config)")
    return resolved, Path(out_dir).absolute()


def start(resolved: dict, out_dir, *, digest: str | None = None, estimate=None) -> Path:
    """Run a resolved stage (stages.resolve) into `out_dir`: launched on the processes its
    `launch:` asks for, else here. digest: the key of the output's completion record
    (default: stage_hash(resolved)); estimate: its memory.Estimate when already made."""
    out_dir = Path(out_dir).absolute()
    launch = resolved.get("launch") or {}
    if not inside_launch():
        check_fit(resolved, launch, estimate)
        if wants_processes(launch):
            return spawn(resolved, out_dir, digest)
    return run(resolved, out_dir, digest)


# -- one process (or one rank) -----------------------------------------------------------------

def run(resolved: dict, out_dir: Path, digest: str | None = None) -> Path:
    """Run the stage into `out_dir` here: skip if finished, resume if interrupted. Global
    rank 0 writes the loss plot, stage_config.yaml and the card once the weights are saved."""
    import importlib

    from solar_merge.outputs import is_complete
    from solar_merge.precision import announce

    h = digest or stage_hash(resolved)
    n = world_size()
    if n > 1:
        distributed_state()  # one process group for our barriers and TRL's
    if agreed(is_complete(out_dir, h)):  # global rank 0 decides for everyone
        log.info("%s: %s is already complete for this config, skipping", resolved["stage"],
                 out_dir)
        return out_dir
    preflight(resolved)
    stage = importlib.import_module(STAGE_MODULES[resolved["stage"]])
    chosen = decide_precision(resolved)
    if is_main():
        announce(chosen, resolved["stage"])
    with owned_output(out_dir, h) as work:
        with during(f"{resolved['stage']} training of {resolved['model']}"):
            facts = stage.run_stage(resolved, work) or {}
        if is_main():
            facts["precision"] = f"{chosen.precision} ({chosen.reason})"
            if n > 1:
                facts["processes"] = (f"{n} ({distributed_state().distributed_type.value}, "
                                      "launched by torchrun/accelerate)")
            if resolved.get("peft"):
                facts["LoRA"] = describe_lora(resolved)
            plot_loss(work / LOSS_LOG, work / "loss.png", title=resolved["stage"])
            write_stage_card(work, resolved, facts)
            (work / HASH_FILE).unlink(missing_ok=True)
    return out_dir


def inside_launch() -> bool:
    """True in a process that torchrun / accelerate launch started."""
    return (int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ
            or os.environ.get(LAUNCHED) == "1")


def wants_processes(launch: dict) -> bool:
    return bool(launch.get("accelerate_config") or (launch.get("num_processes") or 1) > 1
                or launch.get("num_machines", 1) > 1)


# -- launching ---------------------------------------------------------------------------------

def spawn(resolved: dict, out_dir: Path, digest: str | None = None) -> Path:
    """`accelerate launch ... -m solar_merge train STAGE.yaml -o OUT`, waited for. The stage
    config handed to the processes is the resolved one (absolute paths), so they resolve it
    to the same hash; a `digest` is handed to them as `--digest`."""
    import tempfile

    import yaml

    from solar_merge import outputs

    if outputs.is_complete(out_dir, digest or stage_hash(resolved)):
        log.info("%s: %s is already complete for this config, skipping", resolved["stage"],
                 out_dir)
        return out_dir
    preflight(resolved)  # missing models/data, QLoRA without a GPU: before any process
    outputs.check_replaceable(out_dir)  # a folder that is not ours: refused before launching
    with tempfile.TemporaryDirectory(prefix="solar-merge-launch-") as folder:
        config_file = Path(folder) / "stage.yaml"
        config_file.write_text(yaml.safe_dump(resolved, sort_keys=False))
        cmd = launch_command(resolved, config_file, out_dir)
        if digest:
            cmd += ["--digest", digest]
        if outputs._OVERWRITE.get():  # the user's --overwrite reaches rank 0
            cmd.append("--overwrite")
        log.info("launching: %s", " ".join(shlex.quote(c) for c in cmd))
        code = subprocess.run(cmd, env={**os.environ, LAUNCHED: "1"}, check=False).returncode
    if code != 0:
        from solar_merge.console import current_log

        raise LaunchFailed(code, out_dir, current_log())
    return out_dir


def launch_command(resolved: dict, config_file: Path, out_dir: Path) -> list[str]:
    """The accelerate launch command line for the stage's `launch:`. A TRL preset name is
    resolved by TRL's own resolver (trl/cli/accelerate_config.py); without a config file,
    more than one process means plain DDP (--multi_gpu: gloo on CPU, nccl on GPUs). Mixed
    precision is the stage's precision decision, made here on the machine the processes run
    on (the processes decide the same), over the preset's."""
    launch = resolved.get("launch") or {}
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if launch.get("accelerate_config"):
        cmd += accelerate_config_args(launch["accelerate_config"])
    elif (launch.get("num_processes") or 1) > 1 or launch.get("num_machines", 1) > 1:
        cmd.append("--multi_gpu")
    for key in ("num_processes", "num_machines", "machine_rank", "main_process_ip",
                "main_process_port"):
        if launch.get(key) is not None:
            cmd += [f"--{key}", str(launch[key])]
    chosen = decide_precision(resolved).precision
    cmd += ["--mixed_precision", "no" if chosen == "fp32" else chosen]
    return cmd + ["-m", "solar_merge", "train", str(config_file), "-o", str(out_dir)]


def accelerate_config_args(name_or_path: str) -> list[str]:
    """["--config_file", PATH] for a TRL preset name or a config file (TRL's resolver)."""
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    try:
        return resolve_accelerate_config_argument(["--accelerate_config", str(name_or_path)])
    except ValueError as e:
        from solar_merge.stages.schema import PRESETS

        raise UserError(f"launch.accelerate_config: {e}",
                        fix=f"use one of {', '.join(PRESETS)} or an accelerate config file"
                        ) from None


def _launch_file_settings(launch: dict) -> dict:
    """num_processes / num_machines of the accelerate config file, where `launch` has none."""
    if not launch.get("accelerate_config"):
        return {}
    import yaml

    path = accelerate_config_args(launch["accelerate_config"])[1]
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, ValueError):
        return {}
    return {k: data[k] for k in ("num_processes", "num_machines") if isinstance(data.get(k), int)}


# -- will it run? will it fit? ------------------------------------------------------------------

def preflight(resolved: dict) -> None:
    """What resolve() could not check (paths may be created by earlier recipe steps):
    local models exist and hold safetensors, data files exist."""
    from solar_merge.checkpoints import require_safetensors

    for field in ("model", "ref_model"):
        value = resolved.get(field)
        if value and Path(value).is_absolute():
            folder = Path(value)
            if not folder.is_dir():
                raise UserError(f"{field}: {folder} not found",
                                fix="train or merge that model first, or fix the path")
            if not (folder / "config.json").is_file():
                raise UserError(f"{field}: {folder} has no config.json",
                                fix="point to a folder saved with save_pretrained()")
            require_safetensors(folder)
    sets = [(key, i, spec) for key in ("datasets", "eval_datasets")
            for i, spec in enumerate(resolved.get(key) or [])]
    for key, i, spec in sets:
        if Path(spec["path"]).is_absolute() and not Path(spec["path"]).exists():
            raise UserError(f"{key}[{i}]: {spec['path']} not found",
                            fix="give an existing file or folder (relative paths resolve "
                                "against the stage config's folder), or a Hub dataset name")
    if resolved.get("load_in_4bit"):
        require_4bit()


def check_fit(resolved: dict, launch: dict, estimate=None):
    """memory.from_stage for this launch (or the `estimate` given); a UserError when it cannot
    fit the device memory the user gave (launch.device_memory / --device-memory), a warning
    when it cannot fit the memory found here (GPUs by nvidia-smi, else this machine's RAM
    shared by its processes). None when the model's size is unknown (a Hub model not in the
    local cache)."""
    from solar_merge import memory
    from solar_merge.checkpoints import human

    effective = {**_launch_file_settings(launch), **launch}
    est = estimate
    if est is None:
        shape = model_shape(resolved["model"])
        if shape is None:
            return None
        est = memory.from_stage(resolved, shape, effective,
                                decide_precision(resolved).precision)
    given = launch.get("device_memory")
    available = given or detected_device_memory(effective)
    need = est.total + memory.RUNTIME
    if available and need > available:
        message = (f"{resolved['stage']} of {resolved['model']} needs about {human(need, 'B')} "
                   f"per device ({est.describe()}, + {human(memory.RUNTIME, 'B')} runtime), "
                   f"more than the {human(available, 'B')} "
                   + ("given (device_memory)" if given else "found on this machine"))
        fix = _what_fits(est, available)
        if given:
            raise UserError(message, fix=fix)
        log.warning("%s; %s", message, fix)
    return est


def _what_fits(est, available: int) -> str:
    """The first few changes that make the estimate fit, each with its own estimate."""
    from solar_merge import memory
    from solar_merge.checkpoints import human

    s = est.setup
    tries = []
    if s.strategy == "ddp" and s.devices > 1:
        tries += [("accelerate_config: zero3", {"strategy": "zero3"}),
                  ("accelerate_config: fsdp2", {"strategy": "fsdp"})]
    if not s.activation_checkpointing:
        tries.append(("args.gradient_checkpointing: true", {"activation_checkpointing": True}))
    if not s.lora:
        r16 = memory.lora_params(est.shape, 16, "all-linear")
        tries.append(("peft: {r: 16, target_modules: all-linear} (LoRA)",
                      {"lora": True, "trainable": r16}))
    if s.precision != "bf16":
        bf16 = "args.model_init_kwargs.dtype: bfloat16 (bf16 weights, gradients and moments)"
        tries.append((bf16, {"precision": "bf16"}))
    fits = []
    for label, change in tries:
        other = memory.with_strategy(est, **change)
        if other.total + memory.RUNTIME <= available:
            fits.append(f"{label} (~{human(other.total + memory.RUNTIME, 'B')} per device)")
    if fits:
        return "any of these fits: " + "; ".join(fits)
    return ("none of ZeRO-3/FSDP, activation checkpointing, LoRA or bf16 weights alone fits: "
            "combine them, use more devices (launch.num_processes) or devices with more memory")


def model_shape(model: str):
    """sizing.Shape of a local model folder (its weights' exact parameter count) or of a Hub
    model whose config.json is in the local cache; None when unknown."""
    from solar_merge.checkpoints import is_hub_id, model_info, read_config
    from solar_merge.sizing import Shape

    folder = Path(model)
    if not folder.is_dir():
        if not is_hub_id(model):
            return None
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # noqa: BLE001 - a broken cache is an unknown size
            return None
        if not isinstance(cached, str):
            return None
        return Shape.from_config(read_config(str(Path(cached).parent)))
    if not (folder / "config.json").is_file():
        return None
    return Shape.from_config(read_config(str(folder)), params=model_info(str(folder)).params)


def detected_device_memory(launch: dict) -> int | None:
    """The smallest GPU's memory (nvidia-smi), else this machine's RAM divided among the
    processes that run on it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        sizes = [int(x) for x in out.split()]
        if sizes:
            return min(sizes) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    per_machine = max(1, (launch.get("num_processes") or 1) // max(1, launch.get(
        "num_machines") or 1))
    return ram // per_machine


def describe(resolved: dict, launch: dict, estimate, out_dir: Path) -> str:
    """What `solar-merge train --dry-run` prints."""
    from solar_merge import memory
    from solar_merge.checkpoints import human

    where = ("in this process" if not wants_processes(launch) else
             f"on {launch.get('num_processes') or 'the config file’s'} processes"
             + (f" over {launch['num_machines']} machines"
                if launch.get("num_machines", 1) > 1 else "")
             + (f" ({launch['accelerate_config']})" if launch.get("accelerate_config") else ""))
    lines = [f"{resolved['stage']}: {resolved['model']} -> {out_dir}, {where}",
             str(decide_precision(resolved))]
    if estimate is None:
        lines.append("memory: unknown (the model's config.json is not available offline)")
    else:
        lines.append(f"memory: about {human(estimate.total + memory.RUNTIME, 'B')} per device "
                     f"({estimate.setup.strategy}, {estimate.setup.precision}, "
                     f"{estimate.setup.devices} device(s)): {estimate.describe()}")
    if wants_processes(launch):
        lines.append("would run: " + " ".join(shlex.quote(c) for c in launch_command(
            resolved, Path("STAGE.yaml"), out_dir)))
    return "\n".join(lines)
