"""Issue 14: `solar-merge sweep` (merge at grid points, score with lm-eval, keep the best) and
the recipe `sweep:` stage."""

import csv
import json

import pytest
from click.testing import CliRunner

from solar_merge.cli import main

TASKS = "solar_manual_ppl"  # shipped with solar-merge; lm-eval's loglikelihood_rolling


class Killed(BaseException):
    """Stands for SIGKILL at a crash point (the kill tests of outputs.py use real ones)."""


def test_sweep_endpoints_resume_and_best(tiny_model_factory, tmp_path, monkeypatch):
    from solar_merge import eval as lm
    from solar_merge import testhooks
    from solar_merge.sweep import sweep

    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    out = tmp_path / "sweep"
    kw = {"method": "solar_slerp", "grid": "0,1", "tasks": TASKS, "limit": 1,
          "progress": False}

    def die(name):
        if name == "sweep-scored":
            raise Killed(name)

    monkeypatch.setattr(testhooks, "crash_point", die)
    with pytest.raises(Killed):  # stopped right after the first point was scored
        sweep([str(a), str(b)], out, **kw)
    monkeypatch.undo()
    assert not out.exists()  # nothing that looks finished
    assert (tmp_path / ".sweep.partial" / "scores" / "t=0.json").is_file()

    result = sweep([str(a), str(b)], out, **kw)
    assert result.merged == ["t=1"]  # the scored point is not merged again
    metric = "solar_manual_ppl word_perplexity,none"
    assert result.metric == metric and not result.higher_is_better

    # endpoints equal the candidates' own evaluation
    own = lm.table(lm.evaluate({"A": str(a), "B": str(b)}, TASKS, limit=1))
    rows = {r.point.label: r.metrics for r in result.rows}
    for label, cand in (("t=0", "A"), ("t=1", "B")):
        assert rows[label] == pytest.approx(own[cand], rel=1e-9)
    best = min(("t=0", "t=1"), key=lambda k: rows[k][metric])
    assert result.best.point.label == best

    with open(out / "sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["point"] for r in table] == ["t=0", "t=1"]
    assert [r["best"] for r in table] == [str(int(r["point"] == best)) for r in table]
    assert float(table[1][metric]) == rows["t=1"][metric]
    card = (out / "best" / "README.md").read_text()
    assert "sweep" in card and "## Evaluation" in card and f"{best} (best)" in card
    assert (out / "best" / "model.safetensors").is_file() and (out / "sweep.png").is_file()
    assert not (out / "points").exists()  # only the best merge is kept

    again = sweep([str(a), str(b)], out, **kw)
    assert again.skipped and again.merged == [] and again.best.point.label == best
    assert not (out / "resolved_hash").exists()


def test_a_partial_sweep_of_another_config_is_not_resumed(tiny_model_factory, tmp_path,
                                                          monkeypatch):
    """Scores are only reused for the same candidates, grid, tasks and options."""
    from solar_merge import testhooks
    from solar_merge.sweep import sweep

    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)

    def scorer_for(value):
        return lambda folder: ({"x m,none": value}, {"x m,none": True})

    def die(name):
        if name == "sweep-scored":
            raise Killed(name)

    monkeypatch.setattr(testhooks, "crash_point", die)
    with pytest.raises(Killed):
        sweep([str(a), str(b)], tmp_path / "s", method="solar_average", grid="0,1",
              scorer=scorer_for(1.0), progress=False)
    monkeypatch.undo()
    other = sweep([str(a), str(b)], tmp_path / "s", method="solar_average", grid="0,0.5",
                  scorer=scorer_for(2.0), progress=False)
    assert other.merged == ["t=0", "t=0.5"]  # t=0 of the other grid is merged and scored anew
    assert [r.metrics["x m,none"] for r in other.rows] == [2.0, 2.0]


