"""Byte-identical files: each is a sample of its own, as in SimpleTuner, where a copy weights a file.

The copies share one latent row (the content key is file bytes, crop, resolution and VAE) but are
planned, captioned and noised as separate samples, and the cache report notes them instead of
skipping them. Discovery, placement and the commits run here without Ray or encoders
(``tests/cache/helpers.py``); ``test_cache_build.py`` shows the same through a real build.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import torch

from raytuner.batches.plan import BatchShape, DatasetSampling, plan_epoch, sample_generators
from raytuner.batches.reader import LatentCache
from raytuner.cache.format import REPORT_NAME, commit, read_index, read_manifest
from raytuner.cache.keys import caption_key
from raytuner.cache.rows import latent_todo
from raytuner.cache.settings import latent_cache_location
from raytuner.cache.summary import CacheSummary
from raytuner.config import RunConfig
from raytuner.storage import Location
from tests.cache.helpers import (
    commit_without_encoding,
    discover_without_ray,
    draw_images,
    image_dataset,
    text_dataset,
    write_run_files,
)

COPY = "image_000_copy.png"
COPY_CAPTION = "the same picture, captioned on its own"


def _run_with_a_copy(root: Path) -> RunConfig:
    """Two drawings and a byte copy of the first with a caption of its own; no model is ever loaded."""
    images = root / "images"
    draw_images(images, [(64, 64), (64, 64)])
    (images / COPY).write_bytes((images / "image_000.png").read_bytes())
    (images / COPY).with_suffix(".txt").write_text(COPY_CAPTION + "\n", encoding="utf-8")
    datasets = [image_dataset(images, root / "cache" / "vae"), text_dataset(root / "cache" / "text")]
    return write_run_files(root, root / "model-never-loaded", datasets).load()


def _folder(run: RunConfig) -> Location:
    return latent_cache_location(run, run.enabled_datasets[0])


def _index_by_source(run: RunConfig) -> dict[str, dict]:
    folder = _folder(run)
    manifest = read_manifest(folder)
    assert manifest is not None
    return {row["source"]: row for row in read_index(folder, manifest).to_pylist()}


def test_identical_files_are_each_a_sample_with_their_own_caption(tmp_path: Path) -> None:
    run = _run_with_a_copy(tmp_path)
    (item,) = discover_without_ray(run)
    assert len(item.rows) == 3 and not item.skipped
    assert len(latent_todo([item])) == 2, "the copy's latent row is encoded once, with the original"
    commit_without_encoding(run, [item])

    index = _index_by_source(run)
    original, copy = index["image_000.png"], index[COPY]
    assert original["key"] == copy["key"] and original["sample"] != copy["sample"]
    cache = LatentCache("shapes", _folder(run))
    shape = BatchShape(per_worker=1)
    plan = plan_epoch(cache.samples, [DatasetSampling(dataset_id="shapes")], shape, seed=run.seed, epoch=0)
    assert len(plan) == 3, "the copy counts in the steps of an epoch"
    planned = {batch.keys[0] for batch in plan.batches}
    assert planned == {original["sample"], copy["sample"], index["image_001.png"]["sample"]}
    original_caption = (tmp_path / "images" / "image_000.txt").read_text(encoding="utf-8").strip()
    assert cache.caption_key(original["sample"], seed=run.seed, step=0) == caption_key(original_caption)
    assert cache.caption_key(copy["sample"], seed=run.seed, step=0) == caption_key(COPY_CAPTION)

    # In one global batch, the two copies are noised by their own generators.
    whole = BatchShape(per_worker=3)
    (batch,) = plan_epoch(
        cache.samples, [DatasetSampling(dataset_id="shapes")], whole, seed=run.seed, epoch=0
    ).batches
    seeds = dict(zip(batch.keys, batch.seeds_for(whole, rank=0, seed=run.seed, step=0), strict=True))
    noise = [
        torch.randn(16, 8, 8, generator=generator)
        for generator in sample_generators([seeds[original["sample"]], seeds[copy["sample"]]])
    ]
    assert not torch.equal(noise[0], noise[1])


def test_the_report_notes_identical_files_instead_of_skipping_them(tmp_path: Path) -> None:
    run = _run_with_a_copy(tmp_path)
    summary = commit_without_encoding(run, discover_without_ray(run))["shapes"]
    assert (summary.images, summary.skipped, summary.shared) == (3, 0, 2)
    note = "2 files share their latents with an identical file; each trains as a sample of its own"
    report = json.loads((tmp_path / "cache" / "vae" / REPORT_NAME).read_text())
    assert report["skipped"] == [] and report["images"] == 3
    assert report["notes"] == [note]
    assert report["shared_latents"] == [["image_000.png", COPY]]
    table = CacheSummary(
        datasets=(summary,), prompts=0, prompts_encoded=0, text_cache="", seconds=0, encode_seconds=0
    ).table()
    assert f"note: dataset 'shapes': {note}" in table.splitlines()


def test_a_cache_written_before_copies_were_samples_reads_and_is_updated_without_encoding(
    tmp_path: Path,
) -> None:
    run = _run_with_a_copy(tmp_path)
    commit_without_encoding(run, discover_without_ray(run))
    # Such a cache merged the copy into its original: one index row per content key, no sample column.
    folder = _folder(run)
    manifest = read_manifest(folder)
    assert manifest is not None
    index = read_index(folder, manifest)
    old = index.filter(pc.not_equal(index["source"], COPY)).drop_columns(["sample"])
    commit(folder, manifest, old)
    before = LatentCache("shapes", folder)
    assert sorted(sample.key for sample in before.samples) == sorted(old["key"].to_pylist())

    (item,) = discover_without_ray(run)
    assert latent_todo([item]) == [], "the copy reuses the latent row already cached"
    summary = commit_without_encoding(run, [item])["shapes"]
    assert (summary.images, summary.encoded, summary.shared) == (3, 0, 2)
    after = {sample.key for sample in LatentCache("shapes", folder).samples}
    # The files already cached keep their sample keys, so their plan does not move; the copy joins.
    assert {sample.key for sample in before.samples} < after and len(after) == 3
