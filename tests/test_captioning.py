"""`loratk caption` on a tiny random BLIP saved with save_pretrained and loaded back with from_pretrained."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from loratk import cli
from loratk.captioning import (
    DEFAULT_MODEL,
    CaptioningError,
    CaptioningInterrupted,
    caption_images,
)
from loratk.data.captions import read_manifest as read_caption_manifest


def read_manifest(path: Path) -> list[dict]:
    """The manifest's lines as written, in order (the one manifest reader; file names relative to any root)."""
    return read_caption_manifest(path, path.parent).rows


EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "quickstart"


@pytest.fixture(scope="module")
def blip_dir(tmp_path_factory) -> Path:
    from loratk.models.tiny import save_tiny_blip

    return save_tiny_blip(tmp_path_factory.mktemp("tiny-blip") / "model")


@pytest.fixture
def folder(tmp_path) -> Path:
    """Six uncaptioned images: the quickstart ones without their captions."""
    target = tmp_path / "photos"
    target.mkdir()
    for image in sorted(EXAMPLES.glob("*.png")):
        shutil.copy(image, target)
    return target


def _noise_image(path: Path, seed: int, size=(48, 40)) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def _caption(folder: Path, blip_dir: Path, tmp_path: Path, **kwargs):
    kwargs.setdefault("manifest_dir", tmp_path / "captions")
    return caption_images(folder, model=str(blip_dir), progress=False, **kwargs)


def _sidecars(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(folder.rglob("*.txt"))}


def _no_temp_files(*folders: Path) -> bool:
    return not [p for f in folders if f.exists() for p in f.rglob("*.tmp")]


def test_every_image_gets_a_sidecar_caption_with_prefix_and_suffix(folder, blip_dir, tmp_path):
    report = _caption(folder, blip_dir, tmp_path, prefix="ukiyoe style, ", suffix=", woodblock")
    assert len(report.captioned) == 6 and not report.skipped and not report.failed
    captions = _sidecars(folder)
    assert sorted(captions) == sorted(p.with_suffix(".txt").name for p in folder.glob("*.png"))
    for text in captions.values():
        assert text.startswith("ukiyoe style, ") and text.endswith(", woodblock\n")
        assert len(text.split()) >= 4 and text.count("\n") == 1
    assert len(set(captions.values())) > 1, "captions should depend on the image"
    assert report.manifest is None and not (tmp_path / "captions").exists()
    assert _no_temp_files(folder)


def test_rerun_captions_only_new_images_and_keeps_a_hand_edited_caption(folder, blip_dir, tmp_path):
    _caption(folder, blip_dir, tmp_path)
    (folder / "boat.txt").write_text("a fishing boat, hand edited\n", encoding="utf-8")
    before = _sidecars(folder)
    _noise_image(folder / "new-1.png", 1)
    _noise_image(folder / "new-2.jpg", 2)

    report = _caption(folder, blip_dir, tmp_path)
    assert sorted(c.path.name for c in report.captioned) == ["new-1.png", "new-2.jpg"]
    assert len(report.skipped) == 6 and "already has boat.txt" in {s.reason for s in report.skipped}
    after = _sidecars(folder)
    assert {k: after[k] for k in before} == before
    assert after["boat.txt"] == "a fishing boat, hand edited\n"


def test_overwrite_replaces_captions(folder, blip_dir, tmp_path):
    first = {c.path.name: c.text for c in _caption(folder, blip_dir, tmp_path).captioned}
    (folder / "boat.txt").write_text("hand edited\n", encoding="utf-8")
    report = _caption(folder, blip_dir, tmp_path, overwrite=True, prefix="new, ")
    assert len(report.captioned) == 6 and not report.skipped
    assert (folder / "boat.txt").read_text() == f"new, {first['boat.png']}\n"


def test_a_blank_caption_file_counts_as_missing(folder, blip_dir, tmp_path):
    (folder / "pine.txt").write_text(" \n", encoding="utf-8")
    report = _caption(folder, blip_dir, tmp_path)
    assert len(report.captioned) == 6
    assert (folder / "pine.txt").read_text().strip()


def test_unreadable_images_are_reported_and_the_others_captioned(folder, blip_dir, tmp_path):
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("not an image")
    (folder / "truncated.png").write_bytes((folder / "boat.png").read_bytes()[:300])
    report = _caption(folder, blip_dir, tmp_path, batch_size=2)
    assert len(report.captioned) == 6
    reasons = {f.path.name: f.reason for f in report.failed}
    assert set(reasons) == {"empty.jpg", "notes.png", "truncated.png"}
    assert "0 bytes" in reasons["empty.jpg"] and "truncated" in reasons["truncated.png"]
    assert not (folder / "empty.txt").exists() and not (folder / "truncated.txt").exists()


