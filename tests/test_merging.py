"""Bad merge input: exit code 2, a message naming the field and the fix, nothing left behind."""

import pytest
import yaml
from click.testing import CliRunner

from solar_merge.cli import main
from solar_merge.errors import UserError
from solar_merge.merging import check_config
from solar_merge.outputs import is_complete


def run_yaml(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["yaml", str(path), str(out)])
    return result, out


def avg(a, b, **extra):
    return {"merge_method": "solar_average", "dtype": "float32",
            "models": [{"model": str(a), "parameters": {"weight": 0.5}},
                       {"model": str(b), "parameters": {"weight": 0.5}}], **extra}


CASES = {
    "missing model": (lambda a, b, t: avg(a, t / "nope"), ["models[1].model", "not found"]),
    "layer range outside": (
        lambda a, b, t: {"merge_method": "passthrough",
                         "slices": [{"sources": [{"model": str(a), "layer_range": [0, 9]}]}]},
        ["slices[0].sources[0].layer_range", "outside the model's 4 layers"]),
    "unknown method": (lambda a, b, t: {**avg(a, b), "merge_method": "solar_averge"},
                       ["merge_method", "did you mean `solar_average`"]),
    "different shapes": (lambda a, b, t: avg(a, t / "six"), ["cannot be merged"]),
    "misspelled parameter": (
        lambda a, b, t: {**avg(a, b), "models": [{"model": str(a), "parameters": {"wieght": 1}},
                                                 {"model": str(b)}]},
        ["models[0].parameters.wieght", "did you mean `weight`"]),
    "misspelled top key": (lambda a, b, t: {**avg(a, b), "normalise": False},
                           ["normalise: unknown key"]),
    "malformed yaml": (lambda a, b, t: "models: [\n  - model: x", ["not valid YAML"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_merge_input(case, tiny_model_factory, tmp_path):
    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    (tmp_path / "six").symlink_to(tiny_model_factory(layers=6))
    make, expected = CASES[case]
    result, out = run_yaml(tmp_path, make(a, b, tmp_path))
    assert result.exit_code == 2, result.output
    for text in expected:
        assert text in result.output
    assert "fix:" in result.output and "Traceback" not in result.output
    assert not out.exists() and not is_complete(out)


def test_zero_weight_sum_fails_cleanly(tiny_model_factory, tmp_path):
    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    config = avg(a, b)
    config["models"][1]["parameters"]["weight"] = -0.5
    result, out = run_yaml(tmp_path, config)
    assert result.exit_code == 2
    assert "sum to 0" in result.output and "model." in result.output  # names the tensor
    assert not out.exists()
    assert not any(p.name.endswith(".partial") and (p / "solar_merge_complete.json").exists()
                   for p in tmp_path.iterdir())


def test_cli_merge_ok_and_paths_relative_to_the_output(tiny_model_factory, tmp_path):
    import os

    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    result, out = run_yaml(tmp_path, avg(a, b))
    assert result.exit_code == 0, result.output
    assert is_complete(out)
    recorded = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert [os.path.normpath(out / m["model"]) for m in recorded["models"]] == [str(a), str(b)]


def test_check_config_resolves_relative_paths(tiny_model, tmp_path):
    (tmp_path / "m").symlink_to(tiny_model)
    config = check_config({"merge_method": "passthrough",
                           "models": [{"model": "m"}]}, base_dir=tmp_path)
    assert config["models"][0]["model"] == str(tmp_path / "m")


def test_nan_input_stops_the_merge_naming_the_tensor(tiny_model_factory, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    a = tiny_model_factory(seed=0)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_factory(seed=1), bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["model.layers.2.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
    result, out = run_yaml(tmp_path, avg(a, bad))
    assert result.exit_code == 2
    assert "model.layers.2.mlp.down_proj.weight" in result.output and "NaN" in result.output
    assert not out.exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_finds_one_bad_element_anywhere(dtype, bad):
    # The merge-time check is one min/max reduction (not isfinite); it must miss nothing.
    import torch

    from solar_merge.merging import _all_finite

    for n in (1, 31, 4099):
        assert _all_finite(torch.randn(n).to(getattr(torch, dtype)))
        for position in (0, n // 2, n - 1):
            t = torch.randn(n).to(getattr(torch, dtype))
            t[position] = bad
            assert not _all_finite(t), (n, position)
    assert _all_finite(torch.empty(0, dtype=getattr(torch, dtype)))


def test_pickle_only_checkpoint_is_refused(tiny_model_factory, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_factory(seed=1), pickled)
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    result, out = run_yaml(tmp_path, avg(tiny_model_factory(seed=0), pickled))
    assert result.exit_code == 2 and "pickle" in result.output and "--allow-pickle" in result.output
    assert not out.exists()


def test_multi_runs_with_our_methods(tiny_model_factory, tmp_path):
    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    docs = [{"name": "avg", **avg(a, b)},
            {"merge_method": "solar_slerp", "dtype": "float32", "parameters": {"t": 0.5},
             "models": [{"model": "avg"}, {"model": str(a)}]}]
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    result = CliRunner().invoke(main, ["multi", str(path), "-I", str(tmp_path / "inter"),
                                       "--out-path", str(tmp_path / "final")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "final" / "config.json").exists()
    assert (tmp_path / "inter" / "avg" / "model.safetensors").exists()
    docs[0]["models"][0]["parameters"] = {"wieght": 1}
    path.write_text(yaml.safe_dump_all(docs))
    result = CliRunner().invoke(main, ["multi", str(path), "-I", str(tmp_path / "i2"),
                                       "--out-path", str(tmp_path / "final2")])
    assert result.exit_code == 2 and "did you mean `weight`" in result.output


# -- our checker against mergekit's own model ---------------------------------------------------
# merging.py checks configs without importing mergekit (seconds of torch and peft); these tests
# hold its key sets, dtypes, methods and input list to what mergekit 0.1.5 itself defines.

def test_key_sets_are_mergekits_pydantic_models():
    from mergekit.config import (
        InputModelDefinition,
        InputSliceDefinition,
        MergeConfiguration,
        OutputModuleDefinition,
        OutputSliceDefinition,
    )
    from mergekit.tokenizer.config import TokenizerConfig

    from solar_merge import merging

    assert merging.TOP_KEYS == set(MergeConfiguration.model_fields)
    assert merging.SLICE_KEYS == set(OutputSliceDefinition.model_fields)
    assert merging.SOURCE_KEYS == set(InputSliceDefinition.model_fields)
    assert merging.MODEL_KEYS == set(InputModelDefinition.model_fields)
    assert merging.MODULE_KEYS == set(OutputModuleDefinition.model_fields)
    assert merging.TOKENIZER_KEYS == set(TokenizerConfig.model_fields)


def test_dtypes_are_the_ones_mergekit_parses(tiny_model_factory):
    from mergekit.common import dtype_from_name

    from solar_merge.merging import DTYPES

    for name in DTYPES:
        assert dtype_from_name(name).is_floating_point
    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    for name in ("fp32", "bf16", "fp16", "half"):  # names mergekit fails on mid-merge
        with pytest.raises(RuntimeError):
            dtype_from_name(name)
        with pytest.raises(UserError, match=f"dtype: unknown dtype `{name}`"):
            check_config(avg(a, b, dtype=name))


def test_methods_are_mergekits_registry():
    from mergekit.merge_methods import registered_methods

    import solar_merge  # noqa: F401 - registers solar_average and solar_slerp
    from solar_merge.merging import METHODS

    assert METHODS == {m.spec.name: {p.name for p in m.spec.parameters}
                       for m in registered_methods()}


def _configs(a, b):
    """One config of each form mergekit takes models in."""
    return [
        avg(a, b, base_model=str(a)),
        {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b), "layer_range": [1, 3]}]}]},
        {"merge_method": "linear", "modules": {"decoder": {
            "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                       {"model": {"model": {"path": str(b)}}, "parameters": {"weight": 1.0}}]}}},
        {"merge_method": "linear", "models": [{"model": f"{a}+{b}", "parameters": {"weight": 1}},
                                              {"model": str(b), "parameters": {"weight": 1}}]},
    ]


def test_a_checked_config_is_a_valid_merge_configuration_with_the_same_inputs(
        tiny_model_factory):
    from mergekit.config import MergeConfiguration

    from solar_merge.merging import _all_models

    a, b = tiny_model_factory(seed=0), tiny_model_factory(seed=1)
    for config in _configs(a, b):
        checked = check_config(config)
        parsed = MergeConfiguration.model_validate(checked)
        assert _all_models(checked) == sorted({str(r.model.path)
                                               for r in parsed.referenced_models()})


@pytest.mark.parametrize("config, message", [
    ({"merge_method": "linear"}, "exactly one of `models`, `slices` or `modules`"),
    ({"merge_method": "linear", "models": [{"model": "A"}], "slices": [
        {"sources": [{"model": "A", "layer_range": [0, 1]}]}]}, "found models, slices"),
])
def test_what_mergekit_refuses_we_refuse_before_importing_it(config, message, tiny_model):
    from mergekit.config import MergeConfiguration

    config = yaml.safe_load(yaml.safe_dump(config).replace(": A", f": {tiny_model}"))
    with pytest.raises(RuntimeError):
        MergeConfiguration.model_validate(config)
    with pytest.raises(UserError) as e:
        check_config(config)
    assert message in e.value.message


def test_keys_mergekit_ignores_silently_are_refused(tiny_model):
    from mergekit.config import MergeConfiguration

    config = {"merge_method": "passthrough", "slices": [{"sources": [
        {"model": str(tiny_model), "layer_range": [0, 1], "wieght": 1}]}]}
    MergeConfiguration.model_validate(config)  # mergekit: accepted, the key dropped
    with pytest.raises(UserError) as e:
        check_config(config)
    assert "slices[0].sources[0].wieght: unknown key" in e.value.message
