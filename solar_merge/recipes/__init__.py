"""The recipes, stage configs and merge configs that ship with solar-merge, as package data.

In a checkout they are the top-level folders `training/` and `merge_configs/`, the files users
read and run (`mergekit-yaml merge_configs/dus.yaml OUT`); `solar_merge/recipes/training` and
`solar_merge/recipes/merge_configs` are links to them, so that every install (editable, wheel,
sdist) holds the same files here, found with importlib.resources. Recipes name each other by
relative paths (`../merge_configs/sft_slerp.yaml`, `chat_templates/...`), which hold in both
places. Every file starts with a comment whose first line is the command that runs it.
"""

import os
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from solar_merge.errors import UserError, did_you_mean

FOLDERS = ("training", "merge_configs")


@dataclass(frozen=True)
class Shipped:
    name: str         # the file's stem: `solar_10.7b`, `dus`, ...
    kind: str         # recipe, stage config or merge config
    folder: str       # `training` or `merge_configs`
    path: Path        # the file in the installed package
    command: str      # the header's first line: the command that runs it
    description: str  # the header's first sentence after the command


def root() -> Path:
    """The installed folder that holds `training/` and `merge_configs/`."""
    return Path(str(files(__name__)))


KINDS = ("recipe", "stage config", "merge config")


def shipped() -> list[Shipped]:
    """Every shipped YAML file: recipes, stage configs, merge configs, each kind by name."""
    items = [_describe(path, folder) for folder in FOLDERS
             for path in (root() / folder).glob("*.yaml")]
    return sorted(items, key=lambda item: (KINDS.index(item.kind), item.name))


def find(name: str) -> Shipped:
    """The shipped file called NAME (its stem, `.yaml` optional), or a UserError listing them."""
    items = {item.name: item for item in shipped()}
    stem = name.removesuffix(".yaml")
    if stem not in items:
        raise UserError(f"no shipped recipe or config named `{name}`{did_you_mean(stem, items)}",
                        fix="`solar-merge recipes` lists them: " + ", ".join(items))
    return items[stem]


def unknown_recipe(name: str) -> UserError:
    """The error for a recipe NAME that is no file, folder, URL or Hub id: it names the
    shipped recipes that `run` and `validate` take by name."""
    items = shipped()
    names = [item.name for item in items if _runs_by_name(item)]
    close = did_you_mean(name.removesuffix(".yaml"), [item.name for item in items])
    return UserError(f"recipe `{name}` not found: no such file or folder, and no shipped recipe "
                     f"has that name{close}",
                     fix=f"give a shipped recipe's name ({', '.join(names)}; `solar-merge "
                         "recipes` lists every shipped file and the command that runs it), a "
                         "recipe file, an output folder, an http(s) URL or a Hub repo id "
                         "`owner/name`")


def _runs_by_name(item: Shipped) -> bool:
    """Whether `solar-merge run NAME` runs it: a recipe whose header runs it that way."""
    return item.command.startswith("solar-merge run ")


def references(path: Path) -> list[Path]:
    """The shipped files that PATH names by a relative path (a merge config, a chat template),
    and those they name in turn."""
    import yaml

    base, found = root(), []

    def walk(value, folder):
        if isinstance(value, dict):
            for v in value.values():
                walk(v, folder)
        elif isinstance(value, list):
            for v in value:
                walk(v, folder)
        elif isinstance(value, str) and "\n" not in value and not os.path.isabs(value):
            target = Path(os.path.normpath(folder / value))
            if target.is_file() and target.is_relative_to(base) and target not in found:
                found.append(target)
                if target.suffix == ".yaml":
                    walk(yaml.safe_load(target.read_text()), target.parent)

    walk(yaml.safe_load(path.read_text()), path.parent)
    return found


def copy(name: str, dest) -> list[Path]:
    """Copy the shipped file NAME and the shipped files it names into DEST, laid out as in a
    checkout (`DEST/training/...`, `DEST/merge_configs/...`), so that its relative paths and
    the command in its header work from DEST. Returns the files written. A different file
    already at a target is never replaced: nothing is written then."""
    item = find(name)
    base, dest = root(), Path(dest).absolute()
    pairs = [(src, dest / src.relative_to(base)) for src in [item.path, *references(item.path)]]
    clashes = [t for s, t in pairs if t.exists() and (not t.is_file()
                                                      or t.read_bytes() != s.read_bytes())]
    if clashes:
        raise UserError(f"{', '.join(map(str, clashes))} already exists with other contents",
                        fix="move it away or copy into another folder")
    for src, target in pairs:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        partial.write_bytes(src.read_bytes())
        os.replace(partial, target)
    return [t for _, t in pairs]


def runnable(name: str, here=None) -> tuple[dict, Path]:
    """(recipe mapping, base folder) to run the shipped recipe NAME as its copy in HERE (the
    current folder) would run: outputs and data paths relative to HERE as in a checkout
    (`out: ../runs/x` is HERE/runs/x), the shipped files it names read from the package."""
    import yaml

    item = find(name)
    if not _runs_by_name(item):
        raise UserError(f"`{item.name}` is a {item.kind} that `solar-merge run` does not run",
                        fix=f"run it as its header says: `{item.command}` (a copy's relative "
                            f"paths work after `solar-merge recipes copy {item.name} .`)")
    shipped_files = set(references(item.path))

    def absolute(value):
        if isinstance(value, dict):
            return {k: absolute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [absolute(v) for v in value]
        if isinstance(value, str) and not os.path.isabs(value) and "\n" not in value:
            target = Path(os.path.normpath(item.path.parent / value))
            return str(target) if target in shipped_files else value
        return value

    data = absolute(yaml.safe_load(item.path.read_text()))
    return data, Path(here or os.getcwd()).absolute() / item.folder


def _describe(path: Path, folder: str) -> Shipped:
    import yaml

    text = path.read_text()
    data = yaml.safe_load(text) or {}
    kind = ("recipe" if "stages" in data else "stage config" if "stage" in data
            else "merge config")
    header = [line[1:].strip() for line in _header(text)]
    return Shipped(path.stem, kind, folder, path, header[0] if header else "",
                   _first_sentence(header[1:]))


def _header(text: str) -> list[str]:
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return lines


def _first_sentence(lines: list[str]) -> str:
    """The first line after the command lines (those naming a command, and a parenthesised
    note that may follow them), cut at its first `. ` or `: ` outside parentheses."""
    depth = 0
    for line in lines:
        skip = depth > 0 or not line or line.startswith(("(", "solar-merge ", "mergekit-yaml ",
                                                         "python "))
        depth += line.count("(") - line.count(")")
        if skip:
            continue
        depth = 0
        for i, ch in enumerate(line):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0 and ch in ".:" and line[i + 1:i + 2] in (" ", ""):
                return line[:i]
        return line.rstrip(",;")
    return ""
