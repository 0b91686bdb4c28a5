"""Prompt text: kohya prompt-file lines, <lora:name:w> tags, the A1111 `parameters` text, the [sample] recipe."""

from __future__ import annotations

from pathlib import Path

import pytest

from loratk.prompts import (
    PromptError,
    PromptSpec,
    extract_lora_tags,
    format_parameters,
    load_prompts_file,
    parse_parameters,
    parse_prompt_line,
)
from loratk.recipe import RecipeError, validate_recipe

SAMURAI = "Samurai on a hill with his sword drawn, highly detailed, clouds and ocean"


@pytest.mark.parametrize(
    "line, expected",
    [
        (SAMURAI, PromptSpec(SAMURAI)),
        (
            "a cat, detailed --n blurry, lowres --w 1024 --h 768 --d 7 --s 25 --l 5.5",
            PromptSpec(
                "a cat, detailed",
                negative_prompt="blurry, lowres",
                width=1024,
                height=768,
                seed=7,
                steps=25,
                guidance=5.5,
            ),
        ),
        ("a cat --D 3 --N x", PromptSpec("a cat", negative_prompt="x", seed=3)),  # kohya is case-blind
        ("  a cat   --n  ", PromptSpec("a cat", negative_prompt="")),
        ("a cat <lora:epoch7:0.8> at night", PromptSpec("a cat at night", loras=(("epoch7", 0.8),))),
        ("<lora:a> <LORA:b-000007:-0.5> x", PromptSpec("x", loras=(("a", 1.0), ("b-000007", -0.5)))),
    ],
)
def test_prompt_lines_follow_kohya_syntax(line, expected):
    assert parse_prompt_line(line) == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ("a cat --x 3", "unknown option --x (known: --n --w --h --d --s --l)"),
        ("a cat --ss euler_a", "--ss is kohya's per-prompt sampler"),
        ("a cat --w 1001", "--w must be a positive multiple of 8, got 1001"),
        ("a cat --h big", "--h needs a whole number, got 'big'"),
        ("a cat --d 1.5", "--d needs a whole-number seed"),
        ("a cat --s", "--s (steps) needs a value"),
        ("a cat --s 0", "--s must be positive, got 0"),
        ("a cat --l -1", "--l must be >= 0"),
        ("a cat --l high", "--l needs a number (CFG scale)"),
        ("a cat --d 1 --d 2", "--d is given twice"),
        ("--n blurry", "starts with an option"),
        ("<lora:x:1>", "the prompt is empty"),
        ("a cat <lora:x:strong>", "the weight 'strong' is not a number"),
        ("a cat <lora:>", "is not a LoRA tag"),
        ("a cat <lora:x:1:2>", "is not a LoRA tag"),
        ("a cat <lora:x:1", "is not closed"),
    ],
)
def test_malformed_prompt_lines_say_what_is_wrong(line, message):
    with pytest.raises(ValueError) as info:
        parse_prompt_line(line)
    assert message in str(info.value)


def test_prompt_files_skip_comments_and_name_the_bad_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text(f"# epochs side by side\n\n{SAMURAI} --d 1\n  # indented comment\na boat --n fog\n")
    assert load_prompts_file(path) == [
        PromptSpec(SAMURAI, seed=1),
        PromptSpec("a boat", negative_prompt="fog"),
    ]

    path.write_text("ok prompt\n# comment\n\na cat --w wide\n")
    with pytest.raises(PromptError, match=r"prompts.txt:4: --w needs a whole number, got 'wide'"):
        load_prompts_file(path)
    path.write_text("a cat <lora:epoch7:1>\n")
    with pytest.raises(PromptError, match=r"prompts.txt:1: <lora:\.\.\.> tags are for `loratk sample`"):
        load_prompts_file(path, allow_lora_tags=False)
    path.write_text("# only comments\n\n")
    with pytest.raises(PromptError, match="no prompts"):
        load_prompts_file(path)
    with pytest.raises(PromptError, match="nope.txt: prompts file not found"):
        load_prompts_file(tmp_path / "nope.txt")
    path.write_bytes(b"\xff\xfe bad")
    with pytest.raises(PromptError, match="not UTF-8"):
        load_prompts_file(path)


def test_lora_tags_are_taken_out_of_the_prompt():
    assert extract_lora_tags("a <lora:e1:0.5> cat, <lora:e2> red") == (
        "a cat, red",
        (("e1", 0.5), ("e2", 1.0)),
    )
    assert extract_lora_tags("no tags") == ("no tags", ())


