"""Hooks for the test suite: kill points and trainer hooks, inert unless the suite arms them.

The suite arms them with `arm()` (tests/conftest.py does, when pytest loads it): that sets
SOLAR_MERGE_TEST_HOOKS=1 in the environment, so that every process a test starts (a
`solar-merge` command, the ranks of an accelerate launch) is armed too. A harness that
measures training (benchmarks/) arms them the same way. Unarmed, the functions here return at
once: they read no other environment variable and run no code they are given.

Armed:
- `crash_point(name)`: the process kills itself (SIGKILL, no clean-up) at the named point when
  SOLAR_MERGE_KILL_AT=name; SOLAR_MERGE_KILL_RANK=r limits that to global rank r. The points
  are where the code calls crash_point (outputs: work-created, before-marker, between-renames;
  merges, sweeps, searches, synth-math name theirs) and, inside training,
  after-checkpoint-<step> (right after that checkpoint is saved) and before-update-<step>
  (inside that step, after its gradients were all-reduced: every rank is past the checkpoint
  before it).
- trainer hooks: every `hook(trainer, info)` in TRAINER_HOOKS runs right before
  trainer.train(), info = {"stage", "work", "model", "ref_model", "step"}, to stop a run or
  inspect the trainer (masks, reference weights); SOLAR_MERGE_TRAINER_HOOK=FILE.py:NAME adds
  the function NAME of FILE.py in processes a test cannot reach (the ranks of a launch).
"""

import os
import signal

ARMED = "SOLAR_MERGE_TEST_HOOKS"
KILL_AT = "SOLAR_MERGE_KILL_AT"
KILL_RANK = "SOLAR_MERGE_KILL_RANK"
TRAINER_HOOK = "SOLAR_MERGE_TRAINER_HOOK"

TRAINER_HOOKS: list = []


def arm() -> None:
    """Arm the hooks in this process and the processes it starts."""
    os.environ[ARMED] = "1"


def armed() -> bool:
    return os.environ.get(ARMED) == "1"


def crash_point(name: str) -> None:
    """SIGKILL this process here when armed and SOLAR_MERGE_KILL_AT names this point (and,
    with SOLAR_MERGE_KILL_RANK, this is that rank)."""
    if not armed() or os.environ.get(KILL_AT) != name:
        return
    rank = os.environ.get(KILL_RANK)
    if rank is None or rank == os.environ.get("RANK", "0"):
        os.kill(os.getpid(), signal.SIGKILL)


def trainer_hooks() -> list:
    """The hooks to call before trainer.train(): TRAINER_HOOKS and SOLAR_MERGE_TRAINER_HOOK's
    (none unless armed)."""
    if not armed():
        return []
    hooks = list(TRAINER_HOOKS)
    spec = os.environ.get(TRAINER_HOOK)
    if spec:
        import runpy

        file, _, name = spec.rpartition(":")
        hooks.append(runpy.run_path(file)[name])
    return hooks


def trainer_callbacks() -> list:
    """The kill points inside training as a transformers TrainerCallback (none unless armed
    and a kill point is asked for)."""
    if not armed() or not os.environ.get(KILL_AT):
        return []
    from transformers import TrainerCallback

    class KillPoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            crash_point(f"after-checkpoint-{state.global_step}")

        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            crash_point(f"before-update-{state.global_step + 1}")

    return [KillPoints()]
