"""Reading a run folder (`load_run`), the best-epoch rule and report.html, on run folders laid out as the
trainer writes them (tests/run_folders.py), no training."""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image
from run_folders import make_run

from loratk.evaluation.best import choose_best_epoch
from loratk.evaluation.metric_names import METRICS, find_metric
from loratk.evaluation.report import write_report
from loratk.evaluation.runs import RunReadError, RunSummary, load_run

BASE = {"clip_t": 0.31, "clip_i": 0.70, "dino": 0.50, "kid": 0.050, "kid_std": 0.01, "fid": 200.0}
METRICS_BY_EPOCH = {
    0: BASE,
    1: {"clip_t": 0.305, "clip_i": 0.75, "dino": 0.60, "kid": 0.030, "kid_std": 0.01, "fid": 170.0},
    2: {"clip_t": 0.300, "clip_i": 0.80, "dino": 0.66, "kid": 0.020, "kid_std": 0.005, "fid": 150.0},
    3: {"clip_t": 0.250, "clip_i": 0.85, "dino": 0.70, "kid": 0.015, "kid_std": 0.004, "fid": 140.0},
}


def summary_of(per_epoch: dict[int, dict[str, float | None]]) -> RunSummary:
    return RunSummary(name="x", method="lora", base_model=None, run_dir=Path("."), per_epoch=per_epoch)


# --- the best-epoch rule -------------------------------------------------------------------------------


def test_auto_takes_the_most_similar_epoch_that_still_follows_prompts():
    best = choose_best_epoch(summary_of(METRICS_BY_EPOCH))
    # Epoch 3 has the highest DINO but its CLIP-T fell 0.06 below the base model's: passed over.
    assert (best.epoch, best.metric, best.value) == (2, "dino", 0.66)
    assert "within 0.02" in best.reason and "passed over" in best.reason
    wider = choose_best_epoch(summary_of(METRICS_BY_EPOCH), tolerance=0.1)
    assert wider.epoch == 3


def test_auto_uses_clip_i_without_dino():
    per_epoch = {e: {k: v for k, v in m.items() if k != "dino"} for e, m in METRICS_BY_EPOCH.items()}
    best = choose_best_epoch(summary_of(per_epoch))
    assert (best.epoch, best.metric) == (2, "clip_i") and "CLIP-I" in best.reason


def test_auto_when_no_epoch_keeps_clip_t_takes_the_most_similar_and_says_so():
    per_epoch = {0: {"clip_t": 0.40}, 1: {"clip_t": 0.30, "dino": 0.6}, 2: {"clip_t": 0.31, "dino": 0.7}}
    best = choose_best_epoch(summary_of(per_epoch))
    assert best.epoch == 2 and "no epoch kept CLIP-T" in best.reason


def test_auto_without_the_base_model_s_clip_t_says_prompt_following_was_not_checked():
    per_epoch = {1: {"clip_t": 0.1, "dino": 0.6}, 2: {"clip_t": 0.1, "dino": 0.7}}
    best = choose_best_epoch(summary_of(per_epoch))
    assert best.epoch == 2 and "not checked" in best.reason


def test_auto_without_image_metrics_takes_the_lowest_val_loss_never_the_base_model():
    per_epoch = {0: {"val/loss": 0.01}, 1: {"val/loss": 0.2}, 2: {"val/loss": 0.15}, 3: {"val/loss": 0.18}}
    best = choose_best_epoch(summary_of(per_epoch))
    assert (best.epoch, best.metric) == (2, "val/loss") and "no image metrics" in best.reason


def test_a_run_that_measured_nothing_has_no_best_epoch():
    assert choose_best_epoch(summary_of({})) is None
    assert choose_best_epoch(summary_of({0: {"dino": 0.5, "val/loss": 0.1}, 1: {"train/loss": 0.1}})) is None
    assert choose_best_epoch(summary_of({1: {"val/loss": None}})) is None  # recorded, but non-finite


def test_ties_go_to_the_earlier_epoch():
    per_epoch = {0: {"clip_t": 0.3}, 1: {"clip_t": 0.3, "dino": 0.6}, 2: {"clip_t": 0.3, "dino": 0.7}}
    per_epoch |= {3: {"clip_t": 0.3, "dino": 0.7}}
    assert choose_best_epoch(summary_of(per_epoch)).epoch == 2
    assert (
        choose_best_epoch(summary_of({1: {"kid": 0.2}, 2: {"kid": 0.1}, 3: {"kid": 0.1}}), "kid").epoch == 2
    )


