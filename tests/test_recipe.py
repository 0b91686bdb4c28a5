from __future__ import annotations

from pathlib import Path

import pytest

from loratk.recipe import (
    RecipeError,
    apply_override,
    dump_recipe,
    load_recipe,
    parse_override_value,
    validate_recipe,
)
from loratk.recipe.loading import _flatten
from loratk.train import main

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.toml"))
MINIMAL = {"name": "x", "data": {"dir": "imgs"}}


def problems(raw: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw, source="r.toml")
    return info.value.problems


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates_and_starts_with_its_command(path):
    recipe = load_recipe(path)
    assert recipe.name
    first_lines = path.read_text().splitlines()[:7]
    assert any(f"#   loratk train recipes/{path.name}" in line for line in first_lines)
    assert any(f"-m loratk.train recipes/{path.name}" in line for line in first_lines)  # several GPUs


def test_ukiyoe_recipe_is_the_seed_setup():
    recipe = load_recipe(REPO / "recipes" / "ukiyoe.toml")
    assert recipe.model.path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert (recipe.lora.rank, recipe.train.batch_size, recipe.train.epochs) == (128, 20, 12)
    assert (recipe.optim.name, recipe.train.learning_rate) == ("adafactor", 1e-3)
    assert recipe.data.caption_ext == ".txt"
    assert recipe.data.size == (600, 400)
    # What fits it in 24 GB: checkpointing, bf16 frozen weights, Adafactor, SDPA attention.
    assert recipe.train.gradient_checkpointing and recipe.train.mixed_precision == "bf16"
    assert recipe.performance.attention == "sdpa"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({**MINIMAL, "lora": {"rnak": 4}}, "lora.rnak: unknown key (did you mean 'rank'?)"),
        ({**MINIMAL, "train": {"learning_rate": -1}}, "train.learning_rate: must be > 0, got -1"),
        (
            {**MINIMAL, "train": {"lerning_rate": 1}},
            "train.lerning_rate: unknown key (did you mean 'learning_rate'?)",
        ),
        ({**MINIMAL, "optim": {"name": "adafactr"}}, "did you mean 'adafactor'?"),
        ({"name": "x"}, "data.dir: required for method 'lora'"),
        ({**MINIMAL, "trian": {}}, "trian: unknown key (did you mean 'train'?)"),
        ({**MINIMAL, "train": {"epochs": "many"}}, "train.epochs: expected a whole number, got 'many'"),
        (
            {**MINIMAL, "train": {"learning_rate": "1e-3"}},
            "train.learning_rate: expected a number, got '1e-3' (a string); write it without quotes: 1e-3",
        ),
        (
            {**MINIMAL, "lora": {"rank": 8.0}},
            "lora.rank: expected a whole number, got 8.0 (a number); write 8",
        ),
        (
            {**MINIMAL, "data": {"dir": "i", "buckets": "yes"}},
            "data.buckets: expected true or false, got 'yes'",
        ),
        ({**MINIMAL, "optim": {"betas": [0.9]}}, "optim.betas: expected at least 2 values, got 1: [0.9]"),
        ({**MINIMAL, "name": 3}, "name: expected a string in quotes, got 3"),
        (
            {**MINIMAL, "data": {"dir": "i", "resolution": "big"}},
            "data.resolution: expected a whole number or a list such as [1, 2], got 'big'",
        ),
        (
            {**MINIMAL, "data": {"dir": "i", "resolution": 601}},
            "data.resolution: each side must be a multiple of 8",
        ),
        ({**MINIMAL, "data": {"dir": "i", "caption_ext": "txt"}}, "did you mean '.txt'?"),
        ({**MINIMAL, "name": "my run/1"}, "name: 'my run/1' is not allowed"),
        ({**MINIMAL, "lora": {"targets": []}}, "lora.targets: must name at least one module"),
    ],
)
def test_each_kind_of_error_names_its_path_and_suggests_a_fix(raw, expected):
    found = problems(raw)
    assert any(expected in p for p in found), found


def test_all_errors_are_reported_together():
    found = problems({**MINIMAL, "lora": {"rnak": 4}, "train": {"learning_rate": -1, "epochs": 0}})
    assert len(found) == 3
    assert {p.split(":")[0] for p in found} == {"lora.rnak", "train.learning_rate", "train.epochs"}


def test_union_fields_report_one_line_per_key():
    found = problems({**MINIMAL, "lora": {"targets": "alll"}})
    assert len(found) == 1 and found[0].startswith("lora.targets:")


