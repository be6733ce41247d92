"""Nothing lost, nothing let in: bad input, token hygiene, remote code, concurrency,
and real SIGKILLs of a recipe run.

CASES is a table of bad inputs across every command. Each must end with exit code 2 and one
clear message (what is wrong + a `fix:` hint), no traceback, every input file unchanged, and
nothing under the intended output that looks finished.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from solar_merge.cli import main
from solar_merge.outputs import MARKER, is_complete, partial_dir

TOKEN = "hf_SECRETtesttoken123"
# A `python -c` entry point: optional uid drop and file-size limit, then the real CLI.
WRAPPER = """
import os, resource, signal, sys
limit, uid = int(sys.argv[1]), int(sys.argv[2])
if limit >= 0:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
if uid >= 0:  # the interpreter lives under /root: import what the command needs first
    import difflib, errno, filelock, hashlib, json, shutil, yaml
    import solar_merge.cli, solar_merge.outputs, solar_merge.stages.launch, solar_merge.data
    import solar_merge.memory, solar_merge.sizing  # train's memory check
    import solar_merge.precision, torch  # the precision decision reads the device
    solar_merge.precision.detect()
    solar_merge.stages.trl_fields("sft")  # reads TRL's source files
    os.setgid(uid)
    os.setuid(uid)
