"""`loratk check` and the training preflight on a folder that mixes good and bad files."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import QUICKSTART_CAPTIONS, copy_examples, make_recipe
from loratk.cli import main as cli_main
from loratk.data.captions import Subset
from loratk.data.check import DataSpec, compute_perceptual_hash, find_near_duplicates, run_preflight

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "quickstart"

GOOD = ["boat.png", "green-hill.png", "mountain.png", "night-moon.png", "pine.png", "red-sun.png"]
BAD = {
    "cut.jpg": "damaged",
    "notes.png": "not_an_image",
    "empty.png": "empty",
    "tiny.png": "too_small",
    "nocaption.png": "caption_missing",
    "blank.png": "caption_empty",
    "latin1.png": "caption_not_utf8",
}


def make_mixed_folder(root: Path) -> Path:
    """The six example images (good), a near-duplicate of one, and one file for each kind of problem."""
    folder = root / "mixed"
    copy_examples(folder)
    # A near-duplicate: the boat re-encoded as JPEG at another size (a good image too).
    Image.open(folder / "boat.png").convert("RGB").resize((150, 109)).save(
        folder / "boat-copy.jpg", quality=80
    )
    (folder / "boat-copy.txt").write_text("a boat again")
    buffer = io.BytesIO()
    noise = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, "JPEG")
    (folder / "cut.jpg").write_bytes(buffer.getvalue()[:900])
    (folder / "notes.png").write_text("this is not a picture\n")
    (folder / "empty.png").write_bytes(b"")
    Image.new("RGB", (12, 40), (10, 20, 30)).save(folder / "tiny.png")
    Image.new("RGB", (64, 64), (200, 0, 0)).save(folder / "nocaption.png")
    Image.new("RGB", (64, 64), (0, 200, 0)).save(folder / "blank.png")
    Image.new("RGB", (64, 64), (0, 0, 200)).save(folder / "latin1.png")
    for name in ("cut", "notes", "empty", "tiny"):
        (folder / f"{name}.txt").write_text(f"caption of {name}")
    (folder / "blank.txt").write_text("   \n")
    (folder / "latin1.txt").write_bytes(b"caf\xe9")
    # Not problems, but worth a line: content that does not match the name, and an image with no image name.
    Image.new("RGB", (64, 48), (90, 90, 90)).save(folder / "gray.jpg", "PNG")
    (folder / "gray.txt").write_text("a gray card")
    Image.new("RGB", (8, 8)).save(folder / "stray.dat", "PNG")
    return folder


def _rows(path: Path) -> dict[str, dict[str, str]]:
    with open(path, newline="") as fh:
        return {Path(row["path"]).name: row for row in csv.DictReader(fh)}


def test_check_reports_every_problem_and_writes_the_csv(tmp_path, capsys):
    folder = make_mixed_folder(tmp_path)
    report_csv = tmp_path / "report.csv"
    code = cli_main(
        ["check", str(folder), "--resolution", "64", "--min-side", "16", "--report", str(report_csv)]
    )
    out = capsys.readouterr().out
    print(out)  # visible with -s: the report a user sees
    assert code == 1
    assert "loratk check: 1 folder(s), 15 image(s)" in out
    assert "ok (image and caption)                 8" in out
    for label in (
        "truncated or damaged",
        "not an image",
        "empty file (0 bytes)",
        "smaller than data.min_side",
    ):
        assert f"bad: {label}" in out
    assert "caption missing                        1" in out
    assert "caption empty or whitespace            1" in out
    assert "caption not UTF-8                      1" in out
    assert "Buckets of the usable images (" in out and "Near-duplicates" in out and "boat-copy.jpg" in out
    assert "content is PNG but the name ends in .jpg" in out and "stray.dat: ignored" in out
    assert "Result: 7 error(s)" in out

    rows = _rows(report_csv)
    assert set(rows) == set(GOOD) | set(BAD) | {"boat-copy.jpg", "gray.jpg"}
    for name in [*GOOD, "boat-copy.jpg", "gray.jpg"]:
        assert rows[name]["status"] == "ok" and rows[name]["bucket"], name
    for name, kind in BAD.items():
        assert rows[name]["status"] == "error" and kind in rows[name]["kind"].split(";"), (name, rows[name])
        assert name.split(".")[0] in rows[name]["problem"]  # the problem names the file
    assert rows["boat.png"]["width"] == "176" and rows["boat.png"]["height"] == "128"
    assert rows["boat.png"]["caption_source"] == "sidecar" and rows["boat.png"]["caption"].startswith(
        "a small boat"
    )
    assert rows["boat-copy.jpg"]["near_duplicate_of"].endswith("boat.png")
    assert "byte offset 3" in rows["latin1.png"]["problem"]


def test_quarantine_moves_bad_files_and_never_deletes(tmp_path, capsys):
    folder = make_mixed_folder(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    quarantine = tmp_path / "quarantine"
    (quarantine / "mixed").mkdir(parents=True)
    (quarantine / "mixed" / "tiny.png").write_bytes(b"an older file of the same name")
    args = [
        "check",
        str(folder),
        "--resolution",
        "64",
        "--min-side",
        "16",
        "--report",
        str(tmp_path / "r.csv"),
    ]
    assert cli_main([*args, "--quarantine", str(quarantine)]) == 0  # nothing bad is left in the folder
    out = capsys.readouterr().out
    assert "Quarantine: moved" in out and "nothing was deleted" in out
    moved = sorted(p.name for p in (quarantine / "mixed").iterdir())
    left = sorted(p.name for p in folder.iterdir())
    # Every file still exists somewhere; the name already taken in the quarantine got a suffix.
    renamed = [{"tiny.png": "tiny-1.png", "tiny.txt": "tiny-1.txt"}.get(n, n) for n in before]
    assert sorted(moved + left) == sorted([*renamed, "tiny.png"])
    assert (quarantine / "mixed" / "tiny.png").read_bytes() == b"an older file of the same name"
    assert {"tiny-1.png", "tiny-1.txt", "cut.jpg", "cut.txt", "latin1.png", "latin1.txt"} <= set(moved)
    assert not set(BAD) & set(left)
    assert _rows(tmp_path / "r.csv")["cut.jpg"]["moved_to"].endswith("quarantine/mixed/cut.jpg")
    assert cli_main(args) == 0


def test_check_a_recipe_with_overrides_and_usage_errors(tmp_path, capsys):
    folder = make_mixed_folder(tmp_path)
    recipe = REPO / "recipes" / "quickstart.toml"
    code = cli_main(["check", str(recipe), f"data.dir={folder}", f"output_dir={tmp_path / 'runs'}"])
    assert code == 1
    assert (tmp_path / "runs" / "quickstart" / "check.csv").is_file()
    capsys.readouterr()
    assert cli_main(["check", str(recipe), "--min-side", "3"]) == 2
    assert "apply to a folder" in capsys.readouterr().err
    assert cli_main(["check", str(tmp_path / "nope")]) == 2
    assert "no such folder or .toml recipe" in capsys.readouterr().err
    assert cli_main(["check", str(folder), "data.min_side=3"]) == 2
    with pytest.raises(SystemExit) as info:
        cli_main(["check", str(folder), "--resolution", "63"])
    assert info.value.code == 2


def test_check_on_the_quickstart_images_is_clean(capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # captions/quickstart.jsonl is found where `loratk caption` writes it
    assert cli_main(["check", "examples/quickstart", "--resolution", "64", "--report", "/dev/null"]) == 0
    out = capsys.readouterr().out
    assert "captions from captions/quickstart.jsonl" in out and "Result: no errors." in out


def test_check_a_folder_at_sdxl_size_says_which_flag_fits_small_images(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    assert cli_main(["check", "examples/quickstart", "--report", "/dev/null", "--no-duplicates"]) == 1
    out = capsys.readouterr().out
    assert "176x128 is smaller than data.min_side = 256" in out
    assert "Hint: with no --resolution, a folder is checked for training at 1024x1024" in out
    assert "--resolution 512" in out and "loratk check recipes/NAME.toml" in out


def test_check_a_folder_of_folders_looks_one_level_down_and_reports_under_runs(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data"
    copy_examples(data / "styles")
    copy_examples(data / "more")
    (data / "notes").mkdir()  # a folder without images is not a subset
    monkeypatch.chdir(tmp_path)
    assert cli_main(["check", "data", "--resolution", "64", "--no-duplicates"]) == 0
    out = capsys.readouterr().out
    assert (
        "data holds no images itself; checking the folders in it that do: data/more (6), data/styles (6)"
        in out
    )
    assert "2 folder(s), 12 image(s)" in out and "Result: no errors." in out
    # The CSV goes under runs/ (ignored by git in a checkout), not into the folder you run from.
    assert "Report: runs/check/data.csv" in out and (tmp_path / "runs" / "check" / "data.csv").is_file()
    assert not list(tmp_path.glob("*.csv"))


def test_perceptual_hash_finds_resized_and_recompressed_copies(tmp_path):
    boat = Image.open(EXAMPLES / "boat.png").convert("RGB")
    buffer = io.BytesIO()
    boat.resize((88, 64)).save(buffer, "JPEG", quality=60)
    copy = Image.open(buffer)
    others = [Image.open(EXAMPLES / name).convert("RGB") for name in GOOD[1:]]
    hashes = [compute_perceptual_hash(im) for im in [boat, copy, *others]]
    assert find_near_duplicates(hashes, 6) == [[0, 1]]
    assert find_near_duplicates(hashes, 0) in ([], [[0, 1]])


def test_subsets_with_manifest_metadata_trigger_and_repeats(tmp_path):
    from loratk.components.data import build_dataset, check_data

    styles = tmp_path / "styles"
    copy_examples(styles)
    for txt in styles.glob("*.txt"):
        txt.unlink()
    manifest = tmp_path / "captions" / "styles.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(
        "\n".join(json.dumps({"file_name": n, "text": f"print of {n[:-4]}"}) for n in GOOD) + "\n"
    )
    faces = tmp_path / "faces"
    faces.mkdir()
    for i in range(2):
        Image.new("RGB", (96, 64), (i * 100, 50, 50)).save(faces / f"{i}.png")
    (faces / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{i}.png", "text": f"face {i}"}) for i in range(2)) + "\n"
    )
    recipe = make_recipe(
        tmp_path,
        "unused-model",
        styles,
        data={
            "dir": None,
            "resolution": 64,
            "bucket_step": 16,
            "subsets": [
                {"dir": str(styles), "manifest": str(manifest), "trigger": "ukiyoe"},
                {"dir": str(faces), "repeats": 3, "trigger": "sks"},
            ],
        },
    )
    report = check_data(recipe)
    dataset = build_dataset(recipe, report)
    assert len(dataset) == 6 + 2 * 3
    captions = sorted({r.caption for r in dataset.records})
    assert "ukiyoe, print of boat" in captions and "sks, face 1" in captions
    assert {r.bucket for r in dataset.records} == {(80, 48), (64, 64), (48, 80)}


def test_preflight_spec_defaults_scale_with_the_resolution(tmp_path):
    spec = DataSpec(subsets=(Subset(EXAMPLES, manifest=QUICKSTART_CAPTIONS),), resolution=(64, 64))
    assert spec.effective_min_side == 16
    report = run_preflight(spec)
    assert not report.has_errors and {r.bucket for r in report.images} == {(64, 64)}


def test_two_subsets_over_one_folder_get_their_own_reports(tmp_path):
    from loratk.components.data import build_dataset

    spec = DataSpec(
        subsets=(
            Subset(EXAMPLES, manifest=QUICKSTART_CAPTIONS, trigger="ta"),
            Subset(EXAMPLES, manifest=QUICKSTART_CAPTIONS, trigger="tb", repeats=2),
        ),
        resolution=(64, 64),
    )
    report = run_preflight(spec)
    assert len(report.images) == 12 and not report.has_errors
    assert {r.caption.split(",")[0] for r in report.images} == {"ta", "tb"}
    recipe = make_recipe(tmp_path, "m", EXAMPLES, data={"manifest": str(QUICKSTART_CAPTIONS)})
    dataset = build_dataset(recipe, report)
    assert len(dataset) == 6 + 2 * 6  # repeats follow each subset, not each folder
    assert sum(r.caption.startswith("tb, ") for r in dataset.records) == 12
