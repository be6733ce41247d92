"""Evaluation through EleutherAI's lm-evaluation-harness: its numbers, unchanged.

`evaluate(models, tasks, out=...)` runs `lm_eval.simple_evaluate` with lm-eval's `hf` model on
each model and writes, under `out`:

    <label>/results.json   lm-eval's results dict as simple_evaluate returns it (same keys:
                           results[task]["acc,none"], configs, versions, n-shot, config, ...)
    results.md / .csv      one table, models x metrics (the rule: see `table`)
    results.png            the same as bar charts, one per column
    metrics.json           the table as {label: {column: value}} (what recipes and sweeps read)
    contamination.*        when asked: n-gram overlap of training data with the tasks' documents

Tasks are our shipped ones (solar_merge/tasks: solar_manual_ppl, solar_manual_qa, solar_arith,
tag `solar`), a user's `include_path` folders, any lm-eval task, and `h6`: the Open LLM
Leaderboard v1 set the SOLAR paper reports, whose leaderboard average `h6_scores` computes.
`score(results, task)` gives one scalar per model (see PRIMARY). Torch and lm-eval are imported
inside functions: importing this module is instant.
"""

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from solar_merge.errors import UserError, did_you_mean
from solar_merge.outputs import atomic_output, config_hash, fingerprint, is_complete
from solar_merge.precision import REQUESTS
from solar_merge.tasks import catalog