def test_a_named_metric_uses_its_direction():
    summary = summary_of(METRICS_BY_EPOCH)
    kid = choose_best_epoch(summary, "kid")
    assert (kid.epoch, kid.metric, kid.value) == (3, "kid", 0.015) and "lowest KID" in kid.reason
    assert choose_best_epoch(summary, "eval/fid").epoch == 3
    assert choose_best_epoch(summary, "clip_t").epoch == 1  # higher is better; the base model's 0.31 not
    assert choose_best_epoch(summary, "psnr") is None  # known, not computed
    with pytest.raises(ValueError, match="unknown metric 'sharpness'.*dino"):
        choose_best_epoch(summary, "sharpness")
    with pytest.raises(ValueError, match="tolerance"):
        choose_best_epoch(summary, tolerance=-0.1)


def test_the_metric_table_lists_every_metric_once():
    keys = [m.key for m in METRICS]
    assert len(keys) == len(set(keys))
    assert set(keys) >= {"train/loss", "val/loss", "clip_t", "clip_i", "dino", "kid", "fid", "fd_dinov2"}
    assert {"kid_dinov2", "is", "psnr", "ssim"} <= set(keys)
    assert not find_metric("kid").higher_is_better and find_metric("eval/dino").higher_is_better


# --- load_run -----------------------------------------------------------------------------------------


def test_load_run_merges_metrics_and_eval_and_finds_the_files(tmp_path):
    run_dir = make_run(tmp_path, "subject", method="dreambooth", image_metrics=METRICS_BY_EPOCH, leak=True)
    summary = load_run(run_dir)
    assert (summary.name, summary.method, summary.base_model) == (
        "subject",
        "dreambooth",
        "builtin:tiny-sdxl",
    )
    assert summary.epochs == [0, 1, 2, 3]
    assert summary.per_epoch[0] == {"val/loss": 0.20, **BASE}  # epoch 0: the base model
    assert summary.per_epoch[2]["val/loss"] == 0.16 and summary.per_epoch[2]["dino"] == 0.66
    assert summary.per_epoch[1]["train/loss"] == pytest.approx(0.3 - 0.01 * 2.5)  # steps 1-4, mean
    assert summary.notes[3] == ["fid: 8 generated images, biased (epoch 3)"]
    assert summary.counts[1] == {"generated": 8, "real": 6, "pairs": 4}
    assert summary.train_curve[0] == (1, pytest.approx(0.29)) and len(summary.train_curve) == 12
    assert summary.val_curve == [(0, 0, 0.20), (1, 4, 0.18), (2, 8, 0.16), (3, 12, 0.17)]
    assert summary.wall_time_s == 180.0
    assert (summary.peak_memory_gib, summary.peak_memory_key) == (7.0, "mem/peak_gib")
    assert [f.size for f in summary.epoch_files[3]] == [1000] and summary.final_file.size == 1000
    assert summary.final_file.path == run_dir / "subject.safetensors"
    assert summary.samples == {
        0: run_dir / "samples/base",
        **{e: run_dir / f"samples/epoch00{e}" for e in (1, 2, 3)},
    }
    assert summary.grid == run_dir / "samples/grid.png"
    assert summary.leak_grid == run_dir / "eval/leak/grid.png"
    assert summary.read_notes == []


def test_load_run_on_a_cpu_run_reports_resident_memory_and_nulls_as_none(tmp_path):
    metrics = {1: {"clip_t": None, "dino": 0.5}}
    summary = load_run(make_run(tmp_path, memory_key="mem/peak_rss_gib", image_metrics=metrics, epochs=1))
    assert summary.peak_memory_key == "mem/peak_rss_gib"
    assert "clip_t" in summary.per_epoch[1] and summary.per_epoch[1]["clip_t"] is None


