"""Recipes: curate configurations stored as YAML files.

A recipe file has this shape::

    name: datacomp-basic
    description: what the recipe selects, in a sentence or two
    sources:                     # where each number comes from
      - "..."
    not_applied:                 # rules of the original that curate cannot express yet
      - "..."
    options:                     # curate option destinations: --min-image-size -> min_image_size
      min_image_size: 200
      max_aspect_ratio: 3.0

``bm6b curate --recipe NAME|FILE`` applies ``options`` as the parser's defaults before the
command line is parsed, so any flag given on the command line still wins. NAME is a file in
this package, such as ``bm6b-default`` or ``datacomp-basic``. A value ending in ``.yaml`` or
``.yml``, or naming an existing file, is read as a path.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from importlib import resources
from typing import Any

import yaml

logger = logging.getLogger(__name__)

RECIPE_KEYS = frozenset({"name", "description", "sources", "not_applied", "options"})

# Destinations a recipe may not set: the job's inputs and output are per run, not per recipe.
NOT_RECIPE_OPTIONS = frozenset({"help", "inputs", "output", "recipe", "func", "accepts_extra"})


class RecipeError(ValueError):
    """A recipe that cannot be found, read or applied; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Recipe:
    name: str
    path: str
    description: str
    sources: tuple[str, ...]
    options: dict[str, Any]
    not_applied: tuple[str, ...] = ()


def bundled_names() -> list[str]:
    folder = resources.files(__name__)
    return sorted(entry.name[: -len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def resolve(name_or_path: str) -> str:
    """Return the file of a recipe given by bundled name or by path; raise RecipeError if none."""
    if name_or_path.endswith((".yaml", ".yml")) or os.path.sep in name_or_path or os.path.isfile(name_or_path):
        if not os.path.isfile(name_or_path):
            raise RecipeError(f"recipe file not found: {name_or_path}")
        return name_or_path
    bundled = resources.files(__name__) / f"{name_or_path}.yaml"
    if not bundled.is_file():
        raise RecipeError(
            f"unknown recipe {name_or_path!r}; bundled recipes are {', '.join(bundled_names())}, "
            "or pass the path of a .yaml file"
        )
    return str(bundled)


def load_recipe(name_or_path: str) -> Recipe:
    """Read and check the shape of a recipe file (its option names are checked by ``recipe_defaults``)."""
    path = resolve(name_or_path)
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path}: invalid YAML: {err}") from err

    if not isinstance(content, dict):
        raise RecipeError(f"recipe {path}: expected a mapping with keys {', '.join(sorted(RECIPE_KEYS))}")
    unknown = sorted(set(content) - RECIPE_KEYS)
    if unknown:
        raise RecipeError(f"recipe {path}: unknown top-level key {unknown[0]!r}; allowed keys are "
                          f"{', '.join(sorted(RECIPE_KEYS))}")
    options = content.get("options") or {}
    if not isinstance(options, dict):
        raise RecipeError(f"recipe {path}: 'options' must be a mapping of option name to value")
    return Recipe(
        name=str(content.get("name") or os.path.splitext(os.path.basename(path))[0]),
        path=path,
        description=str(content.get("description") or ""),
        sources=_strings(content.get("sources")),
        options=dict(options),
        not_applied=_strings(content.get("not_applied")),
    )


def _strings(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(item) for item in value)


def _option_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {
        action.dest: action
        for action in parser._actions  # noqa: SLF001 (argparse has no public list of a parser's actions)
        if action.option_strings and action.dest not in NOT_RECIPE_OPTIONS
    }


def _convert(recipe: Recipe, dest: str, action: argparse.Action, value: Any) -> Any:
    flag = action.option_strings[-1]
    where = f"recipe {recipe.name} ({recipe.path}): option {dest} ({flag})"

    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):  # noqa: SLF001
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: expected true or false, got {value!r}")
        return value

    if isinstance(action, argparse._AppendAction):  # noqa: SLF001
        items = value if isinstance(value, list) else [value]
        return [_convert_one(where, action, item) for item in items]

    if isinstance(value, (list, dict)):
        raise RecipeError(f"{where}: expected a single value, got {value!r}")
    return _convert_one(where, action, value)


def _convert_one(where: str, action: argparse.Action, value: Any) -> Any:
    if value is None:
        return None
    if action.type is not None:
        try:
            value = action.type(value) if not isinstance(value, bool) else _reject_bool(where, value)
        except (TypeError, ValueError) as err:
            raise RecipeError(f"{where}: invalid value {value!r}: {err}") from err
    if action.choices is not None and value not in action.choices:
        choices = ", ".join(str(c) for c in action.choices)
        raise RecipeError(f"{where}: invalid value {value!r}; choose from {choices}")
    return value


def _reject_bool(where: str, value: bool):
    raise RecipeError(f"{where}: expected a number or string, got {value!r}")


def recipe_defaults(recipe: Recipe, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """Return the recipe's options as parser defaults, converted with each option's type.

    Raises RecipeError naming the first key that is no option of ``parser``, or a value of the
    wrong type or outside the option's choices.
    """
    actions = _option_actions(parser)
    defaults = {}
    for dest, value in recipe.options.items():
        action = actions.get(dest)
        if action is None:
            raise RecipeError(
                f"recipe {recipe.name} ({recipe.path}): unknown option {dest!r}; recipe options are curate flag "
                f"names with '_' for '-', one of: {', '.join(sorted(actions))}"
            )
        defaults[dest] = _convert(recipe, dest, action, value)
    return defaults


def _recipe_argument(args: list[str]) -> str | None:
    """Return the value of the last ``--recipe`` in raw command-line arguments, if any."""
    found = None
    for index, arg in enumerate(args):
        if arg == "--":
            break
        if arg == "--recipe" and index + 1 < len(args):
            found = args[index + 1]
        elif arg.startswith("--recipe="):
            found = arg.split("=", 1)[1]
    return found


def add_recipe_option(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` a ``--recipe NAME|FILE`` option whose values become defaults before parsing.

    argparse fills defaults before it reads the command line, so the recipe has to be applied
    first: this wraps the parser's ``parse_known_args`` (which the subcommand machinery calls).
    A recipe that cannot be applied ends the program through ``parser.error`` with the reason.
    """
    names = ", ".join(bundled_names())
    parser.add_argument(
        "--recipe",
        metavar="NAME|FILE",
        help=f"apply a recipe's option values before the command line, which still overrides them: a bundled "
        f"recipe ({names}) or a .yaml file",
    )
    parse_known_args = parser.parse_known_args

    def parse_with_recipe(args=None, namespace=None):
        raw = list(args) if args is not None else []
        chosen = _recipe_argument(raw)
        if chosen is None:
            return parse_known_args(args, namespace)
        try:
            recipe = load_recipe(chosen)
            defaults = recipe_defaults(recipe, parser)
        except RecipeError as err:
            parser.error(str(err))
        previous = {dest: parser.get_default(dest) for dest in defaults}
        parser.set_defaults(**defaults)
        try:
            parsed, extra = parse_known_args(args, namespace)
        finally:
            parser.set_defaults(**previous)
        logger.info("recipe %s (%s) sets %s", recipe.name, recipe.path,
                    ", ".join(f"{k}={v!r}" for k, v in defaults.items()) or "no options")
        for rule in recipe.not_applied:
            logger.warning("recipe %s: not applied: %s", recipe.name, rule)
        return parsed, extra

    parser.parse_known_args = parse_with_recipe