def test_toml_syntax_errors_and_missing_files_are_recipe_errors(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[data\n')
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    "text, value",
    [
        ("3", 3),
        ("1e-4", 1e-4),
        ("true", True),
        ("[600, 400]", [600, 400]),
        ('"a b"', "a b"),
        ("adafactor", "adafactor"),
    ],
)
def test_override_values_use_toml_syntax(text, value):
    assert parse_override_value(text) == value


def test_overrides_apply_to_nested_keys(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[data]\ndir = "imgs"\n[train]\nepochs = 12\n')
    recipe = load_recipe(path, ["train.epochs=3", "lora.rank=64", "data.resolution=[600, 400]"])
    assert (recipe.train.epochs, recipe.lora.rank, recipe.data.size) == (3, 64, (600, 400))


def test_bad_overrides_are_reported(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[data]\ndir = "imgs"\n')
    with pytest.raises(RecipeError, match="lora.rnak: unknown key"):
        load_recipe(path, ["lora.rnak=4"])
    with pytest.raises(RecipeError, match="overrides look like section.key=value"):
        load_recipe(path, ["train.epochs"])
    raw = {"name": "x"}
    with pytest.raises(ValueError, match="is a value, not a section"):
        apply_override(raw, "name.first=1")


def test_resolved_recipe_round_trips(tmp_path):
    recipe = validate_recipe(
        {**MINIMAL, "data": {"dir": "i", "resolution": [600, 400]}, "lora": {"rank": 16}}
    )
    path = tmp_path / "recipe.resolved.toml"
    path.write_text(dump_recipe(recipe))
    loaded = load_recipe(path)
    assert dump_recipe(loaded) == path.read_text()  # a fixed point: loading changes nothing that trains
    given = {k: v for k, v in _flatten(recipe.model_dump(mode="json")).items() if v is not None}
    assert {k: v for k, v in _flatten(loaded.model_dump(mode="json")).items() if k in given} == given
    assert "learning_rate = 0.0001" in path.read_text()  # defaults are filled in


def test_the_resolved_recipe_holds_every_derived_value(monkeypatch, tmp_path):
    import tomllib

    monkeypatch.setenv("LORATK_CACHE", str(tmp_path / "cache"))
    recipe = validate_recipe(
        {**MINIMAL, "data": {"dir": "i", "resolution": [600, 400]}, "lora": {"rank": 16}}
    )
    resolved = tomllib.loads(dump_recipe(recipe))
    data = resolved["data"]
    assert data["min_side"] == 100  # a quarter of the shorter side
    assert (data["bucket_min_side"], data["bucket_max_side"]) == (192, 960)  # half and twice sqrt(600x400)
    assert data["cache_dir"] == str(tmp_path / "cache" / "data")
    assert resolved["sample"]["size"] == [600, 400]  # the training resolution
    assert resolved["lora"]["alpha"] == 16.0 and resolved["lora"]["text_encoder_lr"] == 1e-05
    given = validate_recipe({**MINIMAL, "data": {"dir": "i", "min_side": 50, "buckets": False}})
    data = tomllib.loads(dump_recipe(given))["data"]
    assert data["min_side"] == 50 and "bucket_min_side" not in data  # given values win; no buckets, no sides


def test_recipes_are_frozen():
    recipe = validate_recipe(MINIMAL)
    with pytest.raises(Exception, match="frozen"):
        recipe.train.epochs = 3


@pytest.mark.parametrize(
    "argv",
    [
        ["R", "--overwrite", "train.epochs=1"],
        ["--overwrite", "R", "train.epochs=1"],
        ["R", "train.epochs=1", "--overwrite"],
    ],
)
@pytest.mark.parametrize("entry", ["python -m loratk.train", "loratk train"])
def test_options_and_overrides_go_in_any_order(argv, entry, tmp_path, monkeypatch):
    """`loratk train RECIPE --overwrite train.epochs=1` and every other order, on both entry points."""
    import loratk.run as train_module
    from loratk.cli import main as cli_main

    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[data]\ndir = "imgs"\n')
    seen = {}

    def fake_train(recipe, *, overwrite, stop):
        seen.update(epochs=recipe.train.epochs, overwrite=overwrite)

    monkeypatch.setattr(train_module, "train", fake_train)
    args = [str(path) if a == "R" else a for a in argv]
    code = main(args) if entry.startswith("python") else cli_main(["train", *args])
    assert code == 0 and seen == {"epochs": 1, "overwrite": True}


def test_train_cli_exits_2_with_every_error_and_no_traceback(tmp_path, capsys):
    path = tmp_path / "r.toml"
    path.write_text('name = "x"\n[data]\ndir = "imgs"\n[lora]\nrnak = 4\n[train]\nlearning_rate = -1\n')
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "lora.rnak: unknown key (did you mean 'rank'?)" in err
    assert "train.learning_rate: must be > 0, got -1" in err
    assert "Traceback" not in err


def test_readme_documents_every_recipe_key():
    from pydantic import BaseModel

    from loratk.recipe import Recipe

    readme = (REPO / "README.md").read_text()
    missing = []
    for name, field in Recipe.model_fields.items():
        annotation = field.annotation
        # An optional section (`dreambooth: DreamBoothConfig | None`) is documented like the others.
        members = [a for a in getattr(annotation, "__args__", ()) if a is not type(None)]
        if len(members) == 1 and isinstance(members[0], type) and issubclass(members[0], BaseModel):
            annotation = members[0]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            assert f"`[{name}]`" in readme, f"README has no [{name}] table"
            missing += [f"{name}.{key}" for key in annotation.model_fields if f"| `{key}` |" not in readme]
        elif f"| `{name}` |" not in readme:
            missing.append(name)
    assert not missing, f"README recipe reference lacks: {missing}"
