"""What a person sees: solar-merge's own lines and results tables on the terminal; the
libraries' warnings, logging, progress bars and child processes in log files (--verbose:
on the terminal); errors as one message and the fix. One real `solar-merge run` of a tiny
recipe (up-scale, train, merge, eval) checks it end to end."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from solar_merge import console

SOLAR_MERGE = [sys.executable, "-m", "solar_merge"]
FAST = {"logging_steps": 1, "per_device_train_batch_size": 2, "gradient_checkpointing": False,
        "dataloader_num_workers": 0, "save_steps": 100, "learning_rate": 1e-3}
# what the libraries print when they are not captured: transformers' and datasets' progress
# bars, the Trainer's, lm-eval's, mergekit's
LIBRARY_BARS = ("Loading weights", "Tokenizing", "Saving the dataset", "Executing graph",
                "Running loglikelihood requests", "Writing model shards")


def _run(folder: Path, *args) -> tuple[int, str]:
    """`solar-merge ARGS` in `folder`: exit code and stdout + stderr as one stream, in the
    order written."""
    proc = subprocess.run([*SOLAR_MERGE, *args], check=False, cwd=folder, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=900,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    return proc.returncode, proc.stdout


def _bars(output: str) -> list[str]:
    """Every progress bar redraw in `output` (tqdm separates them with carriage returns)."""
    return [seg.strip() for seg in re.split(r"[\r\n]", output) if re.search(r"\d+%\|", seg)]


def _recipe(folder: Path, model: Path, **stages) -> Path:
    from pydoc_data.topics import topics

    (folder / "corpus.txt").write_text("\n\n".join(list(topics.values())[:4])[:4000])
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "console", "out": "runs", "stages": stages},
                                   sort_keys=False))
    return path


def test_a_recipe_run_shows_its_stages_and_ends_with_the_results_table(tmp_path, tiny_model):
    _recipe(tmp_path, tiny_model,
            dus={"upscale": {"model": str(tiny_model), "drop": 1}},
            cpt={"train": {"stage": "cpt", "model": "dus", "datasets": ["corpus.txt"],
                           "seq_len": 32, "args": {**FAST, "max_steps": 2}}},
            avg={"merge": {"merge_method": "solar_average", "dtype": "float32",
                           "models": [{"model": "cpt", "parameters": {"weight": 0.5}},
                                      {"model": "dus", "parameters": {"weight": 0.5}}]}},
            eval={"eval": {"models": ["dus", "cpt", "avg"],
                           "tasks": ["solar_manual_ppl", "solar_manual_qa"], "limit": 2}})
    code, output = _run(tmp_path, "run", "recipe.yaml")
    assert code == 0, output
    runs = tmp_path / "runs"

    # no Python warning, nothing from git, no library's progress bar; our bar stays
    assert not re.search(r"[A-Z]\w*Warning\b", output), output
    assert "fatal:" not in output, output
    assert not any(bar in output for bar in LIBRARY_BARS), output
    bars = _bars(output)
    assert bars and all(bar.startswith("console") for bar in bars), bars
    # one line per stage naming its log, the decisions under it
    for stage, kind in (("dus", "upscale"), ("cpt", "train:cpt"),
                        ("avg", "merge:solar_average"), ("eval", "eval")):
        assert re.search(rf"^\s*{stage} \({kind}[^)]*\).* · log: runs/{stage}\.log$",
                         output, re.MULTILINE), (stage, output)
    assert "  cpt: precision fp32" in output or "  cpt: precision bf16" in output
    assert "  copying tensor bytes" in output and "  merging with mergekit" in output
    # ... and the libraries' output is in those logs, git's complaint not even there
    cpt_log = (runs / "cpt.log").read_text()
    assert "FutureWarning" in cpt_log and "Tokenizing" in cpt_log
    eval_log = (runs / "eval.log").read_text()
    assert "Running loglikelihood requests" in eval_log and "fatal:" not in eval_log

    # it ends with the results table, the one in runs/results.md
    table = (runs / "results.md").read_text()
    assert output.rstrip().endswith(table.rstrip()), output[-3000:]
    assert "| stage " in output and "| model " in table
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    ppl = header.index("solar_manual_ppl word_perplexity ↓")
    import json

    scores = json.loads((runs / "eval" / "metrics.json").read_text())
    lowest = min(scores, key=lambda m: scores[m]["solar_manual_ppl word_perplexity,none"])
    bold = [line.split("|")[1].strip() for line in lines[2:5]
            if line.split("|")[ppl + 1].strip().startswith("**")]
    assert bold == [lowest]

    # --verbose: the libraries' output is on the terminal instead (only eval runs again)
    code, output = _run(tmp_path, "run", "recipe.yaml", "stages.eval.eval.limit=1",
                        "--verbose")
    assert code == 0, output
    assert "Running loglikelihood requests" in output and "· log:" not in output
    assert "cpt (train:cpt) from dus: finished earlier, skipped" in output
    assert output.rstrip().endswith((runs / "results.md").read_text().rstrip())


def test_a_user_error_inside_a_stage_is_one_message_and_its_fix(tmp_path, tiny_model):
    missing = tmp_path / "gone.txt"
    _recipe(tmp_path, tiny_model,
            cpt={"train": {"stage": "cpt", "model": str(tiny_model), "datasets": [str(missing)],
                           "seq_len": 32, "args": {**FAST, "max_steps": 1}}})
    code, output = _run(tmp_path, "run", "recipe.yaml")
    assert code == 2, output
    assert output.count("Error:") == 1 and "\n  fix: " in output, output
    assert f"{missing} not found" in output and "Traceback" not in output, output
    assert not re.search(r"[A-Z]\w*Warning\b", output), output


@pytest.mark.torchrun
def test_a_failed_launch_names_its_log_and_what_the_ranks_said(tmp_path, tiny_model):
    """Two accelerate ranks fail on an empty data set: their output went to the stage's log,
    and the error quotes the ranks' own message and fix from it."""
    (tmp_path / "empty.txt").write_text("")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"name": "launch", "out": "runs",
                                    "launch": {"num_processes": 2}, "stages": {"cpt": {"train": {
                                        "stage": "cpt", "model": str(tiny_model),
                                        "datasets": ["empty.txt"], "seq_len": 16,
                                        "args": {**FAST, "max_steps": 1}}}}}))
    code, output = _run(tmp_path, "run", "recipe.yaml")
    assert code not in (0, 2), output  # the launcher's exit code
    assert "the training processes exited with code" in output, output
    assert "their output is in runs/cpt.log, where they said:" in output, output
    assert "empty.txt is empty" in output and "fix: fill it" in output, output
    assert "Traceback" not in output and "ChildFailedError" not in output, output
    assert "ChildFailedError" in (tmp_path / "runs" / "cpt.log").read_text()


