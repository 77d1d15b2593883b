"""Object storage: the cache on ``s3://`` and a ``type: aws`` dataset, against moto's S3 server on loopback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import pytest

from raytuner.batches.plan import BatchShape, DatasetSampling, plan_epoch
from raytuner.batches.reader import LatentCache, TextCache
from raytuner.cache.build import BuildOptions, run_cache
from raytuner.config import load_config
from raytuner.storage import Location, S3Settings
from tests.cache.helpers import add_broken_files, draw_images, image_dataset, text_dataset, write_run_files
from tests.s3_server import S3Server

pytestmark = pytest.mark.usefixtures("ray_cluster")

SIZES = [(64, 64), (96, 64), (64, 96), (80, 80)]


def _upload(s3: S3Server, folder: Path, bucket: str, prefix: str) -> None:
    filesystem = s3.filesystem()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with filesystem.open_output_stream(
                f"{bucket}/{prefix}/{path.relative_to(folder).as_posix()}"
            ) as stream:
                stream.write(path.read_bytes())


def _objects(s3: S3Server, bucket: str) -> dict[str, bytes]:
    filesystem = s3.filesystem()
    infos = filesystem.get_file_info(pafs.FileSelector(bucket, recursive=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with filesystem.open_input_stream(info.path) as stream:
                out[info.path] = stream.read()
    return out


def test_the_cache_round_trips_through_s3(s3_server: S3Server, tmp_path: Path, tiny_cosmos_dir: Path) -> None:
    """A local dataset cached to s3:// URIs; endpoint and keys come from the environment (AWS_*)."""
    bucket = s3_server.create_bucket("raytuner-cache")
    draw_images(tmp_path / "images", SIZES)
    datasets = [
        image_dataset(tmp_path / "images", f"s3://{bucket}/cache/vae/shapes"),
        text_dataset(f"s3://{bucket}/cache/text"),
    ]
    files = write_run_files(tmp_path, tiny_cosmos_dir, datasets)
    run = load_config(files.config)
    assert run.datasets[0].cache_dir_vae == f"s3://{bucket}/cache/vae/shapes"
    summary = run_cache(run, BuildOptions())
    assert summary.datasets[0].encoded == 4
    stored = _objects(s3_server, bucket)
    assert f"{bucket}/cache/vae/shapes/raytuner_cache.json" in stored
    assert any(path.startswith(f"{bucket}/cache/vae/shapes/bucket=") for path in stored)
    assert not any(path.endswith(".tmp") for path in stored)

    latents = LatentCache("shapes", Location(uri=f"s3://{bucket}/cache/vae/shapes"))
    text = TextCache(Location(uri=f"s3://{bucket}/cache/text"))
    plan = plan_epoch(
        latents.samples, [DatasetSampling(dataset_id="shapes")], BatchShape(per_worker=1), seed=1, epoch=0
    )
    batch = plan.batches[0]
    assert latents.latents(batch.keys).shape[0] == 1
    (conditioning,) = text.conditioning([latents.caption_key(batch.keys[0], seed=1, step=0)])
    assert conditioning["prompt_embeds"].ndim == 2

    again = run_cache(load_config(files.config), BuildOptions())
    assert again.encoded == 0 and again.datasets[0].images == 4


def test_an_aws_dataset_is_read_from_its_bucket_and_cached_under_its_prefix(
    s3_server: S3Server, tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    """SimpleTuner's type aws keys; credentials given in the file are used but never written out."""
    bucket = s3_server.create_bucket("raytuner-images")
    local = tmp_path / "upload"
    draw_images(local, SIZES)
    broken = add_broken_files(local)
    _upload(s3_server, local, bucket, "datasets/shapes")
    secret = s3_server.secret_access_key
    dataset: dict[str, Any] = {
        "id": "shapes-s3",
        "type": "aws",
        "aws_bucket_name": bucket,
        "aws_data_prefix": "datasets/shapes",
        "aws_endpoint_url": s3_server.endpoint_url,
        "aws_region_name": s3_server.region,
        "aws_access_key_id": s3_server.access_key_id,
        "aws_secret_access_key": secret,
        "caption_strategy": "textfile",
        "resolution": 64,
        "resolution_type": "pixel_area",
        "cache_dir_vae": "cache/vae/shapes",
    }
    files = write_run_files(tmp_path, tiny_cosmos_dir, [dataset, text_dataset(tmp_path / "cache" / "text")])
    run = load_config(files.config)
    assert secret not in json.dumps(run.to_dict())
    summary = run_cache(run, BuildOptions())
    (result,) = summary.datasets
    assert (result.images, result.encoded, result.skipped) == (4, 4, len(broken))
    assert result.cache == f"s3://{bucket}/cache/vae/shapes"

    stored = _objects(s3_server, bucket)
    report = json.loads(stored[f"{bucket}/cache/vae/shapes/raytuner_cache_report.json"])
    assert {entry["file"] for entry in report["skipped"]} == set(broken)
    for path, data in stored.items():
        assert secret.encode() not in data, f"{path} holds the secret key"
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name != "multidatabackend.json":
            assert secret.encode() not in path.read_bytes(), f"{path} holds the secret key"

    location = Location(
        uri=f"s3://{bucket}/cache/vae/shapes",
        s3=S3Settings(
            endpoint_url=s3_server.endpoint_url,
            region=s3_server.region,
            access_key_id=s3_server.access_key_id,
            secret_access_key=secret,
        ),
    )
    assert secret not in repr(location)
    assert len(LatentCache("shapes-s3", location).samples) == 4
