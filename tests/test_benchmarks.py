"""benchmarks/train_step.py: the tiny smoke of every configuration runs (this is what CI runs), and the
full-size configuration is right, checked on the `meta` device without building a real model."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("train_step", REPO / "benchmarks" / "train_step.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_benchmark()


@pytest.fixture
def one_thread():
    """The benchmark's `--threads 1`, for tests that build a step directly (CPU time is shared here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build_tiny_step(bench, key: str):
    from accelerate import Accelerator

    from loratk.models.tiny import TINY_UNET_CONFIG

    config = bench.tiny_version(next(c for c in bench.CONFIGS if c.key == key))
    accelerator = Accelerator(mixed_precision="no")
    step = bench.build_step(
        accelerator, config, TINY_UNET_CONFIG, weight_dtype=torch.float32, full_dtype=torch.float32
    )
    return accelerator, config, step


def test_tiny_smoke_runs_every_configuration_through_the_training_loop(bench, tmp_path):
    out = tmp_path / "rows.json"
    assert bench.main(["--tiny", "--steps", "1", "--warmup", "0", "--threads", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    rows = {r["config"]: r for r in report["rows"]}
    assert report["header"]["unet"] == "tiny"
    assert set(rows) == {"a", "b", "c", "d"}
    for row in rows.values():
        assert row["status"] == "ok" and row["nonfinite_steps"] == 0
        assert row["s_per_step"] > 0 and row["images_per_s"] > 0 and row["tflop_per_step"] > 0
        assert row["gradient_checkpointing"]
    assert rows["a"]["width"] > rows["a"]["height"]  # 600x400 landscape, shrunk
    # Full fine-tuning trains every UNet weight; LoRA far fewer.
    assert rows["c"]["trainable_parameters"] > 4 * rows["b"]["trainable_parameters"]
    assert rows["d"]["prior_preservation"]
    assert {k for k, r in rows.items() if r["fused_backward"]} == {"c"}
    # (d) does (b)'s UNet work per step: same size, rank and images (1 instance + 1 class), so FLOPs match.
    assert rows["d"]["tflop_per_step"] == rows["b"]["tflop_per_step"]
    # The labels say the rank the tiny mode trains (8), not the full-size one.
    assert "r8 " in rows["a"]["what"] and "r128" not in json.dumps(report["rows"])


def test_configurations_are_the_issue_s(bench):
    got = {c.key: (c.method, c.width, c.height, c.batch_size, c.rank, c.optimizer) for c in bench.CONFIGS}
    assert got == {
        "a": ("lora", 600, 400, 20, 128, "adafactor"),
        "b": ("lora", 1024, 1024, 8, 128, "adafactor"),
        "c": ("dreambooth", 1024, 1024, 4, None, "adafactor"),
        "d": ("dreambooth-lora", 1024, 1024, 4, 128, "adafactor"),
    }
    assert all(c.gradient_checkpointing and c.targets == "all-linear" for c in bench.CONFIGS)
    assert [c.key for c in bench.CONFIGS if c.fused_backward] == ["c"]
    assert [c.key for c in bench.CONFIGS if c.prior_preservation] == ["d"]


def test_config_c_steps_every_weight_inside_backward(bench, one_thread):
    from loratk.core.optim import FusedBackwardOptimizer

    accelerator, config, step = _build_tiny_step(bench, "c")
    fused = step.optimizer.optimizer  # inside Accelerate's wrapper
    assert isinstance(fused, FusedBackwardOptimizer) and fused.max_grad_norm == bench.MAX_GRAD_NORM
    params = dict(step.unet.named_parameters())
    assert len(fused.inner_optimizers()) == len(params)  # full fine-tuning: one inner Adafactor per weight
    before = {n: p.detach().clone() for n, p in params.items()}
    # Backward alone updates the weights: no optimizer.step() call.
    accelerator.backward(step.objective.compute_loss(step.batch).loss)
    changed = {n for n, p in params.items() if not torch.equal(p, before[n])}
    assert changed == set(params)
    assert all(p.grad is None for p in params.values())  # each gradient freed once used
    # And through the training loop, as the benchmark times it.
    stepped = {n: p.detach().clone() for n, p in params.items()}
    result = bench.train_steps(accelerator, step, config, 1)
    assert result.global_step == 1 and result.state.nonfinite_steps == 0 and fused.skipped == 0
    assert all(not torch.equal(p, stepped[n]) for n, p in params.items())


def test_config_d_trains_the_dreambooth_objective_with_its_prior_loss(bench, one_thread):
    from loratk.objectives.dreambooth import DreamBoothObjective

    _, config, step = _build_tiny_step(bench, "d")
    assert isinstance(step.objective, DreamBoothObjective)
    batch = step.batch  # as collate_dreambooth makes it: the instance example, then its class example
    assert batch["num_instance"] == 1 and batch["latents"].shape[0] == config.batch_size == 2
    assert batch["paths"] == ["synthetic/instance0.png", "synthetic/class0.png"]
    with torch.no_grad():
        out = step.objective.compute_loss(batch)
        other_class = dict(batch, latents=torch.cat([batch["latents"][:1], 3 * batch["latents"][1:]]))
        changed = step.objective.compute_loss(other_class)
    instance, prior = out.logs["train/instance_loss"], out.logs["train/prior_loss"]
    torch.testing.assert_close(out.loss, instance + bench.PRIOR_LOSS_WEIGHT * prior)
    assert out.num_images == 1  # instance images; the class image is the prior's
    # Another class half changes the prior term and the loss, not the instance term.
    torch.testing.assert_close(changed.logs["train/instance_loss"], instance)
    assert abs(changed.logs["train/prior_loss"] - prior) > 1e-3
    assert abs(changed.loss - out.loss) > 1e-3


@pytest.mark.slow  # ~15 s, most of it torch building its event list for `key_averages`
def test_profile_writes_a_chrome_trace_and_a_top_ops_table(bench, tmp_path):
    out, rows = tmp_path / "profile", tmp_path / "rows.json"
    args = ["--tiny", "--configs", "a", "--steps", "1", "--warmup", "0", "--threads", "1"]
    assert bench.main([*args, "--profile", str(out), "--profile-steps", "1", "--json", str(rows)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a.top.txt", "a.trace.json"]
    names = {e.get("name") for e in json.loads((out / "a.trace.json").read_text())["traceEvents"]}
    # One traced step; the profiler's warm-up step (#0) is not in the trace.
    assert "ProfilerStep#1" in names and not names & {"ProfilerStep#0", "ProfilerStep#2"}
    assert "aten::convolution" in names
    lines = (out / "a.top.txt").read_text().splitlines()
    assert "Self CPU %" in lines[1]  # no CUDA: ranked by self CPU time
    ops = lines[3 : lines.index(lines[0], 3)]
    assert 0 < len(ops) <= 30 and any("aten::mm " in line for line in ops)
    shares = [float(re.search(r"\s([\d.]+)%", line).group(1)) for line in ops]
    assert shares == sorted(shares, reverse=True)
    row = json.loads(rows.read_text())["rows"][0]
    assert row["status"] == "ok" and row["profile_trace"] == str(out / "a.trace.json")


def test_full_size_unet_config_has_sdxl_s_parameter_count(bench):
    unet = bench.build_unet(bench.SDXL_UNET_CONFIG, torch.device("meta"))
    assert sum(p.numel() for p in unet.parameters()) == bench.SDXL_UNET_PARAMETERS == 2_567_463_684


@pytest.mark.slow
def test_full_size_flops_per_image_match_the_measured_figures(bench):
    """The issue's measured figures: rank-128 attention LoRA, 15.05 TFLOP at 1024², 3.23 at 600x400."""
    config = bench.BenchConfig("x", "", "lora", 1024, 1024, 1, targets="attention")
    for (width, height), tflop in (((1024, 1024), 15.05), ((600, 400), 3.23)):
        sized = bench.replace(config, width=width, height=height)
        flops = bench.count_flops_per_image_on_meta(bench.SDXL_UNET_CONFIG, sized)
        assert flops / 1e12 == pytest.approx(tflop, abs=0.005)


def test_bf16_peak_table(bench):
    assert bench.find_bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert bench.find_bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert bench.find_bf16_peak_tflops("NVIDIA RTX A5000") == 111.1
    assert bench.find_bf16_peak_tflops("Some Future GPU") is None


def test_the_gan_benchmark_times_both_methods_through_the_real_steps(tmp_path, one_thread, monkeypatch):
    spec = importlib.util.spec_from_file_location("gan_steps", REPO / "benchmarks" / "gan_steps.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "SETTINGS", ((32, 2),))  # tiny: the CPU figures come from the real sizes
    out = tmp_path / "gan.json"
    assert (
        module.main(["--steps", "1", "--warmup", "0", "--rounds", "1", "--diffusion", "--json", str(out)])
        == 0
    )
    report = json.loads(out.read_text())
    assert [(r["method"], r["resolution"], r["batch"]) for r in report["steps"]] == [
        ("dcgan", 32, 2),
        ("wgan-gp", 32, 2),
    ]
    assert all(r["steps_per_s"] > 0 for r in report["steps"])
