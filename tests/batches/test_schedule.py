"""Dataset schedules: ``start_step`` / ``end_step`` in the plan, across epochs and on resume, and
their config checks (SimpleTuner's inclusive 1-based optimizer steps)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from raytuner.batches.plan import BatchShape, DatasetSampling, EpochPlan, PlanSample, plan_epoch
from raytuner.batches.reader import dataset_sampling
from raytuner.batches.steps import StepPlans
from raytuner.config import ConfigError, load_config
from raytuner.config.schedule import StepWindow, first_idle_step
from raytuner.train.preflight import datasets_never_drawn, datasets_schedule_problem
from tests.config.helpers import BASE_DATASETS, make_write_run

SHAPE = BatchShape(per_worker=2)


def _samples(dataset_id: str, count: int) -> list[PlanSample]:
    return [
        PlanSample(dataset_id=dataset_id, key=f"{dataset_id}/{i}", bucket="1024x1024") for i in range(count)
    ]


# 8 batches of "low" and 6 of "high" per epoch when both are drawn.
SAMPLES = _samples("low", 16) + _samples("high", 12)


def _steps(sampling: list[DatasetSampling]) -> StepPlans:
    def make(epoch: int, first_step: int) -> EpochPlan:
        return plan_epoch(SAMPLES, sampling, SHAPE, seed=3, epoch=epoch, first_step=first_step)

    return StepPlans(make, scheduled=any(s.window.scheduled for s in sampling))


def _datasets(steps: StepPlans, count: int, start: int = 0) -> list[str]:
    """The dataset of each 0-based step ``start..count-1`` (step s is optimizer step s + 1)."""
    return [steps.batch(step).dataset_id for step in range(start, count)]


def test_without_a_schedule_the_plan_is_unchanged() -> None:
    plain = [DatasetSampling(dataset_id="low"), DatasetSampling(dataset_id="high")]
    unscheduled = plan_epoch(SAMPLES, plain, SHAPE, seed=3, epoch=0)
    assert plan_epoch(SAMPLES, plain, SHAPE, seed=3, epoch=0, first_step=40).batches == unscheduled.batches
    steps = _steps(plain)
    assert [steps.batch(s) for s in range(14)] == list(unscheduled.batches)
    assert steps.locate(14) == (1, 0) and steps.locate(29) == (2, 1)
    second = plan_epoch(SAMPLES, plain, SHAPE, seed=3, epoch=1)
    assert [steps.batch(s) for s in range(14, 28)] == list(second.batches)
    assert _steps(plain).batch(29) == plan_epoch(SAMPLES, plain, SHAPE, seed=3, epoch=2).batches[1]


def test_end_and_start_steps_are_inclusive_one_based_optimizer_steps() -> None:
    # DATALOADER.md's curriculum: "low" for steps 1-5 (end_step 5), "high" from step 5 on.
    sampling = [
        DatasetSampling(dataset_id="low", end_step=5),
        DatasetSampling(dataset_id="high", start_step=5),
    ]
    steps = _steps(sampling)
    drawn = _datasets(steps, 40)
    assert set(drawn[:4]) == {"low"}  # optimizer steps 1-4: only "low" is active
    assert set(drawn[5:]) == {"high"}  # optimizer steps 6 on: only "high"
    # Step 5 has both active; the first epoch (8 low + 6 high batches) runs until the active
    # datasets are spent: its 6 "high" batches, then the next epoch starts.
    assert steps.epoch_of(0) == 0
    first_epoch = [s for s in range(40) if steps.epoch_of(s) == 0]
    assert Counter(drawn[s] for s in first_epoch)["high"] == 6
    # Later epochs hold only "high": 6 steps each.
    assert [steps.epoch_of(s) for s in range(len(first_epoch), len(first_epoch) + 12)] == [1] * 6 + [2] * 6


def test_a_dataset_that_starts_later_ends_the_early_epochs_without_it() -> None:
    sampling = [DatasetSampling(dataset_id="low"), DatasetSampling(dataset_id="high", start_step=20)]
    steps = _steps(sampling)
    drawn = _datasets(steps, 40)
    assert set(drawn[:19]) == {"low"}
    # Epochs 0 and 1 hold "low"'s 8 batches only; epoch 2 starts at optimizer step 17 with "low",
    # and from optimizer step 20 on draws both.
    assert [steps.epoch_of(s) for s in (0, 7, 8, 15, 16)] == [0, 0, 1, 1, 2]
    assert "high" in drawn[19:30] and "low" in drawn[19:30]
    for step in range(19, 40):
        batch = steps.batch(step)
        assert all(key.startswith(f"{batch.dataset_id}/") for key in batch.keys)


def test_a_resumed_walk_reads_the_same_batches_as_the_uninterrupted_one() -> None:
    sampling = [
        DatasetSampling(dataset_id="low", end_step=11),
        DatasetSampling(dataset_id="high", start_step=7),
    ]
    uninterrupted = _steps(sampling)
    whole = [uninterrupted.batch(step) for step in range(60)]
    for resume_at in (5, 13, 31):
        resumed = _steps(sampling)  # a fresh worker: only the step is known
        assert [resumed.batch(step) for step in range(resume_at, 60)] == whole[resume_at:]


def test_every_sample_of_an_active_dataset_is_drawn_once_per_full_epoch() -> None:
    sampling = [DatasetSampling(dataset_id="low", start_step=3), DatasetSampling(dataset_id="high")]
    plan = plan_epoch(SAMPLES, sampling, SHAPE, seed=3, epoch=4, first_step=100)
    assert Counter(key for batch in plan.batches for key in batch.keys) == {s.key: 1 for s in SAMPLES}


@pytest.mark.parametrize(
    ("windows", "last_step", "idle"),
    [
        ([(0, 0)], None, None),
        ([(0, 300), (300, 0)], 1000, None),
        ([(0, 300), (301, 0)], 1000, None),
        ([(0, 300), (302, 0)], None, 301),
        ([(5, 0)], None, 1),
        ([(2, 0), (0, 1)], None, None),
        ([(0, 100)], None, None),  # the run's length decides: checked again with it
        ([(0, 100)], 100, None),
        ([(0, 100)], 101, 101),
        ([(0, 100), (50, 120)], 200, 121),
    ],
)
def test_first_idle_step(windows: list[tuple[int, int]], last_step: int | None, idle: int | None) -> None:
    given = [StepWindow.of(f"d{i}", start, end) for i, (start, end) in enumerate(windows)]
    assert first_idle_step(given, last_step) == idle


def _datasets_with(*entries: dict[str, object]) -> list[dict[str, object]]:
    return [
        {**BASE_DATASETS[0], "id": f"images{i}", **entry} for i, entry in enumerate(entries)
    ] + BASE_DATASETS[1:]


def test_config_reads_the_schedule_and_refuses_bad_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = make_write_run(tmp_path, monkeypatch)
    run = load_config(write(datasets=_datasets_with({"end_step": "300"}, {"start_step": 300})))
    assert [(d.start_step, d.end_step) for d in run.datasets[:2]] == [(0, 300), (300, 0)]
    # The plan reads them as 1-based inclusive windows: "low" steps 1-300, "high" from step 300 on.
    assert [s.window for s in dataset_sampling(run)] == [
        StepWindow(dataset_id="images0", start=1, end=300),
        StepWindow(dataset_id="images1", start=300, end=None),
    ]
    with pytest.raises(ConfigError) as caught:
        load_config(write(datasets=_datasets_with({"start_step": -1, "end_step": 1.5})))
    assert len(caught.value.problems) == 2
    assert caught.value.problems[0].startswith("multidatabackend.json: dataset 'images0': 'start_step' = -1")
    assert "'end_step' = 1.5" in caught.value.problems[1]
    with pytest.raises(ConfigError) as backwards:
        load_config(write(datasets=_datasets_with({"start_step": 300, "end_step": 200}, {})))
    assert list(backwards.value.problems) == [
        "multidatabackend.json: dataset 'images0': 'end_step' = 200: expected a step at or after start_step "
        "(300); both ends are inclusive; raise end_step, lower start_step, or set end_step 0 for no end"
    ]


def test_a_step_without_an_active_dataset_is_refused_at_load_and_against_the_runs_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write = make_write_run(tmp_path, monkeypatch)
    with pytest.raises(ConfigError) as late:
        load_config(write(datasets=_datasets_with({"start_step": 10})))
    assert list(late.value.problems) == [
        "multidatabackend.json: no training dataset is active at step 1 (start_step/end_step: 'images0' "
        "steps 10-); set start_step/end_step so that every step has a dataset"
    ]
    with pytest.raises(ConfigError, match="no training dataset is active at step 101 "):
        load_config(write(datasets=_datasets_with({"end_step": 100}, {"start_step": 200})))
    # Ending before the run does: found with max_train_steps (pre-flight) or the planned steps.
    run = load_config(write(datasets=_datasets_with({"end_step": 100})))
    assert datasets_schedule_problem(run, last_step=100) is None
    assert datasets_schedule_problem(run, last_step=150) == (
        "multidatabackend.json: no training dataset is active at step 101 of 150 (start_step/end_step: "
        "'images0' steps 1-100); set start_step/end_step so that every step has a dataset, or set "
        "max_train_steps to 100"
    )
    # A dataset that starts after the run's last step is trained on never: a warning, as in SimpleTuner.
    late = load_config(write(datasets=_datasets_with({}, {"start_step": 500})))
    assert datasets_never_drawn(late, last_step=100) == [
        "multidatabackend.json: dataset 'images1' starts at step 500 (start_step), after the run's last "
        "step 100: it is never trained on; lower start_step or train longer"
    ]
    assert datasets_never_drawn(late, last_step=500) == []
