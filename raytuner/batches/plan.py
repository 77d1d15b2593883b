"""The seeded epoch plan: which samples make up each global batch, in which order.

Plain Python, no Ray. The plan is a pure function of the cache's row keys and buckets, the
datasets' sampling settings, the batch shape and the seed, so

* every Ray Train rank computes the same plan and reads its own slice of every global batch:
  every rank takes the same number of steps, whatever the bucket sizes (no DDP hang);
* a 1-worker and a 2-worker run with the same global batch (``train_batch_size`` x workers x
  ``gradient_accumulation_steps``, SimpleTuner's definition) see the same samples in the same
  optimizer steps;
* a checkpoint's data position is just the step (:mod:`raytuner.batches.steps` finds its epoch
  and batch).

Each global batch comes from one bucket of one dataset, as in SimpleTuner's aspect sampler.
A dataset with ``start_step`` / ``end_step`` is drawn only at the steps of its window: an epoch's
batches are taken in their shuffled order, each step the first one of a dataset active at that
step, and the epoch ends when no active dataset has batches left (SimpleTuner ends an epoch when
its active datasets are exhausted), so epoch lengths then depend on the step an epoch starts at.
Per-sample noise and sigma are drawn from a generator seeded by (seed, sample key, step)
(:func:`sample_seed`), never by rank, so they too are the same however the batch is split.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from raytuner.config.schedule import StepWindow
from raytuner.errors import RaytunerError


class PlanError(RaytunerError, ValueError):
    """A dataset too small to make a single global batch; the message names it and the fix."""


@dataclass(frozen=True, kw_only=True)
class PlanSample:
    """One file of a dataset as the plan sees it; byte-identical files are samples of their own."""

    dataset_id: str
    key: str
    bucket: str


@dataclass(frozen=True, kw_only=True)
class DatasetSampling:
    """How often a dataset's samples are drawn per epoch and how its rows count in the loss."""

    dataset_id: str
    repeats: int = 0  # SimpleTuner: each sample is seen 1 + repeats times per epoch
    is_regularisation: bool = False
    # allow_dataset_oversubscription, for a dataset whose repeats the user left at 0: a bucket
    # smaller than one global batch gets the repeats that fill one instead of being left out.
    oversubscribe: bool = False
    start_step: int = 0  # drawn at 1-based optimizer steps start_step..end_step (inclusive)
    end_step: int = 0  # 0: no end

    @property
    def window(self) -> StepWindow:
        return StepWindow.of(self.dataset_id, self.start_step, self.end_step)


@dataclass(frozen=True, kw_only=True)
class BatchShape:
    """SimpleTuner's batch: ``train_batch_size`` per worker and per accumulation micro-step."""

    per_worker: int
    workers: int = 1
    accumulation: int = 1

    @property
    def global_size(self) -> int:
        return self.per_worker * self.workers * self.accumulation


@dataclass(frozen=True, kw_only=True)
class GlobalBatch:
    """The samples of one optimizer step, all from one bucket of one dataset."""

    dataset_id: str
    bucket: str
    keys: tuple[str, ...]
    is_regularisation: bool

    def slice_for(self, shape: BatchShape, *, rank: int, micro_step: int = 0) -> tuple[str, ...]:
        """The ``train_batch_size`` keys that ``rank`` trains on at accumulation ``micro_step``.

        Keys are laid out micro-step major, then rank: a 1-worker run with 2 accumulation steps
        and a 2-worker run with none see the same keys in the same optimizer step.
        """
        return self.keys[self._positions(shape, rank, micro_step)]

    def seeds_for(
        self, shape: BatchShape, *, rank: int, micro_step: int = 0, seed: int, step: int
    ) -> tuple[int, ...]:
        """The noise-and-sigma seed of each key of :meth:`slice_for`, from (seed, key, step).

        A key that appears twice in one global batch (repeats, or a bucket filled by cycling)
        gets its occurrence number mixed in, so the copies are not noised identically; the
        numbering runs over the whole global batch, so it does not depend on how it is split.
        """
        seen: dict[str, int] = {}
        seeds = []
        for key in self.keys:
            occurrence = seen.get(key, 0)
            seen[key] = occurrence + 1
            seeds.append(sample_seed(seed, key if occurrence == 0 else f"{key}#{occurrence}", step))
        return tuple(seeds[self._positions(shape, rank, micro_step)])

    def _positions(self, shape: BatchShape, rank: int, micro_step: int) -> slice:
        if len(self.keys) != shape.global_size:
            raise ValueError(f"a global batch of {len(self.keys)} keys does not fit {shape}")
        if not 0 <= rank < shape.workers or not 0 <= micro_step < shape.accumulation:
            raise ValueError(f"rank {rank} / micro-step {micro_step} outside {shape}")
        start = (micro_step * shape.workers + rank) * shape.per_worker
        return slice(start, start + shape.per_worker)


