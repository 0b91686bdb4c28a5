"""The epoch hook: after sampled epochs, render the run's `[sample]` prompts with the live model."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from loratk.sampling.images import GRID_CELL, build_grid, image_parameters, open_image, save_grid, save_png
from loratk.sampling.pipeline import (
    adapters_disabled,
    build_pipeline,
    free_memory,
    generate_images,
    model_modules,
    parts_on_device,
    sampling_mode,
)
from loratk.sampling.specs import ImageSpec

logger = get_logger(__name__)  # the CLI reports through its exit code; the hook through the run's log


class SampleHook:
    """An epoch hook (`(epoch, global_step) -> None`) that renders every prompt x seed with the live model.

    Writes `samples/epoch007/NN-seedS.png` (and `samples/base/` once at the start, adapters off) and rebuilds
    `samples/grid.png`: rows = base + each sampled epoch, columns = prompt x seed. A failure (an error, out of
    memory) is logged and training goes on.
    """

    def __init__(
        self,
        *,
        model: Any,
        specs: Sequence[ImageSpec],
        samples_dir: Path,
        scheduler: str,
        every_n_epochs: int,
        num_epochs: int,
        at_start: bool,
        model_name: str,
        prediction_type: str | None = None,
        max_cell: int = GRID_CELL,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.should_stop = should_stop  # a stop request (SIGTERM, Ctrl-C) ends sampling between images
        self.model = model
        self.specs = list(specs)
        self.samples_dir = Path(samples_dir)
        self.scheduler = scheduler
        self.every_n_epochs = every_n_epochs
        self.num_epochs = num_epochs
        self.at_start = at_start
        self.model_name = model_name
        self.prediction_type = prediction_type
        self.max_cell = max_cell

    @property
    def grid_path(self) -> Path:
        return self.samples_dir / "grid.png"

    def epoch_dir(self, epoch: int) -> Path:
        return self.samples_dir / f"epoch{epoch:03d}"

    def samples_epoch(self, epoch: int) -> bool:
        return epoch % self.every_n_epochs == 0 or epoch >= self.num_epochs

    def start(self) -> None:
        """Render the base model (all adapters off), if `at_start`."""
        if self.at_start:
            self._render(self.samples_dir / "base", epoch=None)

    def __call__(self, epoch: int, global_step: int) -> None:
        if self.samples_epoch(epoch):
            self._render(self.epoch_dir(epoch), epoch=epoch)

    def _render(self, folder: Path, epoch: int | None) -> None:
        from tqdm.auto import tqdm

        what = "base model" if epoch is None else f"epoch {epoch}"
        modules = model_modules(self.model)
        loras = () if epoch is None else ((f"epoch{epoch}", 1.0),)
        bar = tqdm(total=len(self.specs), desc=f"sample {what}", unit="img", leave=False)
        try:
            with (
                sampling_mode(modules),
                parts_on_device(self.model, self.model.unet.device),
                adapters_disabled(modules) if epoch is None else contextlib.nullcontext(),
            ):
                pipe = build_pipeline(
                    self.model, scheduler=self.scheduler, prediction_type=self.prediction_type
                )
                for spec, image in generate_images(pipe, self.specs, progress=bar.update):
                    if self.should_stop is not None and self.should_stop():
                        logger.warning(f"{what}: sampling stopped by a stop request", main_process_only=True)
                        break
                    text = image_parameters(
                        spec, scheduler=self.scheduler, model=self.model_name, loras=loras, epoch=epoch
                    )
                    save_png(image, folder / spec.filename, text)
                del pipe
            self.rebuild_grid(up_to=epoch or 0)
            logger.info(f"{what}: {len(self.specs)} sample(s) in {folder}", main_process_only=True)
        except Exception as err:  # noqa: BLE001 - sampling must never end a training run
            logger.error(
                f"{what}: sampling failed, training continues ({type(err).__name__}: {err})",
                exc_info=True,
                main_process_only=True,
            )
        finally:
            bar.close()
            free_memory()

    def rebuild_grid(self, up_to: int) -> None:
        """Rows: base (if rendered) and every epoch up to `up_to` that this run samples; files read from disk,
        so a resumed run's grid keeps the epochs sampled before the restart.
        """
        rows: list[tuple[str, Path]] = []
        if self.at_start and (self.samples_dir / "base").is_dir():
            rows.append(("base", self.samples_dir / "base"))
        for epoch in range(1, up_to + 1):
            if self.samples_epoch(epoch) and self.epoch_dir(epoch).is_dir():
                rows.append((f"epoch {epoch}", self.epoch_dir(epoch)))
        if not rows:
            return
        cells = [[open_image(folder / spec.filename) for spec in self.specs] for _, folder in rows]
        grid = build_grid(cells, [r[0] for r in rows], [s.label for s in self.specs], max_cell=self.max_cell)
        save_grid(grid, self.grid_path)
