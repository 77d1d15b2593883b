"""ASHA's rungs survive an interrupted sweep (Ray Tune restores the searcher, not the scheduler)."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from raytuner.tune.early_stopping import ResumableASHA, stopped_trials

OPTIONS = {
    "time_attr": "step",
    "metric": "eval_loss",
    "mode": "min",
    "max_t": 6,
    "grace_period": 2,
    "reduction_factor": 2,
    "stop_last_trials": False,
}


@dataclass(frozen=True)
class Trial:
    """What ASHA reads of a Tune trial: its id."""

    trial_id: str


def run_first_trial(scheduler: ASHAScheduler) -> None:
    first = Trial("first")
    scheduler.on_trial_add(None, first)
    for step, loss in ((1, 1.2), (2, 1.0), (3, 0.9), (4, 0.8), (5, 0.7), (6, 0.6)):
        assert (
            scheduler.on_trial_result(None, first, {"step": step, "eval_loss": loss})
            == TrialScheduler.CONTINUE
        )
    scheduler.on_trial_complete(None, first, {"step": 6, "eval_loss": 0.6})


def second_trial_decision(scheduler: ASHAScheduler) -> str:
    second = Trial("second")
    scheduler.on_trial_add(None, second)
    return scheduler.on_trial_result(None, second, {"step": 2, "eval_loss": 1.5})


def test_a_restored_scheduler_stops_as_the_uninterrupted_one_would(tmp_path: Path) -> None:
    state = tmp_path / "sweep_scheduler_state.pkl"
    created = ResumableASHA(state_file=state, **OPTIONS)
    as_pickled_at_creation = pickle.dumps(created)  # what Tuner.restore brings back
    run_first_trial(created)  # ... then the sweep is interrupted

    restored = pickle.loads(as_pickled_at_creation)
    assert second_trial_decision(restored) == TrialScheduler.STOP
    assert stopped_trials(state) == {"second"}  # how the results tell "stopped early" from "unfinished"
    # Ray's own ASHA, restored the same way, has forgotten the first trial's rung.
    plain = ASHAScheduler(**OPTIONS)
    pickled_plain = pickle.dumps(plain)
    run_first_trial(plain)
    assert second_trial_decision(pickle.loads(pickled_plain)) == TrialScheduler.CONTINUE


def test_a_new_sweep_starts_with_empty_rungs(tmp_path: Path) -> None:
    scheduler = ResumableASHA(state_file=tmp_path / "absent.pkl", **OPTIONS)
    assert second_trial_decision(scheduler) == TrialScheduler.CONTINUE
    assert (tmp_path / "absent.pkl").is_file()


def test_a_trial_that_reaches_the_last_step_is_never_stopped_there(tmp_path: Path) -> None:
    """With max_t = grace_period x reduction_factor, Ray's ASHA has a rung at the last step."""
    options = {**OPTIONS, "max_t": 4}

    def last_step_decision(scheduler: ASHAScheduler) -> str:
        first, second = Trial("first"), Trial("second")
        for trial in (first, second):
            scheduler.on_trial_add(None, trial)
        for step, loss in ((2, 1.0), (4, 0.6)):
            scheduler.on_trial_result(None, first, {"step": step, "eval_loss": loss})
        scheduler.on_trial_complete(None, first, {"step": 4, "eval_loss": 0.6})
        # Ahead of the first trial at step 2, behind it at the last step.
        assert (
            scheduler.on_trial_result(None, second, {"step": 2, "eval_loss": 0.9}) == TrialScheduler.CONTINUE
        )
        return scheduler.on_trial_result(None, second, {"step": 4, "eval_loss": 0.7})

    state = tmp_path / "sweep_scheduler_state.pkl"
    assert last_step_decision(ResumableASHA(state_file=state, **options)) == TrialScheduler.CONTINUE
    assert stopped_trials(state) == set()
    assert last_step_decision(ASHAScheduler(**options)) == TrialScheduler.STOP  # Ray's own
