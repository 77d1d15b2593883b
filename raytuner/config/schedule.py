"""Dataset schedules (``start_step`` / ``end_step``): when each training dataset may be drawn.

SimpleTuner counts optimizer steps from 1 (the step about to be taken) and draws a dataset at
step ``s`` when ``s >= start_step`` and, if ``end_step`` is set, ``s <= end_step``: both ends are
inclusive, ``start_step`` 0 and 1 both mean "from the first step", and ``end_step`` 0 means no end.
Only training image datasets are scheduled (eval sets are held out, as in SimpleTuner). A step at
which no training dataset is active has nothing to train on, so it is refused before any work.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from raytuner.config.fields import problem

if TYPE_CHECKING:  # datasets.py calls this module's checks
    from raytuner.config.datasets import DatasetConfig


@dataclass(frozen=True, kw_only=True)
class StepWindow:
    """The 1-based optimizer steps at which one dataset may be drawn; ``end`` None: no end."""

    dataset_id: str
    start: int = 1
    end: int | None = None

    @classmethod
    def of(cls, dataset_id: str, start_step: int, end_step: int | None) -> StepWindow:
        # SimpleTuner reads start_step 0 as step 1 and end_step 0 as "no end".
        return cls(dataset_id=dataset_id, start=max(start_step, 1), end=end_step or None)

    def active_at(self, step: int) -> bool:
        return self.start <= step and (self.end is None or step <= self.end)

    @property
    def scheduled(self) -> bool:
        return self.start > 1 or self.end is not None

    def describe(self) -> str:
        return f"'{self.dataset_id}' steps {self.start}-{'' if self.end is None else self.end}"


def window(dataset: DatasetConfig) -> StepWindow:
    return StepWindow.of(dataset.id, dataset.start_step, dataset.end_step)


def check_dataset_window(dataset: DatasetConfig, *, label: str, problems: list[str]) -> None:
    """``end_step`` before ``start_step`` would never draw the dataset (SimpleTuner refuses it too)."""
    if dataset.end_step and dataset.end_step < dataset.start_step:
        problems.append(
            problem(
                label,
                "end_step",
                dataset.end_step,
                f"a step at or after start_step ({dataset.start_step}); both ends are inclusive",
                "raise end_step, lower start_step, or set end_step 0 for no end",
            )
        )


def first_idle_step(windows: Sequence[StepWindow], last_step: int | None) -> int | None:
    """The first step in ``1..last_step`` at which no window is active, or None.

    With ``last_step`` None (the run's length is not known yet) only steps before a later
    dataset's start count: a gap that the schedule itself says training runs through.
    """
    step = 1
    for each in sorted(windows, key=lambda w: w.start):
        if each.start > step:
            return step if last_step is None or step <= last_step else None
        if each.end is None:
            return None
        step = max(step, each.end + 1)
    if last_step is None:
        return None
    return step if step <= last_step else None


def training_windows(datasets: Sequence[DatasetConfig]) -> list[StepWindow]:
    """The schedule of every enabled training (``dataset_type`` image) dataset."""
    return [window(d) for d in datasets if d.enabled and d.dataset_type == "image"]


def schedule_problem(datasets: Sequence[DatasetConfig], *, where: str, last_step: int | None) -> str | None:
    """One line when some step of the run (``1..last_step``) has no active training dataset."""
    windows = training_windows(datasets)
    if not any(each.scheduled for each in windows):
        return None
    idle = first_idle_step(windows, last_step)
    if idle is None:
        return None
    shown = ", ".join(each.describe() for each in windows)
    length = f" of {last_step}" if last_step is not None else ""
    return (
        f"{where}: no training dataset is active at step {idle}{length} (start_step/end_step: {shown}); "
        "set start_step/end_step so that every step has a dataset"
        + (f", or set max_train_steps to {idle - 1}" if idle > 1 else "")
    )


def never_drawn(datasets: Sequence[DatasetConfig], *, where: str, last_step: int) -> list[str]:
    """A warning for each training dataset whose window starts after the run's last step
    (SimpleTuner warns the same: "It will never sample")."""
    return [
        f"{where}: dataset '{each.dataset_id}' starts at step {each.start} (start_step), after the run's "
        f"last step {last_step}: it is never trained on; lower start_step or train longer"
        for each in training_windows(datasets)
        if each.start > last_step
    ]
