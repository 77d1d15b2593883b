"""Reading the Parquet cache back during training: plan samples, latents and prompt conditioning.

The reader opens only what the manifests commit (their indexes), so a build in progress or a
killed one is never seen. Each rank reads just the rows of its batch slice: shards are written
in small row groups and a few decoded row groups are kept in memory per reader.
"""

from __future__ import annotations

import logging
import posixpath
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raytuner.batches.ondemand import OnDemand, WorkerEncoder
from raytuner.batches.plan import (
    BatchShape,
    DatasetSampling,
    EpochPlan,
    GlobalBatch,
    PlanSample,
    plan_epoch,
    sample_seed,
)
from raytuner.batches.steps import StepPlans
from raytuner.cache import stages
from raytuner.cache.folders import uncommitted_shards
from raytuner.cache.format import (
    CacheError,
    Manifest,
    read_index,
    read_manifest,
    shard_locations,
    tensor_from_fields,
    write_shard,
)
from raytuner.cache.ondemand import encodes_on_workers, is_pending_shard
from raytuner.cache.settings import latent_cache_location, text_cache_location
from raytuner.config.datasets import DatasetConfig
from raytuner.config.run import RunConfig
from raytuner.data.buckets import crop_origin
from raytuner.models.base import PromptConditioning
from raytuner.storage import Location

ROW_GROUPS_KEPT = 32

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class CachedRowLocation:
    shard: str
    row_group: int
    row: int


class _RowGroupCache:
    """A few decoded row groups, least recently used first out."""

    def __init__(self, folder: Location, capacity: int = ROW_GROUPS_KEPT) -> None:
        self.folder = folder
        self.capacity = capacity
        self._groups: OrderedDict[tuple[str, int], list[dict[str, Any]]] = OrderedDict()

    def row(self, location: CachedRowLocation) -> dict[str, Any]:
        group_key = (location.shard, location.row_group)
        rows = self._groups.get(group_key)
        if rows is None:
            filesystem, root = self.folder.resolve()
            with filesystem.open_input_file(posixpath.join(root, location.shard)) as handle:
                rows = pq.ParquetFile(handle).read_row_group(location.row_group).to_pylist()
            self._groups[group_key] = rows
            if len(self._groups) > self.capacity:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(group_key)
        return rows[location.row]


def _committed(folder: Location, kind: str) -> tuple[Manifest, pa.Table]:
    manifest = read_manifest(folder)
    if manifest is None:
        raise CacheError(f"{folder}: no cache here yet; run `raytuner cache --config config.json` first")
    if manifest.kind != kind:
        raise CacheError(f"{folder}: holds a {manifest.kind} cache, expected {kind}")
    return manifest, read_index(folder, manifest)


def _sample_keys(index: pa.Table) -> list[str]:
    """Each latent index row's sample key (identical files share a content key, never a sample key).

    An index written before identical files were samples of their own has no ``sample`` column and
    one row per content key, which is then the sample key too: such a cache still reads.
    """
    column = "sample" if "sample" in index.column_names else "key"
    return [str(key) for key in index.column(column).to_pylist()]


def _locations(index: pa.Table, keys: Sequence[str]) -> dict[str, CachedRowLocation]:
    """Where each index row's cached row is, by ``keys`` (one per index row)."""
    shards = index.column("shard").to_pylist()
    groups = index.column("row_group").to_pylist()
    rows = index.column("row").to_pylist()
    return {
        key: CachedRowLocation(shard=shard, row_group=group, row=row)
        for key, shard, group, row in zip(keys, shards, groups, rows, strict=True)
    }


