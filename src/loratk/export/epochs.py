"""Epoch-end export: `epochN.safetensors` every N epochs, and `<name>.safetensors` after the last one."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from loratk.core.protocols import Adapter, Weights
from loratk.files import atomic_path

logger = get_logger(__name__)


class EpochExporter:
    """An epoch hook (`(epoch, global_step) -> None`) that writes the adapter files of a run.

    It runs on every process. Under sharded engines (FSDP, DeepSpeed ZeRO-3) `gather` collects the full
    weights of the trained parts, a collective (`accelerator.get_state_dict`); without it the live modules
    are exported. Only the main process (`is_main`) writes.
    """

    def __init__(
        self,
        *,
        adapter: Adapter,
        model: Any,
        run_dir: Path,
        name: str,
        every_n_epochs: int,
        num_epochs: int,
        metadata: Callable[[int, int], dict[str, str]],
        gather: Callable[[], Weights] | None = None,
        is_main: bool = True,
    ):
        self.adapter = adapter
        self.model = model
        self.gather = gather
        self.is_main = is_main
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
        weights = self.gather() if self.gather is not None else None  # every rank takes part
        if not self.is_main:
            return
        path = self.epoch_path(epoch)
        files = self.adapter.export(self.model, path, self.metadata(epoch, global_step), weights=weights)
        logger.info(f"epoch {epoch}: wrote {', '.join(str(f) for f in files)}", main_process_only=True)
        self.written.extend(files)
        if last:
            self.finish(path, files)

    def finish(self, source: Path, files: list[Path] | None = None) -> None:
        """Publish the last epoch's files under the run's name: `epoch9.safetensors` -> `<name>.safetensors`,
        and likewise its companions (`epoch9.lora.safetensors`, `epoch9_diffusers/`). Hard links where the
        file system allows, so multi-GB full checkpoints are not stored twice."""
        for item in files or [source]:
            target = item.with_name(self.name + item.name[len(source.stem) :])
            if item.is_dir():
                _link_tree(item, target)
            else:
                with atomic_path(target) as tmp:
                    _link_or_copy(item, tmp)
            self.written.append(target)
        logger.info(f"final weights: {self.final_path()}", main_process_only=True)


def _link_or_copy(source: str | Path, target: str | Path) -> None:
    Path(target).unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _link_tree(source: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.rmtree(tmp)
        shutil.copytree(source, tmp, copy_function=_link_or_copy)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
