"""Reading the text files a user hands us (recipes, merge and stage configs, model cards),
defensively: size first, then UTF-8, then YAML. Every failure is a UserError naming the file.

Model folders (config.json, safetensors headers, index files) are read in checkpoints.py;
data sets in data.py.
"""

from pathlib import Path

from solar_merge.errors import UserError

MAX_TEXT_BYTES = 16 * 2**20  # a recipe or config is kilobytes; 16 MiB is surely another file
# YAML aliases let a few lines stand for billions of values ("billion laughs"); everything
# downstream (validation, hashing, writing) walks the expanded document.
MAX_YAML_VALUES = 100_000  # a large recipe holds a few hundred
# PyYAML builds nested values by recursion: keep well inside Python's recursion limit.
MAX_YAML_NESTING = 100


def read_text(path, *, what: str = "file", max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The text of a small UTF-8 file, or a UserError saying what is wrong with it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise UserError(f"{what} {path} is {size:,} bytes, far too large for a {what} "
                            f"(at most {max_bytes:,})",
                            fix="check that it is the file you meant")
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror or e}",
                        fix="check the path and that the file is readable") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})",
                        fix="check that it is the file you meant (a binary file, or text "
                            "saved in another encoding?)") from None


def load_yaml(text: str, label: str):
    """yaml.safe_load(text), with syntax errors, runaway nesting and alias bombs reported
    as a UserError naming `label`."""
    import yaml

    if _nesting(text) > MAX_YAML_NESTING:
        raise UserError(f"{label} is nested more than {MAX_YAML_NESTING} levels deep, which no "
                        "config is", fix="check that it is the file you meant")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{label} is not valid YAML: {e}",
                        fix="fix the YAML syntax at the line shown") from None
    except RecursionError:
        raise UserError(f"{label} is nested too deeply to be a config",
                        fix="check that it is the file you meant") from None
    except ValueError as e:  # e.g. an integer with more digits than Python converts
        raise UserError(f"{label} holds a value YAML cannot read ({str(e)[:200]})",
                        fix="fix the value") from None
    if _expanded_size(data, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise UserError(f"{label} expands to more than {MAX_YAML_VALUES:,} values (YAML "
                        "aliases `*name` repeating large anchors?)",
                        fix="write the repeated parts out, or check that it is the file you "
                            "meant")
    return data


def _nesting(text: str) -> int:
    """An upper bound of a YAML text's nesting: open brackets (quoted ones too) plus the
    deepest indentation. PyYAML parses nesting by recursion, and a few kilobytes of `[[[[`
    took 3 s to fail with a RecursionError (64 s under tracemalloc): refuse them first."""
    depth = deepest = 0
    for char in text:
        if char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth = max(0, depth - 1)
    indent = max((len(line) - len(line.lstrip(" ")) for line in text.splitlines()), default=0)
    return deepest + indent // 2


def read_yaml(path, *, what: str = "config"):
    """read_text + load_yaml."""
    return load_yaml(read_text(path, what=what), str(path))


def _expanded_size(data, limit: int) -> int:
    """How many values `data` holds once shared (aliased) parts are counted each time they
    appear; stops counting past `limit`."""
    count, stack = 0, [data]
    while stack and count <= limit:
        value = stack.pop()
        count += 1
        if isinstance(value, dict):
            stack.extend(value.keys())
            stack.extend(value.values())
        elif isinstance(value, (list, tuple, set)):
            stack.extend(value)
    return count
