"""solar_average / solar_slerp: registered with mergekit, equal to its linear / slerp."""

import pytest
import torch
from mergekit.merge_methods import merge_tensors, registered_methods
from safetensors.torch import load_file

import solar_merge  # noqa: F401
from solar_merge.merging import merge
from solar_merge.methods import register_all


def weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_registered_once_and_idempotent():
    register_all()
    register_all()
    names = [m.spec.name for m in registered_methods()]
    assert names.count("solar_average") == 1 and names.count("solar_slerp") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_average_matches_linear(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(64, 48, generator=g).to(dtype) for _ in range(3)]
    params = {"weight": [0.4, 0.6, 0.25]}
    for normalize in (True, False):
        ours = merge_tensors(tensors, "solar_average", parameters={**params, "normalize": normalize})
        theirs = merge_tensors(tensors, "linear", parameters={**params, "normalize": normalize})
        assert ours.dtype == dtype
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_average_zero_sum_names_tensor():
    t = [torch.ones(4), torch.ones(4)]
    with pytest.raises(ValueError, match="model.layers.3.mlp.up_proj.weight.*sum to 0"):
        merge_tensors(t, "solar_average", parameters={"weight": [1.0, -1.0]},
                      name="model.layers.3.mlp.up_proj.weight")
    # Without normalization a zero sum is legitimate (a task vector, say).
    out = merge_tensors(t, "solar_average", parameters={"weight": [1.0, -1.0], "normalize": False})
    assert torch.equal(out, torch.zeros(4))


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_matches_builtin_and_needs_no_base(t):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    theirs = merge_tensors([a, b], "slerp", parameters={"t": t}, base_index=0)
    with_base = merge_tensors([a, b], "solar_slerp", parameters={"t": t}, base_index=0)
    without_base = merge_tensors([a, b], "solar_slerp", parameters={"t": t})
    torch.testing.assert_close(with_base, theirs)
    torch.testing.assert_close(without_base, theirs)
    # Base given second: t=0 is still the base.
    flipped = merge_tensors([b, a], "solar_slerp", parameters={"t": t}, base_index=1)
    torch.testing.assert_close(flipped, theirs)
    if t == 0.0:
        torch.testing.assert_close(without_base, a)
    if t == 1.0:
        torch.testing.assert_close(without_base, b)


def test_slerp_is_numerically_safe():
    a = torch.randn(8, 16)
    zero = torch.zeros(8, 16)
    for other in (zero, a * 3.0, -a):  # zero norm, parallel, antiparallel
        out = merge_tensors([a, other], "solar_slerp", parameters={"t": 0.25})
        assert torch.isfinite(out).all()
        if other is not zero:  # (anti)parallel rows fall back to linear interpolation
            torch.testing.assert_close(out, 0.75 * a + 0.25 * other)


def test_graph_merges_equal_builtin_with_gradients_and_filters(tiny_model_factory, tmp_path):
    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    avg = {"models": [{"model": str(a), "parameters": {"weight": [0.2, 0.8]}},
                      {"model": str(b), "parameters": {"weight": 0.6}}],
           "base_model": str(a), "dtype": "float32"}
    t = {"t": [{"filter": "self_attn", "value": [0.1, 0.9]}, {"filter": "mlp", "value": 0.7},
               {"value": 0.4}]}
    slerp = {"models": [{"model": str(a)}, {"model": str(b)}], "base_model": str(a),
             "parameters": t, "dtype": "float32"}
    pairs = [({**avg, "merge_method": "solar_average"}, {**avg, "merge_method": "linear"}),
             ({**slerp, "merge_method": "solar_slerp"}, {**slerp, "merge_method": "slerp"})]
    for i, (ours, theirs) in enumerate(pairs):
        x = weights(merge(ours, tmp_path / f"ours{i}"))
        y = weights(merge(theirs, tmp_path / f"theirs{i}"))
        assert x.keys() == y.keys()
        for name in x:
            torch.testing.assert_close(x[name], y[name], rtol=1e-6, atol=1e-6, msg=name)
    # The gradient really varies across layers (not a constant t).
    wa = weights(a)
    out = weights(tmp_path / "ours1")
    key = "model.layers.{}.self_attn.q_proj.weight"
    d0 = (out[key.format(0)] - wa[key.format(0)]).norm()
    d3 = (out[key.format(3)] - wa[key.format(3)]).norm()
    assert d3 > 2 * d0  # layer 3 (t~0.9) moved much further from A than layer 0 (t~0.1)


def test_model_card_names_our_methods(tiny_model_factory, tmp_path):
    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    cfg = {"merge_method": "solar_slerp", "models": [{"model": str(a)}, {"model": str(b)}],
           "parameters": {"t": 0.5}, "dtype": "float32"}
    out = merge(cfg, tmp_path / "card")
    card = (out / "README.md").read_text()
    assert "SOLAR SLERP" in card and ".partial" not in card
