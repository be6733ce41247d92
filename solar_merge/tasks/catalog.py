"""Which tasks exist and how to load them: ours (this folder), a user's `--include-path`
folders, and lm-eval's own registry, through lm-eval's `TaskManager`.

lm-eval indexes its ~14,700 built-in tasks in ~12 s on 2 cores, so a request is first tried
against a small index (ours, the user's folders and, for `h6`, the six lm-eval folders it
uses); only a name found nowhere there pays for the whole index (and gets a did-you-mean
from it). Loading a task reads its data: ours from data/, lm-eval's from the Hub or the
datasets cache; offline without a cache that is one UserError that names the data sets.
"""

import logging
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

from solar_merge.errors import UserError, did_you_mean

TASKS_DIR = Path(__file__).resolve().parent
OURS = ("solar_manual_ppl", "solar_manual_qa", "solar_arith")

# The Open LLM Leaderboard v1 set the SOLAR paper reports (h6.yaml): the leaf task (or group)
# -> its shots and the metric the leaderboard averaged.
H6 = {"arc_challenge": (25, "acc_norm,none"), "hellaswag": (10, "acc_norm,none"),
      "mmlu": (5, "acc,none"), "truthfulqa_mc2": (0, "acc,none"),
      "winogrande": (5, "acc,none"), "gsm8k": (5, "exact_match,flexible-extract")}
_H6_FOLDERS = ("arc", "hellaswag", "mmlu/default", "truthfulqa", "winogrande", "gsm8k")


def split_names(tasks) -> list[str]:
    """"a,b" or ["a", "b,c"] -> ["a", "b", "c"] (order kept, duplicates dropped)."""
    if isinstance(tasks, str):
        tasks = [tasks]
    names = [n.strip() for t in tasks or () for n in str(t).split(",") if n.strip()]
    if not names:
        raise UserError("no task given", fix=f"e.g. --tasks {','.join(OURS)} (or h6)")
    return list(dict.fromkeys(names))


def include_paths(include_path) -> list[Path]:
    """The user's task folders (one path or a list), checked to exist."""
    if include_path is None:
        return []
    paths = [include_path] if isinstance(include_path, (str, os.PathLike)) else include_path
    out = []
    for p in paths:
        try:
            path = Path(os.path.expanduser(str(p))).absolute()
            is_dir = path.is_dir()
        except (OSError, ValueError):  # e.g. a NUL byte in the name
            is_dir = False
        if not is_dir:
            raise UserError(f"--include-path {p}: no such folder",
                            fix="give a folder of lm-eval task YAML files")
        if not any(path.rglob("*.yaml")):
            raise UserError(f"--include-path {p}: no task YAML (*.yaml) in it",
                            fix="give a folder of lm-eval task YAML files")
        out.append(path)
    return out


def task_manager(names, include_path=None):
    """A TaskManager that knows every name in `names`, else a UserError with did-you-mean."""
    user = tuple(include_paths(include_path))
    folders = (TASKS_DIR, *user)
    if "h6" in names:
        lm_tasks = _lm_eval_tasks_dir()
        folders += tuple(lm_tasks / f for f in _H6_FOLDERS if (lm_tasks / f).is_dir())
    small = _manager(folders, False)
    if all(n in small.all_tasks for n in names):
        return small
    full = _manager((TASKS_DIR, *user), True)
    unknown = [n for n in names if n not in full.all_tasks]
    if unknown:
        hints = "; ".join(f"`{n}`{did_you_mean(n, full.all_tasks) or ' (no close name)'}"
                          for n in unknown)
        raise UserError(f"unknown task: {hints}",
                        fix=f"ours: {', '.join(OURS)} (tag `solar`), `h6`; "
                            "`lm_eval ls tasks` lists lm-eval's; --include-path DIR adds yours")
    return full


@lru_cache(maxsize=8)
def _manager(folders: tuple, include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(f) for f in folders],
                       include_defaults=include_defaults)


def _lm_eval_tasks_dir() -> Path:
    import importlib.util

    return Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks"


