"""benchmarks/train_step.py: the tiny smoke of every configuration runs (this is what CI runs), and the
full-size configuration is right, checked on the `meta` device without building a real model.
benchmarks/gpu_suite.py: its tiny smoke runs every part, a failing part is recorded and the next one runs,
and its pieces (budgets, goals, the trace's op ranking and compaction, the wheel install) are right."""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
import sys
import time
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
    assert set(rows) == {"a", "b", "c", "d", "e", "f"}
    for row in rows.values():
        assert row["status"] == "ok" and row["nonfinite_steps"] == 0
        assert row["s_per_step"] > 0 and row["images_per_s"] > 0 and row["tflop_per_step"] > 0
        assert row["gradient_checkpointing"]
    assert rows["a"]["width"] > rows["a"]["height"]  # 600x400 landscape, shrunk
    # Full fine-tuning trains every UNet weight; LoRA far fewer.
    assert rows["c"]["trainable_parameters"] > 4 * rows["b"]["trainable_parameters"]
    assert rows["d"]["prior_preservation"]
    assert {k for k, r in rows.items() if r["fused_backward"]} == {"c", "f"}
    assert {k for k, r in rows.items() if r["family"] == "sd1"} == {"e", "f"}
    assert rows["f"]["trainable_parameters"] > 4 * rows["e"]["trainable_parameters"]
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
        "e": ("lora", 512, 512, 8, 32, "adafactor"),
        "f": ("dreambooth", 512, 512, 4, None, "adafactor"),
    }
    assert {c.key: c.family for c in bench.CONFIGS if c.family != "sdxl"} == {"e": "sd1", "f": "sd1"}
    assert all(c.gradient_checkpointing and c.targets == "all-linear" for c in bench.CONFIGS)
    assert [c.key for c in bench.CONFIGS if c.fused_backward] == ["c", "f"]
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


def test_sd15_configurations_count_their_flops_on_meta(bench):
    """SD 1.5's UNet from its config, on the meta device: its parameter count and training FLOPs per image
    (full fine-tuning adds the frozen weights' gradients that LoRA skips)."""
    configs = {c.key: c for c in bench.CONFIGS}
    unet_config = bench.unet_config_of(configs["e"], tiny=False)
    unet = bench.build_unet(unet_config, torch.device("meta"))
    assert sum(p.numel() for p in unet.parameters()) == bench.SD15_UNET_PARAMETERS == 859_520_964
    lora = bench.count_flops_per_image_on_meta(unet_config, configs["e"])
    full = bench.count_flops_per_image_on_meta(unet_config, configs["f"])
    # Counted here 2026-12-01 (torch 2.13): 1.781 TFLOP per image for LoRA r32, 2.407 for full fine-tuning.
    assert lora / 1e12 == pytest.approx(1.781, abs=0.005)
    assert full / 1e12 == pytest.approx(2.407, abs=0.005)


def test_full_size_vae_and_text_encoder_configs_have_sdxl_s_parameter_counts():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from loratk.models import base_configs as base

    with torch.device("meta"):
        vae = AutoencoderKL(**base.SDXL_BASE_VAE_CONFIG)
        te1 = CLIPTextModel(CLIPTextConfig(**base.SDXL_BASE_TEXT_ENCODER_CONFIG))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**base.SDXL_BASE_TEXT_ENCODER_2_CONFIG))
    counts = [sum(p.numel() for p in m.parameters()) for m in (vae, te1, te2)]
    assert (
        counts
        == [
            base.SDXL_BASE_VAE_PARAMETERS,
            base.SDXL_BASE_TEXT_ENCODER_PARAMETERS,
            base.SDXL_BASE_TEXT_ENCODER_2_PARAMETERS,
        ]
        == [83_653_863, 123_060_480, 694_659_840]
    )


