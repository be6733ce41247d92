#!/usr/bin/env python
"""solar-merge benchmarks: ours vs stock mergekit / TRL, side by side in one run.

    python benchmarks/run.py [--quick] [--real-scale] [--repeats N] [--only SECTION ...]

Writes benchmarks/results.md (tables) and benchmarks/results.json (every sample). See
benchmarks/README.md for what each row means. Sections: dus, merge, kernel, train, demo,
precision, real.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import fixtures
import precision as precision_bench

RESULTS_JSON = HERE / "results.json"
RESULTS_MD = HERE / "results.md"
SCRATCH = HERE / "scratch"
TIME = "/usr/bin/time" if Path("/usr/bin/time").exists() else None
BIN = Path(sys.executable).parent


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tool(name):
    p = BIN / name
    return str(p) if p.exists() else shutil.which(name) or name


# -- measuring whole processes ---------------------------------------------------------------

def drop_caches() -> bool:
    """Empty the page cache (root only), so that a timed copy reads its input from the disk
    whatever ran before it; False where it cannot."""
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_measured(cmd, *, cwd=None, env=None, log_name="cmd", cold=False):
    """Run cmd as a fresh process; return {wall_s, peak_rss_mb, cache}. `sync` runs first
    (outside the timing) so that no run pays for the previous run's dirty pages, and with
    `cold` the page cache is dropped too where root may; nothing is synced inside."""
    cache = "cold" if cold and drop_caches() else "as left"
    subprocess.run(["sync"], check=False)
    logfile = SCRATCH / f"{log_name}.log"
    if TIME:
        full = [TIME, "-v"] + [str(c) for c in cmd]
    else:  # fresh python per run: RUSAGE_CHILDREN of that python is the command's peak RSS
        full = [sys.executable, "-c",
                ("import resource,subprocess,sys;r=subprocess.run(sys.argv[1:]).returncode;"
                "print('Maximum resident set size (kbytes): %d'%resource.getrusage("
                "resource.RUSAGE_CHILDREN).ru_maxrss,file=sys.stderr);sys.exit(r)")
                ] + [str(c) for c in cmd]
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.run(full, check=False, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    text = logfile.read_text(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); tail of "
                           f"{logfile}:\n{text[-3000:]}")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = {key: float(x.group(1)) for key, label in (("user_s", "User"), ("sys_s", "System"))
           if (x := re.search(rf"{label} time \(seconds\): ([\d.]+)", text))}
    return {"wall_s": wall, "peak_rss_mb": int(m.group(1)) / 1024 if m else None,
            "load_1m_before": load, "cache": cache, **cpu}


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def rm(path):
    p = Path(path)
    if p.is_dir():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists():
        p.unlink()
    for extra in p.parent.glob(f".{p.name}.*"):  # solar-merge's .partial / .lock / .stale
        rm(extra) if extra.is_dir() else extra.unlink(missing_ok=True)


def free_gb(path=HERE) -> float:
    return shutil.disk_usage(path).free / 1e9


def need_disk(gb, what):
    free = free_gb()
    if free < gb:
        raise RuntimeError(f"{what}: needs ~{gb:.1f} GB free on {HERE}, only {free:.1f} GB")
    log(f"{what}: {free:.1f} GB free (need ~{gb:.1f})")


def med(samples, key):
    vals = [s[key] for s in samples if s.get(key) is not None]
    return statistics.median(vals) if vals else None


def summarize(samples):
    return {"wall_s": med(samples, "wall_s"), "peak_rss_mb": med(samples, "peak_rss_mb"),
            "n": len(samples), "samples": samples}


# -- machine ---------------------------------------------------------------------------------

def machine():
    from importlib.metadata import PackageNotFoundError, version

    def v(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None

    from solar_merge.precision import cpu_flags, cpu_name, decide

    mem = Path("/proc/meminfo").read_text()
    ram_kb = int(re.search(r"MemTotal:\s+(\d+)", mem).group(1))
    chosen = decide("auto")  # what `precision: auto` runs here (SOLAR_MERGE_PRECISION wins)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=HERE,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host_cores": os.cpu_count(), "cpu": cpu_name(), "cpu_flags": cpu_flags(),
            "precision": chosen.precision, "precision_reason": chosen.reason,
            "ram_gib": round(ram_kb / 2**20, 1), "disk_free_gb": round(free_gb(), 1),
            "python": platform.python_version(), "os": platform.platform(),
            "git_commit": commit,
            **{p: v(p) for p in ("torch", "mergekit", "transformers", "trl", "safetensors",
                                 "solar-merge")},
            "rss_tool": "/usr/bin/time -v" if TIME else "getrusage(RUSAGE_CHILDREN)",
            "loadavg_at_start": [round(x, 1) for x in os.getloadavg()]}


# -- 1 & 2: DUS ------------------------------------------------------------------------------

def filesystem(path) -> str:
    """The type and device of the filesystem holding `path` (the longest mount point above it
    in /proc/mounts)."""
    path, best = os.path.realpath(path), ("?", "?", "")
    for line in Path("/proc/mounts").read_text().splitlines():
        device, point, kind = line.split()[:3]
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best[2]):
            best = (kind, device, point)
    return f"{best[0]} ({best[1]} on {best[2]})"


def dus_pair(model: Path, drop: int, repeats: int, tag: str, extra_opts=(), cold=False):
    """Three ways to the same DUS, side by side: *fast* (`solar-merge dus --run OUT`, which
    copies tensor bytes for this pure slice config), *ours* (the mergekit path: the same
    command with `--no-fast`) and *stock* `mergekit-yaml --clone-tensors --copy-tokenizer` on
    the config `solar-merge dus -o` writes; then the floor: `cp -r` of the output folder
    (same bytes, same disk, no sync). `cold`: the page cache emptied before each command."""
    work = SCRATCH / tag
    rm(work)
    work.mkdir(parents=True)
    cfg = work / "dus.yaml"
    subprocess.run([tool("solar-merge"), "dus", str(model), "--drop", str(drop), "-o", str(cfg)],
                   check=True, capture_output=True)
    input_bytes = folder_bytes(model)
    out = work / "out"
    fast_cmd = [tool("solar-merge"), "dus", model, "--drop", drop, "--run", out, *extra_opts]
    ours_cmd = [tool("solar-merge"), "dus", model, "--drop", drop, "--run", out, "--no-fast",
                *extra_opts]
    stock_cmd = [tool("mergekit-yaml"), cfg, out, "--clone-tensors", "--copy-tokenizer",
                 *extra_opts]
    rows = {"fast": [], "ours": [], "stock": [], "floor_cp": []}
    out_bytes = None
    sides = [("fast", fast_cmd), ("ours", ours_cmd), ("stock", stock_cmd)]
    for r in range(repeats):
        # Rotate who goes first: the first run follows the floor's 2x output-size copy, which
        # evicts the input from the page cache (at real scale the input does not fit beside
        # the output in RAM), so a fixed order would always penalise the same side.
        for side, cmd in sides[r % 3:] + sides[:r % 3]:
            need_disk(input_bytes * 1.6 / 1e9 + 1, f"{tag} {side} #{r + 1}")
            rm(out)
            log(f"{tag}: {side} #{r + 1}: {' '.join(map(str, cmd))}")
            s = run_measured(cmd, log_name=f"{tag}-{side}-{r}", cold=cold)
            s["out_bytes"] = folder_bytes(out)
            out_bytes = s["out_bytes"]
            log(f"  {s['wall_s']:.1f} s, {s['peak_rss_mb']:.0f} MB RSS, "
                f"{s['out_bytes'] / 1e9:.2f} GB out, load {s['load_1m_before']}")
            rows[side].append(s)
        # every side ran; floor: copy the same output bytes on the same disk
        need_disk(out_bytes / 1e9 + 1, f"{tag} floor")
        dst = work / "floor_copy"
        rm(dst)
        f = run_measured(["cp", "-r", out, dst], log_name=f"{tag}-floor-{r}", cold=cold)
        f["out_bytes"] = folder_bytes(dst)
        log(f"  floor cp: {f['wall_s']:.1f} s")
        rows["floor_cp"].append(f)
        rm(dst)
        rm(out)
    rm(work)
    res = {k: summarize(v) for k, v in rows.items()}
    res["input_bytes"] = input_bytes
    res["out_bytes"] = out_bytes
    res["filesystem"] = filesystem(SCRATCH)
    res["commands"] = {"fast": " ".join(map(str, fast_cmd)),
                       "ours": " ".join(map(str, ours_cmd)),
                       "stock": " ".join(map(str, stock_cmd)),
                       "floor": "cp -r OUT COPY (no sync inside; `sync` before every timed run)"}
    fa, o, s, f = (res[k]["wall_s"] for k in ("fast", "ours", "stock", "floor_cp"))
    res["ratio_fast_stock_wall"] = fa / s
    res["ratio_fast_floor"] = fa / f
    res["ratio_fast_stock_rss"] = res["fast"]["peak_rss_mb"] / res["stock"]["peak_rss_mb"]
    res["ratio_ours_stock_wall"] = o / s
    res["ratio_ours_stock_rss"] = res["ours"]["peak_rss_mb"] / res["stock"]["peak_rss_mb"]
    res["ratio_ours_floor"] = o / f
    res["ratio_stock_floor"] = s / f
    return res


def reflink_dus(model: Path, drop: int, tag: str, fs: str = "xfs", cold=False):
    """The fast path on a filesystem with reflinks: a loop-mounted image (XFS with
    reflink=1, or btrfs) in the scratch folder, the model copied in (not timed), then
    `solar-merge dus --run` and the floor `cp -r` of its output, each timed, with the disk
    space each took (`df` before and after, after `sync`) beside the output's size. Returns
    what failed instead when the image cannot be made or mounted here."""
    image, mount = SCRATCH / f"{tag}.img", SCRATCH / f"{tag}-mnt"
    input_bytes = folder_bytes(model)
    need_disk(input_bytes * 2.6 / 1e9 + 2, f"{tag} image")  # input + an unshared output

    def used() -> int:
        subprocess.run(["sync"], check=False)
        return shutil.disk_usage(mount).used

    rm(image)
    mount.mkdir(parents=True, exist_ok=True)
    res = {"filesystem": f"{fs} (loop-mounted image" + (", reflink=1)" if fs == "xfs" else ")")}
    steps = [["truncate", "-s", str(int(input_bytes * 3) + 2**31), image],
             ["mkfs.xfs", "-q", "-m", "reflink=1", image] if fs == "xfs" else
             ["mkfs.btrfs", "-q", image],
             ["mount", "-o", "loop", image, mount]]
    for step in steps:
        try:
            proc = subprocess.run([str(c) for c in step], capture_output=True, text=True,
                                  check=False)
            error = (proc.stderr or proc.stdout).strip() if proc.returncode else None
        except OSError as e:
            error = str(e)
        if error is not None:
            res["failed"] = f"`{' '.join(map(str, step))}`: {error[:300]}"
            rm(image)
            return res
    try:
        src = mount / "model"
        subprocess.run(["cp", "-r", str(model), str(src)], check=True)
        out = mount / "out"
        cmd = [tool("solar-merge"), "dus", src, "--drop", drop, "--run", out]
        log(f"{tag}: {' '.join(map(str, cmd))}")
        before = used()
        res["fast"] = run_measured(cmd, log_name=f"{tag}-fast", cold=cold)
        res["fast"]["out_bytes"] = folder_bytes(out)
        res["fast"]["disk_bytes"] = used() - before
        before = used()
        res["floor_cp"] = run_measured(["cp", "-r", out, mount / "copy"],
                                       log_name=f"{tag}-floor", cold=cold)
        res["floor_cp"]["disk_bytes"] = used() - before
        log(f"  fast {res['fast']['wall_s']:.1f} s, {res['fast']['disk_bytes'] / 1e9:.2f} GB "
            f"of disk for {res['fast']['out_bytes'] / 1e9:.2f} GB; cp -r "
            f"{res['floor_cp']['wall_s']:.1f} s, {res['floor_cp']['disk_bytes'] / 1e9:.2f} GB")
        res["commands"] = {"fast": " ".join(map(str, cmd)), "floor": "cp -r OUT COPY"}
    finally:
        subprocess.run(["umount", str(mount)], check=False)
        rm(image)
        shutil.rmtree(mount, ignore_errors=True)
    return res


def section_dus(model, repeats):
    res = dus_pair(model, 8, repeats, "dus-smollm2")
    res["reflink"] = reflink_dus(model, 8, "dus-smollm2-xfs")
    return res


def section_real(repeats, tuned: bool):
    need_disk(16, "mistral-7b-shape fixture") if not (
        fixtures.CACHE / "mistral-7b-shape" / "config.json").exists() else None
    log("building/reusing the Mistral-7B-shaped checkpoint")
    t0 = time.perf_counter()
    model = fixtures.mistral_7b_shape()
    build_s = time.perf_counter() - t0
    res = {"model": str(model), "build_or_reuse_s": build_s}
    # Cold: 14.5 GB in and 21.5 GB out against the RAM of a small machine, so what the page
    # cache keeps from one command to the next would decide the ratios.
    res["default"] = dus_pair(model, 8, repeats, "dus-mistral", cold=True)
    res["reflink"] = reflink_dus(model, 8, "dus-mistral-xfs", cold=True)
    if tuned:
        opts = ["--out-shard-size", "1B", "-j", "2", "--async-write", "--write-threads", "2"]
        res["tuned"] = dus_pair(model, 8, repeats, "dus-mistral-tuned", opts, cold=True)
        res["tuned"]["options"] = " ".join(opts)
    return res


# -- 3: merge methods ------------------------------------------------------------------------

PAIRS = (("solar_average", "linear"), ("solar_slerp", "slerp"))
STOCK_LINEAR = "mergekit-yaml linear"


def merge_config(method, a, b):
    if method in ("solar_average", "linear"):
        return {"models": [{"model": str(a), "parameters": {"weight": 0.5}},
                           {"model": str(b), "parameters": {"weight": 0.5}}],
                "merge_method": method, "dtype": "float32"}
    return {"models": [{"model": str(a)}, {"model": str(b)}], "base_model": str(a),
            "merge_method": method, "parameters": {"t": 0.5}, "dtype": "float32"}


def section_merge(a, b, repeats):
    import yaml

    work = SCRATCH / "merge"
    rm(work)
    work.mkdir(parents=True)
    samples = {m: [] for pair in PAIRS for m in pair}
    samples[STOCK_LINEAR] = []  # the front ends: stock mergekit-yaml on the linear config
    for r in range(repeats):
        for method in list(samples):  # interleaved, so drift hits all five alike
            stock = method == STOCK_LINEAR
            method_of = "linear" if stock else method
            cfg = work / f"{method_of}.yaml"
            cfg.write_text(yaml.safe_dump(merge_config(method_of, a, b), sort_keys=False))
            out = work / f"out-{method_of}"
            rm(out)
            need_disk(2, f"merge {method}")
            log(f"merge: {method} #{r + 1}")
            cmd = ([tool("mergekit-yaml"), cfg, out] if stock
                   else [tool("solar-merge"), "yaml", cfg, out])
            s = run_measured(cmd, log_name=f"merge-{method_of}{'-stock' if stock else ''}-{r}")
            s["out_bytes"] = folder_bytes(out)
            log(f"  {s['wall_s']:.1f} s, {s['peak_rss_mb']:.0f} MB")
            samples[method].append(s)
            rm(out)
    rm(work)
    res = {m: summarize(v) for m, v in samples.items()}
    res["command"] = "solar-merge yaml CFG OUT (all four, dtype float32, weights 0.5/0.5, t=0.5)"
    for ours, theirs in PAIRS:
        res[f"ratio_{ours}_{theirs}_wall"] = res[ours]["wall_s"] / res[theirs]["wall_s"]
        res[f"ratio_{ours}_{theirs}_rss"] = res[ours]["peak_rss_mb"] / res[theirs]["peak_rss_mb"]
    res["ratio_front_end_wall"] = res["linear"]["wall_s"] / res[STOCK_LINEAR]["wall_s"]
    return res


def section_kernel(a, b, repeats):
    """In-process, kernel only: merge_tensors over every tensor of the two models."""
    import torch
    from mergekit.merge_methods import merge_tensors
    from safetensors.torch import load_file

    import solar_merge  # noqa: F401 - registers our methods

    torch.set_num_threads(os.cpu_count() or 1)
    sa, sb = {}, {}
    for f in sorted(Path(a).glob("*.safetensors")):
        sa.update(load_file(str(f)))
    for f in sorted(Path(b).glob("*.safetensors")):
        sb.update(load_file(str(f)))
    names = sorted(k for k in sa if sa[k].is_floating_point())
    calls = {
        "solar_average": lambda x, y, n: merge_tensors([x, y], "solar_average",
                                                       parameters={"weight": [0.5, 0.5]}, name=n),
        "linear": lambda x, y, n: merge_tensors([x, y], "linear",
                                                parameters={"weight": [0.5, 0.5]}, name=n),
        "solar_slerp": lambda x, y, n: merge_tensors([x, y], "solar_slerp",
                                                     parameters={"t": 0.5}, base_index=0, name=n),
        "slerp": lambda x, y, n: merge_tensors([x, y], "slerp", parameters={"t": 0.5},
                                               base_index=0, name=n),
    }
    for fn in calls.values():  # warm-up (first-call dispatch, allocator)
        fn(sa[names[0]], sb[names[0]], names[0])
    samples = {m: [] for m in calls}
    reps = 5 * max(repeats, 3)  # a repeat is ~0.5 s on an idle machine: take many
    order = list(calls)
    for r in range(reps):
        # Interleaved tensor by tensor (order rotated each repeat), so that load from other
        # processes on the machine hits ours and theirs alike.
        total = dict.fromkeys(calls, 0.0)
        for n in names:
            for m in order:
                t0 = time.perf_counter()
                calls[m](sa[n], sb[n], n)
                total[m] += time.perf_counter() - t0
        order = order[1:] + order[:1]
        for m in calls:
            samples[m].append({"wall_s": total[m]})
    res = {m: summarize(v) for m, v in samples.items()}
    res["tensors"] = len(names)
    res["params"] = sum(sa[n].numel() for n in names)
    res["torch_threads"] = torch.get_num_threads()
    for ours, theirs in PAIRS:
        res[f"ratio_{ours}_{theirs}_wall"] = res[ours]["wall_s"] / res[theirs]["wall_s"]
    return res


# -- 4: training -----------------------------------------------------------------------------

TRAIN_CHILD = r'''
import json, sys, time
from pathlib import Path
side, model, corpus, out, steps, result = sys.argv[1:7]
steps = int(steps)
from transformers import TrainerCallback

class Timer(TrainerCallback):
    def __init__(self):
        self.begin, self.end = {}, {}
    def on_step_begin(self, args, state, control, **kw):
        self.begin[state.global_step + 1] = time.perf_counter()
    def on_step_end(self, args, state, control, **kw):
        self.end[state.global_step] = time.perf_counter()

timer = Timer()
t_start = time.perf_counter()
if side == "ours":
    from solar_merge import testhooks
    from solar_merge.stages import train
    testhooks.arm()  # the timer rides on the trainer hook
    testhooks.TRAINER_HOOKS.append(lambda trainer, info: trainer.add_callback(timer))
    cfg = {"stage": "cpt", "model": model, "datasets": [{"path": corpus}], "seq_len": 128,
           "precision": "fp32",  # as the direct side, on any CPU
           "args": {"per_device_train_batch_size": 4, "max_steps": steps,
                    "learning_rate": 5e-5, "logging_steps": 1}}
    train(cfg, out)
else:
    import torch, datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    text = Path(corpus).read_text(encoding="utf-8").replace("\r\n", "\n")
    records = [{"text": p.strip()} for p in text.split("\n\n") if p.strip()]
    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    args = SFTConfig(output_dir=out, per_device_train_batch_size=4, max_steps=steps,
                     learning_rate=5e-5, logging_steps=1, packing=True,
                     packing_strategy="wrapped", max_length=128, dataset_text_field="text",
                     completion_only_loss=False, report_to="none", save_strategy="steps",
                     save_steps=200, save_total_limit=2, seed=42, bf16=False, use_cpu=True)
    trainer = SFTTrainer(model=m, args=args, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=tok)
    trainer.add_callback(timer)
    trainer.train()
    trainer.save_model(out)
    tok.save_pretrained(out)
total = time.perf_counter() - t_start
tokens_per_step = 4 * 128
loop_all = timer.end[steps] - timer.begin[1]
loop_warm = timer.end[steps] - timer.begin[2]  # steps 2..N: first step excluded (warm-up)
Path(result).write_text(json.dumps({
    "in_process_total_s": total, "loop_s": loop_all, "loop_warm_s": loop_warm,
    "tokens_per_s": tokens_per_step * steps / loop_all,
    "tokens_per_s_warm": tokens_per_step * (steps - 1) / loop_warm}))
'''


def corpus_file() -> Path:
    from pydoc_data.topics import topics

    p = fixtures.CACHE / "pydoc_topics.txt"
    if not p.exists():
        p.write_text("\n\n".join(topics[k] for k in sorted(topics)), encoding="utf-8")
    return p


def section_train(model, repeats, steps=10):
    child = SCRATCH / "train_child.py"
    child.parent.mkdir(parents=True, exist_ok=True)
    child.write_text(TRAIN_CHILD)
    corpus = corpus_file()
    try:
        from solar_merge.stages import train  # noqa: F401
        sides = ("ours", "direct")
    except ImportError as e:
        log(f"train: solar_merge.stages.train not available ({e}); direct side only")
        sides = ("direct",)
    samples = {s: [] for s in sides}
    for r in range(repeats):
        for side in sides:
            out = SCRATCH / f"train-{side}"
            rm(out)
            result = SCRATCH / f"train-{side}.json"
            log(f"train: {side} #{r + 1}")
            s = run_measured([sys.executable, child, side, model, corpus, out, steps, result],
                             log_name=f"train-{side}-{r}")
            s.update(json.loads(result.read_text()))
            log(f"  {s['tokens_per_s']:.0f} tok/s ({s['tokens_per_s_warm']:.0f} warm), "
                f"{s['wall_s']:.1f} s process, {s['peak_rss_mb']:.0f} MB")
            samples[side].append(s)
            rm(out)
    res = {}
    for side, v in samples.items():
        res[side] = summarize(v)
        for k in ("tokens_per_s", "tokens_per_s_warm", "loop_s", "in_process_total_s"):
            res[side][k] = med(v, k)
    res["setup"] = (f"cpt, SmolLM2-135M fp32, CPU, packing 'wrapped', seq_len 128, batch 4, "
                    f"{steps} steps, lr 5e-5, pydoc topics text")
    if "ours" in res:
        res["ratio_tokens_per_s"] = res["ours"]["tokens_per_s"] / res["direct"]["tokens_per_s"]
        res["ratio_tokens_per_s_warm"] = (res["ours"]["tokens_per_s_warm"]
                                          / res["direct"]["tokens_per_s_warm"])
        res["ratio_process_wall"] = res["ours"]["wall_s"] / res["direct"]["wall_s"]
    else:
        res["ours"] = "not available yet"
    return res


# -- 5: demo ---------------------------------------------------------------------------------

def _tree(root: int) -> list[int]:
    """root and every process below it (from /proc: children of each pid)."""
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        try:
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        todo += [int(k) for k in kids]
    return pids


PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


def _rss_kb(pid: int) -> int:
    """RSS of one process in kB, from /proc/PID/statm: cheap, unlike smaps_rollup."""
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KB
    except (OSError, IndexError, ValueError):
        return 0


def _pss_kb(pid: int) -> int:
    """PSS of one process in kB: shared pages split between the processes sharing them. Reading
    it walks the page tables (~50 ms for a 2.5 GB process, during which the process cannot map
    memory): sampling it every 0.2 s slowed the demo by a quarter, so it is read only when the
    tree's RSS sets a new high (or is within 1% of one not yet read), at most once a second."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0
    pss = re.search(r"^Pss:\s+(\d+)", text, re.MULTILINE)
    return int(pss.group(1)) if pss else 0



CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float | None:
    """CPU seconds (user + system, all threads) one process has used, from /proc/PID/stat."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    except (OSError, IndexError, ValueError):
        return None


def run_tree_measured(cmd, *, cwd=None, env=None, log_name="cmd", every=0.2):
    """Run cmd; return {wall_s, cpu_s, peak_rss_mb, tree_pss_mb, largest_rss_mb, processes}:
    the peak over time of the summed RSS of the command's whole process tree (a recipe runs
    each stage in a process forked from a fork server that holds the imports: summed RSS counts
    those shared pages twice), the tree's PSS at its RSS highs (each page counted once: the
    memory the tree really holds), the largest single process's RSS (what `time -v` reports),
    sampled every `every` s, and each process's CPU seconds as last sampled (so a process
    loses at most `every` s of its CPU time) with when it was first and last seen (seconds
    from the start, `started_at` the epoch time of that start)."""
    logfile = SCRATCH / f"{log_name}.log"
    subprocess.run(["sync"], check=False)
    peak_rss = peak_pss = largest = 0
    last_pss, pending = 0.0, False
    seen = {}  # pid -> [first seen s, last seen s, CPU s]
    started_at, t0 = time.time(), time.perf_counter()
    with open(logfile, "w") as f:
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=f,
                                stderr=subprocess.STDOUT)
        while proc.poll() is None:
            pids = _tree(proc.pid)
            now = time.perf_counter() - t0
            for pid in pids:
                cpu = _cpu_s(pid)
                if cpu is not None:
                    seen.setdefault(pid, [now, now, cpu])[1:] = [now, cpu]
            sizes = [_rss_kb(pid) for pid in pids]
            rss = sum(sizes)
            largest = max([largest, *sizes])
            pending = pending or rss > peak_rss  # a new high: its PSS is wanted
            peak_rss = max(peak_rss, rss)
            if pending and rss >= 0.99 * peak_rss and time.perf_counter() - last_pss >= 1.0:
                peak_pss = max(peak_pss, sum(_pss_kb(pid) for pid in pids))
                last_pss, pending = time.perf_counter(), False
            time.sleep(every)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        text = logfile.read_text(errors="replace")
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); tail of "
                           f"{logfile}:\n{text[-3000:]}")
    processes = [{"pid": pid, "first_s": round(a, 1), "last_s": round(b, 1), "cpu_s": round(c, 1)}
                 for pid, (a, b, c) in seen.items()]
    return {"wall_s": wall, "cpu_s": round(sum(p["cpu_s"] for p in processes), 1),
            "peak_rss_mb": peak_rss / 1024, "tree_pss_mb": peak_pss / 1024,
            "largest_rss_mb": largest / 1024, "started_at": started_at, "processes": processes}


def _stage_costs(out: Path, run: dict | None = None) -> dict:
    """stage -> the cost its completion record holds (wall s, the stage process's peak RSS,
    TRL's tokens/s) and, given the run's sampled processes (`run_tree_measured`), its CPU
    seconds: those of the processes that lived within the stage's time (the record is written
    when the stage ends; its process started `seconds` before)."""
    from solar_merge.outputs import MARKER

    costs, windows = {}, {}  # in the order the stages finished
    for stamp in sorted(out.glob(f"*/{MARKER}"), key=lambda p: p.stat().st_mtime):
        data = json.loads(stamp.read_text())
        name = stamp.parent.name
        if "seconds" not in data or stamp.parent.is_symlink():
            continue  # not a stage of this run (the data, the linked model)
        costs[name] = {k: data[k] for k in (
            "kind", "seconds", "peak_rss_mb", "tokens_per_second") if k in data}
        if run and "seconds" in data:
            end = stamp.stat().st_mtime - run["started_at"]
            windows[name] = (end - data["seconds"] - 0.5, end + 0.5)
    for p in (run or {}).get("processes", []):
        for name, (start, end) in windows.items():
            if start <= p["first_s"] and p["last_s"] <= end:
                costs[name]["cpu_s"] = round(costs[name].get("cpu_s", 0) + p["cpu_s"], 1)
    return costs


# Memory is judged on the tree's PSS: the summed RSS counts the fork server's imports twice
# (they are shared with the stage forked from it), PSS once. The wall targets hold for the
# reference CPU of the fp32 path (an AVX2 EPYC whose calibration step takes
# cpt_step.REFERENCE_STEP_S); on a CPU that takes less for that step, the fp32 targets shrink in
# proportion (a faster CPU must not hide a demo that is too slow on the reference one).
DEMO_TARGETS = {"demo --quick": {"wall_s": 180, "tree_pss_mb": 3072},
                "demo": {"wall_s": 720, "tree_pss_mb": 3072}}


def calibration_step() -> dict:
    """benchmarks/cpt_step.py in a fresh process: one fp32 CPT step of the demo's 44-layer
    model, with the CPU, its flags, the precision auto chooses and the load."""
    out = SCRATCH / "cpt_step.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(HERE / "cpt_step.py"), "--json", str(out)],
                          check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarks/cpt_step.py failed: {proc.stderr[-2000:]}")
    return json.loads(out.read_text())


def demo_targets(label: str, calibration: dict, precision: str) -> dict:
    """The targets of `label` on this CPU: the fp32 path's wall target scaled by the
    calibration step (never up), the bf16 path's as they are."""
    target = dict(DEMO_TARGETS[label])
    if precision == "fp32":
        target["wall_s"] = round(target["wall_s"] * calibration["budget_scale"])
    return target


