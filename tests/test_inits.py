"""Up-scaling inits that need computing (solar_merge.inits) and the growth presets: each one's
definition, the configs stock mergekit-yaml runs, and `trainable_layers: new` for each."""

import json
import math
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from solar_merge.cli import main
from solar_merge.errors import UserError
from solar_merge.inits import (
    LESA,
    Heads,
    Weights,
    aligned_average,
    lesa_cost,
    lesa_holdout,
    lesa_matrices,
    match_units,
    noisy_copy,
    permute_layer,
)
from solar_merge.upscale import dus_config, new_layers_of, preset_config

STOCK_YAML = "from mergekit.scripts.run_yaml import main; import sys; " \
             "[main([c, o, '--copy-tokenizer', '--clone-tensors'], standalone_mode=False) " \
             "for c, o in zip(sys.argv[1::2], sys.argv[2::2])]"
HEADS = Heads(heads=4, kv_heads=2, head_dim=8)  # the tiny models of conftest.make_model
LAYER = "model.layers.{}."


def tensors(folder) -> dict:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(shard)))
    return out


def layer(weights: dict, i: int) -> dict:
    prefix = LAYER.format(i)
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# -- LESA ---------------------------------------------------------------------------------------

def rotating_model(folder, layers=12, theta=0.5):
    """A tiny Llama whose matrices of each type turn along a circle with depth,
    W_l = A cos(theta l) + B sin(theta l): the neighbours' mean falls short of the circle by
    1 - cos(theta) of its radius; the layer is a fixed function of its neighbours."""
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.model.layers[0].named_parameters():
            if p.ndim != 2:
                continue
            a, b = (0.1 * torch.randn(p.shape, generator=gen) for _ in range(2))
            for i, block in enumerate(model.model.layers):
                block.get_parameter(name).copy_(a * math.cos(theta * i) + b * math.sin(theta * i))
    model.save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """The predictor's small matrices train faster on one thread than on two shared ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_lesa_predicts_a_held_out_layer_better_than_the_neighbours_mean(tmp_path, capsys,
                                                                       one_thread):
    """With more training than the paper's 10 epochs (which suit a model's thousands of rows,
    not this one's dozens), in bigger batches to take seconds."""
    weights = Weights(rotating_model(tmp_path / "m"))
    errors = lesa_holdout(weights, 6, hp={**LESA, "epochs": 100, "batch": 96, "lr": 1.5e-3})
    with capsys.disabled():
        print(f"\nLESA held-out layer 6 of 12 (relative Frobenius error): LESA "
              f"{errors['all']['lesa']:.4f}, neighbours' mean {errors['all']['mean']:.4f}")
    assert errors["all"]["mean"] == pytest.approx(1 - math.cos(0.5), rel=1e-3)
    assert errors["all"]["lesa"] < 0.85 * errors["all"]["mean"]
    assert set(errors) == {"all", *(s for s in weights.suffixes if s.endswith("proj.weight"))}


def test_lesa_reconstructs_the_layers_it_learns_from_exactly_in_its_basis():
    """W_l = U S V_l: with a predictor that returns the true V_l, LESA's layer is W_l."""
    gen = torch.Generator().manual_seed(1)
    mats = [torch.randn(6, 4, generator=gen) for _ in range(5)]
    u, s, vh = torch.linalg.svd(torch.cat(mats, dim=1), full_matrices=False)
    v = vh.reshape(vh.shape[0], 5, 4)
    for i, m in enumerate(mats):
        torch.testing.assert_close((u * s) @ v[:, i], m, rtol=0, atol=1e-5)
    out = lesa_matrices(mats, [1, 2], seed=0, hp={**LESA, "epochs": 1})
    assert [t.shape for t in out] == [(6, 4), (6, 4)]
    again = lesa_matrices(mats, [1, 2], seed=0, hp={**LESA, "epochs": 1})
    assert all(torch.equal(a, b) for a, b in zip(out, again))  # seeded
    with pytest.raises(UserError, match="at least 3 layers"):
        lesa_matrices(mats[:2], [0])