class LatentCache:
    """One image dataset's committed latents (and loss masks, when it links a mask dataset).

    Rows the build left pending (vae_cache_ondemand, vae_cache_clear_each_epoch) are encoded by
    ``on_demand`` when a batch needs them; with vae_cache_ondemand the latents are written back as
    a shard of their own, which this reader and later ones merge instead of encoding again.
    """

    def __init__(
        self,
        dataset_id: str,
        folder: Location,
        *,
        mask_dataset: str | None = None,
        on_demand: OnDemand | None = None,
    ) -> None:
        self.dataset_id = dataset_id
        self.folder = folder
        self.manifest, index = _committed(folder, "latents")
        self.masked = mask_dataset is not None
        cached_masks = self.manifest.extra.get("mask_dataset")
        if self.masked and cached_masks != mask_dataset:
            # Training without the masks the config asks for would silently learn the whole image.
            found = f"masks from '{cached_masks}'" if cached_masks else "no loss masks"
            raise CacheError(
                f"{folder}: dataset '{dataset_id}' links mask dataset '{mask_dataset}' (conditioning_data), "
                f"but its cache holds {found}; run `raytuner cache` to encode them"
            )
        # Everything below is by sample key: identical files are samples of their own, sharing a row.
        samples = _sample_keys(index)
        self._locations = _locations(index, samples)
        self._rows = _RowGroupCache(folder)
        self._caption_keys: dict[str, list[str]] = dict(
            zip(samples, index.column("caption_keys").to_pylist(), strict=True)
        )
        self.samples = [
            PlanSample(dataset_id=dataset_id, key=key, bucket=bucket)
            for key, bucket in zip(samples, index.column("bucket").to_pylist(), strict=True)
        ]
        self.on_demand = on_demand
        self._content: dict[str, str] = dict(zip(samples, index.column("key").to_pylist(), strict=True))
        self._samples_of: dict[str, list[str]] = {}
        for sample, content in self._content.items():
            self._samples_of.setdefault(content, []).append(sample)
        self._pending = {key for key, location in self._locations.items() if is_pending_shard(location.shard)}
        self._fresh: dict[str, dict[str, Any]] = {}  # the last batch's rows encoded and not written back
        self._scanned: set[str] = set()  # written-back shards already merged
        if on_demand is not None and on_demand.every_epoch and len(self._pending) < len(samples):
            raise CacheError(
                f"{folder}: dataset '{dataset_id}' sets vae_cache_clear_each_epoch, but its cache holds latents "
                "encoded up front; run `raytuner cache` to leave them to the training workers"
            )
        self.refresh()

    @property
    def pending(self) -> int:
        """Samples whose latents are not in the cache (yet)."""
        return len(self._pending)

    def refresh(self) -> None:
        """Merge the latents written back since this cache was last read (by any worker or run).

        One listing of the folder; only shards not seen before are opened.
        """
        if not self._pending or (self.on_demand is not None and self.on_demand.every_epoch):
            return
        known = {location.shard for location in self._locations.values()} | self._scanned
        written = uncommitted_shards(
            self.folder, kind="latents", encoder_key=self.manifest.encoder_key, known=known, tidy=False
        )
        self._scanned.update(location["shard"] for location in written.values())
        self._encoded(written)

    def _encoded(self, written: Mapping[str, Mapping[str, Any]]) -> None:
        """Point every pending sample of the content keys in ``written`` (key -> location) there."""
        for content, found in written.items():
            for sample in self._samples_of.get(content, ()):
                if sample in self._pending:
                    self._locations[sample] = CachedRowLocation(
                        shard=found["shard"], row_group=found["row_group"], row=found["row"]
                    )
                    self._pending.discard(sample)

    def caption_key(self, key: str, *, seed: int, step: int) -> str:
        """The caption of a sample at a step: one of its caption-file lines, drawn from (seed, key, step).

        SimpleTuner picks a random line of a multi-line caption file each time an image is drawn.
        """
        choices = self._caption_keys[key]
        return choices[0] if len(choices) == 1 else choices[sample_seed(seed, key, step) % len(choices)]

    def row(self, key: str) -> dict[str, Any]:
        """The cached row of sample ``key`` (identical files read the same row)."""
        if key in self._fresh:
            return self._fresh[key]
        try:
            location = self._locations[key]
        except KeyError:
            raise CacheError(f"{self.folder}: no cached row {key}; run `raytuner cache` again") from None
        return self._rows.row(location)

    def latents(self, keys: Sequence[str], *, epoch: int = 0) -> torch.Tensor:
        """``[len(keys), ...]`` float32 latents, in the order of ``keys`` (one bucket, one shape)."""
        self._encode_pending(keys, epoch)
        arrays = [tensor_from_fields(self.row(key), "latent") for key in keys]
        return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))

    def _encode_pending(self, keys: Sequence[str], epoch: int) -> None:
        """Encode the pending rows of ``keys``: kept for this batch (every epoch), or written back."""
        self._fresh = {}
        wanted = [key for key in dict.fromkeys(keys) if key in self._pending]
        if not wanted:
            return
        if self.on_demand is None:
            raise CacheError(
                f"{self.folder}: dataset '{self.dataset_id}': {len(self._pending)} image(s) were left for the "
                "training workers to encode (vae_cache_ondemand); run `raytuner cache` without it to encode them"
            )
        if self.on_demand.every_epoch:
            rows = [self._redrawn(self._rows.row(self._locations[key]), key, epoch) for key in wanted]
            encoded = self.on_demand.encoder.encode(
                rows, encoder_key=self.manifest.encoder_key, folder=self.folder
            )
            self._fresh = {key: latent_row(row) for key, row in zip(wanted, encoded, strict=True)}
            return
        # Another worker may have encoded some since (a sample drawn again, with repeats).
        self.refresh()
        # Identical files share one latent row: encoded once, and every sample of it points there.
        by_content = {self._content[key]: key for key in wanted if key in self._pending}
        if not by_content:
            return
        rows = [self._rows.row(self._locations[key]) for key in by_content.values()]
        encoded = self.on_demand.encoder.encode(
            rows, encoder_key=self.manifest.encoder_key, folder=self.folder
        )
        for bucket, members in _by_bucket(encoded).items():
            shard, _ = write_shard(
                self.folder,
                f"bucket={bucket}/part-ondemand-{uuid.uuid4().hex}.parquet",
                stages.latent_table(members),
                encoder_key=self.manifest.encoder_key,
                kind="latents",
            )
            self._encoded({loc["key"]: loc for loc in shard_locations([m["key"] for m in members], shard)})

    def _redrawn(self, row: dict[str, Any], key: str, epoch: int) -> dict[str, Any]:
        """A pending row with its random crop drawn again for ``epoch`` (epoch 0 keeps the build's)."""
        assert self.on_demand is not None
        style = self.on_demand.crop_style
        if epoch == 0 or style is None:
            return row
        left, top = crop_origin(
            (row["inter_w"], row["inter_h"]),
            (row["width"], row["height"]),
            style,
            crop_seed=sample_seed(self.on_demand.seed, f"{key}#crop", epoch),
        )
        return {**row, "left": left, "top": top}

    def loss_masks(self, keys: Sequence[str]) -> torch.Tensor | None:
        """``[len(keys), h, w]`` float32 loss masks on the latent grid; None for an unmasked dataset.

        A cache written with masks but read by a run that no longer links them trains unmasked.
        Called after :meth:`latents` of the same keys, which encodes any that were pending.
        """
        if not self.masked:
            return None
        arrays = [tensor_from_fields(self.row(key), "loss_mask") for key in keys]
        return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False))


