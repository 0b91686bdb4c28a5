"""Epoch-end export: `epochN.safetensors` every N epochs, and `<name>.safetensors` after the last one."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from loratk.core.checkpoint import atomic_path

logger = get_logger(__name__)


class EpochExporter:
    """An epoch hook (`(epoch, global_step) -> None`) that writes the adapter files of a run."""

    def __init__(
        self,
        *,
        adapter: Any,
        model: Any,
        run_dir: Path,
        name: str,
        every_n_epochs: int,
        num_epochs: int,
        metadata: Callable[[int, int], dict[str, str]],
    ):
        self.adapter = adapter
        self.model = model
        self.run_dir = run_dir
        self.name = name
        self.every_n_epochs = every_n_epochs
        self.num_epochs = num_epochs
        self.metadata = metadata
        self.written: list[Path] = []

    def epoch_path(self, epoch: int) -> Path:
        return self.run_dir / f"epoch{epoch}.safetensors"

    def final_path(self) -> Path:
        return self.run_dir / f"{self.name}.safetensors"

    def __call__(self, epoch: int, global_step: int) -> None:
        last = epoch >= self.num_epochs
        if epoch % self.every_n_epochs and not last:
            return
        path = self.epoch_path(epoch)
        files = self.adapter.export(self.model, path, self.metadata(epoch, global_step))
        logger.info(f"epoch {epoch}: wrote {', '.join(str(f) for f in files)}", main_process_only=True)
        self.written.extend(files)
        if last:
            self.finish(path)

    def finish(self, source: Path) -> None:
        with atomic_path(self.final_path()) as tmp:
            shutil.copyfile(source, tmp)
        self.written.append(self.final_path())
        logger.info(f"final adapter: {self.final_path()}", main_process_only=True)
