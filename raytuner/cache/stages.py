"""The bodies of the cache build's Ray Data stages, run on the cluster's nodes.

Kept apart from the build's orchestration so that a CPU task (probing, decoding and cropping,
writing shards) imports only PIL, numpy and pyarrow: torch and diffusers load only in the VAE
and text-encoder actors, which need them. Errors on a file travel as data (an ``error`` field)
and end in the build's report; only a node that cannot see a dataset at all raises.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from raytuner.cache import format as fmt
from raytuner.data import discovery
from raytuner.data.discovery import ListedFile
from raytuner.storage import Location

if TYPE_CHECKING:
    from raytuner.config.training import DataSection
    from raytuner.models.base import ModelFamily


def probe_batch(
    batch: dict[str, np.ndarray], sources: Mapping[str, tuple[Location, str]]
) -> dict[str, list[Any]]:
    """Ray Data task: probe a batch of listed files on whichever node runs it."""
    out: dict[str, list[Any]] = defaultdict(list)
    for row in rows_of(batch):
        location, caption_strategy = sources[row["dataset_id"]]
        listed = ListedFile(**{name: row[name] for name in LISTED_FIELDS})
        probe = discovery.probe_file(listed, location, caption_strategy=caption_strategy)
        for name, value in discovery.probe_rows([probe])[0].items():
            out[name].append(value)
    return dict(out)


def actor_pool(size: int) -> Any:
    """Ray Data's pool of ``size`` actors for a stage that loads a model once per actor."""
    import ray

    return ray.data.ActorPoolStrategy(size=size)


LISTED_FIELDS = ("dataset_id", "path", "relative", "size", "mtime_ns", "caption_path", "caption_fingerprint")


def rows_of(batch: Mapping[str, Any]) -> list[dict[str, Any]]:
    names = list(batch)
    count = len(batch[names[0]]) if names else 0
    return [{name: _plain(batch[name][i]) for name in names} for i in range(count)]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


NO_MASK = np.zeros((1, 1), np.uint8)  # placeholder of rows without a mask (one column for all rows)


def place_pixels(data: bytes, row: Mapping[str, Any]) -> np.ndarray:
    """Decode, resize to the row's intermediary size and crop its bucket: ``[H, W, 3]`` uint8.

    Images and their masks both go through here with the image's geometry, so a mask covers
    exactly the pixels of its image; a mask of another size is resized to the image's
    intermediary size like the image itself (what SimpleTuner's ``prepare_like`` does).
    """
    from PIL import Image

    image = discovery.open_image(data)
    image = image.resize((row["inter_w"], row["inter_h"]), Image.Resampling.LANCZOS)
    box = (row["left"], row["top"], row["left"] + row["width"], row["top"] + row["height"])
    return np.asarray(image.crop(box), dtype=np.uint8)


def load_and_crop(row: dict[str, Any], sources: Mapping[str, Location]) -> dict[str, Any]:
    """CPU task: read, decode, resize to the intermediary, crop the bucket. Errors travel as ``error``.

    A row with a ``mask_path`` gets its mask cropped the same way: ``mask`` is the red channel
    (SimpleTuner reads channel 0 of the RGB-converted mask), ``[H, W]`` uint8.
    """
    row["error"], row["pixels"], row["mask"] = "", np.zeros((1, 1, 3), np.uint8), NO_MASK
    for name, dataset_id, path in (
        ("pixels", row["dataset_id"], row["path"]),
        ("mask", row.get("mask_dataset_id", ""), row.get("mask_path", "")),
    ):
        if not path:
            continue
        location = sources[dataset_id]
        what = "" if name == "pixels" else "mask: "
        try:
            pixels = place_pixels(discovery.read_source(location, path), row)
        except FileNotFoundError:
            discovery.check_visible(dataset_id, location)
            row["error"] = f"{what}file disappeared while the cache was built"
            break
        except (OSError, discovery.ImageDecodeError) as error:
            row["error"] = what + str(error).splitlines()[0]
            break
        row[name] = pixels if name == "pixels" else np.ascontiguousarray(pixels[:, :, 0])
    if row["error"]:
        row["pixels"], row["mask"] = np.zeros((1, 1, 3), np.uint8), NO_MASK
    return row


