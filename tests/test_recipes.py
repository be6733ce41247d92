"""The shipped recipes and configs: package data found by name, listed, copied out with the
files they name, run and validated by name."""

from pathlib import Path
from types import SimpleNamespace

import yaml
from click.testing import CliRunner

from solar_merge import recipes
from solar_merge.cli import main

ROOT = Path(__file__).resolve().parent.parent
CHECKOUT = sorted([*(ROOT / "training").glob("*.yaml"), *(ROOT / "merge_configs").glob("*.yaml")])


def test_the_package_holds_the_checkouts_files_one_copy_each():
    items = recipes.shipped()
    relative = [f"{item.folder}/{item.path.name}" for item in items]
    assert sorted(relative) == sorted(str(p.relative_to(ROOT)) for p in CHECKOUT)
    for item, path in zip(items, relative):  # the same file, not a second copy that could drift
        assert item.path.resolve() == (ROOT / path).resolve()
    kinds = {item.name: item.kind for item in items}
    assert kinds["solar_10.7b"] == kinds["smollm2_demo"] == "recipe"
    assert kinds["cpt"] == "stage config" and kinds["dus"] == "merge config"


def test_recipes_lists_name_kind_description_and_command():
    result = CliRunner().invoke(main, ["recipes"])
    assert result.exit_code == 0, result.output
    for path in CHECKOUT:
        command = path.read_text().splitlines()[0].removeprefix("# ")
        assert f"$ {command}\n" in result.output, path
    line = next(x for x in result.output.splitlines() if x.startswith("solar_10.7b "))
    assert line.split()[1] == "recipe"
    assert line.endswith("SOLAR 10.7B end to end (Kim et al., 2023, arXiv 2312.15166), as one recipe")
    dus = next(x for x in result.output.splitlines() if x.startswith("dus "))
    assert "merge config" in dus and "depth up-scaling" in dus


def test_copy_lays_out_a_checkout_with_the_files_the_recipe_names(tmp_path, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(main, ["recipes", "copy", "solar_10.7b", str(tmp_path)])
    assert result.exit_code == 0, result.output
    written = {str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()}
    assert written == {"training/solar_10.7b.yaml", "merge_configs/sft_slerp.yaml",
                       "training/chat_templates/solar_instruct.jinja"}
    for name in written:
        assert (tmp_path / name).read_bytes() == (ROOT / name).read_bytes()
    # the header's command runs from the copy: its relative paths resolve inside it
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["validate", "training/solar_10.7b.yaml"])
    assert result.exit_code == 0, result.output
    assert f"-> {tmp_path}/runs/solar-10.7b" in result.output
    # copying again is a no-op; a changed file is never replaced, and nothing else is written
    assert runner.invoke(main, ["recipes", "copy", "solar_10.7b", str(tmp_path)]).exit_code == 0
    other = tmp_path / "other"
    (other / "merge_configs").mkdir(parents=True)
    (other / "merge_configs" / "sft_slerp.yaml").write_text("mine\n")
    result = runner.invoke(main, ["recipes", "copy", "solar_10.7b", str(other)])
    assert result.exit_code == 2 and "already exists" in result.output
    assert not (other / "training").exists()
    assert (other / "merge_configs" / "sft_slerp.yaml").read_text() == "mine\n"


def test_copy_of_a_merge_config_and_an_unknown_name(tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["recipes", "copy", "dus", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert [p.name for p in tmp_path.rglob("*.yaml")] == ["dus.yaml"]
    assert "mergekit-yaml merge_configs/dus.yaml OUT" in result.output
    result = runner.invoke(main, ["recipes", "copy", "solar_107b", str(tmp_path)])
    assert result.exit_code == 2 and "did you mean `solar_10.7b`" in result.output


def test_run_by_name_runs_the_shipped_recipe_as_its_copy_here_would(tmp_path, monkeypatch):
    from solar_merge.recipe import plan

    calls = []

    def fake_run(source, out, overrides, **kw):
        calls.append((source, out, overrides, kw))
        return SimpleNamespace(metrics={}, ran=[], skipped=[], out=tmp_path, final=None,
                               table=None, summary=lambda: "")

    monkeypatch.setattr("solar_merge.recipe.run", fake_run)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "solar_10.7b", "stages.cpt.train.seq_len=512"])
    assert result.exit_code == 0, result.output
    (source, out, overrides, kw), = calls
    assert overrides == ["stages.cpt.train.seq_len=512"] and out is None
    p = plan(source, out, overrides, base_dir=kw["base_dir"])
    assert p.out == tmp_path / "runs" / "solar-10.7b"          # `out: ../runs/solar-10.7b`
    cpt = p.stages["cpt"].config
    assert cpt["seq_len"] == 512 and str(tmp_path / "data" / "cpt_corpus") in str(cpt)
    slerp = recipes.root() / "merge_configs" / "sft_slerp.yaml"  # read from the package
    assert source["stages"]["sft_slerp"]["merge"]["file"] == str(slerp)


def test_validate_by_name_a_file_of_that_name_wins_and_non_recipes_are_refused(tmp_path,
                                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["validate", "solar_10.7b"])
    assert result.exit_code == 0, result.output
    assert f"-> {tmp_path}/runs/solar-10.7b" in result.output
    mine = {"name": "mine", "stages": {"dus": {"upscale": {"model": "org/m", "drop": 1}}}}
    (tmp_path / "solar_10.7b.yaml").write_text(yaml.safe_dump(mine))
    result = runner.invoke(main, ["validate", "solar_10.7b.yaml"])
    assert result.exit_code == 0 and "recipe `mine`" in result.output, result.output
    for name, command in [("cpt", "solar-merge train training/cpt.yaml"),
                          ("smollm2_demo", "solar-merge demo")]:
        result = runner.invoke(main, ["run", name])
        assert result.exit_code == 2 and command in result.output, result.output


def test_run_help_says_it_takes_a_shipped_name():
    result = CliRunner().invoke(main, ["run", "--help"])
    assert "shipped" in result.output and "solar-merge recipes" in result.output


def test_a_name_that_is_no_file_and_no_shipped_recipe_names_the_shipped_ones(tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    runnable = [item.name for item in recipes.shipped()
                if item.command.startswith("solar-merge run ")]
    assert runnable  # the recipes `run NAME` takes
    for command in ("run", "validate"):
        result = CliRunner().invoke(main, [command, "solar_10.7"])
        assert result.exit_code == 2, result.output
        assert "recipe `solar_10.7` not found" in result.output
        assert "did you mean `solar_10.7b`" in result.output
        assert all(name in result.output for name in runnable)
        assert "fix:" in result.output and "`solar-merge recipes`" in result.output
        assert "Traceback" not in result.output and not (tmp_path / "runs").exists()
