"""Shared fixtures: offline hub, a tiny SDXL saved once per session, example images, a clean Accelerate state."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from a second thread, and the runs that tests start as subprocesses would
# oversubscribe the cores: one thread each, here and in every subprocess (which inherits this).
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "quickstart"


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def _loratk_cache(tmp_path_factory):
    """Point builtin:tiny-sdxl at a per-session cache so tests never touch the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("loratk-cache")
    os.environ["LORATK_CACHE"] = str(cache)
    yield cache


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL diffusers folder, saved with save_pretrained (loaded back via from_pretrained)."""
    from loratk.models.tiny import save_tiny_sdxl

    return save_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "model")


@pytest.fixture
def images_dir(tmp_path) -> Path:
    """A copy of the bundled example images, with sidecar captions, that a test may change."""
    from helpers import copy_examples

    return copy_examples(tmp_path / "images")


@pytest.fixture(autouse=True)
def _reset_accelerate():
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