def test_lesa_cost_counts_the_svds_and_the_predictor():
    from solar_merge.sizing import Shape

    shape = Shape(params=0, layers=3, hidden=4, intermediate=8, vocab=10, kv_dim=2)
    cost = lesa_cost(shape, hp={**LESA, "hidden": 2, "epochs": 1})
    # (out, in) per type: q, o (4, 4); k, v (2, 4); gate, up (8, 4); down (4, 8); 3 layers
    svd = 2 * (4 * 16 * 12 + 8 * 64) + 2 * (4 * 4 * 12 + 8 * 8) + 2 * (4 * 64 * 12 + 8 * 512) \
        + (4 * 16 * 24 + 8 * 64)
    # predictor: 6 x (2*in*2 + 2*2 + 2*in) parameters x rank rows x 1 inner layer x 1 epoch
    fit = 6 * (2 * 28 * 4 + 2 * 28 * 2 + 2 * 28 * 8 + 52 * 4)
    assert cost["svd_flops"] == svd and cost["fit_flops"] == fit
    assert cost["peak_bytes"] == 4 * (2 * 8 * 12 + 8 * 8)


# -- OpT-DeUS: alignment ------------------------------------------------------------------------

def planted(seed=0) -> dict:
    """Permutations of the tiny model's units that keep its function: MLP neurons, key/value
    heads, and the query heads inside each key/value head's group."""
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randperm(HEADS.kv_heads, generator=gen)
    q = torch.cat([kv[g] * HEADS.group + torch.randperm(HEADS.group, generator=gen)
                   for g in range(HEADS.kv_heads)])
    return {"mlp": torch.randperm(64, generator=gen), "kv": kv, "q": q}


def test_permuting_heads_and_neurons_keeps_the_function(tiny_model_factory, tmp_path):
    src = tiny_model_factory(tied=False)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
        block = model.model.layers[1]
        state = permute_layer(block.state_dict(), planted(), HEADS)
        assert any(not torch.equal(state[k], v) for k, v in block.state_dict().items())
        block.load_state_dict(state)
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("noise", [0.0, 1e-3])
def test_alignment_finds_a_planted_permutation_exactly(tiny_model, noise):
    upper = layer(tensors(tiny_model), 2)
    perms = planted(seed=3)
    gen = torch.Generator().manual_seed(4)
    lower = {k: v + noise * torch.randn(v.shape, generator=gen)
             for k, v in permute_layer(upper, perms, HEADS).items()}
    found = match_units(lower, upper, HEADS)
    for unit, perm in perms.items():  # found undoes the planted one: lower[found[k]] = upper[k]
        assert torch.equal(perm[found[unit]], torch.arange(len(perm))), unit
    aligned = permute_layer(lower, found, HEADS)
    for k, v in upper.items():
        torch.testing.assert_close(aligned[k], v, rtol=0, atol=5 * noise + 1e-7)
    block = aligned_average(lower, upper, HEADS)
    for k, v in block.items():
        if "o_proj" in k or "down_proj" in k:  # OpT-DeUS zeroes the residual outputs
            assert not v.any(), k
        else:
            torch.testing.assert_close(v, upper[k], rtol=0, atol=5 * noise + 1e-7)


def test_aligned_average_is_the_mean_after_matching(tiny_model):
    weights = tensors(tiny_model)
    lower, upper = layer(weights, 1), layer(weights, 2)
    perms = match_units(lower, upper, HEADS)
    aligned = permute_layer(lower, perms, HEADS)
    block = aligned_average(lower, upper, HEADS)
    q = "self_attn.q_proj.weight"
    torch.testing.assert_close(block[q], (aligned[q] + upper[q]) / 2)
    assert not torch.equal(block[q], (lower[q] + upper[q]) / 2)  # the unaligned mean differs
    with pytest.raises(UserError, match="does not know how to align"):
        aligned_average({**lower, "mlp.extra.weight": torch.ones(2, 2)}, upper, HEADS)


