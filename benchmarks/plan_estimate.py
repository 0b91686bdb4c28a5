"""`loratk plan`'s estimate: its predictions and run time for the benchmark's configurations, and its accuracy
against the same step measured on real CPU tensors.

    python benchmarks/plan_estimate.py                       # predictions for (a) (b) (c), full-size SDXL
    python benchmarks/plan_estimate.py --configs a           # the seed recipe only (the < 60 s goal)
    python benchmarks/plan_estimate.py --parallel --renders  # as `loratk plan` runs it, with its renders
    python benchmarks/plan_estimate.py --measure --unet mid  # estimate vs a real CPU step, mid-size UNet
    python benchmarks/plan_estimate.py --measure --unet full # the same on the full-size SDXL UNet (slow, ~20 GB)

Measuring: a child process runs the very step the estimate runs (`loratk.memory.estimate.run_step`) on real
CPU tensors with random weights, with glibc's mmap threshold fixed at 64 KiB so that every freed tensor goes
back to the system; the peak is the weights and optimizer state it holds before the step plus the rise of
its peak RSS (`VmHWM`, reset through `/proc/self/clear_refs`) during the step. CPU rules apply (`--device
cpu`, fp32), as the real step runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


@dataclass(frozen=True)
class Config:
    key: str
    description: str
    recipe: str
    overrides: tuple[str, ...]


CONFIGS = (
    Config(
        "a", "seed recipe: LoRA r128, 600x400, batch 20, Adafactor, checkpointing", "recipes/ukiyoe.toml", ()
    ),
    Config(
        "b",
        "LoRA r128 at 1024x1024, batch 8, Adafactor, checkpointing",
        "recipes/ukiyoe.toml",
        ("data.resolution=1024", "train.batch_size=8"),
    ),
    Config(
        "c",
        "full DreamBooth at 1024x1024, batch 4 (+4 class), fused Adafactor step, checkpointing",
        "recipes/unicorngirl_dreambooth.toml",
        ("train.batch_size=4",),
    ),
)

# A UNet with SDXL's block layout at a size a real CPU step can run in seconds, and encoders to match.
MID_UNET = dict(
    _class_name="UNet2DConditionModel",
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    block_out_channels=[128, 256, 512],
    layers_per_block=2,
    transformer_layers_per_block=[1, 1, 2],
    attention_head_dim=[2, 4, 8],
    norm_num_groups=32,
    cross_attention_dim=256,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=32,
    projection_class_embeddings_input_dim=6 * 32 + 160,
)


def write_model_folder(folder: Path, unet: str) -> Path:
    """A diffusers folder of configs only (no weights): the mid-size UNet, or SDXL's own configs."""
    from importlib import resources

    base = resources.files("loratk.memory") / "configs" / "sdxl-base-1.0"
    configs = {
        n: json.loads((base / f"{n}.json").read_text())
        for n in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
    }
    if unet == "mid":
        configs["unet"] = MID_UNET
        for name, width in (("text_encoder", 96), ("text_encoder_2", 160)):
            configs[name].update(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                                 num_attention_heads=4, projection_dim=width)  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    for name, config in configs.items():
        (folder / name).mkdir(exist_ok=True)
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / filename).write_text(json.dumps(config))
    return folder


MEASURED = {
    "lora": ("method=lora", "train.gradient_checkpointing=false", "optim.name=adamw"),
    "lora-checkpointing": ("method=lora", "train.gradient_checkpointing=true", "optim.name=adamw"),
    "full-fused": ("train.gradient_checkpointing=true", "optim.name=adafactor", "optim.fused_backward=true"),
}  # fmt: skip


def measure_recipe(model_dir: Path, case: str, batch: int, resolution: int) -> tuple[list[str], Path]:
    """A recipe file for a measured case (cached latents and text, fp32 on the CPU)."""
    method = "dreambooth" if case == "full-fused" else "lora"
    text = (
        f'name = "measure"\nmethod = "{method}"\n[model]\npath = "{model_dir}"\n'
        f"[data]\nresolution = {resolution}\n[lora]\nrank = 16\n"
        f'[train]\nbatch_size = {batch}\nmixed_precision = "no"\n'
    )
    if method == "dreambooth":  # the full UNet trains; its images are encoded every batch (no caches)
        text += '[dreambooth]\ninstance_dir = "unused"\ninstance_prompt = "a picture"\nprior_preservation = false\n'
    else:
        text = text.replace("[lora]", "[lora]\n").replace("[data]\n", '[data]\ndir = "unused"\n')
    path = model_dir.parent / f"{case}.toml"
    path.write_text(text)
    overrides = [o for o in MEASURED[case] if not o.startswith("method=")]
    return overrides, path


