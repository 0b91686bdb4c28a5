"""Captions: sidecars, manifests with line numbers, metadata.jsonl via datasets, path escapes, precedence."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from PIL import Image

from loratk.data.captions import (
    CaptionError,
    Subset,
    read_manifest,
    read_metadata_jsonl,
    read_sidecar_caption,
    resolve_captions,
)
from loratk.data.tags import apply_trigger_word, shuffle_tags, tag_shuffle_variant


def _image(folder: Path, name: str) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path)
    return path


@pytest.mark.parametrize(
    "content, kind, reason",
    [
        (None, "caption_missing", "caption file is missing"),
        (b"", "caption_empty", "caption is empty"),
        (b"  \n\t \r\n", "caption_empty", "caption is empty"),
    ],
)
def test_missing_empty_or_whitespace_sidecar_is_reported(tmp_path, content, kind, reason):
    image = _image(tmp_path, "a.png")
    if content is not None:
        (tmp_path / "a.txt").write_bytes(content)
    with pytest.raises(CaptionError) as info:
        read_sidecar_caption(image)
    err = info.value
    assert err.kind == kind and reason in str(err) and str(tmp_path / "a.txt") in str(err)
    assert err.fix  # says what to do


def test_non_utf8_sidecar_is_reported_with_the_byte_offset(tmp_path):
    image = _image(tmp_path, "a.png")
    (tmp_path / "a.txt").write_bytes(b"caf" + b"\xe9 au lait")  # latin-1 'é'
    with pytest.raises(CaptionError) as info:
        read_sidecar_caption(image)
    assert info.value.kind == "caption_not_utf8"
    assert "byte offset 3" in str(info.value) and "0xe9" in str(info.value) and "UTF-8" in info.value.fix


MANIFEST_LINES = [
    b'{"file_name": "a.png", "text": "a red sun"}',  # 1 ok
    b"",  # 2 blank: skipped
    b'{"file_name": "b.png", "text": ',  # 3 malformed JSON
    b'["b.png", "text"]',  # 4 not an object
    b'{"file_name": "b.png"}',  # 5 lacks text
    b'{"text": "no name"}',  # 6 lacks file_name
    b'{"file_name": "b.png", "text": 7}',  # 7 text not a string
    b'{"file_name": "b.png", "text": "caf\xe9"}',  # 8 not UTF-8
    b'{"file_name": "a.png", "text": "again"}',  # 9 duplicate
    b'{"file_name": "c.png", "text": "   "}',  # 10 ok line, empty caption (reported per image)
]


def test_manifest_problems_are_reported_with_line_numbers(tmp_path):
    folder = tmp_path / "imgs"
    for name in ("a.png", "b.png", "c.png"):
        _image(folder, name)
    path = tmp_path / "captions" / "set.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"\n".join(MANIFEST_LINES) + b"\n")
    manifest = read_manifest(path, folder)
    by_line = {p.line: str(p) for p in manifest.problems}
    assert sorted(by_line) == [3, 4, 5, 6, 7, 8, 9]
    assert "not valid JSON" in by_line[3] and "expected a JSON object" in by_line[4]
    assert "lacks the field(s) text" in by_line[5] and "lacks the field(s) file_name" in by_line[6]
    assert "must be strings" in by_line[7] and "not UTF-8" in by_line[8] and "byte offset" in by_line[8]
    assert "already has a caption on line 1" in by_line[9]
    assert all(line.startswith(f"{path}:") for line in by_line.values())
    assert manifest.entries[folder / "a.png"].text == "a red sun"
    results, _ = resolve_captions(
        Subset(folder, "manifest", path), [folder / "a.png", folder / "c.png"], manifest, None
    )
    assert results[folder / "a.png"].text == "a red sun"
    empty = results[folder / "c.png"].error
    assert empty is not None and empty.kind == "caption_empty" and empty.line == 10


@pytest.mark.parametrize(
    "file_name, reason",
    [
        ("../outside.png", "climbs out of the folder"),
        ("sub/../../outside.png", "climbs out of the folder"),
        ("/etc/passwd", "absolute path"),
        ("link.png", "symlink"),
        ("linkdir/x.png", "symlink"),
    ],
)
def test_manifest_file_names_that_escape_the_folder_are_rejected(tmp_path, file_name, reason):
    folder = tmp_path / "imgs"
    folder.mkdir()
    outside = _image(tmp_path, "outside.png")
    (tmp_path / "elsewhere").mkdir()
    _image(tmp_path / "elsewhere", "x.png")
    os.symlink(outside, folder / "link.png")
    os.symlink(tmp_path / "elsewhere", folder / "linkdir")
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"file_name": file_name, "text": "x"}) + "\n")
    manifest = read_manifest(path, folder)
    assert not manifest.entries
    assert len(manifest.problems) == 1 and manifest.problems[0].line == 1
    assert reason in str(manifest.problems[0]) and "rejected" in str(manifest.problems[0])


def test_symlinks_and_subfolders_inside_the_folder_are_fine(tmp_path):
    folder = tmp_path / "imgs"
    real = _image(folder, "sub/real.png")
    os.symlink(real, folder / "alias.png")
    path = tmp_path / "m.jsonl"
    path.write_text(
        json.dumps({"file_name": "sub/real.png", "text": "a"})
        + "\n"
        + json.dumps({"file_name": "alias.png", "text": "b"})
    )
    manifest = read_manifest(path, folder)
    assert not manifest.problems and len(manifest.entries) == 2


def test_manifest_entries_for_missing_files_are_warned_about(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps({"file_name": "gone.png", "text": "a"}) + "\n")
    manifest = read_manifest(path, folder)
    assert not manifest.problems and "gone.png, which does not exist" in manifest.warnings[0]


def test_metadata_jsonl_is_read_with_datasets_imagefolder(tmp_path):
    folder = tmp_path / "imgs"
    for name in ("a.png", "b.png"):
        _image(folder, name)
    (folder / "metadata.jsonl").write_text(
        json.dumps({"file_name": "a.png", "text": "first  caption"})
        + "\n"
        + json.dumps({"file_name": "b.png", "text": "second", "extra": 1})
        + "\n"
    )
    metadata = read_metadata_jsonl(folder)
    assert metadata is not None and not metadata.problems
    assert {p.name: e.text for p, e in metadata.entries.items()} == {
        "a.png": "first caption",
        "b.png": "second",
    }
    assert read_metadata_jsonl(tmp_path) is None  # no metadata.jsonl


def test_bad_metadata_jsonl_lines_are_reported_before_datasets_sees_them(tmp_path):
    folder = tmp_path / "imgs"
    _image(folder, "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n{"file_name": "../x.png"\n')
    metadata = read_metadata_jsonl(folder)
    assert metadata is not None and [p.line for p in metadata.problems] == [2]


def _precedence_folder(tmp_path: Path) -> tuple[Subset, list[Path], object, object]:
    """a: manifest + metadata + sidecar; b: metadata + sidecar; c: sidecar only; d: nothing."""
    folder = tmp_path / "imgs"
    images = [_image(folder, f"{n}.png") for n in "abcd"]
    for n in "abc":
        (folder / f"{n}.txt").write_text(f"sidecar {n}")
    (folder / "metadata.jsonl").write_text(
        "\n".join(json.dumps({"file_name": f"{n}.png", "text": f"metadata {n}"}) for n in "ab") + "\n"
    )
    manifest_path = tmp_path / "captions" / "imgs.jsonl"
    manifest_path.parent.mkdir()
    manifest_path.write_text(json.dumps({"file_name": "a.png", "text": "manifest a"}) + "\n")
    subset = Subset(folder, "auto", manifest_path)
    manifest, metadata = read_manifest(manifest_path, folder), read_metadata_jsonl(folder)
    assert not manifest.problems and metadata is not None and not metadata.problems
    return subset, images, manifest, metadata


@pytest.mark.parametrize(
    "source, expected",
    [
        ("auto", ["manifest a", "metadata b", "sidecar c", None]),
        ("manifest", ["manifest a", None, None, None]),
        ("metadata", ["metadata a", "metadata b", None, None]),
        ("sidecar", ["sidecar a", "sidecar b", "sidecar c", None]),
    ],
)
def test_caption_source_precedence(tmp_path, source, expected):
    subset, images, manifest, metadata = _precedence_folder(tmp_path)
    subset = Subset(subset.dir, source, subset.manifest)
    results, notes = resolve_captions(subset, images, manifest, metadata)
    assert [results[p].text for p in images] == expected
    missing = results[images[3]].error
    assert missing is not None and missing.kind == "caption_missing" and "loratk caption" in missing.fix
    if source == "auto":
        assert [results[p].source for p in images[:3]] == ["manifest", "metadata", "sidecar"]
        assert "2 sidecar .txt caption(s) are not used" in notes[0]


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a red sun", "ukiyoe, a red sun"),
        ("ukiyoe, a red sun", "ukiyoe, a red sun"),
        ("ukiyoe a red sun", "ukiyoe a red sun"),
        ("red sun, ukiyoe, waves", "ukiyoe, red sun, waves"),  # a tag moves to the front, once
        ("an ukiyoe print of a sun", "an ukiyoe print of a sun"),  # already there in prose
        ("ukiyoes of the sun", "ukiyoe, ukiyoes of the sun"),  # a longer word is not the trigger
    ],
)
def test_trigger_word_goes_once_at_the_front(caption, expected):
    assert apply_trigger_word(caption, "ukiyoe") == expected
    assert apply_trigger_word(caption, None) == caption


def test_tag_shuffle_keeps_the_first_tags_and_the_trigger():
    caption = "sks, portrait, red hair, smile, outdoors, blue sky"
    for seed in range(20):
        out = shuffle_tags(caption, 1, random.Random(seed), trigger="sks").split(", ")
        assert out[:2] == ["sks", "portrait"] and sorted(out[2:]) == sorted(caption.split(", ")[2:])
    variants = {tag_shuffle_variant(caption, 1, k, "sks") for k in range(8)}
    assert len(variants) > 1
    assert tag_shuffle_variant(caption, 1, 3, "sks") == tag_shuffle_variant(caption, 1, 3, "sks")
