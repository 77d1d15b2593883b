"""The dataset keys that choose and reshape samples, from multidatabackend.json to the cache report:
minimum_aspect_ratio / maximum_aspect_ratio, max_num_samples, crop_aspect closest / random with
crop_aspect_buckets, caption_shuffle and delete_problematic_images.

Discovery, placement and the commits run without Ray or encoders (``tests/cache/helpers.py``);
test_cache_huggingface.py shows caption_shuffle through a real Ray Data build.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from raytuner.cache.format import REPORT_NAME, read_index, read_manifest
from raytuner.cache.keys import caption_key
from raytuner.cache.rows import DatasetWork
from raytuner.config import RunConfig
from raytuner.config.datasets import DatasetConfig
from raytuner.data import problematic
from raytuner.data.discovery import Listing, SkippedFile, dataset_location, list_dataset
from raytuner.storage import Location
from tests.cache.helpers import (
    add_broken_files,
    commit_without_encoding,
    discover_without_ray,
    draw_images,
    image_dataset,
    text_dataset,
    write_run_files,
)
from tests.hub_datasets import save_hub_dataset
from tests.s3_server import S3Server


def _run(root: Path, model: Path, datasets: list[dict[str, Any]], **config: Any) -> RunConfig:
    return write_run_files(root, model, [*datasets, text_dataset(root / "text")], **config).load()


def _by_id(work: list[DatasetWork]) -> dict[str, DatasetWork]:
    return {item.dataset.id: item for item in work}


def _report(cache: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((cache / REPORT_NAME).read_text())
    return report


def test_aspect_ratio_limits_leave_images_out_with_the_reason(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    draw_images(tmp_path / "images", [(128, 64), (64, 128), (80, 64)])
    limits = {"resolution": 64, "resolution_type": "pixel", "minimum_image_size": 0}
    run = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(
                tmp_path / "images",
                tmp_path / "limited",
                id="limited",
                minimum_aspect_ratio=0.75,
                maximum_aspect_ratio=1.5,
                **limits,
            ),
            # 0 is SimpleTuner's "no limit".
            image_dataset(
                tmp_path / "images",
                tmp_path / "open",
                id="open",
                minimum_aspect_ratio=0,
                maximum_aspect_ratio=0,
                **limits,
            ),
        ],
    )
    work = _by_id(discover_without_ray(run))
    assert sorted(row.source for row in work["limited"].rows.values()) == ["image_002.png"]
    assert len(work["open"].rows) == 3
    commit_without_encoding(run, list(work.values()))
    reasons = {entry["file"]: entry["reason"] for entry in _report(tmp_path / "limited")["skipped"]}
    assert reasons == {
        "image_000.png": "bucket 128x64 has aspect ratio 2, above maximum_aspect_ratio 1.5",
        "image_001.png": "bucket 64x128 has aspect ratio 0.5, below minimum_aspect_ratio 0.75",
    }


def test_max_num_samples_keeps_the_same_images_every_build(tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    draw_images(tmp_path / "images", [(64, 64)] * 6)
    entry = image_dataset(tmp_path / "images", tmp_path / "cache", max_num_samples=2)
    run = _run(tmp_path, tiny_cosmos_dir, [entry])
    (first,) = discover_without_ray(run)
    chosen = sorted(row.source for row in first.rows.values())
    assert len(chosen) == 2
    assert first.listing is not None and len(first.listing.files) == 2  # the others are never read
    commit_without_encoding(run, [first])
    # The next build keeps the same two, so the cache keeps its rows and encodes nothing.
    (second,) = discover_without_ray(_run(tmp_path, tiny_cosmos_dir, [entry]))
    assert set(second.rows) == set(first.rows)
    assert set(second.existing) >= {row.key for row in second.rows.values()}
    # A Hugging Face split is limited the same way, over its row names.
    folder = save_hub_dataset(tmp_path / "hub", 4)
    hub = DatasetConfig(id="hub", type="huggingface", dataset_name=str(folder), max_num_samples=3)
    rows = [listed.relative for listed in list_dataset(hub).files]
    assert len(rows) == 3 and rows == [listed.relative for listed in list_dataset(hub).files]


def test_crop_aspect_closest_and_random_choose_from_the_buckets(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    draw_images(tmp_path / "images", [(200, 100), (100, 130), (90, 100), (150, 150)])
    crop = {"crop": True, "resolution": 64, "resolution_type": "pixel", "minimum_image_size": 0}
    run = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(
                tmp_path / "images",
                tmp_path / "closest",
                id="closest",
                crop_aspect="closest",
                crop_aspect_buckets=[1.0, 0.75, 1.5],
                **crop,
            ),
            image_dataset(
                tmp_path / "images",
                tmp_path / "random",
                id="random",
                crop_aspect="random",
                crop_aspect_buckets=[{"aspect": 0.5, "weight": 0.5}, {"aspect": 2.0, "weight": 0.5}],
                **crop,
            ),
        ],
    )
    work = _by_id(discover_without_ray(run))
    closest = {row.source: row.bucket for row in work["closest"].rows.values()}
    # 2.0 -> 1.5 (96 x 64); 0.77 -> 0.75 (64 x 80, 85 aligned to 16); 0.9 and 1.0 -> 1.0 (64 x 64).
    assert closest == {
        "image_000.png": "96x64",
        "image_001.png": "64x80",
        "image_002.png": "64x64",
        "image_003.png": "64x64",
    }
    drawn = {row.source: row.bucket for row in work["random"].rows.values()}
    # Each image got one of the two ratios (the short edge of the original is 64, as SimpleTuner sizes it).
    assert {row.width / row.height for row in work["random"].rows.values()} <= {0.5, 2.0}
    # A rebuild draws the same bucket for every image, so its latent rows (and keys) stay.
    again = _by_id(discover_without_ray(run))
    assert {row.source: row.bucket for row in again["random"].rows.values()} == drawn
    assert set(again["random"].rows) == set(work["random"].rows)


def test_caption_shuffle_adds_the_shuffled_captions_to_the_text_cache(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    (path,) = draw_images(tmp_path / "images", [(64, 64)])
    path.with_suffix(".txt").write_text("portrait, red hair, smiling, outdoors, sunset\n")
    shuffle = {"enable": True, "count": 2, "position_start": 1}
    run = _run(
        tmp_path,
        tiny_cosmos_dir,
        [
            image_dataset(tmp_path / "images", tmp_path / "tags", id="tags", caption_shuffle=shuffle),
            # An instance prompt is never shuffled, as in SimpleTuner.
            image_dataset(
                tmp_path / "images",
                tmp_path / "prompt",
                id="prompt",
                caption_strategy="instanceprompt",
                instance_prompt="sks, dog, park",
                caption_shuffle=shuffle,
            ),
        ],
        seed=7,
    )
    work = _by_id(discover_without_ray(run))
    (row,) = work["tags"].rows.values()
    assert row.file is not None
    # config.json's seed 7 shuffles the four tags after "portrait" (worked out with SimpleTuner's code).
    assert row.file.captions == (
        "portrait, red hair, smiling, outdoors, sunset",
        "portrait, outdoors, smiling, sunset, red hair",
        "portrait, sunset, smiling, red hair, outdoors",
    )
    assert row.caption_keys == tuple(caption_key(caption) for caption in row.file.captions)
    (prompt_row,) = work["prompt"].rows.values()
    assert prompt_row.file is not None and prompt_row.file.captions == ("sks, dog, park",)
    commit_without_encoding(run, list(work.values()))
    text = Location(uri=str(tmp_path / "text"))
    manifest = read_manifest(text)
    assert manifest is not None
    encoded = set(read_index(text, manifest).column("key").to_pylist())
    assert set(row.caption_keys) <= encoded


def test_delete_problematic_images_deletes_only_undecodable_files_and_only_when_set(
    tmp_path: Path, tiny_cosmos_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    images = tmp_path / "images"
    draw_images(images, [(64, 64), (32, 32)])
    broken = add_broken_files(images)
    (images / "uncaptioned.png").write_bytes((images / "image_000.png").read_bytes())
    entry = image_dataset(images, tmp_path / "cache", minimum_image_size=48, resolution_type="pixel")
    files = sorted(path.name for path in images.iterdir())
    # Unset (and false in config.json), nothing is deleted: the files are only skipped and reported.
    (kept,) = discover_without_ray(_run(tmp_path, tiny_cosmos_dir, [entry]))
    assert {skip.relative for skip in kept.skipped} >= set(broken)
    assert sorted(path.name for path in images.iterdir()) == files
    # Set in config.json, every dataset that does not say otherwise deletes them.
    run = _run(tmp_path, tiny_cosmos_dir, [entry], delete_problematic_images=True)
    with caplog.at_level(logging.WARNING, logger="raytuner.data.problematic"):
        (item,) = discover_without_ray(run)
    remaining = sorted(path.name for path in images.iterdir())
    # Undecodable files go; their caption files, a too-small image (delete_unwanted_images) and an
    # uncaptioned image stay.
    assert remaining == sorted(set(files) - set(broken))
    commit_without_encoding(run, [item])
    reasons = {entry["file"]: entry["reason"] for entry in _report(tmp_path / "cache")["skipped"]}
    for name, word in broken.items():
        assert word in reasons[name] and reasons[name].endswith(problematic.DELETED), name
    assert "smaller than minimum_image_size" in reasons["image_001.png"]
    assert "no caption file" in reasons["uncaptioned.png"]
    assert "deleted 3 problematic file(s)" in caplog.text
    # A dataset's own false wins over config.json's true.
    draw_images(images, [(64, 64)], start=5)
    (images / "broken.png").write_bytes(b"not a png")
    own = {**entry, "delete_problematic_images": False}
    discover_without_ray(_run(tmp_path, tiny_cosmos_dir, [own], delete_problematic_images=True))
    assert (images / "broken.png").exists()


def test_problematic_files_of_aws_and_huggingface_datasets(
    tmp_path: Path, s3_server: S3Server, caplog: pytest.LogCaptureFixture
) -> None:
    # type aws: the object is deleted from the bucket, as SimpleTuner deletes it.
    bucket = s3_server.create_bucket("problematic-images")
    filesystem = s3_server.filesystem()
    with filesystem.open_output_stream(f"{bucket}/photos/broken.png") as handle:
        handle.write(b"not a png")
    with filesystem.open_output_stream(f"{bucket}/photos/kept.png") as handle:
        handle.write(b"a file this build could not read (say, access denied)")
    aws = DatasetConfig(
        id="bucket",
        type="aws",
        aws_bucket_name=bucket,
        aws_data_prefix="photos",
        aws_endpoint_url=s3_server.endpoint_url,
        aws_region_name=s3_server.region,
        aws_access_key_id=s3_server.access_key_id,
        aws_secret_access_key=s3_server.secret_access_key,
        delete_problematic_images=True,
    )
    skipped = [
        SkippedFile(
            dataset_id="bucket", relative="broken.png", reason="not an image (no image format recognised)"
        ),
        SkippedFile(dataset_id="bucket", relative="kept.png", reason="unreadable: kept.png: access denied"),
    ]
    result = problematic.delete_problematic(Listing(dataset=aws, location=dataset_location(aws)), skipped)
    names = {info.base_name for info in filesystem.get_file_info(_selector(bucket))}
    assert names == {"kept.png"}
    assert result[0].reason.endswith(problematic.DELETED) and result[1] == skipped[1]
    # type huggingface: rows cannot be deleted; the report and the log say so.
    folder = save_hub_dataset(tmp_path / "hub", 1)
    hub = DatasetConfig(
        id="hub", type="huggingface", dataset_name=str(folder), delete_problematic_images=True
    )
    row = SkippedFile(dataset_id="hub", relative="train/0", reason="corrupt or truncated image (x)")
    with caplog.at_level(logging.WARNING, logger="raytuner.data.problematic"):
        (reported,) = problematic.delete_problematic(
            Listing(dataset=hub, location=dataset_location(hub)), [row]
        )
    assert reported.reason.endswith(problematic.NOT_DELETED_HUB)
    assert "train/0 not deleted" in caplog.text


def _selector(bucket: str) -> Any:
    import pyarrow.fs as pafs

    return pafs.FileSelector(f"{bucket}/photos", recursive=True)