def latent_row(encoded: dict[str, Any]) -> dict[str, Any]:
    """An encoded row as a latent shard holds it (shapes as lists), for reading without a shard."""
    return stages.latent_table([encoded]).to_pylist()[0]


def _by_bucket(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["bucket"], []).append(row)
    return groups


class TextCache:
    """The text-embeds dataset's committed prompt conditioning, keyed by caption hash."""

    def __init__(self, folder: Location) -> None:
        self.folder = folder
        self.manifest, index = _committed(folder, "text")
        self._locations = _locations(index, index.column("key").to_pylist())
        self._rows = _RowGroupCache(folder)
        self.tensor_names: list[str] = list(self.manifest.extra.get("tensors", []))
        self.roles: dict[str, Any] = dict(self.manifest.extra.get("roles", {}))

    def conditioning(self, caption_keys: Sequence[str]) -> list[PromptConditioning]:
        items = []
        for key in caption_keys:
            try:
                row = self._rows.row(self._locations[key])
            except KeyError:
                raise CacheError(
                    f"{self.folder}: no text conditioning for caption {key}; run `raytuner cache` again"
                ) from None
            items.append(
                {name: torch.from_numpy(tensor_from_fields(row, name).copy()) for name in self.tensor_names}
            )
        return items

    def role_key(self, role: str) -> str:
        """The caption key of a prompt encoded for a role: ``empty``, ``negative``."""
        try:
            return str(self.roles[role])
        except KeyError:
            raise CacheError(
                f"{self.folder}: no '{role}' prompt in the text cache; run `raytuner cache` again"
            ) from None

    def validation_keys(self) -> Mapping[str, str]:
        """Validation prompt nickname -> caption key (the primary prompt is ``validation``)."""
        return dict(self.roles.get("validation", {}))


