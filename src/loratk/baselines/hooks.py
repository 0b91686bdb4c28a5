"""The GAN run's epoch hooks (`core.protocols.EpochHook`): the generator file, the fixed-latent samples and
interpolation strip, and FID / KID / IS of generated images against the training images."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from loratk.baselines.outputs import (
    build_fixed_latents,
    render_images,
    save_generator,
    write_epoch_samples,
    write_interpolation_strip,
    write_samples_grid,
)
from loratk.files import atomic_write_text


def _due(epoch: int, every: int, last: int) -> bool:
    return every > 0 and (epoch % every == 0 or epoch == last)


class GeneratorExporter:
    """epochN.safetensors every `every_n_epochs` (and the last), and `<name>.safetensors` at the end."""

    def __init__(
        self,
        generator: torch.nn.Module,
        run_dir: Path,
        name: str,
        num_epochs: int,
        metadata: Callable[[int, int], dict[str, str]],
        every_n_epochs: int = 1,
    ):
        self.generator, self.run_dir, self.name = generator, run_dir, name
        self.num_epochs, self.metadata, self.every = num_epochs, metadata, every_n_epochs

    def __call__(self, epoch: int, step: int) -> None:
        metadata = self.metadata(epoch, step)
        if _due(epoch, self.every, self.num_epochs):
            save_generator(self.generator, self.run_dir / f"epoch{epoch}.safetensors", metadata)
        if epoch == self.num_epochs:
            save_generator(self.generator, self.run_dir / f"{self.name}.safetensors", metadata)


class GanSampler:
    """Fixed latent vectors rendered every `every_n_epochs` epochs, the grid of all sampled epochs, and an
    interpolation strip between the first two latents."""

    def __init__(
        self,
        generator: torch.nn.Module,
        samples_dir: Path,
        seeds: Sequence[int],
        *,
        num_epochs: int,
        model: str,
        every_n_epochs: int = 1,
        interpolation_steps: int = 8,
    ):
        self.generator, self.samples_dir, self.seeds = generator, samples_dir, list(seeds)
        self.num_epochs, self.model, self.every = num_epochs, model, every_n_epochs
        self.interpolation_steps = interpolation_steps

    def __call__(self, epoch: int, step: int) -> None:
        if not _due(epoch, self.every, self.num_epochs):
            return
        paths = write_epoch_samples(
            self.generator, self.samples_dir / f"epoch{epoch:03d}", self.seeds, model=self.model, epoch=epoch
        )
        if self.interpolation_steps > 1 and len(self.seeds) > 1:
            write_interpolation_strip(
                self.generator,
                self.samples_dir / "interpolation" / f"epoch{epoch:03d}.png",
                (self.seeds[0], self.seeds[1]),
                self.interpolation_steps,
                f"epoch {epoch}: seed {self.seeds[0]} -> seed {self.seeds[1]}",
            )
        epochs = sorted(
            int(p.name[5:]) for p in self.samples_dir.glob("epoch[0-9][0-9][0-9]") if int(p.name[5:]) <= epoch
        )
        write_samples_grid(self.samples_dir, epochs, [p.name for p in paths])


class GanEvaluator:
    """FID, KID and IS of `num_images` generated images (fixed latents, seeded) against the training images,
    in the feature space of `inception` (an evaluator from `evaluation.evaluators`). Writes eval.jsonl and
    returns the `eval/*` numbers for metrics.jsonl."""

    def __init__(
        self,
        generator: torch.nn.Module,
        inception: Any,
        real_paths: Sequence[Path],
        eval_file: Path,
        *,
        num_images: int,
        seed: int,
        num_epochs: int,
        every_n_epochs: int = 1,
        feature_cache: Any = None,
    ):
        self.generator, self.inception, self.real_paths = generator, inception, list(real_paths)
        self.eval_file, self.num_images, self.seed = eval_file, num_images, seed
        self.num_epochs, self.every = num_epochs, every_n_epochs
        self.feature_cache = feature_cache
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None

    def real_features(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._real is None:
            from loratk.evaluation.features import FeatureCache

            cache = self.feature_cache or FeatureCache()
            self._real = cache.features_and_logits(self.inception, self.real_paths)
        return self._real

    def compute(self) -> tuple[dict[str, float], dict[str, int], list[str]]:
        from loratk.evaluation.metrics import fid_note, frechet_distance, inception_score, kernel_distance

        seeds = [self.seed * 1_000_003 + i for i in range(self.num_images)]
        images = render_images(self.generator, build_fixed_latents(seeds, self.generator.config.latent_dim))
        fake, logits = self.inception.features_and_logits(images)
        real, _ = self.real_features()
        kid, kid_std = kernel_distance(real, fake, seed=self.seed)
        is_mean, is_std = inception_score(logits, seed=self.seed)
        metrics = {
            "fid": frechet_distance(real, fake),
            "kid": kid,
            "kid_std": kid_std,
            "is": is_mean,
            "is_std": is_std,
        }
        note = fid_note(len(real), len(fake), dim=real.shape[1])
        return metrics, {"generated": len(fake), "real": len(real)}, [note] if note else []

    def __call__(self, epoch: int, step: int) -> dict[str, float] | None:
        if not _due(epoch, self.every, self.num_epochs):
            return None
        import torchmetrics

        from loratk.evaluation.evaluators import INCEPTION_RESIZE

        start = time.perf_counter()
        metrics, counts, notes = self.compute()
        row = {
            "epoch": epoch,
            "step": step,
            "metrics": metrics,
            "counts": counts,
            "settings": {
                "inception": self.inception.name,
                "library": f"torchmetrics {torchmetrics.__version__}",
                "resize": INCEPTION_RESIZE,
            },
            "notes": notes,
            "time_s": time.perf_counter() - start,
        }
        self._append(row)
        return {f"eval/{k}": v for k, v in metrics.items()}

    def _append(self, row: dict[str, Any]) -> None:
        """Rewrite eval.jsonl without this epoch's older row (a resumed run evaluates it again)."""
        kept = []
        if self.eval_file.is_file():
            for line in self.eval_file.read_text().splitlines():
                if line.strip() and json.loads(line).get("epoch") < row["epoch"]:
                    kept.append(line)
        kept.append(json.dumps(row))
        atomic_write_text(self.eval_file, "".join(line + "\n" for line in kept))


class ReportWriter:
    """report.html after every epoch (the epoch's numbers come from eval.jsonl, written just before)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def __call__(self, epoch: int, step: int) -> None:
        from loratk.evaluation.report import write_report

        write_report(self.run_dir)