def test_images_sharing_a_caption_file_fail_instead_of_overwriting_each_other(folder, blip_dir, tmp_path):
    _noise_image(folder / "boat.jpg", 3)
    report = _caption(folder, blip_dir, tmp_path)
    assert sorted(f.path.name for f in report.failed) == ["boat.jpg", "boat.png"]
    assert "shares its caption file boat.txt" in report.failed[0].reason
    assert not (folder / "boat.txt").exists() and len(report.captioned) == 5


def test_exif_orientation_is_applied_as_in_training(tmp_path, blip_dir):
    folder = tmp_path / "exif"
    folder.mkdir()
    upright = Image.open(EXAMPLES / "boat.png").convert("RGB")
    upright.save(folder / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90 degrees clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "rotated.png", exif=exif)
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "sideways.png")
    captions = {c.path.name: c.text for c in _caption(folder, blip_dir, tmp_path).captioned}
    assert captions["rotated.png"] == captions["upright.png"] != captions["sideways.png"]


def test_manifest_is_valid_jsonl_with_relative_paths_recursively(folder, blip_dir, tmp_path):
    (folder / "sub" / "deeper").mkdir(parents=True)
    _noise_image(folder / "sub" / "a.png", 4)
    _noise_image(folder / "sub" / "deeper" / "b.webp", 5)
    (folder / ".hidden").mkdir()
    _noise_image(folder / ".hidden" / "c.png", 6)

    report = _caption(folder, blip_dir, tmp_path, output="manifest", recursive=True, prefix="ukiyoe, ")
    manifest = tmp_path / "captions" / "photos.jsonl"
    assert report.manifest == manifest and len(report.captioned) == 8
    lines = manifest.read_text(encoding="utf-8").splitlines()
    entries = [json.loads(line) for line in lines]
    assert all(set(e) == {"file_name", "text"} and e["text"].startswith("ukiyoe, ") for e in entries)
    names = [e["file_name"] for e in entries]
    assert "sub/a.png" in names and "sub/deeper/b.webp" in names and "boat.png" in names
    assert not any(n.startswith((".", "/")) or ".hidden" in n for n in names)
    assert all((folder / n).is_file() for n in names)
    assert not list(folder.rglob("*.txt")), "manifest mode writes no sidecars"
    assert _no_temp_files(folder, tmp_path / "captions")


def test_without_recursive_subfolders_are_ignored(folder, blip_dir, tmp_path):
    (folder / "sub").mkdir()
    _noise_image(folder / "sub" / "a.png", 4)
    report = _caption(folder, blip_dir, tmp_path)
    assert len(report.captioned) == 6 and not (folder / "sub" / "a.txt").exists()


def test_manifest_rerun_keeps_hand_edits_and_extra_keys(folder, blip_dir, tmp_path):
    manifest = tmp_path / "captions" / "photos.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(
        json.dumps({"file_name": "pine.png", "text": "edited by hand", "source": "me"}) + "\n",
        encoding="utf-8",
    )
    report = _caption(folder, blip_dir, tmp_path, output="manifest")
    assert len(report.captioned) == 5 and [s.path.name for s in report.skipped] == ["pine.png"]
    entries = read_manifest(manifest)
    assert entries[0] == {"file_name": "pine.png", "text": "edited by hand", "source": "me"}
    assert len(entries) == 6

    _caption(folder, blip_dir, tmp_path, output="manifest", overwrite=True)
    entries = read_manifest(manifest)
    assert len(entries) == 6 and entries[0]["source"] == "me" and entries[0]["text"] != "edited by hand"


def test_a_malformed_manifest_is_reported_and_left_untouched(folder, blip_dir, tmp_path, capsys):
    manifest = tmp_path / "captions" / "photos.jsonl"
    manifest.parent.mkdir()
    content = '{"file_name": "boat.png", "text": "ok"}\n{"file_name": "../x.png", "text": "t"}\nnot json\n'
    manifest.write_text(content, encoding="utf-8")
    with pytest.raises(CaptioningError) as info:
        _caption(folder, blip_dir, tmp_path, output="manifest")
    assert "photos.jsonl:2:" in str(info.value) and "photos.jsonl:3: not valid JSON" in str(info.value)
    assert manifest.read_text(encoding="utf-8") == content

    argv = ["caption", str(folder), "--model", str(blip_dir), "--output", "manifest"]
    assert cli.main([*argv, "--manifest-dir", str(manifest.parent)]) == 2
    assert "photos.jsonl:3" in capsys.readouterr().err


