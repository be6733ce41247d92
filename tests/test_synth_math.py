"""solar-merge synth-math: MetaMath-style rephrasing, its checks, outputs, resume, bad input.

A tiny random model cannot rephrase, so the logic tests script the generator (the only thing
faked: `Generator.generate`, the generation boundary); one test runs transformers' real
batched generation on a tiny random model, and one runs the embedded SmolLM2 on 3 problems
(marked smollm2 and slow).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from synth_fakes import GSM8K, Fake, good

from solar_merge import synth_math as sm
from solar_merge.cli import main
from solar_merge.outputs import MARKER, atomic_output, partial_dir


def write_seed(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def run(tmp_path, script, records=GSM8K, **options):
    seed = write_seed(tmp_path / "seed.jsonl", records)
    fake = Fake(script)
    result = sm.synth_math(seed, tmp_path / "out", sm.Options(**options), generator=fake,
                           progress=False)
    return result, fake


def lines(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


# -- the checks ----------------------------------------------------------------------------

def test_checks_keep_and_drop_the_right_pairs(tmp_path):
    tom, shop, mia = (r["question"] for r in GSM8K)
    script = {
        tom: [good(GSM8K[0]),                                     # kept
              ("Tom owns 12 red pens, then buys 5 blue ones. How many pens now?",
               "12 + 5 = 17, so the answer is 18."),              # final: 18 != 17
              good(GSM8K[0]),                                     # duplicate of sample 0
              ("Tom has twelve red pens and 5 blue. How many pens?", ""),   # empty
              ("Tom has 12 red pens and 5 blue pens. How many pens in all?",
               "Tom has 12 + 5 = 17 pens.\n#### 17")],          # unchanged: the seed's answer

        shop: [("A shop sells cakes for 4 days. How many cakes in total?",
                "The answer is 120."),                            # numbers: 30 lost
               ("A shop sells 30 cakes a day for 4 days, 120 in all. How many?",
                "The answer is 120."),                            # numbers: 120 added
               ("A shop sells 30 cakes daily over 4 days.", "The answer is 120."),  # no `?`
               (shop, "Each day 30, so 30 * 4 = 120.\nThe answer is 120.")],  # unchanged
        mia: [(None, "The answer is 750."),                       # runaway: cut
              ("Mia has 1200 dollars and spends 450. What remains?",
               "She keeps 1200 - 450 = 750 dollars.\n#### 750"),  # kept (1,200 == 1200)
              ("Mia starts with 1,200 dollars, spends 450. How much is left?",
               "left left left left left left " * 3 + "750"),     # runaway: repeats
              ("Mia had one thousand two hundred... no: 1,200 dollars, spent 450. Left?",
               "The answer is $750.")],                           # kept
    }
    script[shop].append(good(GSM8K[1]))                           # kept
    script[mia].append(script[mia][3])                            # duplicate of the 4th
    result, _ = run(tmp_path, script, samples_per_problem=5, temperature=0.7)
    assert (result.problems, result.attempts, result.kept) == (3, 15, 4)
    assert result.dropped == {"empty": 1, "runaway": 2, "unchanged": 2, "numbers": 2,
                              "no_question": 1, "final": 1, "duplicate": 2}
    attempts = lines(result.out / sm.ATTEMPTS)
    verdicts = {(a["index"], a["sample"]): a["reason"] for a in attempts}
    assert verdicts[(0, 0)] is None and verdicts[(0, 1)] == "final"
    assert verdicts[(0, 2)] == "duplicate" and verdicts[(2, 0)] == "runaway"
    assert verdicts[(1, 0)] == verdicts[(1, 1)] == "numbers"
    assert verdicts[(0, 4)] == verdicts[(1, 3)] == "unchanged" and verdicts[(2, 4)] == "duplicate"
    instruct = lines(result.out / sm.INSTRUCT)
    alignment = lines(result.out / sm.ALIGNMENT)
    assert [r["prompt"] for r in instruct] == [r["prompt"] for r in alignment]
    assert instruct[0] == {"prompt": script[tom][0][0],
                           "completion": script[tom][0][1] + "\n#### 17"}  # GSM8K's ending
    assert alignment[2]["chosen"].endswith("#### 750")  # the model's own #### line is kept
    assert alignment[2]["chosen"].count("####") == 1
    assert alignment[2]["rejected"] == GSM8K[2]["answer"]  # the original answer
    report = json.loads((result.out / sm.REPORT).read_text())
    assert report["kept_fraction"] == 0.2667 and report["dropped"]["runaway"] == 2
    assert "kept 4 of 15" in result.summary() and "runaway 2" in result.summary()


@pytest.mark.parametrize("text, number", [
    ("The answer is 17.", 17), ("so 30 - 18 = 12 muffins", 12), ("#### 1,234", 1234),
    ("The answer is: \\frac{1}{2}", sm.Fraction(1, 2)), ("The answer is $5.50", 5.5),
    ("Tom ends with 17 pens. The answer is that he has 17.", 17), ("x is -3", -3),
    ("no number here", None)])
def test_final_answer(text, number):
    assert sm.final_answer(text) == (None if number is None else sm.Fraction(str(number)))


def test_seed_formats_gsm8k_metamath_ours(tmp_path):
    records = [GSM8K[0],
               {"query": "What is 3 + 4?", "response": "3 + 4 = 7. The answer is: 7",
                "type": "GSM_Rephrased"},
               {"query": "Simplify 2/4.", "response": "The answer is: \\frac{1}{2}"},
               {"query": "Find x.", "response": "The answer is: 2\\sqrt{3}"},  # not a number
               {"question": "Ana has 3 apples and gets 4 more. How many?", "answer": "#### 7",
                "rephrased_question": "...", "final": 7}]
    problems, skipped = sm.read_seed(write_seed(tmp_path / "s.jsonl", records))
    assert [(p.index, p.final) for p in problems] == [
        (0, 17), (1, 7), (2, sm.Fraction(1, 2)), (4, 7)]
    assert skipped == {"seed answer is not a number": 1}
    assert sm.read_seed(tmp_path / "s.jsonl", limit=2)[0][-1].index == 1


# -- outputs -------------------------------------------------------------------------------

def test_outputs_load_in_the_sft_and_dpo_stages_and_card(tmp_path):
    from huggingface_hub import DatasetCard

    from solar_merge.data import detect_format, to_preference, to_prompt_completion
    from solar_merge.stages.records import load_stage_records

    result, _ = run(tmp_path, {r["question"]: [good(r)] for r in GSM8K})
    assert result.kept == 3 and is_finished(result.out)
    sft = load_stage_records({"datasets": [{"path": str(result.out / sm.INSTRUCT),
                                            "format": "auto"}]}, to_prompt_completion)
    dpo = load_stage_records({"datasets": [{"path": str(result.out / sm.ALIGNMENT),
                                            "format": "auto"}]}, to_preference)
    assert detect_format(lines(result.out / sm.INSTRUCT)[0]) == "prompt_completion"
    assert detect_format(lines(result.out / sm.ALIGNMENT)[0]) == "preference"
    assert sft[2]["completion"].endswith("#### 750") and len(dpo) == 3
    assert dpo[0]["rejected"] == GSM8K[0]["answer"]
    card = DatasetCard.load(result.out / "README.md")
    assert {c["config_name"] for c in card.data.configs} == {"math_instruct", "math_alignment"}
    assert "synthetic" in card.data.tags and str(tmp_path) not in card.content
    # a finished run is skipped: nothing is generated again
    again, fake = run(tmp_path, {})
    assert again.skipped and again.kept == 3 and fake.asked == []


def is_finished(out: Path) -> bool:
    return (out / MARKER).is_file() and not partial_dir(out).exists()


# -- resume ----------------------------------------------------------------------------------

_CHILD = """
import sys
sys.path.insert(0, {tests!r})
from synth_fakes import Fake, good, GSM8K
from solar_merge import synth_math as sm
records = GSM8K * 3
sm.synth_math({seed!r}, {out!r}, sm.Options(batch_size=2), progress=False,
              generator=Fake({{r["question"]: [good(r)] for r in records}}))
