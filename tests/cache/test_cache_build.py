"""The Ray Data cache build on a real 2-node Ray cluster, with the tiny Cosmos2 checkpoint.

One dataset of many sizes and aspect ratios (plus broken files) is built once per module and
then changed step by step: new images, a changed image, a killed build, another VAE.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from raytuner.batches.plan import BatchShape, DatasetSampling, plan_epoch
from raytuner.batches.reader import LatentCache, TextCache
from raytuner.cache.build import BuildOptions, run_cache
from raytuner.cache.format import MANIFEST_NAME, REPORT_NAME, CacheError, commit, read_index, read_manifest
from raytuner.cache.keys import caption_key
from raytuner.cache.summary import CacheSummary
from raytuner.cli import main
from raytuner.data.buckets import BucketSettings, place
from raytuner.data.discovery import open_image
from raytuner.data.problematic import DELETED
from raytuner.models.cosmos2image import Cosmos2Image
from raytuner.models.tiny import build_tiny_checkpoint
from raytuner.storage import Location
from tests.cache.helpers import (
    SIZES,
    RunFiles,
    add_broken_files,
    draw_images,
    image_dataset,
    text_dataset,
    write_run_files,
)

pytestmark = pytest.mark.usefixtures("ray_cluster")


def _build(files: RunFiles, **options: Any) -> CacheSummary:
    return run_cache(files.load(), BuildOptions(**options))


def _committed_keys(cache: Path) -> set[str]:
    location = Location(uri=str(cache))
    manifest = read_manifest(location)
    assert manifest is not None
    return set(read_index(location, manifest).column("key").to_pylist())


def _shard_files(cache: Path) -> set[Path]:
    return set(cache.rglob("part-*.parquet"))


@pytest.fixture(scope="module")
def built(
    tmp_path_factory: pytest.TempPathFactory, tiny_cosmos_dir: Path, ray_cluster: Any
) -> dict[str, Any]:
    """A dataset of 12 sizes + 3 broken files, cached once for the tests that only read it."""
    root = tmp_path_factory.mktemp("cache-build")
    images = root / "images"
    draw_images(images, SIZES[:6])
    draw_images(images, SIZES[6:], start=6, subfolder="nested/deeper")
    broken = add_broken_files(images)
    files = _write(root, tiny_cosmos_dir, images)
    summary = _build(files)
    return {"root": root, "images": images, "files": files, "summary": summary, "broken": broken}


def _write(root: Path, model: Path, images: Path, **config: Any) -> RunFiles:
    datasets = [
        image_dataset(images, root / "cache" / "vae", write_batch_size=4),
        text_dataset(root / "cache" / "text"),
    ]
    return write_run_files(root, model, datasets, **config)


def test_the_cache_builds_on_a_two_node_cluster(built: dict[str, Any], ray_cluster: Any) -> None:
    assert ray_cluster.nodes == 2
    summary: CacheSummary = built["summary"]
    (dataset,) = summary.datasets
    assert (dataset.images, dataset.encoded, dataset.skipped) == (12, 12, 3)
    assert dataset.bytes_written > 0
    # The buckets are the ones the bucket rules give: 96x64 at 64 px area, alignment 16, is 80x48.
    settings = BucketSettings(resolution=64, resolution_type="pixel_area", alignment=16)
    expected = {place(settings, w, h).label for w, h in SIZES}  # type: ignore[union-attr]
    assert {bucket.bucket for bucket in dataset.buckets} == expected
    assert "80x48" in expected and sum(bucket.images for bucket in dataset.buckets) == 12
    table = summary.table()
    assert "shapes" in table and "80x48" in table and "images/s" in table


def test_broken_files_are_skipped_and_listed_in_the_report(built: dict[str, Any]) -> None:
    report = json.loads((built["root"] / "cache" / "vae" / REPORT_NAME).read_text())
    reasons = {entry["file"]: entry["reason"] for entry in report["skipped"]}
    assert set(reasons) == set(built["broken"])
    for name, word in built["broken"].items():
        assert word in reasons[name], reasons[name]
    assert report["images"] == 12


def test_shards_are_plain_parquet_one_bucket_each(built: dict[str, Any]) -> None:
    cache = built["root"] / "cache" / "vae"
    shards = _shard_files(cache)
    assert shards
    for shard in shards:
        table = pq.read_table(shard)
        assert table.num_rows <= 4  # the dataset's write_batch_size
        buckets = set(table.column("bucket").to_pylist())
        assert len(buckets) == 1 and shard.parent.name == f"bucket={buckets.pop()}"
        row = table.slice(0, 1).to_pylist()[0]
        latent = np.frombuffer(row["latent"], dtype=row["latent_dtype"]).reshape(row["latent_shape"])
        # Wan VAE: 16 channels, one frame, 8 pixels per latent.
        assert latent.shape == (16, 1, row["height"] // 8, row["width"] // 8)
    manifest = json.loads((cache / MANIFEST_NAME).read_text())
    assert manifest["kind"] == "latents" and manifest["encoder"]["component"] == "VAE"
    assert manifest["rows"] == 12


def _decode(family: Cosmos2Image, latents: torch.Tensor) -> torch.Tensor:
    vae = family.load_vae()
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        return vae.decode(latents * std + mean).sample.clamp(-1, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)  # pixel range [-1, 1]: peak-to-peak 2


def test_cached_latents_decode_like_the_vae_round_trip_of_their_crops(
    built: dict[str, Any], tiny_cosmos_dir: Path
) -> None:
    """Decoded cache rows match the tiny VAE's own round trip of the crop, computed here with PIL.

    The crop is rebuilt independently from the row's recorded intermediary size and offset; the
    bound is PSNR >= 40 dB (random-weight VAE, so the round trip itself is not the image).
    """
    family = Cosmos2Image(tiny_cosmos_dir)
    cache = LatentCache("shapes", Location(uri=str(built["root"] / "cache" / "vae")))
    settings = BucketSettings(resolution=64, resolution_type="pixel_area", alignment=16)
    checked = 0
    for sample in cache.samples:
        row = cache.row(sample.key)
        image = open_image((built["images"] / row["source"]).read_bytes())
        placement = place(settings, *image.size, crop_seed=0)
        assert placement is not None and placement.bucket == (row["width"], row["height"])
        intermediary = placement.intermediary
        crop = image.resize(intermediary, Image.Resampling.LANCZOS).crop(
            (
                row["crop_left"],
                row["crop_top"],
                row["crop_left"] + row["width"],
                row["crop_top"] + row["height"],
            )
        )
        pixels = torch.from_numpy(np.asarray(crop, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
        reference = _decode(family, family.encode_images(pixels))
        cached = _decode(family, cache.latents([sample.key]))
        assert _psnr(cached, reference) >= 40.0
        checked += 1
    assert checked == 12


def test_captions_and_role_prompts_are_in_the_text_cache_unpadded(
    built: dict[str, Any], tiny_cosmos_dir: Path
) -> None:
    family = Cosmos2Image(tiny_cosmos_dir)
    text = TextCache(Location(uri=str(built["root"] / "cache" / "text")))
    latents = LatentCache("shapes", Location(uri=str(built["root"] / "cache" / "vae")))
    sample = latents.samples[0]
    caption = (built["images"] / latents.row(sample.key)["source"]).with_suffix(".txt").read_text().strip()
    key = latents.caption_key(sample.key, seed=11, step=0)
    assert key == caption_key(caption)
    prompts = [caption, "", "blurry, cropped, ugly", "a red circle on a blue background"]
    keys = [key, text.role_key("empty"), text.role_key("negative"), text.validation_keys()["validation"]]
    for prompt, cached in zip(prompts, text.conditioning(keys), strict=True):
        (direct,) = family.encode_prompts([prompt])
        # Stored without padding: as long as the prompt's tokens, and equal to the encoder's output.
        assert cached["prompt_embeds"].shape == direct["prompt_embeds"].shape
        torch.testing.assert_close(cached["prompt_embeds"], direct["prompt_embeds"])


def test_the_plan_reads_back_one_bucket_per_batch(built: dict[str, Any]) -> None:
    cache = LatentCache("shapes", Location(uri=str(built["root"] / "cache" / "vae")))
    shape = BatchShape(per_worker=1, workers=2)
    plan = plan_epoch(
        cache.samples, [DatasetSampling(dataset_id="shapes")], shape, seed=11, epoch=0, prune_buckets=False
    )
    for batch in plan.batches[:4]:
        slices = [cache.latents(batch.slice_for(shape, rank=rank)) for rank in range(2)]
        assert slices[0].shape == slices[1].shape and slices[0].shape[0] == 1


def _copy_run(built: dict[str, Any], tmp_path: Path, model: Path) -> tuple[RunFiles, Path]:
    images = tmp_path / "images"
    shutil.copytree(built["images"], images)
    shutil.copytree(built["root"] / "cache", tmp_path / "cache")
    return _write(tmp_path, model, images), images


def test_a_rerun_encodes_only_new_and_changed_images(
    built: dict[str, Any], tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    files, images = _copy_run(built, tmp_path, tiny_cosmos_dir)
    before = _committed_keys(tmp_path / "cache" / "vae")
    unchanged = _build(files)
    assert unchanged.encoded == 0 and _committed_keys(tmp_path / "cache" / "vae") == before

    # Drawings repeat every 21 indexes; these sizes and indexes match no image already there.
    draw_images(images, [(64, 64)] * 5 + [(72, 72)] * 5, start=100)
    added = _build(files)
    assert added.encoded == 10 and added.datasets[0].images == 22
    with_new = _committed_keys(tmp_path / "cache" / "vae")
    assert before < with_new and len(with_new) == 22

    Image.open(images / "image_101.png").rotate(90).save(images / "image_101.png")
    # With delete_problematic_images in config.json, this build also deletes the undecodable files.
    assert all((images / name).exists() for name in built["broken"])
    changed = _build(_write(tmp_path, tiny_cosmos_dir, images, delete_problematic_images=True))
    assert changed.encoded == 1 and changed.datasets[0].images == 22
    after = _committed_keys(tmp_path / "cache" / "vae")
    assert len(after - with_new) == 1 and len(with_new - after) == 1
    assert not any((images / name).exists() for name in built["broken"])
    report = json.loads((tmp_path / "cache" / "vae" / REPORT_NAME).read_text())
    assert {entry["file"] for entry in report["skipped"] if entry["reason"].endswith(DELETED)} == set(
        built["broken"]
    )


def _as_written_before_copies_were_samples(cache: Path) -> None:
    """Rewrite a cache's index as raytuner wrote it when identical files were merged: no sample column."""
    location = Location(uri=str(cache))
    manifest = read_manifest(location)
    assert manifest is not None
    commit(location, manifest, read_index(location, manifest).drop_columns(["sample"]))


