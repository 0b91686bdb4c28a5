"""Several runs side by side (`loratk compare`): a table of what each cost and how its best epoch scored, and a
grid of their samples, one row per run, one column per image (prompt and seed) every run rendered.

Nothing here assumes LoRA files, SDXL or a method: a run contributes whatever its folder holds.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from urllib.parse import quote

from loratk.evaluation.best import BestEpoch, choose_best_epoch
from loratk.evaluation.metric_names import (
    Metric,
    format_duration,
    format_entry,
    format_size,
    order_metrics,
    require_metric,
)
from loratk.evaluation.report import STYLE
from loratk.evaluation.runs import RunSummary, load_run

SAMPLE_NAME = re.compile(r"^(\d+)-seed(-?\d+)\.png$")  # sampling.specs.ImageSpec.filename
NOT_COMPARED = {
    "train/loss"
}  # a DreamBooth run's loss includes the prior term: not comparable across methods


class CompareError(ValueError):
    """Bad input to `loratk compare`; the message says what to pass instead."""


@dataclass(frozen=True)
class SampleKey:
    """Two runs rendered the same image when file name, prompt and seed agree."""

    filename: str
    prompt: str | None
    seed: int | None

    @property
    def label(self) -> str:
        match = SAMPLE_NAME.match(self.filename)
        where = f"#{int(match[1])} seed {match[2]}" if match else self.filename
        return f"{where}: {self.prompt}" if self.prompt is not None else where


@dataclass
class CompareRow:
    summary: RunSummary
    label: str
    best: BestEpoch | None
    sample_epoch: int | None  # the samples shown: the best epoch's, else the last sampled epoch's
    samples: dict[SampleKey, Path] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float | None]:
        return self.summary.per_epoch.get(self.best.epoch, {}) if self.best else {}


@dataclass
class Comparison:
    rows: list[CompareRow]
    metrics: list[Metric]  # one column each: every metric some run has at its best epoch
    columns: list[SampleKey]  # the images every run with samples rendered
    notes: list[str] = field(default_factory=list)


def read_sample_keys(folder: Path) -> dict[SampleKey, Path]:
    """The PNGs of a samples folder by (file name, prompt, seed), read from their `parameters` text."""
    from PIL import Image

    from loratk.prompts import parse_parameters

    keys = {}
    for path in sorted(folder.glob("*.png")):
        try:
            with Image.open(path) as image:
                text = image.text.get("parameters")
        except (OSError, ValueError):
            continue  # an unreadable image is no column; the grid would show it as missing anyway
        parsed = parse_parameters(text) if text else {}
        keys[SampleKey(path.name, parsed.get("prompt"), parsed.get("seed"))] = path
    return keys


def _sample_epoch(summary: RunSummary, best: BestEpoch | None) -> int | None:
    if best is not None and best.epoch in summary.samples:
        return best.epoch
    sampled = [e for e in summary.samples if e > 0]
    return max(sampled) if sampled else None


def _settings_note(rows: list[CompareRow]) -> str | None:
    """REFERENCE §6: image metrics computed with other models or libraries do not compare."""
    settings = {
        row.label: row.summary.eval_settings[row.best.epoch]
        for row in rows
        if row.best is not None and row.best.epoch in row.summary.eval_settings
    }
    if len({tuple(sorted(s.items())) for s in settings.values()}) <= 1:
        return None
    differ = sorted(
        {k for s in settings.values() for k in s if len({t.get(k) for t in settings.values()}) > 1}
    )
    return (
        f"the image metrics were computed with different settings ({', '.join(differ)}): "
        + "; ".join(
            f"{label}: " + ", ".join(f"{k}={s.get(k, '-')}" for k in differ) for label, s in settings.items()
        )
        + ". Those numbers do not compare."
    )


def compare_runs(run_dirs: list[str | Path], *, metric: str = "auto", tolerance: float = 0.02) -> Comparison:
    """Read each run, choose its best epoch by `metric`, find the images every sampled run shares."""
    if metric != "auto":
        require_metric(metric)
    unique: dict[Path, Path] = {}
    for run_dir in map(Path, run_dirs):
        unique.setdefault(run_dir.resolve(), run_dir)
    if len(unique) < 2:
        raise CompareError(f"compare needs at least two different run folders, got {len(unique)}")
    summaries = [load_run(path) for path in unique.values()]  # RunReadError names a missing folder
    names = [s.name for s in summaries]
    rows = []
    for summary in summaries:
        label = summary.name if names.count(summary.name) == 1 else str(summary.run_dir)
        best = choose_best_epoch(summary, metric, tolerance)
        row = CompareRow(summary, label, best, _sample_epoch(summary, best))
        if row.sample_epoch is not None:
            row.samples = read_sample_keys(summary.samples[row.sample_epoch])
        rows.append(row)
    keys = {k for row in rows for k in row.metrics} - NOT_COMPARED
    sampled = [row for row in rows if row.samples]
    columns = (
        sorted(set.intersection(*(set(r.samples) for r in sampled)), key=lambda k: k.filename)
        if sampled
        else []
    )
    notes = [
        f"{row.label}: no best epoch (no validation loss or image metrics recorded)"
        for row in rows
        if not row.best
    ]
    notes += [f"{row.label}: no samples of a trained epoch" for row in rows if not row.samples]
    if sampled and not columns:
        notes.append("the runs share no sample image (same file name, prompt and seed): no grid")
    note = _settings_note(rows)
    if note:
        notes.append(note)
    return Comparison(rows, order_metrics(keys), columns, notes)


def table_cells(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """The comparison table as header + rows of text cells (the text table and the HTML share it)."""
    header = ["run", "method", "final file", "training time", "peak memory", "best epoch"]
    header += [f"{m.label} {m.direction}" for m in comparison.metrics]
    body = []
    for row in comparison.rows:
        s = row.summary
        memory = "-"
        if s.peak_memory_gib is not None:
            memory = f"{s.peak_memory_gib:.1f} GiB" + (
                " (CPU)" if s.peak_memory_key == "mem/peak_rss_gib" else ""
            )
        best = f"{row.best.epoch} ({row.best.metric})" if row.best else "-"
        cells = [row.label, s.method or "-", format_size(s.final_file.size if s.final_file else None)]
        cells += [format_duration(s.wall_time_s), memory, best]
        cells += [format_entry(row.metrics, m) for m in comparison.metrics]
        body.append(cells)
    return header, body


def format_table(comparison: Comparison) -> str:
    """An aligned text table (numbers right-aligned), then the notes."""
    header, body = table_cells(comparison)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths), *map(line, body)]
    out += [f"note: {n}" for n in comparison.notes]
    return "\n".join(out)


def build_compare_grid(comparison: Comparison):
    """One row per run (its sample epoch), one column per shared image; a run without samples is grey."""
    from loratk.sampling.images import build_grid, open_image

    cells, labels = [], []
    for row in comparison.rows:
        path_of = row.samples
        cells.append([open_image(path_of[k]) if k in path_of else None for k in comparison.columns])
        epoch = row.sample_epoch
        which = (
            "no samples"
            if epoch is None
            else f"epoch {epoch}" + (" (best)" if row.best and row.best.epoch == epoch else "")
        )
        # build_grid sizes the label column by the first line: the longest one.
        labels.append(f"{row.label} ({row.summary.method or 'unknown method'})\n{which}")
    return build_grid(cells, labels, [k.label for k in comparison.columns])


def _relative(target: Path, start: Path) -> str:
    return escape(quote(Path(os.path.relpath(target.resolve(), start.resolve())).as_posix()), quote=True)


def render_compare_html(comparison: Comparison, out_dir: Path, grid_name: str | None) -> str:
    header, body = table_cells(comparison)
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    rows = []
    for row, cells in zip(comparison.rows, body, strict=True):
        report = row.summary.run_dir / "report.html"
        name = escape(cells[0])
        if report.is_file():
            name = f'<a href="{_relative(report, out_dir)}">{name}</a>'
        tds = f"<td>{escape(cells[1])}</td>" + "".join(f'<td class="num">{escape(c)}</td>' for c in cells[2:])
        reason = escape(row.best.reason) if row.best else "no best epoch"
        rows.append(
            f'<tr><td>{name}</td>{tds}</tr><tr><td></td><td colspan="{len(cells) - 1}" class="notes">{reason}</td></tr>'
        )
    notes = "".join(f'<p class="notes">{escape(n)}</p>' for n in comparison.notes)
    grid = ""
    if grid_name:
        href = escape(quote(grid_name), quote=True)
        grid = f'<h2>Samples</h2><div class="grid"><a href="{href}"><img src="{href}" alt="samples of each run"></a></div>'
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>loratk compare: {escape(', '.join(r.label for r in comparison.rows))}</title>"
        f"<style>{STYLE}</style></head><body><h1>Runs compared</h1>"
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>{notes}{grid}"
        "</body></html>\n"
    )


def write_comparison(comparison: Comparison, out_dir: str | Path) -> tuple[Path, Path | None]:
    """Write `out_dir/compare.png` (when the runs share samples) and `out_dir/compare.html`, atomically."""
    from loratk.files import atomic_write_text
    from loratk.sampling.images import save_grid

    out_dir = Path(out_dir)
    png = out_dir / "compare.png"
    if comparison.columns:
        save_grid(build_compare_grid(comparison), png)
    else:
        png.unlink(missing_ok=True)  # an earlier comparison's grid would not belong to this table
    html = out_dir / "compare.html"
    atomic_write_text(
        html, render_compare_html(comparison, out_dir, png.name if comparison.columns else None)
    )
    return html, png if comparison.columns else None
