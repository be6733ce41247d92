"""Workers on many machines share one search through a PostgreSQL study: trials per hour of
one worker against two, on a local PostgreSQL server.

    apt-get install -y postgresql        # Debian's package: initdb, pg_ctl, postgres
    pip install psycopg2-binary          # the driver of postgresql+psycopg2:// URLs
    python benchmarks/search_postgres.py [--trials 12] [--workers 1,2] [--out DIR]

It starts its own server (initdb + pg_ctl, as the `postgres` user when run as root, on a free
port of 127.0.0.1, data in a temporary folder that is deleted at the end), makes one database
per run, and runs `solar-merge search SPACE -o OUT_k --storage postgresql+psycopg2://...`
once per worker, each worker with its own OUT (as on its own machine), all at once. The trials
are real: two tiny random Llama models (8 layers, hidden 64) up-scaled (drop m) and merged
(weight) by mergekit, each scored by lm-eval's solar_manual_ppl (--limit 4 documents).

Reported per run: wall time from the first worker's start to the last one's exit, trials per
hour over it, and over the study's own span (first trial started to last trial finished: the
workers' start-up, ~20 s of imports each, left out); written to benchmarks/search_postgres.json
with the command, date and CPU.
"""

import argparse
import datetime
import getpass
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent


def pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    if not found:
        sys.exit("PostgreSQL is not installed: apt-get install -y postgresql")
    return found[-1].parent


def as_postgres(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A throw-away PostgreSQL server: trust authentication on 127.0.0.1 only."""

    def __init__(self):
        self.bin = pg_bin()
        self.root = Path(tempfile.mkdtemp(prefix="solar-merge-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.user = "postgres" if os.geteuid() == 0 else getpass.getuser()
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")

    def __enter__(self):
        subprocess.run(as_postgres([str(self.bin / "initdb"), "-D", str(self.data), "-U",
                                    self.user, "--auth=trust", "-E", "UTF8"]),
                       check=True, capture_output=True)
        subprocess.run(as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                                    str(self.root / "server.log"), "-o",
                                    (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                                    "-c max_connections=100"), "start"]),
                       check=True, capture_output=True)
        return self

    def createdb(self, name: str) -> str:
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                        "-U", self.user, name], check=True, capture_output=True)
        return f"postgresql+psycopg2://{self.user}@127.0.0.1:{self.port}/{name}"

    def __exit__(self, *exc):
        subprocess.run(as_postgres([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m",
                                    "fast", "stop"]), check=False, capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def tiny_models(folder: Path) -> list[str]:
    """Two tiny random Llama models with a byte-level BPE tokenizer trained on Python's own
    reference text (no download)."""
    from pydoc_data.topics import topics

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(topics.values())[:200], trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", bos_token="<|endoftext|>")
    out = []
    for seed in (0, 1):
        path = folder / f"tiny-{seed}"
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=2048, tie_word_embeddings=True,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        fast.save_pretrained(path)
        out.append(str(path))
    return out


def run_workers(space: Path, url: str, workers: int, trials: int, folder: Path) -> dict:
    import optuna

    procs, start = [], time.time()
    for k in range(workers):
        log = open(folder / f"worker-{k}.log", "w")  # noqa: SIM115 - closed when it exits
        procs.append((subprocess.Popen(
            [sys.executable, "-m", "solar_merge", "search", str(space), "-o",
             str(folder / f"out-{k}"), "--storage", url, "--trials", str(trials)],
            stdout=log, stderr=subprocess.STDOUT), log))
    codes = [p.wait() for p, _ in procs]
    wall = time.time() - start
    for _, log in procs:
        log.close()
    if any(codes):
        sys.exit(f"a worker failed ({codes}); see {folder}/worker-*.log")
    study = optuna.load_study(study_name="search_postgres", storage=url)
    done = [t for t in study.get_trials() if t.state.name == "COMPLETE"]
    span = (max(t.datetime_complete for t in done)
            - min(t.datetime_start for t in done)).total_seconds()
    per_worker = {}
    for t in done:
        pid = t.user_attrs["worker"]["pid"]
        per_worker[pid] = per_worker.get(pid, 0) + 1
    return {"workers": workers, "trials": len(done), "wall_s": round(wall, 1),
            "trials_per_hour_wall": round(3600 * len(done) / wall, 1),
            "study_span_s": round(span, 1),
            "trials_per_hour_study": round(3600 * len(done) / span, 1),
            "trials_per_worker": sorted(per_worker.values()),
            "other_states": sorted(t.state.name for t in study.get_trials()
                                   if t.state.name != "COMPLETE")}


def cpu() -> dict:
    from solar_merge.precision import cpu_flags, cpu_name

    return {"model": cpu_name(), "cores": os.cpu_count(),
            "flags": sorted(k for k, v in cpu_flags().items() if v)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=12, help="trials per study (default 12)")
    ap.add_argument("--workers", default="1,2", help="worker counts to compare (default 1,2)")
    ap.add_argument("--out", type=Path, help="keep the work folder here (default: temporary)")
    ap.add_argument("--json", type=Path, default=HERE / "search_postgres.json")
    args = ap.parse_args()
    load = os.getloadavg()[0]
    folder = args.out or Path(tempfile.mkdtemp(prefix="search-postgres-"))
    folder.mkdir(parents=True, exist_ok=True)
    pair = tiny_models(folder)
    space = folder / "space.yaml"
    space.write_text(yaml.safe_dump({
        "candidates": pair, "layout": {"drop": {"low": 1, "high": 3}},
        "merge": {"method": "solar_average", "weight": {"low": 0.0, "high": 1.0}},
        "score": {"tasks": "solar_manual_ppl", "limit": 4}, "study": "search_postgres",
        "sampler": {"name": "tpe", "n_startup_trials": 4}}, sort_keys=False))
    rows = []
    with Server() as server:
        for workers in (int(w) for w in args.workers.split(",")):
            run = folder / f"workers-{workers}"
            run.mkdir(exist_ok=True)
            url = server.createdb(f"search_{workers}")
            row = run_workers(space, url, workers, args.trials, run)
            rows.append(row)
            print(f"{workers} worker(s): {row['trials']} trials in {row['wall_s']} s wall "
                  f"({row['trials_per_hour_wall']} trials/h), study span {row['study_span_s']} s "
                  f"({row['trials_per_hour_study']} trials/h), per worker "
                  f"{row['trials_per_worker']}", flush=True)
    base = rows[0]
    for row in rows[1:]:
        row["speedup_wall"] = round(row["trials_per_hour_wall"] / base["trials_per_hour_wall"], 2)
        row["speedup_study"] = round(row["trials_per_hour_study"]
                                     / base["trials_per_hour_study"], 2)
        print(f"{row['workers']} workers against {base['workers']}: x{row['speedup_wall']} "
              f"(wall), x{row['speedup_study']} (study span)")
    result = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
              "cpu": cpu(), "load_at_start": load, "rows": rows}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written {args.json}")
    if args.out is None:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
