"""Model cards, recipe extraction and `push`: how recipes and models travel through the Hub.

Every output folder carries a `README.md` model card built with `huggingface_hub`'s
ModelCard/ModelCardData, plus the exact YAML that produced it beside the card
(`recipe.yaml`, `mergekit_config.yml` or `stage_config.yaml`) and again, verbatim, in a fenced
block under `## Recipe`, so that the card alone is enough to get the recipe back.

Decisions (documented here, tested in tests/test_hub.py):
- `base_model` holds Hub ids only. A local input folder is never named in the metadata; its
  own card's `base_model` is inherited instead (the public ancestry of an intermediate stage).
  In the body, local inputs appear by folder name only, never by absolute path.
- `base_model_relation`: "merge" for mergekit-made outputs (merge, dus, expand), "finetune"
  for training stages, unset for a whole recipe's final card.
- `license`: the one given; else the license found in the base models' cards (local
  folders, or a Hub model's card already in the local HF cache, no network) when they all
  agree; else "other" (the Hub's value for "see the base models"), with a note in the body.
- `datasets`: Hub dataset ids only; local files appear in the body by file name.
- `push` refuses a folder without `config.json` (unless its card is a dataset card: then it is
  uploaded as a dataset repo), a `.partial` work folder, and a folder whose
  card says solar-merge wrote it but has no completion marker (unfinished). A model folder
  from elsewhere (no solar-merge card, no marker) is pushed with a warning.
- The token is never written anywhere and never shown: error messages are scrubbed, and a
  folder that contains the token in any small text file is refused before any upload.
- `huggingface_hub` is imported inside functions (fast CLI).
"""

import glob
import logging
import os
import re
from importlib import metadata
from pathlib import Path

from solar_merge.checkpoints import is_hub_id
from solar_merge.errors import UserError
from solar_merge.outputs import MARKER
from solar_merge.readers import read_text

log = logging.getLogger(__name__)

KINDS = ("merge", "dus", "expand", "cpt", "sft", "dpo", "stepwise_dpo", "recipe")
RECIPE_FILES = ("recipe.yaml", "mergekit_config.yml", "stage_config.yaml")
BASE_TAGS = ["mergekit", "merge", "solar-merge"]
VERSIONED = ("solar-merge", "mergekit", "transformers", "trl", "torch", "huggingface_hub")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt", ".csv")
_RELATION = {"merge": "merge", "dus": "merge", "expand": "merge", "cpt": "finetune",
             "sft": "finetune", "dpo": "finetune", "stepwise_dpo": "finetune"}
_NO_TOKEN_FIX = "run `hf auth login` or set HF_TOKEN to a token with write access"


# -- model cards --