def mask_on_latent_grid(mask: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """A ``[H, W]`` uint8 mask as ``[h, w]`` float32 weights in 0..1: each latent pixel the mean of
    the pixels it covers (SimpleTuner: ``interpolate(mode="area")`` of the mask to the loss's size)."""
    import torch

    weights = torch.from_numpy(mask.astype(np.float32) / 255.0)[None, None]
    return torch.nn.functional.interpolate(weights, size=grid, mode="area")[0, 0].numpy()


class VaeEncoder:
    """Actor: the family's VAE, loaded once per actor on its GPU (or CPU)."""

    def __init__(
        self,
        family_name: str,
        model_path: str,
        revision: str | None,
        local_sources: Mapping[str, Location],
        data: DataSection,
    ) -> None:
        import torch

        # A dataset this node cannot read is raised by the first call, not here: Ray hands the
        # driver an exception from a call whole, but one from an actor's constructor only as the
        # text of an ActorDiedError, after Ray Data has retried the actor.
        self.unreadable: discovery.DatasetError | None = None
        for dataset_id, location in local_sources.items():
            try:
                discovery.check_visible(dataset_id, location)
            except discovery.DatasetError as error:
                self.unreadable = error
                return
        from raytuner.models.registry import get_family

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.family = get_family(family_name)(model_path, revision=revision, device=device)
        self.family.apply_vae_options(slicing=data.vae_enable_slicing, tiling=data.vae_enable_tiling)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.unreadable is not None:
            raise self.unreadable
        rows = rows_of(batch)
        call = uuid.uuid4().hex  # counts VAE calls in the summary
        out: dict[str, list[Any]] = defaultdict(list)
        for row in encode_cropped(self.family, rows):
            row["vae_call"] = call
            for name, value in row.items():
                out[name].append(value)
        return dict(out)


def encode_cropped(family: ModelFamily, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """:func:`load_and_crop`'s rows through the VAE: each row's pixels and mask replaced by its
    ``latent`` (and ``loss_mask``) fields, shapes as text. Rows with an ``error`` get empty ones.

    The cache build's VAE actors and the training workers' on-demand encoder both encode here, so
    a latent encoded on a worker is the one the build would have cached.
    """
    from raytuner.data.synthetic import to_pixels

    by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, row in enumerate(rows):
        if not row["error"]:
            by_shape[tuple(np.asarray(row["pixels"]).shape)].append(index)
    latents: dict[int, np.ndarray] = {}
    for indices in by_shape.values():
        tensor = to_pixels([np.asarray(rows[i]["pixels"]) for i in indices])
        encoded = family.encode_images(tensor).cpu().numpy().astype(np.float32)
        for position, index in enumerate(indices):
            latents[index] = encoded[position]
    for index, row in enumerate(rows):
        row.pop("pixels")
        mask = np.asarray(row.pop("mask"))
        latent = latents.get(index, np.zeros((0,), np.float32))
        fields = fmt.tensor_fields("latent", latent)
        if row.get("mask_path") and index in latents:
            # The latent's own spatial size is the grid: no VAE scale factor to keep in step.
            grid = (int(latent.shape[-2]), int(latent.shape[-1]))
            fields.update(fmt.tensor_fields("loss_mask", mask_on_latent_grid(mask, grid)))
        else:
            fields.update({"loss_mask": b"", "loss_mask_shape": [], "loss_mask_dtype": ""})
        # As text between stages: error rows have another rank, and Ray Data would make a ragged tensor.
        for name in ("latent_shape", "loss_mask_shape"):
            fields[name] = ",".join(str(n) for n in fields[name])
        row.update(fields)
    return rows


def write_latent_shards(
    batch: pa.Table, caches: Mapping[str, Location], encoder_key_: str, build_id: str
) -> pa.Table:
    """Task: one Parquet shard per (dataset, bucket) in the batch; returns one row per shard and per error."""
    rows = batch.to_pylist()
    out: list[dict[str, Any]] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["error"]:
            out.append(
                {
                    "dataset_id": row["dataset_id"],
                    "shard": "",
                    "bytes": 0,
                    "keys": [],
                    "error": row["error"],
                    "source": row["source"],
                    "bucket": row["bucket"],
                }
            )
        else:
            groups[(row["dataset_id"], row["bucket"])].append(row)
    for (dataset_id, bucket), members in groups.items():
        table = latent_table(members)
        relative = f"bucket={bucket}/part-{build_id}-{uuid.uuid4().hex[:12]}.parquet"
        shard, size = fmt.write_shard(
            caches[dataset_id], relative, table, encoder_key=encoder_key_, kind="latents"
        )
        out.append(
            {
                "dataset_id": dataset_id,
                "shard": shard,
                "bytes": size,
                "keys": [m["key"] for m in members],
                "error": "",
                "source": "",
                "bucket": bucket,
                "vae_calls": sorted({m["vae_call"] for m in members}),
            }
        )
    return pa.Table.from_pylist(out, schema=SHARD_RESULT_SCHEMA)


def latent_table(members: list[dict[str, Any]]) -> pa.Table:
    """One latent shard's table: :func:`encode_cropped`'s rows of one dataset and bucket."""
    # A dataset's rows all have masks or none (every image of a masked dataset needs one).
    masked = bool(members[0].get("mask_path"))
    return pa.Table.from_pylist(
        [
            {
                "key": m["key"],
                "dataset_id": m["dataset_id"],
                "source": m["source"],
                "bucket": m["bucket"],
                "width": m["width"],
                "height": m["height"],
                "original_width": m["original_w"],
                "original_height": m["original_h"],
                "crop_left": m["left"],
                "crop_top": m["top"],
                "latent": m["latent"],
                "latent_shape": [int(n) for n in str(m["latent_shape"]).split(",")],
                "latent_dtype": m["latent_dtype"],
                **(_mask_fields(m) if masked else {}),
            }
            for m in members
        ],
        schema=fmt.MASKED_LATENT_SCHEMA if masked else fmt.LATENT_SCHEMA,
    )


def _mask_fields(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "loss_mask": row["loss_mask"],
        "loss_mask_shape": [int(n) for n in str(row["loss_mask_shape"]).split(",")],
        "loss_mask_dtype": row["loss_mask_dtype"],
    }


SHARD_RESULT_SCHEMA = pa.schema(
    {
        "dataset_id": pa.string(),
        "shard": pa.string(),
        "bytes": pa.int64(),
        "keys": pa.list_(pa.string()),
        "error": pa.string(),
        "source": pa.string(),
        "bucket": pa.string(),
        "vae_calls": pa.list_(pa.string()),
    }
)


class TextEncoder:
    """Actor: the family's text side (Cosmos2: T5; OmniGen: its chat-template tokenizer)."""

    def __init__(self, family_name: str, model_path: str, revision: str | None, batch_size: int) -> None:
        import torch

        from raytuner.models.registry import get_family

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.family = get_family(family_name)(model_path, revision=revision, device=device)
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        rows = rows_of(batch)
        prompts = [row["prompt"] for row in rows]
        # text_encoder_batch_size captions per forward pass; Ray Data's batch only carries rows here.
        conditioning = [
            item
            for start in range(0, len(prompts), self.batch_size)
            for item in self.family.encode_prompts(prompts[start : start + self.batch_size])
        ]
        out: dict[str, list[Any]] = defaultdict(list)
        for row, item in zip(rows, conditioning, strict=True):
            lengths = {int(tensor.shape[0]) for tensor in item.values()}
            values = {"key": row["key"], "prompt": row["prompt"], "length": max(lengths)}
            for name in self.family.prompt_tensors:
                values.update(fmt.tensor_fields(name, item[name].numpy()))
            for name, value in values.items():
                out[name].append(value)
        return dict(out)


def write_text_shards(
    batch: pa.Table, cache: Location, schema: pa.Schema, encoder_key_: str, build_id: str
) -> pa.Table:
    table = batch.select(schema.names).cast(schema)
    relative = f"part-{build_id}-{uuid.uuid4().hex[:12]}.parquet"
    shard, size = fmt.write_shard(cache, relative, table, encoder_key=encoder_key_, kind="text")
    return pa.Table.from_pylist(
        [
            {
                "dataset_id": "",
                "shard": shard,
                "bytes": size,
                "keys": table.column("key").to_pylist(),
                "error": "",
                "source": "",
                "bucket": "",
                "vae_calls": [],
            }
        ],
        schema=SHARD_RESULT_SCHEMA,
    )