def test_both_copies_an_existing_caption_to_the_missing_side(folder, blip_dir, tmp_path):
    (folder / "boat.txt").write_text("my boat\n", encoding="utf-8")
    manifest = tmp_path / "captions" / "photos.jsonl"
    manifest.parent.mkdir()
    manifest.write_text(json.dumps({"file_name": "pine.png", "text": "my pine"}) + "\n", encoding="utf-8")
    report = _caption(folder, blip_dir, tmp_path, output="both")
    assert len(report.captioned) == 4 and not report.skipped  # the two copies were written, not skipped
    assert sorted(c.path.name for c in report.copied) == ["boat.png", "pine.png"]
    texts = {e["file_name"]: e["text"] for e in read_manifest(manifest)}
    assert len(texts) == 6 and texts["boat.png"] == "my boat" and texts["pine.png"] == "my pine"
    assert (folder / "pine.txt").read_text() == "my pine\n"
    assert (folder / "boat.txt").read_text() == "my boat\n"
    sidecars = _sidecars(folder)
    assert all(sidecars[Path(n).with_suffix(".txt").name] == t + "\n" for n, t in texts.items())


@pytest.mark.parametrize("top_p", [None, 0.9], ids=["beam-search", "nucleus-sampling"])
def test_batched_and_batch_1_runs_give_the_same_captions(tmp_path, blip_dir, top_p):
    folder = tmp_path / "many"
    folder.mkdir()
    for image in EXAMPLES.glob("*.png"):
        shutil.copy(image, folder)
    for i in range(5):  # 11 images: the last batch of 4 is partial
        _noise_image(folder / f"noise-{i}.png", 10 + i, size=(30 + 7 * i, 50))

    def run(batch_size: int) -> dict[str, str]:
        report = _caption(folder, blip_dir, tmp_path, batch_size=batch_size, top_p=top_p, overwrite=True)
        return {c.path.name: c.text for c in report.captioned}

    one, four, sixteen = run(1), run(4), run(16)
    assert len(one) == 11 and one == four == sixteen
    # Captions of different lengths in one batch: padding of finished sequences must not change any of them.
    assert len({len(t.split()) for t in one.values()}) > 1


def test_sampling_is_seeded_per_image(folder, blip_dir, tmp_path):
    def run(seed: int, **kwargs) -> dict[str, str]:
        report = _caption(folder, blip_dir, tmp_path, top_p=0.9, seed=seed, overwrite=True, **kwargs)
        return {c.path.name: c.text for c in report.captioned}

    first = run(0)
    assert run(0, batch_size=3) == first
    assert run(1) != first
    beams = {c.path.name: c.text for c in _caption(folder, blip_dir, tmp_path, overwrite=True).captioned}
    assert beams != first
    # A resumed run (only some images left) gives each image the caption the full run gave it.
    for name in ("boat.txt", "pine.txt", "red-sun.txt"):
        (folder / name).unlink()
    resumed = {c.path.name: c.text for c in _caption(folder, blip_dir, tmp_path, top_p=0.9).captioned}
    assert resumed == {k: first[k] for k in ("boat.png", "pine.png", "red-sun.png")}


def _interrupt_second_batch(monkeypatch):
    from transformers import BlipForConditionalGeneration

    real_generate = BlipForConditionalGeneration.generate
    calls = []

    def generate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", generate)


def test_an_interrupted_run_keeps_finished_captions_and_no_half_files(
    folder, blip_dir, tmp_path, monkeypatch
):
    reference = {
        c.path.name: c.text
        for c in _caption(folder, blip_dir, tmp_path, output="both", manifest_dir=tmp_path / "ref").captioned
    }
    for caption in folder.glob("*.txt"):
        caption.unlink()

    _interrupt_second_batch(monkeypatch)
    with pytest.raises(CaptioningInterrupted) as info:
        _caption(folder, blip_dir, tmp_path, output="both", batch_size=2)
    assert [c.path.name for c in info.value.report.captioned] == ["boat.png", "green-hill.png"]
    assert sorted(p.name for p in folder.glob("*.txt")) == ["boat.txt", "green-hill.txt"]
    manifest = tmp_path / "captions" / "photos.jsonl"
    assert [e["file_name"] for e in read_manifest(manifest)] == ["boat.png", "green-hill.png"]
    assert _no_temp_files(folder, manifest.parent)

    monkeypatch.undo()
    report = _caption(folder, blip_dir, tmp_path, output="both", batch_size=2)
    assert len(report.captioned) == 4 and len(report.skipped) == 2
    assert {e["file_name"]: e["text"] for e in read_manifest(manifest)} == reference


