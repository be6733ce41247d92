"""The command line: every command the README shows exists and answers --help; demo wiring."""

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from solar_merge.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> set[tuple[str, ...]]:
    """`solar-merge CMD [SUB]` as written in README.md (its code blocks and inline code)."""
    found = set()
    text = README.read_text()
    code = "\n".join(re.findall(r"```.*?```", text, flags=re.DOTALL)
                     + re.findall(r"`[^`\n]+`", re.sub(r"```.*?```", "", text, flags=re.DOTALL)))
    for cmd, sub in re.findall(r"solar-merge ([a-z][a-z-]*)(?: ([a-z][a-z-]*))?", code):
        group = main.commands.get(cmd)
        found.add((cmd, sub) if hasattr(group, "commands") and sub else (cmd,))
    return found


def test_readme_names_the_main_commands():
    # The two set-up commands run `solar-merge demo`; the rest are the user-facing surface.
    assert {("demo",), ("dus",), ("yaml",), ("run",), ("validate",), ("train",)} \
        <= readme_commands()


@pytest.mark.parametrize("words", sorted(readme_commands()), ids=" ".join)
def test_every_readme_command_exists(words):
    result = CliRunner().invoke(main, [*words, "--help"])
    assert result.exit_code == 0, f"`solar-merge {' '.join(words)}` from README.md: " \
                                  f"{result.output}"
    assert "Usage:" in result.output


def test_demo_command_passes_its_options_to_the_demo(monkeypatch, tmp_path):
    calls = []

    def fake_run_demo(out_dir, *, quick, overrides):
        calls.append((out_dir, quick, tuple(overrides)))
        Path(out_dir).mkdir()
        (Path(out_dir) / "results.md").write_text("| model | ppl ↓ |\n|---|---:|\n| a | **1** |\n")
        return Path(out_dir) / "report.md"

    monkeypatch.setattr("solar_merge.demo.run_demo", fake_run_demo)
    out = str(tmp_path / "d")
    result = CliRunner().invoke(main, ["demo", "--quick", "--out", out,
                                       "stages.cpt.train.args.max_steps=2"])
    assert result.exit_code == 0, result.output
    assert calls == [(out, True, ("stages.cpt.train.args.max_steps=2",))]
    # the run's results table (OUT/results.md), then where the report is
    assert result.output.endswith(f"| a | **1** |\n\nreport: {out}/report.md\n"), result.output


def test_demo_dry_run_prints_the_plan_and_runs_nothing(monkeypatch, tmp_path, tiny_model):
    from solar_merge import recipe

    calls = []

    def fake_plan_demo(out_dir, *, quick, overrides):
        calls.append((out_dir, quick, tuple(overrides)))
        stages = {"dus": {"upscale": {"model": str(tiny_model), "drop": 1}}}
        return recipe.plan({"name": "demo", "stages": stages}, out_dir, base_dir=tmp_path)

    monkeypatch.setattr("solar_merge.demo.plan_demo", fake_plan_demo)
    monkeypatch.setattr("solar_merge.demo.run_demo", lambda *a, **k: pytest.fail("ran"))
    out = str(tmp_path / "d")
    result = CliRunner().invoke(main, ["demo", "--dry-run", "--out", out, "x.y=1"])
    assert result.exit_code == 0, result.output
    assert calls == [(out, False, ("x.y=1",))]
    assert "upscale:dus" in result.output and "dry run: nothing trained" in result.output
    assert not (tmp_path / "d" / "dus").exists()


def test_a_user_error_exits_2_with_its_message_and_fix(tmp_path):
    missing = tmp_path / "no-such-model"
    result = CliRunner().invoke(main, ["plan", str(missing)])
    assert result.exit_code == 2
    assert result.output.startswith(f"Error: model `{missing}` not found")
    assert "\n  fix: give an existing local model folder" in result.output
    assert "Traceback" not in result.output
    debug = CliRunner().invoke(main, ["--debug", "plan", str(missing)])
    assert debug.exit_code == 2 and "Traceback" in debug.output
    assert f"Error: model `{missing}` not found" in debug.output


def test_user_error_and_library_messages_need_no_click():
    import subprocess
    import sys

    code = ("import sys, solar_merge.errors, solar_merge.console, solar_merge.stages.launch\n"
            "assert 'click' not in sys.modules, 'click imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_messages_show_on_stderr_while_a_command_runs(monkeypatch, capsys, caplog):
    """Library modules log; the CLI shows INFO and warnings as plain lines on stderr during a
    command and leaves logging as it found it."""
    import logging

    from solar_merge import console

    log = logging.getLogger("solar_merge.somewhere")

    def speak(model, **kwargs):
        log.info("a message")
        log.warning("a warning")
        log.debug("a detail")
        raise SystemExit(0)

    monkeypatch.setattr("solar_merge.analysis.plan", speak)
    result = CliRunner().invoke(main, ["plan", "m"])
    assert result.exit_code == 0
    assert result.output == "a message\nwarning: a warning\n"
    assert not console.shown() and logging.getLogger("solar_merge").propagate
    with caplog.at_level(logging.INFO, logger="solar_merge"):
        log.info("outside a command")
    assert "outside a command" in caplog.text and capsys.readouterr().err == ""
