"""A type huggingface dataset (saved with datasets, no Hub) through the Ray Data cache build."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from raytuner.batches.reader import LatentCache, TextCache
from raytuner.cache.build import BuildOptions, run_cache
from raytuner.cache.format import REPORT_NAME
from raytuner.cache.keys import caption_key
from raytuner.storage import Location
from tests.cache.helpers import text_dataset, write_run_files
from tests.hub_datasets import save_hub_dataset

pytestmark = pytest.mark.usefixtures("ray_cluster")

CAPTIONS = ["a red circle", "a blue square", ""]


def test_a_huggingface_dataset_is_cached_like_a_folder(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    folder = save_hub_dataset(tmp_path / "hub", 3, caption=CAPTIONS)
    hub: dict[str, Any] = {
        "id": "hub",
        "type": "huggingface",
        "dataset_name": str(folder),
        "metadata_backend": "huggingface",
        "caption_strategy": "huggingface",
        "huggingface": {"caption_column": "caption"},
        "resolution": 64,
        "resolution_type": "pixel_area",
        "cache_dir_vae": str(tmp_path / "cache" / "vae"),
    }
    files = write_run_files(tmp_path, tiny_cosmos_dir, [hub, text_dataset(tmp_path / "cache" / "text")])
    summary = run_cache(files.load(), BuildOptions())
    (dataset,) = summary.datasets
    assert (dataset.images, dataset.encoded, dataset.skipped) == (2, 2, 1)
    report = json.loads((tmp_path / "cache" / "vae" / REPORT_NAME).read_text())
    assert report["source"] == f"huggingface:{folder}[train]"
    assert [entry["file"] for entry in report["skipped"]] == ["train/2"]
    # Each row's latents come with its caption from the caption column, encoded in the text cache.
    latents = LatentCache("hub", Location(uri=str(tmp_path / "cache" / "vae")))
    keys = {latents.caption_key(sample.key, seed=11, step=0) for sample in latents.samples}
    assert keys == {caption_key(caption) for caption in CAPTIONS[:2]}
    text = TextCache(Location(uri=str(tmp_path / "cache" / "text")))
    assert len(text.conditioning(sorted(keys))) == 2
    # A second build reads nothing new: the rows are known by the split's fingerprint.
    again = run_cache(files.load(), BuildOptions())
    assert [(d.images, d.encoded) for d in again.datasets] == [(2, 0)]
