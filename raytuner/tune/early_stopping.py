"""ASHA early stopping that survives an interrupted sweep.

Ray Tune 2.60 saves the searcher's state with the experiment but not the scheduler's: a sweep
resumed with ``Tuner.restore`` gets an ASHA with empty rungs, which lets the next trial through
every rung whatever its loss. This scheduler writes its rungs to a file beside the sweep after
every decision and reads them back the first time it is used after a restore, so a resumed sweep
stops trials exactly as the uninterrupted one would. The file also names the trials it stopped,
which is how the results tell a trial stopped early from one cut short by an interruption.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

from ray.tune.schedulers import ASHAScheduler

_STATE_KEYS = ("_brackets", "_trial_info", "_num_stopped", "_stopped_trials")


def stopped_trials(state_file: str | Path) -> set[str]:
    """The ids of the trials a :class:`ResumableASHA` stopped, from its state file."""
    path = Path(state_file)
    if not path.is_file():
        return set()
    with path.open("rb") as handle:
        return set(pickle.load(handle).get("_stopped_trials", ()))


class ResumableASHA(ASHAScheduler):
    """``ASHAScheduler`` whose rungs are kept in ``state_file`` (see the module docstring)."""

    def __init__(self, *, state_file: str | Path, **options: Any) -> None:
        super().__init__(**options)
        self._state_file = str(state_file)
        self._state_loaded = False
        self._stopped_trials: set[str] = set()

    def _load_once(self) -> None:
        if self._state_loaded:
            return
        self._state_loaded = True
        path = Path(self._state_file)
        if path.is_file():
            with path.open("rb") as handle:
                saved = pickle.load(handle)
            for key in _STATE_KEYS:
                if key in saved:
                    setattr(self, key, saved[key])

    def _save(self) -> None:
        path = Path(self._state_file)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        with partial.open("wb") as handle:
            pickle.dump({key: getattr(self, key) for key in _STATE_KEYS}, handle)
        os.replace(partial, path)

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        if trial.trial_id not in self._trial_info:  # a restored trial keeps its bracket
            super().on_trial_add(tune_controller, trial)
            self._save()

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        self._load_once()
        if not self._stop_last_trials and result.get(self._time_attr, 0) >= self._max_t:
            # The trial's last report: it ends by itself, with its adapter written. When max_t is
            # grace_period x reduction_factor^k, Ray's ASHA has a rung at max_t and would stop a
            # trial behind it there, as it ends: "stopped early" after every step, and its adapter
            # export cut short.
            return self.CONTINUE
        action = super().on_trial_result(tune_controller, trial, result)
        if action == self.STOP:
            self._stopped_trials.add(trial.trial_id)
        self._save()
        return action

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> None:
        self._load_once()
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)
            self._save()

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._load_once()
        if trial.trial_id in self._trial_info:
            super().on_trial_remove(tune_controller, trial)
            self._save()