CAPTURED = """
import logging, subprocess, sys, warnings
from solar_merge import console

library = logging.getLogger("transformers.fake")  # a library's handler, made before, as
library.addHandler(logging.StreamHandler())       # transformers makes its own on stderr
console.show()
with console.capture(sys.argv[1], title="a test") as path:
    assert str(path) == sys.argv[1]
    print("printed by a library")
    warnings.warn("a library's warning", FutureWarning)
    library.warning("a library's log message")
    subprocess.run(["sh", "-c", "echo from a child process >&2"], check=True)
    logging.getLogger("solar_merge.somewhere").info("our decision")
print("back on the terminal")
"""


def test_capture_sends_everything_but_our_lines_to_the_log(tmp_path):
    """Python's streams, warnings, a library's log handler and a child process's output go
    to the log; solar-merge's own lines reach the terminal (and the log); then all is back."""
    log = tmp_path / "out.log"
    env = {k: v for k, v in os.environ.items() if k not in (console.LOG, console.VERBOSE)}
    proc = subprocess.run([sys.executable, "-c", CAPTURED, str(log)], capture_output=True,
                          text=True, env=env, check=True)
    assert proc.stderr == "our decision\n" and proc.stdout == "back on the terminal\n"
    written = log.read_text()
    assert written.startswith("==== ") and written.splitlines()[0].endswith("a test")
    for text in ("printed by a library", "FutureWarning: a library's warning",
                 "a library's log message", "from a child process", "our decision"):
        assert text in written, text


def test_capture_leaves_no_log_when_nothing_ran_and_none_with_verbose(tmp_path, monkeypatch):
    monkeypatch.delenv(console.LOG, raising=False)
    with console.capture(tmp_path / "quiet.log"):
        pass
    assert not (tmp_path / "quiet.log").exists()
    monkeypatch.setenv(console.VERBOSE, "1")
    with console.capture(tmp_path / "verbose.log") as path:
        print("stays on the terminal")
    assert path is None and not (tmp_path / "verbose.log").exists()


@pytest.mark.parametrize("command", ["eval", "sweep", "seam", "search", "train", "run", "demo",
                                     "synth-math"])
def test_tool_commands_take_verbose(command):
    from click.testing import CliRunner

    from solar_merge.cli import main

    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0 and "--verbose" in result.output