def test_identical_files_share_a_latent_row_and_train_as_samples_of_their_own(
    built: dict[str, Any], tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    files, images = _copy_run(built, tmp_path, tiny_cosmos_dir)
    vae_cache = tmp_path / "cache" / "vae"
    _as_written_before_copies_were_samples(vae_cache)
    # A copy of a cached image, and a new image with a copy in another folder, each captioned on its own.
    shutil.copyfile(images / "image_000.png", images / "copy_of_000.png")
    (images / "copy_of_000.txt").write_text("the first image again\n")
    (new,) = draw_images(images, [(64, 80)], start=400)
    shutil.copyfile(new, images / "nested" / "again_400.png")
    (images / "nested" / "again_400.txt").write_text("the new image again\n")

    summary = _build(files)
    (dataset,) = summary.datasets
    # The old cache is kept: only the new image is encoded, once for its two files.
    assert (dataset.images, dataset.encoded, dataset.skipped, dataset.shared) == (15, 1, 3, 4)
    assert "note: dataset 'shapes': 4 files share their latents with an identical file" in summary.table()
    location = Location(uri=str(vae_cache))
    manifest = read_manifest(location)
    assert manifest is not None
    samples = {row["source"]: row["sample"] for row in read_index(location, manifest).to_pylist()}
    cache = LatentCache("shapes", location)
    assert sorted(sample.key for sample in cache.samples) == sorted(samples.values())
    for original, copy, caption in (
        ("image_000.png", "copy_of_000.png", "the first image again"),
        ("image_400.png", "nested/again_400.png", "the new image again"),
    ):
        assert torch.equal(cache.latents([samples[original]]), cache.latents([samples[copy]]))
        assert cache.caption_key(samples[copy], seed=11, step=0) == caption_key(caption)
        assert cache.caption_key(samples[original], seed=11, step=0) != caption_key(caption)


def test_a_killed_build_leaves_the_old_cache_and_the_next_run_finishes_it(
    built: dict[str, Any],
    tmp_path: Path,
    tiny_cosmos_dir: Path,
    ray_cluster: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files, images = _copy_run(built, tmp_path, tiny_cosmos_dir)
    vae_cache = tmp_path / "cache" / "vae"
    before, shards_before = _committed_keys(vae_cache), _shard_files(vae_cache)
    draw_images(images, [(64, 80)] * 12, start=60)
    # One row per shard and per VAE call, so a build stopped midway has written some shards, not all.
    datasets = json.loads((tmp_path / "multidatabackend.json").read_text())
    datasets[0]["write_batch_size"] = 1
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    config = json.loads(files.config.read_text())
    config["vae_batch_size"] = 1
    files.config.write_text(json.dumps(config))

    env = {**os.environ, "RAY_ADDRESS": ray_cluster.address}
    process = subprocess.Popen(
        [sys.executable, "-m", "raytuner.cli", "cache", "--config", str(files.config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (_shard_files(vae_cache) - shards_before) and time.monotonic() < deadline:
            assert process.poll() is None, "the build ended before it wrote a shard"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    orphans = _shard_files(vae_cache) - shards_before
    assert orphans, "no shard was written before the kill"
    # Nothing half-written is visible: the committed index is the old one, and every shard is whole.
    assert _committed_keys(vae_cache) == before
    for shard in orphans:
        pq.read_metadata(shard)

    # The next run is the same command in this process, on the session's Ray: only the killed
    # build needs a process of its own (one a kill can stop), and a second one would only add its
    # start-up and its connection to the cluster.
    capsys.readouterr()
    code = main(["cache", "--config", str(files.config)])
    finished = capsys.readouterr()
    assert code == 0, finished.err[-3000:]
    assert "images/s" in finished.out and "text-embeds" in finished.out
    manifest = read_manifest(Location(uri=str(vae_cache)))
    assert manifest is not None and manifest.rows == 24
    assert _committed_keys(vae_cache) > before
    adopted = sum(pq.read_metadata(shard).num_rows for shard in orphans)
    # Rows of the killed build's whole shards are adopted, not encoded again; the rest is encoded
    # one image per VAE call (vae_batch_size 1).
    table_row = next(line for line in finished.out.splitlines() if line.startswith("shapes "))
    assert table_row.split()[:4] == ["shapes", "all", "24", str(12 - adopted)]


def test_vae_batch_size_images_go_through_each_vae_call(
    built: dict[str, Any], tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    files, images = _copy_run(built, tmp_path, tiny_cosmos_dir)
    draw_images(images, [(64, 80)] * 6, start=200)
    config = json.loads(files.config.read_text())
    config["vae_batch_size"] = 3
    files.config.write_text(json.dumps(config))
    summary = _build(files)
    assert summary.encoded == 6 and summary.datasets[0].vae_batches == 2


def test_skip_file_discovery_uses_the_cache_as_it_is(
    built: dict[str, Any], tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    files, images = _copy_run(built, tmp_path, tiny_cosmos_dir)
    draw_images(images, [(64, 80)] * 3, start=300)
    datasets = json.loads((tmp_path / "multidatabackend.json").read_text())
    datasets[0]["skip_file_discovery"] = "vae aspect"
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    skipped = _build(files)
    assert skipped.encoded == 0 and skipped.datasets[0].images == 12
    shutil.rmtree(tmp_path / "cache" / "vae")
    with pytest.raises(CacheError, match=r"skip_file_discovery skips encoding, but .* holds no cache yet"):
        _build(files)


def test_a_cache_from_another_vae_is_refused_then_rebuilt_on_request(
    built: dict[str, Any], tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    other_model = build_tiny_checkpoint("cosmos2image", tmp_path / "other-model", seed=1)
    files, _ = _copy_run(built, tmp_path, other_model)
    with pytest.raises(CacheError) as refused:
        _build(files)
    message = str(refused.value)
    assert "cache written by cosmos2image VAE of" in message and "--rebuild" in message
    assert _committed_keys(tmp_path / "cache" / "vae") == _committed_keys(built["root"] / "cache" / "vae")
    rebuilt = _build(files, rebuild=True)
    assert rebuilt.encoded == 12
    assert not _committed_keys(tmp_path / "cache" / "vae") & _committed_keys(built["root"] / "cache" / "vae")


def test_a_dataset_too_small_for_one_global_batch_is_named_after_the_build(
    tmp_path: Path, tiny_cosmos_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    draw_images(tmp_path / "images", [(64, 64)])
    datasets = [
        image_dataset(tmp_path / "images", tmp_path / "cache" / "vae"),
        text_dataset(tmp_path / "cache" / "text"),
    ]
    files = write_run_files(tmp_path, tiny_cosmos_dir, datasets, train_batch_size=2)
    assert main(["cache", "--config", str(files.config)]) == 2
    captured = capsys.readouterr()
    assert "images/s" in captured.out  # the build itself finished and is kept
    (error,) = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert error.startswith("error: no images detected in dataset 'shapes': 1 sample(s) per epoch")
    assert 'raise "repeats"' in error
    assert _committed_keys(tmp_path / "cache" / "vae")

    datasets[0]["repeats"] = 1
    (tmp_path / "multidatabackend.json").write_text(json.dumps(datasets))
    assert main(["cache", "--config", str(files.config)]) == 0
    assert "1 global batch(es) per epoch" in capsys.readouterr().out
