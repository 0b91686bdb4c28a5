"""Recipe errors in words: every problem on one line, with its TOML path, what was given and a suggestion."""

from __future__ import annotations

import difflib
import sys
import typing
from typing import Any

from pydantic import BaseModel

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


class RecipeError(ValueError):
    """Every problem found in a recipe, one line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{source}: {len(problems)} problem(s) in the recipe:\n{lines}")


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names the schema allows at `loc` (the location of the offending key's parent)."""
    from loratk.recipe.schema import Recipe

    model: type[BaseModel] = Recipe
    for part in loc:
        if isinstance(part, int):  # an index into a list of sections, e.g. data.subsets[0]
            continue
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if typing.get_origin(annotation) is list:
            annotation = typing.get_args(annotation)[0]
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return list(model.model_fields)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(choices)}"


# What a value of each kind of field looks like in TOML (strict validation: no silent conversions).
EXPECTED_TYPES = {
    "int_type": "a whole number",
    "float_type": "a number",
    "string_type": "a string in quotes",
    "bool_type": "true or false",
    "tuple_type": "a list such as [1, 2]",
    "list_type": "a list such as [1, 2]",
    "model_type": "a section",
    "dict_type": "a section",
}
_TOML_KIND = {str: "a string", bool: "a boolean", int: "a whole number", float: "a number", list: "a list"}


def _clean_loc(error: dict[str, Any]) -> tuple[Any, ...]:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "tagged"))))
    # pydantic adds union-member names (e.g. 'int', 'tuple[int,int]') to the location; drop them.
    return tuple(
        p
        for p in loc
        if not (isinstance(p, str) and ("[" in p or p in {"int", "float", "str", "list", "bool"}))
    )


def error_path(error: dict[str, Any], loc: tuple[Any, ...] | None = None) -> str:
    loc = _clean_loc(error) if loc is None else loc
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".") or "(top level)"


def describe_type(path: str, expected: list[str], given: Any) -> str:
    """`train.learning_rate: expected a number, got '1e-3' (a string); write it without quotes: 1e-3`."""
    wanted = " or ".join(dict.fromkeys(expected))
    kind = next((name for t, name in _TOML_KIND.items() if type(given) is t), type(given).__name__)
    line = f"{path}: expected {wanted}, got {given!r} ({kind})"
    if isinstance(given, str):
        try:
            parsed = tomllib.loads(f"v = {given}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = None
        if parsed is not None and not isinstance(parsed, str):
            line += f"; write it without quotes: {given}"
    elif isinstance(given, float) and given.is_integer() and "a whole number" in expected:
        line += f"; write {int(given)}"
    return line


def describe(error: dict[str, Any]) -> str:
    loc = _clean_loc(error)
    path = error_path(error, loc)
    kind = error["type"]
    ctx = error.get("ctx", {})
    given = error.get("input")
    if kind == "extra_forbidden":
        allowed = _fields_at(loc[:-1])
        return f"{path}: unknown key ({_suggest(str(loc[-1]), allowed)})"
    if kind == "missing" and loc and isinstance(loc[-1], int):  # a list too short for a fixed-size field
        return f"{error_path(error, loc[:-1])}: expected at least {loc[-1] + 1} values, got {len(given)}: {given!r}"
    if kind == "missing":
        return f"{path}: required key is missing; add it to the recipe"
    if kind == "too_long":
        return f"{path}: too many values: {error['msg'].lower()}"
    if kind in {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}:
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[
            kind
        ]
        bound = next(iter(ctx.values()))
        bound = int(bound) if isinstance(bound, float) and bound.is_integer() else bound
        return f"{path}: must be {op} {bound}, got {given!r}"
    if kind == "literal_error":
        expected = ctx.get("expected", "")
        choices = [c.strip().strip("'") for c in expected.replace(" or ", ", ").split(",") if c.strip()]
        hint = _suggest(str(given), choices)
        return f"{path}: must be one of {expected}, got {given!r} ({hint})"
    if kind == "string_pattern_mismatch":
        return (
            f"{path}: {given!r} is not allowed; use letters, digits, '_', '-' and '.' (no spaces or slashes)"
        )
    if kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
        return message if not loc else f"{path}: {message}"
    return f"{path}: {error['msg'].lower()}, got {given!r}"
