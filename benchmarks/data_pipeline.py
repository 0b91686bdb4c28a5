"""Data-pipeline benchmark on CPU with the tiny SDXL: decode + resize + bucketing, cache build, epoch time.

    HF_HUB_OFFLINE=1 python benchmarks/data_pipeline.py            # 48 images, 256x256 bucket area
    HF_HUB_OFFLINE=1 python benchmarks/data_pipeline.py --images 96 --resolution 512

Synthetic JPEGs of assorted sizes and aspect ratios are written to a temporary folder; nothing is downloaded.
Figures (epoch times are the fastest epoch of each run): images/s for the preflight (full decode, content hash, bucket assignment) and for producing training
pixels (decode, resize, crop), the time to build both caches from cold, and the time of one training epoch
with a warm cache versus without caches.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path


def make_images(folder: Path, count: int, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = [(768, 512), (512, 768), (640, 640), (896, 512), (512, 640), (720, 480), (600, 400), (1024, 576)]
    for i in range(count):
        width, height = shapes[i % len(shapes)]
        # Smooth gradients plus noise: realistic JPEG decode cost, and no two images alike.
        y, x = np.mgrid[0:height, 0:width]
        base = np.stack([(x * (i + 1)) % 256, (y * (i + 3)) % 256, ((x + y) * (i + 5)) % 256], axis=-1)
        noise = rng.integers(0, 40, (height, width, 3))
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(
            folder / f"{i:04d}.jpg", quality=90
        )
        (folder / f"{i:04d}.txt").write_text(f"image {i}, synthetic, gradient, tag{i % 7}")


def recipe_for(folder: Path, work: Path, *, resolution: int, epochs: int, cache: bool):
    from loratk.recipe import validate_recipe

    return validate_recipe(
        {
            "name": "bench-cache" if cache else "bench-nocache",
            "output_dir": str(work / "runs"),
            "seed": 0,
            "model": {"path": "builtin:tiny-sdxl"},
            "data": {
                "dir": str(folder),
                "resolution": resolution,
                "bucket_step": 64,
                "min_side": 64,
                "cache_latents": cache,
                "cache_text_embeddings": cache,
                "cache_dir": str(work / "cache"),
            },
            "lora": {"rank": 4, "alpha": 4},
            "train": {"epochs": epochs, "batch_size": 4, "learning_rate": 1e-4, "mixed_precision": "no"},
            "optim": {"name": "adamw"},
            "export": {"every_n_epochs": 1000},
        }
    )


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def timed_run(recipe) -> dict[str, float]:
    """Set up and train one run; time the cache build (inside setup) and each epoch."""
    import loratk.components.caches as train_module
    from loratk.run import TrainingRun

    timings: dict[str, float] = {}
    build = train_module.build_data_caches

    def timed_build(*args, **kwargs):
        start = time.perf_counter()
        build(*args, **kwargs)
        timings["cache_build_s"] = time.perf_counter() - start

    train_module.build_data_caches = timed_build
    try:
        run = TrainingRun(recipe)
        run.setup()
    finally:
        train_module.build_data_caches = build
    epoch_ends: list[float] = []
    exporter = run.exporter

    def hook(epoch: int, step: int) -> None:  # the epoch hook marks where each epoch ends
        epoch_ends.append(time.perf_counter())
        exporter(epoch, step)

    run.exporter = hook
    start = time.perf_counter()
    run.train()
    run.cleanup()
    reset_accelerate()
    marks = [start, *epoch_ends]
    timings["epoch_s"] = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    timings["items"] = len(run.dataset)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--resolution", type=int, default=256, help="bucket area side (default 256)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine more threads than free cores makes "
        "OpenMP spin and timings jump tenfold)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from loratk.components.data import build_data_spec, build_dataset
    from loratk.data.check import run_preflight

    with tempfile.TemporaryDirectory(prefix="loratk-bench-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("LORATK_CACHE", str(work / "loratk-cache"))
        folder = work / "images"
        make_images(folder, args.images)
        cached = recipe_for(folder, work, resolution=args.resolution, epochs=args.epochs, cache=True)
        uncached = recipe_for(folder, work, resolution=args.resolution, epochs=args.epochs, cache=False)

        start = time.perf_counter()
        report = run_preflight(build_data_spec(cached))
        preflight_s = time.perf_counter() - start
        assert not report.has_errors, report.error_lines[:3]
        dataset = build_dataset(cached, report)
        start = time.perf_counter()
        for index in range(len(dataset)):
            dataset[index]
        pixels_s = time.perf_counter() - start

        from loratk.models.tiny import materialise_tiny_sdxl

        materialise_tiny_sdxl()  # built once, outside every timing
        # The uncached run goes first: it also warms up torch's per-shape conv kernels, which would
        # otherwise be charged to whichever run meets each bucket shape first.
        none = timed_run(uncached)
        cold = timed_run(cached)  # builds the caches from cold, then trains on them
        warm = timed_run(cached)  # a second run: the caches are warm

    warm_epoch = min(warm["epoch_s"])
    none_epoch = min(none["epoch_s"])
    figures = {
        "images": args.images,
        "bucket_area": f"{args.resolution}x{args.resolution}",
        "buckets_used": len({r.bucket for r in report.images}),
        "preflight_images_per_s": args.images / preflight_s,
        "decode_resize_crop_images_per_s": len(dataset) / pixels_s,
        "decode_resize_bucket_images_per_s": args.images / (preflight_s + pixels_s),
        "cache_build_cold_s": cold["cache_build_s"],
        "cache_build_cold_images_per_s": args.images / cold["cache_build_s"],
        "cache_build_warm_s": warm["cache_build_s"],
        "epoch_warm_cache_s": warm_epoch,
        "epoch_no_cache_s": none_epoch,
        "no_cache_over_warm_cache": none_epoch / warm_epoch,
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
    }
    width = max(map(len, figures))
    for key, value in figures.items():
        shown = f"{value:.2f}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