RESULTS = "results.json"
METRICS = "metrics.json"
PRECISION = "precision.json"  # the dtype the models were evaluated in, and why
# The one scalar `score` reports for a task when no metric is named.
PRIMARY = {"solar_manual_ppl": "word_perplexity,none", "solar_manual_qa": "acc_norm,none",
           "solar_arith": "exact_match,flexible-extract", "h6": "average"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


# -- the recipe's eval stage -------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ContaminationSpec(_Strict):
    train: list[str] | str = "auto"   # "auto": every training set of the recipe
    n: int = Field(13, ge=1)
    fail_above: float | None = Field(None, ge=0)


class EvalSpec(_Strict):
    """A recipe eval stage, besides `models:` (the same options as `evaluate`)."""
    tasks: list[str] | str
    num_fewshot: int | None = Field(None, ge=0)
    limit: int | float | None = Field(None, gt=0)  # documents per task; < 1: a share
    include_path: list[str] | str | None = None
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = 8
    device: str | None = None
    apply_chat_template: bool = False
    model_args: dict = Field(default_factory=dict)
    precision: Literal[REQUESTS] = "auto"  # type: ignore[valid-type]  # model_args.dtype wins
    contamination: ContaminationSpec | None = None


_OLD_KEYS = ("perplexity", "answer_loss", "math_exact_match")


def parse_spec(spec: dict, *, where: str = "eval") -> EvalSpec:
    """Validate an eval stage's options; unknown keys and bad values are UserErrors."""
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a mapping", fix="e.g. {models: [...], tasks: solar}")
    old = [k for k in spec if k in _OLD_KEYS]
    if old:
        raise UserError(f"{where}.{old[0]}: evaluation now runs lm-eval tasks",
                        fix="tasks: [solar_manual_ppl, solar_manual_qa, solar_arith] (held-out "
                            "perplexity, reference-manual QA, arithmetic exact match)")
    try:
        parsed = EvalSpec.model_validate(spec)
    except ValidationError as e:
        err = next((x for x in e.errors() if x["type"] == "extra_forbidden"), e.errors()[0])
        loc = [str(x) for x in err["loc"]]
        if err["type"] == "extra_forbidden":
            model = ContaminationSpec if loc[0] == "contamination" else EvalSpec
            raise UserError(f"{where}: unknown key `{'.'.join(loc)}`"
                            f"{did_you_mean(loc[-1], model.model_fields)}",
                            fix=f"allowed keys: {', '.join(model.model_fields)}") from None
        raise UserError(f"{where}.{'.'.join(loc)}: {err['msg']}", fix="check the value") from None
    catalog.split_names(parsed.tasks)
    from solar_merge.precision import requested

    parsed.precision = requested(parsed.precision)  # SOLAR_MERGE_PRECISION: another result
    return parsed


# -- running ---------------------------------------------------------------------------------

def evaluate(models, tasks, *, out=None, include_path=None, num_fewshot: int | None = None,
             limit: float | None = None, batch_size: int | str = 8, device: str | None = None,
             apply_chat_template: bool = False, model_args: dict | None = None,
             precision: str = "auto", contamination: dict | None = None, base_dir=None,
             digest: str | None = None) -> dict[str, dict]:
    """Evaluate each model with lm-eval; return {label: lm-eval results dict}.

    models: a list of model folders / Hub ids (labelled by folder name) or {label: model}.
    tasks: names or "a,b" strings. include_path: a folder (or list) of extra task YAMLs.
    num_fewshot: lm-eval's override for every task (tasks whose YAML says 0 keep 0; refused
    with h6, which fixes its own). limit: the first N documents of each task (a float < 1: a
    share). model_args: more `hf` model arguments (dtype, max_length, ...).
    precision: auto | bf16 | fp16 | fp32 (solar_merge.precision, decided for `device`): the
    models' dtype unless model_args gives one; written to precision.json.
    contamination: {"train": [datasets], "n": 13, "fail_above": percent} checks the training
    sets against the tasks' documents first (solar_merge.contamination) and stops above the
    threshold. out: the output folder (None: nothing written). A finished `out` with the
    same inputs is read back, not re-run; an interrupted one resumes model by model.
    digest: what marks `out` complete (a recipe's stage hash; default: the hash of the
    options and of every model's and data set's contents).
    """
    labels = model_labels(models, base_dir=base_dir)
    names = catalog.split_names(tasks)
    _check_options(names, num_fewshot, limit, batch_size)
    for label, ref in labels.items():
        check_model(ref, label)
    device = device or _default_device()
    from solar_merge.precision import requested

    request = requested(precision)
    run = {"tasks": names, "num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
           "device": device, "apply_chat_template": apply_chat_template,
           "model_args": model_args or {}, "precision": request,
           "include_path": [fingerprint(p) for p in catalog.include_paths(include_path)],
           "ours": fingerprint(catalog.TASKS_DIR), "lm_eval": _version("lm_eval")}
    keys = {label: config_hash({**run, "model": fingerprint(ref)})
            for label, ref in labels.items()}
    checked = contamination and {**contamination, "train": [
        fingerprint(_resolve(t, base_dir)) for t in contamination.get("train") or []]}
    want = digest or config_hash({"models": keys, "contamination": checked})
    if out is not None and is_complete(out, want):
        return read_results(out, labels)
    manager, loaded = catalog.load(names, include_path)  # reads the data: fails before any model
    hf_args, chosen = model_dtype(request, device, model_args or {})
    settings = {"num_fewshot": num_fewshot, "limit": limit, "batch_size": batch_size,
                "device": device, "apply_chat_template": apply_chat_template,
                "task_manager": manager}
    if out is None:
        return {label: _simple_evaluate(ref, loaded, hf_args, settings)
                for label, ref in labels.items()}
    results = {}
    # kept for a re-run to resume model by model; with no model done, nothing to resume
    def resumable(work):
        return any(work.glob(f"*/{RESULTS}"))

    with atomic_output(out, want, keep_partial=resumable) as work:
        (work / PRECISION).write_text(json.dumps(chosen, indent=1) + "\n")
        if contamination:
            _contamination(contamination, loaded, work, base_dir)
        for label, ref in labels.items():
            results[label] = _cached(work / label, keys[label])
            if results[label] is None:
                results[label] = _simple_evaluate(ref, loaded, hf_args, settings)
                _write_results(work / label, results[label], keys[label])
        for stale in work.iterdir():  # a model dropped since an interrupted run
            if stale.is_dir() and stale.name not in labels:
                import shutil

                shutil.rmtree(stale)
        write_table(results, work)
    return results


def prefetch(tasks, *, include_path=None) -> str:
    """Read the tasks' data into the datasets cache (lm-eval loads it); no model."""
    names = catalog.split_names(tasks)
    manager, loaded = catalog.load(names, include_path)
    found = catalog.hub_datasets(names, manager)
    return (f"{len(loaded['tasks'])} task(s) ready offline; Hub data sets cached: "
            + (", ".join(sorted(found)) or "none (ours ship with the package)"))


def model_dtype(request: str, device: str, model_args: dict) -> tuple[dict, dict]:
    """(lm-eval `hf` model_args with a dtype, the record for precision.json): model_args'
    own dtype, else the precision decision's for `device` (bfloat16 where it computes bf16
    natively, float16 on older CUDA GPUs, float32 otherwise); announced at INFO."""
    from solar_merge import precision

    if model_args.get("dtype") is not None:
        dtype = str(model_args["dtype"])
        record = {"dtype": dtype, "reason": f"model_args dtype={dtype} (explicit)"}
        precision.log.info("eval: dtype %s (model_args)", dtype)
        return dict(model_args), record
    chosen = precision.decide(request, precision.detect(device), training=False)
    precision.announce(chosen, "eval")
    return {**model_args, "dtype": chosen.dtype}, {"dtype": chosen.dtype, **chosen.record()}


def parse_model_args(text: str | None) -> dict:
    """"dtype=bfloat16,max_length=2048" -> {"dtype": "bfloat16", "max_length": 2048}
    (lm-eval's own parser)."""
    if not text:
        return {}
    from lm_eval.utils import simple_parse_args_string

    try:
        return simple_parse_args_string(text)
    except ValueError as e:
        raise UserError(f"--model-args {text}: {e}",
                        fix="key=value pairs separated by commas") from None


def _simple_evaluate(model: str, loaded: dict, hf_args: dict, settings: dict) -> dict:
    """lm-eval's `hf` model on `model`; its own code only (trust_remote_code stays off)."""
    import lm_eval
    import lm_eval.evaluator

    from solar_merge.checkpoints import remote_code_error

    lookup = lm_eval.evaluator.get_git_commit_hash
    lm_eval.evaluator.get_git_commit_hash = _git_commit_hash
    try:
        return lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": model, "trust_remote_code": False, **hf_args},
            tasks=_top_level(loaded), log_samples=False, **settings)
    except (OSError, ValueError) as e:
        if remote_code_error(model, e):
            raise remote_code_error(model, e) from None
        raise
    finally:
        lm_eval.evaluator.get_git_commit_hash = lookup


