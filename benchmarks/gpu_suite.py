"""The GPU measurements in one command: every figure that BENCHMARKS.md's GPU goals need, on full-size
models with random weights built from configs (nothing is downloaded), under a 24 GiB memory cap, in at
most 6 minutes on an H100 or H200.

    PYTHONPATH=src python3 benchmarks/gpu_suite.py --install .gpu-wheels --out OUT   # the GPU machine
    PYTHONPATH=src python benchmarks/gpu_suite.py --tiny --out /tmp/suite           # CPU: tiny models, seconds

Parts, in this order, each in its own try/except and with its own time budget:

  train_a .. train_d   benchmarks/train_step.py's configurations (a)-(d): s/step, images/s, peak memory,
                       share of the bf16 peak
  caption              benchmarks/caption.py: BLIP-large-shaped, fp16, batch 16 and 32, 20-token captions
  sampling             benchmarks/sampling.py: seconds per 1024² image at 30 steps, batch 1 and 4
  profile_b            one step of (b) under torch.profiler: a chrome trace and the top 30 ops

A part that fails (an error, out of memory) is recorded and the next one runs. Budgets add up: each part must
end by the sum of the budgets so far (time a part leaves unused passes to the next), and one still running
then is stopped and recorded as "timeout". The whole cannot outrun the sum (315 s) by more than the
start-up (install, imports, CUDA): a watchdog ends the process if a part hangs where it cannot be stopped.

Written to OUT (4 files, each under 16 MB):
  suite.json                 every figure, machine and versions, the goals met or not; rewritten after each part
  suite.log                  everything printed
  profile/b.trace.json.gz    the chrome trace (https://ui.perfetto.dev opens .gz), compacted to fit 15 MB
  profile/b.top.txt          the 30 ops with the most self device time (CPU time without a GPU), top kernels

`--install DIR` first installs the wheels `benchmarks/gpu_wheels.sh` downloaded (`pip install --no-index
--no-deps`, each one only where the machine has no newer version) into a folder put first on sys.path, and
stops with exit code 3, naming what is missing, if loratk, diffusers or pydantic still do not import.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import faulthandler
import gc
import gzip
import importlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

MEMORY_CAP_GIB = 24.0
OUT_FILE_LIMIT = 16 * 2**20  # what the device tool brings back, per file
TRACE_LIMIT = 15 * 2**20

# Part budgets in seconds on an H100/H200 (sum 315 s; with the watchdog's 20 s and ~20 s of start-up, under
# 6 minutes): full-size builds are a few seconds each, BLIP-large is built, saved and reloaded for each
# caption run, and the profile's trace is parsed in Python.
BUDGETS_S = {
    "train_a": 35,
    "train_b": 35,
    "train_c": 50,
    "train_d": 30,
    "caption": 55,
    "sampling": 50,
    "profile_b": 60,
}
TINY_BUDGET_S = 120  # per part, on a shared CPU
TRAIN_STEPS, TRAIN_WARMUP = 5, 2  # full size; tiny: 1 and 0
CAPTION_MAX_LENGTH = 20  # random weights never stop early; real BLIP captions are ~10-20 tokens

# What must import before anything is measured: the suite's own needs, not all of loratk (`datasets` is
# left out: only `loratk.data.captions` imports it, to read caption manifests, which the suite never does).
REQUIRED_IMPORTS = (
    "diffusers",
    "pydantic",
    "tomli_w",
    "transformers",
    "peft",
    "accelerate",
    "loratk",
    "loratk.recipe",
    "loratk.core.loop",
    "loratk.captioning",
    "loratk.sampling.pipeline",
    "loratk.models.sdxl",
)
REQUIRED_NAMES = (
    ("diffusers", "UNet2DConditionModel"),
    ("diffusers", "AutoencoderKL"),
    ("diffusers", "StableDiffusionXLPipeline"),  # diffusers' pipelines import requests
    ("transformers", "BlipForConditionalGeneration"),
    ("transformers", "CLIPTextModelWithProjection"),
)
VERSIONS_OF = (
    "torch",
    "diffusers",
    "transformers",
    "peft",
    "accelerate",
    "safetensors",
    "huggingface_hub",
    "pydantic",
    "typing_extensions",
    "numpy",
    "pillow",
)


# ---------------------------------------------------------------- installing the wheels


def canonical_name(name: str) -> str:
    """PEP 503: `Typing_Extensions` and `typing-extensions` are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_wheel_filename(path: Path) -> tuple[str, str]:
    """(canonical distribution name, version) of `name-version-...-platform.whl`."""
    parts = path.name.split("-")
    if not path.name.endswith(".whl") or len(parts) < 5:
        raise ValueError(f"{path.name}: not a wheel file name (name-version-python-abi-platform.whl)")
    return canonical_name(parts[0]), parts[1]


