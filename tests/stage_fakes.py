"""Stand-ins for the stage kinds' tools, for tests of the recipe runner: instant, no model."""

import json

from solar_merge.kinds.registry import KINDS
from solar_merge.outputs import atomic_output


class Spy:
    """Runners that write a complete output marked with the stage hash (as the real tools
    do) and record every call; `fail` names a stage that is interrupted instead."""

    def __init__(self, fail: str | None = None):
        self.calls: list[str] = []
        self.fail = fail

    def runner(self, st):
        self.calls.append(st.name)
        # like the real tools: training keeps its partial folder (checkpoints) to resume
        with atomic_output(st.out_dir, st.hash, keep_partial=st.kind == "train") as work:
            (work / "config.json").write_text(json.dumps(st.config, default=str))
            if st.name == self.fail:
                (work / "checkpoint-1").mkdir()
                raise RuntimeError("interrupted")
            if st.kind == "eval":
                (work / "metrics.json").write_text(json.dumps({"m": {"score": 1.0}}))

    def runners(self):
        return dict.fromkeys(KINDS, self.runner)
