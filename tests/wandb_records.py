"""Read back what an offline W&B run wrote: its ``run-<id>.wandb`` file, record by record.

The file is W&B's transaction log: a 7-byte header (``:W&B``, a magic number, a version), then
LevelDB-log blocks of 32 KiB holding protobuf ``Record`` messages (wandb's own
``wandb_internal_pb2``), split across blocks as FULL / FIRST / MIDDLE / LAST chunks. wandb 0.31
has no public reader for it (``wandb sync`` only uploads), so the tests read it here.

The file is complete only once W&B's service has closed the run's stream: ``run.finish()`` asks
for that and returns, and the service writes its last buffered block (the history rows, the exit
record) when it gets to it. A run logged in the test's own process is read after
``wandb.teardown()``, which waits for the service to stop; a Ray worker's run, after the worker
process (and with it its service) has ended.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _chunks(data: bytes) -> Iterator[bytes]:
    assert data[:4] == b":W&B", f"not a W&B run file (header {data[:7]!r})"
    position, pending = _HEADER, b""
    while position + 7 <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < 7:  # the block's tail is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if length == 0 and kind == 0:
            position += left_in_block
            continue
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    """The parts of an offline run the tests look at."""

    folder: Path
    project: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per committed step
    exit_code: int | None = None

    def values(self, key: str) -> list[tuple[int, Any]]:
        """(step, value) of every history row holding ``key``."""
        return [(row["_step"], row[key]) for row in self.history if key in row]

    @property
    def run_id(self) -> str:
        # Not the folder's name: a second folder for the same id and second gets a "-1" suffix.
        (path,) = self.folder.glob("run-*.wandb")
        return path.stem.removeprefix("run-")

    def media(self) -> list[Path]:
        return sorted((self.folder / "files" / "media").rglob("*.png"))


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_offline_run(folder: Path) -> OfflineRun:
    """Parse ``folder`` (an ``offline-run-*`` directory) into an :class:`OfflineRun`."""
    from wandb.proto import wandb_internal_pb2

    (path,) = folder.glob("run-*.wandb")
    run = OfflineRun(folder=folder)
    for raw in _chunks(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.project, run.name = record.run.project, record.run.display_name
            run.group, run.job_type = record.run.run_group, record.run.job_type
            run.tags = list(record.run.tags)
            for update in record.run.config.update:
                run.config[_item_key(update)] = json.loads(update.value_json)
        elif kind == "config":
            for update in record.config.update:
                run.config[_item_key(update)] = json.loads(update.value_json)
        elif kind == "history":
            run.history.append({_item_key(item): json.loads(item.value_json) for item in record.history.item})
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def offline_runs(logs: Path) -> list[OfflineRun]:
    """Every offline run under ``logs/wandb``, oldest first."""
    return [read_offline_run(folder) for folder in sorted((logs / "wandb").glob("offline-run-*"))]
