"""Accelerate configs and multi-process behaviour (two CPU processes with gloo stand in for two GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import make_recipe
from loratk.recipe import RecipeError
from loratk.train import resolve_accumulation

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "accelerate_configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_accelerate_config_loads_and_says_when_to_use_it(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_machines == 1
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    assert len(header) >= 2
    assert any(f"--config_file accelerate_configs/{path.name}" in line for line in header)


def test_the_five_configs_exist():
    assert {p.stem for p in CONFIGS} >= {"single_gpu", "multi_gpu", "deepspeed_zero2", "fsdp", "cpu_2proc"}


def test_readme_documents_the_configs():
    readme = (REPO / "README.md").read_text()
    assert all(f"accelerate_configs/{p.name}" in readme for p in CONFIGS)


def test_global_batch_sets_the_accumulation(tmp_path):
    recipe = make_recipe(tmp_path, "m", tmp_path, train={"batch_size": 2, "global_batch_size": 16})
    assert resolve_accumulation(recipe, num_processes=2) == 4
    assert resolve_accumulation(recipe, num_processes=8) == 1
    with pytest.raises(RecipeError, match=r"not a multiple of batch_size x processes = 2 x 3 = 6"):
        resolve_accumulation(recipe, num_processes=3)
    plain = make_recipe(tmp_path, "m", tmp_path, train={"gradient_accumulation_steps": 3})
    assert resolve_accumulation(plain, num_processes=4) == 3


def test_global_batch_and_accumulation_together_are_refused(tmp_path):
    with pytest.raises(
        RecipeError, match="train: global_batch_size and gradient_accumulation_steps are both set"
    ):
        make_recipe(tmp_path, "m", tmp_path, train={"global_batch_size": 8, "gradient_accumulation_steps": 2})


def _launch(recipe: Path, cwd: Path, processes: int, *overrides: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    config = (
        ["--config_file", str(REPO / "accelerate_configs" / "cpu_2proc.yaml")]
        if processes == 2
        else [
            "--num_processes",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--num_machines",
            "1",
        ]
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return subprocess.run(
        [str(accelerate), "launch", *config, "-m", "loratk.train", str(recipe), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_two_processes_write_the_same_outputs_as_one(tmp_path, tiny_sdxl_dir, images_dir):
    from loratk.recipe import dump_recipe

    # 6 images in 3 aspect buckets give an uneven number of batches: every rank must still get the same
    # number of steps, or the run would hang at the epoch end (the subprocess timeout catches a hang).
    recipe = make_recipe(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        name="two",
        output_dir="runs",
        data={"dir": "images"},
        train={"epochs": 2, "save_state_every_n_steps": 1},
    )
    path = tmp_path / "two.toml"
    path.write_text(dump_recipe(recipe))
    one = _launch(path, tmp_path, 1, "name=one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch(path, tmp_path, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "2 process(es)" in two.stderr

    def names(run: str) -> list[str]:  # the final adapter is named after the run
        return sorted(p.name.replace(run, "NAME") for p in (tmp_path / "runs" / run).iterdir())

    assert names("two") == names("one")
    lines = [json.loads(x) for x in (tmp_path / "runs" / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]  # 6 images / (2 x 2) -> 2 steps per epoch, metrics once


DRIVER = """
import os, signal, sys
from loratk.recipe import load_recipe
from loratk.train import TrainingRun

run = TrainingRun(load_recipe(sys.argv[1]))
run.setup()
kill_at = int(os.environ.get("KILL_AT", 0))
def hook(state):
    if state.global_step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
run.train(step_hooks=[hook])
run.cleanup()
"""


def _write(tmp_path: Path, tiny_sdxl_dir: Path, images_dir: Path, name: str, **sections) -> Path:
    from loratk.recipe import dump_recipe

    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, name=name, output_dir="runs", **sections)
    path = tmp_path / f"{name}.toml"
    path.write_text(dump_recipe(recipe))
    return path


def _weights(path: Path) -> dict:
    from loratk.core.checkpoint import load_safetensors

    return load_safetensors(path)[0]


@pytest.mark.slow
def test_two_processes_with_batch_b_match_one_process_with_batch_2b(tmp_path, tiny_sdxl_dir, images_dir):
    import torch

    for extra in sorted(images_dir.iterdir())[8:]:  # 4 images, one bucket, file order: a fixed data order
        extra.unlink()
    common = dict(
        data={"dir": "images", "buckets": False, "shuffle": False, "repeats": 2},
        # Adam turns float-rounding noise in near-zero gradients into +-lr steps: a small lr keeps that noise
        # under the tolerance while the weights still move (checked below).
        train={"epochs": 2, "learning_rate": 1e-3},
        export={"dtype": "fp32"},
    )
    one = _write(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        "one",
        **{**common, "train": {**common["train"], "batch_size": 4}},
    )
    two = _write(
        tmp_path,
        tiny_sdxl_dir,
        images_dir,
        "two",
        **{**common, "train": {**common["train"], "batch_size": 2}},
    )
    assert _launch(one, tmp_path, 1).returncode == 0
    proc = _launch(two, tmp_path, 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _weights(tmp_path / "runs/one/one.safetensors"), _weights(tmp_path / "runs/two/two.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)  # atol: summation-order noise near 0
    before = _weights(tmp_path / "runs/one/epoch1.safetensors")
    assert any(not torch.equal(before[k], a[k]) for k in a)  # it trained


@pytest.mark.slow
def test_kill_and_resume_with_two_processes_ends_with_the_same_weights(tmp_path, tiny_sdxl_dir, images_dir):
    sections = dict(
        data={"dir": "images"}, train={"epochs": 2, "learning_rate": 1e-2, "save_state_every_n_steps": 1}
    )
    recipe = _write(tmp_path, tiny_sdxl_dir, images_dir, "run", **sections)
    (tmp_path / "driver.py").write_text(DRIVER)
    accelerate = Path(sys.executable).with_name("accelerate")

    def launch(**env: int) -> subprocess.CompletedProcess:
        full = dict(
            os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", **{k: str(v) for k, v in env.items()}
        )
        cmd = [
            str(accelerate),
            "launch",
            "--config_file",
            str(REPO / "accelerate_configs" / "cpu_2proc.yaml"),
            "driver.py",
            str(recipe),
        ]
        return subprocess.run(cmd, cwd=tmp_path, env=full, capture_output=True, text=True, timeout=600)

    assert launch().returncode == 0

    def trace() -> list[tuple]:
        lines = [json.loads(x) for x in (tmp_path / "runs/run/metrics.jsonl").read_text().splitlines()]
        return [(r["step"], float.hex(r["train/loss"]), float.hex(r["lr/unet"])) for r in lines]

    reference, metrics = (tmp_path / "runs/run/epoch2.safetensors").read_bytes(), trace()
    import shutil

    shutil.rmtree(tmp_path / "runs")
    assert launch(KILL_AT=3).returncode != 0  # both ranks die after step 3 (mid-run, epoch 2)
    resumed = launch()
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (tmp_path / "runs/run/epoch2.safetensors").read_bytes() == reference
    assert trace() == metrics


def test_each_process_gets_its_own_deterministic_seed():
    from loratk.core.loop import compute_step_seed

    assert compute_step_seed(1, 5, 0) == compute_step_seed(1, 5, 0)
    assert len({compute_step_seed(1, 5, rank) for rank in range(8)}) == 8