# -- noise --------------------------------------------------------------------------------------

def test_noise_has_the_asked_standard_deviation():
    gen = torch.Generator().manual_seed(0)
    block = {"w": 0.05 * torch.randn(256, 256, generator=gen), "zero": torch.zeros(8, 8),
             "norm": torch.ones(256)}
    out = noisy_copy(block, 0.1, seed=7, index=2)
    ratio = (out["w"] - block["w"]).std() / block["w"].std()
    assert ratio == pytest.approx(0.1, rel=0.02)
    assert not out["zero"].any() and torch.equal(out["norm"], block["norm"])
    assert torch.equal(noisy_copy(block, 0.1, seed=7, index=2)["w"], out["w"])
    assert not torch.equal(noisy_copy(block, 0.1, seed=8, index=2)["w"], out["w"])
    assert not torch.equal(noisy_copy(block, 0.1, seed=7, index=3)["w"], out["w"])


# -- presets ------------------------------------------------------------------------------------

def test_presets_are_the_papers_layer_maps():
    from solar_merge.upscale import output_layers

    def layout(config):
        return [layers[0][1] for layers in output_layers(config)]

    # MIDAS: the middle block of K layers, duplicated next to itself
    assert layout(preset_config("/m", "midas", n_layers=8, layers=12)) == \
        [0, 1, 2, 3, 4, 5, 2, 3, 4, 5, 6, 7]
    assert layout(preset_config("/m", "midas", n_layers=8, layers=11)) == \
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]
    assert preset_config("/m", "midas", n_layers=30, layers=40) == dus_config(
        "/m", 10, n_layers=30)  # for n - K even, one MIDAS stage is SOLAR's layout
    # G_stack: the whole model stacked g times, g = 4 by default (Du et al.)
    assert layout(preset_config("/m", "gstack", n_layers=3, layers=6)) == [0, 1, 2] * 2
    assert layout(preset_config("/m", "gstack", n_layers=3, layers=None)) == [0, 1, 2] * 4
    for preset, layers, message in (("midas", None, "needs --layers"),
                                    ("midas", 8, "8 < S <= 16"),
                                    ("gstack", 12, "multiple of it"),
                                    ("gstack", 5, "multiple of it")):
        with pytest.raises(UserError, match=message):
            preset_config("/m", preset, n_layers=8 if preset == "midas" else 5, layers=layers)
    with pytest.raises(UserError, match="does not go with --preset gstack"):
        preset_config("/m", "gstack", n_layers=3, layers=6, scale=0.5)


# -- the configs, run by stock mergekit-yaml ----------------------------------------------------

# Each output layer of the 4-layer model: a base layer (int), ("noise", source) a noisy copy,
# ("zeroed", source) a noisy copy with o_proj/down_proj zeroed, or "new" (computed between
# two layers); and the layers `trainable_layers: new` trains. Written out from the definitions.
VARIANTS = {
    "lesa": (["expand", "--blocks", "2", "--where", "top", "--init", "lesa", "--seed", "1"],
             [0, 1, "new", 2, "new", 3], [2, 4]),
    "aligned": (["expand", "--blocks", "2", "--init", "aligned-average"],
                [0, 1, "new", 2, "new", 3], [2, 4]),
    "solar_noise": (["dus", "--drop", "1", "--noise", "0.1", "--seed", "3"],
                    [0, 1, 2, ("noise", 1), ("noise", 2), 3], [3, 4]),
    "pro_noise": (["expand", "--blocks", "2", "--noise", "0.1"],
                  [0, 1, ("zeroed", 1), 2, 3, ("zeroed", 3)], [2, 5]),
    "midas": (["dus", "--preset", "midas", "--layers", "6"], [0, 1, 2, 1, 2, 3], [3, 4]),
    "gstack": (["dus", "--preset", "gstack", "--layers", "8"], [0, 1, 2, 3] * 2, [4, 5, 6, 7]),
}