def _git_commit_hash() -> str | None:
    """results["git_hash"] as lm-eval finds it (`git describe --always`, else the current
    folder's .git/HEAD), with git's complaint outside a repository ("fatal: not a git
    repository") kept off the console: lm-eval lets git print it, once per model."""
    import subprocess

    from lm_eval.loggers.utils import get_commit_from_path

    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (subprocess.CalledProcessError, FileNotFoundError):
        return get_commit_from_path(os.getcwd())


def _top_level(loaded: dict) -> list:
    """The built tasks and groups, outermost first, for simple_evaluate (which accepts built
    objects, so each task's data is read once for all models)."""
    children = {c for kids in loaded.get("group_map", {}).values() for c in kids}
    groups = [g for name, g in loaded.get("groups", {}).items() if name not in children]
    grouped = set()
    for g in loaded.get("groups", {}).values():
        grouped |= {t.task_name for t in g.get_all_tasks()}
    tasks = [t for name, t in loaded["tasks"].items() if name not in grouped]
    return [*groups, *tasks]


def _contamination(spec: dict, loaded: dict, work: Path, base_dir) -> None:
    from solar_merge import contamination

    unknown = sorted(set(spec) - {"train", "n", "fail_above"})
    if unknown or not spec.get("train"):
        what = f"unknown key {', '.join(unknown)}" if unknown else "`train` is missing"
        raise UserError(f"contamination: {what}",
                        fix="contamination: {train: [DATASET, ...], n: 13, fail_above: PCT}")
    train = [_resolve(t, base_dir) for t in spec["train"]]
    report = contamination.check(train, contamination.documents(loaded["tasks"]),
                                 n=int(spec.get("n", contamination.N)))
    contamination.write_report(report, work)
    contamination.enforce(report, spec.get("fail_above"), where=str(work))


def _resolve(path: str, base_dir) -> str:
    p = Path(os.path.expanduser(str(path)))
    if not p.is_absolute() and base_dir is not None and (Path(base_dir) / p).exists():
        return str(Path(base_dir) / p)
    return str(path)