@dataclass(kw_only=True)
class TrainingData:
    """Everything training reads: each image dataset's latents, the text cache, and how to sample them."""

    latents: dict[str, LatentCache]
    text: TextCache
    sampling: list[DatasetSampling]
    prune_buckets: bool = True  # not disable_bucket_pruning
    # SimpleTuner's caption_dropout_probability: applied to every batch, regularisation batches too.
    caption_dropout: float = 0.0

    @property
    def samples(self) -> list[PlanSample]:
        return [sample for cache in self.latents.values() for sample in cache.samples]

    def plan(self, shape: BatchShape, *, seed: int, epoch: int, first_step: int | None = None) -> EpochPlan:
        """The epoch's plan; buckets left out by pruning are named in a warning (at epoch 0).

        ``first_step`` (the steps trained before the epoch) applies the datasets' schedules.
        Latents other workers and runs wrote back since the last plan are merged first.
        """
        for cache in self.latents.values():
            cache.refresh()
        plan = plan_epoch(
            self.samples,
            self.sampling,
            shape,
            seed=seed,
            epoch=epoch,
            prune_buckets=self.prune_buckets,
            first_step=first_step,
        )
        if plan.pruned and epoch == 0:
            logger.warning(
                "aspect bucket(s) with fewer samples than one global batch of %d are left out: %s "
                '(set "disable_bucket_pruning": true to train on them by repeating their images)',
                shape.global_size,
                ", ".join(plan.pruned),
            )
        if plan.oversubscribed and epoch == 0:
            logger.warning(
                "allow_dataset_oversubscription: bucket(s) smaller than one global batch of %d repeat "
                "their images to fill it: %s",
                shape.global_size,
                "; ".join(plan.oversubscribed),
            )
        return plan

    def step_plans(self, shape: BatchShape, *, seed: int) -> StepPlans:
        """The batch of each step, with the datasets' ``start_step``/``end_step`` applied."""
        return StepPlans(
            lambda epoch, first_step: self.plan(shape, seed=seed, epoch=epoch, first_step=first_step),
            scheduled=any(sampling.window.scheduled for sampling in self.sampling),
        )

    def caption_keys(self, batch: GlobalBatch, keys: Sequence[str], *, seed: int, step: int) -> list[str]:
        """The caption each of ``keys`` (a rank's slice of ``batch``) trains on at ``step``.

        Each sample's caption is replaced by the cached empty prompt with probability
        :attr:`caption_dropout`, drawn from (seed, key, step) so a sample is dropped or kept the
        same way whichever rank trains it. SimpleTuner's collate drops captions in every batch it
        builds, so regularisation batches are no exception.
        """
        cache = self.latents[batch.dataset_id]
        captions = [cache.caption_key(key, seed=seed, step=step) for key in keys]
        if self.caption_dropout <= 0:
            return captions
        empty = self.text.role_key("empty")
        return [
            empty if caption_dropped(seed, key, step, self.caption_dropout) else caption
            for key, caption in zip(keys, captions, strict=True)
        ]

    def batch(
        self, batch: GlobalBatch, keys: Sequence[str], *, seed: int, step: int, epoch: int = 0
    ) -> tuple[torch.Tensor, list[PromptConditioning]]:
        """Latents and prompt conditioning (:meth:`caption_keys`) of ``keys`` at ``step`` of ``epoch``
        (latents encoded on demand use the epoch's crop when vae_cache_clear_each_epoch redraws it)."""
        captions = self.caption_keys(batch, keys, seed=seed, step=step)
        return self.latents[batch.dataset_id].latents(keys, epoch=epoch), self.text.conditioning(captions)

    def loss_masks(self, batch: GlobalBatch, keys: Sequence[str]) -> torch.Tensor | None:
        """The loss masks of ``keys`` (a rank's slice of ``batch``), or None when its dataset has none."""
        return self.latents[batch.dataset_id].loss_masks(keys)