def installed_versions(names: Sequence[str]) -> dict[str, str]:
    found = {}
    for name in names:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


def select_wheels(wheels: Sequence[Path], installed: Mapping[str, str]) -> tuple[list[Path], list[str]]:
    """The wheels to install: those whose distribution is missing here or older than the wheel. Returns
    them and, for the others, why they are skipped (the machine's own version is kept, never replaced)."""
    from packaging.version import Version

    chosen, skipped = [], []
    for wheel in wheels:
        name, version = parse_wheel_filename(wheel)
        have = installed.get(name)
        if have is not None and Version(have) >= Version(version):
            skipped.append(f"{name} {version}: {have} is installed")
        else:
            chosen.append(wheel)
    return chosen, skipped


def install_wheels(folder: Path, target: Path) -> dict[str, Any]:
    """`pip install --no-index --no-deps --target target` of the wheels in `folder` that are needed; put
    `target` first on sys.path. Raises RuntimeError saying what to do if pip fails or there are no wheels."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        raise RuntimeError(
            f"no wheels in {folder}: run `bash benchmarks/gpu_wheels.sh` on a machine that reaches PyPI, "
            f"and carry {folder.name} to this machine"
        )
    names = [parse_wheel_filename(w)[0] for w in wheels]
    chosen, skipped = select_wheels(wheels, installed_versions(names))
    if chosen:
        command = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
        command += ["--no-compile", "--upgrade", "--target", str(target), *map(str, chosen)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"pip could not install the wheels from {folder} (exit {done.returncode}):\n"
                f"{(done.stdout + done.stderr).strip()}"
            )
    if str(target) not in sys.path:
        sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    return {
        "folder": str(folder),
        "target": str(target),
        "installed": [w.name for w in chosen],
        "kept": skipped,
    }


def check_imports(
    modules: Sequence[str] = REQUIRED_IMPORTS, names: Sequence[tuple[str, str]] = REQUIRED_NAMES
) -> list[str]:
    """One line per module or name that does not import, with the reason; [] when all do."""
    problems = []
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - any import failure is reported, not raised
            problems.append(f"{module}: {type(err).__name__}: {err}")
    for module, name in names:
        if any(p.startswith(f"{module}:") for p in problems):
            continue
        try:
            getattr(importlib.import_module(module), name)
        except Exception as err:  # noqa: BLE001
            problems.append(f"{module}.{name}: {type(err).__name__}: {err}")
    return problems


def import_problem_hint(problems: Sequence[str], wheels: Path | None) -> str:
    lines = ["cannot run the suite; these do not import:", *(f"  {p}" for p in problems)]
    if any("No module named 'loratk'" in p for p in problems):
        lines.append("  loratk: run from the repository root with PYTHONPATH=src")
    if wheels is None:
        lines.append("  fix: pass --install .gpu-wheels (the wheels of `bash benchmarks/gpu_wheels.sh`)")
    else:
        lines.append(
            f"  fix: {wheels} lacks a wheel or holds one for another Python; rerun "
            "`bash benchmarks/gpu_wheels.sh` on a machine that reaches PyPI (add the missing package to its "
            "list if it is new) and carry the folder again"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- running parts under budgets


class PartTimeout(BaseException):
    """A part ran past its budget. Not an Exception, so library code that catches those lets it through."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise `PartTimeout` in the main thread after `seconds` (SIGALRM; the next Python bytecode after a
    blocking call). Elsewhere (another thread, no SIGALRM) the limit is not enforced."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(_signum: int, _frame: Any) -> None:
        raise PartTimeout(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    budget_s: float
    run: Callable[[], dict[str, Any]]  # the figures; a "status" key other than "ok" marks the part so


def _is_out_of_memory(err: BaseException) -> bool:
    import torch

    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def run_parts(
    parts: Sequence[Part],
    *,
    on_record: Callable[[dict[str, dict[str, Any]]], None] = lambda records: None,
    cleanup: Callable[[], None] = lambda: None,
    min_start_s: float = 1.0,
) -> dict[str, dict[str, Any]]:
    """Run `parts` in order. Each ends by the sum of the budgets up to it; one with less than `min_start_s`
    left is skipped. Every outcome is recorded (status ok / OOM / error / timeout / skipped, seconds, the
    figures or the error) and `on_record` gets all records after each part."""
    records: dict[str, dict[str, Any]] = {}
    due = time.monotonic()
    for part in parts:
        due += part.budget_s
        left = due - time.monotonic()
        record: dict[str, Any] = {"budget_s": part.budget_s}
        print(f"== {part.name} (budget {part.budget_s:.0f} s, {left:.0f} s left for it)", flush=True)
        start = time.monotonic()
        if left < min_start_s:
            record.update(status="skipped", error=f"{left:.1f} s left of the budgets so far")
        else:
            try:
                with time_limit(left):
                    result = part.run()
                record.update(status=result.get("status", "ok"), result=result)
            except PartTimeout as err:
                record.update(
                    status="timeout", error=f"stopped after {time.monotonic() - start:.1f} s: {err}"
                )
            except Exception as err:  # noqa: BLE001 - one failing part must not stop the others
                status = "OOM" if _is_out_of_memory(err) else "error"
                record.update(status=status, error=f"{type(err).__name__}: {err}"[:2000])
                traceback.print_exc(file=sys.stdout)
            finally:
                cleanup()
        record["seconds"] = time.monotonic() - start
        print(f"== {part.name}: {record['status']} in {record['seconds']:.1f} s", flush=True)
        records[part.name] = record
        on_record(records)
    return records


# ---------------------------------------------------------------- the profile's trace


KERNEL_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset"})


def rank_trace_ops(events: Sequence[dict[str, Any]], limit: int = 30) -> dict[str, Any]:
    """The ops with the most self time in a chrome trace's events.

    With device kernels (a CUDA trace): each kernel's time is credited to the op that launched it (same
    "External id"), i.e. self device time; the kernels are also ranked by name. Without (a CPU trace): self
    CPU time, an op's duration less that of the ops nested in it on the same thread. Steps are the
    `ProfilerStep#N` ranges."""
    ops = [e for e in events if e.get("cat") == "cpu_op" and e.get("ph") == "X"]
    kernels = [e for e in events if e.get("cat") in KERNEL_CATEGORIES and e.get("ph") == "X"]
    steps = [e for e in events if str(e.get("name", "")).startswith("ProfilerStep#") and e.get("ph") == "X"]
    step_us = sum(e["dur"] for e in steps)
    self_us: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    if kernels:
        launcher = {e.get("args", {}).get("External id"): e["name"] for e in ops}
        for kernel in kernels:
            name = launcher.get(
                kernel.get("args", {}).get("External id"), "(no op: " + kernel["name"][:60] + ")"
            )
            self_us[name] += kernel["dur"]
            calls[name] += 1
        busy_us = sum(k["dur"] for k in kernels)
        by_kernel: dict[str, float] = defaultdict(float)
        for kernel in kernels:
            by_kernel[kernel["name"]] += kernel["dur"]
        top_kernels = sorted(by_kernel.items(), key=lambda kv: -kv[1])[:10]
    else:
        by_thread: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for op in ops:
            by_thread[(op.get("pid"), op.get("tid"))].append(op)
        for thread_ops in by_thread.values():
            thread_ops.sort(key=lambda e: (e["ts"], -e["dur"]))  # a parent before the ops nested in it
            stack: list[list[Any]] = []  # the open ops: [end, name, duration, time of direct children]
            for op in [*thread_ops, None]:
                while stack and (op is None or stack[-1][0] <= op["ts"]):
                    _end, name, duration, children = stack.pop()
                    self_us[name] += max(0.0, duration - children)
                if op is None:
                    break
                calls[op["name"]] += 1
                if stack:
                    stack[-1][3] += op["dur"]
                stack.append([op["ts"] + op["dur"], op["name"], op["dur"], 0.0])
        busy_us = None
        top_kernels = []
    total_us = sum(self_us.values())
    rows = [
        {
            "name": name,
            "self_ms": us / 1000,
            "share": us / total_us if total_us else 0.0,
            "calls": calls[name],
        }
        for name, us in sorted(self_us.items(), key=lambda kv: -kv[1])[:limit]
    ]
    return {
        "kind": "device" if kernels else "cpu",
        "steps": len(steps),
        "step_ms": step_us / 1000 / max(len(steps), 1),
        "total_self_ms": total_us / 1000,
        "device_busy_share": (busy_us / step_us) if busy_us is not None and step_us else None,
        "ops": rows,
        "kernels": [{"name": n, "ms": us / 1000} for n, us in top_kernels],
    }


def format_op_table(ranking: Mapping[str, Any]) -> str:
    what = "self device time" if ranking["kind"] == "device" else "self CPU time"
    count = "kernels" if ranking["kind"] == "device" else "calls"
    lines = [
        f"Top {len(ranking['ops'])} ops by {what}, over {ranking['steps']} profiled step(s) of "
        f"{ranking['step_ms']:.1f} ms each; {ranking['total_self_ms']:.1f} ms of {what} in all"
        + (
            f"; the device was busy {ranking['device_busy_share'] * 100:.1f}% of the step"
            if ranking["device_busy_share"] is not None
            else ""
        ),
        "",
        f"{'op':<60} {'ms':>10} {'share':>7} {count:>8}",
    ]
    for row in ranking["ops"]:
        lines.append(
            f"{row['name'][:60]:<60} {row['self_ms']:>10.2f} {row['share'] * 100:>6.1f}% {row['calls']:>8}"
        )
    if ranking["kernels"]:
        lines += ["", "Top kernels by device time", ""]
        lines += [f"{k['ms']:>10.2f} ms  {k['name'][:150]}" for k in ranking["kernels"]]
    return "\n".join(lines) + "\n"


# Each level drops more of the trace; the first whose gzip fits is kept.
COMPACTION_LEVELS = (
    ("as recorded", lambda e: True),
    (
        "without flow arrows and CUDA runtime calls",
        lambda e: (
            e.get("ph") not in ("s", "f") and e.get("cat") not in ("cuda_runtime", "cuda_driver", "ac2g")
        ),
    ),
    (
        "without flow arrows, CUDA runtime calls and CPU ops under 20 us",
        lambda e: (
            e.get("ph") not in ("s", "f")
            and e.get("cat") not in ("cuda_runtime", "cuda_driver", "ac2g")
            and not (e.get("cat") == "cpu_op" and e.get("dur", 0) < 20)
        ),
    ),
    (
        "device kernels and step ranges only",
        lambda e: (
            e.get("ph") == "M"
            or e.get("cat") in KERNEL_CATEGORIES
            or e.get("cat") in ("user_annotation", "gpu_user_annotation")
        ),
    ),
)


def compact_trace(
    raw: bytes, trace: dict[str, Any] | None, out: Path, limit: int = TRACE_LIMIT
) -> dict[str, Any]:
    """Write the gzipped chrome trace to `out`, dropping detail level by level until it fits in `limit`
    bytes; if even the last level is too big, write nothing. `trace` is `raw` parsed (or None to parse it
    only if needed). Returns what was kept."""
    data = gzip.compress(raw, compresslevel=3)
    levels = [("as recorded", len(data))]
    if len(data) <= limit:
        out.write_bytes(data)
        return {"file": out.name, "bytes": len(data), "kept": "as recorded", "tried": levels}
    trace = trace if trace is not None else json.loads(raw)
    events = trace.get("traceEvents", [])
    for label, keep in COMPACTION_LEVELS[1:]:
        smaller = dict(trace, traceEvents=[e for e in events if keep(e)])
        data = gzip.compress(json.dumps(smaller, separators=(",", ":")).encode(), compresslevel=3)
        levels.append((label, len(data)))
        if len(data) <= limit:
            out.write_bytes(data)
            return {"file": out.name, "bytes": len(data), "kept": label, "tried": levels}
    return {"file": None, "bytes": 0, "kept": "nothing: over the limit at every level", "tried": levels}


# ---------------------------------------------------------------- the parts


@dataclasses.dataclass
class Context:
    """What every part shares: the mode, the device, one Accelerator, the folders."""

    tiny: bool
    accelerator: Any
    device: Any
    peak_tflops: float | None
    out: Path
    work: Path  # scratch space, not brought back


def _benchmark(name: str) -> Any:
    """A module of benchmarks/ (not a package): imported from there, once."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _train_config(key: str, tiny: bool) -> Any:
    ts = _benchmark("train_step")
    config = next(c for c in ts.CONFIGS if c.key == key)
    return ts.tiny_version(config) if tiny else config


def run_train_part(ctx: Context, key: str) -> dict[str, Any]:
    """One configuration of benchmarks/train_step.py, as its `--full-size --memory-cap-gib 24` runs it."""
    import torch

    from loratk.models.tiny import TINY_UNET_CONFIG

    ts = _benchmark("train_step")
    dtype = torch.float32 if ctx.tiny else torch.bfloat16
    return ts.run_config(
        ctx.accelerator,
        _train_config(key, ctx.tiny),
        TINY_UNET_CONFIG if ctx.tiny else ts.SDXL_UNET_CONFIG,
        steps=1 if ctx.tiny else TRAIN_STEPS,
        warmup=0 if ctx.tiny else TRAIN_WARMUP,
        weight_dtype=dtype,
        full_dtype=dtype,
        peak_tflops=ctx.peak_tflops,
        count_flops=not ctx.tiny,  # tiny FLOPs mean nothing; train_step.py's own smoke counts them
    )


def run_caption_part(ctx: Context) -> dict[str, Any]:
    """benchmarks/caption.py at batch 16 and 32: BLIP-large-shaped fp16 on a GPU, the tiny BLIP on a CPU."""
    caption = _benchmark("caption")
    out = ctx.work / "caption.json"
    if ctx.tiny:
        argv = ["--device", "cpu", "--images", "32", "--image-size", "128", "96", "--rounds", "1"]
        argv += ["--warmup", "0", "--batch-sizes", "16", "32"]
    else:
        argv = ["--full-size", "--images", "128", "--rounds", "2", "--batch-sizes", "16", "32"]
    argv += ["--max-length", str(CAPTION_MAX_LENGTH), "--json", str(out)]
    code = caption.main(argv)
    if code != 0:
        raise RuntimeError(f"benchmarks/caption.py {' '.join(argv)} exited {code}")
    return {"argv": argv, **json.loads(out.read_text())}


def run_sampling_part(ctx: Context) -> dict[str, Any]:
    """benchmarks/sampling.py: 1024², 30 steps, batch 1 and 4 (tiny: 64², 4 steps)."""
    sampling = _benchmark("sampling")
    return sampling.run_sampling(full_size=not ctx.tiny, device=ctx.device, batch_sizes=(1, 4))


def run_profile_part(ctx: Context, key: str = "b") -> dict[str, Any]:
    """One step of configuration `key` under torch.profiler (after one traced warm-up step), through
    train_step.py's `build_step` and `profile_steps`; the op table is ranked from the trace, which is then
    compacted into OUT/profile."""
    import torch

    from loratk.models.tiny import TINY_UNET_CONFIG

    ts = _benchmark("train_step")
    config = _train_config(key, ctx.tiny)
    dtype = torch.float32 if ctx.tiny else torch.bfloat16
    unet_config = TINY_UNET_CONFIG if ctx.tiny else ts.SDXL_UNET_CONFIG
    step = ts.build_step(ctx.accelerator, config, unet_config, weight_dtype=dtype, full_dtype=dtype)
    try:
        start = time.monotonic()
        # Shapes tell which GEMMs are small on the GPU; on the tiny model they only slow the smoke down.
        paths = ts.profile_steps(
            ctx.accelerator,
            step,
            config,
            1,
            ctx.work / "profile",
            write_top=False,
            record_shapes=not ctx.tiny,
        )
        profiled_s = time.monotonic() - start
    finally:
        del step
        ctx.accelerator.free_memory()
    raw_path = Path(paths["profile_trace"])
    raw = raw_path.read_bytes()
    start = time.monotonic()
    trace = json.loads(raw)
    parsed_s = time.monotonic() - start
    ranking = rank_trace_ops(trace.get("traceEvents", []))
    ranked_s = time.monotonic() - start - parsed_s
    folder = ctx.out / "profile"
    folder.mkdir(parents=True, exist_ok=True)
    top = folder / f"{key}.top.txt"
    top.write_text(format_op_table(ranking))
    kept = compact_trace(raw, trace, folder / f"{key}.trace.json.gz")
    raw_path.unlink()
    return {
        "config": key,
        "what": config.what,
        "seconds": {
            "profiled": profiled_s,
            "parse": parsed_s,
            "rank": ranked_s,
            "compact": time.monotonic() - start - parsed_s - ranked_s,
        },
        "raw_trace_bytes": len(raw),
        "trace": kept,
        "top": str(top.relative_to(ctx.out)),
        **{k: v for k, v in ranking.items() if k != "kernels"},
        "ops": ranking["ops"][:10],
        "kernels": ranking["kernels"][:5],
    }


def build_parts(ctx: Context, names: Sequence[str]) -> list[Part]:
    runs: dict[str, Callable[[], dict[str, Any]]] = {
        **{f"train_{k}": (lambda k=k: run_train_part(ctx, k)) for k in "abcd"},
        "caption": lambda: run_caption_part(ctx),
        "sampling": lambda: run_sampling_part(ctx),
        "profile_b": lambda: run_profile_part(ctx, "b"),
    }
    return [Part(n, TINY_BUDGET_S if ctx.tiny else BUDGETS_S[n], runs[n]) for n in BUDGETS_S if n in names]


# ---------------------------------------------------------------- goals and the report


def _figure(records: Mapping[str, Any], part: str, key: str) -> Any:
    record = records.get(part, {})
    return record.get("result", {}).get(key) if record.get("status") == "ok" else None


def _best_caption_rate(records: Mapping[str, Any]) -> float | None:
    rows = records.get("caption", {}).get("result", {}).get("results", [])
    rates = [r["images_per_s"] for r in rows if r.get("batch_size") in (16, 32)]
    return max(rates) if rates else None


def evaluate_goals(records: Mapping[str, Any], *, tiny: bool) -> list[dict[str, Any]]:
    """Issue #19's goals against the figures: met (True/False), or None where the figure is missing or the
    models are the tiny ones (nothing to judge)."""
    statuses = [r.get("status") for r in records.values()]
    if "OOM" in statuses:
        no_oom: bool | None = False
    elif set(statuses) == {"ok"} and len(statuses) == len(BUDGETS_S):
        no_oom = True
    else:
        no_oom = None  # a part that did not finish may have run out of memory later
    goals = [
        ("(a) seed recipe peak memory <= 14 GiB", _figure(records, "train_a", "peak_memory_gib"), "<=", 14.0),
        ("(b) share of the bf16 peak >= 40%", _figure(records, "train_b", "bf16_peak_share"), ">=", 0.40),
        (
            "(c) full DreamBooth peak memory <= 22 GiB",
            _figure(records, "train_c", "peak_memory_gib"),
            "<=",
            22.0,
        ),
        ("BLIP-large captioning >= 50 images/s (end to end)", _best_caption_rate(records), ">=", 50.0),
    ]
    out = []
    for goal, value, op, bound in goals:
        met = None if (tiny or value is None) else (value <= bound if op == "<=" else value >= bound)
        out.append({"goal": goal, "value": value, "met": met})
    out.append({"goal": "nothing runs out of memory", "value": statuses, "met": None if tiny else no_oom})
    return out


def machine_facts(device: Any) -> dict[str, Any]:
    import torch

    facts: dict[str, Any] = {
        "host": platform.node(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "versions": installed_versions([canonical_name(n) for n in VERSIONS_OF]),
        "torch_cuda": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        facts.update(
            device=torch.cuda.get_device_name(device),
            device_memory_gib=props.total_memory / 2**30,
            capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
        )
    else:
        facts["device"] = f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return facts


def write_json_atomically(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def check_out_folder(out: Path) -> list[str]:
    """What the device tool would not bring back: over 8 files, a file of 16 MB or more, too deep."""
    files = [p for p in out.rglob("*") if p.is_file()]
    problems = [f"{len(files)} files (at most 8 come back)"] if len(files) > 8 else []
    for f in files:
        rel = f.relative_to(out)
        if f.stat().st_size >= OUT_FILE_LIMIT:
            problems.append(f"{rel}: {f.stat().st_size} bytes (under 16 MiB come back)")
        if len(rel.parts) > 3:
            problems.append(f"{rel}: deeper than 2 folders")
    return problems


class Tee(io.TextIOBase):
    """Writes to a stream and the log file alike."""

    def __init__(self, stream: Any, log: Any):
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()


# ---------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for suite.json, suite.log, profile/")
    parser.add_argument("--tiny", action="store_true", help="every part on the tiny models, on the CPU")
    parser.add_argument("--install", type=Path, metavar="DIR", help="first install the wheels in DIR")
    parser.add_argument(
        "--parts", default=",".join(BUDGETS_S), help=f"comma-separated subset of {','.join(BUDGETS_S)}"
    )
    parser.add_argument(
        "--memory-cap-gib", type=float, default=MEMORY_CAP_GIB, help="emulate a card this size"
    )
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak, if the GPU is not in the table")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: 1 with --tiny)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = [n.strip() for n in args.parts.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BUDGETS_S))
    if unknown:
        print(f"error: unknown part(s) {unknown}; choose from {', '.join(BUDGETS_S)}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars would fill the log
    with open(args.out / "suite.log", "a", buffering=1) as log:
        tee_out, tee_err = Tee(sys.stdout, log), Tee(sys.stderr, log)
        with contextlib.redirect_stdout(tee_out), contextlib.redirect_stderr(tee_err):
            return _run(args, names, log)


def _run(args: argparse.Namespace, names: list[str], log: Any) -> int:
    started = time.monotonic()
    report: dict[str, Any] = {
        "suite": {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "mode": "tiny" if args.tiny else "full-size",
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "budgets_s": {n: TINY_BUDGET_S if args.tiny else BUDGETS_S[n] for n in names},
        }
    }
    json_path = args.out / "suite.json"
    if importlib.util.find_spec("loratk") is None:
        sys.path.insert(0, str(REPO / "src"))
    if args.install is not None:
        try:
            report["install"] = install_wheels(args.install, Path(tempfile.gettempdir()) / "loratk-gpu-site")
        except RuntimeError as err:
            report["install"] = {"error": str(err)}
            write_json_atomically(json_path, report)
            print(f"error: {err}", file=sys.stderr)
            return 3
        print(f"installed {report['install']['installed']}; kept {report['install']['kept']}")
    problems = check_imports()
    if problems:
        report["imports"] = problems
        write_json_atomically(json_path, report)
        print(import_problem_hint(problems, args.install), file=sys.stderr)
        return 3

    import torch
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and not args.tiny
    if args.threads or args.tiny:
        torch.set_num_threads(args.threads or 1)
    accelerator = Accelerator(mixed_precision="bf16" if cuda else "no", cpu=not cuda)  # --tiny: the CPU
    device = accelerator.device
    ts = _benchmark("train_step")
    machine = machine_facts(device)
    peak = args.peak_tflops or (ts.find_bf16_peak_tflops(machine["device"]) if cuda else None)
    if cuda:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total), device)
    elif not args.tiny:
        print("error: no CUDA GPU here; use --tiny for the CPU smoke of every part", file=sys.stderr)
        return 2
    machine.update(memory_cap_gib=args.memory_cap_gib if cuda else None, bf16_peak_tflops=peak)
    report["machine"] = machine
    print(json.dumps(machine))
    ctx = Context(args.tiny, accelerator, device, peak, args.out, Path(tempfile.mkdtemp(prefix="gpu-suite-")))

    def cleanup() -> None:
        accelerator.free_memory()  # drops its references to prepared models, then gc and empty_cache
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)

    def save(records: dict[str, dict[str, Any]]) -> None:
        report["parts"] = records
        report["goals"] = evaluate_goals(records, tiny=args.tiny)
        report["suite"]["seconds"] = time.monotonic() - started
        write_json_atomically(json_path, report)

    parts = build_parts(ctx, names)
    if not args.tiny:
        # A part stuck in a call that SIGALRM cannot interrupt: dump the stacks to the log and end the
        # process; suite.json already holds every part before it.
        faulthandler.dump_traceback_later(sum(p.budget_s for p in parts) + 20, exit=True, file=log)
    # Everything imported so far lives to the end: leave it out of the collections each part's clean-up runs
    # (a full collection over torch, diffusers and transformers costs about half a second each time).
    gc.freeze()
    try:
        records = run_parts(parts, on_record=save, cleanup=cleanup)
    finally:
        gc.unfreeze()
        faulthandler.cancel_dump_traceback_later()
    report["suite"]["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    save(records)
    problems = check_out_folder(args.out)
    if problems:
        report["suite"]["out_problems"] = problems
        write_json_atomically(json_path, report)
    for goal in report["goals"]:
        verdict = {True: "met", False: "NOT met", None: "n/a"}[goal["met"]]
        value = goal["value"] if not isinstance(goal["value"], float) else f"{goal['value']:.3g}"
        print(f"goal: {goal['goal']}: {verdict} ({value})")
    print(f"suite: {time.monotonic() - started:.1f} s; {json_path}")
    return 0 if all(r["status"] == "ok" for r in records.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
