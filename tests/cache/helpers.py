"""Helpers for the cache tests: synthetic datasets of many sizes (and broken files), and run configs."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from raytuner.cache import format as fmt
from raytuner.cache import stages
from raytuner.cache.build import open_latent_cache
from raytuner.cache.latents import commit_latents
from raytuner.cache.ondemand import leave_to_workers
from raytuner.cache.placing import place_images
from raytuner.cache.rows import DatasetWork, latent_todo
from raytuner.cache.settings import EncoderIdentity, image_datasets, model_path_of, vae_identity
from raytuner.cache.summary import DatasetSummary
from raytuner.cache.text import TextWork
from raytuner.config import RunConfig, load_config
from raytuner.data import discovery
from raytuner.data.problematic import delete_problematic
from raytuner.data.synthetic import COLOURS, SHAPES, draw_shape
from raytuner.models.registry import get_family

# (width, height): squares, landscapes, portraits and two extreme aspect ratios.
SIZES: tuple[tuple[int, int], ...] = (
    (64, 64),
    (80, 80),
    (96, 64),
    (64, 96),
    (128, 64),
    (64, 128),
    (112, 72),
    (72, 112),
    (256, 48),
    (48, 256),
    (100, 100),
    (70, 90),
)
LYCORIS = {"algo": "lokr", "multiplier": 1.0, "linear_dim": 10000, "linear_alpha": 1, "factor": 4}


def draw_images(
    folder: Path, sizes: Sequence[tuple[int, int]], *, start: int = 0, subfolder: str = ""
) -> list[Path]:
    """One captioned PNG per size (caption in the .txt beside it), a different shape/colour each."""
    target = folder / subfolder if subfolder else folder
    target.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS)
    paths = []
    for offset, (width, height) in enumerate(sizes):
        index = start + offset
        shape = SHAPES[index % len(SHAPES)]
        colour, background = colours[index % len(colours)], colours[(index + 3) % len(colours)]
        path = target / f"image_{index:03d}.png"
        draw_shape(shape, colour, background, width=width, height=height).save(path)
        path.with_suffix(".txt").write_text(
            f"a {colour} {shape} on a {background} background\n", encoding="utf-8"
        )
        paths.append(path)
    return paths


def add_broken_files(folder: Path) -> dict[str, str]:
    """A zero-byte file, a truncated PNG and a text file posing as a JPEG; name -> expected reason word."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.txt").write_text("empty\n")
    good = folder / "image_000.png"
    data = good.read_bytes() if good.exists() else b"\x89PNG\r\n\x1a\n" + b"\0" * 64
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "truncated.txt").write_text("truncated\n")
    (folder / "notes.jpg").write_text("this is not a picture\n")
    (folder / "notes.txt").write_text("notes\n")
    return {"empty.png": "zero-byte", "truncated.png": "truncated", "notes.jpg": "not an image"}


@dataclass(frozen=True)
class RunFiles:
    config: Path
    root: Path

    def load(self) -> RunConfig:
        return load_config(self.config)