from solar_merge.cli import main
main(sys.argv[3:], prog_name="solar-merge")
"""
FAST = {"logging_steps": 1, "per_device_train_batch_size": 2, "dataloader_num_workers": 0,
        "learning_rate": 1e-3, "seed": 7}
QA = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"It is {2 * i}."}
      for i in range(4)]


def cli(argv, sub: tuple[int, int] | None = None, env=None, timeout=300):
    """(exit code, output). In-process by default; `sub=(size limit, uid)` runs a subprocess."""
    if sub is None:
        result = CliRunner().invoke(main, [str(a) for a in argv], env=env)
        return result.exit_code, result.output
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(sub[0]), str(sub[1])]
                          + [str(a) for a in argv], capture_output=True, text=True, check=False,
                          timeout=timeout, env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout + proc.stderr


def digests(*roots) -> dict[str, str]:
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content if isinstance(content, str)
                    else yaml.safe_dump(content, sort_keys=False))
    return path


def jsonl(path: Path, rows) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in rows))


def avg(*models, weights=None, **extra) -> dict:
    weights = weights or [0.5] * len(models)
    return {"merge_method": "solar_average", "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": w}}
                       for m, w in zip(models, weights)], **extra}


# -- the table ---------------------------------------------------------------------------

@dataclass
class Case:
    argv: list
    expect: list[str]
    out: Path                      # the output the command would have written
    guide: str = "fix:"            # the how-to-fix part of the message
    sub: tuple[int, int] | None = None
    roots: list[Path] = field(default_factory=list)  # input folders outside tmp_path


@dataclass
class Ctx:
    t: Path
    a: Path
    b: Path
    six: Path
    vocab512: Path  # vocabulary 512, not 384


def yaml_case(c: Ctx, config, expect, **kw) -> Case:
    path = write(c.t / "merge.yaml", config)
    return Case(["yaml", path, c.t / "out"], expect, c.t / "out", **kw)


def train_case(c: Ctx, config, expect, overrides=()) -> Case:
    path = write(c.t / "stage.yaml", config)
    return Case(["train", path, *overrides, "-o", c.t / "out"], expect, c.t / "out")


def recipe_case(c: Ctx, recipe, expect, command="validate") -> Case:
    path = write(c.t / "recipe.yaml", recipe)
    return Case([command, path, "--out", c.t / "runs"], expect, c.t / "runs")


def _nan_model(c: Ctx) -> Path:
    from safetensors.torch import load_file, save_file

    m = copy_model(c.a, c.t / "nan-model")
    weights = load_file(str(m / "model.safetensors"))
    weights["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(weights, str(m / "model.safetensors"), metadata={"format": "pt"})
    return m


def _pickle_model(c: Ctx) -> Path:
    m = copy_model(c.a, c.t / "pickled")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    return m


def _vocab_model(c: Ctx) -> Path:
    return copy_model(c.vocab512, c.t / "vocab512")


def _no_template_model(c: Ctx) -> Path:
    m = copy_model(c.a, c.t / "no-template")
    (m / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((m / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(cfg))
    return m


def _sft(c: Ctx, data, **extra) -> dict:
    return {"stage": "sft", "model": str(c.a), "datasets": [str(data)],
            "args": {**FAST, "max_steps": 1}, **extra}


def _merge_stage(*models) -> dict:
    return {"merge": {"merge_method": "solar_average",
                      "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}}


def _read_only(c: Ctx) -> Case:
    """A training stage whose output folder's parent is read-only. Root ignores mode bits,
    so as root the command runs in a subprocess as `nobody`, in a world-readable folder."""
    root = c.t
    sub = None
    if os.geteuid() == 0:
        root = Path(tempfile.mkdtemp(prefix="solar-ro-"))
        root.chmod(0o755)
        sub = (-1, 65534)
    model = copy_model(c.a, root / "model")
    data = jsonl(root / "qa.jsonl", QA)
    cfg = write(root / "stage.yaml", {"stage": "sft", "model": str(model),
                                     "datasets": [str(data)], "args": {"max_steps": 1}})
    for p in [root, *root.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    (root / "ro").mkdir()
    (root / "ro").chmod(0o555)
    out = root / "ro" / "out"
    return Case(["train", cfg, "-o", out], ["ro", "not writable"], out, sub=sub,
                roots=[root] if root != c.t else [])


def _full_disk(c: Ctx) -> Case:
    size = (c.a / "model.safetensors").stat().st_size
    path = write(c.t / "merge.yaml", avg(c.a, c.b))
    return Case(["yaml", path, c.t / "out"], ["disk is full"], c.t / "out",
                sub=(size // 2, -1))


CASES = {
    # solar-merge yaml: merge configs
    "yaml-malformed": lambda c: yaml_case(c, "models: [\n  - model: x", ["not valid YAML"]),
    "yaml-wrong-type": lambda c: yaml_case(c, {**avg(c.a, c.b), "models": str(c.a)},
                                           ["models: expected a list"]),
    "yaml-unknown-top-key": lambda c: yaml_case(c, {**avg(c.a, c.b), "normalise": False},
                                                ["normalise: unknown key"]),
    "yaml-misspelled-parameter": lambda c: yaml_case(
        c, {**avg(c.a, c.b), "models": [{"model": str(c.a), "parameters": {"wieght": 1}},
                                         {"model": str(c.b)}]},
        ["models[0].parameters.wieght", "did you mean `weight`"]),
    "yaml-bad-layer-range": lambda c: yaml_case(
        c, {"merge_method": "passthrough",
            "slices": [{"sources": [{"model": str(c.a), "layer_range": [2, 9]}]}]},
        ["slices[0].sources[0].layer_range", "outside the model's 4 layers"]),
    "yaml-missing-model": lambda c: yaml_case(c, avg(c.a, c.t / "nope"),
                                              ["models[1].model", "not found"]),
    "yaml-shape-mismatch": lambda c: yaml_case(c, avg(c.a, c.six), ["6 layers",
                                                                    "cannot be merged"]),
    "yaml-vocab-mismatch": lambda c: yaml_case(c, avg(c.a, _vocab_model(c)),
                                               ["vocab 512", "cannot be merged"]),
    "yaml-nan-weights": lambda c: yaml_case(c, avg(c.a, _nan_model(c)),
                                            ["input model", "nan-model", "NaN",
                                             "model.layers.1.mlp.up_proj.weight"]),
    "yaml-pickle-only": lambda c: yaml_case(c, avg(c.a, _pickle_model(c)),
                                            ["pickle", "--allow-pickle"]),
    "yaml-zero-weight-sum": lambda c: yaml_case(c, avg(c.a, c.b, weights=[0.5, -0.5]),
                                                ["sum to 0"]),
    "yaml-config-missing": lambda c: Case(["yaml", c.t / "nothere.yaml", c.t / "out"],
                                          ["nothere.yaml", "not found"], c.t / "out"),
    # solar-merge dus / expand
    "dus-drop-out-of-range": lambda c: Case(["dus", c.a, "--drop", "2", "--run", c.t / "out"],
                                            ["--drop 2 is out of range"], c.t / "out"),
    "expand-every-not-dividing": lambda c: Case(
        ["expand", c.a, "--every", "3", "--run", c.t / "out"], ["--every 3 must divide"],
        c.t / "out"),
    "dus-no-config-json": lambda c: Case(
        ["dus", write(c.t / "notamodel" / "weights.txt", "x").parent, "--drop", "1", "--run",
         c.t / "out"], ["has no config.json"], c.t / "out"),
    "dus-config-invalid-json": lambda c: Case(
        ["dus", write(c.t / "broken" / "config.json", "{\"num_hidden_layers\": 4,").parent,
         "--drop", "1", "-o", c.t / "out" / "dus.yaml"], ["config.json is not valid JSON"],
        c.t / "out"),
    # solar-merge train: stage configs and data files
    "train-unknown-key": lambda c: train_case(
        c, _sft(c, jsonl(c.t / "qa.jsonl", QA), seqlen=64),
        ["unknown key `seqlen`", "did you mean `seq_len`"]),
    "train-wrong-type": lambda c: train_case(
        c, _sft(c, jsonl(c.t / "qa.jsonl", QA), seq_len="long"), ["seq_len", "integer"]),
    "train-unknown-args-key": lambda c: train_case(
        c, _sft(c, jsonl(c.t / "qa.jsonl", QA)), ["args.lerning_rate",
                                                   "did you mean `learning_rate`"],
        overrides=["args.lerning_rate=1e-4"]),
    "train-stage-typo": lambda c: train_case(
        c, {**_sft(c, jsonl(c.t / "qa.jsonl", QA)), "stage": "sfft"}, ["`stage`", "sft"]),
    "train-missing-data-file": lambda c: train_case(c, _sft(c, c.t / "nothere.jsonl"),
                                                    ["nothere.jsonl not found"]),
    "train-empty-data-file": lambda c: train_case(c, _sft(c, write(c.t / "empty.jsonl", "")),
                                                  ["is empty"]),
    "train-corrupt-jsonl": lambda c: train_case(
        c, _sft(c, write(c.t / "bad.jsonl", json.dumps(QA[0]) + "\n{\"instruction\": \n")),
        ["bad.jsonl, line 2: not valid JSON"]),
    "train-missing-column": lambda c: train_case(
        c, {**_sft(c, ""), "datasets": [{"path": str(jsonl(c.t / "qa.jsonl", [
            {"instruction": "x", "answer": "y"}])), "format": "alpaca"}]},
        ["alpaca record is missing `output`"]),
    "train-no-chat-template": lambda c: train_case(
        c, {**_sft(c, jsonl(c.t / "chat.jsonl", [{"messages": [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}])),
            "model": str(_no_template_model(c))}, ["no chat template"]),
    "train-ref-model-vocab": lambda c: train_case(
        c, {"stage": "dpo", "model": str(c.a), "ref_model": str(_vocab_model(c)),
            "datasets": [str(jsonl(c.t / "p.jsonl", [{"prompt": "a", "chosen": "b",
                                                      "rejected": "c"}]))]},
        ["ref_model", "vocab_size 512"]),
    "train-config-missing": lambda c: Case(["train", c.t / "nothere.yaml", "-o", c.t / "out"],
                                           ["nothere.yaml", "does not exist"], c.t / "out",
                                           guide="--help"),
    # solar-merge run / validate: recipes
    "recipe-cycle": lambda c: recipe_case(c, {"stages": {"x": _merge_stage("y"),
                                                         "y": _merge_stage("x")}},
                                          ["cycle", "x -> y -> x"]),
    "recipe-unknown-stage-reference": lambda c: recipe_case(
        c, {"stages": {"avg": _merge_stage(str(c.a), str(c.b)),
                       "up": {"upscale": {"model": "avgg", "drop": 1}}}},
        ["stages.up.upscale.model", "did you mean `avg`"]),
    "recipe-misspelled-stage-key": lambda c: recipe_case(
        c, {"stages": {"avg": {"merg": _merge_stage(str(c.a))["merge"]}}},
        ["stages.avg.merg: unknown key", "did you mean `merge`"]),
    "recipe-malformed-yaml": lambda c: recipe_case(c, "stages:\n  a: {merge: [\n",
                                                   ["not valid YAML"], command="run"),
    "recipe-file-missing": lambda c: Case(["run", c.t / "nothere.yaml", "--out", c.t / "runs"],
                                          ["nothere.yaml", "not found"], c.t / "runs"),
    "recipe-eval-unknown-key": lambda c: recipe_case(
        c, {"stages": {"avg": _merge_stage(str(c.a), str(c.b)),
                       "ev": {"eval": {"models": ["avg"], "tasks": "solar_arith", "limt": 3}}}},
        ["unknown key `limt`", "did you mean `limit`"], command="run"),
    "recipe-bad-override": lambda c: Case(
        ["run", write(c.t / "recipe.yaml", {"stages": {"avg": _merge_stage(str(c.a))}}),
         "stages.avg", "--out", c.t / "runs"], ["override `stages.avg` is not key=value"],
        c.t / "runs"),
    # solar-merge push
    "push-folder-missing": lambda c: Case(["push", c.t / "nothere", "me/model", "--dry-run"],
                                          ["nothere", "does not exist"], c.t / "nothere",
                                          guide="--help"),
    "push-not-a-model": lambda c: Case(
        ["push", write(c.t / "notes" / "a.txt", "x").parent, "me/model", "--dry-run"],
        ["no config.json", "not a model folder"], c.t / "notes"),
    # the file system
    "read-only-output": _read_only,
    "full-disk": _full_disk,
}


@pytest.fixture(scope="module")
def models(tiny_model_factory):
    return tiny_model_factory(seed=0), tiny_model_factory(seed=1), tiny_model_factory(layers=6)


def _markers(root: Path) -> set[str]:
    return {str(p) for p in Path(root).rglob(MARKER)} if Path(root).exists() else set()


@pytest.mark.parametrize("case_id", list(CASES))
def test_bad_input(case_id, models, tmp_path, tiny_model_factory):
    ctx = Ctx(tmp_path, *models, tiny_model_factory(vocab=512))
    case = CASES[case_id](ctx)
    roots = [tmp_path, *models, *case.roots]
    before = digests(*roots)
    markers_before = set().union(*(_markers(r) for r in roots))
    try:
        code, output = cli(case.argv, case.sub)
    finally:
        for r in case.roots:  # the world-readable folder of the read-only case
            (r / "ro").chmod(0o755)
    after = {k: v for k, v in digests(*roots).items() if k in before}
    for r in case.roots:
        shutil.rmtree(r, ignore_errors=True)

    assert code == 2, output
    for text in case.expect:
        assert text in output, (text, output)
    assert case.guide in output, output
    assert "Traceback" not in output, output
    assert after == before, "an input file was modified"
    out = Path(case.out)
    new_markers = set().union(*(_markers(r) for r in roots)) - markers_before
    assert not is_complete(out) and not new_markers, new_markers


# Every command, given an input (model, config, recipe, data, folder, name) that does not
# exist: the command line that names it. A command added to the CLI fails below until it has
# a line here, or is listed as reading nothing of the user's.
MISSING = {
    "dus": ["dus", "{x}", "--drop", "1", "--run", "{out}"],
    "expand": ["expand", "{x}", "--every", "2", "--run", "{out}"],
    "yaml": ["yaml", "{x}.yaml", "{out}"],
    "multi": ["multi", "{x}.yaml", "--intermediate-dir", "{out}"],
    "run": ["run", "{x}.yaml", "--out", "{out}"],
    "validate": ["validate", "{x}.yaml", "--out", "{out}"],
    "train": ["train", "{x}.yaml", "-o", "{out}"],
    "push": ["push", "{x}", "me/model", "--dry-run"],
    "recipes copy": ["recipes", "copy", "nothere", "{out}"],
    "recipes extract": ["recipes", "extract", "{x}", "-o", "{out}.yaml"],
    "seam": ["seam", "{x}", "--data", "{x}.txt", "-o", "{out}"],
    "plan": ["plan", "{x}"],
    "sweep": ["sweep", "{x}", "{x}2", "--method", "solar_average", "--tasks", "solar_arith",
              "-o", "{out}"],
    "search": ["search", "{x}.yaml", "-o", "{out}"],
    "synth-math": ["synth-math", "{x}.jsonl", "-o", "{out}"],
    "eval": ["eval", "{x}", "--tasks", "solar_arith", "-o", "{out}"],
    "contamination": ["contamination", "--train", "{x}.jsonl", "--tasks", "solar_arith"],
}
READS_NOTHING_OF_THE_USERS = {"demo"}  # builds its own model and data


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name))


@pytest.mark.parametrize("command", sorted(set(_commands(main)) - READS_NOTHING_OF_THE_USERS))
def test_every_command_names_a_missing_input(command, tmp_path):
    assert command in MISSING, f"`solar-merge {command}` has no line in MISSING"
    argv = [a.format(x=tmp_path / "nothere", out=tmp_path / "out") for a in MISSING[command]]
    code, output = cli(argv)
    assert code == 2, output
    assert "nothere" in output and "Traceback" not in output, output
    assert "fix:" in output or "--help" in output, output
    assert not _markers(tmp_path) and not (tmp_path / "out").exists()


def test_debug_flag_shows_the_traceback(models, tmp_path):
    path = write(tmp_path / "merge.yaml", {**avg(*models[:2]), "normalise": False})
    code, output = cli(["yaml", path, tmp_path / "out"])
    assert code == 2 and "Traceback" not in output
    code, output = cli(["--debug", "yaml", path, tmp_path / "out"])
    assert code == 2 and "Traceback" in output and "normalise: unknown key" in output
    assert "check_config" in output  # where the error was raised


# -- tokens ------------------------------------------------------------------------------

def _corpus(path: Path) -> Path:
    from pydoc_data.topics import topics

    return write(path, "\n\n".join([next(iter(topics.values()))[:600]] * 4))


def test_hub_token_never_written_or_shown(models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    a, b, _ = models
    outputs = []
    merge_cfg = write(tmp_path / "merge.yaml", avg(a, b))
    outputs.append(cli(["yaml", merge_cfg, tmp_path / "merged"]))
    _corpus(tmp_path / "corpus.txt")
    stage = write(tmp_path / "cpt.yaml", {"stage": "cpt", "model": str(a),
                                          "datasets": ["corpus.txt"], "seq_len": 32,
                                          "args": {**FAST, "max_steps": 2, "save_steps": 1}})
    outputs.append(cli(["train", stage, "-o", tmp_path / "trained"]))
    recipe = write(tmp_path / "recipe.yaml", {
        "name": "tokens", "stages": {
            "avg": {"merge": avg(a, b)},
            "up": {"upscale": {"model": "avg", "drop": 1}},
            "ev": {"eval": {"models": ["up"], "tasks": "solar_manual_ppl", "limit": 1}}}})
    outputs.append(cli(["run", recipe, "--out", tmp_path / "runs"]))
    for code, output in outputs:
        assert code == 0, output
        assert TOKEN not in output
    assert is_complete(tmp_path / "merged") and is_complete(tmp_path / "trained")
    assert is_complete(tmp_path / "runs" / "up")
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 20
    leaked = [str(p) for p in files if TOKEN.encode() in p.read_bytes()]
    assert leaked == []


# -- remote code -------------------------------------------------------------------------

def _remote_code_model(src: Path, dst: Path, sentinel: Path, model_type: str) -> Path:
    m = copy_model(src, dst)
    code = (f"open({str(sentinel)!r}, 'w').write('imported')\n"
            "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "class EvilConfig(LlamaConfig):\n    model_type = " + repr(model_type) + "\n"
            "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    (m / "evil.py").write_text(code)
    edit_json(m / "config.json", model_type=model_type,
              auto_map={"AutoConfig": "evil.EvilConfig",
                        "AutoModelForCausalLM": "evil.EvilModel"})
    return m


@pytest.mark.parametrize("model_type", ["llama", "evil_arch"])
def test_remote_code_is_never_run(model_type, models, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    a, b, _ = models
    sentinel = tmp_path / "SENTINEL"
    m = _remote_code_model(a, tmp_path / "remote", sentinel, model_type)
    config = write(tmp_path / "merge.yaml", avg(m, b))
    code, output = cli(["yaml", config, tmp_path / "out"])
    if model_type == "llama":  # transformers' own code serves it: the merge just works
        assert code == 0, output
        from solar_merge.stages.models import load_model

        load_model(str(tmp_path / "out"))
    else:  # only the custom code could load it: a clear refusal
        assert code == 2, output
        assert "Traceback" not in output and "fix:" in output
        assert f"{m} needs custom Python code" in output, output
    from solar_merge.checkpoints import model_info
    from solar_merge.errors import UserError
    from solar_merge.eval import evaluate
    from solar_merge.stages.models import load_model, load_tokenizer

    model_info(str(m))
    loaders = [lambda: evaluate([str(m)], "solar_manual_ppl", limit=1, batch_size=1),
               lambda: load_model(str(m))]
    for load in loaders:
        if model_type == "llama":
            load()
        else:
            with pytest.raises(UserError, match="needs custom Python code"):
                load()
    load_tokenizer(str(m))  # the tokenizer itself is a plain one
    assert not sentinel.exists(), "custom code from the model folder was imported"


# -- concurrency -------------------------------------------------------------------------

def test_two_runs_on_one_output_folder(models, tmp_path):
    from safetensors.torch import load_file

    config = write(tmp_path / "merge.yaml", avg(*models[:2]))
    out = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "solar_merge.cli", "yaml", str(config),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stdout.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes in ([0, 0], [0, 2]), results
    for code, output in results:
        assert "Traceback" not in output, output
        if code == 2:
            assert "being written by another solar-merge run" in output and "fix:" in output
    assert is_complete(out) and not partial_dir(out).exists()
    assert load_file(str(out / "model.safetensors"))


# -- real kills of a recipe run ----------------------------------------------------------

def _tiny_recipe(tmp_path: Path, a: Path, b: Path) -> Path:
    _corpus(tmp_path / "corpus.txt")
    return write(tmp_path / "recipe.yaml", {
        "name": "tiny", "final": "cpt", "stages": {
            "avg": {"merge": avg(a, b)},
            "up": {"upscale": {"model": "avg", "drop": 1}},
            "cpt": {"train": {"stage": "cpt", "model": "up", "datasets": ["corpus.txt"],
                              "seq_len": 32,
                              "args": {**FAST, "max_steps": 2, "save_steps": 1}}}}})


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _same(x: dict, y: dict) -> bool:
    import torch

    return x.keys() == y.keys() and all(torch.allclose(x[k], y[k], atol=1e-6, rtol=0)
                                        for k in x)


POINTS = ["work-created", "merged", "after-checkpoint-1"]


def test_killed_recipe_reruns_to_the_uninterrupted_result(models, tmp_path):
    a, b, _ = models
    recipe = _tiny_recipe(tmp_path, a, b)
    # the kills run in parallel, each into its own output root
    procs = {point: subprocess.Popen(
        [sys.executable, "-m", "solar_merge.cli", "run", str(recipe), "--out",
         str(tmp_path / point)], env={**os.environ, "SOLAR_MERGE_KILL_AT": point},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for point in POINTS}
    code, output = cli(["run", recipe, "--out", tmp_path / "straight"])  # meanwhile
    assert code == 0, output
    ref = {s: _tensors(tmp_path / "straight" / s) for s in ("avg", "up", "cpt")}
    for point, proc in procs.items():
        _, err = proc.communicate(timeout=600)
        # each stage runs in its own process: that one is killed, `run` says so and stops
        assert proc.returncode == 2 and "was killed (exit code -9)" in err, (point, err[-3000:])
        root = tmp_path / point
        complete = [s for s in ref if is_complete(root / s)]
        # nothing looks finished unless it is: complete stages hold the final weights
        for s in complete:
            assert _same(_tensors(root / s), ref[s]), (point, s)
        for s in ref:
            assert not is_complete(partial_dir(root / s)), (point, s)
        assert "cpt" not in complete
        if point == "after-checkpoint-1":
            assert complete == ["avg", "up"] and (partial_dir(root / "cpt")
                                                  / "checkpoint-1").is_dir()
        code, output = cli(["run", recipe, "--out", root])  # the re-run
        assert code == 0, output
        for s, weights in ref.items():
            assert is_complete(root / s) and _same(_tensors(root / s), weights), (point, s)
