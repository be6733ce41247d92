"""Issue 15: no config, recipe or model card crashes us, proven by fuzzing.

Random YAML documents (with the schema's own keys mixed in), structural mutations and text
edits of the configs and recipes we ship (merge_configs/, training/; their Hub models and data
swapped for tiny local ones, so that a mutation that stays valid really runs), random bytes,
and damaged model cards, through `yaml`, `train`, `validate`, `run` and `recipes extract`.
Each must keep the properties of fuzzing.check_entry.
"""

import json
import tempfile
from pathlib import Path

import pytest
import yaml
from fuzzing import (
    ALIAS_BOMB,
    PIPELINE_MEMORY_BOUND,
    PROFILE,
    check_entry,
    edit_text,
    examples,
    mutate,
    mutations,
    offline,
    text_edits,
    warm_imports,
    yamlish,
)
from hypothesis import example, given
from hypothesis import strategies as st

from solar_merge.checkpoints import safetensors_headers
from solar_merge.merging import TOP_KEYS
from solar_merge.outputs import MARKER

REPO = Path(__file__).resolve().parent.parent
MERGE_CONFIGS = sorted((REPO / "merge_configs").glob("*.yaml"))
STAGE_CONFIGS = [REPO / "training" / f"{s}.yaml" for s in ("cpt", "sft", "dpo", "stepwise_dpo")]
RECIPES = [p for p in sorted((REPO / "training").glob("*.yaml")) if p not in STAGE_CONFIGS
           and "stages" in (yaml.safe_load(p.read_text()) or {})]
STAGE_KEYS = ["stage", "model", "ref_model", "datasets", "trainable_layers", "steps",
              "keep_steps", "seq_len", "beta", "output", "args", "path", "format",
              "max_samples", "learning_rate", "max_steps"]
RECIPE_KEYS = ["name", "out", "final", "stages", "upscale", "train", "merge", "eval", "model",
               "drop", "method", "every", "file", "models", *sorted(TOP_KEYS)]
FAST = {"logging_steps": 1, "per_device_train_batch_size": 2, "dataloader_num_workers": 0,
        "max_steps": 1, "save_strategy": "no", "seed": 7}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    offline(monkeypatch)


@pytest.fixture(scope="module", autouse=True)
def _warm():
    warm_imports()


@pytest.fixture(scope="module")
def world(tiny_model_factory, tmp_path_factory):
    """Tiny models (4 layers, and the layer counts of the shipped configs' models) and one
    small data file of each kind the shipped configs use."""
    root = tmp_path_factory.mktemp("fuzz-world")
    qa = [{"question": f"What is {i}+{i}?", "response": str(2 * i), "instruction": f"Add {i}",
           "input": "", "output": str(2 * i), "rephrased_question": f"{i}+{i}=?",
           "rephrased_answer": f"{2 * i}", "answer": "?"} for i in range(4)]
    pref = [{"prompt": f"{i}+{i}=", "chosen": str(2 * i), "rejected": str(i)} for i in range(4)]
    files = {"text": root / "corpus.txt", "qa": root / "qa.jsonl", "pref": root / "pref.jsonl"}
    files["text"].write_text("\n\n".join(f"Paragraph {i} of plain text." for i in range(8)))
    files["qa"].write_text("".join(json.dumps(r) + "\n" for r in qa))
    files["pref"].write_text("".join(json.dumps(r) + "\n" for r in pref))
    models = {n: [tiny_model_factory(layers=n, seed=s) for s in (0, 1)] for n in (4, 30, 32)}
    return {"models": models, **files}


# The layer count of the model each shipped file names (Mistral-7B: 32, SmolLM2-135M: 30), so
# that layer ranges, drops and block counts stay as written; others get 4-layer models.
LAYERS = {"dus.yaml": 32, "solar_10.7b.yaml": 32, "smollm2_demo.yaml": 30,
          "upscale_study.yaml": 30}


def _inputs(world) -> list:
    return [*(m for pair in world["models"].values() for m in pair), world["text"],
            world["qa"], world["pref"]]


