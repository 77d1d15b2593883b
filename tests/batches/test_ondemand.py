"""vae_cache_ondemand and vae_cache_clear_each_epoch: latents encoded by the training workers'
reader, without Ray, against the same images encoded up front by the build's own VAE stages."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from raytuner import flow
from raytuner.batches.ondemand import WorkerEncoder
from raytuner.batches.plan import sample_generators, sample_seed
from raytuner.batches.reader import LatentCache, on_demand_of
from raytuner.cache.folders import adopt_orphans
from raytuner.cache.format import CacheError, read_index, read_manifest
from raytuner.cache.rows import latent_todo
from raytuner.config import RunConfig
from raytuner.models.registry import get_family
from raytuner.storage import Location
from tests.cache.helpers import (
    build_latents_without_ray,
    discover_without_ray,
    draw_images,
    image_dataset,
    real_vae_identity,
    text_dataset,
    write_run_files,
)

# Wider or taller than their square bucket, so a random crop has room to move.
SIZES = ((96, 64), (64, 96), (80, 80), (112, 64))


@dataclass(frozen=True)
class Caches:
    images: Path
    model: Path
    root: Path

    def run(self, name: str, *, config: dict[str, Any] | None = None, **keys: Any) -> RunConfig:
        dataset = image_dataset(
            self.images,
            self.root / name / "vae",
            resolution=64,
            resolution_type="pixel",
            crop=True,
            crop_aspect="square",
            crop_style="random",
            **keys,
        )
        files = write_run_files(
            self.root / name, self.model, [dataset, text_dataset(self.root / name / "text")], **(config or {})
        )
        return files.load()

    def folder(self, name: str) -> Location:
        return Location(uri=str(self.root / name / "vae"))


@pytest.fixture(scope="module")
def caches(tmp_path_factory: pytest.TempPathFactory, tiny_cosmos_dir: Path) -> Caches:
    root = tmp_path_factory.mktemp("ondemand")
    draw_images(root / "images", SIZES)
    made = Caches(images=root / "images", model=tiny_cosmos_dir, root=root)
    build_latents_without_ray(made.run("up-front"))
    return made


def _opened(run: RunConfig, folder: Location) -> tuple[LatentCache, WorkerEncoder]:
    dataset = run.enabled_datasets[0]
    encoder = WorkerEncoder(run)  # this process's accelerator, as the build's VAE actors use
    return LatentCache(dataset.id, folder, on_demand=on_demand_of(run, dataset, encoder)), encoder


def _loss(run: RunConfig, latents: torch.Tensor, keys: list[str]) -> torch.Tensor:
    """The training step's loss on ``latents`` with the tiny transformer, noised by (seed, key, step 0)."""
    family = get_family(run.training.model.model_family)(run.training.model.pretrained_model_name_or_path)
    conditioning = family.collate_conditioning(family.encode_prompts(["a red circle"] * len(keys)))
    seeds = tuple(sample_seed(run.seed, key, 0) for key in keys)
    with torch.no_grad():
        return family.training_loss(
            family.load_transformer().eval(),
            latents,
            conditioning,
            flow.FlowSchedule(),
            generator=sample_generators(seeds),
        ).loss


def _batches(cache: LatentCache) -> dict[str, list[str]]:
    buckets: dict[str, list[str]] = {}
    for sample in cache.samples:
        buckets.setdefault(sample.bucket, []).append(sample.key)
    return buckets


