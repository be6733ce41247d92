"""Several processes, one output folder. Under torchrun or accelerate launch only global rank 0
writes a stage's output: it takes the lock and the work folder, renames it and marks it
complete; the other ranks follow its decisions (`agreed`) and wait for it (`barrier`). In one
process (WORLD_SIZE 1) none of this starts a process group or imports torch.
"""

import logging
import os
import shutil
from contextlib import ExitStack, contextmanager
from pathlib import Path

from solar_merge.errors import UserError
from solar_merge.outputs import OWNED, atomic_output, partial_dir

log = logging.getLogger(__name__)

HASH_FILE = "resolved_hash"  # in a work folder: the config hash of the run that owns it


def world_size() -> int:
    """Processes of this run (torchrun and accelerate launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    """Global rank 0: the one process that writes the output folder."""
    return int(os.environ.get("RANK", "0")) == 0


def distributed_state():
    """accelerate's process state, set up the way TRL's TrainingArguments will use it (gloo
    on CPU, nccl on GPUs), so that our barriers and TRL's share one process group."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def agreed(value):
    """Global rank 0's `value` on every rank (its decisions: skip, fail, go)."""
    if world_size() == 1:
        return value
    from accelerate.utils import broadcast_object_list

    distributed_state()
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        distributed_state().wait_for_everyone()


@contextmanager
def owned_output(out_dir: Path, h: str):
    """The work folder of `out_dir` (outputs.atomic_output, kept for resume, emptied if another
    config left it). Under torchrun/accelerate only global rank 0 takes the lock, makes and
    renames the folder and marks it complete; the other ranks get the same folder once rank 0
    has it ready (rank 0's failure to take it is raised on every rank) and return only when
    the finished folder is in place."""
    if world_size() == 1:
        with atomic_output(out_dir, h, keep_partial=True) as work:
            prepare_work(work, h)
            yield work
        return
    if not is_main():
        problem = agreed(None)
        if problem:
            raise UserError(problem)
        yield partial_dir(out_dir)
        barrier()
        return
    with ExitStack() as stack:
        try:
            work = stack.enter_context(atomic_output(out_dir, h, keep_partial=True))
            prepare_work(work, h)
        except UserError as e:  # e.g. another run holds the lock: every rank stops with it
            agreed(e.message)
            raise
        except BaseException as e:
            agreed(f"rank 0 could not prepare {out_dir}: {type(e).__name__}: {e}")
            raise
        agreed(None)
        yield work
    barrier()


def prepare_work(work: Path, h: str) -> None:
    """A partial folder left by another config is emptied: never resume someone else's run."""
    stamp = work / HASH_FILE
    if stamp.is_file() and stamp.read_text().strip() != h or (
            not stamp.is_file() and any(p.name != OWNED for p in work.iterdir())):
        log.info("%s was left by a run with another config: starting over", work)
        for p in work.iterdir():
            if p.name == OWNED:  # keeps the folder ours (outputs.atomic_output)
                continue
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    stamp.write_text(h + "\n")
