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
from solar_merge.upscale import check_drop, dus_config, layer_map, upscale


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
    rows = layer_map(32, 8)
    assert len(rows) == 48
    assert rows[23] == (23, "A", 23) and rows[24] == (24, "B", 8) and rows[47] == (47, "B", 31)


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
    out = upscale(str(src), 2, tmp_path / "dus")
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
    out = upscale(str(src), 1, tmp_path / "dus")
    after = json.loads((out / "config.json").read_text())["layer_types"]
    assert after == [before[i] for _, _, i in layer_map(6, 1)]
    AutoModelForCausalLM.from_pretrained(out)


def test_relative_paths_never_call_the_hub(tiny_model_factory, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    def no_network(*a, **k):
        raise AssertionError("the Hub was called")

    monkeypatch.setattr(huggingface_hub, "repo_exists", no_network)
    shutil.copytree(tiny_model_factory(), tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    out = upscale("base", 1, "dus")  # both relative, one '/' at most: mergekit's is_hf trap
    assert (out / "config.json").exists() and (out / "README.md").exists()


def test_rerun_skips_and_no_partial_left(tiny_model, tmp_path):
    out = upscale(str(tiny_model), 1, tmp_path / "dus")
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    upscale(str(tiny_model), 1, tmp_path / "dus")
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    # Only the finished folder (and the hidden lock file that keeps runs apart) remain.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dus.lock", "dus"]


def test_cli_config_runs_with_stock_mergekit_yaml(tiny_model, tmp_path):
    cfg = tmp_path / "dus.yaml"
    result = CliRunner().invoke(main, ["dus", str(tiny_model), "--drop", "1", "-o", str(cfg)])
    assert result.exit_code == 0, result.output
    text = cfg.read_text()
    assert text.startswith("# mergekit-yaml dus.yaml OUT")
    assert yaml.safe_load(text)["merge_method"] == "passthrough"
    out = tmp_path / "stock"
    mergekit_yaml = [sys.executable, "-c", "from mergekit.scripts.run_yaml import main; main()"]
    subprocess.run(mergekit_yaml + [str(cfg), str(out), "--copy-tokenizer", "--clone-tensors"],
                   check=True, capture_output=True)
    assert_dus_layers(tiny_model, out, 4, 1)
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 6


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
    from solar_merge.upscale import expand, new_block_layers

    src = tiny_model_factory(arch=arch, layers=4, tied=False)
    out = expand(str(src), 2, tmp_path / "pro")
    base = AutoModelForCausalLM.from_pretrained(src).eval()
    grown = AutoModelForCausalLM.from_pretrained(out).eval()
    assert grown.config.num_hidden_layers == 6 and new_block_layers(4, 2) == [2, 5]
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
