"""Masks through discovery, buckets and crops: each mask gets exactly its image's bucket and crop box."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raytuner.cache import stages
from raytuner.cache.format import CacheError
from raytuner.cache.keys import content_key
from raytuner.cache.placing import pair_masks, place_images
from raytuner.cache.rows import DatasetWork, latent_todo, latent_todo_row
from raytuner.config.datasets import DatasetConfig
from raytuner.data import discovery
from raytuner.data.buckets import BucketSettings
from raytuner.storage import Location

# Random crops of a 96x64 image into a 48x48 square bucket: the crop box is off the origin.
SETTINGS = BucketSettings(
    resolution=48, resolution_type="pixel", crop=True, crop_aspect="square", crop_style="random", alignment=16
)


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
    """A greyscale image with structure at every scale, so a misplaced crop cannot match."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(height // 8, width // 8), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.NEAREST))


def _datasets(root: Path) -> tuple[DatasetConfig, DatasetConfig]:
    images = DatasetConfig(
        id="images",
        type="local",
        instance_data_dir=root / "images",
        caption_strategy="filename",
        conditioning_data="masks",
    )
    masks = DatasetConfig(
        id="masks",
        type="local",
        dataset_type="conditioning",
        conditioning_type="mask",
        instance_data_dir=root / "masks",
        caption_strategy="textfile",
    )
    return images, masks


def _write(
    root: Path, relative: str, pattern: np.ndarray, *, mask_size: tuple[int, int] | None = None
) -> None:
    """An image whose red channel is ``pattern``, and its mask (the same pattern, maybe resized)."""
    image_path, mask_path = root / "images" / relative, root / "masks" / relative
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    rgb = np.stack([pattern, 255 - pattern, np.full_like(pattern, 90)], axis=-1)
    Image.fromarray(rgb).save(image_path)
    mask = Image.fromarray(pattern)  # greyscale "L", as mask tools write them
    if mask_size is not None:
        mask = mask.resize(mask_size, Image.Resampling.LANCZOS)
    mask.save(mask_path)


def _discover(root: Path) -> DatasetWork:
    """Discovery without Ray: list and probe both datasets, pair the masks, place the images."""
    images, masks = _datasets(root)
    item = DatasetWork(dataset=images, settings=SETTINGS, cache=Location(uri=str(root / "cache")), mask=masks)
    item.listing = discovery.list_dataset(images)
    # Masks carry no caption files, even when the mask dataset says caption_strategy textfile.
    item.mask_listing = discovery.list_dataset(masks, captions=False)
    probes = {
        listed.fingerprint: discovery.probe_file(listed, location, caption_strategy="filename")
        for listing, location in (
            (item.listing, discovery.dataset_location(images)),
            (item.mask_listing, discovery.dataset_location(masks)),
        )
        for listed in listing.files
    }
    item.images, item.skipped = discovery.merge_probes(item.listing, probes)
    item.masks = pair_masks(item, probes)
    place_images(item, seed=5, vae_key="vae")
    return item


def _cropped(item: DatasetWork) -> dict[str, dict]:
    sources = {
        "images": discovery.dataset_location(item.dataset),
        "masks": discovery.dataset_location(item.mask),  # type: ignore[arg-type]
    }
    out = {}
    for row in item.rows.values():
        cropped = stages.load_and_crop(dict(latent_todo_row(item, row)), sources)
        assert cropped["error"] == ""
        out[row.source] = cropped
    return out


def test_a_mask_is_cropped_with_its_images_bucket_and_crop_box(tmp_path: Path) -> None:
    _write(tmp_path, "a.png", _pattern(96, 64, seed=1))
    _write(tmp_path, "nested/b.png", _pattern(64, 112, seed=2))
    item = _discover(tmp_path)
    assert sorted(item.masks) == ["a.png", "nested/b.png"]
    rows = _cropped(item)
    assert {row["left"] + row["top"] for row in rows.values()} != {0}, "the crops should be off the origin"
    for row in rows.values():
        assert row["pixels"].shape[:2] == row["mask"].shape == (row["height"], row["width"]) == (48, 48)
        # The same bytes through the same resize and crop box: the image's red channel, exactly.
        np.testing.assert_array_equal(row["mask"], row["pixels"][:, :, 0])


