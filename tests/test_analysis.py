"""`solar-merge seam` (angular distances between hidden states) and `plan`."""

import csv
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from solar_merge.cli import main


def _text(tmp_path) -> Path:
    from pydoc_data.topics import topics

    path = tmp_path / "text.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return path


def _plant_identity(src: Path, dst: Path, layers) -> Path:
    """A copy of src whose listed layers add nothing to the residual stream (o_proj and
    down_proj zero, as LLaMA Pro's copies): the states entering and leaving them are equal."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    for j in layers:
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            weights[f"model.layers.{j}.{name}"].zero_()
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _read_csv(path: Path) -> list[list[str]]:
    with open(path) as f:
        return list(csv.reader(f))


def test_planted_seam_is_found_and_csv_matches_a_direct_computation(tiny_model_factory,
                                                                    tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = _plant_identity(tiny_model_factory(layers=8), tmp_path / "m", layers=(3, 4))
    text = _text(tmp_path)
    out = tmp_path / "seam"
    result = CliRunner().invoke(main, ["seam", str(model), "--data", str(text), "--samples",
                                       "3", "--seq-len", "32", "--layers", "10", "-o",
                                       str(out)])
    assert result.exit_code == 0, result.output
    # h_3 = h_4 = h_5: the SOLAR seam m=3 (h_5 into layer 3) joins identical states
    assert "recommended --drop 3" in result.output
    assert "recommended --repeat 3:5" in result.output
    summary = json.loads((out / "seam.json").read_text())
    assert summary["recommended_drop"] == 3 and summary["recommended_repeat"] == [3, 5]
    rows = _read_csv(out / "seam.csv")
    assert rows[0][:3] == ["layer", "k=1", "k=2"] and len(rows) == 1 + 8
    table = {int(r[0]): r[1:] for r in rows[1:]}
    assert float(table[3][0]) < 1e-6 and float(table[4][0]) < 1e-6
    assert min(float(table[layer][0]) for layer in (0, 1, 2, 5, 6, 7)) > 1e-2
    cands = {int(r[0]): float(r[5]) for r in _read_csv(out / "candidates.csv")[1:]}
    assert cands[3] < 1e-6 and min(cands[1], cands[2]) > 1e-2
    assert (out / "seam.png").stat().st_size > 10_000

    # the direct computation: arccos of the cosine, per token, averaged
    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    ids = tok(text.read_text()[:5000], add_special_tokens=False)["input_ids"][:3 * 32]
    with torch.no_grad():
        states = lm(input_ids=torch.tensor(ids).view(3, 32),
                    output_hidden_states=True).hidden_states
    h = [s.reshape(-1, s.shape[-1]).double() for s in states]
    for layer, k in [(0, 1), (2, 3), (5, 3), (0, 8), (7, 1), (1, 6)]:
        cos = torch.nn.functional.cosine_similarity(h[layer], h[layer + k], dim=-1)
        direct = (torch.arccos(cos.clamp(-1, 1)) / math.pi).mean().item()
        assert float(table[layer][k - 1]) == pytest.approx(direct, abs=2e-6)
    assert table[1][7] == ""  # l + k > n: no such state


def test_odd_target_recommends_the_planted_repeat_and_no_drop(tiny_model_factory, tmp_path):
    from solar_merge.analysis import seam

    model = _plant_identity(tiny_model_factory(layers=8), tmp_path / "m", layers=(5,))
    result = seam(str(model), _text(tmp_path), tmp_path / "out", samples=2, seq_len=32,
                  layers=9)
    rec = result.recommendation
    assert rec.drop is None and (rec.repeat.start, rec.repeat.end) == (5, 6)
    assert rec.repeat.distance < 1e-6 and "even number of layers" in rec.reason
    # a re-run with the same model, data and options reuses the finished folder
    again = seam(str(model), _text(tmp_path), tmp_path / "out", samples=2, seq_len=32,
                 layers=9)
    assert again.skipped and again.recommendation.repeat.start == 5
    # another target re-scores the same measurement (no forward pass) and rewrites the files
    other = seam(str(model), _text(tmp_path), tmp_path / "out", samples=2, seq_len=32,
                 layers=10)
    assert other.skipped and other.recommendation.repeat.layers == 10
    assert json.loads((tmp_path / "out" / "seam.json").read_text())["target"]["layers"] == 10


def test_budget_picks_the_largest_stack_that_fits():
    from solar_merge.analysis import choose_target, parse_budget

    assert parse_budget("10B") == 10**10 and parse_budget("10.7b") == 10_700_000_000
    assert parse_budget("500M") == 5 * 10**8 and parse_budget("7e9") == 7 * 10**9
    per_layer, rest = 218_112_000, 262_148_096
    size = lambda s: rest + s * per_layer  # Mistral-7B's shape
    assert choose_target(32, budget=11 * 10**9, params_of=size).layers == 48
    assert choose_target(32, budget=10 * 10**9, params_of=size).layers == 44
    assert choose_target(32, params_of=size).layers == 48  # SOLAR's m = n/4


@pytest.mark.parametrize("args, words", [
    (["--seq-len", "64", "--data", "SHORT"], "too short for one sample"),
    (["--seq-len", "100000"], "exceeds the model's context"),
    (["--layers", "20"], "out of range"),
    (["--layers", "8"], "out of range"),
    (["--budget", "lots"], "not a parameter count"),
    (["--budget", "1k"], "fits in"),
])
def test_bad_input_exits_2_with_one_message_and_writes_nothing(tiny_model, tmp_path, args,
                                                               words):
    out = tmp_path / "out"
    text = _text(tmp_path)
    short = tmp_path / "short.txt"
    short.write_text("Too short to fill one sample.")
    args = [str(short) if a == "SHORT" else a for a in args]
    before = text.read_bytes()
    result = CliRunner().invoke(main, ["seam", str(tiny_model), "--data", str(text), "-o",
                                       str(out), *args])
    assert result.exit_code == 2, result.output
    assert words in result.output and "Traceback" not in result.output
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())
    assert text.read_bytes() == before


def test_seam_never_replaces_a_folder_it_did_not_write(tiny_model, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    args = ["seam", str(tiny_model), "--data", str(_text(tmp_path)), "--samples", "1",
            "--seq-len", "16", "-o", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "notes.txt").read_text() == "keep me"
    assert CliRunner().invoke(main, [*args, "--overwrite"]).exit_code == 0
    assert (out / "seam.csv").is_file() and not (out / "notes.txt").exists()


def test_seam_help_states_the_definition():
    result = subprocess.run([sys.executable, "-m", "solar_merge.cli", "seam", "--help"],
                            capture_output=True, text=True, check=True)
    assert "arccos(cos" in result.stdout and "output_hidden_states" in result.stdout


# -- plan ----------------------------------------------------------------------------------------

MISTRAL_7B = {  # Hub config.json of mistralai/Mistral-7B-v0.1 (the fields that size it)
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False,
    "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "sliding_window": 4096, "torch_dtype": "bfloat16", "hidden_act": "silu",
}


@pytest.fixture
def mistral_dir(tmp_path) -> Path:
    folder = tmp_path / "Mistral-7B-v0.1"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(MISTRAL_7B, indent=2))
    return folder


def test_plan_gives_solar_numbers_from_config_alone_without_torch(mistral_dir):
    code = ("import sys, time; t = time.perf_counter(); from solar_merge.cli import main\n"
            f"main(['plan', {str(mistral_dir)!r}, '--drop', '8'], standalone_mode=False)\n"
            "print('seconds', time.perf_counter() - t)\n"
            "print('heavy', [m for m in ('torch', 'mergekit', 'transformers') "
            "if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    out = result.stdout
    assert "32 -> 48 layers" in out and "7.24B -> 10.73B" in out
    assert "bfloat16 / float16 21.46 GB" in out
    assert "heavy []" in out
    assert float(out.split("seconds ")[1].split()[0]) < 1.0


def test_plan_counts_match_real_models(tiny_model_factory):
    """From config.json alone, the same count as the weights on disk (tied and untied,
    Llama, Mistral and Qwen2 with its q/k/v biases)."""
    from solar_merge.analysis import plan
    from solar_merge.checkpoints import model_info

    for arch, tied in (("llama", True), ("mistral", False), ("qwen2", True)):
        folder = tiny_model_factory(arch=arch, layers=4, tied=tied)
        assert plan(str(folder)).shape.params == model_info(str(folder)).params, arch
        assert plan(str(folder), drop=1).layers == 6


@pytest.mark.parametrize("args, words", [
    (["--drop", "16"], "out of range"),
    (["--drop", "0"], "out of range"),
    (["--every", "5"], "must divide"),
    (["--drop", "8", "--every", "4"], "both given"),
])
def test_plan_bad_input_exits_2(mistral_dir, args, words):
    result = CliRunner().invoke(main, ["plan", str(mistral_dir), *args])
    assert result.exit_code == 2 and words in result.output, result.output
    assert "Traceback" not in result.output


def test_plan_memory_is_memory_py_per_strategy(mistral_dir):
    """The training memory printed is solar_merge.memory's estimate for the up-scaled shape."""
    from solar_merge import memory
    from solar_merge.analysis import plan

    result = plan(str(mistral_dir), drop=8, launch="zero3", devices=8, stage="sft",
                  precision="bf16", batch=1, seq_len=2048)
    (name, est), = result.memory.items()
    assert name == "zero3 x8"
    shape = memory.Shape.from_config({**MISTRAL_7B, "num_hidden_layers": 48})
    want = memory.estimate(shape, memory.Setup(stage="sft", precision="bf16", batch=1,
                                               seq_len=2048, activation_checkpointing=True,
                                               strategy="zero3", devices=8))
    assert est.total == want.total
    everything = plan(str(mistral_dir), drop=8).memory
    assert list(everything) == ["1 device", "zero1 x8", "zero2 x8", "zero3 x8", "fsdp x8"]
    assert everything["zero3 x8"].total < everything["1 device"].total