def test_a_later_eval_row_for_an_epoch_replaces_the_earlier(tmp_path):
    run_dir = make_run(tmp_path, image_metrics=METRICS_BY_EPOCH)
    with open(run_dir / "eval.jsonl", "a") as fh:
        fh.write(json.dumps({"epoch": 2, "metrics": {"dino": 0.9}, "notes": ["rerun"]}) + "\n")
    summary = load_run(run_dir)
    assert summary.per_epoch[2]["dino"] == 0.9 and summary.notes[2] == ["rerun"]
    assert "clip_i" in summary.per_epoch[2]  # metrics.jsonl's eval/ rows still hold the first evaluation


def test_a_truncated_last_line_is_skipped_with_a_note(tmp_path):
    run_dir = make_run(tmp_path, image_metrics=METRICS_BY_EPOCH)
    for name in ("metrics.jsonl", "eval.jsonl"):
        with open(run_dir / name, "a") as fh:
            fh.write('{"step": 13, "epoch": 4, "train/lo')  # a crash mid-write
    summary = load_run(run_dir)
    assert summary.epochs == [0, 1, 2, 3] and summary.per_epoch[3]["dino"] == 0.70
    assert len(summary.read_notes) == 2 and "metrics.jsonl: skipped line" in summary.read_notes[0]


def test_a_damaged_line_inside_a_file_names_the_file_and_line(tmp_path):
    run_dir = make_run(tmp_path)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunReadError, match=r"metrics\.jsonl: line 3 is not valid JSON"):
        load_run(run_dir)


def test_load_run_errors_name_the_folder_or_file(tmp_path):
    with pytest.raises(RunReadError, match="nope: no such run folder"):
        load_run(tmp_path / "nope")
    run_dir = make_run(tmp_path)
    (run_dir / "recipe.resolved.toml").write_text("name = [unclosed")
    with pytest.raises(RunReadError, match=r"recipe\.resolved\.toml: not valid TOML"):
        load_run(run_dir)


def test_an_empty_folder_reads_as_a_run_with_nothing_yet(tmp_path):
    (tmp_path / "starting").mkdir()
    summary = load_run(tmp_path / "starting")
    assert (summary.name, summary.epochs, summary.final_file, summary.grid) == ("starting", [], None, None)


# --- report.html --------------------------------------------------------------------------------------


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []  # every href and src
        self.text: list[str] = []
        self.classes: dict[str, list[str]] = {}

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("href", "src"):
                self.links.append(value)
        for key, value in attrs:
            if key == "class":
                self.classes.setdefault(value, []).append(tag)

    def handle_data(self, data):
        self.text.append(data)


def parse_page(path: Path) -> tuple[Page, str]:
    page = Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page, " ".join(page.text)


def test_the_report_shows_every_epoch_and_metric_the_best_epoch_and_the_plots(tmp_path):
    run_dir = make_run(tmp_path, "style", image_metrics=METRICS_BY_EPOCH, leak=True)
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    page, text = parse_page(path)
    for epoch in ("base model (0)", "epoch 1", "epoch 2 ★ best", "epoch 3"):
        assert epoch in text
    for label in ("train loss ↓", "val loss ↓", "CLIP-T ↑", "CLIP-I ↑", "DINO ↑", "KID ↓", "FID ↓"):
        assert label in text
    assert "PSNR" not in text  # not computed, no column
    assert "0.02 ± 0.005" in text and "fid: 8 generated images, biased (epoch 3)" in text
    assert "Epoch 2" in text and "passed over" in text  # the best epoch and why
    assert page.classes["best"] == ["tr"] and page.classes["base"] == ["tr"]
    assert "style.safetensors (1000 B)" in text and "training time" in text and "3m00s" in text
    assert 'method = "lora"' in text  # the recipe
    plots = [link for link in page.links if link.startswith("data:image/png;base64,")]
    assert len(plots) == 1 + 5  # the losses, and one per image metric with values
    for plot in plots:
        image = Image.open(io.BytesIO(base64.b64decode(plot.split(",", 1)[1])))
        assert image.format == "PNG" and image.width >= 400
    files = {unquote(link) for link in page.links if not link.startswith("data:")}
    assert {"samples/grid.png", "eval/leak/grid.png"} <= files
    assert all((run_dir / f).exists() for f in files)


