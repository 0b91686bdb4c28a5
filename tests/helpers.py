"""Small builders shared by tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from loratk.recipe import Recipe, validate_recipe


def make_recipe(
    tmp_path: Path, model_dir: Path | str, images_dir: Path, name: str = "test", **sections: Any
) -> Recipe:
    """A tiny, fast LoRA recipe; `sections` override whole keys, e.g. train={"epochs": 2}."""
    raw: dict[str, Any] = {
        "name": name,
        "output_dir": str(tmp_path / "runs"),
        "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"dir": str(images_dir), "resolution": 64},
        "lora": {"rank": 4, "alpha": 4},
        "train": {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3, "mixed_precision": "no"},
        "optim": {"name": "adamw"},
        "eval": {"every_n_epochs": 0},  # image metrics only where a test asks (every_n_epochs=None or N)
    }
    for section, values in sections.items():
        if isinstance(values, dict):
            raw.setdefault(section, {}).update(values)
        else:
            raw[section] = values
    return validate_recipe(raw, source="test")


REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "quickstart"
QUICKSTART_CAPTIONS = REPO / "captions" / "quickstart.jsonl"


def copy_examples(target: Path) -> Path:
    """The quickstart images in `target`, each with a sidecar caption taken from captions/quickstart.jsonl
    (the manifest the quickstart reads): the folder layout most tests train on."""
    shutil.copytree(EXAMPLES, target)
    for line in QUICKSTART_CAPTIONS.read_text().splitlines():
        entry = json.loads(line)
        (target / entry["file_name"]).with_suffix(".txt").write_text(entry["text"] + "\n")
    return target


def step_rows(metrics: Path) -> list[dict[str, Any]]:
    """The per-step rows of a metrics.jsonl (epoch rows, such as `val/loss` or `time/epoch_s`, left out); a
    line still being written is skipped."""
    if not metrics.exists():
        return []
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "train/loss" in row:
            rows.append(row)
    return rows