def write_run_files(root: Path, model: Path, datasets: list[dict[str, Any]], **config: Any) -> RunFiles:
    """config.json (tiny model, alignment 16), the given multidatabackend.json and a LoKr config in ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    body = {
        "model_family": "cosmos2image",
        "model_type": "lora",
        "lora_type": "lycoris",
        "pretrained_model_name_or_path": str(model),
        "lycoris_config": str(root / "lycoris_config.json"),
        "data_backend_config": str(root / "multidatabackend.json"),
        "output_dir": str(root / "output"),
        "max_train_steps": 10,
        "seed": 11,
        "vae_batch_size": 2,
        "aspect_bucket_alignment": 16,
        "validation_prompt": "a red circle on a blue background",
        **config,
    }
    (root / "config.json").write_text(json.dumps(body, indent=2))
    (root / "multidatabackend.json").write_text(json.dumps(datasets, indent=2))
    (root / "lycoris_config.json").write_text(json.dumps(LYCORIS))
    return RunFiles(config=root / "config.json", root=root)


def image_dataset(folder: Path, cache: Path | str, **keys: Any) -> dict[str, Any]:
    return {
        "id": keys.pop("id", "shapes"),
        "type": "local",
        "instance_data_dir": str(folder),
        "caption_strategy": "textfile",
        "resolution": 64,
        "resolution_type": "pixel_area",
        "cache_dir_vae": str(cache),
        **keys,
    }


def text_dataset(cache: Path | str, **keys: Any) -> dict[str, Any]:
    return {
        "id": "text-embeds",
        "type": "local",
        "dataset_type": "text_embeds",
        "default": True,
        "cache_dir": str(cache),
        **keys,
    }


# ---- the build's bookkeeping without Ray or encoders -----------------------------------------------------

VAE_IDENTITY = EncoderIdentity.of({"component": "VAE", "note": "no encoder runs in these tests"})
TEXT_IDENTITY = EncoderIdentity.of({"component": "text side", "note": "no encoder runs in these tests"})
UNWRITTEN_SHARD = "bucket=unwritten/part-unwritten.parquet"


def discover_without_ray(run: RunConfig, identity: EncoderIdentity = VAE_IDENTITY) -> list[DatasetWork]:
    """The build's discovery and placement of every image dataset, with the files probed in this process."""
    family_cls = get_family(run.training.model.model_family)
    work = []
    for dataset in image_datasets(run):
        item = open_latent_cache(run, dataset, family_cls, identity, rebuild=False)
        assert item.listing is not None
        location = discovery.dataset_location(dataset)
        probes = {
            listed.fingerprint: discovery.probe_file(
                listed, location, caption_strategy=dataset.caption_strategy
            )
            for listed in item.listing.files
        }
        item.images, item.skipped = discovery.merge_probes(item.listing, probes)
        item.skipped = delete_problematic(item.listing, item.skipped)
        place_images(item, seed=run.seed, vae_key=identity.key)
        work.append(item)
    return work


def commit_without_encoding(run: RunConfig, work: Sequence[DatasetWork]) -> dict[str, DatasetSummary]:
    """Commit the text and latent caches of ``work`` as the build does, without encoding anything.

    What the build would encode is recorded at a shard that is never written: everything that
    reads only the indexes (the plan, captions, the report) sees a real committed cache, and
    nothing here reads a latent or a prompt embedding.
    """
    text = TextWork.open(run, TEXT_IDENTITY, work)
    locations = fmt.shard_locations([row["key"] for row in text.todo], "part-unwritten.parquet")
    text.written = {location["key"]: location for location in locations}
    text.commit(get_family(run.training.model.model_family))
    summaries = {}
    for item in work:
        keys = [entry["key"] for entry in latent_todo([item])]
        item.written = {location["key"]: location for location in fmt.shard_locations(keys, UNWRITTEN_SHARD)}
        summaries[item.dataset.id] = commit_latents(item, VAE_IDENTITY)
    return summaries


# ---- the build's latent pass in this process (real VAE, no Ray) ------------------------------------------


def real_vae_identity(run: RunConfig) -> EncoderIdentity:
    family_cls = get_family(run.training.model.model_family)
    return vae_identity(run, family_cls(model_path_of(run)))


def build_latents_without_ray(run: RunConfig) -> list[DatasetSummary]:
    """``raytuner cache``'s latent side for ``run`` in this process: discovery, placement, the pending
    rows of the datasets the workers encode, the build's VAE stages for the others, then the commit."""
    identity = real_vae_identity(run)
    work = discover_without_ray(run, identity)
    for item in work:
        item.stale_shards = {row["shard"] for row in (*item.existing.values(), *item.pending.values())}
    up_front = leave_to_workers(run, work, identity)
    todo = latent_todo(up_front)
    if todo:
        sources = {item.dataset.id: discovery.dataset_location(item.dataset) for item in up_front}
        cropped = [stages.load_and_crop(dict(entry), sources) for entry in todo]
        encoder = stages.VaeEncoder(
            run.training.model.model_family, model_path_of(run), None, sources, run.training.data
        )
        columns = {name: [row[name] for row in cropped] for name in cropped[0]}
        shards = stages.write_latent_shards(
            pa.Table.from_pydict(encoder(columns)),
            {item.dataset.id: item.cache for item in up_front},
            identity.key,
            fmt.new_build_id(),
        )
        by_id = {item.dataset.id: item for item in up_front}
        for result in shards.to_pylist():
            assert not result["error"], result
            for location in fmt.shard_locations(result["keys"], result["shard"]):
                by_id[result["dataset_id"]].written[location["key"]] = location
    return [commit_latents(item, identity) for item in work]