def test_captions_typed_while_a_run_goes_on_are_kept(folder, blip_dir, tmp_path, monkeypatch):
    from transformers import BlipForConditionalGeneration

    manifest = tmp_path / "captions" / "photos.jsonl"
    real_generate = BlipForConditionalGeneration.generate

    def generate(self, *args, **kwargs):
        if not manifest.exists():  # during the first batch, someone edits captions of the last batch
            (folder / "red-sun.txt").write_text("typed by hand\n", encoding="utf-8")
            manifest.parent.mkdir(exist_ok=True)
            manifest.write_text(
                json.dumps({"file_name": "pine.png", "text": "typed"}) + "\n", encoding="utf-8"
            )
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(BlipForConditionalGeneration, "generate", generate)
    sidecar = _caption(folder, blip_dir, tmp_path, batch_size=2)
    assert (folder / "red-sun.txt").read_text() == "typed by hand\n"
    assert [s.path.name for s in sidecar.skipped] == ["red-sun.png"] and len(sidecar.captioned) == 5

    manifest.unlink()
    report = _caption(folder, blip_dir, tmp_path, batch_size=2, output="manifest")
    assert [s.path.name for s in report.skipped] == ["pine.png"] and len(report.captioned) == 5
    texts = {e["file_name"]: e["text"] for e in read_manifest(manifest)}
    assert texts["pine.png"] == "typed" and len(texts) == 6


def test_cli_exit_codes_and_summary(folder, blip_dir, tmp_path, capsys, monkeypatch):
    argv = ["caption", str(folder), "--model", str(blip_dir), "--manifest-dir", str(tmp_path / "c")]
    assert cli.main([*argv, "--prefix", "ukiyoe, ", "--batch-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "captioned 6" in out and "skipped 0" in out and "failed 0" in out
    assert (folder / "boat.txt").read_text().startswith("ukiyoe, ")

    # `both` with every caption in the sidecars only: six manifest entries written, and said so.
    assert cli.main([*argv, "--output", "both"]) == 0
    out = capsys.readouterr().out
    assert "captioned 0" in out and "copied 6" in out and "skipped 0" in out

    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert cli.main(argv) == 1
    captured = capsys.readouterr()
    assert "captioned 0" in captured.out and "skipped 6" in captured.out and "failed 1" in captured.out
    assert f"failed: {folder / 'broken.png'}" in captured.err

    (folder / "broken.png").unlink()
    for caption in folder.glob("*.txt"):
        caption.unlink()
    _interrupt_second_batch(monkeypatch)
    assert cli.main([*argv, "--batch-size", "2"]) == 130
    captured = capsys.readouterr()
    assert "captioned 2" in captured.out and "rerun the same command" in captured.err

    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["caption", str(empty), "--model", str(blip_dir)]) == 2
    assert "no images" in capsys.readouterr().err
    assert cli.main(["caption", str(folder), "--model", str(tmp_path / "no-model")]) == 2
    assert cli.main(["caption", str(folder), "--model", str(blip_dir), "--top-p", "1.5"]) == 2
    assert "top_p must be in (0, 1]" in capsys.readouterr().err
    assert cli.main(["caption", str(folder), "--model", str(blip_dir), "--device", "gpu9"]) == 2
    assert "device 'gpu9'" in capsys.readouterr().err


def test_cli_missing_folder_is_a_clear_error_without_traceback(tmp_path):
    missing = tmp_path / "no-such-folder"
    result = subprocess.run(
        [sys.executable, "-m", "loratk.cli", "caption", str(missing)], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert f"error: {missing}: image folder not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_default_model_is_the_api_default():
    args = cli.build_parser().parse_args(["caption", "x"])
    assert args.model == DEFAULT_MODEL == "Salesforce/blip-image-captioning-large"
    assert (args.beams, args.min_length, args.max_length, args.output) == (3, 5, 75, "sidecar")


def test_builtin_tiny_blip_works_offline(folder, tmp_path):
    report = caption_images(folder, model="builtin:tiny-blip", progress=False, manifest_dir=tmp_path)
    assert len(report.captioned) == 6