def test_latents_encoded_on_demand_are_the_up_front_caches_and_are_written_back(caches: Caches) -> None:
    up_front = LatentCache("shapes", caches.folder("up-front"))
    # config.json's vae_cache_ondemand, as SimpleTuner's OmniGen quickstart sets it: the build runs no VAE.
    run = caches.run("on-demand", config={"vae_cache_ondemand": True})
    [summary] = build_latents_without_ray(run)
    assert (summary.images, summary.encoded) == (len(SIZES), 0)
    manifest = read_manifest(caches.folder("on-demand"))
    assert manifest is not None and manifest.extra["pending"] == len(SIZES)

    cache, encoder = _opened(run, caches.folder("on-demand"))
    # The same samples in the same buckets: the plan of an on-demand cache is the up-front one's.
    assert cache.samples == up_front.samples and cache.pending == len(SIZES)
    for keys in _batches(cache).values():
        # Same crop, same VAE, same settings: the training step sees the same latents, and loss.
        encoded = cache.latents(keys, epoch=0)
        torch.testing.assert_close(encoded, up_front.latents(keys), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(_loss(run, encoded, keys), _loss(run, up_front.latents(keys), keys))
    assert encoder.encoded == len(SIZES) and cache.pending == 0
    for keys in _batches(cache).values():  # a later epoch reads what the first wrote back
        cache.latents(keys, epoch=1)
    assert encoder.encoded == len(SIZES)

    # Written back as ordinary latent shards: a later reader merges them without any VAE ...
    shards = sorted(p.name for p in (caches.root / "on-demand" / "vae").rglob("part-ondemand-*.parquet"))
    assert len(shards) == len(_batches(cache))
    again = LatentCache("shapes", caches.folder("on-demand"))
    assert again.pending == 0
    for keys in _batches(again).values():
        torch.testing.assert_close(again.latents(keys), up_front.latents(keys), atol=1e-5, rtol=1e-5)
    # ... and a later build without vae_cache_ondemand finds them encoded, and encodes nothing.
    plain = caches.run("on-demand")
    identity = real_vae_identity(plain)
    index = read_index(caches.folder("on-demand"), manifest)
    adopted = adopt_orphans(
        caches.folder("on-demand"),
        kind="latents",
        encoder=identity,
        known=set(index.column("shard").to_pylist()),
    )
    assert set(adopted) == set(index.column("key").to_pylist())
    assert latent_todo(discover_without_ray(plain, identity)) == []
    [rebuilt] = build_latents_without_ray(plain)
    assert (rebuilt.images, rebuilt.encoded) == (len(SIZES), 0)
    committed = LatentCache("shapes", caches.folder("on-demand"))
    assert committed.pending == 0 and "pending" not in committed.manifest.extra
    assert not list((caches.root / "on-demand" / "vae").glob("pending-*.parquet"))


def test_workers_share_what_each_wrote_back_and_a_killed_writer_leaves_nothing_used(caches: Caches) -> None:
    run = caches.run("workers", vae_cache_ondemand=True)  # the dataset's own key
    build_latents_without_ray(run)
    pending = sorted((caches.root / "workers" / "vae").glob("pending-*.parquet"))
    build_latents_without_ray(run)  # a build while a run trains keeps the pending rows it reads
    assert sorted((caches.root / "workers" / "vae").glob("pending-*.parquet")) == pending
    bucket = caches.root / "workers" / "vae" / "bucket=64x64"
    bucket.mkdir(parents=True, exist_ok=True)
    # What a worker killed mid-write leaves: a temporary name, never renamed to a shard.
    leftover = bucket / ".part-ondemand-1.parquet.0123.tmp"
    leftover.write_bytes(b"PAR1 half a shard")
    first, first_encoder = _opened(run, caches.folder("workers"))
    second, second_encoder = _opened(run, caches.folder("workers"))
    assert first.pending == second.pending == len(SIZES)
    without = LatentCache("shapes", caches.folder("workers"))
    keys = _batches(without)["64x64"]
    with pytest.raises(CacheError, match="left for the training workers to encode"):
        without.latents(keys)
    # Two workers meet the same images (repeats): the second reads what the first wrote back.
    encoded = first.latents(keys[:2])
    torch.testing.assert_close(second.latents(keys[:2]), encoded)
    assert (first_encoder.encoded, second_encoder.encoded) == (2, 0)
    second.latents(keys)
    assert second_encoder.encoded == len(keys) - 2
    assert leftover.exists()  # a reader never deletes a file another worker may be writing


def test_clear_each_epoch_redraws_random_crops_per_epoch_and_writes_nothing_back(caches: Caches) -> None:
    up_front = LatentCache("shapes", caches.folder("up-front"))
    run = caches.run("every-epoch", vae_cache_clear_each_epoch=True)
    [summary] = build_latents_without_ray(run)
    assert summary.encoded == 0
    cache, encoder = _opened(run, caches.folder("every-epoch"))
    keys = _batches(cache)["64x64"]
    first = cache.latents(keys, epoch=0)
    # Epoch 0 keeps the build's crop: the up-front cache's latents.
    torch.testing.assert_close(first, up_front.latents(keys), atol=1e-5, rtol=1e-5)
    second = cache.latents(keys, epoch=1)
    assert not torch.allclose(first, second)  # a new crop of the same images
    torch.testing.assert_close(cache.latents(keys, epoch=1), second)  # seeded: a resume sees the same
    assert encoder.encoded == 3 * len(keys)
    assert cache.pending == len(SIZES)
    assert not list((caches.root / "every-epoch" / "vae").rglob("part-*.parquet"))
