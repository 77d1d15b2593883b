"""Loss masks in the Ray Data cache build: one small build of an image dataset that links masks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raytuner.batches.reader import LatentCache, open_training_data
from raytuner.cache.build import BuildOptions, run_cache
from raytuner.cache.format import MANIFEST_NAME, CacheError, read_manifest, tensor_from_fields
from raytuner.storage import Location
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files

pytestmark = pytest.mark.usefixtures("ray_cluster")

# A square image stays whole (64x64 bucket, no crop): its mask maps onto the 8x8 latent grid exactly.
SIZES = ((64, 64), (64, 64), (96, 64))


def _masks(folder: Path) -> dict[str, np.ndarray]:
    """Per image: all white, all black, left half white (grey values in between weigh in between)."""
    folder.mkdir(parents=True, exist_ok=True)
    half = np.zeros((64, 64), np.uint8)
    half[:, :32] = 255
    masks = {
        "image_000.png": np.full((64, 64), 255, np.uint8),
        "image_001.png": half,
        "image_002.png": np.full((64, 96), 128, np.uint8),
    }
    for name, pixels in masks.items():
        Image.fromarray(pixels).save(folder / name)
    return masks


@pytest.fixture(scope="module")
def masked_cache(tmp_path_factory: pytest.TempPathFactory, tiny_cosmos_dir: Path) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("cache-masks")
    draw_images(root / "images", SIZES)
    _masks(root / "masks")
    mask_dataset = {
        "id": "masks",
        "type": "local",
        "dataset_type": "conditioning",
        "conditioning_type": "mask",
        "instance_data_dir": str(root / "masks"),
    }
    datasets = [
        image_dataset(root / "images", root / "cache" / "vae", conditioning_data="masks"),
        mask_dataset,
        text_dataset(root / "cache" / "text"),
    ]
    files = write_run_files(root, tiny_cosmos_dir, datasets)
    run = files.load()
    summary = run_cache(run, BuildOptions())
    return {"root": root, "run": run, "summary": summary}


def test_each_latent_row_carries_its_mask_on_the_latent_grid(masked_cache: dict[str, Any]) -> None:
    cache = masked_cache["root"] / "cache" / "vae"
    (dataset,) = masked_cache["summary"].datasets  # the mask dataset has no latent cache of its own
    assert (dataset.dataset_id, dataset.images, dataset.encoded) == ("shapes", 3, 3)
    rows = {
        row["source"]: row
        for shard in cache.rglob("part-*.parquet")
        for row in pq.read_table(shard).to_pylist()
    }
    assert sorted(rows) == ["image_000.png", "image_001.png", "image_002.png"]
    for row in rows.values():
        latent, mask = tensor_from_fields(row, "latent"), tensor_from_fields(row, "loss_mask")
        assert mask.dtype == np.float32 and mask.shape == latent.shape[-2:] == (
            row["height"] // 8,
            row["width"] // 8,
        )
    np.testing.assert_array_equal(tensor_from_fields(rows["image_000.png"], "loss_mask"), np.ones((8, 8)))
    half = tensor_from_fields(rows["image_001.png"], "loss_mask")
    np.testing.assert_array_equal(half[:, :4], np.ones((8, 4)))
    np.testing.assert_array_equal(half[:, 4:], np.zeros((8, 4)))
    np.testing.assert_allclose(tensor_from_fields(rows["image_002.png"], "loss_mask"), 128 / 255, atol=1e-6)
    manifest = read_manifest(Location(uri=str(cache)))
    assert manifest is not None and manifest.extra["mask_dataset"] == "masks"
    assert (cache / MANIFEST_NAME).is_file() and not (masked_cache["root"] / "output" / "cache").exists()


def test_training_reads_the_masks_beside_the_latents(masked_cache: dict[str, Any]) -> None:
    data = open_training_data(masked_cache["run"])
    cache = data.latents["shapes"]
    keys = [sample.key for sample in cache.samples if sample.bucket == "64x64"]
    masks, latents = cache.loss_masks(keys), cache.latents(keys)
    assert masks is not None and masks.shape == (2, *latents.shape[-2:])
    assert sorted(float(m.mean()) for m in masks) == [0.5, 1.0]
    # A run that no longer links the masks reads the same cache unmasked; one that links other masks is refused.
    folder = Location(uri=str(masked_cache["root"] / "cache" / "vae"))
    assert LatentCache("shapes", folder).loss_masks(keys) is None
    with pytest.raises(
        CacheError, match=r"links mask dataset 'other' .* holds masks from 'masks'; run `raytuner cache`"
    ):
        LatentCache("shapes", folder, mask_dataset="other")