def test_the_report_opens_offline_and_links_only_what_exists(tmp_path):
    run_dir = make_run(tmp_path, image_metrics=METRICS_BY_EPOCH)
    (run_dir / "samples" / "grid.png").unlink()
    shutil.rmtree(run_dir / "samples" / "epoch002")
    html = write_report(run_dir).read_text()
    page, _ = parse_page(run_dir / "report.html")
    assert "http://" not in html and "https://" not in html
    for plot in (link for link in page.links if link.startswith("data:image/png;base64,")):
        assert b"http" not in base64.b64decode(plot.split(",", 1)[1])  # not even in a PNG's text chunks
    assert not {"script", "link", "iframe"} & set(page.tags)
    files = [unquote(link) for link in page.links if not link.startswith("data:")]
    assert files and all((run_dir / f).exists() for f in files)
    assert "samples/grid.png" not in files and "samples/epoch002/" not in files


def test_the_report_escapes_what_the_run_folder_holds(tmp_path):
    run_dir = make_run(tmp_path, image_metrics={1: {"dino": 0.5}})
    row = {"epoch": 1, "metrics": {"dino": 0.5}, "notes": ["<script>alert(1)</script> & <b>"]}
    (run_dir / "eval.jsonl").write_text(json.dumps(row) + "\n")
    text = (run_dir / "recipe.resolved.toml").read_text().replace('name = "run"', 'name = "a<b>&c"')
    (run_dir / "recipe.resolved.toml").write_text(text)
    page, words = parse_page(write_report(run_dir))
    assert "script" not in page.tags and "b" not in page.tags
    assert "<script>alert(1)</script> & <b>" in words and "a<b>&c" in words


def test_a_run_with_nothing_yet_gets_a_report_that_says_so(tmp_path):
    (tmp_path / "new").mkdir()
    _, text = parse_page(write_report(tmp_path / "new"))
    assert "No best epoch" in text and "Nothing recorded yet" in text


def test_the_report_is_replaced_atomically(tmp_path, monkeypatch):
    from loratk.files import OutputWriteError

    run_dir = make_run(tmp_path, image_metrics=METRICS_BY_EPOCH)
    first = write_report(run_dir).read_bytes()
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"step": 12, "epoch": 3, "val/loss": 0.01}) + "\n")

    def full_disk(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("loratk.files.os.replace", full_disk)
    with pytest.raises(OutputWriteError, match="report.html"):
        write_report(run_dir)
    assert (run_dir / "report.html").read_bytes() == first
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".report.html")]
    monkeypatch.undo()
    assert write_report(run_dir).read_bytes() != first


def _browser() -> str | None:
    return next(
        (b for b in ("chromium", "chromium-browser", "google-chrome", "firefox") if shutil.which(b)), None
    )


def test_a_browser_renders_the_report(tmp_path):
    """A headless browser's screenshot of the page is not blank (skipped where no browser is installed)."""
    browser = _browser()
    if browser is None:
        pytest.skip("no chromium or firefox installed")
    path = write_report(make_run(tmp_path, image_metrics=METRICS_BY_EPOCH, leak=True))
    shot = tmp_path / "shot.png"
    if browser == "firefox":
        command = [browser, "--headless", "--screenshot", str(shot), "--window-size=1280,2000"]
    else:
        command = [browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}"]
        command += ["--window-size=1280,2000", f"--user-data-dir={tmp_path / 'profile'}"]
    subprocess.run([*command, path.as_uri()], capture_output=True, timeout=120, check=True, cwd=tmp_path)
    with Image.open(shot) as image:
        pixels = image.convert("L").resize((128, 200))
        dark = sum(1 for v in pixels.getdata() if v < 200) / (128 * 200)
        colors = len(image.convert("RGB").getcolors(1 << 20) or [])
    assert dark > 0.02 and colors > 50  # text, tables and plots, not a white page


def test_a_note_made_for_several_epochs_is_listed_once_with_them(tmp_path):
    run_dir = make_run(tmp_path, image_metrics={1: {"dino": 0.5}, 2: {"dino": 0.6}})
    rows = [{"epoch": e, "metrics": {"dino": 0.5}, "notes": ["fid: too few images"]} for e in (1, 2)]
    (run_dir / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, words = parse_page(write_report(run_dir))
    assert words.count("fid: too few images") == 1 and "epochs 1, 2:" in words
