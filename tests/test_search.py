"""`solar-merge search`: Optuna over up-scaling layouts and merge weights, scored, resumable,
shared by several workers through one study database."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml
from click.testing import CliRunner

from solar_merge.cli import main

# A synthetic score with a planted optimum: 14 layers (drop m = 1 of 8) and the second
# candidate's weight 0.3, both measured from the built model itself (its config.json and the
# mix of the candidates in its embedding), so a wrong config would score wrong.
SCORER = '''
import json
import time
from pathlib import Path

from safetensors.torch import load_file

A, B, SLEEP = {a!r}, {b!r}, {sleep!r}


def _embedding(folder):
    return load_file(str(Path(folder) / "model.safetensors"))["model.embed_tokens.weight"]


def planted(model_dir):
    layers = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"]
    a, b, e = _embedding(A), _embedding(B), _embedding(model_dir)
    w = float(((e - a) * (b - a)).sum() / ((b - a) ** 2).sum())
    time.sleep(SLEEP)
    return ({{"planted": -abs(layers - 14) - abs(w - 0.3), "layers": layers, "w": w}},
            {{"planted": True}})
'''


@pytest.fixture(scope="module")
def pair(tiny_model_factory):
    return str(tiny_model_factory(layers=8, seed=0)), str(tiny_model_factory(layers=8, seed=1))


def write_scorer(folder, pair, sleep=0.0):
    path = folder / "scorer.py"
    path.write_text(SCORER.format(a=pair[0], b=pair[1], sleep=sleep))
    return path


def load_scorer(path):
    import runpy

    return runpy.run_path(str(path))["planted"]


def space(pair, **changes) -> dict:
    doc = {"candidates": list(pair), "layout": {"drop": {"low": 1, "high": 3}},
           "merge": {"method": "solar_average", "weight": {"low": 0.0, "high": 1.0}},
           "score": {"tasks": "solar_manual_ppl", "limit": 1},
           "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 3}}
    doc.update(changes)
    return doc


def write_space(folder, doc) -> str:
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def study_of(out, name="space"):
    import optuna

    return optuna.load_study(study_name=name, storage=f"sqlite:///{out / 'study.db'}")


def tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def planted_search(pair, tmp_path_factory):
    from solar_merge.search import parse_space, run

    folder = tmp_path_factory.mktemp("planted")
    scorer = load_scorer(write_scorer(folder, pair))
    out = folder / "out"
    result = run(parse_space(space(pair, study="space")), out, trials=6, scorer=scorer)
    return result, out


def test_six_trials_find_the_planted_optimum(planted_search):
    from optuna.trial import TrialState

    result, out = planted_search
    study = study_of(out)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    default = trials[0]
    assert default.user_attrs["default"] and default.params == {"drop": 2, "weight": 0.6}
    assert result.best["params"]["drop"] == 1  # the planted 14 layers
    assert abs(result.best["params"]["weight"] - 0.3) < 0.25
    assert result.best["value"] > default.value + 1.5  # default: 12 layers, w 0.6 -> -2.3
    for t in trials:  # every score was measured on a model built as its parameters say
        m = t.user_attrs["metrics"]
        assert m["layers"] == 2 * (8 - t.params["drop"])
        assert m["w"] == pytest.approx(t.params["weight"], abs=1e-5)
    # only the best trial's model is kept; best/ is that model, with a card
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{study.best_trial.number}"]
    best = tensors(out / "best")
    assert all((best[k] == v).all() for k, v in tensors(
        out / "trials" / f"trial-{study.best_trial.number}").items())
    card = (out / "best" / "README.md").read_text()
    assert "## How it was found" in card and "TPE" in card and "planted" in card
    assert f"The hand-chosen default (trial 0: drop=2, weight=0.6) scored {default.value:.6g}" \
        in card
    report = (out / "report.md").read_text()
    assert "| best |" in report and "| default" in report and "![importance]" in report
    for name in ("progress.png", "importance.png", "trials.csv", "best.yaml"):
        assert (out / name).stat().st_size > 0
    assert result.disk_peak > 0 and "disk peak" in result.summary()


def test_best_config_runs_with_stock_mergekit_yaml(planted_search, tmp_path):
    """best.yaml holds only mergekit's own keys, and mergekit-yaml rebuilds the best model."""
    from solar_merge.merging import TOP_KEYS

    _, out = planted_search
    config = yaml.safe_load((out / "best.yaml").read_text())
    assert set(config) <= TOP_KEYS
    mergekit_yaml = shutil.which("mergekit-yaml")
    assert mergekit_yaml
    again = tmp_path / "again"
    done = subprocess.run([mergekit_yaml, str(out / "best.yaml"), str(again),
                           "--copy-tokenizer", "--clone-tensors"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    ours, theirs = tensors(out / "best"), tensors(again)
    assert ours.keys() == theirs.keys()
    assert all((ours[k] == theirs[k]).all() for k in ours)


@pytest.mark.parametrize("layout, merge", [
    ({"drop": 2, "scale_overlap": 0.5}, {"method": "solar_average", "weight": 0.3}),
    ({"method": "expand", "blocks": 2, "init": "identity"},
     {"method": "solar_average", "weight": 0.3}),
    ({"method": "expand", "blocks": 2, "init": "average"},
     {"method": "solar_average", "weight": 0.3}),
    ({"drop": 3}, {"method": "solar_slerp", "t": 0.3}),
])
def test_one_config_is_the_layout_of_the_merge(pair, tmp_path, layout, merge):
    """Candidates up-scaled and merged in one mergekit config equal the merge of the
    candidates up-scaled afterwards (two mergekit runs)."""
    from solar_merge import upscale
    from solar_merge.merging import merge as run_merge
    from solar_merge.search import parse_space, prepare

    key = "weight" if "weight" in merge else "t"
    searched = {**merge, key: [merge[key], 0.5]}  # one searched value, so the space is not empty
    plan = prepare(parse_space(space(pair, layout=layout, merge=searched)))
    config, _ = plan.config(plan.point_of({key: merge[key]}))
    one = run_merge(config, tmp_path / "one")

    value = merge[key]
    whole = ({"merge_method": "solar_slerp", "base_model": pair[0],
              "models": [{"model": m} for m in pair], "parameters": {"t": value}}
             if key == "t" else
             {"merge_method": "solar_average", "base_model": pair[0],
              "models": [{"model": pair[0], "parameters": {"weight": 1 - value}},
                         {"model": pair[1], "parameters": {"weight": value}}]})
    merged = run_merge(whole, tmp_path / "merged")
    options = {k: v for k, v in layout.items() if k != "method"}
    two = upscale.plan_upscale(str(merged), layout.get("method", "dus"), **options).run(
        tmp_path / "two")
    a, b = tensors(one), tensors(two)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, worst


def test_merge_parameters_as_mergekit_writes_them(pair):
    """Per-filter and per-layer-group values become mergekit's own parameter syntax."""
    from solar_merge.search import parse_space, prepare

    doc = space(pair, merge={"method": "solar_slerp", "t": {"low": 0, "high": 1},
                             "groups": 2, "filters": ["self_attn"]})
    del doc["layout"]
    plan = prepare(parse_space(doc))
    assert plan.searched == ["t.self_attn.g0", "t.self_attn.g1", "t.rest.g0", "t.rest.g1"]
    config, _ = plan.config(plan.point_of({"t.self_attn.g0": 0.1, "t.self_attn.g1": 0.2,
                                           "t.rest.g0": 0.7, "t.rest.g1": 0.9}))
    assert config["parameters"] == {"t": [{"filter": "self_attn", "value": [0.1, 0.2]},
                                          {"value": [0.7, 0.9]}]}
    three = prepare(parse_space({**space(pair), "candidates": [*pair, pair[0] + "/."]}))
    assert three.searched == ["drop", "weight.0", "weight.1", "weight.2"]
    assert three.default == {"drop": 2, "weight.0": 1.0, "weight.1": 1.0, "weight.2": 1.0}


def test_layout_search_of_one_model(pair, tmp_path):
    """A layout space (dus or expand, with upscale.py's inits) over one model: each trial's
    model has the layers its parameters ask for."""
    from solar_merge import upscale
    from solar_merge.search import parse_space, run

    doc = {"model": pair[0],
           "layout": {"method": ["dus", "expand"], "drop": [1, 2, 3], "blocks": [2, 4],
                      "init": list(upscale.INIT)},
           "score": {"tasks": "solar_manual_ppl"}, "sampler": {"name": "random", "seed": 1}}
    scorer = load_scorer(write_scorer(tmp_path, pair))
    result = run(parse_space(doc), tmp_path / "out", trials=8, scorer=scorer)
    trials = study_of(tmp_path / "out", "search").get_trials()
    assert len(trials) == 8 and trials[0].params == {"layout": "dus", "drop": 2}
    assert {t.params.get("init") for t in trials} > {None, "identity"}  # several inits ran
    for t in trials:
        want = 2 * (8 - t.params["drop"]) if t.params["layout"] == "dus" else \
            8 + t.params["blocks"]
        assert t.user_attrs["metrics"]["layers"] == want
    assert (result.best_dir / "config.json").is_file()


def test_perplexity_scoring_reports_every_batch(pair, tmp_path):
    """Held-out perplexity is minimised and reported batch by batch (what the pruner reads)."""
    from pydoc_data.topics import topics

    from solar_merge.search import parse_space, run

    (tmp_path / "heldout.txt").write_text("\n\n".join(list(topics.values())[:20]))
    doc = space(pair, score={"perplexity": {"data": "heldout.txt", "samples": 4, "seq_len": 32,
                                            "batch_size": 1}})
    result = run(parse_space(doc), tmp_path / "out", base_dir=tmp_path, trials=3)
    study = study_of(tmp_path / "out", "search")
    assert study.direction.name == "MINIMIZE" and result.metric == "perplexity"
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    assert all(sorted(t.intermediate_values) == [0, 1, 2, 3] for t in done)
    assert all(t.value == pytest.approx(t.intermediate_values[3]) for t in done)
    assert result.best["value"] == min(t.value for t in done)


def test_a_short_cpt_before_each_score(pair, tmp_path):
    """With `cpt:`, each trial's merge is trained by a `solar-merge train` cpt stage and the
    trained model is scored and published; best.yaml says it rebuilds the merge before it."""
    from pydoc_data.topics import topics

    from solar_merge.merging import merge
    from solar_merge.search import parse_space, run

    (tmp_path / "corpus.txt").write_text("\n\n".join(list(topics.values())[:4]))
    (tmp_path / "cpt.yaml").write_text(yaml.safe_dump({
        "stage": "cpt", "model": "unused", "datasets": ["corpus.txt"], "seq_len": 32,
        "args": {"max_steps": 2, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
                 "save_steps": 100, "logging_steps": 1, "gradient_checkpointing": False}}))
    scored = []

    def scorer(model_dir):
        scored.append(model_dir)
        return {"x": float(len(scored))}, {"x": True}

    doc = space(pair, cpt={"config": "cpt.yaml"})
    del doc["layout"]
    result = run(parse_space(doc), tmp_path / "out", base_dir=tmp_path, trials=2,
                 scorer=scorer)
    assert [p.name for p in scored] == ["trial-0-cpt", "trial-1-cpt"]
    assert (result.best_dir / "loss.jsonl").is_file()  # the CPT stage's model, not the merge
    assert sorted(p.name for p in (tmp_path / "out" / "trials").iterdir()) == ["trial-1-cpt"]
    best_yaml = tmp_path / "out" / "best.yaml"
    assert "before its continued pretraining" in best_yaml.read_text()
    merged, trained = tensors(merge(best_yaml, tmp_path / "merged")), tensors(result.best_dir)
    assert any(not (merged[k] == trained[k]).all() for k in merged)


def test_lm_eval_scoring(pair, tmp_path):
    """Without a scorer hook each trial is scored by lm-eval; its direction comes from the
    task (perplexity: lower is better)."""
    from solar_merge.search import parse_space, run

    doc = space(pair)
    del doc["layout"]
    result = run(parse_space(doc), tmp_path / "out", trials=2)
    assert result.metric == "solar_manual_ppl word_perplexity,none"
    assert result.direction == "minimize"
    study = study_of(tmp_path / "out", "search")
    assert all(t.user_attrs["metrics"][result.metric] == t.value for t in study.get_trials())
    assert (tmp_path / "out" / "evals" / "trial-1" / "trial-1" / "results.json").is_file()


def _search(folder, out, trials, env=None, wait=True):
    cmd = [sys.executable, "-m", "solar_merge", "search", str(folder / "space.yaml"), "-o",
           str(out), "--trials", str(trials)]
    env = {**os.environ, "SOLAR_MERGE_SEARCH_SCORER": f"{folder / 'scorer.py'}:planted",
           **(env or {})}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    if not wait:
        return proc
    output, _ = proc.communicate(timeout=600)
    return proc.returncode, output


@pytest.mark.slow
def test_killed_search_resumes_to_exactly_the_asked_trials(pair, tmp_path):
    """Killed inside a trial, then between trials: the reruns end with exactly 4 complete
    trials; the dead worker's trial is failed, retried with its parameters, and its
    half-built folder removed."""
    from optuna.trial import TrialState

    write_scorer(tmp_path, pair)
    write_space(tmp_path, space(pair))
    out = tmp_path / "out"
    code, output = _search(tmp_path, out, 4, {"SOLAR_MERGE_KILL_AT": "search-built"})
    assert code == -9, output
    assert [t.state for t in study_of(out).get_trials()] == [TrialState.RUNNING]
    code, output = _search(tmp_path, out, 4, {"SOLAR_MERGE_KILL_AT": "search-trial-done"})
    assert code == -9, output
    trials = study_of(out).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].params == trials[0].params and trials[1].user_attrs["default"]
    assert trials[1].system_attrs["failed_trial"] == 0
    code, output = _search(tmp_path, out, 4)
    assert code == 0, output
    trials = study_of(out).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL] + [TrialState.COMPLETE] * 4
    best = study_of(out).best_trial.number
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{best}"]
    from solar_merge.search import load_space, run

    again = run(load_space(tmp_path / "space.yaml"), out, base_dir=tmp_path, trials=4,
                scorer=load_scorer(tmp_path / "scorer.py"))  # finished: nothing more runs
    assert again.ran == [] and again.finished == 4 and len(study_of(out).get_trials()) == 5