def caption_dropped(seed: int, key: str, step: int, probability: float) -> bool:
    """Whether a sample trains on the empty prompt at ``step`` (a uniform draw below ``probability``)."""
    return sample_seed(seed, f"{key}#caption-dropout", step) / 2**63 < probability


def training_datasets(run: RunConfig) -> list[DatasetConfig]:
    """The datasets training draws from: enabled, ``dataset_type`` image (eval sets are held out)."""
    return [dataset for dataset in run.enabled_datasets if dataset.dataset_type == "image"]


def dataset_sampling(run: RunConfig) -> list[DatasetSampling]:
    """How the plan samples each training dataset: ``repeats``, ``is_regularisation_data`` and its
    ``start_step``/``end_step`` window."""
    return [
        DatasetSampling(
            dataset_id=dataset.id,
            repeats=dataset.repeats,
            is_regularisation=dataset.is_regularisation_data,
            oversubscribe=run.training.data.allow_dataset_oversubscription and not dataset.repeats,
            start_step=dataset.start_step,
            end_step=dataset.end_step,
        )
        for dataset in training_datasets(run)
    ]


def prunes_buckets(run: RunConfig) -> bool:
    """SimpleTuner's bucket pruning, on unless ``disable_bucket_pruning``."""
    return not run.training.data.disable_bucket_pruning


def open_training_data(run: RunConfig, *, device: torch.device | None = None) -> TrainingData:
    """The committed caches of a run's training datasets (``dataset_type`` image), ready to plan and read.

    Images left pending by the build are encoded on ``device`` (default: this process's accelerator).
    """
    encoder = WorkerEncoder(run, device=device)
    return TrainingData(
        latents={
            dataset.id: LatentCache(
                dataset.id,
                latent_cache_location(run, dataset),
                mask_dataset=dataset.conditioning_data,
                on_demand=on_demand_of(run, dataset, encoder),
            )
            for dataset in training_datasets(run)
        },
        text=TextCache(text_cache_location(run)),
        sampling=dataset_sampling(run),
        prune_buckets=prunes_buckets(run),
        caption_dropout=run.training.data.caption_dropout_probability,
    )


def on_demand_of(run: RunConfig, dataset: DatasetConfig, encoder: WorkerEncoder) -> OnDemand | None:
    """How the workers encode a dataset's pending latents; None when the build encodes them all."""
    if not encodes_on_workers(run, dataset):
        return None
    every_epoch = dataset.vae_cache_clear_each_epoch
    # Only a random crop differs from one epoch to the next; bucket and intermediary size stay the build's.
    redraw = every_epoch and dataset.crop and dataset.crop_style == "random"
    return OnDemand(
        encoder=encoder, every_epoch=every_epoch, crop_style="random" if redraw else None, seed=run.seed
    )


def eval_caches(run: RunConfig) -> dict[str, LatentCache]:
    """The committed latent caches of the ``dataset_type: eval`` datasets (held out of training)."""
    return {
        dataset.id: LatentCache(dataset.id, latent_cache_location(run, dataset))
        for dataset in run.enabled_datasets
        if dataset.dataset_type == "eval"
    }


def check_batches(run: RunConfig, *, workers: int | None = None) -> int:
    """Plan epoch 0 from the committed caches: every training dataset fills a global batch.

    The global batch is SimpleTuner's: ``train_batch_size`` x workers x
    ``gradient_accumulation_steps``, with ``workers`` as given, else ``ray_num_workers``, else
    ``num_processes``, else 1 (``raytuner cache`` alone does not know how many GPUs a run will use).
    Raises PlanError ("no images detected in dataset ...").
    Returns the number of global batches per epoch, every dataset's batches counted (with
    ``start_step``/``end_step`` an epoch may be shorter; SimpleTuner counts them all too when it
    turns ``num_train_epochs`` into steps).
    """
    training = run.training
    shape = BatchShape(
        per_worker=training.optimization.train_batch_size,
        workers=workers or training.ray.ray_num_workers or training.ray.num_processes or 1,
        accumulation=training.optimization.gradient_accumulation_steps,
    )
    return len(open_training_data(run).plan(shape, seed=run.seed, epoch=0))
