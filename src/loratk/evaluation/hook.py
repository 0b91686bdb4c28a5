"""The epoch hook of the image metrics: render what the evaluation needs beyond the samples, score, record.

After each evaluated epoch (and once for the base model before training) it renders the `[eval]` prompts
and the leak prompts with the live model (sample hooks of their own, under `eval/`), scores them with the
`[sample]` images against the training images, appends a row to `eval.jsonl` and returns the numbers for
metrics.jsonl. A failure is logged and training goes on.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from accelerate.logging import get_logger

from loratk.evaluation.scoring import EvalImages, EvalSettings, score_images

logger = get_logger(__name__)

EVAL_FILE = "eval.jsonl"


def append_eval_row(run_dir: Path, row: dict[str, Any]) -> None:
    """One line in `eval.jsonl`, flushed and synced (a later row for the same epoch replaces it)."""
    clean = dict(row)
    clean["metrics"] = {k: (v if math.isfinite(v) else None) for k, v in row["metrics"].items()}
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / EVAL_FILE, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(clean) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def folder_of(samples_dir: Path, epoch: int) -> Path:
    """Where a sample hook writes `epoch` (0 = the base model)."""
    return samples_dir / ("base" if epoch == 0 else f"epoch{epoch:03d}")


def collect_images(epoch: int, *, scored: Sequence[Any], leak: Any | None) -> EvalImages:
    """The images of `epoch` that exist on disk: every spec of the `scored` sample hooks (with its prompt), and
    the leak hook's (base image, epoch image) pairs."""
    generated = []
    for hook in scored:
        folder = folder_of(hook.samples_dir, epoch)
        generated += [(folder / s.filename, s.prompt) for s in hook.specs if (folder / s.filename).is_file()]
    pairs = []
    if leak is not None and epoch > 0:
        base, tuned = folder_of(leak.samples_dir, 0), folder_of(leak.samples_dir, epoch)
        pairs = [
            (base / s.filename, tuned / s.filename)
            for s in leak.specs
            if (base / s.filename).is_file() and (tuned / s.filename).is_file()
        ]
    return EvalImages(generated=generated, leak_pairs=pairs)


class ImageEvalHook:
    """An epoch hook (main process) that scores the rendered images of evaluated epochs."""

    def __init__(
        self,
        *,
        run_dir: Path,
        settings: EvalSettings,
        real: Sequence[Path],
        samples: Any | None,
        renderers: Sequence[Any],
        leak: Any | None,
        every_n_epochs: int | None,
        num_epochs: int,
    ):
        self.run_dir = Path(run_dir)
        self.settings = settings
        self.real = list(real)
        self.samples = samples  # the run's [sample] hook: it renders before this hook runs
        self.renderers = list(renderers)  # [eval] prompts and the leak prompts: this hook renders them
        self.leak = leak
        self.every_n_epochs = every_n_epochs
        self.num_epochs = num_epochs
        self.noted: set[str] = set()

    def evaluates(self, epoch: int) -> bool:
        if self.every_n_epochs == 0:
            return False
        if self.every_n_epochs is None:
            return self.samples.samples_epoch(epoch) if self.samples is not None else epoch >= self.num_epochs
        return epoch % self.every_n_epochs == 0 or epoch >= self.num_epochs

    @property
    def scored(self) -> list[Any]:
        return [h for h in [self.samples, *self.renderers] if h is not None and h is not self.leak]

    def start(self) -> None:
        """Before training: render the base model's eval images and score them (epoch 0)."""
        if self.every_n_epochs == 0:
            return
        for hook in self.renderers:
            hook.start()  # at_start: the base model's images
        self.score(0)

    def __call__(self, epoch: int, global_step: int) -> dict[str, float] | None:
        if not self.evaluates(epoch):
            return None
        for hook in self.renderers:
            hook(epoch, global_step)
        return self.score(epoch)

    def score(self, epoch: int) -> dict[str, float] | None:
        what = "base model" if epoch == 0 else f"epoch {epoch}"
        try:
            images = collect_images(epoch, scored=self.scored, leak=self.leak)
            result = score_images(images, self.real, self.settings)
            append_eval_row(self.run_dir, result.row(epoch))
        except Exception as err:  # noqa: BLE001 - evaluation must never end a training run
            logger.error(
                f"{what}: evaluation failed, training continues ({type(err).__name__}: {err})",
                exc_info=True,
                main_process_only=True,
            )
            return None
        shown = ", ".join(f"{k} {v:.4g}" for k, v in result.metrics.items() if not k.endswith("_std"))
        logger.info(f"{what}: {shown or 'no image metric'} ({result.time_s:.1f}s)", main_process_only=True)
        for note in result.notes:  # every epoch's notes are in eval.jsonl; the console hears each once
            if note not in self.noted:
                self.noted.add(note)
                logger.warning(f"{what}: {note}", main_process_only=True)
        return {f"eval/{k}": v for k, v in result.metrics.items()} if epoch else None