def measure_child(recipe_path: str, overrides: list[str], full: bool) -> dict[str, float]:
    """In a fresh process: the real step's peak (resident + peak-RSS rise) and the tracker's own count."""
    import ctypes
    import gc

    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: big blocks are mmapped, so a free returns them at once

    from loratk.memory.estimate import fake_run, run_step, warm_up_optimizer

    recipe = _load(recipe_path, overrides, full)
    batch = recipe.train.batch_size
    with fake_run(recipe, device_type="cpu", real=True) as run:
        warm_up_optimizer(run)
        gc.collect()
        resident = run.tracker.current
        rss_before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        step = run_step(run, batch)
        rise = _status("VmHWM") - rss_before
    return {"measured": resident + rise, "resident": resident, "rise": rise, "tracked_real": step.peak.total}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _load(recipe_path: str, overrides: list[str], full: bool = False):
    from loratk.recipe import load_recipe

    return load_recipe(recipe_path, overrides)


def estimate_case(recipe_path: str, overrides: list[str], full: bool) -> tuple[float, float]:
    from loratk.memory.estimate import fake_run, run_step

    recipe = _load(recipe_path, overrides, full)
    start = time.perf_counter()
    with fake_run(recipe, device_type="cpu") as run:
        step = run_step(run, recipe.train.batch_size)
    return step.peak.total, time.perf_counter() - start


def compare(unet: str, cases: list[str], batch: int, resolution: int) -> list[dict[str, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_model_folder(Path(tmp) / "model", unet)
        for case in cases:
            overrides, path = measure_recipe(model_dir, case, batch, resolution)
            full = case == "full-fused"
            estimated, seconds = estimate_case(str(path), overrides, full)
            code = (
                "import json, sys; sys.path.insert(0, {!r}); import plan_estimate as p; "
                "print(json.dumps(p.measure_child({!r}, {!r}, {!r})))"
            ).format(str(REPO / "benchmarks"), str(path), overrides, full)
            out = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ
            )
            measured = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"case": case, "estimated": estimated, "seconds": seconds, **measured})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="a,b,c", help="which configurations to predict (a,b,c)")
    parser.add_argument("--measure", action="store_true", help="estimate vs a real CPU step instead")
    parser.add_argument("--unet", choices=("mid", "full"), default="mid", help="UNet of the measured step")
    parser.add_argument("--cases", default=",".join(MEASURED), help="measured cases")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="the second step in a forked process, as `loratk plan` runs it",
    )
    parser.add_argument(
        "--renders", action="store_true", help="also class images, samples and evaluators, as `loratk plan`"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.measure:
        for row in compare(args.unet, args.cases.split(","), args.batch, args.resolution):
            error = row["estimated"] / row["measured"] - 1
            print(
                f"{row['case']:<20} estimated {row['estimated'] / GIB:6.3f} GiB  measured {row['measured'] / GIB:6.3f} GiB "
                f"({error:+.1%}; rise {row['rise'] / GIB:.3f} GiB over {row['resident'] / GIB:.3f} resident)  "
                f"tracker on the real step {row['tracked_real'] / GIB:6.3f} GiB  estimate {row['seconds']:.0f} s"
            )
        return 0
    from loratk.memory.estimate import estimate_memory, with_margin
    from loratk.recipe import load_recipe

    for config in CONFIGS:
        if config.key not in args.configs.split(","):
            continue
        recipe = load_recipe(REPO / config.recipe, list(config.overrides))
        estimate = estimate_memory(
            recipe, parallel=args.parallel, renders=args.renders, evaluators=args.renders
        )
        peak = estimate.points[0].peak
        print(
            f"({config.key}) {config.description}: peak {peak.total / GIB:.2f} GiB "
            f"({with_margin(peak.total) / GIB:.2f} with the margin) at batch {estimate.points[0].batch_size}, "
            f"{estimate.fixed_bytes / GIB:.2f} + {estimate.per_image_bytes / GIB:.3f} GiB per image, "
            f"in {peak.phase} at {peak.module}; estimated in {estimate.seconds:.0f} s"
        )
        for render in estimate.renders:
            print(
                f"    {render.job.describe()}: {render.peak.total / GIB:.2f} GiB, {render.peak.phase} at "
                f"{render.peak.module} ({render.seconds:.0f} s)"
            )
        for evaluator in estimate.evaluators:
            found = evaluator.peak
            print(
                f"    evaluator {evaluator.kind} {evaluator.name}: "
                + (f"{found.total / GIB:.2f} GiB ({evaluator.seconds:.0f} s)" if found else evaluator.note)
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