@pytest.fixture(scope="module")
def variant_outputs(tiny_model_factory, tmp_path_factory):
    """Each variant's config written by the CLI (-o; computed layers in NAME.layers/) and run
    by stock mergekit-yaml, all in one process to pay mergekit's import once."""
    src = tiny_model_factory(tied=False)
    root = tmp_path_factory.mktemp("init_variants")
    pairs = []
    for name, (args, _, _) in VARIANTS.items():
        cfg = root / f"{name}.yaml"
        result = CliRunner().invoke(main, [args[0], str(src), *args[1:], "-o", str(cfg)])
        assert result.exit_code == 0, result.output
        pairs += [str(cfg), str(root / name)]
    subprocess.run([sys.executable, "-c", STOCK_YAML, *pairs], check=True, capture_output=True)
    return src, root


@pytest.mark.parametrize("name", list(VARIANTS))
def test_stock_mergekit_builds_each_init(variant_outputs, name):
    src, root = variant_outputs
    _, expected, new = VARIANTS[name]
    base, out = tensors(src), tensors(root / name)
    assert {k for k in out if ".layers." not in k} == {k for k in base if ".layers." not in k}
    for k in base:  # embeddings, final norm and head: the base's
        if ".layers." not in k:
            assert torch.equal(out[k], base[k]), k
    config = json.loads((root / name / "config.json").read_text())
    assert config["num_hidden_layers"] == len(expected)
    assert new_layers_of(root / name) == new  # what `trainable_layers: new` trains
    computed = tensors(root / f"{name}.layers") if (root / f"{name}.layers").is_dir() else {}
    j = 0
    for i, what in enumerate(expected):
        got = layer(out, i)
        if isinstance(what, int):
            want = layer(base, what)
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
            continue
        stored = layer(computed, j)  # the j-th computed layer is the j-th new one
        j += 1
        for k, v in got.items():
            residual = "o_proj" in k or "down_proj" in k
            if what != "new" and what[0] == "zeroed" and residual:
                assert not v.any(), (i, k)
            else:
                assert torch.equal(v, stored[k]), (i, k)
            if what != "new" and v.ndim == 2 and v.any():  # noise: 0.1 x the source's std
                source = layer(base, what[1])[k]
                ratio = ((v - source).std() / source.std()).item()
                assert ratio == pytest.approx(0.1, rel=0.2), (i, k, ratio)
            elif what != "new":
                assert torch.equal(v, layer(base, what[1])[k]) or residual, (i, k)


def test_computed_layers_record_how_they_were_made(variant_outputs):
    from solar_merge.inits import record_of

    _, root = variant_outputs
    lesa = record_of(root / "lesa.layers")
    assert lesa["init"] == "lesa" and lesa["sources"] == [[1, 2], [2, 3]] and lesa["seed"] == 1
    assert lesa["predictor"] == LESA and lesa["seconds"] >= 0
    noise = record_of(root / "solar_noise.layers")
    assert noise["init"] == "noise" and noise["noise"] == 0.1 and noise["sources"] == [[1], [2]]
    assert record_of(root / "pro_noise.layers")["outer"]  # the top layer is new: head carried
    text = (root / "lesa.yaml").read_text()
    assert text.startswith("# mergekit-yaml lesa.yaml OUT") and "lesa.layers" in text
    assert not (root / "midas.layers").exists()  # a preset computes nothing


def test_identity_inits_leave_the_logits_unchanged(variant_outputs):
    """OpT-DeUS's blocks (outputs zeroed) and noisy identity blocks compute the identity."""
    src, root = variant_outputs
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    want = logits(src, ids)
    for name in ("aligned", "pro_noise"):
        torch.testing.assert_close(logits(root / name, ids), want, rtol=0, atol=1e-5)
    assert not torch.allclose(logits(root / "solar_noise", ids), want, atol=1e-3)


