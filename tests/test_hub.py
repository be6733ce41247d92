"""Model cards, recipe extraction and push: all offline (the Hub is never reached)."""

import json
import logging
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from solar_merge import hub
from solar_merge.errors import UserError
from solar_merge.outputs import MARKER

TOKEN = "hf_FAKEsecret123"

RECIPE = """\
# solar-merge run recipe.yaml
name: demo
stages:
  - name: up
    kind: dus
    model: upstage/SOLAR-10.7B-v1.0
    drop: 8
  - name: sft
    kind: sft
    model: up
    dataset: HuggingFaceH4/ultrachat_200k
    note: "a string with ``` backticks inside"
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no login cache, empty Hub cache
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)


@pytest.fixture
def no_network(monkeypatch):
    """Every HfApi method that talks to the Hub fails the test if called."""
    import huggingface_hub

    def boom(*args, **kwargs):
        raise AssertionError("network call attempted")

    for name in ("create_repo", "upload_folder", "upload_file", "create_commit", "whoami",
                 "repo_info", "list_repo_files"):
        monkeypatch.setattr(huggingface_hub.HfApi, name, boom)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", boom)


def local_base(tmp_path, name="my-local-base", **front) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    lines = "".join(f"{k}: {v}\n" for k, v in front.items())
    (folder / "README.md").write_text(f"---\n{lines}---\n\n# base\n")
    return folder


def load_card(path):
    from huggingface_hub import ModelCard

    return ModelCard.load(path)


def test_card_front_matter_lineage_versions_and_eval(tmp_path):
    base = local_base(tmp_path, license="apache-2.0", base_model="mistralai/Mistral-7B-v0.1")
    out = tmp_path / "solar-sft"
    lineage = [{"stage": "up", "kind": "dus", "inputs": ["upstage/SOLAR-10.7B-v1.0"]},
               {"stage": "sft", "kind": "sft", "inputs": [str(base)]}]
    readme = hub.write_card(
        out, kind="sft", source_yaml=RECIPE, source_name="stage_config.yaml",
        base_models=["upstage/SOLAR-10.7B-v1.0", str(base)], lineage=lineage,
        datasets=["HuggingFaceH4/ultrachat_200k", str(tmp_path / "local_data.jsonl")],
        eval_table={"base": {"perplexity": 15.06, "math_em": 0.1},
                    "solar-sft": {"perplexity": 12.61}},
        description="A tiny test model.")
    assert readme == out / "README.md"
    card = load_card(readme)
    data = card.data.to_dict()
    assert data["tags"] == ["mergekit", "merge", "solar-merge", "sft"]
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    # Hub ids only; the local base contributes its own (Hub) base model, never its path
    assert data["base_model"] == ["upstage/SOLAR-10.7B-v1.0", "mistralai/Mistral-7B-v0.1"]
    assert data["base_model_relation"] == "finetune"
    assert data["datasets"] == ["HuggingFaceH4/ultrachat_200k"]
    assert data["license"] == "apache-2.0"  # copied from the local base model's card
    text = readme.read_text()
    assert str(tmp_path) not in text  # no absolute local path anywhere in the card
    assert "`my-local-base` (local)" in text and "`local_data.jsonl` (local)" in text
    body = card.text
    assert "## Lineage" in body and "| up | dus |" in body and "| sft | sft |" in body
    assert "## Versions" in body
    for pkg in ("solar-merge", "mergekit", "transformers", "trl", "torch"):
        assert f"| {pkg} |" in body
    assert "| model | perplexity | math_em |" in body
    assert "| base | 15.06 | 0.1 |" in body and "| solar-sft | 12.61 | - |" in body
    assert "A tiny test model." in body and body.lstrip().startswith("# solar-sft")
    assert (out / "stage_config.yaml").read_text() == RECIPE


def test_card_license_defaults_and_local_only_bases(tmp_path):
    base = local_base(tmp_path)  # a card without license or base_model
    readme = hub.write_card(tmp_path / "m", kind="dus", source_yaml="a: 1\n",
                            source_name="mergekit_config.yml", base_models=[str(base)])
    data = load_card(readme).data.to_dict()
    assert data["license"] == "other"
    assert "base_model" not in data and "base_model_relation" not in data
    assert "check each base model's license" in readme.read_text()
    assert str(base) not in readme.read_text()
    readme = hub.write_card(tmp_path / "m2", kind="merge", source_yaml="a: 1\n",
                            source_name="mergekit_config.yml",
                            base_models=["a/b", "c/d"], license="mit")
    data = load_card(readme).data.to_dict()
    assert data["license"] == "mit" and data["base_model"] == ["a/b", "c/d"]
    assert data["base_model_relation"] == "merge"
    with pytest.raises(UserError, match="unknown model card kind"):
        hub.write_card(tmp_path / "m3", kind="sdpo", source_yaml="a: 1", source_name="r.yaml",
                       base_models=[])


def test_card_replaces_mergekit_readme_keeping_the_method_line(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "README.md").write_text(
        "---\nbase_model: []\ntags:\n- mergekit\n---\n# merged\n\nThis is a merge of "
        "pre-trained language models created using [mergekit](https://github.com/cg123/"
        "mergekit).\n\n### Merge Method\n\nThis model was merged using the [SLERP](https://"
        "en.wikipedia.org/wiki/Slerp) merge method using /home/me/models/my-base as a base.\n")
    hub.write_card(out, kind="merge", source_yaml="merge_method: slerp\n",
                   source_name="mergekit_config.yml", base_models=["a/b", "c/d"],
                   merge_method="slerp")
    text = (out / "README.md").read_text()
    assert "## Merge method" in text
    assert ("This model was merged using the [SLERP](https://en.wikipedia.org/wiki/Slerp) "
            "merge method using `my-base` as a base.") in text
    assert "/home/me" not in text
    assert "This is a merge of pre-trained" not in text and text.count("---\n") == 2
    hub.write_card(tmp_path / "x", kind="merge", source_yaml="merge_method: solar_average\n",
                   source_name="mergekit_config.yml", base_models=[],
                   merge_method="solar_average")
    assert "mergekit's `solar_average` merge method" in (tmp_path / "x/README.md").read_text()
    # written inside atomic_output's work folder: titled after the final folder
    hub.write_card(tmp_path / ".final.partial", kind="dpo", source_yaml="a: 1\n",
                   source_name="stage_config.yaml", base_models=[])
    assert "\n# final\n" in (tmp_path / ".final.partial/README.md").read_text()


def test_recipe_round_trip_card_only_and_beside_file(tmp_path):
    out = tmp_path / "final"
    hub.write_card(out, kind="recipe", source_yaml=RECIPE, source_name="recipe.yaml",
                   base_models=["upstage/SOLAR-10.7B-v1.0"])
    assert hub.extract_recipe(out) == RECIPE  # the beside-file
    (out / "recipe.yaml").unlink()
    extracted = hub.extract_recipe(out)  # from the card alone
    assert extracted.strip() == RECIPE.strip()
    assert yaml.safe_load(extracted) == yaml.safe_load(RECIPE)
    assert hub.extract_recipe(out / "README.md").strip() == RECIPE.strip()
    text, label = hub.load_recipe_text(str(out))
    assert text.strip() == RECIPE.strip() and label == str(out)


def test_extract_prefers_recipe_then_mergekit_then_stage_config(tmp_path):
    (tmp_path / "stage_config.yaml").write_text("s: 1\n")
    (tmp_path / "mergekit_config.yml").write_text("m: 1\n")
    assert hub.extract_recipe(tmp_path) == "m: 1\n"
    (tmp_path / "recipe.yaml").write_text("r: 1\n")
    assert hub.extract_recipe(tmp_path) == "r: 1\n"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="has no recipe"):
        hub.extract_recipe(empty)
    (empty / "README.md").write_text("---\nlicense: mit\n---\n# just a card\n")
    with pytest.raises(UserError, match="no `## Recipe` section"):
        hub.extract_recipe(empty)


def test_load_recipe_text_sources(tmp_path, monkeypatch):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    assert hub.load_recipe_text(str(recipe)) == (RECIPE, str(recipe))
    with pytest.raises(UserError, match="not found"):
        hub.load_recipe_text(str(tmp_path / "missing.yaml"))

    # a Hub repo holding only a card: served from a fake in-memory Hub
    card_dir = tmp_path / "card_only"
    hub.write_card(card_dir, kind="recipe", source_yaml=RECIPE, source_name="recipe.yaml",
                   base_models=[])
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        if filename != "README.md":
            raise RemoteEntryNotFoundError("no such file", response=None) \
                if _takes_response() else RemoteEntryNotFoundError("no such file")
        return str(card_dir / "README.md")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    text, label = hub.load_recipe_text("someone/solar-demo")
    assert text.strip() == RECIPE.strip() and label == "hf://someone/solar-demo"
    assert calls[-1] == ("someone/solar-demo", "README.md")
    assert hub.load_recipe_text("https://huggingface.co/someone/solar-demo")[0].strip() \
        == RECIPE.strip()

    def offline_download(repo_id, filename, **kwargs):
        raise LocalEntryNotFoundError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline_download)
    with pytest.raises(UserError, match="could not read the recipe of someone/x"):
        hub.load_recipe_text("someone/x")


def _takes_response() -> bool:
    import inspect

    from huggingface_hub.errors import RemoteEntryNotFoundError

    return "response" in inspect.signature(RemoteEntryNotFoundError.__init__).parameters


def test_load_recipe_from_url(monkeypatch):
    import urllib.error
    import urllib.request

    seen = []

    class Response:
        def __init__(self, body):
            self.body = body

        def read(self):
            return self.body.encode()

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def fake_urlopen(url, timeout=None):
        seen.append(url)
        return Response(RECIPE)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    url = "https://huggingface.co/someone/demo/blob/main/recipe.yaml"
    assert hub.load_recipe_text(url) == (RECIPE, url)
    assert seen == ["https://huggingface.co/someone/demo/resolve/main/recipe.yaml"]

    def unreachable(url, timeout=None):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", unreachable)
    with pytest.raises(UserError, match="could not download the recipe") as e:
        hub.load_recipe_text("https://example.com/r.yaml")
    assert "connection" in str(e.value)


def model_folder(tmp_path, *, marker=True) -> Path:
    folder = tmp_path / "model"
    for rel, body in {
        "config.json": "{}", "model.safetensors": "x" * 100, "tokenizer.json": "{}",
        "recipe.yaml": RECIPE, "plots/loss.png": "png", ".hidden": "h",
        ".cache/huggingface/x": "c", "checkpoint-10/model.safetensors": "ck",
        "model.safetensors.partial": "p", "write.lock": "", "sub.partial/x": "p",
    }.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(body)
    hub.write_card(folder, kind="sft", source_yaml=RECIPE, source_name="recipe.yaml",
                   base_models=["upstage/SOLAR-10.7B-v1.0"])
    if marker:
        (folder / MARKER).write_text(json.dumps({"config_hash": "abc"}) + "\n")
    return folder


EXPECTED = ["README.md", "config.json", "model.safetensors", "plots/loss.png", "recipe.yaml",
            MARKER, "tokenizer.json"]


def test_push_dry_run_lists_exactly_and_stays_offline(tmp_path, no_network):
    folder = model_folder(tmp_path)
    files = hub.push(folder, "me/solar-demo", dry_run=True)
    assert [path for path, _ in files] == sorted(EXPECTED)
    assert dict(files)["model.safetensors"] == 100


def test_push_refuses_what_is_not_a_finished_model(tmp_path, no_network, caplog):
    folder = model_folder(tmp_path, marker=False)
    with pytest.raises(UserError, match="no completion marker"):  # a solar-merge card
        hub.push(folder, "me/x", dry_run=True)
    (folder / "README.md").unlink()  # a model from elsewhere: pushed with a warning
    with caplog.at_level(logging.WARNING, logger="solar_merge.hub"):
        hub.push(folder, "me/x", dry_run=True)
    assert "no solar-merge completion marker" in caplog.text
    (folder / "config.json").unlink()
    with pytest.raises(UserError, match="not a model folder"):
        hub.push(folder, "me/x", dry_run=True)
    partial = tmp_path / ".model.partial"
    partial.mkdir()
    (partial / "config.json").write_text("{}")
    with pytest.raises(UserError, match="unfinished work folder"):
        hub.push(partial, "me/x", dry_run=True)
    with pytest.raises(UserError, match="owner/name"):
        hub.push(model_folder(tmp_path / "ok"), "no-owner", dry_run=True)


def test_push_without_token_is_a_clear_error(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError) as e:
        hub.push(model_folder(tmp_path), "me/solar-demo")
    assert "no Hugging Face token" in str(e.value) and "hf auth login" in str(e.value)
    assert "HF_TOKEN" in str(e.value) and "nothing was uploaded" in str(e.value)


def test_push_offline_is_a_clear_error(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(UserError, match="offline mode") as e:
        hub.push(model_folder(tmp_path), "me/solar-demo")
    assert TOKEN not in str(e.value)


def test_token_never_shown_nor_written(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE")  # every HfApi network method is patched
    folder = model_folder(tmp_path)

    def leaky_create_repo(self, repo_id, **kwargs):
        raise RuntimeError(f"401 Unauthorized for token {TOKEN} (repo {repo_id})")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", leaky_create_repo)
    with pytest.raises(UserError) as e:
        hub.push(folder, "me/solar-demo")
    message = str(e.value)
    assert TOKEN not in message and "***" in message and "401 Unauthorized" in message
    assert e.value.__cause__ is None and e.value.__suppress_context__
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert TOKEN not in path.read_text(errors="ignore"), path

    # a card written while logged in does not carry the token either
    hub.write_card(tmp_path / "card", kind="merge", source_yaml="a: 1\n",
                   source_name="mergekit_config.yml", base_models=[])
    assert TOKEN not in (tmp_path / "card/README.md").read_text()

    # a folder that contains the token is refused before any network call
    (folder / "notes.txt").write_text(f"token={TOKEN}\n")
    with pytest.raises(UserError, match="contains your Hugging Face token") as e:
        hub.push(folder, "me/solar-demo")
    assert TOKEN not in str(e.value)


def test_push_uploads_exactly_the_listed_files(tmp_path, monkeypatch, no_network):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, kwargs)

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    folder = model_folder(tmp_path)
    files = hub.push(folder, "me/solar-demo", private=True)
    assert calls["create"] == ("me/solar-demo", {"private": True, "exist_ok": True,
                                                 "repo_type": "model"})
    assert calls["upload"]["allow_patterns"] == sorted(EXPECTED)
    assert calls["upload"]["repo_id"] == "me/solar-demo"
    assert [p for p, _ in files] == sorted(EXPECTED)


def test_cli_push_dry_run_and_recipe_extract(tmp_path, no_network):
    from solar_merge.cli import main

    folder = model_folder(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["push", str(folder), "me/solar-demo", "--dry-run"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[-1] for line in result.stdout.splitlines()]
    assert listed == sorted(EXPECTED)
    assert "would upload 7 files" in result.stderr

    out = tmp_path / "out.yaml"
    result = runner.invoke(main, ["recipes", "extract", str(folder), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == RECIPE
    result = runner.invoke(main, ["recipes", "extract", str(folder)])
    assert result.exit_code == 0 and result.stdout == RECIPE

    result = runner.invoke(main, ["push", str(tmp_path / "missing"), "me/x", "--dry-run"])
    assert result.exit_code == 2
    result = runner.invoke(main, ["recipes", "extract", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "not found" in result.output


def test_real_merge_card_extract_round_trip(tmp_path, tiny_model_factory):
    """merge → card (replacing mergekit's) → extract → the same resolved config, and it
    re-runs to the same folder without work (same config hash)."""
    from solar_merge.merging import check_config, merge

    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    config = {"merge_method": "linear", "dtype": "float32",
              "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.5}}]}
    out = merge(config, tmp_path / "merged")
    source = (out / "mergekit_config.yml").read_text()
    hub.write_card(out, kind="merge", source_yaml=source, source_name="mergekit_config.yml",
                   base_models=[str(a), str(b)], merge_method="linear",
                   lineage=[{"stage": "merged", "kind": "merge", "inputs": [str(a), str(b)]}])
    text = (out / "README.md").read_text()
    assert "## Merge method\n\nThis model was merged using the [Linear]" in text
    assert str(a) not in text.split("## Recipe")[0]  # paths only inside the exact recipe
    (out / "mergekit_config.yml").unlink()
    extracted, _ = hub.load_recipe_text(str(out))  # paths relative to the folder it is in
    assert str(tmp_path) not in extracted
    assert check_config(extracted, out) == check_config(config)
    elsewhere, _ = hub.recipe_for(str(out), tmp_path / "else")  # rebased for another folder
    assert check_config(elsewhere, tmp_path / "else") == check_config(config)
    before = (out / "model.safetensors").stat().st_mtime_ns
    assert merge(extracted, out, base_dir=out) == out  # same config: complete, untouched
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    assert [p for p, _ in hub.push(out, "me/merged", dry_run=True)] == sorted(
        p.name for p in out.iterdir() if not p.name.startswith("."))


def test_extra_tags_and_card_read_back(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub import ModelCard

    out = tmp_path / "m"
    hub.write_card(out, kind="dpo", source_yaml=RECIPE, source_name="stage_config.yaml",
                   base_models=["a/b"], extra_tags=["solar", "merge", "dpo", "math"])
    card = ModelCard.load(out / "README.md")  # as the Hub reads it
    assert card.data.tags == ["mergekit", "merge", "solar-merge", "dpo", "solar", "math"]
    assert card.data.base_model == ["a/b"]
    (out / "stage_config.yaml").unlink()
    assert hub.extract_recipe(out).strip() == RECIPE.strip()  # from the card alone

    def offline(repo_id, filename, **kwargs):
        raise OSError(f"offline, token {TOKEN}")

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(UserError, match="could not read the recipe of someone/x") as e:
        hub.extract_recipe("someone/x")
    assert TOKEN not in str(e.value)
