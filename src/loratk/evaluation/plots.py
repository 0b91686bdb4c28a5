"""The plots of report.html, drawn with matplotlib's Agg canvas (no pyplot: no global figure state, no
display) and returned as PNG bytes, which the report embeds as base64."""

from __future__ import annotations

import io
from collections.abc import Sequence

from loratk.evaluation.metric_names import Metric
from loratk.evaluation.runs import RunSummary

SIZE = (5.6, 3.0)  # inches; at DPI 560x300 px: two a row in the report, ~25 KB a plot
WIDE = (11.4, 3.6)  # the loss plot: a row of its own
DPI = 100


def _figure(size: tuple[float, float] = SIZE):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    # Fixed margins: a layout engine ("constrained", "tight") doubles the time of a plot.
    figure.subplots_adjust(left=0.6 / size[0], right=0.98, top=0.9, bottom=0.45 / size[1])
    return figure


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    # No "Software" text chunk: the report holds no web address, not even inside an image.
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_losses(summary: RunSummary) -> bytes | None:
    """Train loss per logged step (and its moving average) with val loss per epoch at the epoch's last step;
    None when neither was logged."""
    if not summary.train_curve and not summary.val_curve:
        return None
    figure = _figure(WIDE)
    ax = figure.add_subplot()
    if summary.train_curve:
        steps, losses = zip(*summary.train_curve, strict=True)
        ax.plot(steps, losses, color="#9bb7d4", linewidth=0.8, label="train loss (per step)")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = _moving_average(losses, window)
            ax.plot(steps, smooth, color="#1f5f99", linewidth=1.5, label=f"train loss ({window}-step mean)")
    if summary.val_curve:
        _, steps, losses = zip(*summary.val_curve, strict=True)
        ax.plot(
            steps, losses, "o-", color="#c0392b", linewidth=1.5, markersize=4, label="val loss (per epoch)"
        )
    ax.set_xlabel("step")
    ax.set_ylabel("loss ↓")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(figure)


def plot_metric(summary: RunSummary, metric: Metric, best_epoch: int | None = None) -> bytes | None:
    """One image metric over the trained epochs, the base model's value as a dashed line and the best epoch
    starred; None when no trained epoch has a value."""
    points = [
        (e, row[metric.key], row.get(metric.spread) if metric.spread else None)
        for e, row in summary.per_epoch.items()
        if e > 0 and row.get(metric.key) is not None
    ]
    if not points:
        return None
    figure = _figure()
    ax = figure.add_subplot()
    epochs = [p[0] for p in points]
    values = [p[1] for p in points]
    if any(p[2] is not None for p in points):
        errors = [p[2] or 0.0 for p in points]
        ax.errorbar(epochs, values, yerr=errors, fmt="o-", color="#1f5f99", capsize=3, label="epoch")
    else:
        ax.plot(epochs, values, "o-", color="#1f5f99", label="epoch")
    base = summary.per_epoch.get(0, {}).get(metric.key)
    if base is not None:
        ax.axhline(base, color="#555555", linestyle="--", linewidth=1.2, label=f"base model ({base:.4g})")
    if best_epoch in epochs:
        value = values[epochs.index(best_epoch)]
        ax.plot(
            [best_epoch], [value], "*", color="#e67e22", markersize=14, label=f"best (epoch {best_epoch})"
        )
    ax.set_title(f"{metric.label} {metric.direction}", fontsize=10)
    ax.set_xlabel("epoch")
    ax.set_xticks(epochs if len(epochs) <= 20 else epochs[:: max(1, len(epochs) // 20)])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(figure)