def tiny(doc, world, stages=(), base=REPO, layers=4, scale=False):
    """A shipped config with its Hub models and data swapped for tiny local ones (stage names
    in `stages` stay: they are references; `file:` paths become absolute) and training cut to
    one step. `scale`: 4-layer models, with DUS drops and layer ranges scaled down to them."""
    if scale:
        layers = 4
    models: dict[str, str] = {}
    pair = world["models"][layers]

    def model(value):
        if not isinstance(value, str) or value in stages:
            return value
        return models.setdefault(value, str(pair[len(models) % 2]))

    def data(entry, fmt):
        kind = ("text" if fmt == "text" else "pref" if fmt in ("preference", "math_alignment")
                else "qa")
        return {**(entry if isinstance(entry, dict) else {}), "path": str(world[kind])}

    def walk(node):
        if isinstance(node, list):
            return [walk(v) for v in node]
        if not isinstance(node, dict):
            return node
        out = {k: walk(v) for k, v in node.items()}
        if isinstance(out.get("file"), str):
            out["file"] = str((base / out["file"]).resolve())
        for key in ("model", "base_model", "ref_model"):
            if key in out:
                out[key] = model(out[key])
        if isinstance(out.get("models"), list) and all(isinstance(m, str) for m in out["models"]):
            out["models"] = [model(m) for m in out["models"]]  # an eval stage's list
        if scale and isinstance(out.get("drop"), int):
            out["drop"] = 1
        if scale and isinstance(out.get("layer_range"), list) and len(out["layer_range"]) == 2:
            out["layer_range"] = [v * 4 // 32 if isinstance(v, int) else v
                                  for v in out["layer_range"]]
        if "stage" in out and isinstance(out.get("datasets"), list):
            fmt = {"cpt": "text", "dpo": "preference", "stepwise_dpo": "preference"}.get(
                out["stage"], "openorca")
            out["datasets"] = [data(d, d.get("format", fmt) if isinstance(d, dict) else fmt)
                               for d in out["datasets"]]
            out["seq_len"] = 32
            out["args"] = {**{k: v for k, v in (out.get("args") or {}).items()
                              if k in ("learning_rate", "seed", "lr_scheduler_type")}, **FAST}
        for metric, key in (("perplexity", "text"), ("math_exact_match", "problems"),
                            ("answer_loss", "qa")):
            if isinstance(out.get(metric), dict):
                out[metric][key] = str(world["text" if key == "text" else "qa"])
        return out

    return walk(doc)


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _dump(value) -> str:
    try:
        return yaml.safe_dump(value, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:  # e.g. a float key yaml cannot write back: keep its repr
        return repr(value)


# -- merge configs through `yaml` -----------------------------------------------------------------

def _merge_variants(world):
    return [tiny(_load(p), world, layers=LAYERS.get(p.name, 4)) for p in MERGE_CONFIGS]


DOCUMENT = st.one_of(
    st.tuples(st.just("mutate"), st.integers(0, 100), mutations(RECIPE_KEYS)),
    st.tuples(st.just("edit text"), st.integers(0, 100), text_edits()),
    st.tuples(st.just("random"), yamlish(RECIPE_KEYS + STAGE_KEYS)),
    st.tuples(st.just("bytes"), st.binary(max_size=512)),
)
# Pinned inputs every reader must refuse quickly (with fuzzing.ALIAS_BOMB): nesting too deep
# for a recursive parser.
DEEP = "[" * 5000 + "]" * 5000


def build(document, variants) -> bytes:
    kind, *args = document
    if kind == "mutate":
        return _dump(mutate(variants[args[0] % len(variants)], args[1])).encode()
    if kind == "edit text":
        return edit_text(_dump(variants[args[0] % len(variants)]), args[1]).encode()
    if kind == "random":
        return _dump(args[0]).encode()
    if kind == "text":
        return args[0].encode()
    return args[0]


def _pin(**more):
    def pin(test):
        for text in (ALIAS_BOMB, DEEP, "!!python/object/apply:os.system [echo hi]", "- 1\n- 2",
                     "merge_method: [1, 2]\nmodels: {a: 1}", "\xff\xfe",
                     # structures a reader must not trip over (AttributeError, TypeError)
                     "merge_method: linear\nmodules: true\n",
                     "merge_method: passthrough\nslices: [{sources: true}]\n",
                     "merge_method: linear\nmodels: [{model: {model: x}}]\n"):
            test = example(document=("text", text), **more)(test)
        return example(document=("bytes", b"\xff\xfe\x00"), **more)(test)
    return pin


@examples(ci=40, long=1000)
@given(document=DOCUMENT)
@_pin()
def test_merge_configs(world, document):
    with tempfile.TemporaryDirectory() as t:
        config = Path(t) / "merge.yaml"
        config.write_bytes(build(document, _merge_variants(world)))
        check_entry("yaml", ["yaml", config, Path(t) / "out"],
                    inputs=[config, *_inputs(world)], outputs=[Path(t) / "out"])


# -- stage configs through `train` ----------------------------------------------------------------

@examples(ci=4, long=150)
@given(document=DOCUMENT)
@_pin()
@example(document=("edit text", 0, [(0, 0, "# a comment\n")]))  # valid: one step of cpt
def test_stage_configs(world, document):
    """Mutations that stay valid train for one step on a tiny model (~1-3 s), hence few
    examples in the ci profile."""
    variants = [tiny(_load(p), world) for p in STAGE_CONFIGS]
    with tempfile.TemporaryDirectory() as t:
        config = Path(t) / "stage.yaml"
        config.write_bytes(build(document, variants))
        check_entry("train", ["train", config, "-o", Path(t) / "out"],
                    inputs=[config, *_inputs(world)],
                    outputs=[Path(t) / "out"], keeps_partial=True)


# -- recipes through `validate` and `run` ---------------------------------------------------------

def _stages(path: Path) -> set:
    return set((_load(path) or {}).get("stages") or {})


def _recipe_variants(world, *, merges_only: bool):
    """The shipped recipes made tiny; `merges_only` keeps their first three upscale and merge
    stages on 4-layer models (a run of them takes a second; training stages are fuzzed
    through `train`)."""
    out = []
    for path in RECIPES:
        doc = _load(path)
        stages = doc["stages"]
        if merges_only:
            stages = dict([(k, v) for k, v in stages.items() if isinstance(v, dict)
                           and ("upscale" in v or "merge" in v)][:3])
            doc = {**doc, "stages": stages, "final": None}
        merged = {**doc, "stages": tiny(stages, world, set(stages), path.parent,
                                        LAYERS.get(path.name, 4), scale=merges_only)}
        merged.pop("out", None)
        out.append({k: v for k, v in merged.items() if v is not None})
    return out


def _check_run_outputs(root: Path):
    """After `run`, every folder that looks complete is: weights whose headers read."""
    for marker in root.rglob(MARKER):
        folder = marker.parent
        if any(folder.glob("*.safetensors")):
            assert safetensors_headers(folder), folder


@examples(ci=30, long=1000)
@given(document=DOCUMENT, command=st.sampled_from(["validate", "run"]))
@_pin(command="run")
def test_recipes(world, document, command):
    variants = (_recipe_variants(world, merges_only=False) if command == "validate"
                else _recipe_variants(world, merges_only=True))
    with tempfile.TemporaryDirectory() as t:
        recipe = Path(t) / "recipe.yaml"
        recipe.write_bytes(build(document, variants))
        check_entry(command, [command, recipe, "--out", Path(t) / "runs"],
                    inputs=[recipe, *_inputs(world)])
        _check_run_outputs(Path(t) / "runs")


@pytest.mark.skipif(PROFILE == "ci", reason="a valid tiny pipeline trains 6 stages (~15 s)")
@examples(ci=1, long=20)
@given(edits=mutations(RECIPE_KEYS))
def test_whole_recipes_run(world, edits):
    """Mutations of the full shipped recipes (training stages included), through `run`."""
    variants = _recipe_variants(world, merges_only=False)
    with tempfile.TemporaryDirectory() as t:
        recipe = Path(t) / "recipe.yaml"
        recipe.write_text(_dump(mutate(variants[edits[0][0] % len(variants)], edits)))
        check_entry("run (whole recipe)", ["run", recipe, "--out", Path(t) / "runs"],
                    inputs=[recipe, *_inputs(world)], memory_bound=PIPELINE_MEMORY_BOUND)
        _check_run_outputs(Path(t) / "runs")


def test_shipped_configs_are_valid_once_tiny(world, tmp_path):
    """The un-mutated variants pass (the fuzz bases are real, not broken from the start)."""
    for i, config in enumerate(_merge_variants(world)):
        path = tmp_path / f"m{i}.yaml"
        path.write_text(_dump(config))
        code, output = check_entry("yaml", ["yaml", path, tmp_path / f"out{i}"],
                                   inputs=[path], outputs=[tmp_path / f"out{i}"])
        assert code == 0, output
    for i, recipe in enumerate(_recipe_variants(world, merges_only=False)):
        path = tmp_path / f"r{i}.yaml"
        path.write_text(_dump(recipe))
        code, output = check_entry("validate", ["validate", path, "--out", tmp_path / "runs"],
                                   inputs=[path])
        assert code == 0, output


# -- model cards and recipe files through `recipes extract` ---------------------------------------

@pytest.fixture(scope="module")
def card_folder(world, tmp_path_factory):
    """An output folder as solar-merge writes it: weights, card with its `## Recipe` block."""
    from solar_merge.merging import merge

    out = tmp_path_factory.mktemp("card") / "merged"
    config = {"merge_method": "solar_average", "dtype": "float32",
              "models": [{"model": str(m), "parameters": {"weight": 0.5}}
                         for m in world["models"][4]]}
    merge(config, out)
    assert "## Recipe" in (out / "README.md").read_text()
    return out


CARD = st.one_of(
    st.tuples(st.just("edit"), text_edits()),
    st.tuples(st.just("random text"), st.text(max_size=2000)),
    st.tuples(st.just("bytes"), st.binary(max_size=2000)),
)
SLOW_CARD = "## Recipe\n```yaml\nx\n" * 1000  # unclosed fences: quadratic for a naive regex


@examples(ci=40, long=1000)
@given(card=CARD, recipe_file=st.booleans(), target=st.sampled_from(["folder", "card"]))
@example(card=("random text", SLOW_CARD), recipe_file=False, target="folder")
@example(card=("bytes", b"\xff" * 10), recipe_file=False, target="card")
@example(card=("bytes", b"\xff" * 10), recipe_file=True, target="folder")
def test_recipe_extract(card_folder, card, recipe_file, target):
    import shutil

    readme = (card_folder / "README.md").read_text()
    kind, value = card
    blob = (edit_text(readme, value).encode() if kind == "edit" else
            value.encode() if kind == "random text" else value)
    with tempfile.TemporaryDirectory() as t:
        folder = Path(t) / "model"
        shutil.copytree(card_folder, folder, ignore=shutil.ignore_patterns("*.safetensors"))
        (folder / "README.md").write_bytes(blob)
        if not recipe_file:
            (folder / "mergekit_config.yml").unlink()
        else:
            (folder / "mergekit_config.yml").write_bytes(blob)
        source = folder if target == "folder" else folder / "README.md"
        out = Path(t) / "new" / "recipe.yaml"
        code, _ = check_entry("recipes extract", ["recipes", "extract", source, "-o", out],
                                   inputs=[folder], outputs=[out])
        if code == 0:
            assert out.is_file()


# -- the lm-eval task YAMLs we ship, through `eval --include-path` -----------------------------------

TASKS_DIR = REPO / "solar_merge" / "tasks"
OUR_TASKS = sorted(p.stem for p in TASKS_DIR.glob("solar_*.yaml"))


def _task_copy(root: Path) -> Path:
    """Our task folder copied (YAMLs, their loader module, data) with the tasks renamed
    fz_* and untagged, so that a user's include path holding them does not clash with ours."""
    import re
    import shutil

    out = root / "tasks"
    shutil.copytree(TASKS_DIR, out, ignore=shutil.ignore_patterns("__pycache__", "h6.yaml",
                                                                  "catalog.py", "__init__.py"))
    for f in out.glob("*.yaml"):
        text = re.sub(r"^task: solar_", "task: fz_", f.read_text(), flags=re.MULTILINE)
        f.write_text(re.sub(r"^tag: .*\n", "", text, flags=re.MULTILINE))
    return out


TASK_DAMAGE = st.one_of(
    st.tuples(st.just("yaml"), st.sampled_from(OUR_TASKS), text_edits()),
    st.tuples(st.just("yaml bytes"), st.sampled_from(OUR_TASKS), st.binary(max_size=256)),
    st.tuples(st.just("data"), st.sampled_from(["arith.jsonl", "manual_qa.jsonl",
                                                "manual_ppl.jsonl"]), text_edits()),
)


@examples(ci=0, long=100)
@given(damage=TASK_DAMAGE)
@example(damage=("data", "arith.jsonl", [(0, 10**6, "{oops")]))
def test_task_yamls(world, damage):
    """A mutated copy of one of our lm-eval tasks (its YAML or its data) evaluated with
    `solar-merge eval --limit 1` on a tiny model: exit 0 or 2, never a traceback. A task
    lm-eval cannot index costs its full index (~12 s): the ci profile runs the example only."""
    kind, name, value = damage
    with tempfile.TemporaryDirectory() as t:
        tasks = _task_copy(Path(t))
        target = tasks / (f"{name}.yaml" if kind != "data" else f"data/{name}")
        text = target.read_text()
        target.write_bytes(value if kind == "yaml bytes" else edit_text(text, value).encode())
        task = "fz_" + (name.removeprefix("solar_") if kind != "data" else
                        {"arith.jsonl": "arith", "manual_qa.jsonl": "manual_qa",
                         "manual_ppl.jsonl": "manual_ppl"}[name])
        model = world["models"][4][0]
        check_entry("eval (task YAMLs)", ["eval", model, "--tasks", task, "--include-path",
                                          tasks, "--limit", "1", "--output", Path(t) / "out"],
                    inputs=[tasks, model], outputs=[Path(t) / "out"],
                    memory_bound=PIPELINE_MEMORY_BOUND)


@pytest.mark.skipif(PROFILE == "ci", reason="tests/test_eval.py runs our tasks; ~14 s")
def test_shipped_task_yamls_are_valid(world, tmp_path):
    """The un-mutated copies evaluate (the fuzz base is real)."""
    tasks = _task_copy(tmp_path)
    code, output = check_entry("eval (task YAMLs)", [
        "eval", world["models"][4][0], "--tasks", ",".join("fz_" + n.removeprefix("solar_")
                                                             for n in OUR_TASKS),
        "--include-path", tasks, "--limit", "1", "--output", tmp_path / "out"],
        inputs=[tasks], outputs=[tmp_path / "out"], memory_bound=PIPELINE_MEMORY_BOUND)
    assert code == 0, output


# -- failures the long profile found, pinned ---------------------------------------------------------

@pytest.mark.parametrize("case", ["list-model-in-slice", "null-batch-size", "text-batch-size"])
def test_long_profile_regressions(world, tmp_path, case):
    """A clear error (exit 2), never a traceback: a slice source whose model is a list (not
    hashable, where the slices are checked); a train stage whose
    args.per_device_train_batch_size is null or text (the memory estimate of `validate`/`run`
    needs a number)."""
    a = str(world["models"][4][0])
    if case == "list-model-in-slice":
        path = tmp_path / "merge.yaml"
        path.write_text(_dump({"merge_method": "passthrough", "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}]},
            {"sources": [{"model": [], "layer_range": [1, 3]}]}]}))
        argv, expect = ["yaml", path, tmp_path / "out"], 2
    else:
        batch = None if case == "null-batch-size" else "eight"
        path = tmp_path / "recipe.yaml"
        path.write_text(_dump({"stages": {"t": {"train": {
            "stage": "sft", "model": a, "datasets": [str(world["qa"])],
            "args": {"per_device_train_batch_size": batch}}}}}))
        argv, expect = ["validate", path, "--out", tmp_path / "runs"], 0
    code, output = check_entry(case, argv, inputs=[path, *_inputs(world)],
                               outputs=[tmp_path / "out"])
    assert code == expect, output