def load(names, include_path=None) -> tuple:
    """(TaskManager, lm-eval's TaskDict {"tasks": {name: Task}, "groups": ..., "group_map":
    ...}) for `names`; their data are read now, so a missing data set fails here, before any
    model is loaded."""
    tm = task_manager(names, include_path)
    logging.getLogger("lm_eval.api.task").addFilter(_no_metadata_hint)
    try:
        with _offline_if_unreachable(hub_datasets(names, tm)):
            return tm, tm.load(list(names))
    except Exception as e:  # datasets and huggingface_hub raise many kinds for "no data"
        if not _is_missing_data(e):
            raise
        raise missing_data_error(names, tm, e) from None


def _no_metadata_hint(record) -> bool:
    """lm-eval warns about `--metadata` for every task that loads its data with a function
    (`custom_dataset`): all of ours do, and they take no metadata."""
    return "Custom kwargs can be passed" not in record.getMessage()


def _offline_flag() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes", "on")
               for v in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@contextmanager
def _offline_if_unreachable(needed):
    """When tasks need Hub data and the Hub does not answer (3 s), tell datasets and
    huggingface_hub they are offline: they then read their cache or fail at once, instead of
    retrying each request for ~25 s."""
    if not needed or _offline_flag() or not offline():
        yield
        return
    import datasets.config
    from huggingface_hub import constants

    saved = datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def offline() -> bool:
    """True when the Hub cannot be used now: HF_*_OFFLINE set, or its host does not answer
    within 3 s."""
    return _offline_flag() or not _hub_answers()


def _hub_answers() -> bool:
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _is_missing_data(e: Exception) -> bool:
    text = f"{type(e).__name__}: {e}"
    return isinstance(e, (ConnectionError, FileNotFoundError, TimeoutError)) or any(
        k in text for k in ("Offline", "offline", "LocalEntryNotFound", "Couldn't reach",
                            "DatasetNotFound", "not be found on the Hugging Face Hub"))


def missing_data_error(names, tm, e: Exception) -> UserError:
    """Name every Hub data set the tasks need and how to fetch them into the cache."""
    needed = hub_datasets(names, tm)
    listing = "\n    ".join(path + _subsets(subsets) for path, subsets in sorted(needed.items()))
    home = os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
    why = ("HF_DATASETS_OFFLINE/HF_HUB_OFFLINE is set" if _offline_flag()
           else "the Hub is not reachable") + f" ({type(e).__name__})"
    return UserError(
        f"tasks {', '.join(names)} need these Hugging Face data sets, which are not in the "
        f"local cache and cannot be downloaded now: {why}\n    {listing}",
        fix=f"on a machine with network run `solar-merge eval --prefetch --tasks "
            f"{','.join(names)}` (it fills the Hugging Face cache {home}, datasets/ and hub/, "
            "and loads no model), copy that folder here (or point HF_HOME at it), then run "
            "with HF_DATASETS_OFFLINE=1")


def _subsets(subsets: set[str]) -> str:
    names = sorted(subsets)
    if len(names) > 4:
        return f" ({len(names)} subsets: {', '.join(names[:3])}, ...)"
    return f" ({', '.join(names)})" if names else ""


def hub_datasets(names, tm) -> dict[str, set[str]]:
    """Hub data set -> subsets used by the tasks behind `names` (groups and tags followed),
    read from the task configs without loading anything."""
    index = tm.task_index
    found: dict[str, set[str]] = {}
    seen: set[str] = set()

    def visit(name):
        if name in seen or name not in index:
            return
        seen.add(name)
        entry = index[name]
        cfg = entry.cfg or {}
        members = [m if isinstance(m, str) else m.get("task") or m.get("group")
                   for m in (cfg.get("task") if isinstance(cfg.get("task"), list) else [])]
        for m in [*members, *(entry.tags if entry.kind.name == "TAG" else ())]:
            visit(m)
        if isinstance(cfg.get("dataset_path"), str) and not cfg.get("custom_dataset"):
            subsets = found.setdefault(cfg["dataset_path"], set())
            if cfg.get("dataset_name"):
                subsets.add(str(cfg["dataset_name"]))

    for n in names:
        visit(n)
    return found
