"""Run folders as the trainer lays them out (recipe.resolved.toml, metrics.jsonl, eval.jsonl, epoch files,
samples with A1111 PNG text, grids), built without training: for the tests of reading and presenting runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
from PIL import Image

from loratk.prompts import format_parameters
from loratk.sampling.images import build_grid, open_image, save_grid, save_png

PROMPTS = ("a photo of sks dog on the beach", "a watercolor painting of sks dog")
SEEDS = (7,)


def sample_filename(index: int, seed: int) -> str:
    return f"{index:02d}-seed{seed}.png"  # = sampling.specs.ImageSpec.filename


def write_samples(
    folder: Path,
    *,
    color: tuple[int, int, int],
    epoch: int | None,
    prompts: Sequence[str] = PROMPTS,
    seeds: Sequence[int] = SEEDS,
    size: int = 32,
) -> None:
    """One PNG per prompt x seed, with the `parameters` text the sample hook writes."""
    for index, prompt in enumerate(prompts, start=1):
        for seed in seeds:
            shade = tuple(min(255, c + 40 * index) for c in color)
            text = format_parameters(
                prompt=prompt,
                negative_prompt="blurry",
                steps=30,
                sampler="Euler",
                guidance=7.0,
                seed=seed,
                width=size,
                height=size,
                model="tiny-sdxl",
                loras=() if epoch is None else ((f"epoch{epoch}", 1.0),),
                epoch=epoch,
            )
            save_png(Image.new("RGB", (size, size), shade), folder / sample_filename(index, seed), text)


def write_grid(samples: Path, folders: Sequence[tuple[str, Path]], path: Path | None = None) -> Path:
    names = sorted(p.name for p in folders[0][1].glob("*.png"))
    cells = [[open_image(folder / n) for n in names] for _, folder in folders]
    path = path or samples / "grid.png"
    save_grid(build_grid(cells, [label for label, _ in folders], names), path)
    return path


def eval_row(epoch: int, **metrics: float | None) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "metrics": metrics,
        "counts": {"generated": 8, "real": 6, "pairs": 4},
        "settings": {"clip": "tiny-clip", "dino": "tiny-dino", "library": "torchmetrics 1.9.0"},
        "notes": [f"fid: 8 generated images, biased (epoch {epoch})"] if "fid" in metrics else [],
        "time_s": 1.5,
    }


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def make_run(
    root: Path,
    name: str = "run",
    *,
    method: str = "lora",
    epochs: int = 3,
    steps_per_epoch: int = 4,
    val_losses: Sequence[float] | None = (0.20, 0.18, 0.16, 0.17),
    image_metrics: Mapping[int, Mapping[str, float | None]] | None = None,
    memory_key: str = "mem/peak_gib",
    sampled: Sequence[int] | None = None,
    prompts: Sequence[str] = PROMPTS,
    file_size: int = 1000,
    final: bool = True,
    leak: bool = False,
) -> Path:
    """`root/name/` as a finished run of `epochs` epochs writes it. `val_losses[e]`: epoch e's val loss
    (index 0: before training); `image_metrics[e]`: epoch e's eval.jsonl metrics (0: the base model);
    `sampled`: the epochs with samples (default all; the base model is sampled too)."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    recipe = {"name": name, "method": method, "seed": 0, "model": {"path": "builtin:tiny-sdxl"}}
    (run_dir / "recipe.resolved.toml").write_text(tomli_w.dumps(recipe))
    rows: list[dict[str, Any]] = []
    if val_losses:
        rows.append({"step": 0, "epoch": 0, "val/loss": val_losses[0]})
    evaluated = dict(image_metrics or {})
    eval_rows = [eval_row(0, **evaluated[0])] if 0 in evaluated else []
    step = 0
    for epoch in range(1, epochs + 1):
        for _ in range(steps_per_epoch):
            step += 1
            row = {"step": step, "epoch": epoch, "train/loss": 0.3 - 0.01 * step, "lr/unet": 1e-4}
            row |= {"train/nonfinite_steps": 0, "perf/images_per_s": 2.0, memory_key: 3.0 + 0.1 * step}
            if method.startswith("dreambooth"):
                row |= {"train/instance_loss": 0.2, "train/prior_loss": 0.1}
            rows.append(row)
        if val_losses and epoch < len(val_losses):
            rows.append({"step": step, "epoch": epoch, "val/loss": val_losses[epoch]})
        rows.append(
            {"step": step, "epoch": epoch, "time/epoch_s": 60.0, memory_key: 8.0 - epoch}
        )  # peak: epoch 1
        if epoch in evaluated:
            metrics = evaluated[epoch]
            rows.append({"step": step, "epoch": epoch, **{f"eval/{k}": v for k, v in metrics.items()}})
            eval_rows.append(eval_row(epoch, **metrics))
        (run_dir / f"epoch{epoch}.safetensors").write_bytes(b"\0" * file_size)
    write_jsonl(run_dir / "metrics.jsonl", rows)
    if eval_rows:
        write_jsonl(run_dir / "eval.jsonl", eval_rows)
    if final:
        (run_dir / f"{name}.safetensors").write_bytes(b"\0" * file_size)
    samples = run_dir / "samples"
    folders = [("base", samples / "base")]
    write_samples(samples / "base", color=(20, 20, 20), epoch=None, prompts=prompts)
    for epoch in range(1, epochs + 1) if sampled is None else sampled:
        folder = samples / f"epoch{epoch:03d}"
        write_samples(folder, color=(60 * epoch % 200, 90, 30 * epoch % 200), epoch=epoch, prompts=prompts)
        folders.append((f"epoch {epoch}", folder))
    write_grid(samples, folders)
    if leak:
        write_grid(samples, folders[:2], run_dir / "eval" / "leak" / "grid.png")
    return run_dir
