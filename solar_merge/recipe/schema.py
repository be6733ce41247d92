"""The recipe file: a strict pydantic schema (each stage's body is its kind's to check:
solar_merge.kinds), and loading from a file, an output folder, a URL or a Hub repo, with
`dotted.key=value` overrides applied first."""


import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

from solar_merge.errors import UserError, did_you_mean
from solar_merge.kinds.registry import KINDS
from solar_merge.readers import load_yaml, read_text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Stage(BaseModel):
    """One stage: exactly one kind (a key of solar_merge.kinds.registry.KINDS) and its body,
    which the kind's module checks when the recipe is planned."""

    kind: str
    body: dict[str, Any]

    @model_validator(mode="before")
    @classmethod
    def _one_kind(cls, data):
        if not isinstance(data, dict):
            raise PydanticCustomError("stage", "a stage is a mapping of one kind to its "
                                      "settings, e.g. `train: ...`")
        for key in data:
            if key not in KINDS:
                raise PydanticCustomError("unknown_kind", "unknown key", {"key": str(key)})
        data = {k: v for k, v in data.items() if v is not None}
        if len(data) != 1:
            raise PydanticCustomError("stage", f"a stage has exactly one of {', '.join(KINDS)}"
                                      + (f" (found {', '.join(data)})" if data else ""))
        (kind, body), = data.items()
        if not isinstance(body, dict):
            raise PydanticCustomError("stage", f"{kind}: expected a mapping of settings, got "
                                      f"{type(body).__name__}")
        return {"kind": kind, "body": body}


class Recipe(_Strict):
    name: str = "recipe"
    description: str | None = None
    license: str | None = None
    out: str | None = None
    final: str | None = None
    # how train stages run (keys of stages.schema.LaunchSpec; a stage's own `train.launch`
    # wins, key by key) and mergekit options for every merge stage (a stage's
    # `merge.options` win), e.g. {cuda: true}
    launch: dict[str, Any] | None = None
    merge_options: dict[str, Any] | None = None
    stages: dict[str, Stage] = Field(min_length=1)


def _schema_error(e: ValidationError, label: str) -> UserError:
    lines = []
    for err in e.errors():
        loc = [str(p) for p in err["loc"]]
        path = ".".join(loc)
        if err["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key{did_you_mean(loc[-1], Recipe.model_fields)}; "
                         f"allowed here: {', '.join(Recipe.model_fields)}")
        elif err["type"] == "unknown_kind":
            key = err["ctx"]["key"]
            lines.append(f"{path}.{key}: unknown key{did_you_mean(key, KINDS)}; allowed "
                         f"here: {', '.join(KINDS)}")
        elif err["type"] == "missing":
            lines.append(f"{path}: missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {msg}" if path else msg)
    return UserError(f"{label}: " + "\n  ".join(lines),
                     fix="correct the keys named above (see training/solar_10.7b.yaml)")


# -- loading ---------------------------------------------------------------------------------

@dataclass
class Loaded:
    data: dict          # the recipe mapping, overrides applied
    recipe: Recipe
    base_dir: Path      # relative paths resolve against it
    label: str
    remote: bool = False  # fetched from a URL or the Hub: may write only under its output root


def load(source, overrides=(), *, base_dir=None) -> Loaded:
    """A recipe from a file, an output folder, a URL or a Hub repo (hub.load_recipe_text),
    or a mapping; `overrides` are `dotted.key=value` strings (values parsed as YAML). A name
    that is none of these is refused with the names of the shipped recipes."""
    remote = False
    if isinstance(source, dict):
        data, label = copy.deepcopy(source), "recipe"
        base = Path(base_dir or os.getcwd())
    else:
        path = Path(os.path.expanduser(str(source)))
        if path.is_file():
            text, label = read_text(path, what="recipe"), str(source)
            base = path.absolute().parent
        else:
            from solar_merge.checkpoints import is_hub_id
            from solar_merge.hub import load_recipe_text

            if not path.exists() and not is_hub_id(str(source)) \
                    and not str(source).startswith(("http://", "https://")):
                from solar_merge.recipes import unknown_recipe

                raise unknown_recipe(str(source))
            text, label = load_recipe_text(str(source))
            base = Path(os.getcwd())  # a recipe from a folder, URL or Hub repo: paths are ours
            remote = not Path(os.path.expanduser(str(source))).exists()
        data = load_yaml(text, label)
        if base_dir is not None:
            base = Path(base_dir)
    if not isinstance(data, dict):
        raise UserError(f"{label} must be a mapping with `stages:`",
                        fix="see training/solar_10.7b.yaml for an example")
    if overrides:
        from solar_merge.stages import apply_overrides

        data = apply_overrides(data, overrides)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _schema_error(e, label) from None
    return Loaded(data, recipe, base.absolute(), label, remote)
