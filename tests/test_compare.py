"""`loratk compare`: the table and the side-by-side grid of several runs, of any method, and its errors."""

from __future__ import annotations

import re
import shutil
from html.parser import HTMLParser

import pytest
from PIL import Image
from run_folders import PROMPTS, make_run, write_samples

from loratk.cli import main
from loratk.evaluation.compare import compare_runs
from loratk.sampling.images import read_grid_labels


def metrics(dino: tuple[float, float, float], kid: tuple[float, float, float]) -> dict:
    rows = {0: {"clip_t": 0.31, "dino": 0.5, "kid": 0.05, "fid": 200.0}}
    for epoch, (d, k) in enumerate(zip(dino, kid, strict=True), start=1):
        rows[epoch] = {"clip_t": 0.30, "dino": d, "kid": k, "fid": 150.0 + epoch}
    return rows


@pytest.fixture
def three_runs(tmp_path):
    runs = tmp_path / "runs"
    return [
        make_run(runs, "style-lora", method="lora", image_metrics=metrics((0.6, 0.7, 0.65), (0.03, 0.02, 0.01))),
        make_run(
            runs, "dog-db", method="dreambooth", file_size=5000, memory_key="mem/peak_rss_gib",
            image_metrics=metrics((0.55, 0.6, 0.75), (0.04, 0.03, 0.035)),
        ),
        make_run(runs, "dog-dblora", method="dreambooth-lora", val_losses=None, image_metrics=None, sampled=[1, 2]),
    ]  # fmt: skip


class Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src")]

    def handle_data(self, data):
        self.text.append(data)


def test_compare_three_methods_prints_the_table_and_writes_html_and_png(three_runs, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, three_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header, rule, *rows = printed.splitlines()
    for column in (
        "run",
        "method",
        "final file",
        "training time",
        "peak memory",
        "best epoch",
        "DINO ↑",
        "KID ↓",
    ):
        assert column in header
    assert "CLIP-T ↑" in header and "train loss" not in header  # a DreamBooth loss holds the prior term
    lora, db, dblora = rows[:3]
    assert lora.split()[:2] == ["style-lora", "lora"] and "2 (dino)" in lora and "1000 B" in lora
    assert db.split()[:2] == ["dog-db", "dreambooth"] and "3 (dino)" in db and "4.9 KiB" in db
    assert "(CPU)" in db and "3m00s" in db
    assert dblora.split()[:2] == ["dog-dblora", "dreambooth-lora"] and dblora.split()[-1] == "-"
    assert "note: dog-dblora: no best epoch" in printed
    columns = [m.span() for m in re.finditer("-+", rule)]  # aligned: names start, numbers end, at the rule
    for line in [header, *rows[:3]]:
        assert all(line[a] != " " for a, _ in columns[:2]) and all(line[b - 1] != " " for _, b in columns[2:])
    assert (out / "compare.html").is_file() and (out / "compare.png").is_file()
    labels = read_grid_labels(out / "compare.png")
    assert labels["rows"] == [
        "style-lora (lora)\nepoch 2 (best)",
        "dog-db (dreambooth)\nepoch 3 (best)",
        "dog-dblora (dreambooth-lora)\nepoch 2",  # no metrics: its last sampled epoch
    ]
    assert labels["columns"] == [f"#1 seed 7: {PROMPTS[0]}", f"#2 seed 7: {PROMPTS[1]}"]
    with Image.open(out / "compare.png") as grid:
        assert grid.width > 64 and grid.height > 3 * 32
        # Each row shows its own run's image: the epochs differ in colour (run_folders.write_samples).
        cells = {
            grid.convert("RGB").getpixel((grid.width - 5, grid.height * (2 * r + 1) // 7)) for r in range(3)
        }
        assert len(cells) >= 2
    page = Links()
    page.feed((out / "compare.html").read_text())
    assert "compare.png" in page.links and not [link for link in page.links if link.startswith("http")]
    assert "dog-dblora" in " ".join(page.text) and "within 0.02" in " ".join(page.text)


def test_the_grid_columns_are_the_images_every_run_rendered_alike(three_runs):
    lora, db, dblora = three_runs
    write_samples(
        lora / "samples" / "epoch002", color=(0, 0, 0), epoch=2, prompts=[*PROMPTS, "a third prompt"]
    )
    # Same file name, another prompt: not the same image.
    write_samples(db / "samples" / "epoch003", color=(0, 0, 0), epoch=3, prompts=[PROMPTS[0], "another dog"])
    comparison = compare_runs(three_runs)
    assert [k.filename for k in comparison.columns] == ["01-seed7.png"]
    assert [row.sample_epoch for row in comparison.rows] == [2, 3, 2]


def test_the_best_epoch_by_a_named_metric_and_a_best_epoch_without_samples(three_runs):
    comparison = compare_runs(three_runs, metric="kid")
    assert [row.best.epoch if row.best else None for row in comparison.rows] == [3, 2, None]
    shutil.rmtree(three_runs[0] / "samples" / "epoch003")
    comparison = compare_runs(three_runs, metric="kid")
    assert comparison.rows[0].sample_epoch == 2  # epoch 3 has no samples: the last sampled epoch


def test_runs_without_shared_samples_get_a_table_and_no_grid(three_runs, tmp_path, capsys):
    shutil.rmtree(three_runs[2] / "samples")
    for folder in (three_runs[1] / "samples").glob("epoch*"):
        for png in folder.glob("*.png"):
            png.rename(png.with_name("9" + png.name))
    out = tmp_path / "cmp"
    (out).mkdir()
    (out / "compare.png").write_bytes(b"an older comparison")
    assert main(["compare", *map(str, three_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dog-dblora: no samples" in printed and "share no sample image" in printed
    assert (out / "compare.html").is_file() and not (out / "compare.png").exists()
    assert "compare.png" not in (out / "compare.html").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{a}"], "at least two different run folders, got 1"),
        (["{a}", "{a}"], "at least two different run folders, got 1"),
        (["{a}", "{missing}"], "missing: no such run folder"),
        (["{a}", "{b}", "--metric", "sharpness"], "unknown metric 'sharpness'"),
        (["{a}", "{b}", "--tolerance", "-1"], "tolerance must be >= 0"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, args, message):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    argv = [x.format(a=a, b=b, missing=tmp_path / "missing") for x in args]
    assert main(["compare", *argv, "--out", str(tmp_path / "cmp")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_a_damaged_metrics_file_exits_2_naming_it(tmp_path, capsys):
    a, b = make_run(tmp_path, "a"), make_run(tmp_path, "b")
    (b / "metrics.jsonl").write_text('{"step": 1\n{"step": 2, "epoch": 1}\n')
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 2
    assert f"{b / 'metrics.jsonl'}: line 1 is not valid JSON" in capsys.readouterr().err


def test_compare_is_a_loratk_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "compare" in capsys.readouterr().out