def write_card(out_dir, *, kind: str, source_yaml: str, source_name: str,
               base_models: list[str], lineage: list[dict] | None = None,
               datasets: list[str] | None = None,
               eval_table: dict[str, dict[str, float]] | None = None,
               license: str | None = None, merge_method: str | None = None,
               description: str | None = None,
               extra_tags: list[str] | tuple[str, ...] = (),
               sections: dict[str, list[str]] | None = None,
               eval_results: list | None = None) -> Path:
    """Write `out_dir/README.md` (a Hub model card) and `out_dir/source_name`; return the card.

    eval_table: row (model or stage) -> column (metric) -> value.
    eval_results: huggingface_hub EvalResults of this model (solar_merge.eval.eval_results),
    written as the card's `model-index`, which the Hub shows as evaluation results.
    lineage: [{"stage": name, "kind": kind, "inputs": [model refs]}], in run order.
    extra_tags: appended to the tags (mergekit, merge, solar-merge, kind), duplicates dropped.
    sections: heading -> markdown lines, placed before `## Recipe` (e.g. a training stage's
    data checksums and loss curve).
    """
    from huggingface_hub import ModelCard, ModelCardData

    if kind not in KINDS:
        raise UserError(f"unknown model card kind `{kind}`", fix=f"use one of {', '.join(KINDS)}")
    if Path(source_name).name != source_name or not source_name:
        raise UserError(f"source_name `{source_name}` must be a plain file name",
                        fix="e.g. recipe.yaml")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    readme = out_dir / "README.md"
    method_lines = _mergekit_method_lines(readme) if merge_method else []

    hub_bases = _hub_base_models(base_models)
    licenses = _base_licenses(base_models)
    license_note = None
    if not license:
        if len(licenses) == 1:
            license = licenses.pop()
        else:
            license = "other"
            license_note = ("The license could not be determined from the base models"
                            + (f" (they disagree: {', '.join(sorted(licenses))})" if licenses
                               else "") + ": check each base model's license before use.")
    hub_datasets = [d for d in datasets or [] if _is_hub_dataset(d)]
    extra = {"base_model_relation": _RELATION[kind]} if hub_bases and kind in _RELATION else {}
    data = ModelCardData(
        base_model=hub_bases or None,
        datasets=hub_datasets or None,
        library_name="transformers",
        license=license,
        pipeline_tag="text-generation",
        tags=_tags(kind, extra_tags),
        **extra,
    )

    name = _final_name(out_dir)
    if eval_results:
        data.model_name, data.eval_results = name, list(eval_results)
    body = [f"# {name}", ""]
    if description:
        body += [description.strip(), ""]
    body += [(f"Produced by solar-merge (`{kind}`), a declarative SOLAR-style pipeline on "
              "[mergekit](https://github.com/arcee-ai/mergekit) and TRL."), ""]
    if merge_method:
        body += ["## Merge method", ""]
        body += method_lines or [(f"This model was merged with mergekit's `{merge_method}` "
                                  "merge method.")]
        body += [""]
    body += ["## Lineage", "", *_lineage_table(lineage, base_models, kind, name), ""]
    if datasets:
        body += ["## Training data", ""]
        body += [f"- {_display(d, dataset=True)}" for d in datasets]
        body += [""]
    if eval_table:
        body += ["## Evaluation", "", *_eval_markdown(eval_table), ""]
    if license_note:
        body += ["## License", "", license_note, ""]
    for heading, lines in (sections or {}).items():
        body += [f"## {heading}", "", *lines, ""]
    fence = _fence_for(source_yaml)
    body += ["## Recipe", "",
             (f"The exact configuration that produced this model (also in `{source_name}`; "
              "`solar-merge recipes extract` writes it back out):"), "",
             f"{fence}yaml", source_yaml.rstrip("\n"), fence, ""]
    body += ["## Versions", "", "| package | version |", "| --- | --- |"]
    body += [f"| {pkg} | {_version(pkg)} |" for pkg in VERSIONED]
    body += [""]

    text = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)
    text = _scrub(text)
    card = ModelCard(text)
    (out_dir / source_name).write_text(source_yaml if source_yaml.endswith("\n")
                                       else source_yaml + "\n")
    card.save(readme)
    return readme


def _tags(kind: str, extra_tags) -> list[str]:
    tags: list[str] = []
    for tag in (*BASE_TAGS, kind, *(extra_tags or ())):
        if tag and str(tag) not in tags:
            tags.append(str(tag))
    return tags


def _final_name(out_dir: Path) -> str:
    """The folder's name; for a work folder `.NAME.partial` (outputs.atomic_output), NAME."""
    name = out_dir.absolute().name
    if name.startswith(".") and name.endswith(".partial"):
        return name[1:-len(".partial")]
    return name


def _mergekit_method_lines(readme: Path) -> list[str]:
    """The sentence(s) naming the merge method in the README mergekit wrote, if any."""
    if not readme.is_file():
        return []
    try:
        text = readme.read_text()
    except (OSError, UnicodeDecodeError):
        return []
    if "mergekit" not in text:
        return []
    # mergekit names local models by absolute path ("... using /home/me/base as a base")
    return [_ABS_PATH.sub(lambda m: f"`{m.group(1)}`", line.strip())
            for line in text.splitlines()
            if "merge method" in line.lower() and not line.lstrip().startswith("#")]


