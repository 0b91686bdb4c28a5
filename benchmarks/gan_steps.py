"""GAN baseline speed: generator + discriminator steps per second, through the real `baselines.steps.GanSteps`
(the updates `loratk train` runs for methods "dcgan" and "wgan-gp"), and optionally the whole quickstart run.

    python benchmarks/gan_steps.py --threads 1                 # CPU: 64^2 batch 64 and 128^2 batch 32
    python benchmarks/gan_steps.py --device cuda --steps 50    # GPU
    python benchmarks/gan_steps.py --threads 1 --quickstart    # also time `loratk train recipes/quickstart_gan.toml`

One step = one discriminator step and one generator step (critic_steps = 1, so the two methods compare; WGAN-GP
with its usual 5 critic steps does 5 discriminator steps per generator step). The networks are the papers'
(latent 100, widths 64), Adam, fp32, random pixels in [-1, 1] as the real batch (the data path is timed by
benchmarks/data_pipeline.py). Reported: the median of `--rounds` timings of `--steps` steps, after `--warmup`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ((64, 64), (128, 32))  # (resolution, batch)


def build_steps(method: str, resolution: int, device: str, diffusion: bool = False):
    from loratk.components.gan import build_gan_parts
    from loratk.recipe import validate_recipe

    recipe = validate_recipe(
        {
            "name": "bench",
            "method": method,
            "data": {"dir": "unused"},
            "gan": {"resolution": resolution, "critic_steps": 1, "diffusion": diffusion},
        }
    )
    return build_gan_parts(recipe, device=device).steps


def time_steps(steps, real: torch.Tensor, count: int) -> float:
    """Seconds for `count` (discriminator + generator) steps."""
    sync = torch.cuda.synchronize if real.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(count):
        steps.discriminator_step(real)
        steps.generator_step(real.shape[0], real.device)
    sync()
    return time.perf_counter() - start


def measure(method: str, resolution: int, batch: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    steps = build_steps(method, resolution, args.device, args.diffusion)
    real = torch.rand(batch, 3, resolution, resolution, device=args.device) * 2 - 1
    time_steps(steps, real, args.warmup)
    seconds = statistics.median(time_steps(steps, real, args.steps) for _ in range(args.rounds))
    rate = args.steps / seconds
    return {
        "method": method,
        "resolution": resolution,
        "batch": batch,
        "steps_per_s": round(rate, 3),
        "images_per_s": round(rate * batch, 1),
    }


def time_quickstart() -> float:
    """Wall seconds of `python -m loratk.train recipes/quickstart_gan.toml` into a temporary folder."""
    with tempfile.TemporaryDirectory() as out:
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "LORATK_CACHE": os.environ.get("LORATK_CACHE", f"{out}/cache"),
        }
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "loratk.train", "recipes/quickstart_gan.toml", f'output_dir="{out}"'],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (1 on a shared CPU)")
    parser.add_argument("--methods", nargs="+", default=["dcgan", "wgan-gp"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--diffusion", action="store_true", help="with Diffusion-GAN's augmentation")
    parser.add_argument("--quickstart", action="store_true", help="also time the whole quickstart_gan run")
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"device: {device}; torch {torch.__version__}; threads {torch.get_num_threads()}")
    results = []
    print(f"{'method':<8} {'size':>5} {'batch':>5} {'steps/s':>9} {'images/s':>9}")
    for method in args.methods:
        for resolution, batch in SETTINGS:
            row = measure(method, resolution, batch, args)
            results.append(row)
            print(
                f"{method:<8} {resolution:>5} {batch:>5} {row['steps_per_s']:>9.3f} {row['images_per_s']:>9.1f}"
            )
    report = {
        "device": device,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "steps": results,
    }
    if args.quickstart:
        report["quickstart_gan_s"] = round(time_quickstart(), 1)
        print(f"quickstart_gan: {report['quickstart_gan_s']} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
