"""The README quickstart, run the way a user runs it: `loratk train recipes/quickstart.toml`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from helpers import step_rows

REPO = Path(__file__).resolve().parents[1]


def _readme_command(name: str) -> list[str]:
    """The README's command that mentions `name` (after `HF_HUB_OFFLINE=1`), as argv."""
    import shlex

    readme = (REPO / "README.md").read_text()
    line = next(x for x in readme.splitlines() if x.startswith("HF_HUB_OFFLINE=1 ") and name in x)
    return shlex.split(line)[1:]


@pytest.mark.slow
def test_quickstart_as_readme_says(tmp_path):
    argv = _readme_command("recipes/quickstart.toml")
    assert argv == ["loratk", "train", "recipes/quickstart.toml"]
    loratk = str(Path(sys.executable).with_name("loratk"))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [loratk, *argv[1:], f"output_dir={tmp_path}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "quickstart"
    names = {p.name for p in run.iterdir()}
    assert {"recipe.resolved.toml", "metrics.jsonl", "quickstart.safetensors"} <= names
    assert {"epoch1.safetensors", "epoch2.safetensors", "epoch3.safetensors"} <= names
    lines = step_rows(run / "metrics.jsonl")
    # 3 epochs x 3 batches: one of the six images is held out for the validation loss; with buckets the
    # other five form three batches of at most two.
    assert len(lines) == 9 and all("train/loss" in r and "lr/unet" in r for r in lines)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows if "val/loss" in r] == [0, 1, 2, 3]
    assert [r["epoch"] for r in rows if "eval/kid" in r] == [1, 2, 3]
    evaluated = [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in evaluated] == [0, 1, 2, 3]
    assert {"clip_t", "clip_i", "dino", "kid", "fid", "is", "fd_dinov2", "kid_dinov2"} <= set(
        evaluated[0]["metrics"]
    )
    assert {"psnr", "ssim"} <= set(evaluated[1]["metrics"])  # base vs epoch on the leak prompt
    assert "val/loss" in proc.stderr and "best epoch:" in proc.stderr
    report = (run / "report.html").read_text()
    assert "CLIP-T" in report and "KID" in report and "epoch 3" in report
    assert "loss=" in proc.stderr and "lr=" in proc.stderr  # the tqdm bar shows both
    with safe_open(str(run / "quickstart.safetensors"), "pt") as f:
        assert f.metadata()["ss_output_name"] == "quickstart"
    samples = run / "samples"
    assert (samples / "grid.png").is_file()
    for folder in ("base", "epoch001", "epoch002", "epoch003"):
        assert sorted(p.name for p in (samples / folder).iterdir()) == [
            "01-seed1.png",
            "01-seed2.png",
            "02-seed7.png",
        ]


def test_train_module_reports_data_errors_with_exit_2(tmp_path, capsys):
    from loratk.train import main

    images = tmp_path / "imgs"
    images.mkdir()
    (images / "a.png").write_bytes((REPO / "examples/quickstart/boat.png").read_bytes())
    code = main([str(REPO / "recipes/quickstart.toml"), f"data.dir={images}", f"output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "a.txt: caption file is missing" in err and "Traceback" not in err


def test_sd15_quickstart_as_readme_says(tmp_path, monkeypatch):
    """The SD 1.5 quickstart, in this process: the LoRA is in kohya's SD 1.x layout and samples name the model."""
    from loratk.prompts import parse_parameters
    from loratk.train import main

    argv = _readme_command("recipes/quickstart_sd15.toml")
    assert argv == ["loratk", "train", "recipes/quickstart_sd15.toml"]
    monkeypatch.chdir(REPO)
    assert main([argv[2], f"output_dir={tmp_path}", "sample.at_start=false", "sample.every_n_epochs=3"]) == 0
    run = tmp_path / "quickstart_sd15"
    assert {"epoch1.safetensors", "epoch3.safetensors", "quickstart_sd15.safetensors"} <= {
        p.name for p in run.iterdir()
    }
    with safe_open(str(run / "quickstart_sd15.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert all(k.startswith("lora_unet_") for k in keys)
    assert any(k.startswith("lora_unet_up_blocks_3_attentions_2_") for k in keys)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_output_name"] == "quickstart_sd15"
    from PIL import Image

    with Image.open(run / "samples" / "epoch003" / "01-seed1.png") as image:
        assert parse_parameters(image.info["parameters"])["Model"] == "builtin:tiny-sd15"
