"""Stage kinds: what a kind declares is all the planner and the runner use, so a kind added
with one module and one registry entry plans, prints, runs, resumes and reaches the card."""

import json
import shutil
import types

import pytest
import yaml

from solar_merge import recipe
from solar_merge.errors import UserError
from solar_merge.kinds import StagePlan
from solar_merge.kinds.context import OVERHEAD, out_bytes, resized
from solar_merge.kinds.registry import KINDS
from solar_merge.outputs import atomic_output, is_complete, read_record

PROTOCOL = ("MODEL", "HOLDS", "DATA_FILES", "resolve", "size", "run", "describe", "card",
            "training_data", "metrics", "hub_results")


def _copy_kind(calls: list) -> types.ModuleType:
    """A kind that copies a model folder: the least a kind module defines."""
    kind = types.ModuleType("copy_kind")
    kind.MODEL, kind.HOLDS, kind.DATA_FILES = "", "a model", {}

    def resolve(name, body, ctx):
        deps = []
        model = ctx.ref(f"stages.{name}.copy.model", body.get("model"), deps)
        return StagePlan(name, "copy", ctx.out / name, deps, [body.get("model")],
                         {"model": model}, tokenizer=model)

    def size(plan, ctx):
        info = ctx.info(plan.config["model"])
        if info is not None:
            plan.info = resized(info, info.n_layers, plan.out_dir)
            plan.memory = out_bytes(info) + OVERHEAD
            plan.memory_note = "one copy of the model"

    def run(plan):
        calls.append(plan.name)
        with atomic_output(plan.out_dir, plan.hash) as work:
            for f in ("config.json", "model.safetensors"):
                shutil.copy(f"{plan.config['model']}/{f}", work / f)

    kind.resolve, kind.size, kind.run = resolve, size, run
    kind.describe = lambda plan: "copy:plain"
    kind.card = lambda plan: {"bases": plan.inputs, "datasets": []}
    kind.training_data = lambda body: []
    kind.metrics = lambda plan: None
    kind.hub_results = lambda plan, model: []
    return kind


def test_every_registered_kind_defines_the_protocol():
    for name, module in KINDS.items():
        missing = [a for a in PROTOCOL if not hasattr(module, a)]
        assert not missing, f"kind {name} lacks {missing}"
        assert module.MODEL is None or isinstance(module.MODEL, str)
        assert all(callable(getattr(module, a)) for a in PROTOCOL[3:])


def test_a_new_kind_is_one_module_and_one_registry_entry(tmp_path, tiny_model, monkeypatch):
    calls = []
    monkeypatch.setitem(KINDS, "copy", _copy_kind(calls))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "out": "runs", "stages": {
        "mine": {"copy": {"model": str(tiny_model)}},
        "stack": {"merge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "mine", "layer_range": [0, 4]}]},
            {"sources": [{"model": "mine", "layer_range": [2, 4]}]}]}}}}))
    p = recipe.plan(path)
    assert p.order == ["mine", "stack"] and p.stages["stack"].deps == ["mine"]
    assert p.stages["stack"].info.n_layers == 6  # sized from what the new kind predicts
    row = next(line for line in recipe.format_plan(p).splitlines() if " mine " in line)
    assert "copy:plain" in row and "4" in row
    assert "copy: one copy of the model" in recipe.format_plan(p)

    first = recipe.run(path, progress=False)
    assert calls == ["mine"] and first.ran == ["mine", "stack"] and first.final == p.out / "stack"
    assert read_record(p.out / "mine")["kind"] == "copy"
    assert "copy" in (p.out / "stack" / "README.md").read_text()  # the lineage on the card
    again = recipe.run(path, progress=False)
    assert calls == ["mine"] and again.skipped == ["mine", "stack"]

    with pytest.raises(UserError, match=r"stages.x.cpy: unknown key \(did you mean `copy`\?\)"):
        recipe.plan({"stages": {"x": {"cpy": {"model": str(tiny_model)}}}})


