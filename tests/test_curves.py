"""Issue 14: the demo's control arm (held-out perplexity curves of two CPT runs, compared)."""

import json
import math

import pytest
import yaml

from solar_merge.curves import arms_section, crossing, eval_curve


def _log(folder, rows):
    folder.mkdir()
    lines = [json.dumps(r) for r in rows]
    lines.insert(1, '{"step": 3, "eval_lo')  # a line cut short by a kill is skipped
    (folder / "loss.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_eval_curve_reads_eval_loss_as_perplexity(tmp_path):
    run = _log(tmp_path / "a", [{"step": 0, "eval_loss": 2.0}, {"step": 1, "loss": 9.0},
                                {"step": 5, "eval_loss": 1.5}, {"step": 5, "eval_loss": 1.0}])
    assert eval_curve(run) == [(0, math.exp(2.0)), (5, math.exp(1.0))]  # a resumed step: last


def test_crossing():
    control = [(0, 10.0), (5, 9.0), (10, 8.0), (15, 7.0)]
    overtakes = crossing([(0, 20.0), (5, 9.5), (10, 7.5), (15, 6.0)], control)
    assert overtakes.first_ahead == 10 and overtakes.ahead_at_end
    assert "overtook base at step 10" in overtakes.sentence("dus", "base")
    never = crossing([(0, 20.0), (5, 12.0), (10, 9.0), (15, 7.5)], control)
    assert never.first_ahead is None and not never.ahead_at_end
    assert "has NOT overtaken base within 15 steps" in never.sentence("dus", "base")
    back = crossing([(0, 20.0), (5, 8.0), (10, 9.0), (15, 8.0)], control)
    assert back.first_ahead == 5 and not back.ahead_at_end
    assert "behind again" in back.sentence("dus", "base")
    again = crossing([(0, 20.0), (5, 8.0), (10, 9.0), (15, 6.0)], control)
    assert again.first_ahead == 15  # ahead for good only from the last dip
    assert crossing([(1, 1.0)], [(2, 1.0)]).last is None


def test_arms_section_writes_one_figure_and_a_verdict(tmp_path):
    a = _log(tmp_path / "cpt", [{"step": 0, "eval_loss": 3.0}, {"step": 5, "eval_loss": 2.0}])
    b = _log(tmp_path / "base", [{"step": 0, "eval_loss": 2.5}, {"step": 5, "eval_loss": 2.2}])
    lines, cross = arms_section(("DUS + CPT", a), ("base + CPT", b), tmp_path / "c.png")
    assert cross.first_ahead == 5
    assert lines[0] == ("**DUS + CPT overtook base + CPT at step 5 and stays ahead (at step 5: "
                        "DUS + CPT 7.389 vs base + CPT 9.025 held-out perplexity).**")
    assert "| 0 | 20.086 | 12.182 |" in lines
    assert (tmp_path / "c.png").stat().st_size > 10_000


def test_demo_control_arm_gets_exactly_the_cpt_of_the_dus_model():
    from solar_merge.demo import QUICK_OVERRIDES, RECIPE, control_arm_overrides
    from solar_merge.stages import apply_overrides

    stages = yaml.safe_load(RECIPE.read_text())["stages"]
    cpt, base = stages["cpt"]["train"], stages["base_cpt"]["train"]
    assert cpt["model"] == "dus" and base["model"] == "smollm2-135m-instruct"
    assert {k: v for k, v in cpt.items() if k != "model"} == \
        {k: v for k, v in base.items() if k != "model"}
    assert cpt["eval_datasets"] and cpt["args"]["eval_strategy"] == "steps"
    # whatever --quick and the user change in the cpt stage, both arms run the same CPT
    user = ["stages.cpt.train.args.max_steps=7", "stages.cpt.train.seq_len=48",
            "stages.cpt.train.model=x"]
    for overrides in (QUICK_OVERRIDES, user, [*QUICK_OVERRIDES, *user]):
        assert any(o.startswith("stages.cpt.train.") for o in overrides)
        changed = apply_overrides({"stages": stages}, control_arm_overrides(overrides))["stages"]
        cpt, base = changed["cpt"]["train"], changed["base_cpt"]["train"]
        assert cpt != stages["cpt"]["train"]  # the overrides reached the cpt stage
        assert base["model"] == "smollm2-135m-instruct"  # the control arm keeps its model
        assert {k: v for k, v in cpt.items() if k != "model"} == \
            {k: v for k, v in base.items() if k != "model"}


def _law_curve(c, b, a, *, noise=0.003, seed=1, steps=range(0, 21, 4)):
    import numpy as np

    from solar_merge.curves import saturating

    rng = np.random.default_rng(seed)
    return [(s, math.exp(saturating(s, c, b, a) + noise * rng.standard_normal())) for s in steps]


def test_forecast_finds_a_known_crossing_with_an_interval():
    """loss 1.8 + 2 (1+t)^-0.5 meets 2 + (1+t)^-0.5 where (1+t)^0.5 = 5: step 24, after the
    measured steps 0-20 (the treatment is behind at every one of them)."""
    from solar_merge.curves import forecast

    control, treatment = _law_curve(2.0, 1.0, 0.5), _law_curve(1.8, 2.0, 0.5, seed=2)
    assert all(t > c for (_, t), (_, c) in zip(treatment, control))
    result = forecast(treatment, control)
    assert result.step == pytest.approx(24, abs=1.5)
    assert result.low <= 24 <= result.high and result.high - result.low < 10
    assert result.share > 0.9 and result.last == 20
    text = result.sentence("DUS + CPT", "base + CPT")
    assert f"for good from step **{result.step:.0f}**" in text and "90% interval" in text


def test_forecast_says_when_curves_are_not_expected_to_cross():
    from solar_merge.curves import forecast, forecast_paragraph

    control = _law_curve(2.0, 1.0, 0.5)
    never = forecast(_law_curve(2.1, 2.0, 0.5, seed=2), control)
    assert never.step is None and never.share < 0.05
    assert "not expected to drop below" in never.sentence("DUS", "base")
    ahead = forecast(_law_curve(1.5, 0.5, 0.5, seed=3), control)
    assert ahead.step == 0 and "from the start" in ahead.sentence("DUS", "base")
    few = forecast_paragraph(("DUS", control[:3]), ("base", control))
    assert "needs at least 4 evaluation points" in few[0] and "(fewest points: 3)" in few[0]
    assert "extrapolation" in forecast_paragraph(("DUS", control), ("base", control))[0]


def test_a_crossing_most_draws_do_not_make_is_said_to_be_unsettled():
    """The interval is over every parameter draw, those that never cross counting as beyond
    the horizon: it cannot leave out the fitted crossing by looking only at the draws that
    cross early."""
    from solar_merge.curves import Fit, Forecast

    fit = Fit(params=(0.0, 3.0, 0.05), cov=[], points=6)
    result = Forecast(step=681, low=3, high=math.inf, share=0.27, horizon=1000, last=20,
                      fits={"treatment": fit, "control": fit}, points=6, draws=2000)
    text = result.sentence("DUS + CPT", "base + CPT")
    assert "for good from step **681**" in text
    assert "90% interval 3 to beyond 1000 over the parameter draws" in text
    assert "Fewer than half of the draws cross" in text