def test_a1111_parameters_round_trip():
    text = format_parameters(
        prompt=SAMURAI,
        negative_prompt="blurry, lowres",
        steps=30,
        sampler="DPM++ 2M",
        guidance=7.0,
        seed=1234,
        width=1024,
        height=768,
        model="builtin:tiny-sdxl",
        loras=[("epoch7", 0.8)],
        epoch=7,
    )
    lines = text.split("\n")
    assert lines[0] == f"{SAMURAI} <lora:epoch7:0.8>"  # A1111 keeps LoRA tags in the prompt
    assert lines[1] == "Negative prompt: blurry, lowres"
    assert lines[2].startswith("Steps: 30, Sampler: DPM++ 2M, CFG scale: 7, Seed: 1234, Size: 1024x768, ")
    assert 'Model: "builtin:tiny-sdxl"' in lines[2]  # values with ':' or ',' are quoted as A1111 does
    parsed = parse_parameters(text)
    assert parsed["prompt"] == SAMURAI and parsed["loras"] == [("epoch7", 0.8)]
    assert parsed["negative_prompt"] == "blurry, lowres"
    assert (parsed["steps"], parsed["seed"], parsed["cfg_scale"]) == (30, 1234, 7.0)
    assert (parsed["width"], parsed["height"], parsed["epoch"]) == (1024, 768, 7)
    assert (parsed["Sampler"], parsed["Model"]) == ("DPM++ 2M", "builtin:tiny-sdxl")


def test_parameters_without_negative_prompt_or_lora():
    parsed = parse_parameters(
        format_parameters(
            prompt="a cat",
            negative_prompt="",
            steps=4,
            sampler="Euler",
            guidance=5.5,
            seed=0,
            width=64,
            height=64,
        )
    )
    assert parsed["prompt"] == "a cat" and parsed["negative_prompt"] == "" and parsed["loras"] == []
    assert parsed["cfg_scale"] == 5.5 and "epoch" not in parsed


# ---------------------------------------------------------------- the [sample] recipe section

MINIMAL = {"name": "x", "data": {"dir": "imgs", "resolution": [600, 400]}}


def test_sample_section_defaults():
    recipe = validate_recipe(MINIMAL)
    cfg = recipe.sample
    assert not cfg.enabled and cfg.prompts == [] and cfg.prompts_file is None
    assert (cfg.seeds, cfg.every_n_epochs, cfg.at_start, cfg.steps, cfg.guidance) == ([0], 1, True, 30, 7.0)
    assert cfg.scheduler == "euler"  # never DDIM
    assert recipe.sample_size == (600, 400)  # default: the training resolution
    sized = validate_recipe({**MINIMAL, "sample": {"prompts": [SAMURAI], "size": 512}})
    assert sized.sample.enabled and sized.sample_size == (512, 512)


@pytest.mark.parametrize(
    "sample, expected",
    [
        ({"prompts": ["ok", "a cat --w huge"]}, "sample.prompts: prompt 2: --w needs a whole number"),
        (
            {"prompts": ["a <lora:e7:1> cat"]},
            "sample.prompts: prompt 1: <lora:...> tags are for `loratk sample`",
        ),
        (
            {"prompts": ["a"], "prompts_file": "p.txt"},
            "sample: give either prompts or prompts_file, not both",
        ),
        ({"sheduler": "euler"}, "sample.sheduler: unknown key (did you mean 'scheduler'?)"),
        ({"scheduler": "ddim"}, "sample.scheduler: must be one of"),
        ({"size": 500}, "sample.size: each side must be a multiple of 8"),
        ({"seeds": []}, "sample.seeds:"),
        ({"every_n_epochs": 0}, "sample.every_n_epochs: must be > 0, got 0"),
    ],
)
def test_sample_section_errors_name_their_key(sample, expected):
    with pytest.raises(RecipeError) as info:
        validate_recipe({**MINIMAL, "sample": sample})
    assert any(expected in p for p in info.value.problems), info.value.problems


def test_shipped_recipes_sample_the_seed_prompt():
    from loratk.recipe import load_recipe

    repo = Path(__file__).resolve().parents[1]
    ukiyoe = load_recipe(repo / "recipes" / "ukiyoe.toml").sample
    assert ukiyoe.enabled and ukiyoe.prompts[0] == SAMURAI and ukiyoe.scheduler == "euler"
    quick = load_recipe(repo / "recipes" / "quickstart.toml")
    assert quick.sample.enabled and quick.sample.steps <= 4 and quick.sample_size == (64, 64)
