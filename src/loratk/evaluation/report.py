"""`runs/<name>/report.html`: one self-contained page on a run (facts, best epoch, metrics per epoch, plots,
sample grids, recipe) that opens from disk with no server and no network.

Plots are embedded PNGs; images the run folder holds are linked by relative path, and only when they exist.
Rebuilt after every epoch, so it only reads the folder and draws a few small plots.
"""

from __future__ import annotations

import base64
from html import escape
from pathlib import Path
from urllib.parse import quote

from loratk import __version__
from loratk.evaluation.best import BestEpoch, choose_best_epoch
from loratk.evaluation.metric_names import (
    Metric,
    format_duration,
    format_entry,
    format_size,
    format_value,
    order_metrics,
)
from loratk.evaluation.plots import plot_losses, plot_metric
from loratk.evaluation.runs import FileInfo, RunSummary, load_run
from loratk.files import atomic_write_text

REPORT_NAME = "report.html"
MEMORY_LABELS = {"mem/peak_gib": "accelerator, reserved", "mem/peak_rss_gib": "CPU, resident set"}

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto;
  max-width: 1200px; padding: 0 1em; color: #1d1d1f; background: #fff; line-height: 1.45; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.92em; }
th, td { border: 1px solid #d8d8d8; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f3f4f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.base td { background: #f7f7f7; color: #444; }
tr.best td { background: #fff4d6; font-weight: 600; }
.facts th { width: 12em; }
.best-box { background: #fff4d6; border: 1px solid #f0c75e; padding: 0.6em 1em; border-radius: 6px; }
.none-box { background: #f3f4f6; border: 1px solid #d8d8d8; padding: 0.6em 1em; border-radius: 6px; }
.plots img { max-width: 100%; margin: 0.3em 0.3em 0.3em 0; border: 1px solid #eee; }
.plots { display: flex; flex-wrap: wrap; }
.grid img { max-width: 100%; border: 1px solid #ddd; }
.notes { color: #7a4b00; font-size: 0.88em; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 0.85em; border-radius: 6px; }
dt { font-weight: 600; } dd { margin: 0 0 0.4em 1.5em; color: #444; }
"""


def _href(summary: RunSummary, path: Path) -> str:
    """A relative, URL-quoted link from report.html (in the run folder) to `path`, escaped for an attribute."""
    try:
        relative = path.relative_to(summary.run_dir)
    except ValueError:
        relative = path
    return escape(quote(relative.as_posix()), quote=True)


def _files_text(files: list[FileInfo]) -> str:
    return ", ".join(f"{escape(f.path.name)} ({format_size(f.size)})" for f in files) or "-"


def _facts(summary: RunSummary) -> str:
    memory = "-"
    if summary.peak_memory_gib is not None:
        kind = MEMORY_LABELS.get(summary.peak_memory_key or "", summary.peak_memory_key or "")
        memory = f"{summary.peak_memory_gib:.2f} GiB ({kind})"
    trained = summary.trained_epochs
    planned = (
        summary.recipe.get("train", {}).get("epochs")
        if isinstance(summary.recipe.get("train"), dict)
        else None
    )
    epochs = f"{max(trained)} recorded" if trained else "none yet"
    if planned is not None:
        epochs += f" of {planned}"
    rows = [
        ("method", escape(summary.method or "-")),
        ("base model", escape(summary.base_model or "-")),
        ("run folder", escape(str(summary.run_dir))),
        ("epochs", escape(epochs)),
        ("training time", escape(format_duration(summary.wall_time_s))),
        ("peak memory", escape(memory)),
        ("final file", _files_text(summary.final_files)),
        ("epoch files", "<br>".join(_files_text(f) for _, f in sorted(summary.epoch_files.items())) or "-"),
    ]
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="facts">{body}</table>'


def _best(summary: RunSummary, best: BestEpoch | None) -> str:
    if best is None:
        return (
            '<p class="none-box">No best epoch: this run has recorded no validation loss and no image metrics '
            "for a trained epoch yet.</p>"
        )
    files = summary.epoch_files.get(best.epoch, [])
    use = f"<br>Its files: {_files_text(files)}." if files else ""
    return (
        f'<p class="best-box"><strong>Epoch {best.epoch}</strong> ({escape(best.metric)} '
        f"{escape(format_value(best.value))}): {escape(best.reason)}{use}</p>"
    )


def _counts_text(counts: dict[str, int]) -> str:
    return " / ".join(f"{v} {k}" for k, v in counts.items())


def _direction_words(metric: Metric) -> str:
    if metric.higher_is_better is None:
        return ""
    return " (higher is better)" if metric.higher_is_better else " (lower is better)"


def _metrics_table(summary: RunSummary, metrics: list[Metric], best: BestEpoch | None) -> str:
    head = "".join(
        f'<th title="{escape(m.description, quote=True)}">{escape(m.label)} {m.direction}</th>'
        for m in metrics
    )
    rows = []
    for epoch in summary.epochs:
        row = summary.per_epoch.get(epoch, {})
        is_best = best is not None and best.epoch == epoch
        label = "base model (0)" if epoch == 0 else f"epoch {epoch}" + (" ★ best" if is_best else "")
        css = "base" if epoch == 0 else "best" if is_best else ""
        cells = "".join(f'<td class="num">{escape(format_entry(row, m))}</td>' for m in metrics)
        counts = escape(_counts_text(summary.counts.get(epoch, {})))
        rows.append(f'<tr class="{css}"><td>{escape(label)}</td>{cells}<td>{counts}</td></tr>')
    if not rows:
        return "<p>Nothing recorded yet.</p>"
    legend = "".join(
        f"<dt>{escape(m.label)} {m.direction}</dt><dd>{escape(m.description or 'not in the metric table')}"
        f"{_direction_words(m)}</dd>"
        for m in metrics
    )
    return (
        f"<table><thead><tr><th>epoch</th>{head}<th>images</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>{_notes(summary)}"
        '<p class="sub">- not computed; nan: recorded as non-finite; ↑ higher is better, ↓ lower is better.'
        f"</p><dl>{legend}</dl>{_settings(summary)}"
    )


def _notes(summary: RunSummary) -> str:
    """The evaluator's notes under the table, each once with the epochs it was made for."""
    epochs_of: dict[str, list[int]] = {}
    for epoch in summary.epochs:
        for note in summary.notes.get(epoch, []):
            epochs_of.setdefault(note, []).append(epoch)
    if not epochs_of:
        return ""
    items = "".join(
        f"<li><strong>{'epoch' if len(e) == 1 else 'epochs'} {', '.join(map(str, e))}:</strong> {escape(n)}</li>"
        for n, e in epochs_of.items()
    )
    return f'<h3>Notes</h3><ul class="notes">{items}</ul>'


def _settings(summary: RunSummary) -> str:
    """What the image metrics were computed with (numbers from other models or libraries do not compare)."""
    if not summary.eval_settings:
        return ""
    latest = summary.eval_settings[max(summary.eval_settings)]
    differ = [e for e, s in summary.eval_settings.items() if s != latest]
    items = "".join(f"<li>{escape(k)}: {escape(v)}</li>" for k, v in latest.items())
    warning = (
        f'<p class="notes">Epochs {escape(", ".join(map(str, sorted(differ))))} were evaluated with other '
        "settings: their numbers do not compare with the rest.</p>"
        if differ
        else ""
    )
    return f"<h3>Evaluation settings</h3><ul>{items}</ul>{warning}"


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{escape(alt, quote=True)}">'


def _plots(summary: RunSummary, metrics: list[Metric], best: BestEpoch | None) -> str:
    parts = []
    losses = plot_losses(summary)
    if losses is not None:
        parts.append(f'<h2>Loss</h2><div class="plots">{_img(losses, "train and val loss")}</div>')
    images = []
    for metric in metrics:
        if not metric.image:
            continue
        png = plot_metric(summary, metric, best.epoch if best else None)
        if png is not None:
            images.append(_img(png, f"{metric.label} per epoch"))
    if images:
        parts.append(f'<h2>Image metrics</h2><div class="plots">{"".join(images)}</div>')
    return "".join(parts)


def _grids(summary: RunSummary) -> str:
    parts = []
    for path, title, what in (
        (summary.grid, "Samples", "rows: the base model and each sampled epoch; columns: prompt x seed"),
        (summary.leak_grid, "Leak check", "the leak prompts, same prompt and seed, base model and epochs"),
    ):
        if path is not None and path.is_file():
            href = _href(summary, path)
            parts.append(
                f'<h2>{title}</h2><p class="sub">{escape(what)} (<a href="{href}">{href}</a>)</p>'
                f'<div class="grid"><a href="{href}"><img src="{href}" alt="{escape(title)} grid"></a></div>'
            )
    folders = [
        f'<a href="{_href(summary, p)}/">{escape(p.name)}</a>'
        for _, p in summary.samples.items()
        if p.is_dir()
    ]
    if folders:
        parts.append(f"<p>Sample folders: {', '.join(folders)}</p>")
    return "".join(parts)


def render_report(summary: RunSummary, *, metric: str = "auto", tolerance: float = 0.02) -> str:
    """The HTML text of the report; every value from the run folder is escaped."""
    best = choose_best_epoch(summary, metric, tolerance)
    metrics = order_metrics(summary.metric_keys())
    title = f"{summary.name}: loratk run report"
    recipe = (
        f"<h2>Recipe</h2><pre>{escape(summary.recipe_text)}</pre>" if summary.recipe_text is not None else ""
    )
    read_notes = "".join(f'<p class="notes">{escape(n)}</p>' for n in summary.read_notes)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escape(summary.name)}</h1>"
        f'<p class="sub">{escape(summary.method or "unknown method")} · loratk {escape(__version__)} run '
        "report</p>"
        f"{_facts(summary)}<h2>Best epoch</h2>{_best(summary, best)}"
        f"<h2>Metrics per epoch</h2>{_metrics_table(summary, metrics, best)}"
        f"{_plots(summary, metrics, best)}{_grids(summary)}{recipe}{read_notes}"
        "</body></html>\n"
    )


def write_report(run_dir: str | Path, *, metric: str = "auto", tolerance: float = 0.02) -> Path:
    """Write `run_dir/report.html` atomically (a reader never sees half a page) and return its path."""
    summary = load_run(run_dir)
    path = Path(run_dir) / REPORT_NAME
    atomic_write_text(path, render_report(summary, metric=metric, tolerance=tolerance))
    return path