def _cached(folder: Path, key: str) -> dict | None:
    try:
        if json.loads((folder / ".key").read_text()) == key:
            return json.loads((folder / RESULTS).read_text())
    except (OSError, ValueError):
        pass
    return None


def _write_results(folder: Path, results: dict, key: str) -> None:
    """lm-eval's dict as its own CLI writes it (indent 2, its serializer); then the key that
    lets an interrupted run skip this model."""
    from lm_eval.utils import handle_non_serializable

    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (RESULTS + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=handle_non_serializable,
                              ensure_ascii=False))
    tmp.replace(folder / RESULTS)
    (folder / ".key").write_text(json.dumps(key))


def read_results(out, labels=None) -> dict[str, dict]:
    """{label: results dict} of a finished evaluation folder."""
    out = Path(out)
    names = list(labels) if labels else sorted(p.parent.name for p in out.glob(f"*/{RESULTS}"))
    return {label: json.loads((out / label / RESULTS).read_text()) for label in names}


# -- checks ----------------------------------------------------------------------------------

def model_labels(models, *, base_dir=None) -> dict[str, str]:
    """{label: model}: dict keys as given, else folder names (Hub ids: owner__name), made
    unique with -2, -3, ... Local paths become absolute (relative to base_dir if given)."""
    items = list(models.items()) if isinstance(models, dict) else [(None, m) for m in models]
    if not items:
        raise UserError("no model to evaluate", fix="name one or more model folders")
    out: dict[str, str] = {}
    for label, ref in items:
        ref = str(ref)
        path = Path(os.path.expanduser(ref))
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if path.exists():
            ref = str(path.absolute())
        base = label or (path.name if path.exists() else ref.replace("/", "__"))
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = ref
    return out


def check_model(ref: str, label: str) -> None:
    """A local model folder needs config.json, a tokenizer and safetensors weights."""
    from solar_merge.checkpoints import is_hub_id, require_safetensors

    path = Path(ref)
    if not path.exists():
        if is_hub_id(ref):  # lm-eval reads it from the Hub, or the cache
            from huggingface_hub import try_to_load_from_cache

            if not isinstance(try_to_load_from_cache(ref, "config.json"), str) \
                    and catalog.offline():
                raise UserError(f"model `{label}`: {ref} is not in the local Hugging Face "
                                "cache and the Hub cannot be reached now",
                                fix=f"online: `hf download {ref}` (or give a local folder)")
            return
        raise UserError(f"model `{label}`: {ref} not found",
                        fix="give a model folder (save_pretrained) or a Hub id owner/name")
    if not (path / "config.json").is_file():
        raise UserError(f"model `{label}`: {path} has no config.json, so it is not a model "
                        "folder", fix="point to a folder saved with save_pretrained()")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise UserError(f"model `{label}`: {path} has no tokenizer (none of "
                        f"{', '.join(_TOKENIZER_FILES)})",
                        fix="save the tokenizer into the folder (tokenizer.save_pretrained), "
                            "e.g. copy it from the base model")
    require_safetensors(path)


def _check_options(names, num_fewshot, limit, batch_size) -> None:
    if num_fewshot is not None and num_fewshot < 0:
        raise UserError(f"num_fewshot is {num_fewshot}", fix="give 0 or more")
    if num_fewshot is not None and "h6" in names:
        raise UserError("h6 fixes its own shots (25/10/5/0/5/5, as the leaderboard); "
                        "num_fewshot would change what it measures",
                        fix="drop --num-fewshot, or name the tasks one by one")
    if limit is not None and not (limit > 0):
        raise UserError(f"limit is {limit}",
                        fix="give a number of documents (or a share below 1)")
    if not (batch_size == "auto" or (isinstance(batch_size, int) and batch_size >= 1)):
        raise UserError(f"batch_size is {batch_size!r}", fix="give 1 or more, or auto")


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


# -- one table for all models ------------------------------------------------------------------

