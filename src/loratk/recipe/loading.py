"""Reading a recipe (TOML plus `section.key=value` overrides, validated strictly), writing the resolved one,
and comparing two recipes for what a resume may change."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from loratk.recipe.evaluation import EvalConfig
from loratk.recipe.messages import EXPECTED_TYPES, RecipeError, describe, describe_type, error_path
from loratk.recipe.schema import Recipe

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a TOML recipe, apply `a.b=value` overrides, validate, and return it."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(str(path), ["file not found; check the path (recipes live in recipes/)"]) from None
    except UnicodeDecodeError as err:
        raise RecipeError(
            str(path), [f"not UTF-8 text (byte {err.start}); save the recipe as UTF-8"]
        ) from None
    except tomllib.TOMLDecodeError as err:
        raise RecipeError(str(path), [f"invalid TOML: {err}"]) from None
    problems: list[str] = []
    for item in overrides:
        try:
            apply_override(raw, item)
        except ValueError as err:
            problems.append(str(err))
    if problems:
        raise RecipeError(str(path), problems)
    return validate_recipe(raw, source=str(path))


def validate_recipe(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate strictly: a value of the wrong type (`"1e-3"`, `8.0` for a rank) is an error, not converted.

    Through JSON, so TOML arrays are accepted where the schema has a tuple (`betas = [0.9, 0.999]`).
    """
    try:
        recipe = Recipe.model_validate_json(json.dumps(raw, default=str), strict=True)
    except ValidationError as err:
        problems: dict[str, str] = {}
        errors = err.errors()
        # A union field (`resolution`: a number or [w, h]) fails once per member: say what each accepts.
        expected: dict[str, list[str]] = {}
        for e in errors:
            if e["type"] in EXPECTED_TYPES:
                expected.setdefault(error_path(e), []).append(EXPECTED_TYPES[e["type"]])
        for e in errors:
            if e["type"] in EXPECTED_TYPES:
                path = error_path(e)
                problems.setdefault(path, describe_type(path, expected[path], e.get("input")))
                continue
            # The cross-section checks report several lines at once, each with its own path.
            for line in describe(e).split("\n"):
                # A union field (e.g. `targets`) fails once per member; one line per key is enough.
                problems.setdefault(line.split(":", 1)[0], line)
        raise RecipeError(source, list(problems.values())) from None
    return fill_model_defaults(recipe, source)


def fill_model_defaults(recipe: Recipe, source: str = "<recipe>") -> Recipe:
    """An unset `data.resolution` becomes the model's own side, read from its files (configs or checkpoint
    header, never the weights): SDXL 1024, SD 1.x / SD 2.x 512, SD 2.x 768-v 768."""
    if recipe.data.resolution is not None:
        return recipe
    from loratk.models.detection import FamilyMismatchError, native_size
    from loratk.models.family import ModelLoadError

    model = recipe.model
    try:
        side = native_size(
            model.path, model.family, single_file_config=model.single_file_config, revision=model.revision
        )
    except FamilyMismatchError as err:
        raise RecipeError(source, [str(err)]) from None
    except ModelLoadError as err:
        raise RecipeError(
            source, [f"data.resolution: not set, and the model's own side could not be read ({err}); set it"]
        ) from None
    return recipe.model_copy(update={"data": recipe.data.model_copy(update={"resolution": side})})


def parse_override_value(text: str) -> Any:
    """TOML value syntax (`3`, `1e-4`, `true`, `[1, 2]`, `"x"`); anything else is a plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override to a raw recipe dict, in place."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"{item!r}: overrides look like section.key=value, e.g. train.epochs=3")
    *parents, leaf = key.split(".")
    node = raw
    for i, part in enumerate(parents):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"{'.'.join(parents[: i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[leaf] = parse_override_value(value.strip())


def resolved_values(recipe: Recipe) -> dict[str, Any]:
    """What the recipe leaves unset and loratk derives from other keys, by dotted key.

    Values that depend on the model or the data (the prediction type, steps per epoch) are in `plan.py` and
    the run's log instead.
    """
    from loratk.data.buckets import default_bucket_sides
    from loratk.files import default_data_cache_dir

    data, width_height = recipe.data, recipe.data.size
    values: dict[str, Any] = {
        "data.min_side": max(1, min(width_height) // 4),
        "data.cache_dir": str(default_data_cache_dir()),
        "sample.size": list(recipe.sample_size),
        "lora.alpha": recipe.lora.scale_alpha,
        ("full" if recipe.method == "dreambooth" else "lora") + ".text_encoder_lr": recipe.text_encoder_lr,
    }
    if data.buckets:
        low, high = default_bucket_sides(width_height[0] * width_height[1], data.bucket_step)
        values.update({"data.bucket_min_side": low, "data.bucket_max_side": high})
    if recipe.dreambooth is not None:
        values["dreambooth.class_dir"] = str(recipe.run_dir / "class_images")
    return values


def dump_recipe(recipe: Recipe) -> str:
    """The recipe with every default and derived value filled in, as TOML (`recipe.resolved.toml`).

    Loading it gives a recipe that trains exactly the same; dumping that again gives the same text.
    """
    import tomli_w

    raw = recipe.model_dump(mode="json")  # every key, in the schema's order; unset ones are None
    for key, value in resolved_values(recipe).items():
        *parents, leaf = key.split(".")
        node = raw
        for part in parents:
            node = node[part]
        if node.get(leaf) is None:  # a value the recipe gives is kept
            node[leaf] = value
    return tomli_w.dumps(_without_none(raw))


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


# ---------------------------------------------------------------- comparing recipes

# Keys that may change between a run and its resumption: they do not change the math of steps already taken.
RESUMABLE_CHANGES = (
    "output_dir",
    "train.epochs",
    "train.max_steps",
    "train.resume",
    "train.save_state_every_n_steps",
    "train.keep_states",
    "train.max_nonfinite_steps",
    "train.log_every_n_steps",
    "train.report_to",
    "data.num_workers",
    "data.cache_dir",  # where the caches live, not what they hold (entries are keyed by content)
    "train.gradient_checkpointing",  # recomputes the same activations
    "performance.",  # speed and memory only (an OOM'd run can resume with other settings)
    "export.",
    "sample.",
    # Evaluation reads the weights and never changes them; only the held-out share changes the training set.
    *(f"eval.{key}" for key in EvalConfig.model_fields if key != "holdout"),
    "gan.sample_",  # what the GAN renders and scores, not what it learns
    "gan.interpolation_steps",
    "gan.eval_",
    "gan.inception",
)


def _flatten(raw: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_diff(old_toml: str, new: Recipe, ignore: tuple[str, ...] = RESUMABLE_CHANGES) -> list[str]:
    """Lines `key: old -> new` for every setting that differs, except the `ignore`d prefixes."""
    raw = tomllib.loads(old_toml)
    with contextlib.suppress(RecipeError):  # by this or an older loratk: fill in what it left unset as now
        raw = tomllib.loads(dump_recipe(validate_recipe(raw)))
    old = _flatten(raw)
    cur = _flatten(tomllib.loads(dump_recipe(new)))
    lines = []
    for key in sorted(set(old) | set(cur)):
        if key.startswith(ignore) or old.get(key) == cur.get(key):
            continue
        lines.append(f"{key}: {old.get(key, '(unset)')!r} -> {cur.get(key, '(unset)')!r}")
    return lines
