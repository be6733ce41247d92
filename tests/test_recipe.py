"""Recipes: schema, graph, planning, resume logic (fake runners, instant) and one tiny recipe
run end to end with the real tools (upscale, cpt, two merges, eval)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from stage_fakes import Spy

from solar_merge import recipe
from solar_merge.errors import UserError
from solar_merge.kinds.registry import KINDS
from solar_merge.outputs import MARKER, OWNED, is_complete, partial_dir, read_record

ROOT = Path(__file__).resolve().parent.parent
FAST = {"logging_steps": 1, "per_device_train_batch_size": 2, "gradient_checkpointing": False,
        "dataloader_num_workers": 0, "save_steps": 100, "learning_rate": 1e-3}


def _corpus(folder: Path) -> Path:
    from pydoc_data.topics import topics

    path = folder / "corpus.txt"
    path.write_text("\n\n".join(list(topics.values())[:4])[:4000])
    return path


def _recipe(folder: Path, data: dict) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _pipeline(model: Path, folder: Path) -> dict:
    """upscale 4 -> 6 layers, cpt 2 steps, average + SLERP (from a file naming stages), eval."""
    _corpus(folder)
    (folder / "slerp.yaml").write_text(yaml.safe_dump({
        "merge_method": "solar_slerp", "models": [{"model": "cpt"}, {"model": "dus"}],
        "parameters": {"t": 0.5}, "dtype": "float32"}))
    return {
        "name": "tiny", "out": "runs", "final": "avg",
        "stages": {
            "dus": {"upscale": {"model": str(model), "drop": 1}},
            "cpt": {"train": {"stage": "cpt", "model": "dus", "datasets": ["corpus.txt"],
                              "seq_len": 32, "args": {**FAST, "max_steps": 2}}},
            "avg": {"merge": {"merge_method": "solar_average", "dtype": "float32",
                              "models": [{"model": "cpt", "parameters": {"weight": 0.4}},
                                         {"model": "dus", "parameters": {"weight": 0.6}}]}},
            "slerp": {"merge": {"file": "slerp.yaml"}},
            "eval": {"eval": {"models": ["dus", "avg", "slerp"], "tasks": "solar_manual_ppl",
                              "limit": 2}},
        },
    }


# -- fake runners (stage_fakes.Spy): the resume logic without any model --------------------

@pytest.fixture
def fake_recipe(tmp_path, tiny_model):
    _corpus(tmp_path)
    data = {
        "name": "fake", "out": "runs",
        "stages": {
            "dus": {"upscale": {"model": str(tiny_model), "drop": 1}},
            "cpt": {"train": {"stage": "cpt", "model": "dus", "datasets": ["corpus.txt"],
                              "args": {"max_steps": 2}}},
            "sft": {"train": {"stage": "sft", "model": "cpt", "datasets": ["corpus.txt"]}},
            "other": {"train": {"stage": "sft", "model": "dus", "datasets": ["corpus.txt"]}},
            "avg": {"merge": {"merge_method": "solar_average",
                              "models": [{"model": "sft", "parameters": {"weight": 0.4}},
                                         {"model": "other", "parameters": {"weight": 0.6}}]}},
            "eval": {"eval": {"models": ["avg"], "tasks": "solar_manual_ppl"}},
        },
    }
    return _recipe(tmp_path, data)


def test_plan_orders_resolves_and_sizes(fake_recipe, tmp_path):
    p = recipe.plan(fake_recipe)
    assert p.order == ["dus", "cpt", "sft", "other", "avg", "eval"]
    assert p.out == tmp_path / "runs" and p.final == "avg"
    cpt = p.stages["cpt"]
    assert cpt.deps == ["dus"] and cpt.config["model"] == str(tmp_path / "runs" / "dus")
    assert cpt.config["datasets"][0]["path"] == str(tmp_path / "corpus.txt")
    assert p.stages["avg"].deps == ["sft", "other"]
    # predicted shapes: 4 -> 6 layers, exact parameter counts from the safetensors headers
    dus = p.stages["dus"].info
    assert dus.n_layers == 6 and p.stages["avg"].info.n_layers == 6
    assert dus.params == p.stages["avg"].info.params > 0
    text = recipe.format_plan(p)
    for name in p.order:
        assert name in text
    assert "memory" in text and "estimate" in text


def test_skip_rerun_on_change_and_downstream_only(fake_recipe):
    spy = Spy()
    first = recipe.run(fake_recipe, runners=spy.runners(), progress=False, card=False)
    assert spy.calls == first.ran == ["dus", "cpt", "sft", "other", "avg", "eval"]
    assert first.metrics == {"eval": {"m": {"score": 1.0}}}

    spy.calls.clear()
    again = recipe.run(fake_recipe, runners=spy.runners(), progress=False, card=False)
    assert spy.calls == [] and again.skipped == first.ran

    # change cpt: cpt and everything downstream of it re-run; dus and `other` do not
    spy.calls.clear()
    changed = recipe.run(fake_recipe, overrides=["stages.cpt.train.args.max_steps=3"],
                         runners=spy.runners(), progress=False, card=False)
    assert spy.calls == ["cpt", "sft", "avg", "eval"]
    assert changed.skipped == ["dus", "other"]


def test_interrupted_stage_is_not_taken_for_finished(fake_recipe):
    spy = Spy(fail="sft")
    with pytest.raises(RuntimeError):
        recipe.run(fake_recipe, runners=spy.runners(), progress=False, card=False)
    p = recipe.plan(fake_recipe)
    sft = p.stages["sft"]
    assert not is_complete(sft.out_dir) and not recipe.stage_done(sft)
    assert partial_dir(sft.out_dir).exists()  # kept: training resumes from its checkpoints
    assert recipe.stage_done(p.stages["cpt"])

    spy = Spy()
    result = recipe.run(fake_recipe, runners=spy.runners(), progress=False, card=False)
    assert spy.calls == ["sft", "other", "avg", "eval"] and result.skipped == ["dus", "cpt"]
    assert recipe.stage_done(sft)


def test_upstream_change_gives_the_tool_a_new_hash_and_its_old_output_no_longer_counts(
        fake_recipe):
    """A change upstream changes every downstream stage hash: the tool is asked for the new
    hash, so neither its old complete output nor a partial folder of the old hash is taken
    for this config (the tools refuse to resume a partial folder of another hash)."""
    recipe.run(fake_recipe, runners=Spy().runners(), progress=False, card=False)
    old = recipe.plan(fake_recipe).stages["sft"]
    p = recipe.plan(fake_recipe, overrides=["stages.cpt.train.seq_len=16"])
    sft = p.stages["sft"]
    assert sft.hash != old.hash and p.stages["other"].hash == \
        recipe.plan(fake_recipe).stages["other"].hash
    seen = []

    def runner(st):
        if st.name == "sft":
            seen.append((is_complete(st.out_dir), is_complete(st.out_dir, st.hash)))
        Spy().runner(st)

    result = recipe.run(p, runners=dict.fromkeys(KINDS, runner), progress=False, card=False)
    assert seen == [(True, False)] and "other" in result.skipped
    assert read_record(sft.out_dir)["config_hash"] == sft.hash


def test_one_completion_record_holds_the_hash_and_the_costs(fake_recipe):
    result = recipe.run(fake_recipe, runners=Spy().runners(), progress=False, card=False)
    p = recipe.plan(fake_recipe)
    costs = recipe.stage_costs(p)
    assert list(costs) == result.ran
    for name, st in p.stages.items():
        found = read_record(st.out_dir)
        assert found["config_hash"] == st.hash and found["stage"] == name
        assert costs[name]["kind"] == st.kind and costs[name]["seconds"] >= 0
        assert sorted(f.name for f in st.out_dir.iterdir() if f.name.endswith(".json")) == \
            sorted(["config.json", MARKER] + (["metrics.json"] if st.kind == "eval" else []))
    assert not any(f.name.startswith(".recipe") for f in p.out.iterdir())


def test_a_partial_folder_we_did_not_make_is_left_alone(fake_recipe):
    p = recipe.plan(fake_recipe)
    foreign = partial_dir(p.stages["sft"].out_dir)
    foreign.mkdir(parents=True)
    (foreign / "mine.txt").write_text("a user's file")
    with pytest.raises(UserError, match="not created by solar-merge"):
        recipe.run(p, runners=Spy().runners(), progress=False, card=False)
    assert (foreign / "mine.txt").read_text() == "a user's file"


# -- validation: schema, graph, shapes, before anything runs ---------------------------------

@pytest.mark.parametrize("data, expected", [
    ({"stages": {"a": {"trian": {}}}}, "stages.a.trian: unknown key (did you mean `train`?)"),
    ({"stagse": {}}, "stagse: unknown key (did you mean `stages`?)"),
    ({"stages": {"a": {"upscale": {"modle": "x", "drop": 1}}}},
     "stages.a.upscale.modle: unknown key (did you mean `model`?)"),
    ({"stages": {"a": {"train": {"stage": "cpt", "modle": "x", "datasets": ["c.txt"]}}}},
     "stages.a.train.modle: unknown key (did you mean `model`?)"),
    ({"stages": {"a": {"merge": {"merge_methd": "linear", "models": []}}}},
     "stages.a.merge.merge_methd: unknown key (did you mean `merge_method`?)"),
    ({"stages": {"a": {"upscale": {"model": "x", "drop": 1}, "train": {}}}},
     "exactly one of upscale, train, merge, eval"),
])
def test_schema_is_strict_and_suggests(tmp_path, data, expected):
    with pytest.raises(UserError, match=None) as e:
        recipe.plan(_recipe(tmp_path, data))
    assert expected in e.value.message


def test_validate_catches_a_cycle(tmp_path, tiny_model):
    _corpus(tmp_path)
    data = {"stages": {
        "a": {"train": {"stage": "cpt", "model": "b", "datasets": ["corpus.txt"]}},
        "b": {"merge": {"merge_method": "solar_average",
                        "models": [{"model": "a"}, {"model": str(tiny_model)}]}},
    }}
    with pytest.raises(UserError) as e:
        recipe.plan(_recipe(tmp_path, data))
    assert "cycle: a -> b -> a" in e.value.message


def test_validate_catches_an_unknown_stage(tmp_path, tiny_model):
    _corpus(tmp_path)
    data = {"stages": {
        "cpt": {"train": {"stage": "cpt", "model": str(tiny_model), "datasets": ["corpus.txt"]}},
        "sft": {"train": {"stage": "sft", "model": "cptt", "datasets": ["corpus.txt"]}},
        "ev": {"eval": {"models": ["sft", "spt"], "tasks": "solar_manual_ppl"}},
    }}
    with pytest.raises(UserError) as e:
        recipe.plan(_recipe(tmp_path, data))
    assert "stages.sft.train.model: `cptt` is not a known stage" in e.value.message
    assert "did you mean `cpt`?" in e.value.message
    assert "stages.ev.eval.models: `spt`" in e.value.message


def test_validate_catches_shape_mismatch_before_running(tmp_path, tiny_model,
                                                         tiny_model_factory):
    other_vocab = tiny_model_factory(vocab=512)
    data = {"out": "runs", "stages": {
        "dus": {"upscale": {"model": str(tiny_model), "drop": 1}},  # 6 layers
        "bad_layers": {"merge": {"merge_method": "solar_average",
                                 "models": [{"model": "dus"}, {"model": str(tiny_model)}]}},
        "bad_vocab": {"merge": {"merge_method": "solar_slerp", "parameters": {"t": 0.5},
                                "models": [{"model": str(tiny_model)},
                                           {"model": str(other_vocab)}]}},
        "bad_range": {"merge": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": "dus", "layer_range": [0, 8]}]}]}},
    }}
    path = _recipe(tmp_path, data)
    with pytest.raises(UserError) as e:
        recipe.run(path, runners=Spy().runners(), progress=False)
    msg = e.value.message
    assert "stages.bad_layers.merge: `dus` (hidden 32, mlp 64, vocab 384, 6 layers) cannot " \
           "be merged with" in msg or "`dus` (hidden 32" in msg
    assert "stages.bad_vocab.merge" in msg and "vocab 512" in msg
    assert "stages.bad_range.merge.slices[0].sources[0].layer_range: [0, 8] is outside" in msg
    assert not (tmp_path / "runs").exists()  # nothing ran


def test_paper_recipe_validates_offline_without_heavy_imports(tmp_path):
    code = ("import sys; from solar_merge.cli import main\n"
            "try:\n    main(['validate', sys.argv[1]])\n"
            "except SystemExit as e:\n"
            "    heavy = [m for m in ('torch', 'mergekit', 'trl') if m in sys.modules]\n"
            "    print('HEAVY', heavy); sys.exit(e.code)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "training/solar_10.7b.yaml")],
                          check=False, capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    out = proc.stdout
    assert "HEAVY []" in out
    for stage in ("dus", "cpt", "sft_orca", "sft_no_orca", "sft_avg", "sft_slerp", "dpo_avg",
                  "dpo_slerp", "final (final)", "eval"):
        assert stage in out
    assert "note: sizes of `mistralai/Mistral-7B-v0.1` unknown (offline" in out
    assert any(line.split()[1] == "dus" and "unknown" in line for line in out.splitlines()
               if line.startswith("  ") and len(line.split()) > 2)


def test_paper_recipe_sizes_with_a_local_config(tmp_path):
    """With Mistral-7B's config.json (no weights) the plan shows SOLAR's 48 layers / 10.7B."""
    mistral = tmp_path / "mistral"
    mistral.mkdir()
    (mistral / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "hidden_size": 4096,
        "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"}))
    p = recipe.plan(ROOT / "training/solar_10.7b.yaml", out=tmp_path / "runs",
                    overrides=[f"stages.dus.upscale.model={mistral}"])
    final = p.stages["final"]
    assert final.info.n_layers == 48 and final.params_estimated
    assert 10.6e9 < final.info.params < 10.8e9
    assert p.stages["dpo_avg"].memory > p.stages["cpt"].memory > p.stages["sft_avg"].memory


def test_cli_validate_exit_code_and_message(tmp_path):
    from click.testing import CliRunner

    from solar_merge.cli import main

    path = _recipe(tmp_path, {"stages": {"a": {"trian": {}}}})
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 2 and "did you mean `train`?" in result.output


# -- the real thing, tiny ------------------------------------------------------------------------

def test_tiny_recipe_end_to_end_with_resume(tmp_path, tiny_model):
    path = _recipe(tmp_path, _pipeline(tiny_model, tmp_path))
    calls = []

    def spy(kind):
        def runner(st):
            calls.append(st.name)
            return KINDS[kind].run(st)
        return runner

    spies = {k: spy(k) for k in KINDS}

    # 1. interrupted in the middle of the SLERP merge: nothing complete-looking is left
    def broken(st):
        if st.name == "slerp":
            partial_dir(st.out_dir).mkdir(parents=True)
            (partial_dir(st.out_dir) / OWNED).touch()
            raise KeyboardInterrupt
        return spies["merge"](st)

    with pytest.raises(KeyboardInterrupt):
        recipe.run(path, runners={**spies, "merge": broken}, progress=False)
    runs = tmp_path / "runs"
    assert calls == ["dus", "cpt", "avg"]
    assert not is_complete(runs / "slerp") and not (runs / "eval").exists()

    # 2. the re-run finishes: only what did not finish runs
    calls.clear()
    result = recipe.run(path, runners=spies, progress=False)
    assert calls == ["slerp", "eval"] and result.skipped == ["dus", "cpt", "avg"]
    cfg = json.loads((runs / "dus" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 6
    assert (runs / "cpt" / "model.safetensors").is_file()
    ppl = result.metrics["eval"]
    key = "solar_manual_ppl word_perplexity,none"  # lm-eval's metric, solar_merge.eval's table
    assert set(ppl) == {"dus", "avg", "slerp"} and all(v[key] > 1 for v in ppl.values())
    assert json.loads((runs / "eval" / "metrics.json").read_text()) == ppl
    assert result.final == runs / "avg"
    card = (runs / "avg" / "README.md").read_text()
    assert "solar-merge run recipe.yaml" in (runs / "avg" / "recipe.yaml").read_text()
    assert "## Recipe" in card and "cpt" in card

    # 3. re-run: nothing runs
    calls.clear()
    again = recipe.run(path, runners=spies, progress=False)
    assert calls == [] and len(again.skipped) == 5

    # 4. a changed merge weight re-runs that merge and what depends on it, nothing upstream
    calls.clear()
    changed = recipe.run(path, overrides=["stages.avg.merge.models.0.parameters.weight=0.5"],
                         runners=spies, progress=False)
    assert calls == ["avg", "eval"] and changed.skipped == ["dus", "cpt", "slerp"]

    # 5. the command: same recipe and override, nothing left to do; the recipe also comes
    #    back out of the final model's folder
    from click.testing import CliRunner

    from solar_merge.cli import main

    result = CliRunner().invoke(main, ["run", str(path), "--out", str(runs),
                                       "stages.avg.merge.models.0.parameters.weight=0.5"])
    assert result.exit_code == 0, result.output
    assert "ran 0 stage(s), skipped 5" in result.output
    loaded = recipe.load(runs / "avg")
    assert loaded.data["stages"]["avg"]["merge"]["models"][0]["parameters"]["weight"] == 0.5


def test_fresh_process_is_forked_warm_with_the_callers_environment_and_folder(tmp_path,
                                                                              monkeypatch):
    """Stages run in processes forked from a fork server that holds the imports: the second
    one starts in well under the ~6 s the imports take, and each sees the environment and the
    working folder of the moment it is started, not those of the fork server's start."""
    import time
    from functools import partial

    from solar_merge.recipe.runner import in_fresh_process

    first = in_fresh_process(os.getpid)  # starts the fork server if none runs yet
    monkeypatch.setenv("SOLAR_MERGE_PROBE", "set after the server started")
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    assert in_fresh_process(partial(os.getenv, "SOLAR_MERGE_PROBE")) == \
        "set after the server started"
    assert time.perf_counter() - start < 2.0
    assert in_fresh_process(os.getcwd) == str(tmp_path)
    assert in_fresh_process(os.getpid) not in (first, os.getpid())  # a new process each time
