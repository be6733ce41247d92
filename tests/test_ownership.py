"""Never delete what we did not write; results are complete only for the exact inputs they
were made from; configs written into outputs travel (no absolute paths)."""

import json

import pytest
import yaml
from click.testing import CliRunner
from stage_fakes import Spy

from solar_merge import recipe
from solar_merge.cli import main
from solar_merge.errors import UserError
from solar_merge.merging import merge
from solar_merge.outputs import (
    MARKER,
    OWNED,
    atomic_output,
    fingerprint,
    is_complete,
    overwriting,
    partial_dir,
    portable,
)


def _victim(folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's notes")
    return folder


def _avg(a, b, weight=0.5):
    return {"merge_method": "solar_average", "dtype": "float32",
            "models": [{"model": str(a), "parameters": {"weight": weight}},
                       {"model": str(b), "parameters": {"weight": 1 - weight}}]}


# -- data loss ---------------------------------------------------------------------------------

def test_dus_run_into_a_users_folder_is_refused_and_deletes_nothing(tiny_model, tmp_path):
    victim = _victim(tmp_path / "victim")
    result = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1",
                                       "--run", str(victim)])
    assert result.exit_code == 2, result.output
    assert "was not written by solar-merge" in result.output and "--overwrite" in result.output
    assert (victim / "notes.txt").read_text() == "a user's notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]  # no partial, no lock

    result = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1", "--run",
                                       str(victim), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert is_complete(victim) and not (victim / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]


def test_yaml_into_a_users_folder_is_refused(tiny_model_factory, tmp_path):
    config = tmp_path / "avg.yaml"
    config.write_text(yaml.safe_dump(_avg(tiny_model_factory(seed=0),
                                          tiny_model_factory(seed=1))))
    victim = _victim(tmp_path / "victim")
    result = CliRunner().invoke(main, ["yaml", str(config), str(victim)])
    assert result.exit_code == 2 and (victim / "notes.txt").is_file()
    result = CliRunner().invoke(main, ["yaml", str(config), str(victim), "--overwrite"])
    assert result.exit_code == 0 and is_complete(victim)


def test_our_own_results_and_empty_folders_are_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    for name in ("empty", "ours", "ours"):
        with atomic_output(tmp_path / name, "h-" + name) as work:
            (work / "f").write_text(name)
    assert is_complete(tmp_path / "empty") and is_complete(tmp_path / "ours", "h-ours")
    with pytest.raises(UserError, match="a file or a link"), \
            atomic_output(tmp_path / "ours" / "f", "h"):
        pass


def test_overwrite_is_explicit_and_scoped(tmp_path):
    victim = _victim(tmp_path / "victim")
    with overwriting(), atomic_output(victim, "h") as work:
        (work / "f").write_text("new")
    assert is_complete(victim, "h") and not (victim / "notes.txt").exists()
    victim2 = _victim(tmp_path / "victim2")
    with pytest.raises(UserError), atomic_output(victim2, "h"):  # the scope has ended
        pass


def test_a_partial_folder_we_did_not_make_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    foreign = partial_dir(out)
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep")
    for keep in (False, True):
        with pytest.raises(UserError, match="not created by solar-merge"), \
                atomic_output(out, "h", keep_partial=keep):
            pass
    assert (foreign / "mine.txt").read_text() == "keep"


def test_every_partial_folder_we_make_is_marked_ours(tmp_path):
    with atomic_output(tmp_path / "out", "h", keep_partial=True) as work:
        assert (work / OWNED).is_file()
    assert not (tmp_path / "out" / OWNED).exists()  # bookkeeping does not ship


def _remote(monkeypatch, data: dict):
    """A recipe as if fetched from the Hub (offline: the download is replaced)."""
    import solar_merge.hub

    monkeypatch.setattr(solar_merge.hub, "load_recipe_text",
                        lambda source: (yaml.safe_dump(data), f"hf://{source}"))
    return "someone/recipe"


@pytest.mark.parametrize("out", ["/tmp/anywhere", "../up", "runs/../../up"])
def test_a_recipe_from_the_hub_writes_only_under_the_root_it_is_given(
        monkeypatch, tmp_path, tiny_model, out):
    source = _remote(monkeypatch, {"name": "r", "out": out, "stages": {
        "dus": {"upscale": {"model": str(tiny_model), "drop": 1}}}})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--out DIR"):
        recipe.plan(source)
    assert recipe.plan(source, out=tmp_path / "mine").out == tmp_path / "mine"


def test_a_recipe_from_the_hub_may_not_upload_or_run_model_code(monkeypatch, tmp_path,
                                                               tiny_model):
    source = _remote(monkeypatch, {"name": "r", "stages": {
        "cpt": {"train": {"stage": "cpt", "model": str(tiny_model), "datasets": ["x.txt"],
                          "args": {"push_to_hub": True, "hub_model_id": "me/x",
                                   "model_init_kwargs": {"trust_remote_code": True}}}}}})
    with pytest.raises(UserError) as e:
        recipe.plan(source, out=tmp_path / "out")
    for key in ("push_to_hub", "hub_model_id", "trust_remote_code"):
        assert f"`{key}`" in e.value.message


def test_a_recipe_name_cannot_climb_out_of_runs(tmp_path, tiny_model):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "../../etc", "stages": {
        "dus": {"upscale": {"model": str(tiny_model), "drop": 1}}}}))
    with pytest.raises(UserError, match="names the default output folder"):
        recipe.plan(path)


# -- stale results -----------------------------------------------------------------------------

