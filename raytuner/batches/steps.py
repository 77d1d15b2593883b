"""Which epoch and which batch of its plan each optimizer step trains on.

Without a dataset schedule every epoch plan has the same length, so step ``s`` is batch
``s % length`` of epoch ``s // length``. With ``start_step`` / ``end_step`` an epoch's length
depends on the step it starts at, so the epochs are walked from the first: the plans are pure
functions of (epoch, steps before it), so a resumed run walks to the same batches as the run it
resumes.
"""

from __future__ import annotations

from collections.abc import Callable

from raytuner.batches.plan import EpochPlan, GlobalBatch, PlanError

# (epoch, steps trained before it) -> the epoch's plan.
PlanMaker = Callable[[int, int], EpochPlan]


class StepPlans:
    """The batch of every step (0-based: the number of steps trained before it), one plan kept."""

    def __init__(self, make_plan: PlanMaker, *, scheduled: bool) -> None:
        self._make = make_plan
        self._scheduled = scheduled
        self._starts = [0]  # the first step of each epoch walked so far
        self._plan: EpochPlan | None = None
        self._unscheduled_length: int | None = None

    def _epoch_plan(self, epoch: int) -> EpochPlan:
        # Unscheduled epochs all have the first epoch's length (and ignore their first step).
        length = None if self._scheduled else self._length()
        if self._plan is None or self._plan.epoch != epoch:
            first = self._starts[epoch] if length is None else epoch * length
            plan = self._make(epoch, first)
            if not plan.batches:
                raise PlanError(
                    f"no training dataset is active at step {first + 1} "
                    "(start_step/end_step); set them so that every step of the run has a dataset"
                )
            self._plan = plan
        return self._plan

    def _length(self) -> int:
        """The length of every unscheduled epoch."""
        if self._unscheduled_length is None:
            first = self._make(0, 0)
            self._unscheduled_length = len(first)
            self._plan = self._plan or first  # kept: most runs start in epoch 0
        return self._unscheduled_length

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, index of the batch in that epoch's plan) of ``step``."""
        if not self._scheduled:
            return divmod(step, self._length())
        epoch = max(i for i, start in enumerate(self._starts) if start <= step)
        while True:
            plan = self._epoch_plan(epoch)
            end = self._starts[epoch] + len(plan)
            if step < end:
                return epoch, step - self._starts[epoch]
            if epoch + 1 == len(self._starts):
                self._starts.append(end)
            epoch += 1

    def batch(self, step: int) -> GlobalBatch:
        epoch, index = self.locate(step)
        return self._epoch_plan(epoch).batches[index]

    def epoch_of(self, step: int) -> int:
        return self.locate(step)[0]