def test_recipe_places_computed_layers_and_trains_the_new_ones(tiny_model, tmp_path):
    """`trainable_layers: new` is resolved for every init before anything exists; a recipe's
    upscale stage computes its layers into <out>/<stage>.layers."""
    from solar_merge import recipe

    (tmp_path / "c.txt").write_text("text")
    train = {"stage": "cpt", "datasets": ["c.txt"], "trainable_layers": "new"}
    ups = {"lesa": {"method": "expand", "blocks": 3, "where": "top", "init": "lesa"},
           "aligned": {"method": "expand", "blocks": 2, "init": "aligned-average"},
           "noisy": {"drop": 1, "noise": 0.05, "seed": 2},
           "midas": {"preset": "midas", "layers": 6},
           "gstack": {"preset": "gstack"}}
    stages = {name: {"upscale": {"model": str(tiny_model), **spec}}
              for name, spec in ups.items()}
    stages.update({f"cpt_{name}": {"train": {**train, "model": name}} for name in ups})
    plan = recipe.plan({"name": "t", "stages": stages}, tmp_path / "runs", base_dir=tmp_path)
    got = {n: plan.stages[f"cpt_{n}"].config["trainable_layers"] for n in ups}
    assert got == {"lesa": [1, 3, 5], "aligned": [2, 4], "noisy": [3, 4], "midas": [3, 4],
                   "gstack": list(range(4, 16))}
    only = {"name": "t", "stages": {"noisy": stages["noisy"], "lesa": stages["lesa"]}}
    recipe.run(only, tmp_path / "runs", base_dir=tmp_path, progress=False)
    for name, new in (("noisy", [3, 4]), ("lesa", [1, 3, 5])):
        assert (tmp_path / "runs" / f"{name}.layers" / "new_layers.json").is_file()
        assert new_layers_of(tmp_path / "runs" / name) == new


@pytest.mark.parametrize("args,message", [
    (["expand", "--blocks", "2", "--init", "average", "--noise", "0.1"], "duplicates none"),
    (["expand", "--blocks", "2", "--init", "lesa", "--noise", "0.1"], "duplicates none"),
    (["dus", "--drop", "1", "--seed", "2"], "draws nothing at random"),
    (["dus", "--drop", "1", "--noise", "0"], "must be a positive number"),
    (["dus", "--preset", "midas"], "needs --layers"),
    (["dus", "--drop", "1", "--layers", "6"], "goes with --preset"),
    (["dus", "--drop", "1", "--preset", "midas", "--layers", "6"], "exactly one of --drop"),
    (["dus", "--preset", "gstack", "--layers", "6"], "multiple of it"),
    (["expand", "--blocks", "4", "--init", "lesa"], "at least 2 layers"),
])
def test_bad_init_options(tiny_model, tmp_path, args, message):
    for sink in (["-o", str(tmp_path / "c.yaml")], ["--run", str(tmp_path / "out")]):
        result = CliRunner().invoke(main, [args[0], str(tiny_model), *args[1:], *sink])
        assert result.exit_code == 2, result.output
        assert message in result.output and result.output.count("Error:") == 1, result.output
        assert "Traceback" not in result.output
        assert list(tmp_path.iterdir()) == []  # nothing written, no layers computed


def test_computed_layers_need_a_place(tiny_model):
    result = CliRunner().invoke(main, ["expand", str(tiny_model), "--blocks", "2",
                                       "--init", "aligned-average"])
    assert result.exit_code == 2 and "add -o CONFIG" in result.output, result.output


def test_an_init_with_dus_is_refused_by_name(tiny_model):
    from solar_merge.errors import UserError
    from solar_merge.upscale import build_upscale

    for init in ("lesa", "aligned-average", "average"):
        with pytest.raises(UserError, match=f"--init {init} chooses how expand"):
            build_upscale(str(tiny_model), 4, method="dus", drop=1, init=init)
