"""The [data] recipe keys: subsets, caption sources, buckets, caches; every conflict is an error up front."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratk.components.data import build_data_spec
from loratk.recipe import RecipeError, dump_recipe, load_recipe, recipe_diff, validate_recipe

REPO = Path(__file__).resolve().parents[1]


def problems(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe({"name": "x", "data": data}, source="r.toml")
    return info.value.problems


@pytest.mark.parametrize(
    "data, expected",
    [
        ({}, "data.dir: required for method 'lora'"),
        ({"dir": "a", "subsets": [{"dir": "b"}]}, "dir and [[data.subsets]] are both set"),
        ({"subsets": [{"dir": "b"}], "manifest": "captions/b.jsonl"}, "set manifest inside each subset"),
        ({"dir": "a", "caption_source": "manifest"}, "caption_source = 'manifest' needs manifest"),
        ({"subsets": [{"dir": "b", "caption_source": "manifest"}]}, "subsets[0].caption_source = 'manifest'"),
        ({"dir": "a", "manifest": "m.jsonl", "caption_source": "sidecar"}, "never reads it"),
        ({"dir": "a", "keep_tokens": 1}, "keep_tokens: only used with shuffle_tags = true"),
        ({"dir": "a", "buckets": False, "bucket_step": 32}, "bucket_step: no effect with buckets = false"),
        ({"dir": "a", "bucket_min_side": 1024, "bucket_max_side": 512}, "is larger than bucket_max_side"),
        ({"dir": "a", "bucket_step": 12}, "data.bucket_step: must be a multiple of 8"),
        ({"dir": "a", "on_bad_image": "skipp"}, "did you mean 'skip'?"),
        ({"dir": "a", "caption_source": "sidecars"}, "did you mean 'sidecar'?"),
        ({"subsets": [{"dirr": "b"}]}, "data.subsets[0].dirr: unknown key (did you mean 'dir'?)"),
        ({"subsets": [{"dir": "b", "repeats": 0}]}, "data.subsets[0].repeats: must be >= 1"),
        ({"subsets": [{"dir": "b", "caption_ext": "txt"}]}, "did you mean '.txt'?"),
    ],
)
def test_data_mistakes_are_reported_with_their_key(data, expected):
    found = problems(data)
    assert any(expected in p for p in found), found


def test_subsets_inherit_from_data_and_the_spec_is_plain():
    recipe = validate_recipe(
        {
            "name": "x",
            "data": {
                "caption_ext": ".caption",
                "trigger": "ukiyoe",
                "repeats": 2,
                "resolution": [600, 400],
                "subsets": [
                    {"dir": "a", "manifest": "captions/a.jsonl"},
                    {"dir": "b", "repeats": 5, "trigger": "", "caption_source": "sidecar"},
                ],
            },
        }
    )
    spec = build_data_spec(recipe)
    a, b = spec.subsets
    assert (a.caption_ext, a.trigger, a.repeats, a.manifest) == (
        ".caption",
        "ukiyoe",
        2,
        Path("captions/a.jsonl"),
    )
    assert (b.repeats, b.trigger, b.caption_source) == (5, "", "sidecar")
    assert spec.resolution == (600, 400) and spec.effective_min_side == 100
    assert (600, 400) in spec.bucket_list()


def test_resolved_recipe_with_every_data_key_round_trips(tmp_path):
    recipe = validate_recipe(
        {"name": "x", "data": {"subsets": [{"dir": "a"}], "shuffle_tags": True, "tag_shuffle_variants": 4}}
    )
    path = tmp_path / "recipe.resolved.toml"
    path.write_text(dump_recipe(recipe))
    # The same training (no difference a resume would refuse), and a fixed point of dumping.
    assert recipe_diff(path.read_text(), load_recipe(path), ignore=()) == []
    assert dump_recipe(load_recipe(path)) == path.read_text()


@pytest.mark.parametrize("name", ["quickstart.toml", "ukiyoe.toml"])
def test_shipped_recipes_use_buckets_and_caches(name):
    data = load_recipe(REPO / "recipes" / name).data
    assert data.buckets and data.cache_latents and data.cache_text_embeddings


def test_the_quickstart_reads_its_captions_from_the_shipped_manifest(monkeypatch):
    """captions/ holds the manifests people keep in git; the quickstart recipe reads its captions there."""
    from loratk.components.data import check_data
    from loratk.recipe import load_recipe

    monkeypatch.chdir(REPO)
    recipe = load_recipe("recipes/quickstart.toml")
    assert recipe.data.manifest == "captions/quickstart.jsonl"
    report = check_data(recipe)
    assert len(report.good) == 6 and {r.caption_source for r in report.images} == {"manifest"}
    assert not list((REPO / "examples" / "quickstart").glob("*.txt"))  # one source of truth
