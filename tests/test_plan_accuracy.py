"""The estimate against the same training step measured on real CPU tensors: a UNet with SDXL's layout at a
mid size (the full-size comparison is `benchmarks/plan_estimate.py --measure --unet full`, BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("plan_estimate", REPO / "benchmarks" / "plan_estimate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to read peak RSS")
def test_estimate_is_within_5_percent_of_the_measured_cpu_peak(bench):
    (row,) = bench.compare("mid", ["lora"], batch=2, resolution=512)
    assert row["tracked_real"] == pytest.approx(row["estimated"], rel=1e-3)  # fake and real tensors agree
    assert row["estimated"] == pytest.approx(row["measured"], rel=0.05)
    assert row["rise"] > 0.5 * row["resident"]  # the step's own memory, not only the weights, is compared
