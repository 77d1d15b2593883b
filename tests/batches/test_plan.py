"""The seeded epoch plan: batch layout across workers and accumulation, pruning, repeats, resume."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from raytuner.batches.plan import (
    BatchShape,
    DatasetSampling,
    EpochPlan,
    PlanError,
    PlanSample,
    plan_epoch,
    sample_seed,
)
from raytuner.batches.reader import dataset_sampling
from raytuner.config import load_config
from tests.config.helpers import BASE_DATASETS, make_write_run


def _samples(dataset_id: str, sizes: dict[str, int]) -> list[PlanSample]:
    """``sizes[bucket]`` samples in each bucket, keyed ``dataset/bucket/index`` (unique across datasets)."""
    return [
        PlanSample(dataset_id=dataset_id, key=f"{dataset_id}/{bucket}/{index}", bucket=bucket)
        for bucket, count in sizes.items()
        for index in range(count)
    ]


def _plan(
    samples: list[PlanSample],
    datasets: list[DatasetSampling] | None = None,
    shape: BatchShape | None = None,
    *,
    seed: int = 7,
    epoch: int = 0,
    prune_buckets: bool = True,
) -> EpochPlan:
    return plan_epoch(
        samples,
        datasets or [DatasetSampling(dataset_id="images")],
        shape or BatchShape(per_worker=2, workers=2),
        seed=seed,
        epoch=epoch,
        prune_buckets=prune_buckets,
    )


UNEVEN = _samples("images", {"1024x1024": 5, "1216x832": 3, "832x1216": 17})


def test_the_plan_does_not_depend_on_the_order_of_the_samples() -> None:
    reordered = list(UNEVEN)
    random.Random(0).shuffle(reordered)
    assert _plan(reordered) == _plan(UNEVEN)
    assert _plan(list(reversed(UNEVEN))) == _plan(UNEVEN)


def test_one_worker_accumulating_and_two_workers_see_the_same_keys_each_step() -> None:
    accumulating = BatchShape(per_worker=2, workers=1, accumulation=2)
    parallel = BatchShape(per_worker=2, workers=2, accumulation=1)
    assert accumulating.global_size == parallel.global_size == 4
    plan_a = _plan(UNEVEN, shape=accumulating)
    plan_b = _plan(UNEVEN, shape=parallel)
    assert plan_a == plan_b
    for batch_a, batch_b in zip(plan_a.batches, plan_b.batches, strict=True):
        seen_a = [batch_a.slice_for(accumulating, rank=0, micro_step=m) for m in range(2)]
        seen_b = [batch_b.slice_for(parallel, rank=r) for r in range(2)]
        assert seen_a == seen_b
        assert [key for part in seen_a for key in part] == list(batch_a.keys)
        assert Counter(key for part in seen_b for key in part) == Counter(batch_b.keys)


@pytest.mark.parametrize(
    "shape",
    [
        BatchShape(per_worker=1, workers=4),
        BatchShape(per_worker=2, workers=2),
        BatchShape(per_worker=1, workers=2, accumulation=2),
    ],
)
def test_every_rank_takes_the_same_steps_of_per_worker_keys_from_one_bucket(shape: BatchShape) -> None:
    # Buckets of 5, 3 and 17 samples, global batch 4.
    plan = _plan(UNEVEN, shape=shape)
    where = {sample.key: (sample.dataset_id, sample.bucket) for sample in UNEVEN}
    steps = {rank: 0 for rank in range(shape.workers)}
    for batch in plan.batches:
        assert len(batch.keys) == shape.global_size
        assert {where[key] for key in batch.keys} == {(batch.dataset_id, batch.bucket)}
        for rank in range(shape.workers):
            for micro_step in range(shape.accumulation):
                assert len(batch.slice_for(shape, rank=rank, micro_step=micro_step)) == shape.per_worker
            steps[rank] += 1
    assert set(steps.values()) == {len(plan)}


def test_slice_for_refuses_a_rank_or_micro_step_outside_the_shape() -> None:
    shape = BatchShape(per_worker=2, workers=2)
    batch = _plan(UNEVEN, shape=shape).batches[0]
    with pytest.raises(ValueError, match="rank 2"):
        batch.slice_for(shape, rank=2)
    with pytest.raises(ValueError, match="micro-step 1"):
        batch.slice_for(shape, rank=0, micro_step=1)


def test_pruning_drops_buckets_smaller_than_one_global_batch() -> None:
    plan = _plan(UNEVEN)
    assert plan.pruned == ("images 1216x832 (3 samples)",)
    assert {batch.bucket for batch in plan.batches} == {"1024x1024", "832x1216"}
    # ceil(5 / 4) + ceil(17 / 4) = 2 + 5 batches
    assert len(plan) == 7


def test_without_pruning_a_small_bucket_is_filled_from_its_own_samples() -> None:
    plan = _plan(UNEVEN, prune_buckets=False)
    assert plan.pruned == ()
    small = [batch for batch in plan.batches if batch.bucket == "1216x832"]
    assert len(small) == 1
    assert len(small[0].keys) == 4
    assert set(small[0].keys) == {f"images/1216x832/{index}" for index in range(3)}
    assert len(plan) == 8


@pytest.mark.parametrize("prune_buckets", [True, False])
def test_no_sample_of_a_kept_bucket_is_missing_from_an_epoch(prune_buckets: bool) -> None:
    plan = _plan(UNEVEN, prune_buckets=prune_buckets)
    kept = {batch.bucket for batch in plan.batches}
    seen = Counter(key for batch in plan.batches for key in batch.keys)
    for sample in UNEVEN:
        if sample.bucket in kept:
            assert seen[sample.key] >= 1, sample.key
    assert set(seen) <= {sample.key for sample in UNEVEN}


@pytest.mark.parametrize("repeats", [0, 1, 3])
def test_repeats_show_each_sample_one_plus_repeats_times(repeats: int) -> None:
    # 8 samples x (1 + repeats) is a whole number of global batches of 4: nothing is padded.
    samples = _samples("images", {"1024x1024": 4, "832x1216": 4})
    plan = _plan(samples, [DatasetSampling(dataset_id="images", repeats=repeats)])
    seen = Counter(key for batch in plan.batches for key in batch.keys)
    assert seen == {sample.key: 1 + repeats for sample in samples}
    assert len(plan) == 2 * (1 + repeats)


def test_regularisation_is_marked_on_that_datasets_batches_only() -> None:
    samples = _samples("subject", {"1024x1024": 8}) + _samples("reg", {"1024x1024": 4, "832x1216": 4})
    datasets = [
        DatasetSampling(dataset_id="subject"),
        DatasetSampling(dataset_id="reg", is_regularisation=True),
    ]
    plan = _plan(samples, datasets)
    assert {batch.dataset_id for batch in plan.batches} == {"subject", "reg"}
    for batch in plan.batches:
        assert batch.is_regularisation == (batch.dataset_id == "reg")
        assert all(key.startswith(f"{batch.dataset_id}/") for key in batch.keys)


def test_a_dataset_too_small_for_one_global_batch_is_an_error_naming_it() -> None:
    samples = _samples("images", {"1024x1024": 8}) + _samples("tiny", {"1024x1024": 3})
    datasets = [DatasetSampling(dataset_id="images"), DatasetSampling(dataset_id="tiny")]
    with pytest.raises(PlanError) as caught:
        _plan(samples, datasets)
    message = str(caught.value)
    assert message.startswith("no images detected in dataset 'tiny'")
    assert "repeats" in message
    # the fix the message names works: 3 x (1 + 1) = 6 entries hold a global batch of 4
    fixed = [DatasetSampling(dataset_id="images"), DatasetSampling(dataset_id="tiny", repeats=1)]
    assert any(batch.dataset_id == "tiny" for batch in _plan(samples, fixed).batches)


def test_a_dataset_whose_buckets_are_all_pruned_is_an_error() -> None:
    # 6 samples, but no bucket holds a global batch of 4 on its own.
    samples = _samples("images", {"1024x1024": 2, "1216x832": 2, "832x1216": 2})
    with pytest.raises(PlanError, match=r"^no images detected in dataset 'images'"):
        _plan(samples)
    assert len(_plan(samples, prune_buckets=False)) == 3


def test_a_dataset_with_no_samples_at_all_is_an_error() -> None:
    datasets = [DatasetSampling(dataset_id="images"), DatasetSampling(dataset_id="empty")]
    with pytest.raises(PlanError, match=r"^no images detected in dataset 'empty'"):
        _plan(UNEVEN, datasets)


def test_each_epoch_is_shuffled_differently_and_reproducibly() -> None:
    first = _plan(UNEVEN, epoch=0)
    assert _plan(UNEVEN, epoch=0) == first
    assert _plan(UNEVEN, epoch=1).batches != first.batches
    assert _plan(UNEVEN, epoch=0, seed=8).batches != first.batches
    assert _plan(UNEVEN, epoch=1).epoch == 1


def test_from_position_is_the_tail_still_to_run() -> None:
    plan = _plan(UNEVEN)
    assert plan.from_position(0) == plan.batches
    assert plan.from_position(3) == plan.batches[3:]
    assert len(plan.from_position(3)) == len(plan) - 3
    assert plan.from_position(len(plan)) == ()


def test_sample_seed_depends_on_seed_key_and_step_only() -> None:
    base = sample_seed(7, "images/a.png", 10)
    assert sample_seed(7, "images/a.png", 10) == base
    assert 0 <= base < 2**63
    assert sample_seed(8, "images/a.png", 10) != base
    assert sample_seed(7, "images/b.png", 10) != base
    assert sample_seed(7, "images/a.png", 11) != base


def test_oversubscription_repeats_only_the_buckets_too_small_for_a_global_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 25 images in one bucket and 3 in another; 8 workers x 4 = a global batch of 32 (DATALOADER.md).
    samples = _samples("images", {"1024x1024": 25, "832x1216": 3})
    shape = BatchShape(per_worker=4, workers=8)
    with pytest.raises(PlanError) as refused:
        _plan(samples, shape=shape)
    assert '"allow_dataset_oversubscription": true' in str(refused.value)
    plan = _plan(samples, [DatasetSampling(dataset_id="images", oversubscribe=True)], shape)
    # ceil(32 / 25) = 2 copies (repeats 1) and ceil(32 / 3) = 11 copies (repeats 10); nothing pruned.
    assert plan.oversubscribed == (
        "images 1024x1024: 25 samples, repeats 1",
        "images 832x1216: 3 samples, repeats 10",
    )
    assert plan.pruned == ()
    seen = Counter(key for batch in plan.batches for key in batch.keys)
    for bucket, copies in (("1024x1024", 2), ("832x1216", 11)):
        counts = [seen[s.key] for s in samples if s.bucket == bucket]
        assert min(counts) >= copies and sum(counts) == 64  # each padded to two global batches
    assert len(plan) == 4


def test_oversubscription_leaves_buckets_that_fill_a_batch_alone() -> None:
    oversubscribed = _plan(UNEVEN, [DatasetSampling(dataset_id="images", oversubscribe=True)])
    plain = _plan(UNEVEN, prune_buckets=False)
    # Only the 3-sample bucket changes: 2 copies (6 entries) instead of being pruned.
    assert oversubscribed.oversubscribed == ("images 1216x832: 3 samples, repeats 1",)
    assert Counter(b for b in oversubscribed.batches if b.bucket != "1216x832") == Counter(
        b for b in plain.batches if b.bucket != "1216x832"
    )
    assert len([b for b in oversubscribed.batches if b.bucket == "1216x832"]) == 2


def test_without_oversubscription_the_error_names_the_key_and_that_it_never_overrides_repeats() -> None:
    samples = _samples("images", {"1024x1024": 1})
    with pytest.raises(PlanError) as caught:
        _plan(samples, [DatasetSampling(dataset_id="images", repeats=1)])
    assert str(caught.value).endswith(
        'remove this dataset\'s "repeats" (1) and set "allow_dataset_oversubscription": true to repeat its '
        "images as needed"
    )


def test_allow_dataset_oversubscription_raises_the_repeats_of_datasets_that_set_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = make_write_run(tmp_path, monkeypatch)
    datasets = [
        {**BASE_DATASETS[0], "id": "few"},
        {**BASE_DATASETS[0], "id": "fixed", "repeats": 1},
        *BASE_DATASETS[1:],
    ]
    run = load_config(write(datasets=datasets, config_updates={"allow_dataset_oversubscription": True}))
    assert [(s.dataset_id, s.oversubscribe) for s in dataset_sampling(run)] == [
        ("few", True),
        ("fixed", False),
    ]
    default = load_config(write(datasets=datasets))
    assert not any(s.oversubscribe for s in dataset_sampling(default))
    samples = _samples("few", {"1024x1024": 3}) + _samples("fixed", {"1024x1024": 4})
    shape = BatchShape(per_worker=2, workers=2)
    with pytest.raises(
        PlanError, match=r"^no images detected in dataset 'few'.*allow_dataset_oversubscription"
    ):
        plan_epoch(samples, dataset_sampling(default), shape, seed=1, epoch=0)
    plan = plan_epoch(samples, dataset_sampling(run), shape, seed=1, epoch=0)
    assert plan.oversubscribed == ("few 1024x1024: 3 samples, repeats 1",)
    assert Counter(batch.dataset_id for batch in plan.batches) == {"few": 2, "fixed": 2}
