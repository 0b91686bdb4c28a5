"""The DreamBooth quickstart, both variants, run the way a user runs it: `accelerate launch -m loratk.train`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import step_rows
from loratk.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def test_unicorngirl_recipes_are_the_seed_setup():
    for name, method in [
        ("unicorngirl_dreambooth", "dreambooth"),
        ("unicorngirl_dreambooth_lora", "dreambooth-lora"),
    ]:
        recipe = load_recipe(REPO / "recipes" / f"{name}.toml")
        assert recipe.method == method and recipe.train.max_steps == 1000
        assert recipe.dreambooth.instance_prompt == "a picture of UnicornGirl"
        prompts = " ".join(recipe.sample.prompts)
        assert "lifting an arm" in prompts and "eyes closed" in prompts


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dreambooth", "dreambooth-lora"])
def test_quickstart_dreambooth_through_accelerate_launch(tmp_path, method):
    accelerate = Path(sys.executable).with_name("accelerate")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    command = [
        str(accelerate),
        "launch",
        "--num_processes",
        "1",
        "--mixed_precision",
        "no",
        "-m",
        "loratk.train",
    ]
    command += ["recipes/quickstart_dreambooth.toml", f"output_dir={tmp_path}", f"method={method}"]
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "quickstart_dreambooth"
    assert len(list((run / "class_images").glob("*.png"))) == 4
    with safe_open(str(run / "quickstart_dreambooth.safetensors"), "pt") as f:
        keys = list(f.keys())
    if method == "dreambooth":
        assert any(k.startswith("model.diffusion_model.") for k in keys)
        assert (run / "quickstart_dreambooth_diffusers" / "model_index.json").is_file()
    else:
        assert keys and all(k.startswith("lora_unet_") for k in keys)
    assert len(step_rows(run / "metrics.jsonl")) == 4
