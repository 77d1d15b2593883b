"""Where a run's numbers go, from rank 0: a JSON-lines log, TensorBoard, Ray's metrics, the console.

* ``output_dir/logs/metrics.jsonl``: one line per step (and per evaluation); a step trained again
  after a restart from a checkpoint appends a new line, and readers keep the last one per step.
* TensorBoard under ``output_dir/logs/tensorboard`` when ``report_to`` asks for it.
* Weights & Biases (``report_to`` ``wandb`` or ``all``), the same numbers and images under the
  same names, its local files in ``output_dir/logs/wandb`` (raytuner/evaluate/wandb_tracker.py).
* ``ray.util.metrics`` gauges (``raytuner_train_loss``, ``raytuner_samples_per_second``, …): Ray
  exports them on each node's metrics endpoint, so the Ray dashboard and Prometheus show the run
  live. Metrics passed to ``ray.train.report`` are not exported there.
* A progress line with a bar and ETA every few seconds: workers' output reaches the driver
  line by line, so a redrawn bar would arrive as noise.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tqdm import tqdm

from raytuner.evaluate.wandb_tracker import WandbRun, WandbTarget

logger = logging.getLogger(__name__)

TENSORBOARD_TRACKERS = ("tensorboard", "all")
# report_to values raytuner runs; the rest are refused by name before any work starts.
SUPPORTED_REPORT_TO = ("none", "tensorboard", "wandb", "all")
PROGRESS_INTERVAL_S = 5.0

# Per-step numbers exported as Ray gauges, with their descriptions.
_GAUGES = {
    "loss": ("raytuner_train_loss", "flow-matching training loss of the last step"),
    "eval_loss": ("raytuner_eval_loss", "latest stable evaluation loss"),
    "lr": ("raytuner_learning_rate", "learning rate of the last step"),
    "samples_per_second": ("raytuner_samples_per_second", "training samples per second, all workers"),
    "step_time_s": ("raytuner_step_time_seconds", "seconds per optimiser step"),
    "data_wait_fraction": ("raytuner_data_wait_fraction", "share of the step spent waiting for data"),
    "step": ("raytuner_train_step", "optimiser steps done"),
    "peak_memory_mib": (
        "raytuner_peak_memory_mib",
        "rank 0's peak memory, MiB: allocated on its GPU, else the process's resident set",
    ),
}


def report_to_problem(value: str) -> str | None:
    """None when raytuner runs ``report_to`` = ``value``; else the reason, for a config error."""
    if value in SUPPORTED_REPORT_TO:
        return None
    return (
        f"'report_to' = {value!r}: not implemented yet; use 'tensorboard' (written under "
        "output_dir/logs/tensorboard), 'wandb', 'all' (both) or 'none'"
    )


class RayGauges:
    """The run's numbers on Ray's metrics endpoint, tagged with the run name."""

    def __init__(self, run_name: str) -> None:
        from ray.util.metrics import Gauge

        self._tags = {"run": run_name}
        self._gauges = {
            key: Gauge(name, description=description, tag_keys=("run",))
            for key, (name, description) in _GAUGES.items()
        }

    @property
    def names(self) -> list[str]:
        """The gauges' names as registered; Ray's metrics endpoint exports each as ``ray_<name>``
        (``cluster/grafana/raytuner-dashboard.json`` queries them)."""
        return [str(gauge.info["name"]) for gauge in self._gauges.values()]

    def set(self, metrics: Mapping[str, Any]) -> None:
        for key, gauge in self._gauges.items():
            value = metrics.get(key)
            if isinstance(value, int | float):
                gauge.set(float(value), tags=self._tags)


class MetricsLog:
    """Rank 0's sinks: the JSON-lines file, TensorBoard and W&B when asked, Ray gauges when on Ray."""

    def __init__(
        self,
        output_dir: Path,
        *,
        report_to: str,
        run_name: str,
        ray_metrics: bool = True,
        wandb: WandbTarget | None = None,
    ) -> None:
        self.folder = output_dir / "logs"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "metrics.jsonl"
        self._writer = None
        if report_to in TENSORBOARD_TRACKERS:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(self.folder / "tensorboard"))
        self._gauges = RayGauges(run_name) if ray_metrics else None
        self._wandb_target = wandb
        self._wandb: WandbRun | None = None

    def start(self, step: int) -> None:
        """Open the W&B run once the step training starts from is known (a restart resumes it)."""
        if self._wandb_target is not None and self._wandb is None:
            self._wandb = WandbRun(self._wandb_target, self.folder, start_step=step)

    def log(self, metrics: Mapping[str, Any]) -> None:
        step = int(metrics["step"])
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(dict(metrics), default=float) + "\n")
        if self._writer is not None:
            for key, value in metrics.items():
                if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    self._writer.add_scalar(f"train/{key}", value, step)
        if self._gauges is not None:
            self._gauges.set(metrics)
        if self._wandb is not None:
            self._wandb.log(metrics, step)

    def images(
        self,
        tag: str,
        images: list[tuple[str, Any]],
        step: int,
        captions: Mapping[str, str] | None = None,
    ) -> None:
        """Validation images in TensorBoard and W&B (the PNGs are written by the caller)."""
        if self._writer is not None:
            import numpy as np

            for name, image in images:
                self._writer.add_image(
                    f"{tag}/{name}", np.asarray(image.convert("RGB")), step, dataformats="HWC"
                )
        if self._wandb is not None:
            self._wandb.images(tag, images, step, captions or {})

    def close(self, *, failed: bool = False) -> None:
        """Flush and close every sink; safe to call again (a worker's cleanup after the loop's)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.close(failed=failed)
            self._wandb = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The logged lines, one per step (the last written wins), in step order."""
    if not path.is_file():
        return []
    by_step: dict[tuple[int, str], dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        by_step[(int(entry["step"]), str(entry.get("kind", "train")))] = entry
    return [by_step[key] for key in sorted(by_step)]


class ProgressLine:
    """``step 12/30 [####------] 40% loss 0.8231 | 3.1 samples/s | ETA 0:00:45`` every few seconds."""

    def __init__(self, total: int, *, start_step: int, label: str) -> None:
        self.total = total
        self.start_step = start_step
        self.label = label
        self._started = time.monotonic()
        self._last = 0.0

    def update(self, step: int, metrics: Mapping[str, Any], *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_INTERVAL_S and step < self.total:
            return
        self._last = now
        done = step - self.start_step
        elapsed = now - self._started
        rate = done / elapsed if elapsed > 0 and done > 0 else None
        meter = tqdm.format_meter(
            step,
            self.total,
            elapsed,
            ncols=60,
            prefix=self.label,
            unit="step",
            rate=rate,
            initial=self.start_step,
        )
        extras = [f"loss {metrics['loss']:.4f}"] if "loss" in metrics else []
        if metrics.get("eval_loss") is not None:
            extras.append(f"eval {metrics['eval_loss']:.4f}")
        if "samples_per_second" in metrics:
            extras.append(f"{metrics['samples_per_second']:.2f} samples/s")
        logger.info("%s | %s", meter, " | ".join(extras))