def test_grid_points():
    from solar_merge.sweep import grid_points, merge_config

    two = grid_points("solar_average", 2, "0,0.25,1")
    assert [(p.label, p.weights) for p in two] == [("t=0", (1, 0)), ("t=0.25", (0.75, 0.25)),
                                                   ("t=1", (0, 1))]
    three = grid_points("solar_average", 3, "0,0.5,1")
    assert sorted(p.weights for p in three) == sorted(
        [(0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0)])
    cfg = merge_config("solar_average", ["a", "b"], two[1])
    assert cfg["base_model"] == "a" and [m["parameters"]["weight"] for m in cfg["models"]] == \
        [0.75, 0.25]


@pytest.mark.parametrize("case, words", [
    ("slerp_grid", "must lie in [0, 1]"),
    ("one", "two or more candidates"),
    ("shapes", "cannot be merged"),
    ("three_slerp", "exactly two models"),
    ("grid_text", "not a comma-separated list"),
])
def test_sweep_bad_input_exits_2_and_writes_nothing(tiny_model_factory, tmp_path, case,
                                                    words):
    a, b = str(tiny_model_factory(seed=0)), str(tiny_model_factory(seed=1))
    other = str(tiny_model_factory(layers=2))
    args = {"slerp_grid": [a, b, "--method", "solar_slerp", "--grid", "0,0.5,1.5"],
            "one": [a, "--method", "solar_average"],
            "shapes": [a, other, "--method", "solar_average"],
            "three_slerp": [a, b, other, "--method", "solar_slerp"],
            "grid_text": [a, b, "--method", "solar_average", "--grid", "0,half,1"]}[case]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sweep", *args, "--tasks", TASKS, "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / ".out.partial").exists()
    assert json.loads((tiny_model_factory(seed=0) / "config.json").read_text())


def test_recipe_sweep_stage_output_is_the_best_merge(tiny_model_factory, tmp_path):
    """A later stage uses the sweep stage's output as a model."""
    from solar_merge.recipe import format_plan, plan, run

    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    recipe = {"name": "sweep-test", "stages": {
        "pick": {"sweep": {"models": [str(a), str(b)], "method": "solar_average",
                           "grid": [0, 1], "tasks": [TASKS], "limit": 1}},
        "after": {"merge": {"merge_method": "passthrough",
                            "slices": [{"sources": [{"model": "pick",
                                                     "layer_range": [0, 2]}]}]}}}}
    p = plan(recipe, tmp_path / "runs")
    assert p.order == ["pick", "after"] and "sweep" in format_plan(p)
    assert p.stages["after"].info.n_layers == 2
    result = run(recipe, tmp_path / "runs", progress=False)
    assert result.ran == ["pick", "after"]
    pick = tmp_path / "runs" / "pick"
    chosen = json.loads((pick / "sweep.json").read_text())["best"]
    with open(pick / "sweep.csv") as f:
        rows = {r["point"]: r for r in csv.DictReader(f)}
    assert rows[chosen]["best"] == "1" and (pick / "model.safetensors").is_file()
    from safetensors.torch import load_file

    source = a if chosen == "t=0" else b
    ours = load_file(pick / "model.safetensors")
    theirs = load_file(source / "model.safetensors")
    assert all((ours[k] == theirs[k]).all() for k in theirs)  # the endpoint is that candidate
    assert run(recipe, tmp_path / "runs", progress=False).skipped == ["pick", "after"]


@pytest.mark.parametrize("sweep, words", [
    ({"models": ["A"], "method": "solar_average", "tasks": [TASKS]}, "two or more"),
    ({"models": ["A", "B"], "method": "solar_slerp", "grid": [0, 2], "tasks": [TASKS]},
     "[0, 1]"),
    ({"models": ["A", "B"], "method": "solar_average", "tasks": [TASKS], "gird": [0]},
     "did you mean `grid`"),
])
def test_recipe_sweep_stage_bad_input(tiny_model_factory, tmp_path, sweep, words):
    from solar_merge.errors import UserError
    from solar_merge.recipe import plan

    refs = {"A": str(tiny_model_factory(seed=0)), "B": str(tiny_model_factory(seed=1))}
    sweep = dict(sweep, models=[refs[m] for m in sweep["models"]])
    with pytest.raises(UserError, match=words.replace("[", r"\[").replace("]", r"\]")):
        plan({"stages": {"pick": {"sweep": sweep}}}, tmp_path / "runs")
