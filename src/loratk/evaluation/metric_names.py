"""The one table of every metric a run records: its key, label, direction and a line on what it measures.

The report, `loratk compare` and the best-epoch rule read directions and labels from here only. Keys are
those of `RunSummary.per_epoch`: `train/loss` and `val/loss` as in metrics.jsonl, image metrics as in
eval.jsonl (`clip_t`, not `eval/clip_t`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool | None  # None: a metric this table does not know (no direction claimed)
    description: str
    spread: str | None = None  # the key of its standard deviation, shown as `value ± spread`
    image: bool = True  # computed from generated images (eval.jsonl), not from the denoising loss

    @property
    def direction(self) -> str:
        """An arrow for table headers: ↑ higher is better, ↓ lower is better, ? unknown."""
        return {True: "↑", False: "↓", None: "?"}[self.higher_is_better]

    def better(self, value: float, than: float) -> bool:
        """Strictly better: equal values are not, so ties keep the earlier epoch."""
        return value > than if self.higher_is_better else value < than


METRICS: tuple[Metric, ...] = (
    Metric(
        "train/loss",
        "train loss",
        False,
        "training loss (denoising MSE), mean of the epoch's logged steps",
        image=False,
    ),
    Metric(
        "val/loss",
        "val loss",
        False,
        "denoising loss on held-out images at fixed noise and timesteps",
        image=False,
    ),
    Metric("clip_t", "CLIP-T", True, "cosine between prompt and image CLIP embeddings: prompt following"),
    Metric("clip_i", "CLIP-I", True, "mean cosine between CLIP embeddings of generated and real images"),
    Metric(
        "dino",
        "DINO",
        True,
        "mean cosine between DINO ViT-S/16 embeddings of generated and real images: identity",
    ),
    Metric(
        "kid",
        "KID",
        False,
        "kernel Inception distance to the real images; unbiased, the headline at small sample sizes",
        spread="kid_std",
    ),
    Metric("fid", "FID", False, "Fréchet Inception distance to the real images; biased below ~2,000 images"),
    Metric("fd_dinov2", "FD-DINOv2", False, "Fréchet distance to the real images in DINOv2 feature space"),
    Metric(
        "kid_dinov2",
        "KID-DINOv2",
        False,
        "kernel distance to the real images in DINOv2 feature space",
        spread="kid_dinov2_std",
    ),
    Metric("is", "IS", True, "Inception score of the generated images", spread="is_std"),
    Metric("psnr", "PSNR", True, "PSNR (dB) between paired images (same prompt and seed): higher = closer"),
    Metric("ssim", "SSIM", True, "structural similarity between paired images (same prompt and seed)"),
)

SPREAD_KEYS = frozenset(m.spread for m in METRICS if m.spread)


def find_metric(key: str) -> Metric | None:
    """The table's entry for `key` (`eval/dino` and `dino` alike), or None."""
    key = key.removeprefix("eval/")
    return next((m for m in METRICS if m.key == key), None)


def describe_metric(key: str) -> Metric:
    """The table's entry, or an entry with no direction for a metric the table does not know yet."""
    return find_metric(key) or Metric(key.removeprefix("eval/"), key.removeprefix("eval/"), None, "")


def require_metric(key: str) -> Metric:
    """The table's entry for a metric a user named; a ValueError listing the known names otherwise."""
    metric = find_metric(key)
    if metric is None:
        names = ", ".join(m.key for m in METRICS)
        raise ValueError(f"unknown metric {key!r}; known metrics: {names} (or auto)")
    return metric


def order_metrics(keys: set[str] | list[str]) -> list[Metric]:
    """The metrics among `keys` in table order, then unknown ones by name; spreads are not columns."""
    known = [m for m in METRICS if m.key in keys]
    unknown = sorted(set(keys) - {m.key for m in METRICS} - SPREAD_KEYS)
    return known + [describe_metric(k) for k in unknown]


def format_value(value: float | None, digits: int = 4) -> str:
    """A metric value for a table: 4 significant digits; '-' for None."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return "nan"
    return f"{value:.{digits}g}"


def format_entry(row: Mapping[str, float | None], metric: Metric) -> str:
    """One cell: '-' where the metric was not computed, 'nan' where it was recorded as null (non-finite),
    and `value ± spread` where the metric has one."""
    if metric.key not in row:
        return "-"
    value = row[metric.key]
    if value is None:
        return "nan"
    text = format_value(value)
    spread = row.get(metric.spread) if metric.spread else None
    return f"{text} ± {format_value(spread, 2)}" if spread is not None else text


def format_size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