# ---------------------------------------------------------------- benchmarks/gpu_suite.py


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu_suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_gpu_suite_tiny_runs_every_part_and_writes_what_comes_back(suite, tmp_path, monkeypatch):
    """Every part on the tiny models, as the GPU run does them, without `datasets` (the GPU machine has none)."""
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    out = tmp_path / "out"
    assert suite.main(["--tiny", "--out", str(out)]) == 0
    report = json.loads((out / "suite.json").read_text())
    parts = report["parts"]
    assert list(parts) == list(suite.BUDGETS_S)
    assert {name: p["status"] for name, p in parts.items()} == dict.fromkeys(suite.BUDGETS_S, "ok")
    assert all(p["seconds"] > 0 for p in parts.values())
    for key in "abcd":
        row = parts[f"train_{key}"]["result"]
        assert row["config"] == key and row["status"] == "ok" and row["nonfinite_steps"] == 0
        assert row["s_per_step"] > 0 and row["images_per_s"] > 0
    captions = parts["caption"]["result"]["results"]
    assert [r["batch_size"] for r in captions] == [16, 32]
    assert all(r["images_per_s"] > 0 and r["generate_images_per_s"] > 0 for r in captions)
    rows = parts["sampling"]["result"]["rows"]
    assert [r["batch_size"] for r in rows] == [1, 4]
    assert all(r["s_per_image"] > 0 and r["vae_decode_s_per_image"] > 0 for r in rows)
    profile = parts["profile_b"]["result"]
    assert profile["kind"] == "cpu" and profile["steps"] == 1 and len(profile["ops"]) == 10
    assert profile["trace"]["kept"] == "as recorded"
    # What the device tool brings back: 4 files, each small, at most 2 folders down.
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert files == ["profile/b.top.txt", "profile/b.trace.json.gz", "suite.json", "suite.log"]
    assert suite.check_out_folder(out) == []
    names = {e.get("name") for e in json.loads(gzip.decompress((out / files[1]).read_bytes()))["traceEvents"]}
    assert "ProfilerStep#1" in names and "aten::mm" in names
    top = (out / "profile" / "b.top.txt").read_text().splitlines()
    assert top[0].startswith("Top 30 ops by self CPU time") and len(top) == 3 + 30
    # Tiny figures judge no goal; every goal is listed.
    assert [g["met"] for g in report["goals"]] == [None] * 5
    assert (
        report["machine"]["device"].startswith("CPU")
        and "== profile_b: ok" in (out / "suite.log").read_text()
    )