@pytest.mark.slow
def test_two_workers_share_one_sqlite_study(pair, tmp_path):
    write_scorer(tmp_path, pair, sleep=1.0)
    write_space(tmp_path, space(pair))
    out = tmp_path / "out"
    procs = [_search(tmp_path, out, 6, wait=False) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = study_of(out).get_trials()
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6
    # anything else is a trial asked at the same moment as the last one, never run
    assert all(t.user_attrs.get("surplus") for t in trials if t.state.name != "COMPLETE")
    workers = {t.user_attrs["worker"]["pid"] for t in complete}
    assert workers == {p.pid for p in procs}  # both did some of the work
    assert sum(t.user_attrs.get("default", False) for t in trials) == 1
    best = study_of(out).best_trial.number
    assert sorted(p.name for p in (out / "trials").iterdir()) == [f"trial-{best}"]


@pytest.mark.parametrize("case, words", [
    ("empty", "the search space is empty"),
    ("type", "layout.drop: expected an integer"),
    ("range", "layout.drop: 4 is out of range for a 8-layer model"),
    ("key", "unknown key `merge.wieght` (did you mean `weight`?)"),
    ("choices", "an empty list of choices"),
    ("slerp", "t: solar_slerp's t lies in [0, 1]"),
    ("task", "unknown task: `solar_manual_pll`"),
    ("storage", "cannot open the study database"),
])
def test_bad_input_exits_2_and_writes_nothing(pair, tmp_path, case, words):
    doc = space(pair)
    extra = []
    if case == "empty":
        doc.update(layout={"drop": 2}, merge={"method": "solar_average", "weight": 0.5})
    elif case == "type":
        doc["layout"]["drop"] = "eight"
    elif case == "range":
        doc["layout"]["drop"] = {"low": 1, "high": 4}
    elif case == "key":
        doc["merge"] = {"method": "solar_average", "wieght": 0.5}
    elif case == "choices":
        doc["layout"]["drop"] = []
    elif case == "slerp":
        doc["merge"] = {"method": "solar_slerp", "t": {"low": 0, "high": 1.5}}
    elif case == "task":
        doc["score"] = {"tasks": "solar_manual_pll"}
    else:
        extra = ["--storage", f"sqlite:///{tmp_path}/no/such/folder/study.db"]
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["search", write_space(tmp_path, doc), "-o", str(out),
                                       *extra])
    assert result.exit_code == 2, result.output
    assert words in result.output and "fix:" in result.output, result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["space.yaml"]
