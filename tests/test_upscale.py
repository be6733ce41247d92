"""Depth up-scaling: the layer map, the fixed pitfalls, and stock mergekit-yaml compatibility."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

from solar_merge.checkpoints import model_info
from solar_merge.cli import main
from solar_merge.errors import UserError
from solar_merge.upscale import check_drop, dus_config, new_layers_of, output_layers, plan_upscale


def dus(model: str, drop: int, out):
    """`solar-merge dus MODEL --drop M --run OUT`, as the command runs it."""
    return plan_upscale(model, "dus", drop=drop).run(out)


def assert_dus_layers(src, out, n, m):
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    s = 2 * (n - m)
    for i in range(s):
        j = i if i < n - m else i - (n - 2 * m)
        prefix_out, prefix_in = f"model.layers.{i}.", f"model.layers.{j}."
        names = [k for k in b if k.startswith(prefix_out)]
        assert names, f"output layer {i} missing"
        for k in names:
            assert torch.equal(b[k], a[prefix_in + k[len(prefix_out):]]), (i, j, k)
    for k in a:
        if ".layers." not in k:
            assert torch.equal(a[k], b[k]), k


def test_layer_map_is_the_papers():
    rows = output_layers(dus_config("m", 8, n_layers=32))
    assert len(rows) == 48
    assert rows[23] == [("m", 23)] and rows[24] == [("m", 8)] and rows[47] == [("m", 31)]


@pytest.mark.parametrize("n,m,ok", [(32, 8, True), (32, 15, True), (32, 16, False),
                                    (32, 0, False), (5, 2, True), (4, 2, False), (32, -1, False)])
def test_drop_range(n, m, ok):
    if ok:
        check_drop(n, m)
    else:
        with pytest.raises(UserError, match="out of range"):
            check_drop(n, m)
    check_drop(32, 0, allow_repeat=True)  # the naive 2n repeat, for comparisons only


@pytest.mark.parametrize("arch,tied", [("llama", True), ("llama", False), ("mistral", True),
                                       ("mistral", False), ("qwen2", True), ("qwen2", False)])
def test_dus_output(tiny_model_factory, tmp_path, arch, tied):
    src = tiny_model_factory(arch=arch, layers=6, tied=tied)
    out = dus(str(src), 2, tmp_path / "dus")
    assert_dus_layers(src, out, 6, 2)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 8
    assert model.config.tie_word_embeddings == tied
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("def f(x):", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.input_ids.shape[1] + 5
    if arch == "qwen2":
        assert len(model.config.layer_types) == 8


def test_layer_types_follow_the_layers(tmp_path, tiny_tokenizer_dir):
    # Mixed sliding/full attention: mergekit 0.1.5 alone crashes writing config.json here.
    cfg = Qwen2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=16, max_window_layers=3)
    src = tmp_path / "qwen"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    before = cfg.layer_types
    assert len(set(before)) == 2
    out = dus(str(src), 1, tmp_path / "dus")
    after = json.loads((out / "config.json").read_text())["layer_types"]
    assert after == [before[i] for i in (0, 1, 2, 3, 4, 1, 2, 3, 4, 5)]
    AutoModelForCausalLM.from_pretrained(out)


def test_relative_paths_never_call_the_hub(tiny_model_factory, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the Hub was called")

    monkeypatch.setattr(huggingface_hub, "repo_exists", no_network)
    shutil.copytree(tiny_model_factory(), tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    out = dus("base", 1, "dus")  # both relative, one '/' at most: mergekit's is_hf trap
    assert (out / "config.json").exists() and (out / "README.md").exists()


def test_rerun_skips_and_no_partial_left(tiny_model, tmp_path):
    out = dus(str(tiny_model), 1, tmp_path / "dus")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    dus(str(tiny_model), 1, tmp_path / "dus")
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # Only the finished folder (and maybe the hidden lock file that keeps runs apart) remain.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != ".dus.lock") == ["dus"]


def test_run_takes_mergekit_performance_options(tiny_model, tmp_path):
    runner = CliRunner()
    plain, tuned = tmp_path / "plain", tmp_path / "tuned"
    assert runner.invoke(main, ["dus", str(tiny_model), "-m", "1", "--run", str(plain)]
                         ).exit_code == 0
    result = runner.invoke(main, ["dus", str(tiny_model), "-m", "1", "--run", str(tuned),
                                  "-j", "2", "--async-write", "--out-shard-size", "100K"])
    assert result.exit_code == 0, result.output
    shards = sorted(tuned.glob("model-*.safetensors"))
    assert len(shards) > 1  # the shard size reached mergekit
    merged = {}
    for shard in shards:
        merged.update(load_file(str(shard)))
    expected = load_file(str(plain / "model.safetensors"))
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in expected)


@pytest.mark.parametrize("args,message", [
    (["-j", "2"], "only apply to a merge"),                   # no --run
    (["--run", "OUT", "--no-such-flag"], "No such option"),   # mergekit's parser names it
])
def test_mergekit_options_misuse(tiny_model, tmp_path, args, message):
    args = [a.replace("OUT", str(tmp_path / "out")) for a in args]
    result = CliRunner().invoke(main, ["dus", str(tiny_model), "-m", "1", *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_shipped_dus_yaml_is_solars():
    text = Path("merge_configs/dus.yaml").read_text()
    cfg = yaml.safe_load(text)
    assert cfg == dus_config("mistralai/Mistral-7B-v0.1", 8, n_layers=32, dtype="bfloat16")
    assert text.startswith("# mergekit-yaml")


def test_cli_prints_map_and_params(tiny_model):
    result = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1"])
    assert result.exit_code == 0
    assert "4 layers -> 6 layers" in result.output
    info = model_info(str(tiny_model))
    assert info.params_with_layers(6) - info.params == 2 * info.per_layer_params


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_expansion_computes_what_the_base_did(tiny_model_factory, tmp_path, arch):
    src = tiny_model_factory(arch=arch, layers=4, tied=False)
    out = plan_upscale(str(src), "expand", every=2).run(tmp_path / "pro")
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    grown = AutoModelForCausalLM.from_pretrained(out).eval()
    assert grown.config.num_hidden_layers == 6 and new_layers_of(out) == [2, 5]
    ids = torch.randint(0, 384, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(grown(ids).logits, base(ids).logits, rtol=1e-5, atol=1e-5)
    new = grown.model.layers[2]
    assert torch.count_nonzero(new.self_attn.o_proj.weight) == 0
    assert torch.count_nonzero(new.mlp.down_proj.weight) == 0
    assert torch.equal(new.self_attn.q_proj.weight, base.model.layers[1].self_attn.q_proj.weight)


def test_expand_every_must_divide(tiny_model):
    result = CliRunner().invoke(main, ["expand", str(tiny_model), "--every", "3"])
    assert result.exit_code == 2 and "must divide" in result.output


# -- every up-scaling variant, checked tensor by tensor -------------------------------------

RESIDUAL = (".self_attn.o_proj.", ".mlp.down_proj.")
STOCK_YAML = "from mergekit.scripts.run_yaml import main; import sys; " \
             "[main([c, o, '--copy-tokenizer', '--clone-tensors'], standalone_mode=False) " \
             "for c, o in zip(sys.argv[1::2], sys.argv[2::2])]"

# Each output layer of a 4-layer model: ("copy", source, factor on o_proj/down_proj) or
# ("mean", a, b). Written out by hand from the definitions, not computed by upscale.py.
VARIANTS = {
    "solar": (["dus", "--drop", "1"],
              [("copy", 0, 1), ("copy", 1, 1), ("copy", 2, 1), ("copy", 1, 1), ("copy", 2, 1),
               ("copy", 3, 1)], [3, 4]),
    "scaled": (["dus", "--drop", "1", "--scale-overlap", "0.5"],
               [("copy", 0, 1), ("copy", 1, .5), ("copy", 2, .5), ("copy", 1, .5),
                ("copy", 2, .5), ("copy", 3, 1)], [3, 4]),
    "repeat": (["dus", "--repeat", "0:2"],
               [("copy", 0, 1), ("copy", 1, 1), ("copy", 0, 1), ("copy", 1, 1), ("copy", 2, 1),
                ("copy", 3, 1)], [2, 3]),
    "repeat_scaled": (["dus", "--repeat", "2:4", "--scale-overlap", "2"],
                      [("copy", 0, 1), ("copy", 1, 1), ("copy", 2, 2), ("copy", 3, 2),
                       ("copy", 2, 2), ("copy", 3, 2)], [4, 5]),
    "top": (["expand", "--blocks", "2", "--where", "top"],
            [("copy", 0, 1), ("copy", 1, 1), ("copy", 1, 0), ("copy", 2, 1), ("copy", 2, 0),
             ("copy", 3, 1)], [2, 4]),
    "interleaved": (["expand", "--blocks", "2"],
                    [("copy", 0, 1), ("copy", 1, 1), ("copy", 1, 0), ("copy", 2, 1),
                     ("copy", 3, 1), ("copy", 3, 0)], [2, 5]),
    "average": (["expand", "--blocks", "2", "--init", "average"],
                [("copy", 0, 1), ("copy", 1, 1), ("mean", 1, 2), ("copy", 2, 1), ("mean", 2, 3),
                 ("copy", 3, 1)], [2, 4]),
    "average_top": (["expand", "--blocks", "3", "--where", "top", "--init", "average"],
                    [("copy", 0, 1), ("mean", 0, 1), ("copy", 1, 1), ("mean", 1, 2),
                     ("copy", 2, 1), ("mean", 2, 3), ("copy", 3, 1)], [1, 3, 5]),
}


def assert_layers(src: Path, out: Path, expected: list) -> None:
    a = load_file(str(src / "model.safetensors"))
    b = {}
    for shard in out.glob("*.safetensors"):
        b.update(load_file(str(shard)))
    assert {k for k in b if ".layers." not in k} == {k for k in a if ".layers." not in k}
    for k in a:
        if ".layers." not in k:
            assert torch.equal(a[k], b[k]), k
    layer_names = {k.split(".layers.0.")[1] for k in a if ".layers.0." in k}
    assert len([k for k in b if ".layers." in k]) == len(expected) * len(layer_names)
    for i, (kind, j, x) in enumerate(expected):
        for name in layer_names:
            got = b[f"model.layers.{i}.{name}"]
            if kind == "mean":
                want = (a[f"model.layers.{j}.{name}"] + a[f"model.layers.{x}.{name}"]) / 2
            else:
                want = a[f"model.layers.{j}.{name}"]
                if any(r[1:] in name for r in RESIDUAL):
                    want = want * x
            assert torch.equal(got, want), (i, kind, j, x, name)


@pytest.fixture(scope="module")
def variant_outputs(tiny_model_factory, tmp_path_factory):
    """Each variant's config written by the CLI (-o) and run by stock mergekit-yaml, all in one
    process to pay mergekit's import once (solar_average: registered by solar-merge's .pth
    plugin hook, which stock mergekit-yaml loads)."""
    src = tiny_model_factory(tied=False)
    root = tmp_path_factory.mktemp("variants")
    pairs = []
    for name, (args, _, _) in VARIANTS.items():
        cfg = root / f"{name}.yaml"
        result = CliRunner().invoke(main, [args[0], str(src), *args[1:], "-o", str(cfg)])
        assert result.exit_code == 0, result.output
        pairs += [str(cfg), str(root / name)]
    subprocess.run([sys.executable, "-c", STOCK_YAML, *pairs], check=True, capture_output=True)
    return src, root


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_tensors_are_the_definition(variant_outputs, name):
    from solar_merge.upscale import new_layers_of

    src, root = variant_outputs
    _, expected, new = VARIANTS[name]
    out = root / name
    assert_layers(src, out, expected)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(expected)
    text = (root / f"{name}.yaml").read_text()
    assert text.startswith(f"# mergekit-yaml {name}.yaml OUT")
    assert new_layers_of(out) == new  # what `trainable_layers: new` trains


def test_identity_blocks_leave_the_logits_unchanged(variant_outputs):
    src, root = variant_outputs
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 384, (2, 12))
    with torch.no_grad():
        want = base(ids).logits
        for name in ("top", "interleaved"):
            grown = AutoModelForCausalLM.from_pretrained(root / name).eval()
            torch.testing.assert_close(grown(ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spec,expected", [
    ({"drop": 1, "scale_overlap": 0.5}, [0, 1, 2, 1, 2, 3]),
    ({"repeat": "1:3"}, [0, 1, 2, 1, 2, 3]),
    ({"method": "expand", "blocks": 3, "where": "top", "init": "average"},
     [0, 0, 1, 1, 2, 2, 3]),
    ({"method": "expand", "blocks": 2, "where": "top"}, [0, 1, 1, 2, 2, 3]),
])
def test_layer_types_follow_every_variant(tmp_path, spec, expected):
    from solar_merge.upscale import plan_upscale

    cfg = Qwen2Config(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                      sliding_window=16, max_window_layers=2)
    src = tmp_path / "qwen"
    AutoModelForCausalLM.from_config(cfg).save_pretrained(src)
    before = cfg.layer_types
    assert len(set(before)) == 2
    spec = dict(spec)
    out = plan_upscale(str(src), spec.pop("method", "dus"), **spec).run(tmp_path / "out")
    written = json.loads((out / "config.json").read_text())
    # an average block takes the type of the lower of its two layers
    assert written["layer_types"] == [before[i] for i in expected]
    assert written["num_hidden_layers"] == len(expected)
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.parametrize("args,message", [
    (["dus", "--drop", "1", "--scale-overlap", "0"], "must be a positive number"),
    (["dus", "--drop", "1", "--scale-overlap", "-0.5"], "must be a positive number"),
    (["dus", "--drop", "2", "--scale-overlap", "0.5"], "share no layer"),
    (["dus", "--repeat", "2:2"], "is empty"),
    (["dus", "--repeat", "3:5"], "outside the model's layers [0, 4)"),
    (["dus", "--repeat", "-1:2"], "outside the model's layers [0, 4)"),
    (["dus", "--repeat", "1-3"], "expected A:B"),
    (["dus", "--repeat", "1:3", "--drop", "1"], "exactly one of --drop"),
    (["expand", "--blocks", "3"], "must divide the model's 4 layers"),
    (["expand", "--blocks", "4", "--init", "average"], "at least 2 layers"),
    (["expand", "--blocks", "4", "--where", "top"], "must be 1..3"),
    (["expand", "--every", "2", "--where", "top"], "go with --blocks"),
])
def test_bad_upscale_options(tiny_model, tmp_path, args, message):
    for sink in (["-o", str(tmp_path / "c.yaml")], ["--run", str(tmp_path / "out")]):
        result = CliRunner().invoke(main, [args[0], str(tiny_model), *args[1:], *sink])
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("Error:") == 1, result.output
        assert "Traceback" not in result.output and "layers ->" not in result.output
        assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial folder


# -- trainable_layers: new -------------------------------------------------------------------

def test_trainable_layers_new_trains_exactly_the_created_layers(variant_outputs, tmp_path):
    """...and the held-out curve the study plots: TRL's eval_loss at steps 0 and 1."""
    from pydoc_data.topics import topics

    from solar_merge.stages import resolve

    _, root = variant_outputs
    model = root / "top"  # new blocks 2 and 4
    texts = list(topics.values())
    corpus, held_out = tmp_path / "corpus.txt", tmp_path / "held_out.txt"
    corpus.write_text(texts[0][:2000])
    held_out.write_text(texts[1][:600])
    stage = {"stage": "cpt", "model": str(model), "datasets": [str(corpus)], "seq_len": 32,
             "eval_datasets": [str(held_out)],
             "args": {"max_steps": 1, "learning_rate": 1e-2, "per_device_train_batch_size": 2,
                      "save_steps": 100, "gradient_checkpointing": False,
                      "eval_strategy": "steps", "eval_steps": 1, "eval_on_start": True}}
    assert resolve({**stage, "trainable_layers": "new"})["trainable_layers"] == [2, 4]
    cfg = tmp_path / "cpt.yaml"
    cfg.write_text(yaml.safe_dump(stage))
    result = CliRunner().invoke(main, ["train", str(cfg), "trainable_layers=new",
                                       "-o", str(tmp_path / "cpt")])
    assert result.exit_code == 0, result.output
    before = load_file(str(model / "model.safetensors"))
    after = load_file(str(tmp_path / "cpt" / "model.safetensors"))
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and {k.split(".")[2] for k in changed} == {"2", "4"}
    assert all(".layers." in k for k in changed)
    rows = [json.loads(line) for line in
            (tmp_path / "cpt" / "loss.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    assert sorted(evals) == [0, 1] and evals[1] != evals[0]  # scored before and after


def test_trainable_layers_new_needs_an_upscaled_model(tiny_model, tmp_path):
    from solar_merge.stages import resolve

    with pytest.raises(UserError, match="holds no mergekit_config.yml"):
        resolve({"stage": "cpt", "model": str(tiny_model), "datasets": ["x.txt"],
                 "trainable_layers": "new"}, base_dir=tmp_path)


def test_recipe_resolves_new_from_the_upscale_stage(tiny_model, tmp_path):
    """Through a train stage, before anything exists; `new` is hashed, indices are run."""
    from solar_merge import recipe

    (tmp_path / "c.txt").write_text("text")
    train = {"stage": "cpt", "datasets": ["c.txt"], "trainable_layers": "new"}
    data = {"name": "t", "stages": {
        "avg": {"upscale": {"model": str(tiny_model), "method": "expand", "blocks": 3,
                            "where": "top", "init": "average"}},
        "rep": {"upscale": {"model": str(tiny_model), "repeat": [1, 3], "scale_overlap": 0.5}},
        "cpt": {"train": {**train, "model": "avg"}},
        "cpt2": {"train": {**train, "model": "cpt"}},
        "cpt3": {"train": {**train, "model": "rep"}}}}
    p = recipe.plan(data, tmp_path / "runs", base_dir=tmp_path)
    assert [p.stages[s].info.n_layers for s in ("avg", "rep")] == [7, 6]
    assert p.stages["cpt"].config["trainable_layers"] == [1, 3, 5]
    assert p.stages["cpt2"].config["trainable_layers"] == [1, 3, 5]
    assert p.stages["cpt3"].config["trainable_layers"] == [3, 4]
    data["stages"]["cpt"]["train"]["model"] = str(tiny_model)
    with pytest.raises(UserError, match="stages.cpt.train: trainable_layers: new"):
        recipe.plan(data, tmp_path / "runs", base_dir=tmp_path)


@pytest.mark.parametrize("spec,message", [
    ({"method": "expand", "blocks": 2, "drop": 1}, "method expand takes no `drop`"),
    ({"method": "dus", "drop": 1, "repeat": "1:2"}, "needs `drop` or `repeat`"),
    ({"method": "dus", "drop": 1, "init": "average"}, "method dus takes no `init`"),
    ({"method": "expand", "blocks": 3}, "must divide"),
    ({"method": "dus", "drop": 1, "scale_overlap": -1}, "must be a positive number"),
])
def test_recipe_upscale_spec_errors(tiny_model, tmp_path, spec, message):
    from solar_merge import recipe

    data = {"name": "t", "stages": {"up": {"upscale": {"model": str(tiny_model), **spec}}}}
    with pytest.raises(UserError, match=message):
        recipe.plan(data, tmp_path / "runs", base_dir=tmp_path)


def test_override_of_one_anchored_stage_changes_only_that_stage(tiny_model, tmp_path):
    """The study's recipe shares one train block through a YAML anchor (`<<: *cpt`)."""
    from solar_merge import recipe

    (tmp_path / "c.txt").write_text("text")
    (tmp_path / "r.yaml").write_text(
        f"name: t\nstages:\n"
        f"  a: {{train: &cpt {{stage: cpt, model: {tiny_model}, datasets: [c.txt],\n"
        f"                    args: {{max_steps: 3}}}}}}\n"
        f"  b: {{train: {{<<: *cpt}}}}\n")
    p = recipe.plan(str(tmp_path / "r.yaml"), tmp_path / "runs",
                    ["stages.b.train.args.max_steps=5"])
    assert [p.stages[s].config["args"]["max_steps"] for s in "ab"] == [3, 5]
