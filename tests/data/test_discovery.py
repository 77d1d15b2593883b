"""Listing a dataset's files and probing each one, on local folders (no Ray)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pytest
from PIL import Image

from raytuner.config.datasets import DatasetConfig
from raytuner.data.captions import caption_file_for, caption_from_filename
from raytuner.data.discovery import ListedFile, Listing, Probe, list_dataset, merge_probes, probe_file
from raytuner.data.synthetic import synthetic_images, write_dataset


def _dataset(
    folder: Path, caption_strategy: str = "filename", instance_prompt: str | None = None
) -> DatasetConfig:
    return DatasetConfig(
        id="images",
        type="local",
        instance_data_dir=folder,
        caption_strategy=caption_strategy,
        instance_prompt=instance_prompt,
    )


def _png(path: Path, size: tuple[int, int] = (24, 16)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (200, 30, 30)).save(path, format="PNG")
    return path


def _noisy_jpeg(size: tuple[int, int] = (96, 64)) -> bytes:
    image = Image.frombytes("RGB", size, bytes(range(256)) * (size[0] * size[1] * 3 // 256 + 1))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _listed(listing: Listing, relative: str) -> ListedFile:
    return next(listed for listed in listing.files if listed.relative == relative)


def _probe(listing: Listing, relative: str) -> Probe:
    return probe_file(
        _listed(listing, relative), listing.location, caption_strategy=listing.dataset.caption_strategy
    )


def test_listing_is_recursive_and_takes_image_extensions_in_any_case(tmp_path: Path) -> None:
    for name in ("a.jpg", "sub/b.JPEG", "sub/deeper/c.Png", "d.webp", "e.WEBP"):
        _png(tmp_path / name)
    for name in ("notes.gif", "image.bmp", "readme.txt", "photo.jpg.bak"):
        (tmp_path / name).write_bytes(b"not listed")
    _png(tmp_path / ".ipynb_checkpoints" / "a-checkpoint.png")
    _png(tmp_path / "sub" / ".ipynb_checkpoints" / "b-checkpoint.png")
    _png(tmp_path / ".hidden.png")
    listing = list_dataset(_dataset(tmp_path))
    assert [listed.relative for listed in listing.files] == [
        "a.jpg",
        "d.webp",
        "e.WEBP",
        "sub/b.JPEG",
        "sub/deeper/c.Png",
    ]
    assert listing.skipped == []
    first = listing.files[0]
    assert first.dataset_id == "images"
    assert first.size == (tmp_path / "a.jpg").stat().st_size
    assert first.caption_path is None


def test_zero_byte_files_are_skipped_with_a_reason(tmp_path: Path) -> None:
    _png(tmp_path / "good.png")
    (tmp_path / "empty.png").write_bytes(b"")
    listing = list_dataset(_dataset(tmp_path))
    assert [listed.relative for listed in listing.files] == ["good.png"]
    assert [(skipped.relative, skipped.reason) for skipped in listing.skipped] == [
        ("empty.png", "zero-byte file")
    ]


def test_textfile_captions_need_a_caption_file_beside_each_image(tmp_path: Path) -> None:
    write_dataset(tmp_path, synthetic_images(2, width=16, height=16))
    _png(tmp_path / "sub" / "uncaptioned.png")
    listing = list_dataset(_dataset(tmp_path, "textfile"))
    assert [listed.relative for listed in listing.files] == ["0000.png", "0001.png"]
    assert listing.files[0].caption_path == caption_file_for(listing.files[0].path)
    assert listing.files[0].caption_path.endswith("0000.txt")
    assert len(listing.skipped) == 1
    skipped = listing.skipped[0]
    assert skipped.relative == "sub/uncaptioned.png"
    assert "uncaptioned.txt" in skipped.reason


def test_a_changed_caption_file_changes_the_fingerprint(tmp_path: Path) -> None:
    write_dataset(tmp_path, synthetic_images(1, width=16, height=16))
    before = list_dataset(_dataset(tmp_path, "textfile")).files[0].fingerprint
    (tmp_path / "0000.txt").write_text("a different, longer caption\n", encoding="utf-8")
    assert list_dataset(_dataset(tmp_path, "textfile")).files[0].fingerprint != before


def test_probing_a_png_hashes_its_bytes_and_reads_its_size(tmp_path: Path) -> None:
    path = _png(tmp_path / "red.png", (24, 16))
    listing = list_dataset(_dataset(tmp_path))
    probe = _probe(listing, "red.png")
    assert probe.error == ""
    assert probe.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (probe.width, probe.height) == (24, 16)
    assert probe.fingerprint == listing.files[0].fingerprint
    assert probe.captions == ()  # filename captions are applied when probes are merged


def test_probing_reports_the_size_after_exif_rotation(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[274] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.new("RGB", (40, 20), (10, 120, 200)).save(tmp_path / "rotated.jpg", format="JPEG", exif=exif)
    probe = _probe(list_dataset(_dataset(tmp_path)), "rotated.jpg")
    assert probe.error == ""
    assert (probe.width, probe.height) == (20, 40)


def test_a_truncated_jpeg_is_reported_as_corrupt_or_truncated(tmp_path: Path) -> None:
    data = _noisy_jpeg()
    (tmp_path / "whole.jpg").write_bytes(data)
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    listing = list_dataset(_dataset(tmp_path))
    assert _probe(listing, "whole.jpg").error == ""
    probe = _probe(listing, "cut.jpg")
    assert "corrupt or truncated" in probe.error
    assert probe.sha256 == ""


def test_a_text_file_named_like_an_image_is_not_an_image(tmp_path: Path) -> None:
    (tmp_path / "x.png").write_text("hello, I am text\n", encoding="utf-8")
    probe = _probe(list_dataset(_dataset(tmp_path)), "x.png")
    assert probe.error.startswith("not an image")


def test_a_file_removed_after_listing_is_reported_not_fatal(tmp_path: Path) -> None:
    _png(tmp_path / "keep.png")
    gone = _png(tmp_path / "gone.png")
    listing = list_dataset(_dataset(tmp_path))
    gone.unlink()
    assert _probe(listing, "gone.png").error == "file disappeared while the cache was built"
    assert _probe(listing, "keep.png").error == ""


def test_each_non_empty_line_of_a_caption_file_is_a_caption(tmp_path: Path) -> None:
    _png(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text("  a red cat  \n\n\ta cat on a mat\n   \n", encoding="utf-8")
    probe = _probe(list_dataset(_dataset(tmp_path, "textfile")), "cat.png")
    assert probe.error == ""
    assert probe.captions == ("a red cat", "a cat on a mat")


@pytest.mark.parametrize("text", ["", "\n  \n\t\n"])
def test_an_empty_caption_file_is_an_error(tmp_path: Path, text: str) -> None:
    _png(tmp_path / "cat.png")
    (tmp_path / "cat.txt").write_text(text, encoding="utf-8")
    probe = _probe(list_dataset(_dataset(tmp_path, "textfile")), "cat.png")
    assert probe.error == "caption file cat.txt is empty"
    assert probe.captions == ()


def test_caption_from_filename_reads_underscores_as_spaces() -> None:
    assert caption_from_filename("a_red_cat.png") == "a red cat"
    assert caption_from_filename("/data/sub/a_red_cat.jpeg") == "a red cat"
    assert caption_from_filename("_padded_.png") == "padded"


def _merge(listing: Listing) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    probes = {
        listed.fingerprint: probe_file(
            listed, listing.location, caption_strategy=listing.dataset.caption_strategy
        )
        for listed in listing.files
    }
    images, skipped = merge_probes(listing, probes)
    return {image.relative: image.captions for image in images}, {s.relative: s.reason for s in skipped}


def test_merging_with_instanceprompt_gives_every_image_the_prompt(tmp_path: Path) -> None:
    _png(tmp_path / "a_red_cat.png")
    _png(tmp_path / "sub" / "b.png")
    (tmp_path / "broken.png").write_text("text", encoding="utf-8")
    listing = list_dataset(_dataset(tmp_path, "instanceprompt", instance_prompt="  a photo of sks  "))
    captions, skipped = _merge(listing)
    assert captions == {"a_red_cat.png": ("a photo of sks",), "sub/b.png": ("a photo of sks",)}
    assert set(skipped) == {"broken.png"}
    assert skipped["broken.png"].startswith("not an image")


def test_merging_with_filename_captions_reads_the_file_names(tmp_path: Path) -> None:
    path = _png(tmp_path / "sub" / "a_blue_dog.png", (30, 20))
    (tmp_path / "empty.webp").write_bytes(b"")
    listing = list_dataset(_dataset(tmp_path, "filename"))
    probes = {
        listed.fingerprint: probe_file(listed, listing.location, caption_strategy="filename")
        for listed in listing.files
    }
    images, skipped = merge_probes(listing, probes)
    assert [(image.relative, image.captions) for image in images] == [("sub/a_blue_dog.png", ("a blue dog",))]
    image = images[0]
    assert image.dataset_id == "images"
    assert (image.width, image.height) == (30, 20)
    assert image.size == path.stat().st_size
    assert image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert [(s.relative, s.reason) for s in skipped] == [("empty.webp", "zero-byte file")]


def test_merging_with_textfile_captions_keeps_the_probed_captions(tmp_path: Path) -> None:
    items = synthetic_images(2, width=16, height=16)
    write_dataset(tmp_path, items)
    _png(tmp_path / "uncaptioned.png")
    _png(tmp_path / "blank.png")
    (tmp_path / "blank.txt").write_text("\n", encoding="utf-8")
    captions, skipped = _merge(list_dataset(_dataset(tmp_path, "textfile")))
    assert captions == {"0000.png": (items[0].caption,), "0001.png": (items[1].caption,)}
    assert skipped["blank.png"] == "caption file blank.txt is empty"
    assert "uncaptioned.txt" in skipped["uncaptioned.png"]
