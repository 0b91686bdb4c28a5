"""The recipe: one TOML file that says what to train, on what, and how.

Validated once, up front: every problem is reported together, each with its TOML path and a suggestion.
Nothing changes a recipe after loading; derived numbers live in `plan.py`. The schema is in `schema`, the
reading, writing and comparing in `loading`, the wording of errors in `messages`.
"""

from loratk.recipe.evaluation import EvalConfig
from loratk.recipe.gan import GanConfig
from loratk.recipe.loading import (
    RESUMABLE_CHANGES,
    apply_override,
    dump_recipe,
    load_recipe,
    parse_override_value,
    recipe_diff,
    resolved_values,
    validate_recipe,
)
from loratk.recipe.messages import RecipeError
from loratk.recipe.schema import Recipe
from loratk.recipe.sections import (
    BUILTIN_TINY,
    DataConfig,
    DreamBoothConfig,
    ExportConfig,
    FullConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    PerformanceConfig,
    SampleConfig,
    SubsetConfig,
    TrainConfig,
)

__all__ = [
    "BUILTIN_TINY",
    "RESUMABLE_CHANGES",
    "DataConfig",
    "DreamBoothConfig",
    "EvalConfig",
    "ExportConfig",
    "FullConfig",
    "GanConfig",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "PerformanceConfig",
    "Recipe",
    "RecipeError",
    "SampleConfig",
    "SubsetConfig",
    "TrainConfig",
    "apply_override",
    "dump_recipe",
    "load_recipe",
    "parse_override_value",
    "recipe_diff",
    "resolved_values",
    "validate_recipe",
]