"""


@pytest.mark.parametrize("kill_at", ["synth-after-batch", "synth-before-progress"])
def test_resume_after_a_kill_gives_the_uninterrupted_result(tmp_path, kill_at):
    records = GSM8K * 3  # 9 problems, batches of 2
    seed = write_seed(tmp_path / "seed.jsonl", records)
    script = {r["question"]: [good(r)] for r in records}
    whole = sm.synth_math(seed, tmp_path / "whole", sm.Options(batch_size=2), progress=False,
                          generator=Fake(script))
    out = tmp_path / "out"
    child = _CHILD.format(tests=str(Path(__file__).parent), seed=str(seed), out=str(out))
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                          env={**os.environ, "SOLAR_MERGE_KILL_AT": kill_at}, timeout=120,
                          check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()  # killed: nothing complete-looking
    work = partial_dir(out)
    written = lines(work / sm.ATTEMPTS)
    assert len(written) == 2  # the first batch reached the disk
    fake = Fake(script)
    resumed = sm.synth_math(seed, out, sm.Options(batch_size=2), progress=False, generator=fake)
    redone = 0 if kill_at == "synth-after-batch" else 2  # no progress record: batch 1 again
    assert len(fake.asked) == 2 * (9 - 2 + redone)  # a question and an answer per problem
    assert is_finished(out)
    for name in (sm.ATTEMPTS, sm.INSTRUCT, sm.ALIGNMENT):
        assert (out / name).read_text() == (whole.out / name).read_text()
    assert resumed.attempts == 9 and not (out / sm.PROGRESS).exists()


def test_interrupted_run_keeps_its_work_and_changed_options_start_over(tmp_path):
    records = GSM8K * 2
    seed = write_seed(tmp_path / "seed.jsonl", records)
    script = {r["question"]: [good(r)] for r in records}
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C after the first batch of 2
        sm.synth_math(seed, tmp_path / "out", sm.Options(batch_size=2), progress=False,
                      generator=Fake(script, fail_after=4))
    assert not (tmp_path / "out").exists()
    assert len(lines(partial_dir(tmp_path / "out") / sm.ATTEMPTS)) == 2
    fake = Fake(script)  # other options: the partial work is not theirs
    sm.synth_math(seed, tmp_path / "out", sm.Options(batch_size=3), progress=False,
                  generator=fake)
    assert len(fake.asked) == 2 * 6


# -- bad input: exit 2, one message, nothing written -----------------------------------------

def no_template_model(tmp_path, tiny_model) -> Path:
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model


@pytest.mark.parametrize("case", ["no final answer", "empty file", "no chat template",
                                  "limit 0", "not math"])
def test_bad_input_exit_2_one_message_nothing_written(tmp_path, tiny_model, case):
    seed = write_seed(tmp_path / "seed.jsonl", GSM8K)
    args = ["synth-math", str(seed), "-o", str(tmp_path / "out"), "--model", str(tiny_model)]
    expect = {"no final answer": "has no final answer", "empty file": "is empty",
              "no chat template": "no chat template", "limit 0": "limit is 0",
              "not math": "not a math problem"}[case]
    if case == "no final answer":
        write_seed(seed, [{"question": "How many?", "answer": "Seven, I think."}])
    elif case == "empty file":
        seed.write_text("")
    elif case == "no chat template":
        args[-1] = str(no_template_model(tmp_path, tiny_model))
    elif case == "limit 0":
        args += ["--limit", "0"]
    else:
        write_seed(seed, [{"text": "a paragraph"}])
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert expect in result.output and result.output.count("Error") == 1
    assert "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


# -- real generation -------------------------------------------------------------------------

def test_transformers_generation_on_a_tiny_model(tmp_path, tiny_model):
    """The real batched path (left padding, sampling with a seed): a random model writes
    nonsense, which the checks drop; the same seed gives the same text."""
    gen = sm.TransformersGenerator(str(tiny_model), threads=1)
    conversations = [[{"role": "user", "content": r["question"]}] for r in GSM8K]
    a, b = (gen.generate(conversations, max_new_tokens=6, n=2, temperature=1.0, seed=3)
            for _ in range(2))
    assert [[g.text for g in row] for row in a] == [[g.text for g in row] for row in b]
    assert all(len(row) == 2 and 1 <= g.tokens <= 6 for row in a for g in row)
    result = sm.synth_math(write_seed(tmp_path / "s.jsonl", GSM8K[:1]), tmp_path / "out",
                           sm.Options(model=str(tiny_model), max_new_tokens=6, threads=1),
                           progress=False)
    assert result.attempts == 1 and result.kept == 0 and result.new_tokens > 0
    assert lines(result.out / sm.INSTRUCT) == []


@pytest.mark.smollm2
@pytest.mark.slow
def test_embedded_smollm2_on_three_problems(tmp_path):
    """One real run of the default model (greedy) on 3 seed problems, through the CLI."""
    seed = write_seed(tmp_path / "seed.jsonl", GSM8K)
    result = CliRunner().invoke(main, ["synth-math", str(seed), "-o", str(tmp_path / "out"),
                                       "--max-new-tokens", "48", "--threads", "1"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / sm.REPORT).read_text())
    assert report["problems"] == 3 and report["attempts"] == 3
    assert report["kept"] + sum(report["dropped"].values()) == 3
    assert report["new_tokens"] > 0 and report["tokens_per_second"] > 0
    assert len(lines(tmp_path / "out" / sm.INSTRUCT)) == report["kept"]
    assert "problems/min" in result.output


# -- the recipe stage and push -----------------------------------------------------------------

def synth_recipe(tmp_path, tiny_model, **extra) -> dict:
    write_seed(tmp_path / "seed.jsonl", GSM8K)
    train = {"model": str(tiny_model), "seq_len": 64, "args": {"max_steps": 1}}
    return {"name": "synth", "out": "runs", "stages": {
        "synth": {"synth_math": {"data": "seed.jsonl", "model": str(tiny_model), **extra}},
        "sft": {"train": {"stage": "sft", **train,
                          "datasets": [{"path": "synth/math_instruct.jsonl"}]}},
        "dpo": {"train": {"stage": "dpo", **train, "model": "sft",
                          "datasets": ["synth/math_alignment.jsonl"]}}}}


def test_recipe_stage_feeds_train_stages(tmp_path, tiny_model, monkeypatch):
    from solar_merge import recipe
    from solar_merge.data import to_preference, to_prompt_completion
    from solar_merge.stages.records import load_stage_records

    data = synth_recipe(tmp_path, tiny_model)
    p = recipe.plan(data, base_dir=tmp_path)
    assert p.order == ["synth", "sft", "dpo"] and p.stages["sft"].deps == ["synth"]
    assert p.stages["sft"].config["datasets"][0]["path"] == str(
        tmp_path / "runs" / "synth" / sm.INSTRUCT)
    assert p.stages["synth"].config["data"] == str(tmp_path / "seed.jsonl")
    row = next(x for x in recipe.format_plan(p).splitlines() if " synth " in x)
    assert "synth_math" in row and "unknown" not in row.split("synth_math")[1][:40]
    assert p.final == "dpo"
    # the seed's contents are part of the stage's hash (and so of everything downstream)
    write_seed(tmp_path / "seed.jsonl", GSM8K[:2])
    assert recipe.plan(data, base_dir=tmp_path).stages["dpo"].hash != p.stages["dpo"].hash
    write_seed(tmp_path / "seed.jsonl", GSM8K)

    fake = Fake({r["question"]: [good(r)] for r in GSM8K})
    monkeypatch.setattr(sm, "load_generator", lambda *args: fake)
    loaded = {}

    def train(st):  # the sft/dpo stages' own loaders read the synth stage's files
        convert = to_prompt_completion if st.config["stage"] == "sft" else to_preference
        loaded[st.name] = load_stage_records(st.config, convert)
        with atomic_output(st.out_dir, st.hash) as work:
            (work / "config.json").write_text("{}")

    result = recipe.run(data, base_dir=tmp_path, runners={"train": train}, progress=False,
                        card=False)
    assert result.ran == ["synth", "sft", "dpo"] and len(fake.asked) == 6
    assert len(loaded["sft"]) == len(loaded["dpo"]) == 3
    assert loaded["dpo"][0]["rejected"] == GSM8K[0]["answer"]
    again = recipe.run(data, base_dir=tmp_path, runners={"train": train}, progress=False,
                       card=False)
    assert again.skipped == ["synth", "sft", "dpo"] and len(fake.asked) == 6


@pytest.mark.parametrize("change, message", [
    ({"sft.model": "synth"}, "is a synth_math stage (data, not a model)"),
    ({"sft.datasets": [{"path": "synth/attempts.jsonl"}]}, "name a file of the synth_math"),
    ({"sft.datasets": ["sft/math_instruct.jsonl"]}, "`sft` is a train stage"),
    ({"synth.data": "missing.jsonl"}, "missing.jsonl not found"),
    ({"synth.samples_per_problem": 2}, "greedy decoding"),
    ({"synth.sample_per_problem": 2}, "did you mean `samples_per_problem`"),
])
def test_recipe_stage_mistakes(tmp_path, tiny_model, change, message):
    from solar_merge import recipe
    from solar_merge.errors import UserError

    data = synth_recipe(tmp_path, tiny_model)
    for key, value in change.items():
        stage, field = key.split(".")
        kind = next(iter(data["stages"][stage]))
        data["stages"][stage][kind][field] = value
    with pytest.raises(UserError) as e:
        recipe.plan(data, base_dir=tmp_path)
    assert message in str(e.value.message)


def test_push_dry_run_takes_a_dataset_folder(tmp_path):
    from solar_merge import hub

    result, _ = run(tmp_path, {r["question"]: [good(r)] for r in GSM8K})
    assert hub.repo_type(result.out) == "dataset"
    files = dict(hub.push(result.out, "me/synth-math", dry_run=True))
    assert {sm.INSTRUCT, sm.ALIGNMENT, "README.md"} <= set(files)
    assert not any(name.startswith(".") for name in files)
    out = CliRunner().invoke(main, ["push", str(result.out), "me/synth-math", "--dry-run"])
    assert out.exit_code == 0 and "huggingface.co/datasets/me/synth-math" in out.output
