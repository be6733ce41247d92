"""Real-model metrics by hand:
python benchmarks/eval/measure_real.py MODEL_DIR DATA_DIR
(DATA_DIR from solar_merge.demo.demo_data; MODEL_DIR e.g. solar_merge.demo.embedded_model())."""
import json
import os
import sys
import time
from pathlib import Path

t0 = time.time()
from solar_merge.evaluate import (
    _answer_loss,
    _math_exact_match,
    _perplexity,
    generate_answers,
    load_model,
)

model_dir, data = sys.argv[1], sys.argv[2]
model, tok = load_model(model_dir)
print(f"load: {time.time() - t0:.1f} s (incl. imports); load avg {os.getloadavg()}", flush=True)
t = time.time()
print(generate_answers(model, tok, ["What is the capital of France?"], max_new_tokens=20))
print(f"one answer: {time.time() - t:.1f} s", flush=True)
t = time.time()
ppl = _perplexity(model, tok, f"{data}/heldout.txt", seq_len=256, max_chunks=16, batch_size=4)
print(f"perplexity(256x16) = {ppl:.3f}  in {time.time() - t:.1f} s", flush=True)
t = time.time()
al = _answer_loss(model, tok, f"{data}/eval_python_qa.jsonl")
print(f"answer_loss = {al:.3f}  in {time.time() - t:.1f} s", flush=True)
for field in ("question", "rephrased_question"):
    t = time.time()
    em = _math_exact_match(model, tok, f"{data}/eval_math.jsonl", limit=20, field=field)
    print(f"math_exact_match({field}, 20) = {em:.3f}  in {time.time() - t:.1f} s", flush=True)
probs = [json.loads(x) for x in Path(f"{data}/eval_math.jsonl").read_text().splitlines()][:4]
for p, a in zip(probs, generate_answers(model, tok, [p["question"] for p in probs])):
    print("Q:", p["question"], "| final", p["final"], "\nA:", a.replace("\n", " ")[:300])
print(f"load avg {os.getloadavg()}")