_ABS_PATH = re.compile(r"(?<![\w/:.~])[~]?/(?:[^\s/()\[\]`]+/)*([^\s/()\[\]`]+)/?")


def _read_front_matter(folder: Path) -> dict:
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    try:
        from huggingface_hub import ModelCard

        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception:  # noqa: BLE001 - a broken foreign card just contributes nothing
        return {}


def _as_list(value) -> list[str]:
    if not value:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _hub_base_models(models: list[str]) -> list[str]:
    """Hub ids among `models`; local folders contribute their own card's Hub base models."""
    out: list[str] = []
    for ref in models or []:
        if is_hub_id(ref):
            found = [ref]
        else:
            folder = Path(os.path.expanduser(ref))
            found = _as_list(_read_front_matter(folder).get("base_model")) if folder.is_dir() \
                else []
        out += [m for m in found if m not in out and is_hub_id(m)]
    return out


def _base_licenses(models: list[str]) -> set[str]:
    licenses = set()
    for ref in models or []:
        if is_hub_id(ref):
            front = {}
            try:
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(ref, "README.md")
                if isinstance(cached, str):
                    front = _read_front_matter(Path(cached).parent)
            except Exception:  # noqa: BLE001 - cache lookups never fail a card
                front = {}
        else:
            folder = Path(os.path.expanduser(ref))
            front = _read_front_matter(folder) if folder.is_dir() else {}
        if front.get("license") and front["license"] != "other":
            licenses.add(str(front["license"]))
    return licenses


def _is_hub_dataset(name: str) -> bool:
    name = str(name)
    if name.endswith(DATA_SUFFIXES) or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    return name.count("/") == 1 or ("/" not in name and ":" not in name)


def _display(ref: str, *, dataset: bool = False) -> str:
    """A Hub id as a link; a local path by its last component only."""
    ref = str(ref)
    if (dataset and _is_hub_dataset(ref)) or (not dataset and is_hub_id(ref)):
        kind = "datasets/" if dataset else ""
        return f"[{ref}](https://huggingface.co/{kind}{ref})"
    return f"`{Path(ref.rstrip('/')).name or ref}` (local)"


def _lineage_table(lineage, base_models, kind, name) -> list[str]:
    rows = lineage or [{"stage": name, "kind": kind, "inputs": list(base_models or [])}]
    lines = ["| stage | kind | inputs |", "| --- | --- | --- |"]
    for row in rows:
        inputs = ", ".join(_display(r) for r in row.get("inputs") or []) or "-"
        lines.append(f"| {row.get('stage', '?')} | {row.get('kind', '?')} | {inputs} |")
    return lines


