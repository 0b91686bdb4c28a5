"""What a run prints: loratk's lines and its progress bars; known-harmless library noise is dropped."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from helpers import make_recipe
from loratk.recipe import dump_recipe


@pytest.fixture
def configured():
    from loratk.logs import configure_logging

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    configure_logging()
    yield
    root.handlers[:], _ = saved
    root.setLevel(saved[1])


def test_known_library_noise_is_dropped_and_real_warnings_kept(capfd, configured):
    import transformers

    def kept(name: str, message: str) -> bool:
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, message, None, None)
        return all(
            f.filter(record) for h in logging.getLogger(name.split(".")[0]).handlers for f in h.filters
        )

    torchvision = (
        "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
    )
    assert not kept("transformers.models.clip", torchvision)  # transformers prints through its own handler
    assert kept("transformers.models.clip", "a real problem")
    cast = "There are modules in UNet2DConditionModel that should be kept in float32: {}. Casting directly"
    assert not kept("diffusers.models.modeling_utils", cast.format("[]"))  # nothing to keep: noise
    assert kept("diffusers.models.modeling_utils", cast.format("['conv_in']"))
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning(
        "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."
    )
    logging.getLogger("accelerate.utils").warning("a real accelerate problem")
    logging.getLogger("loratk.train").info("plan: 6 examples")
    logging.getLogger("loratk.train").warning("[RANK 0] step 3: non-finite loss, update skipped")
    err = capfd.readouterr().err
    assert "kernels" not in err and "warning: a real accelerate problem" in err
    assert "plan: 6 examples\n" in err  # loratk's information, plainly
    assert "warning: step 3: non-finite loss" in err and "[RANK" not in err  # one process: no rank prefix
    assert transformers  # (imported so that its handler exists)


def test_an_over_large_image_is_reported_once_by_loratk(tmp_path, capfd):
    from loratk.cli import main as cli_main

    folder = tmp_path / "big"
    folder.mkdir()
    Image.new("1", (9600, 9600)).save(folder / "poster.png")  # 92 Mpx: over Pillow's own warning limit
    (folder / "poster.txt").write_text("a poster")
    code = cli_main(["check", str(folder), "--no-duplicates", "--report", str(tmp_path / "r.csv")])
    captured = capfd.readouterr()
    assert code == 1 and "9600x9600 is over the 64,000,000-pixel cap (data.max_pixels)" in captured.out
    assert "DecompressionBombWarning" not in captured.err


@pytest.mark.slow
def test_a_training_run_prints_loratks_lines_and_no_known_noise(tmp_path, tiny_sdxl_dir, images_dir):
    recipe = make_recipe(tmp_path, tiny_sdxl_dir, images_dir, output_dir="runs", data={"dir": "images"})
    path = tmp_path / "r.toml"
    path.write_text(dump_recipe(recipe))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "loratk.cli", "train", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert any(line.startswith("plan: ") for line in lines) and any(
        line.startswith("done: ") for line in lines
    )
    noise = [line for line in lines if "torchvision" in line or "[RANK" in line or "Traceback" in line]
    assert not noise, noise
    assert Path(tmp_path / "runs" / "test" / "test.safetensors").is_file()