def table(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{label: {column: value}}. Columns are "task metric" for every task in the results that
    no aggregating group contains (a group with its own metrics, like mmlu, stands for its
    subtasks), standard errors left out; with h6, its leaderboard scores instead of its
    members' raw metrics (`h6_scores`)."""
    out = {}
    for label, res in results.items():
        row: dict[str, float] = {}
        subtasks = res.get("group_subtasks", {})
        hidden = set()
        for group in subtasks:
            if _metrics(res["results"].get(group, {})) or group == "h6":
                hidden |= _descendants(group, subtasks)
        if "h6" in subtasks:
            hidden.add("h6")
            row.update({f"h6 {k}": v for k, v in h6_scores(res).items()})
        for task, values in res["results"].items():
            if task in hidden:
                continue
            for key, value in _metrics(values).items():
                row[f"{task} {key}"] = value
        out[label] = row
    return out


def _metrics(values: dict) -> dict[str, float]:
    return {k: v for k, v in values.items() if "," in k and "_stderr" not in k
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _descendants(group: str, subtasks: dict) -> set[str]:
    found = set()
    for kid in subtasks.get(group, []):
        found |= {kid} | _descendants(kid, subtasks)
    return found


def h6_scores(res: dict) -> dict[str, float]:
    """The Open LLM Leaderboard v1 numbers (in %) from an h6 results dict: ARC acc_norm,
    HellaSwag acc_norm, MMLU acc as the unweighted mean of its 57 subjects (the leaderboard
    averaged the hendrycksTest-* tasks; lm-eval's own mmlu row weights by size), TruthfulQA
    mc2, Winogrande acc, GSM8K exact match (flexible-extract), and their mean."""
    results, subtasks = res["results"], res.get("group_subtasks", {})
    scores = {}
    for task, (_, metric) in catalog.H6.items():
        if task in subtasks:
            leaves = [t for t in _descendants(task, subtasks) if t not in subtasks]
            values = [results[t][metric] for t in leaves if metric in results.get(t, {})]
            if values:
                scores[task] = 100 * sum(values) / len(values)
        elif metric in results.get(task, {}):
            scores[task] = 100 * results[task][metric]
    if len(scores) == len(catalog.H6):
        scores["average"] = sum(scores.values()) / len(scores)
    return scores


def score(results: dict, task: str, metric: str | None = None) -> float:
    """One number for one model: `metric` of `task` (default PRIMARY[task], else the task's
    first metric); for h6, the leaderboard average. Direction: `higher_is_better`."""
    if task == "h6":
        value = h6_scores(results).get(metric or "average")
    else:
        values = results["results"].get(task, {})
        metric = metric or PRIMARY.get(task) or next(iter(_metrics(values)), None)
        value = values.get(metric)
    if value is None:
        there = ", ".join(_metrics(results["results"].get(task, {}))) or "none"
        raise UserError(f"no `{metric}` for task `{task}` in these results",
                        fix=f"metrics there: {there}")
    return float(value)


def higher_is_better(results: dict, task: str, metric: str | None = None) -> bool:
    """Whether a larger `score` is better (lm-eval's own flag for the metric)."""
    if task == "h6":
        return True
    metric = (metric or PRIMARY.get(task) or next(iter(_metrics(results["results"][task])))
              ).split(",")[0]
    return bool(results.get("higher_is_better", {}).get(task, {}).get(metric, True))


def write_table(results: dict[str, dict], folder) -> dict[str, dict[str, float]]:
    """results.md, results.csv, results.png and metrics.json in `folder`; return the table."""
    folder = Path(folder)
    rows = table(results)
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    (folder / METRICS).write_text(json.dumps(rows, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", *columns])
    writer.writerows([label, *(row.get(c, "") for c in columns)] for label, row in rows.items())
    (folder / "results.csv").write_text(buf.getvalue())
    results_table(results).write(folder / "results.md")
    _plot(rows, columns, folder / "results.png")
    return rows


def results_table(results: dict[str, dict]):
    """`table(results)` as a tables.Table: columns ranked by lm-eval's own `higher_is_better`
    (h6's leaderboard scores: higher), headers without lm-eval's `,none` filter, and a note
    with lm-eval's version, the shots and the limit."""
    from solar_merge.tables import Table

    rows = table(results)
    columns = list(dict.fromkeys(c for row in rows.values() for c in row))
    better = {c: True for c in columns if c.startswith("h6 ")}
    for c in columns:
        task, _, metric = c.partition(" ")
        for res in results.values():
            flag = res.get("higher_is_better", {}).get(task, {}).get(metric.split(",")[0])
            if isinstance(flag, bool):
                better.setdefault(c, flag)

    some = next(iter(results.values()), {})
    notes = []
    if some:
        notes.append(f"lm-evaluation-harness {some.get('lm_eval_version', '?')}; shots: "
                     + ", ".join(f"{t} {k}" for t, k in some.get("n-shot", {}).items()
                                 if not t.startswith("mmlu_"))
                     + (f"; limit {some['config'].get('limit')}"
                        if some.get("config", {}).get("limit") else ""))
    return Table(rows, better=better, headers={c: header(c) for c in columns}, notes=notes)


def header(column: str) -> str:
    """A table column as a person reads it: `task metric` without lm-eval's `,none` filter,
    another filter in parentheses (`solar_arith exact_match (flexible-extract)`)."""
    label = column.replace(",none", "")
    return label.replace(",", " (", 1) + ")" if "," in label else label


def read_table(out):
    """The table of a finished evaluation folder: metrics.json's rows, ranked and noted as
    `results_table` does from its models' results.json."""
    out = Path(out)
    rows = json.loads((out / METRICS).read_text())
    found = {label: json.loads((out / label / RESULTS).read_text()) for label in rows
             if (out / label / RESULTS).is_file()}
    ranked = results_table(found)
    ranked.rows = rows
    return ranked


def _plot(rows: dict, columns: list[str], path: Path) -> None:
    """Bar charts of the table; none where matplotlib is not installed (docs/gpu.md)."""
    try:
        import matplotlib
    except ImportError:
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(columns), 1)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, squeeze=False,
                             figsize=(4.5 * cols, 3.2 * ((n + cols - 1) // cols)))
    labels = list(rows)
    for ax, column in zip(axes.flat, columns):
        values = [rows[m].get(column) for m in labels]
        xs = [i for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [values[i] for i in xs])
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35, ha="right", fontsize=7)
        ax.set_title(re.sub(r",none$", "", column), fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    for ax in list(axes.flat)[len(columns):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- the Hub's model-index ---------------------------------------------------------------------

def eval_results(results: dict) -> list:
    """huggingface_hub EvalResults (the card's `model-index`, which the Hub shows) for one
    model's lm-eval results: one per table column, with the data set, shots and source."""
    from huggingface_hub import EvalResult

    source = {"source_name": "lm-evaluation-harness",
              "source_url": "https://github.com/EleutherAI/lm-evaluation-harness"}
    out = []
    for column, value in table({"m": results})["m"].items():
        task, _, metric = column.partition(" ")
        if task == "h6":  # the leaderboard's numbers, in %, as its model cards show them
            sub = metric if metric in catalog.H6 else None
            configs, kids = results.get("configs", {}), results.get("group_subtasks", {})
            cfg = configs.get(sub) or next(  # a group (mmlu): its subjects' data set
                ({"dataset_path": configs[t].get("dataset_path")} for t in
                 sorted(_descendants(sub, kids)) if t in configs), {}) if sub else {}
            shots = catalog.H6[sub][0] if sub else None
            kind = {"truthfulqa_mc2": "mc2"}.get(sub, catalog.H6[sub][1].split(",")[0]
                                                 if sub else "average")
            out.append(EvalResult(
                task_type="text-generation", dataset_type=cfg.get("dataset_path", "h6"),
                dataset_name=f"{sub} ({shots}-shot)" if sub else "Open LLM Leaderboard v1 (h6)",
                dataset_config=cfg.get("dataset_name"),
                dataset_split=cfg.get("test_split") or cfg.get("validation_split"),
                dataset_args={"num_few_shot": shots} if sub else None,
                metric_type=kind, metric_value=round(value, 2), **source))
            continue
        cfg = results.get("configs", {}).get(task, {})
        shots = results.get("n-shot", {}).get(task)
        out.append(EvalResult(
            task_type="text-generation", dataset_type=cfg.get("dataset_path") or task,
            dataset_name=task, dataset_config=cfg.get("dataset_name"),
            dataset_split=cfg.get("test_split") or cfg.get("validation_split"),
            dataset_args={"num_few_shot": shots} if shots is not None else None,
            metric_type=metric.split(",")[0], metric_name=metric,
            metric_value=round(float(value), 6), **source))
    return out