def test_a_mask_of_another_size_is_resized_to_its_image_first(tmp_path: Path) -> None:
    pattern = _pattern(96, 64, seed=3)
    _write(tmp_path, "a.png", pattern, mask_size=(48, 32))
    (row,) = _cropped(_discover(tmp_path)).values()
    assert row["mask"].shape == (48, 48)
    difference = np.abs(row["mask"].astype(int) - row["pixels"][:, :, 0].astype(int))
    assert difference.mean() < 12  # the same scene, blurred by the halving, not shifted


def test_an_image_without_a_usable_mask_stops_the_build(tmp_path: Path) -> None:
    for index in range(5):
        _write(tmp_path, f"img_{index}.png", _pattern(64, 64, seed=index))
    (tmp_path / "masks" / "img_1.png").unlink()
    (tmp_path / "masks" / "img_2.png").write_bytes(b"not a png")
    (tmp_path / "masks" / "extra.png").write_bytes((tmp_path / "masks" / "img_0.png").read_bytes())
    with pytest.raises(CacheError) as caught:
        _discover(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("dataset 'images': 2 image(s) without a usable mask in mask dataset 'masks'")
    assert "img_1.png (no mask file)" in message and "img_2.png (mask: not an image" in message
    assert "every image needs a mask with the same relative path" in message


def test_the_row_key_follows_the_mask_bytes(tmp_path: Path) -> None:
    _write(tmp_path, "a.png", _pattern(64, 64, seed=4))
    first = _discover(tmp_path)
    (row,) = first.rows.values()
    image = first.images[0]
    assert row.file is not None
    assert row.key != content_key(image, row.file.placement, "vae"), "a masked row has its own key"
    Image.fromarray(255 - _pattern(64, 64, seed=4)).save(tmp_path / "masks" / "a.png")
    (changed,) = _discover(tmp_path).rows.values()
    assert changed.file is not None
    assert changed.key != row.key and changed.file.placement == row.file.placement


def test_identical_images_pair_with_their_own_masks(tmp_path: Path) -> None:
    """Copies of an image are samples of their own: each keeps its own mask, and shares its
    latent row only with a copy whose mask is identical too."""
    pattern = _pattern(96, 64, seed=6)
    for name in ("a.png", "b.png", "c.png"):
        _write(tmp_path, name, pattern)
    Image.fromarray(255 - pattern).save(tmp_path / "masks" / "c.png")
    item = _discover(tmp_path)
    rows = {row.source: row for row in item.rows.values()}
    assert len({row.sample for row in rows.values()}) == 3
    assert rows["a.png"].key == rows["b.png"].key != rows["c.png"].key
    assert {row.source: row.file.mask_path for row in rows.values() if row.file is not None} == {
        name: str(tmp_path / "masks" / name) for name in ("a.png", "b.png", "c.png")
    }
    todo = latent_todo([item])
    assert sorted(entry["source"] for entry in todo) == ["a.png", "c.png"]
    cropped = _cropped(item)
    # c's mask is a's inverted, through the same resize and crop box (rounding aside).
    inverted = cropped["c.png"]["mask"].astype(int) + cropped["a.png"]["mask"].astype(int)
    assert np.abs(inverted - 255).max() <= 1


def test_masks_are_area_averaged_onto_the_latent_grid() -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[:, :8] = 255
    mask[:8, 8:] = 128
    grid = stages.mask_on_latent_grid(mask, (2, 2))
    assert grid.dtype == np.float32
    np.testing.assert_allclose(grid, [[1.0, 128 / 255], [1.0, 0.0]], rtol=1e-6)
    # A half-covered latent pixel weighs a half: the mean of the pixels it covers.
    edge = np.zeros((16, 16), np.uint8)
    edge[:, :4] = 255
    np.testing.assert_allclose(stages.mask_on_latent_grid(edge, (2, 2)), [[0.5, 0.0], [0.5, 0.0]])