def test_fingerprint_follows_contents_not_paths(tiny_model_factory, tmp_path):
    import shutil

    data = tmp_path / "data.jsonl"
    data.write_text('{"text": "a"}\n')
    before = fingerprint(data)
    data.write_text('{"text": "b"}\n')
    assert fingerprint(data) != before
    model = shutil.copytree(tiny_model_factory(seed=0), tmp_path / "model")
    copy = shutil.copytree(model, tmp_path / "copy")
    assert fingerprint(model) == fingerprint(copy)  # same contents, other place
    (model / MARKER).write_text("{}")  # our bookkeeping is not content
    assert fingerprint(model) == fingerprint(copy)
    shutil.copy(tiny_model_factory(seed=1) / "model.safetensors", model)  # retrained in place
    assert fingerprint(model) != fingerprint(copy)
    assert fingerprint("owner/name") == fingerprint("owner/name") != fingerprint("owner/other")


def test_a_merge_is_redone_when_an_input_is_retrained_in_place(tiny_model_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file

    a = shutil.copytree(tiny_model_factory(seed=0), tmp_path / "a")
    b = tiny_model_factory(seed=1)
    first = load_file(merge(_avg(a, b), tmp_path / "out") / "model.safetensors")
    shutil.copy(tiny_model_factory(seed=2) / "model.safetensors", a)  # `a` retrained in place
    second = load_file(merge(_avg(a, b), tmp_path / "out") / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    assert not (first[name] == second[name]).all()


def test_a_train_stage_is_complete_only_for_its_exact_inputs(tiny_model_factory, tmp_path):
    import shutil

    from solar_merge.stages import resolve, stage_hash

    model = shutil.copytree(tiny_model_factory(seed=0), tmp_path / "cpt")
    data = tmp_path / "qa.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    config = {"stage": "sft", "model": str(model), "datasets": [str(data)]}
    h0 = stage_hash(resolve(config))
    assert stage_hash(resolve(config)) == h0
    shutil.copy(tiny_model_factory(seed=1) / "model.safetensors", model)  # cpt retrained
    h1 = stage_hash(resolve(config))
    data.write_text('{"prompt": "1+1=", "completion": "two"}\n')  # data edited
    h2 = stage_hash(resolve(config))
    assert len({h0, h1, h2}) == 3


def test_a_recipe_reruns_a_stage_whose_data_file_changed(tmp_path, tiny_model):
    data = tmp_path / "corpus.txt"
    data.write_text("some text\n")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "out": "runs", "stages": {
        "cpt": {"train": {"stage": "cpt", "model": str(tiny_model), "datasets": ["corpus.txt"]}},
        "avg": {"merge": {"merge_method": "solar_average", "models": [
            {"model": "cpt", "parameters": {"weight": 1.0}}]}}}}))
    spy = Spy()
    recipe.run(path, runners=spy.runners(), progress=False, card=False)
    recipe.run(path, runners=spy.runners(), progress=False, card=False)
    assert spy.calls == ["cpt", "avg"]
    data.write_text("other text\n")
    recipe.run(path, runners=spy.runners(), progress=False, card=False)
    assert spy.calls == ["cpt", "avg", "cpt", "avg"]


# -- outputs that travel -----------------------------------------------------------------------

def test_merge_outputs_carry_no_absolute_paths_and_rerun_from_their_config(
        tiny_model_factory, tmp_path):
    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    out = merge(_avg(a, b), tmp_path / "out")
    for name in ("mergekit_config.yml", "README.md"):
        text = (out / name).read_text()
        assert str(a) not in text and str(tmp_path) not in text, name
    again = merge(out / "mergekit_config.yml", tmp_path / "again")  # paths resolve from it
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_portable_rewrites_only_absolute_paths(tmp_path):
    config = {"model": str(tmp_path / "m"), "hub": "owner/name", "rel": "x/y",
              "list": [str(tmp_path / "a" / "b.txt")], "n": 3}
    assert portable(config, tmp_path / "out") == {
        "model": "../m", "hub": "owner/name", "rel": "x/y", "list": ["../a/b.txt"], "n": 3}


def test_allow_pickle_reaches_every_model(tmp_path, tiny_model_factory):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickles = []
    for seed in (0, 1):  # two pickle-only models: allow_pickle must reach both, not the first
        folder = shutil.copytree(tiny_model_factory(seed=seed), tmp_path / f"pickle{seed}")
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
        pickles.append(folder)
    with pytest.raises(UserError, match="pickle"):
        merge(_avg(*pickles), tmp_path / "refused")
    out = merge(_avg(*pickles), tmp_path / "out", options={"allow_pickle": True})
    assert is_complete(out) and json.loads((out / "config.json").read_text())


def test_the_final_recipe_copy_travels_and_resumes_in_place(tmp_path, tiny_model):
    (tmp_path / "corpus.txt").write_text("some text\n")
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "r", "out": "runs", "final": "avg", "stages": {
        "cpt": {"train": {"stage": "cpt", "model": str(tiny_model), "datasets": ["corpus.txt"]}},
        "avg": {"merge": {"merge_method": "solar_average", "models": [
            {"model": "cpt", "parameters": {"weight": 1.0}}]}}}}))
    first = recipe.run(path, runners=Spy().runners(), progress=False)
    copy = first.final / "recipe.yaml"
    assert str(tmp_path) not in copy.read_text()
    again = recipe.run(copy, runners=Spy().runners(), progress=False)
    assert again.out == first.out and again.ran == [] and again.skipped == ["cpt", "avg"]
