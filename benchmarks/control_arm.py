"""The paper's control, over longer budgets: DUS + continued pretraining against the base model
+ the same continued pretraining. Never run by the tests.

    python benchmarks/control_arm.py [--steps 60] [--eval-every 10] [--lr 1e-4]

On the embedded SmolLM2-135M-Instruct: `dus` (30 -> 44 layers, m = 8) and the base model are
each trained with the same CPT data (Python's reference manual minus the held-out topics, the
demo's corpus at full size), the same steps, batch, sequence length and learning rate; TRL
evaluates both on the held-out topics (the documents of the `solar_manual_ppl` task) every
--eval-every steps and at step 0. The learning rate is constant after a 2-step warm-up, so the
curve up to step k is what a k-step budget gives: one run answers every budget up to --steps.
Writes benchmarks/control_arm.md, .json and .png (curves, crossover, command, date, load).
"""

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def recipe(args) -> dict:
    train_args = {"learning_rate": args.lr, "lr_scheduler_type": "constant_with_warmup",
                  "warmup_steps": 2, "per_device_train_batch_size": 4,
                  "max_steps": args.steps, "logging_steps": args.eval_every,
                  "save_steps": args.eval_every * 4, "seed": 42,
                  "gradient_checkpointing": False, "eval_strategy": "steps",
                  "eval_steps": args.eval_every, "eval_on_start": True,
                  "per_device_eval_batch_size": 8}

    def arm(model):
        return {"train": {"stage": "cpt", "model": model,
                          "datasets": [{"path": "data/cpt_train.txt", "format": "text"}],
                          "eval_datasets": [{"path": "heldout.jsonl", "format": "text",
                                             "max_samples": args.eval_chunks}],
                          "seq_len": 128, "args": dict(train_args)}}

    return {"name": "control-arm-study", "out": ".", "final": "cpt",
            "stages": {"dus": {"upscale": {"model": "smollm2-135m-instruct", "method": "dus",
                                           "drop": 8}},
                       "cpt": arm("dus"), "base_cpt": arm("smollm2-135m-instruct")}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--eval-chunks", type=int, default=8,
                   help="held-out chunks (~1,200 characters each) TRL evaluates on")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--cpt-chars", type=int, default=400_000,
                   help="size of the CPT corpus (the demo uses 80,000)")
    p.add_argument("--out", default=str(HERE / "scratch" / "control_arm"))
    p.add_argument("--report", default=str(HERE / "control_arm"),
                   help="report path without suffix (.md, .json, .png)")
    args = p.parse_args()

    from solar_merge import curves, embedded
    from solar_merge import recipe as recipes
    from solar_merge.demo import data
    from solar_merge.tasks import loaders

    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    model = embedded.embedded_model()
    link = out / embedded.EMBEDDED_NAME
    if not link.exists():
        link.symlink_to(model, target_is_directory=True)
    data.SIZES = {**data.SIZES, False: {**data.SIZES[False], "cpt_chars": args.cpt_chars}}
    paths = data.demo_data(out / "data")
    # one record per held-out chunk (max_samples counts chunks), as solar_manual_ppl has them
    (out / "heldout.jsonl").write_bytes((loaders.DATA_DIR / "manual_ppl.jsonl").read_bytes())
    spec = recipe(args)
    recipe_file = out / "recipe.yaml"
    recipe_file.write_text("# python benchmarks/control_arm.py (writes and runs this recipe)\n"
                           + yaml.safe_dump(spec, sort_keys=False))

    started, load_before = time.time(), load()
    result = recipes.run(str(recipe_file))
    wall = time.time() - started
    load_after = load()

    report = Path(args.report)
    what = (f"Both arms: the same CPT corpus (reference-manual topics, held-out topics "
            f"excluded), 4 x 128 tokens a step, AdamW lr {args.lr:g} constant after 2 warm-up "
            f"steps, seed 42, fp32. Held-out perplexity = exp(TRL eval_loss) on the first "
            f"{args.eval_chunks} held-out chunks of `solar_manual_ppl` (128-token blocks), "
            f"every {args.eval_every} steps and at step 0.")
    body, cross = curves.arms_section(("DUS + CPT", out / "cpt"),
                                      ("base + CPT", out / "base_cpt"),
                                      report.with_suffix(".png"), what=what)
    sentence = cross.sentence("DUS + CPT", "base + CPT")
    command = "python benchmarks/control_arm.py " + " ".join(sys.argv[1:])
    corpus = json.loads(paths["manifest"].read_text())["chars"]["cpt_train"]
    record = {
        "command": command.strip(), "date": datetime.date.today().isoformat(),
        "wall_s": round(wall), "load_before": load_before, "load_after": load_after,
        "ran": result.ran, "skipped": result.skipped, "steps": args.steps,
        "eval_every": args.eval_every, "lr": args.lr, "cpt_chars": corpus,
        "tokens_per_step": 4 * 128, "eval_chunks": args.eval_chunks,
        "machine": {"cores": os.cpu_count(), "platform": platform.platform()},
        "dus_cpt": curves.eval_curve(out / "cpt"),
        "base_cpt": curves.eval_curve(out / "base_cpt"),
        "first_ahead": cross.first_ahead, "ahead_at_end": cross.ahead_at_end,
        "verdict": sentence,
    }
    report.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    head = ["# DUS + CPT vs base + CPT over a longer budget", "",
            (f"Command: `{record['command']}` ({record['date']}, {wall / 60:.0f} min wall; "
             f"load average before {load_before}, after {load_after}; {os.cpu_count()} "
             f"cores, a shared machine). CPT corpus: {corpus:,} characters."), ""]
    report.with_suffix(".md").write_text("\n".join(head + body) + "\n")
    print(sentence)


if __name__ == "__main__":
    main()
