"""The training loss: every value TRL logs, appended to loss.jsonl as it comes (a resumed run
appends to the same file), read back by step, and plotted as loss.png.
"""

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

LOSS_LOG = "loss.jsonl"


def loss_logger(work: Path):
    """A TrainerCallback that appends every `logs` dict (with its step and epoch) to
    work/loss.jsonl, on global rank 0 only."""
    from transformers import TrainerCallback

    class LossLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and state.is_world_process_zero:
                row = {"step": state.global_step, "epoch": state.epoch, **logs}
                with open(work / LOSS_LOG, "a") as f:
                    f.write(json.dumps(row, default=float) + "\n")

    return LossLog()


def read_loss(log: Path, key: str = "loss") -> list[tuple[int, float]]:
    """(step, row[key]) pairs of a loss log (key "eval_loss": TRL's held-out evaluations),
    deduplicated by step (the last entry wins, e.g. after a resume)."""
    by_step: dict[int, float] = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if key in row and "step" in row:
                by_step[int(row["step"])] = float(row[key])
    return sorted(by_step.items())


def plot_loss(log: Path, png: Path, title: str = "") -> None:
    """`png` from the loss log; none where matplotlib is not installed (an offline node that
    brought only the wheels the stages need, docs/gpu.md): the values stay in the log."""
    try:
        import matplotlib
    except ImportError:
        logger.info("matplotlib is not installed: no %s (the losses are in %s)", png.name,
                    log.name)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = read_loss(log)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, marker="." if len(points) < 50 else None)
    else:
        ax.text(0.5, 0.5, "no loss logged (raise max_steps or lower logging_steps)",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"{title} loss" if title else "loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