@dataclass(frozen=True, kw_only=True)
class EpochPlan:
    epoch: int
    batches: tuple[GlobalBatch, ...]
    pruned: tuple[str, ...] = ()  # "dataset bucket (n samples)" for each bucket left out
    # "dataset bucket: n samples, repeats r" for each bucket whose repeats oversubscription raised
    oversubscribed: tuple[str, ...] = ()
    first_step: int | None = None  # steps trained before this epoch, when a schedule applies

    def __len__(self) -> int:
        return len(self.batches)

    def from_position(self, batch_index: int) -> tuple[GlobalBatch, ...]:
        """The batches still to run when resuming at ``batch_index`` of this epoch."""
        return self.batches[batch_index:]


def _rng(seed: int, *words: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(str(word) for word in (seed, *words)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def sample_seed(seed: int, key: str, step: int) -> int:
    """The seed of the generator for one sample's noise and sigma at one step (rank-independent)."""
    digest = hashlib.sha256(f"{seed}:{key}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def too_small_message(dataset_id: str, available: int, shape: BatchShape, *, repeats: int = 0) -> str:
    return (
        f"no images detected in dataset '{dataset_id}': {available} sample(s) per epoch after bucketing, "
        f"fewer than one global batch of {shape.global_size} (train_batch_size {shape.per_worker} x "
        f"{shape.workers} worker(s) x gradient_accumulation_steps {shape.accumulation}); "
        f'raise "repeats" for this dataset, add images, lower train_batch_size, or '
        + _oversubscription_fix(repeats)
    )


def _oversubscription_fix(repeats: int) -> str:
    """The fix naming allow_dataset_oversubscription (which, as in SimpleTuner, never overrides repeats)."""
    if repeats:
        return (
            f'remove this dataset\'s "repeats" ({repeats}) and set "allow_dataset_oversubscription": true '
            "to repeat its images as needed"
        )
    return 'set "allow_dataset_oversubscription": true to repeat its images as needed'


def plan_epoch(
    samples: Iterable[PlanSample],
    datasets: Sequence[DatasetSampling],
    shape: BatchShape,
    *,
    seed: int,
    epoch: int,
    prune_buckets: bool = True,
    first_step: int | None = None,
) -> EpochPlan:
    """The global batches of ``epoch``, shuffled from ``seed``.

    ``first_step`` is the number of steps trained before the epoch: given, each dataset is drawn
    only inside its ``start_step``/``end_step`` window (:func:`schedule_batches`); None plans every
    dataset's batches, the epoch length SimpleTuner counts when it turns epochs into steps.

    In each dataset every sample appears ``1 + repeats`` times. A bucket with fewer entries than
    one global batch is left out when ``prune_buckets`` (SimpleTuner's bucket pruning) and
    otherwise filled by cycling through its own shuffled samples; the last, partial batch of a
    larger bucket is filled the same way, so no sample is dropped from an epoch. A dataset left
    with no full batch is a :class:`PlanError`.

    SimpleTuner prunes buckets smaller than ``train_batch_size`` (only when a minimum image size is
    set) and then aborts on any bucket smaller than the whole effective batch; raytuner prunes
    against the global batch directly, so a bucket too small for a multi-worker run is left out
    with a warning instead of stopping the run.
    """
    by_bucket: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for sample in samples:
        by_bucket[sample.dataset_id][sample.bucket].append(sample.key)
    batches: list[GlobalBatch] = []
    pruned: list[str] = []
    oversubscribed: list[str] = []
    for sampling in datasets:
        buckets = by_bucket.get(sampling.dataset_id, {})
        copies = 1 + sampling.repeats
        available = sum(len(keys) for keys in buckets.values()) * copies
        kept = 0
        for bucket in sorted(buckets):
            # Sorted first, so the plan never depends on the order rows were written in.
            entries = sorted(buckets[bucket]) * copies
            if len(entries) < shape.global_size and sampling.oversubscribe:
                # SimpleTuner pads only the undersized buckets: ceil(global batch / samples) copies.
                bucket_copies = -(-shape.global_size // len(buckets[bucket]))
                entries = sorted(buckets[bucket]) * bucket_copies
                oversubscribed.append(
                    f"{sampling.dataset_id} {bucket}: {len(buckets[bucket])} samples, repeats {bucket_copies - 1}"
                )
            if len(entries) < shape.global_size and prune_buckets:
                pruned.append(f"{sampling.dataset_id} {bucket} ({len(entries)} samples)")
                continue
            order = _rng(seed, epoch, sampling.dataset_id, bucket).permutation(len(entries))
            shuffled = [entries[i] for i in order]
            batch_count = -(-len(shuffled) // shape.global_size)
            needed = batch_count * shape.global_size
            filled = [shuffled[i % len(shuffled)] for i in range(needed)]
            for start in range(0, needed, shape.global_size):
                batches.append(
                    GlobalBatch(
                        dataset_id=sampling.dataset_id,
                        bucket=bucket,
                        keys=tuple(filled[start : start + shape.global_size]),
                        is_regularisation=sampling.is_regularisation,
                    )
                )
            kept += len(entries)
        if kept == 0:
            if available >= shape.global_size:
                raise PlanError(
                    f"no images detected in dataset '{sampling.dataset_id}': its {available} sample(s) per epoch "
                    f"are spread over {len(buckets)} aspect bucket(s), none of which fills one global batch of "
                    f'{shape.global_size}; raise "repeats", add images of those sizes, set '
                    '"disable_bucket_pruning": true to fill batches by repeating images, or '
                    + _oversubscription_fix(sampling.repeats)
                )
            raise PlanError(
                too_small_message(sampling.dataset_id, available, shape, repeats=sampling.repeats)
            )
    # Interleave datasets and buckets: a dataset with more batches is drawn proportionally more often.
    order = _rng(seed, epoch, "batches").permutation(len(batches))
    shuffled = [batches[i] for i in order]
    if first_step is not None and any(sampling.window.scheduled for sampling in datasets):
        windows = {sampling.dataset_id: sampling.window for sampling in datasets}
        shuffled = schedule_batches(shuffled, windows, first_step=first_step)
    return EpochPlan(
        epoch=epoch,
        batches=tuple(shuffled),
        pruned=tuple(pruned),
        oversubscribed=tuple(oversubscribed),
        first_step=first_step,
    )


def schedule_batches(
    shuffled: Sequence[GlobalBatch], windows: dict[str, StepWindow], *, first_step: int
) -> list[GlobalBatch]:
    """The batches an epoch starting after ``first_step`` steps trains on, in step order.

    Step ``first_step + 1 + i`` takes the earliest remaining batch (in shuffled order) of a dataset
    active at that step; the epoch ends at the first step with none left. Batches of a dataset
    that has not started, or has ended, are not drawn this epoch.
    """
    queues: dict[str, deque[tuple[int, GlobalBatch]]] = defaultdict(deque)
    for position, batch in enumerate(shuffled):
        queues[batch.dataset_id].append((position, batch))
    chosen: list[GlobalBatch] = []
    step = first_step + 1
    while True:
        heads = [
            queue[0] for dataset_id, queue in queues.items() if queue and windows[dataset_id].active_at(step)
        ]
        if not heads:
            return chosen
        _, batch = min(heads, key=lambda head: head[0])
        queues[batch.dataset_id].popleft()
        chosen.append(batch)
        step += 1


def sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, for :meth:`raytuner.models.base.ModelFamily.training_loss`."""
    return [torch.Generator().manual_seed(seed) for seed in seeds]
