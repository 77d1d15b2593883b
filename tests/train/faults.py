"""Fault injection for the Ray Train tests: a loop callback that kills its worker once.

Installed through ``run_training(..., callbacks=[KillWorker(...)])``; it travels to every worker
pickled by value, so the workers need not import the tests.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ray.cloudpickle

from raytuner.train.callbacks import RunStart, TrainCallback

logger = logging.getLogger(__name__)
EXIT_CODE = 17


class KillWorker(TrainCallback):
    """The worker of ``rank`` exits abruptly after logging ``step``, once (``marker`` records it)."""

    def __init__(self, *, step: int, rank: int = 0, marker: Path) -> None:
        self.step = step
        self.rank = rank
        self.marker = marker
        self.worker_rank: int | None = None

    def on_start(self, start: RunStart) -> None:
        self.worker_rank = start.rank

    def on_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        if step != self.step or self.worker_rank != self.rank or self.marker.exists():
            return
        self.marker.parent.mkdir(parents=True, exist_ok=True)
        self.marker.write_text(f"failed at step {step}\n")
        logger.error("injected failure: worker %d exits at step %d", self.rank, step)
        os._exit(EXIT_CODE)  # as abrupt as a killed process: no cleanup, no report


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