def test_a_kind_that_makes_no_model_is_refused_where_a_model_is_named(tmp_path, tiny_model):
    (tmp_path / "corpus.txt").write_text("text")
    data = {"stages": {
        "ev": {"eval": {"models": [str(tiny_model)], "tasks": "solar_manual_ppl"}},
        "cpt": {"train": {"stage": "cpt", "model": "ev", "datasets": ["corpus.txt"]}}},
        "final": "ev"}
    with pytest.raises(UserError) as e:
        recipe.plan(data, tmp_path / "runs", base_dir=tmp_path)
    assert "stages.cpt.train.model: `ev` is an eval stage (lm-eval scores, not a model)" \
        in e.value.message
    assert "final: `ev` is not a model-producing stage" in e.value.message


def test_planning_and_the_registry_import_no_heavy_library():
    import subprocess
    import sys

    code = ("import sys, solar_merge.kinds.registry, solar_merge.recipe\n"
            "print([m for m in ('torch', 'mergekit', 'trl', 'transformers') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_done_means_complete_for_the_stage_hash(tmp_path, tiny_model):
    data = {"stages": {"dus": {"upscale": {"model": str(tiny_model), "drop": 1}}}}
    p = recipe.plan(data, tmp_path / "runs", base_dir=tmp_path)
    st = p.stages["dus"]
    with atomic_output(st.out_dir, "another-config") as work:
        (work / "config.json").write_text("{}")
    assert is_complete(st.out_dir) and not recipe.stage_done(st)
    result = recipe.run(p, progress=False, card=False)
    assert result.ran == ["dus"] and recipe.stage_done(st)
    assert read_record(st.out_dir)["config_hash"] == st.hash


SCORER = '''
from pathlib import Path

from safetensors.torch import load_file

A, B = {a!r}, {b!r}


def score(model_dir):
    def embedding(folder):
        return load_file(str(Path(folder) / "model.safetensors"))["model.embed_tokens.weight"]

    a, b, e = embedding(A), embedding(B), embedding(model_dir)
    w = float(((e - a) * (b - a)).sum() / ((b - a) ** 2).sum())
    return {{"planted": -abs(w - 0.3), "w": w}}, {{"planted": True}}
'''


def test_a_search_stage_plans_runs_and_feeds_the_next_stage(tmp_path, tiny_model_factory,
                                                            monkeypatch):
    """A `search:` stage (solar_merge.search) scored by a test scorer: its best model,
    <stage>/best, is what a later stage names; finished, it is skipped."""
    import optuna

    a, b = str(tiny_model_factory(seed=0)), str(tiny_model_factory(seed=1))
    scorer = tmp_path / "scorer.py"
    scorer.write_text(SCORER.format(a=a, b=b))
    monkeypatch.setenv("SOLAR_MERGE_SEARCH_SCORER", f"{scorer}:score")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "out": "runs", "stages": {
        "best": {"search": {"candidates": [a, b], "trials": 3,
                            "merge": {"method": "solar_average",
                                      "weight": {"low": 0.0, "high": 1.0}},
                            "score": {"tasks": "solar_manual_ppl"},
                            "sampler": {"name": "random", "seed": 0}}},
        "deeper": {"upscale": {"model": "best", "drop": 1}}}}))
    p = recipe.plan(path)
    runs = tmp_path / "runs"
    assert p.order == ["best", "deeper"] and p.stages["deeper"].deps == ["best"]
    assert p.stages["deeper"].config["model"] == str(runs / "best" / "best")
    assert p.stages["deeper"].info.n_layers == 6
    assert "search:merge" in recipe.format_plan(p)

    result = recipe.run(path, progress=False)
    assert result.ran == ["best", "deeper"] and result.final == runs / "deeper"
    assert read_record(runs / "best" / "best")["config_hash"] == p.stages["best"].hash
    assert recipe.stage_costs(p)["best"]["kind"] == "search"
    study = optuna.load_study(study_name="best",
                              storage=f"sqlite:///{runs / 'best' / 'study.db'}")
    scores = [t.value for t in study.get_trials() if t.value is not None]
    assert len(scores) == 3
    best = json.loads((runs / "best" / "best" / "config.json").read_text())
    assert best["num_hidden_layers"] == 4
    assert recipe.run(path, progress=False).skipped == ["best", "deeper"]

    with pytest.raises(UserError, match="stages.best.search: unknown key `trails`"):
        recipe.plan({"stages": {"best": {"search": {
            "candidates": [a, b], "trails": 3, "score": {"tasks": "solar_manual_ppl"},
            "merge": {"method": "solar_average", "weight": 0.5}}}}})