def _eval_markdown(table: dict[str, dict[str, float]]) -> list[str]:
    columns: list[str] = []
    for row in table.values():
        columns += [c for c in row if c not in columns]
    lines = ["| model | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name, row in table.items():
        cells = [_fmt(row[c]) if c in row else "-" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _fence_for(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`{3,}", text)), default=0)
    return "`" * max(3, longest + 1)


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


# -- recipes back out of cards --

_RECIPE_HEADING = re.compile(r"##[ \t]+Recipe[ \t]*")
_YAML_FENCE = re.compile(r"(`{3,})[ \t]*ya?ml[ \t]*")


def recipe_from_card(text: str, *, label: str = "model card") -> str:
    """The fenced YAML block under the last `## Recipe` heading of a model card's text (the
    last: a description may quote one). One pass over the lines: a regular expression with two
    lazy `.*?` takes quadratic time on a card of unclosed blocks."""
    lines = text.splitlines(keepends=True)
    body, i = None, 0
    while i < len(lines):
        if not _RECIPE_HEADING.fullmatch(lines[i].rstrip("\r\n")):
            i += 1
            continue
        opening = next((j for j in range(i + 1, len(lines))
                        if _YAML_FENCE.fullmatch(lines[j].rstrip("\r\n"))), None)
        if opening is None:
            break
        fence = _YAML_FENCE.fullmatch(lines[opening].rstrip("\r\n")).group(1)
        closing = next((k for k in range(opening + 1, len(lines))
                        if lines[k].rstrip("\r\n").rstrip(" \t") == fence), None)
        if closing is None:
            break
        body = "".join(lines[opening + 1:closing])
        i = closing + 1
    if body is None:
        raise UserError(f"{label} has no `## Recipe` section with a ```yaml block",
                        fix="give a folder or repo written by solar-merge, or the recipe "
                            "file itself")
    return body


def extract_recipe(dir_or_repo) -> str:
    """The YAML that produced a folder or Hub repo: the file beside the card, else the card's."""
    ref = str(dir_or_repo)
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        for name in RECIPE_FILES:
            if (path / name).is_file():
                return read_text(path / name, what="recipe")
        if (path / "README.md").is_file():
            return recipe_from_card(read_text(path / "README.md", what="model card"),
                                    label=str(path / "README.md"))
        raise UserError(f"{path} has no recipe: none of {', '.join(RECIPE_FILES)} or README.md",
                        fix="give an output folder written by solar-merge")
    if path.is_file():
        text = read_text(path, what="model card" if path.suffix == ".md" else "recipe")
        return recipe_from_card(text, label=str(path)) if path.suffix == ".md" else text
    if is_hub_id(ref):
        return _extract_from_hub(ref)
    raise UserError(f"`{ref}` is neither a local folder nor a Hub repo id `owner/name`",
                    fix="check the path, or give a Hub model repo id")


def _extract_from_hub(repo_id: str) -> str:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    unreachable = None
    for name in (*RECIPE_FILES, "README.md"):
        try:
            local = hf_hub_download(repo_id, name)
        except GatedRepoError:
            raise UserError(f"Hub repo {repo_id} is gated", fix="request access on its page, "
                            "then `hf auth login`") from None
        except RepositoryNotFoundError:
            raise UserError(f"Hub model repo {repo_id} not found (or private)",
                            fix="check the repo id, or `hf auth login` for a private repo"
                            ) from None
        except LocalEntryNotFoundError as e:  # offline / unreachable and not cached
            unreachable = e
            continue
        except EntryNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - network errors of every kind
            unreachable = e
            continue
        text = read_text(local, what="model card" if name == "README.md" else "recipe")
        if name == "README.md":
            return recipe_from_card(text, label=f"the model card of {repo_id}")
        return text
    if unreachable is not None:
        raise UserError(f"could not read the recipe of {repo_id} from the Hub: "
                        + _scrub(f"{type(unreachable).__name__}: {unreachable}"),
                        fix="check your connection (or unset HF_HUB_OFFLINE), or download "
                            "the folder and give its local path") from None
    raise UserError(f"Hub repo {repo_id} has no recipe ({', '.join(RECIPE_FILES)}) and no card",
                    fix="give a repo written by solar-merge")


def recipe_for(source: str, target_dir) -> tuple[str, str]:
    """(YAML text, label) of SOURCE's recipe, to be stored in `target_dir`: paths in a recipe
    read from a local output folder are relative to that folder, so they are rewritten
    relative to where the copy will live (recipes from the Hub or a URL name no local paths
    of yours and are returned as they are)."""
    import yaml

    from solar_merge.outputs import relocate

    text, label = load_recipe_text(source)
    folder = Path(os.path.expanduser(str(source)))
    folder = folder if folder.is_dir() else folder.parent if folder.is_file() else None
    if folder is None or folder.absolute() == Path(target_dir).absolute():
        return text, label
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return text, label  # not ours to fix here: `run`/`yaml` report it with its line
    if not isinstance(data, dict):
        return text, label
    names = set(data.get("stages") or {}) if isinstance(data.get("stages"), dict) else set()
    moved = relocate(data, folder, target_dir, names=names)
    if moved == data:
        return text, label
    head = "".join(line for line in text.splitlines(keepends=True)[:3]
                   if line.startswith("#"))
    if "out" in data and isinstance(data["out"], str):
        moved["out"] = os.path.relpath(folder / data["out"], Path(target_dir).absolute())
    return head + yaml.safe_dump(moved, sort_keys=False), label


def load_recipe_text(source: str) -> tuple[str, str]:
    """(YAML text, label) from a local file or folder, an http(s) URL or a Hub repo id."""
    source = str(source)
    if source.startswith(("http://", "https://")):
        repo = _hub_url_repo(source)
        if repo:
            return extract_recipe(repo), source
        text = _fetch_url(_raw_hub_url(source))
        if source.split("?")[0].endswith(".md"):
            text = recipe_from_card(text, label=source)
        return text, source
    path = Path(os.path.expanduser(source))
    if path.exists() or not is_hub_id(source):
        if not path.exists():
            raise UserError(f"recipe `{source}` not found",
                            fix="give a recipe file, an output folder, an http(s) URL or a "
                                "Hub repo id `owner/name`")
        return extract_recipe(path), str(path)
    return extract_recipe(source), f"hf://{source}"


_HUB_REPO_URL = re.compile(r"^https://huggingface\.co/(?P<repo>[\w.-]+/[\w.-]+)/?$")


def _hub_url_repo(url: str) -> str | None:
    match = _HUB_REPO_URL.match(url.split("?")[0].split("#")[0])
    if not match or match.group("repo").split("/")[0] in ("datasets", "spaces"):
        return None
    return match.group("repo")


def _raw_hub_url(url: str) -> str:
    """A Hub file page (`/blob/`) shows HTML; its raw text lives under `/resolve/`."""
    return re.sub(r"^(https://huggingface\.co/[^/]+/[^/]+)/blob/", r"\1/resolve/", url)


def _fetch_url(url: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=30) as response:  # http(s) only, checked by the caller
            return response.read().decode("utf-8")
    except (urllib.error.URLError, OSError, ValueError, UnicodeDecodeError) as e:
        reason = getattr(e, "reason", None) or e
        raise UserError(f"could not download the recipe from {url}: {reason}",
                        fix="check the URL and your connection, or download the file and "
                            "give its local path") from None


# -- push --

def upload_list(folder) -> list[tuple[str, int]]:
    """(relative posix path, size) of every file `push` uploads, sorted."""
    folder = Path(folder)
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not _skipped_dir(d))
        for name in names:
            if _skipped_file(name):
                continue
            full = Path(root) / name
            if full.is_file():
                files.append((full.relative_to(folder).as_posix(), full.stat().st_size))
    return sorted(files)


def _skipped_dir(name: str) -> bool:
    return (name.startswith((".", "checkpoint-")) or name.endswith(".partial")
            or name == "__pycache__")


def _skipped_file(name: str) -> bool:
    return name.startswith(".") or name.endswith((".partial", ".lock", ".pyc"))


def repo_type(folder) -> str:
    """"dataset" for a data folder with a dataset card (its front matter names the data files
    as `configs`, as `solar-merge synth-math` writes), else "model"."""
    folder = Path(folder)
    if (folder / "config.json").is_file() or not (folder / "README.md").is_file():
        return "model"
    meta = _read_front_matter(folder)
    return "dataset" if meta.get("configs") or meta.get("dataset_info") else "model"


def _check_pushable(folder: Path) -> str:
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder", fix="give the output folder of a stage")
    if folder.name.endswith(".partial"):
        raise UserError(f"{folder} is an unfinished work folder (.partial)",
                        fix="finish the run (re-run it; it resumes), then push the final folder")
    kind = repo_type(folder)
    if kind == "model" and not (folder / "config.json").is_file():
        raise UserError(f"{folder} has no config.json: not a model folder (nor a data folder "
                        "with a dataset card)",
                        fix="push the output folder of a merge, training or synth-math stage")
    if not (folder / MARKER).is_file():
        tags = _as_list(_read_front_matter(folder).get("tags"))
        if "solar-merge" in tags:
            raise UserError(f"{folder} was written by solar-merge but has no completion marker "
                            f"({MARKER}): it is unfinished",
                            fix="re-run the stage that writes it, then push")
        log.warning("%s has no solar-merge completion marker; pushing it as a plain %s "
                    "folder", folder, kind)
    return kind


def _token_in_files(folder: Path, files, token: str) -> str | None:
    for rel, size in files:
        if size <= 4_000_000 and Path(rel).suffix in (".md", ".json", ".yaml", ".yml", ".txt",
                                                      ".jinja", ".py", ""):
            try:
                if token in (folder / rel).read_text(errors="ignore"):
                    return rel
            except OSError:
                continue
    return None


def push(folder, repo_id: str, *, private: bool = False,
         dry_run: bool = False) -> list[tuple[str, int]]:
    """Create `repo_id` (if needed) and upload `folder` in one commit; return what was sent.
    A data folder with a dataset card (`repo_type`) goes to a dataset repo, anything else to a
    model repo.

    dry_run: only list the files (relative path, size), no token and no network needed.
    """
    folder = Path(os.path.expanduser(str(folder))).absolute()
    kind = _check_pushable(folder)
    if repo_id.count("/") != 1 or repo_id.startswith("/") or repo_id.endswith("/"):
        raise UserError(f"repo id `{repo_id}` must look like `owner/name`",
                        fix="e.g. your-user/my-solar-merge")
    files = upload_list(folder)
    if dry_run:
        return files

    from huggingface_hub import HfApi, get_token

    token = get_token()
    if not token:
        raise UserError("no Hugging Face token found (HF_TOKEN or the `hf auth login` cache); "
                        "nothing was uploaded", fix=_NO_TOKEN_FIX)
    if _offline():
        raise UserError("the Hub is in offline mode (HF_HUB_OFFLINE is set); nothing was "
                        "uploaded", fix="unset HF_HUB_OFFLINE on a machine with internet access")
    leaked = _token_in_files(folder, files, token)
    if leaked:
        raise UserError(f"{folder / leaked} contains your Hugging Face token; nothing was "
                        "uploaded", fix="remove the token from that file (and rotate it)")
    try:
        from huggingface_hub.errors import HFValidationError

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type=kind)
        api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=kind,
                          allow_patterns=[glob.escape(rel) for rel, _ in files],
                          commit_message=f"Upload {folder.name} with solar-merge")
    except HFValidationError as e:
        raise UserError(_scrub(f"invalid repo id `{repo_id}`: {e}", token),
                        fix="use `owner/name` with letters, digits, '-', '_' and '.'") from None
    except Exception as e:  # noqa: BLE001 - every failure is reported, scrubbed, as not done
        raise UserError(_scrub(f"upload of {folder.name} to {repo_id} failed, nothing is "
                               f"reported as uploaded: {type(e).__name__}: {e}", token),
                        fix="check your connection, that the token has write access to "
                            f"{repo_id.split('/')[0]}, then push again (the upload is one "
                            "commit: re-pushing is safe)") from None
    return files


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _scrub(text: str, token: str | None = None) -> str:
    """`text` with the Hugging Face token (given, or the current one) replaced by ***."""
    if token is None:
        try:
            from huggingface_hub import get_token

            token = get_token()
        except Exception:  # noqa: BLE001 - scrubbing must never fail
            token = None
    if token and len(token) >= 4:
        text = text.replace(token, "***")
    return text
