"""`loratk sample --lora epochN.safetensors` for a GAN generator file: one image per seed (the same latent
vector as the run's samples for that seed), one grid column per file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from loratk.baselines.outputs import load_generator, write_epoch_samples
from loratk.sampling.images import build_grid, open_image, save_grid


def render_generator_files(
    files: Sequence[str | Path],
    seeds: Sequence[int],
    out_dir: str | Path,
    grid_path: str | Path | None = None,
) -> tuple[list[Path], Path]:
    """OUT/<file stem>/NN-seedS.png for every file and seed, and a grid (rows: seeds, columns: files)."""
    out_dir = Path(out_dir)
    columns: list[list[Path]] = []
    for file in files:
        generator, metadata = load_generator(file)
        epoch = metadata.get("loratk.epoch")
        columns.append(
            write_epoch_samples(
                generator,
                out_dir / Path(file).stem,
                seeds,
                model=f"{metadata.get('loratk.method', 'gan')} {Path(file).name}",
                epoch=int(epoch) if epoch and epoch.isdigit() else None,
            )
        )
    rows = [[open_image(column[i]) for column in columns] for i in range(len(seeds))]
    grid = Path(grid_path) if grid_path else out_dir / "grid.png"
    save_grid(build_grid(rows, [f"seed {s}" for s in seeds], [Path(f).name for f in files]), grid)
    return [path for column in columns for path in column], grid