def section_demo(repeats, quick_only):
    """The main job as a new user runs it: a fresh model cache (the GGUF import counted), a
    fresh output folder; quick `repeats` times (median), full once; the calibration step
    (benchmarks/cpt_step.py) first, so that every figure has the CPU's speed beside it. Fails
    loudly (in the results and the exit code) when a target is missed."""
    from solar_merge.precision import decide

    variants = [("demo --quick", ["--quick"])] + ([] if quick_only else [("demo", [])])
    log("calibration: one fp32 CPT step of the demo's 44-layer model (benchmarks/cpt_step.py)")
    calibration = calibration_step()
    precision = decide("auto").precision  # what the demo's stages choose (the env var wins)
    log(f"  {calibration['step_s']} s a step ({calibration['step_cpu_s']} CPU s, load "
        f"{calibration['loadavg_1m_before_after']}), precision {precision}")
    res = {"calibration": calibration, "precision": precision}
    for label, flags in variants:
        samples = []
        for r in range(repeats if "--quick" in flags else 1):
            work = Path(tempfile.mkdtemp(prefix="demo-", dir=SCRATCH))
            cmd = [tool("solar-merge"), "demo", *flags, "--out", str(work / "out")]
            env = {**os.environ, "SOLAR_MERGE_CACHE": str(work / "cache")}
            log(f"{label} #{r + 1}: {' '.join(cmd)} (fresh SOLAR_MERGE_CACHE)")
            load = os.getloadavg()[0]
            try:
                sample = run_tree_measured(cmd, cwd=work, env=env,
                                           log_name=f"demo-{len(flags)}-{r}")
            except RuntimeError as e:
                res[label] = {"status": f"failed: {str(e)[-800:]}"}
                shutil.rmtree(work, ignore_errors=True)
                break
            sample["load_before"] = round(load, 2)
            sample["load_after"] = round(os.getloadavg()[0], 2)
            sample["stages"] = _stage_costs(work / "out", sample)
            del sample["processes"], sample["started_at"]
            kept = HERE / "demo_reports" / label.replace("demo --quick", "quick")
            kept.mkdir(parents=True, exist_ok=True)  # the last run's report is kept
            for name in ("report.md", "report.png", "control_arm.png"):
                if (work / "out" / name).is_file():
                    shutil.copy2(work / "out" / name, kept / name)
            samples.append(sample)
            log(f"  {sample['wall_s']:.1f} s ({sample['cpu_s']:.0f} CPU s), tree peak "
                f"{sample['tree_pss_mb']:.0f} MB PSS, {sample['peak_rss_mb']:.0f} MB summed RSS")
            shutil.rmtree(work, ignore_errors=True)
        else:
            res[label] = summarize(samples)
            res[label]["stages"] = samples[len(samples) // 2]["stages"]
            res[label]["cpu_s"] = med(samples, "cpu_s")
            res[label]["tree_pss_mb"] = med(samples, "tree_pss_mb")
            res[label]["largest_rss_mb"] = med(samples, "largest_rss_mb")
            target = demo_targets(label, calibration, precision)
            missed = [k for k in target if res[label][k] > target[k]]
            res[label]["targets"] = target
            res[label]["missed"] = missed
            if missed:
                log(f"  TARGET MISSED for {label}: {missed} ({target})")
    return res


# -- report ----------------------------------------------------------------------------------

def f1(x, unit=""):
    return "—" if x is None else f"{x:.1f}{unit}"


def f2(x):
    return "—" if x is None else f"{x:.2f}"


def verdict(ratio, target, higher_is_better=False):
    if ratio is None:
        return ""
    ok = ratio >= target if higher_is_better else ratio <= target
    return "meets" if ok else "**misses**"


def _timed(case: dict):
    """Every timed run of a DUS case: the samples of its sides, or the one run of each."""
    for k in ("fast", "ours", "stock", "floor_cp"):
        side = case.get(k) or {}
        yield from side.get("samples", [side] if "wall_s" in side else [])


def _loads(case: dict) -> str:
    """The range of the 1-minute load average before the timed runs of a case."""
    loads = [s["load_1m_before"] for s in _timed(case) if "load_1m_before" in s]
    return f"{min(loads):.1f}–{max(loads):.1f}" if loads else "—"


def _cache(case: dict) -> str:
    """The page cache each timed run of a case started with."""
    states = {s.get("cache", "as left") for s in _timed(case)}
    return "cold" if states == {"cold"} else "as left by the run before"


def render(results) -> str:
    m = results["machine"]
    L = ["# solar-merge benchmarks", "",
         (f"Run {m['date']} on {m['host_cores']} cores ({m['cpu']}"
          + (f"; {', '.join(f for f, on in m['cpu_flags'].items() if on)}; precision auto: "
             f"{m['precision']}" if m.get("cpu_flags") is not None else "")
          + f"), {m['ram_gib']} GiB RAM; "
         f"Python {m['python']}, torch {m['torch']}, mergekit {m['mergekit']}, transformers "
         f"{m['transformers']}, trl {m['trl']}, safetensors {m['safetensors']}, solar-merge "
         f"{m['solar-merge']} (git {m['git_commit']}). Peak RSS via {m['rss_tool']}."),
         (f"Command: `{results['command']}`. Medians of the runs shown in `n`; ratios are "
         "ours / theirs from the same run. `sync` before every timed process (not timed); "
         "no sync inside any timed command (merges and `cp` alike). Where a table says the "
         "page cache was cold, it was emptied before each timed process (`sync; echo 3 > "
         "/proc/sys/vm/drop_caches`)."), ""]
    d = results.get("dus")
    rs = results.get("real", {})
    if d or rs:
        L += ["## Depth up-scaling (whole processes)", "",
              ("*fast*: `solar-merge dus --run` copying tensor bytes (this config only slices "
               "and stacks); *mergekit path*: the same with `--no-fast`; *stock*: "
               "`mergekit-yaml`; *cp floor*: `cp -r` of the finished output. Targets: "
               "SmolLM2 fast ≤ 0.5× stock; Mistral-7B-shape fast ≤ 1.2× the floor and "
               "≤ 1 GB peak RSS."), "",
              ("| case | n | fast s | mergekit path s | stock s | cp floor s | fast/stock | "
               "fast/floor | fast RSS MB | mergekit path RSS MB | stock RSS MB | output GB | "
               "filesystem | page cache | load (1 min) |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        cases = []
        if d:
            cases.append(("SmolLM2-135M fp32, 30→44 layers (m=8)", d))
        if rs.get("default"):
            cases.append(("Mistral-7B-shape bf16, 32→48 layers (m=8), default options",
                          rs["default"]))
        if rs.get("tuned"):
            cases.append((f"Mistral-7B-shape, `{rs['tuned']['options']}`", rs["tuned"]))
        for label, r in cases:
            fast = r.get("fast") or {}
            L.append(f"| {label} | {r['ours']['n']} | {f1(fast.get('wall_s'))} | "
                     f"{f1(r['ours']['wall_s'])} | {f1(r['stock']['wall_s'])} | "
                     f"{f1(r['floor_cp']['wall_s'])} | {f2(r.get('ratio_fast_stock_wall'))} | "
                     f"{f2(r.get('ratio_fast_floor'))} | {f1(fast.get('peak_rss_mb'))} | "
                     f"{r['ours']['peak_rss_mb']:.0f} | {r['stock']['peak_rss_mb']:.0f} | "
                     f"{r['out_bytes'] / 1e9:.2f} | {r.get('filesystem', '—')} | "
                     f"{_cache(r)} | {_loads(r)} |")
        L += ["", ("Commands: fast `solar-merge dus MODEL --drop 8 --run OUT [OPTIONS]`; "
              "mergekit path: the same with `--no-fast`; stock `mergekit-yaml dus.yaml OUT "
              "--clone-tensors --copy-tokenizer [OPTIONS]` on the config from "
              "`solar-merge dus MODEL --drop 8 -o dus.yaml`; floor `cp -r OUT COPY`. Load "
              "average (1 min) before each timed run is in results.json (`load_1m_before`)."),
              ""]
        reflinks = [(label, r["reflink"]) for label, r in
                    (("SmolLM2-135M fp32", d or {}), ("Mistral-7B-shape bf16", rs))
                    if r.get("reflink")]
        if reflinks:
            L += [("On a filesystem with reflinks (the fast path's copies share whole blocks "
                   "with the input where their offsets allow; disk = `df` used after − before, "
                   "after `sync`):"), "",
                  ("| case | filesystem | fast s | fast disk GB | cp -r s | cp -r disk GB | "
                   "output GB | page cache |"), "|---|---|---|---|---|---|---|---|"]
            for label, x in reflinks:
                if x.get("failed"):
                    L.append(f"| {label} | {x['filesystem']} | not measured: {x['failed']} "
                             "| | | | | |")
                    continue
                fa, cp = x["fast"], x["floor_cp"]
                L.append(f"| {label} | {x['filesystem']} | {f1(fa['wall_s'])} | "
                         f"{fa['disk_bytes'] / 1e9:.2f} | {f1(cp['wall_s'])} | "
                         f"{cp['disk_bytes'] / 1e9:.2f} | {fa['out_bytes'] / 1e9:.2f} | "
                         f"{_cache(x)} |")
            L.append("")
    mg, kn = results.get("merge"), results.get("kernel")
    if mg or kn:
        L += ["## Merge methods: ours vs mergekit built-ins (target ours ≤ 1.05× theirs)", "",
              ("| pair | process: ours s | theirs s | ratio | | RSS ours MB | theirs MB | ratio "
              "| kernel-only: ours s | theirs s | ratio | |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for ours, theirs in PAIRS:
            row = f"| {ours} vs {theirs} |"
            if mg:
                rw = mg[f"ratio_{ours}_{theirs}_wall"]
                row += (f" {f2(mg[ours]['wall_s'])} | {f2(mg[theirs]['wall_s'])} | {f2(rw)} | "
                        f"{verdict(rw, 1.05)} | {mg[ours]['peak_rss_mb']:.0f} | "
                        f"{mg[theirs]['peak_rss_mb']:.0f} | "
                        f"{f2(mg[f'ratio_{ours}_{theirs}_rss'])} |")
            else:
                row += " — | — | — | | — | — | — |"
            if kn:
                rk = kn[f"ratio_{ours}_{theirs}_wall"]
                row += (f" {kn[ours]['wall_s']:.3f} | {kn[theirs]['wall_s']:.3f} | {f2(rk)} | "
                        f"{verdict(rk, 1.05)} |")
            else:
                row += " — | — | — | |"
            L.append(row)
        if mg and STOCK_LINEAR in mg:
            rf = mg["ratio_front_end_wall"]
            L.append(f"| front end: `solar-merge yaml` vs stock `mergekit-yaml` (linear) | "
                     f"{f2(mg['linear']['wall_s'])} | {f2(mg[STOCK_LINEAR]['wall_s'])} | "
                     f"{f2(rf)} | {verdict(rf, 1.05)} | {mg['linear']['peak_rss_mb']:.0f} | "
                     f"{mg[STOCK_LINEAR]['peak_rss_mb']:.0f} | "
                     f"{f2(mg['linear']['peak_rss_mb'] / mg[STOCK_LINEAR]['peak_rss_mb'])} "
                     "| — | — | — | |")
        L += ["", "Process: `solar-merge yaml CFG OUT` for all four (same front "
              "end; the last row: stock `mergekit-yaml` on the linear config), two "
              "SmolLM2-135M fp32 models (the embedded one and a noisy copy), dtype float32. "
              f"Kernel-only: `mergekit.merge_methods.merge_tensors` over all "
              f"{kn['tensors'] if kn else '?'} tensors "
              f"({kn['params'] / 1e6:.0f}M params) of the same two models in one process, "
              f"{kn['torch_threads'] if kn else '?'} torch threads." if kn else "", ""]
    t = results.get("train")
    if t:
        L += ["## Training: cpt stage through our wrapper vs TRL directly (target ≥ 0.95)", "",
              f"Setup: {t['setup']}.", ""]
        if isinstance(t.get("ours"), dict):
            o, dd = t["ours"], t["direct"]
            L += [("| | n | tokens/s (all steps) | tokens/s (steps 2–N) | loop s | process s | "
                  "peak RSS MB |"), "|---|---|---|---|---|---|---|",
                  (f"| ours `solar_merge.stages.train` | {o['n']} | {o['tokens_per_s']:.0f} | "
                  f"{o['tokens_per_s_warm']:.0f} | {o['loop_s']:.1f} | {o['wall_s']:.1f} | "
                  f"{o['peak_rss_mb']:.0f} |"),
                  (f"| TRL `SFTTrainer` directly | {dd['n']} | {dd['tokens_per_s']:.0f} | "
                  f"{dd['tokens_per_s_warm']:.0f} | {dd['loop_s']:.1f} | {dd['wall_s']:.1f} | "
                  f"{dd['peak_rss_mb']:.0f} |"),
                  (f"| **ratio ours/direct** | | **{t['ratio_tokens_per_s']:.3f}** "
                  f"{verdict(t['ratio_tokens_per_s'], 0.95, True)} | "
                  f"{t['ratio_tokens_per_s_warm']:.3f} | | {t['ratio_process_wall']:.2f} | |"), ""]
        else:
            dd = t["direct"]
            L += [f"Ours: {t['ours']}. Direct TRL: {dd['tokens_per_s']:.0f} tokens/s.", ""]
    errors = {k: v for k, v in results.items() if k.endswith("_error")}
    if errors:
        L += ["## Sections that failed", ""]
        L += [f"- `{k[:-6]}`: {str(v).strip().splitlines()[-1][:300]}" for k, v in errors.items()]
        L.append("")
    dm = results.get("demo")
    if dm:
        L += render_demo(dm)
    if results.get("precision"):
        L += precision_bench.markdown(results["precision"]).splitlines() + [""]
    runs = results.get("sections_run") or {}
    if runs:
        L += ["## When each section ran", "",
              ("| section | started (UTC) | command | CPU (flags), precision | seconds | repeats "
               "| load avg 1 min before/after |"),
              "|---|---|---|---|---|---|---|"]
        for name, r in runs.items():
            flags = ", ".join(f for f, on in (r.get("cpu_flags") or {}).items() if on)
            cpu = f"{r['cpu']} ({flags}), {r['precision']}" if r.get("cpu") else "not recorded"
            L.append(f"| {name} | {r.get('at')} | `{r.get('command', '')}` | {cpu} | "
                     f"{r.get('seconds', 0):.0f} | {r.get('repeats')} | "
                     f"{r.get('loadavg_1m_before_after')} |")
        L.append("")
    return "\n".join(L) + "\n"


# The demo as it was before it was sized for fp32, forced to fp32 on the reference AVX2 EPYC
# (2 cores, quiet): wall seconds per stage as that run reported them, tree ~2.9 GB.
DEMO_BEFORE = {"demo": {"wall_s": 26.5 * 60, "stages": {
                   "cpt": 267, "base_cpt": 196, "sft_python": 179, "sft_math": 148,
                   "dpo_avg": 172, "sdpo_slerp": 186, "eval_text": 93, "eval_chat": 319}}}


def render_demo(dm: dict) -> list[str]:
    L = ["## Demo (the whole process tree)", ""]
    if dm.get("status"):
        return L + [f"`solar-merge demo`: {dm['status']}.", ""]
    c = dm.get("calibration")
    if c:
        flags = ", ".join(f for f, on in c["cpu_flags"].items() if on)
        L += [(f"Calibration (`python benchmarks/cpt_step.py`, {c['date']}): {c['what']} took "
               f"**{c['step_s']} s** ({c['step_cpu_s']} CPU s over {c['threads']} threads; "
               f"median of {c['steps_timed']}) on {c['cpu']} ({flags}); load average "
               f"{c['loadavg_1m_before_after'][0]}-{c['loadavg_1m_before_after'][1]}. The "
               f"reference AVX2 EPYC takes {c['reference_step_s']:.1f} s: the fp32 targets "
               f"below are scaled by {c['budget_scale']}. Precision the demo's stages chose: "
               f"**{dm.get('precision', '?')}**."), ""]
    L += [("Peak memory of the command's whole process tree, sampled every 0.2 s: PSS (each "
           "page counted once, split between the processes that share it: the memory the tree "
           "holds; read at the RSS highs, at most once a second), the summed RSS (counts the "
           "fork server's imports twice, as each stage shares them) and the largest single "
           "process's RSS (what `/usr/bin/time -v` reports). CPU: user + system seconds of "
           "every process of the tree. Fresh model cache, so the GGUF import is included."), "",
          ("| command | n | wall | CPU s | load before/after | tree peak PSS | summed RSS | "
           "largest process | target | before: fp32, reference AVX2 EPYC |"),
          "|---|---|---|---:|---|---|---|---|---|---|"]
    for label in ("demo --quick", "demo"):
        r = dm.get(label)
        if r is None:
            continue
        if "status" in r:
            L.append(f"| `solar-merge {label}` | | {r['status'][:200]} | | | | | | | |")
            continue
        t, b = r.get("targets", {}), DEMO_BEFORE.get(label, {})
        verdict = "missed: " + ", ".join(r["missed"]) if r.get("missed") else "met"
        before = f"{b['wall_s'] / 60:.1f} min" if b else "–"
        loads = ", ".join(f"{s.get('load_before', '?')}/{s.get('load_after', '?')}"
                          for s in r.get("samples", []))
        L.append(f"| `solar-merge {label}` | {r['n']} | {r['wall_s'] / 60:.1f} min | "
                 f"{f1(r.get('cpu_s'))} | {loads} | "
                 f"{(r.get('tree_pss_mb') or 0) / 1024:.2f} GB | {r['peak_rss_mb'] / 1024:.2f} GB"
                 f" | {(r.get('largest_rss_mb') or 0) / 1024:.2f} GB"
                 f" | ≤ {t.get('wall_s', 0) / 60:.1f} min, ≤ {t.get('tree_pss_mb', 0) / 1024:.0f}"
                 f" GB PSS: {verdict} | {before} |")
    L.append("")
    for label in ("demo", "demo --quick"):
        r = dm.get(label) or {}
        if not r.get("stages"):
            continue
        before = DEMO_BEFORE.get(label, {}).get("stages", {})
        L += [(f"Per stage, `solar-merge {label}` (each stage in its own process; RSS of that "
               "process; CPU s of the processes that ran within the stage; tokens/s as TRL "
               "logged them):"), "",
              ("| stage | kind | wall s | CPU s | before s (fp32, reference AVX2 EPYC) | "
               "peak RSS MB | tokens/s |"),
              "|---|---|---:|---:|---:|---:|---:|"]
        for name, c in r["stages"].items():
            L.append(f"| {name} | {c.get('kind', '')} | {c.get('seconds', '–')} | "
                     f"{c.get('cpu_s', '–')} | {before.get(name, '–')} | "
                     f"{c.get('peak_rss_mb', '–')} | {c.get('tokens_per_second', '–')} |")
        L.append("")
    return L


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="1 repeat, 3 training steps, demo --quick only")
    ap.add_argument("--real-scale", action="store_true",
                    help="also the Mistral-7B-shaped DUS (~15 GB fixture, ~22 GB outputs)")
    ap.add_argument("--no-tuned", action="store_true",
                    help="real scale: skip the run with mergekit performance options")
    ap.add_argument("--repeats", type=int, default=None,
                    help="runs per measurement (default 3; real scale 1)")
    ap.add_argument("--only", nargs="+", choices=["dus", "merge", "kernel", "train", "demo",
                                                  "real", "precision"],
                    help="run only these sections; others are kept from results.json")
    ap.add_argument("--render", action="store_true",
                    help="only re-write results.md from results.json")
    a = ap.parse_args()
    if a.render:
        RESULTS_MD.write_text(render(json.loads(RESULTS_JSON.read_text())))
        print(RESULTS_MD.read_text())
        return
    repeats = a.repeats or (1 if a.quick else 3)
    real_repeats = a.repeats or 1
    sections = a.only or ["dus", "merge", "kernel", "train", "demo", "precision"] + (
        ["real"] if a.real_scale else [])
    SCRATCH.mkdir(parents=True, exist_ok=True)
    results = {}
    if not a.only:
        RESULTS_JSON.unlink(missing_ok=True)  # a full run starts from scratch
    results["machine"] = machine()
    results["command"] = "python benchmarks/run.py " + " ".join(sys.argv[1:])
    results.setdefault("sections_run", {})

    touched = {"machine", "command"}

    def save():
        # Merge into what is on disk, so that runs of other sections (even concurrent ones)
        # keep their results.
        merged = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
        runs = {**merged.get("sections_run", {}), **results["sections_run"]}
        for k in touched:
            if k in results:
                merged[k] = results[k]
            else:
                merged.pop(k, None)
        merged["sections_run"] = runs
        RESULTS_JSON.write_text(json.dumps(merged, indent=2, default=str))
        RESULTS_MD.write_text(render(merged))

    small = None
    if {"dus", "merge", "kernel", "train"} & set(sections):
        log("fixtures: SmolLM2 fp32 and a perturbed copy")
        small = fixtures.smollm2()
        other = fixtures.perturbed(small)
        results["fixtures"] = {"smollm2": str(small), "perturbed": str(other)}
        touched.add("fixtures")
    steps = 3 if a.quick else 10
    plan = {"dus": lambda: section_dus(small, repeats),
            "kernel": lambda: section_kernel(small, other, repeats),
            "train": lambda: section_train(small, repeats, steps),
            "merge": lambda: section_merge(small, other, repeats),
            "demo": lambda: section_demo(repeats, a.quick),
            "real": lambda: section_real(real_repeats, not a.no_tuned),
            "precision": lambda: precision_bench.measure(repeats)}
    for name in list(plan):
        if name not in sections:
            continue
        log(f"== {name}")
        touched.update({name, name + "_error"})
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        try:
            results[name] = plan[name]()
        except Exception as e:  # noqa: BLE001 - record it, go on with the other sections
            log(f"{name} failed: {e}")
            results[name + "_error"] = str(e)[-2000:]
        else:
            results.pop(name + "_error", None)
        results["sections_run"][name] = {"at": results["machine"]["date"],
                                         "command": results["command"],
                                         **{k: results["machine"].get(k) for k in (
                                             "cpu", "cpu_flags", "precision")},
                                         "seconds": time.perf_counter() - t0,
                                         "loadavg_1m_before_after": [round(load_before[0], 1),
                                                                     round(os.getloadavg()[0], 1)],
                                         "repeats": real_repeats if name == "real" else repeats}
        save()
    save()
    print(RESULTS_MD.read_text())
    missed = {k: v["missed"] for k, v in (results.get("demo") or {}).items()
              if isinstance(v, dict) and v.get("missed")}
    if missed:
        sys.exit(f"the demo missed its targets: {missed} (see {RESULTS_MD})")


if __name__ == "__main__":
    main()
