"""Read a run folder (finished or still training) into a `RunSummary`: what it is, what it recorded per epoch,
what it wrote. Any part may be missing; only a missing folder or a damaged file is an error.

Reads `recipe.resolved.toml` with tomllib (not `loratk.recipe`: a run of an older or newer loratk, or of a
method this one lacks, still reads), `metrics.jsonl`, `eval.jsonl`, the exported files and `samples/`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

EPOCH_FILE = re.compile(r"^epoch(\d+)(\.safetensors|\.lora\.safetensors|_diffusers)$")
SAMPLE_FOLDER = re.compile(r"^epoch(\d+)$")
FROM_SCRATCH = ("dcgan", "wgan-gp")  # methods that train without a base model (the GAN baselines)
MEMORY_KEYS = ("mem/peak_gib", "mem/peak_rss_gib")  # accelerator memory first, else the CPU's resident size


class RunReadError(ValueError):
    """A run folder or one of its files cannot be read; the message names the folder, file and line."""


@dataclass(frozen=True)
class FileInfo:
    path: Path
    size: int  # bytes; a folder (a diffusers export) counts every file in it


@dataclass
class RunSummary:
    """What one run folder holds. `per_epoch[e]`: metric key -> value (None = recorded as non-finite; a key
    that is absent was not computed); epoch 0 is the base model (no adapter)."""

    name: str
    method: str | None
    base_model: str | None
    run_dir: Path
    epochs: list[int] = field(default_factory=list)
    per_epoch: dict[int, dict[str, float | None]] = field(default_factory=dict)
    notes: dict[int, list[str]] = field(default_factory=dict)  # eval.jsonl's notes per epoch
    counts: dict[int, dict[str, int]] = field(default_factory=dict)  # images per evaluated epoch
    eval_settings: dict[int, dict[str, str]] = field(default_factory=dict)  # models, library, resize
    train_curve: list[tuple[int, float]] = field(default_factory=list)  # (step, train/loss)
    val_curve: list[tuple[int, int, float]] = field(default_factory=list)  # (epoch, step, val/loss)
    epoch_seconds: dict[int, float] = field(default_factory=dict)
    wall_time_s: float | None = None  # sum of time/epoch_s
    peak_memory_gib: float | None = None
    peak_memory_key: str | None = None  # "mem/peak_gib" (accelerator) or "mem/peak_rss_gib" (CPU)
    epoch_files: dict[int, list[FileInfo]] = field(default_factory=dict)
    final_files: list[FileInfo] = field(default_factory=list)
    samples: dict[int, Path] = field(default_factory=dict)  # epoch -> samples/epoch007 (0: samples/base)
    grid: Path | None = None  # samples/grid.png
    leak_grid: Path | None = None  # eval/leak/grid.png
    recipe: dict[str, Any] = field(default_factory=dict)
    recipe_text: str | None = None
    read_notes: list[str] = field(default_factory=list)  # what reading skipped (a truncated last line)

    @property
    def final_file(self) -> FileInfo | None:
        return self.final_files[0] if self.final_files else None

    @property
    def trained_epochs(self) -> list[int]:
        return [e for e in self.epochs if e > 0]

    def metric_keys(self) -> set[str]:
        return {k for row in self.per_epoch.values() for k in row}


def _folder_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _number(value: Any) -> float | None:
    """JSON null (a non-finite value) and anything not a number read as None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file. A damaged last line (a crash mid-write) is skipped with a note;
    a damaged line before it is a RunReadError naming the file and line."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise RunReadError(f"{path}: cannot read ({err.strerror or err})") from None
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    rows = []
    for i, (number, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if i == len(numbered) - 1:
                notes.append(f"{path.name}: skipped line {number}, cut short (the run stopped mid-write?)")
                break
            raise RunReadError(
                f"{path}: line {number} is not valid JSON ({err.msg}); fix or delete that line"
            ) from None
        if not isinstance(row, dict):
            raise RunReadError(f"{path}: line {number} is not a JSON object")
        rows.append(row)
    return rows


def _epoch(row: dict[str, Any], path: Path) -> int | None:
    epoch = row.get("epoch")
    if epoch is None:
        return None
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise RunReadError(f"{path}: epoch {epoch!r} is not a whole number >= 0")
    return epoch


def _read_recipe(run_dir: Path, summary: RunSummary) -> None:
    path = run_dir / "recipe.resolved.toml"
    if not path.is_file():
        return
    try:
        summary.recipe_text = path.read_text(encoding="utf-8", errors="replace")
        summary.recipe = tomllib.loads(summary.recipe_text)
    except tomllib.TOMLDecodeError as err:
        raise RunReadError(f"{path}: not valid TOML ({err})") from None
    summary.name = str(summary.recipe.get("name") or summary.name)
    summary.method = summary.recipe.get("method")
    if summary.method is None and summary.recipe:
        summary.method = "lora"  # the recipe's default method
    model = summary.recipe.get("model")
    if summary.method in FROM_SCRATCH:
        return
    if isinstance(model, dict) and model.get("path") is not None:
        summary.base_model = str(model["path"])


def _read_metrics(run_dir: Path, summary: RunSummary) -> None:
    path = run_dir / "metrics.jsonl"
    steps: dict[int, list[float]] = {}
    peaks: dict[str, float] = {}
    for row in read_jsonl(path, summary.read_notes):
        epoch = _epoch(row, path)
        step = row.get("step")
        for key in MEMORY_KEYS:
            value = _number(row.get(key))
            if value is not None:
                peaks[key] = max(peaks.get(key, value), value)
        if epoch is None:
            continue
        if "train/loss" in row:
            loss = _number(row["train/loss"])
            if loss is not None and isinstance(step, int):
                summary.train_curve.append((step, loss))
                steps.setdefault(epoch, []).append(loss)
            continue
        values = summary.per_epoch.setdefault(epoch, {})
        for key, value in row.items():
            if key == "val/loss" or key.startswith("eval/"):
                values[key.removeprefix("eval/")] = _number(value)
        if "val/loss" in row and _number(row["val/loss"]) is not None and isinstance(step, int):
            summary.val_curve = [p for p in summary.val_curve if p[0] != epoch]
            summary.val_curve.append((epoch, step, float(row["val/loss"])))
        if _number(row.get("time/epoch_s")) is not None:
            summary.epoch_seconds[epoch] = float(row["time/epoch_s"])
    for epoch, losses in steps.items():
        summary.per_epoch.setdefault(epoch, {})["train/loss"] = sum(losses) / len(losses)
    summary.train_curve.sort()
    summary.val_curve.sort()
    if summary.epoch_seconds:
        summary.wall_time_s = sum(summary.epoch_seconds.values())
    for key in MEMORY_KEYS:
        if key in peaks:
            summary.peak_memory_gib, summary.peak_memory_key = peaks[key], key
            break


def _read_eval(run_dir: Path, summary: RunSummary) -> None:
    """eval.jsonl: one row per evaluated epoch; a later row for an epoch replaces the earlier one."""
    path = run_dir / "eval.jsonl"
    latest: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(path, summary.read_notes):
        epoch = _epoch(row, path)
        if epoch is None:
            raise RunReadError(f"{path}: a row has no epoch")
        latest[epoch] = row
    for epoch, row in latest.items():
        metrics = row.get("metrics") or {}
        if not isinstance(metrics, dict):
            raise RunReadError(f"{path}: epoch {epoch}: 'metrics' is not an object")
        values = summary.per_epoch.setdefault(epoch, {})
        for key, value in metrics.items():
            values[str(key).removeprefix("eval/")] = _number(value)
        notes = row.get("notes") or []
        summary.notes[epoch] = [str(n) for n in notes] if isinstance(notes, list) else [str(notes)]
        if isinstance(row.get("counts"), dict):
            summary.counts[epoch] = {str(k): v for k, v in row["counts"].items() if isinstance(v, int)}
        if isinstance(row.get("settings"), dict):
            summary.eval_settings[epoch] = {str(k): str(v) for k, v in row["settings"].items()}


def _read_files(run_dir: Path, summary: RunSummary) -> None:
    for path in sorted(run_dir.iterdir()):
        match = EPOCH_FILE.match(path.name)
        if match:
            summary.epoch_files.setdefault(int(match[1]), []).append(FileInfo(path, _folder_size(path)))
    for suffix in (".safetensors", ".lora.safetensors", "_diffusers", "-diffusers"):
        path = run_dir / f"{summary.name}{suffix}"
        if path.exists():
            summary.final_files.append(FileInfo(path, _folder_size(path)))
    samples = run_dir / "samples"
    if (samples / "base").is_dir():
        summary.samples[0] = samples / "base"
    if samples.is_dir():
        for path in samples.iterdir():
            match = SAMPLE_FOLDER.match(path.name)
            if match and path.is_dir():
                summary.samples[int(match[1])] = path
    summary.samples = dict(sorted(summary.samples.items()))
    if (samples / "grid.png").is_file():
        summary.grid = samples / "grid.png"
    if (run_dir / "eval" / "leak" / "grid.png").is_file():
        summary.leak_grid = run_dir / "eval" / "leak" / "grid.png"


def load_run(run_dir: str | Path) -> RunSummary:
    """Read `run_dir` (a finished or running run). RunReadError for a missing folder or a damaged file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunReadError(f"{run_dir}: no such run folder")
    summary = RunSummary(name=run_dir.resolve().name, method=None, base_model=None, run_dir=run_dir)
    _read_recipe(run_dir, summary)
    _read_metrics(run_dir, summary)
    _read_eval(run_dir, summary)
    try:
        _read_files(run_dir, summary)
    except OSError as err:
        raise RunReadError(f"{run_dir}: cannot list its files ({err.strerror or err})") from None
    summary.per_epoch = dict(sorted(summary.per_epoch.items()))
    epochs = set(summary.per_epoch) | set(summary.epoch_files) | set(summary.samples)
    summary.epochs = sorted(epochs)
    return summary