def test_gpu_suite_records_a_failing_part_and_runs_the_next(suite, tmp_path, monkeypatch):
    def out_of_memory(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(suite, "run_caption_part", out_of_memory)
    out = tmp_path / "out"
    assert suite.main(["--tiny", "--parts", "caption,sampling", "--out", str(out)]) == 1
    parts = json.loads((out / "suite.json").read_text())["parts"]
    assert parts["caption"]["status"] == "OOM" and "Tried to allocate" in parts["caption"]["error"]
    assert parts["sampling"]["status"] == "ok" and parts["sampling"]["result"]["rows"][0]["s_per_image"] > 0


def test_run_parts_stops_a_part_at_its_budget_and_records_every_outcome(suite):
    def slow():
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # Python code: the alarm interrupts it
            time.sleep(0.01)
        return {"never": True}

    def broken():
        raise ValueError("bad figure")

    seen = []
    parts = [
        suite.Part("slow", 0.3, slow),
        suite.Part("ok", 5, lambda: {"x": 1.0}),
        suite.Part("broken", 5, broken),
        suite.Part("oom", 5, lambda: {"status": "OOM", "error": "from the benchmark's own row"}),
        suite.Part("after", 5, lambda: {"y": 2.0}),
        suite.Part("late", 0, lambda: {"z": 3.0}),  # the budgets so far are spent... but slack passes on
    ]
    start = time.monotonic()
    records = suite.run_parts(parts, on_record=lambda r: seen.append(list(r)), min_start_s=0.01)
    assert time.monotonic() - start < 5
    assert {k: r["status"] for k, r in records.items()} == {
        "slow": "timeout",
        "ok": "ok",
        "broken": "error",
        "oom": "OOM",
        "after": "ok",
        "late": "ok",
    }
    assert records["broken"]["error"] == "ValueError: bad figure"
    assert records["slow"]["seconds"] < 2 and "budget" in records["slow"]["error"]
    assert records["after"]["result"] == {"y": 2.0}
    assert seen[-1] == list(records) and len(seen) == len(parts)  # recorded after every part
    goals = {g["goal"]: g["met"] for g in suite.evaluate_goals(records, tiny=False)}
    assert goals["nothing runs out of memory"] is False
    # A part whose share of the budgets is gone is skipped, not started.
    spent = suite.run_parts(
        [suite.Part("a", 0.5, lambda: time.sleep(0.45) or {}), suite.Part("b", 0, dict)], min_start_s=0.2
    )
    assert spent["b"]["status"] == "skipped" and "left" in spent["b"]["error"]


def test_goals_are_judged_from_the_figures(suite):
    def ok(**result):
        return {"status": "ok", "result": result}

    records = {
        "train_a": ok(peak_memory_gib=13.2),
        "train_b": ok(bf16_peak_share=0.31),
        "train_c": ok(peak_memory_gib=22.5),
        "train_d": ok(),
        "caption": ok(
            results=[{"batch_size": 16, "images_per_s": 48.0}, {"batch_size": 32, "images_per_s": 61.0}]
        ),
        "sampling": ok(),
        "profile_b": ok(),
    }
    goals = [(g["value"], g["met"]) for g in suite.evaluate_goals(records, tiny=False)]
    assert goals[:4] == [(13.2, True), (0.31, False), (22.5, False), (61.0, True)]
    assert goals[4][1] is True  # every part ran, none out of memory
    records["train_d"] = {"status": "timeout"}
    assert suite.evaluate_goals(records, tiny=False)[4]["met"] is None


def test_trace_ranking_credits_self_time(suite):
    def op(name, ts, dur, ext=None, tid=1):
        return {
            "ph": "X",
            "cat": "cpu_op",
            "name": name,
            "ts": ts,
            "dur": dur,
            "tid": tid,
            "args": {"External id": ext},
        }

    step = {"ph": "X", "cat": "user_annotation", "name": "ProfilerStep#1", "ts": 0, "dur": 200, "tid": 1}
    cpu = [step, op("A", 0, 100), op("B", 10, 30), op("D", 15, 10), op("C", 50, 10), op("A", 120, 20, tid=2)]
    ranking = suite.rank_trace_ops(cpu)
    assert ranking["kind"] == "cpu" and ranking["steps"] == 1 and ranking["step_ms"] == 0.2
    got = {r["name"]: (r["self_ms"] * 1000, r["calls"]) for r in ranking["ops"]}
    assert got == {"A": (80.0, 2), "B": (20.0, 1), "D": (10.0, 1), "C": (10.0, 1)}

    def kernel(name, dur, ext):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": 0, "dur": dur, "args": {"External id": ext}}

    cuda = [step, op("aten::mm", 0, 5, ext=7), op("aten::add", 5, 5, ext=8)]
    cuda += [
        kernel("gemm", 60, 7),
        kernel("gemm", 40, 7),
        kernel("add_kernel", 20, 8),
        kernel("memset", 5, 99),
    ]
    ranking = suite.rank_trace_ops(cuda)
    assert ranking["kind"] == "device" and ranking["device_busy_share"] == pytest.approx(125 / 200)
    assert [(r["name"], r["self_ms"] * 1000) for r in ranking["ops"]] == [
        ("aten::mm", 100.0),
        ("aten::add", 20.0),
        ("(no op: memset)", 5.0),
    ]
    assert ranking["kernels"][0] == {"name": "gemm", "ms": 0.1}
    assert "device was busy 62.5%" in suite.format_op_table(ranking)


def test_compact_trace_drops_detail_until_the_file_fits(suite, tmp_path):
    events = [{"ph": "M", "name": "process_name", "args": {"name": "python"}}]
    for i in range(2000):
        events.append({"ph": "X", "cat": "cpu_op", "name": f"aten::op{i}", "ts": i, "dur": 5 + i % 50})
        events.append({"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": i, "dur": 2})
        events.append({"ph": "s", "cat": "ac2g", "id": i, "ts": i})
        events.append({"ph": "X", "cat": "kernel", "name": f"kernel{i % 7}", "ts": i, "dur": 3})
    trace = {"traceEvents": events, "schemaVersion": 1}
    raw = json.dumps(trace).encode()
    whole = suite.compact_trace(raw, trace, tmp_path / "whole.json.gz", limit=len(raw))
    assert whole["kept"] == "as recorded" and (tmp_path / "whole.json.gz").stat().st_size == whole["bytes"]
    nothing = suite.compact_trace(raw, None, tmp_path / "none.json.gz", limit=1)
    assert nothing["file"] is None and not (tmp_path / "none.json.gz").exists()
    sizes = [size for _, size in nothing["tried"]]
    assert len(sizes) == len(suite.COMPACTION_LEVELS) and sizes == sorted(sizes, reverse=True)
    out = tmp_path / "t.json.gz"
    kept = suite.compact_trace(raw, trace, out, limit=sizes[2])
    assert kept["kept"] == suite.COMPACTION_LEVELS[2][0] and out.stat().st_size == kept["bytes"] <= sizes[2]
    back = json.loads(gzip.decompress(out.read_bytes()))
    assert {e.get("cat") for e in back["traceEvents"]} == {None, "cpu_op", "kernel"}
    assert min(e["dur"] for e in back["traceEvents"] if e.get("cat") == "cpu_op") >= 20
    assert back["schemaVersion"] == 1


def test_gpu_wheels_are_chosen_only_where_the_machine_lacks_them(suite, tmp_path):
    wheels = [
        tmp_path / "diffusers-0.42.1-py3-none-any.whl",
        tmp_path / "typing_extensions-4.16.0-py3-none-any.whl",
        tmp_path / "pydantic_core-2.50.5-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        tmp_path / "tomli_w-1.2.0-py3-none-any.whl",
    ]
    assert suite.parse_wheel_filename(wheels[2]) == ("pydantic-core", "2.50.5")
    installed = {"typing-extensions": "4.15.0", "pydantic-core": "2.50.5", "tomli-w": "1.3.0"}
    chosen, kept = suite.select_wheels(wheels, installed)
    assert chosen == wheels[:2]  # missing, older: installed; the same or newer: the machine's is kept
    assert kept == ["pydantic-core 2.50.5: 2.50.5 is installed", "tomli-w 1.2.0: 1.3.0 is installed"]
    with pytest.raises(ValueError, match="not a wheel"):
        suite.parse_wheel_filename(tmp_path / "notes.txt")
    with pytest.raises(RuntimeError, match="gpu_wheels.sh"):
        suite.install_wheels(tmp_path, tmp_path / "site")  # no .whl files there


def test_import_check_names_what_is_missing_and_how_to_fix_it(suite, tmp_path):
    problems = suite.check_imports(
        ["json", "no_such_package_xyz"], [("json", "dumps"), ("json", "no_such_name")]
    )
    assert len(problems) == 2
    assert problems[0].startswith("no_such_package_xyz: ModuleNotFoundError")
    assert problems[1].startswith("json.no_such_name: AttributeError")
    hint = suite.import_problem_hint(problems, tmp_path / ".gpu-wheels")
    assert "no_such_package_xyz" in hint and "gpu_wheels.sh" in hint and ".gpu-wheels" in hint
    assert "--install" in suite.import_problem_hint(problems, None)
    assert suite.check_imports() == []  # this environment has everything the suite needs


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
