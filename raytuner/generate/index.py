"""``index.json`` of a generation folder: the settings, the screening and one entry per image.

The index is what makes a run resumable: an image whose entry is present and whose file exists is
not rendered again. It is rewritten atomically (temporary name, then rename) as images arrive, at
most every few seconds and always at the end, so an interrupted run loses at most those seconds.
A folder holds the images of one set of settings: resuming it with another model, adapter, scale,
step count, guidance or dtype is refused, and nothing in it is deleted.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from raytuner.generate.prompts import ImageRequest
from raytuner.generate.render import Rendered
from raytuner.generate.settings import GenerateError, GenerationSettings

INDEX_NAME = "index.json"
INDEX_FORMAT = "raytuner-generate/1"
_SAVE_EVERY_S = 5.0


class GenerationIndex:
    """The index of one output folder; :meth:`add` records an image, :meth:`save` writes the file."""

    def __init__(self, out_dir: Path, settings: GenerationSettings) -> None:
        self.out_dir = out_dir
        self.path = out_dir / INDEX_NAME
        self.settings = settings
        self.entries: dict[str, dict[str, Any]] = {}
        self._last_save = 0.0
        if self.path.is_file():
            self._load()

    def _load(self) -> None:
        try:
            content = json.loads(self.path.read_text(encoding="utf-8"))
            fingerprint = content["settings"]["fingerprint"]
            entries = content["images"]
        except (OSError, ValueError, KeyError, TypeError):
            raise GenerateError(
                f"{self.path} is not a raytuner generation index: choose another --out (nothing was deleted)"
            ) from None
        wanted = self.settings.fingerprint()
        if fingerprint != wanted:
            changed = ", ".join(
                f"{key} {fingerprint.get(key)!r} -> {value!r}"
                for key, value in wanted.items()
                if fingerprint.get(key) != value
            )
            raise GenerateError(
                f"{self.out_dir} holds images generated with other settings ({changed}): choose another --out, "
                "or run with the same settings to resume (nothing was deleted)"
            )
        self.entries = {
            entry["file"]: entry for entry in entries if isinstance(entry, dict) and "file" in entry
        }

    def done(self, request: ImageRequest) -> bool:
        """True when ``request``'s image is recorded and on disk (or its prompt was refused)."""
        entry = self.entries.get(request.file_name)
        if entry is None:
            return False
        return entry.get("refused") is not None or (self.out_dir / request.file_name).is_file()

    def pending(self, requests: Iterable[ImageRequest]) -> list[ImageRequest]:
        return [request for request in requests if not self.done(request)]

    def add(self, rendered: Rendered) -> None:
        """Write the image (atomically) and record it; the index is saved every few seconds."""
        request = rendered.request
        if rendered.png is not None:
            write_atomic(self.out_dir / request.file_name, rendered.png)
        self.entries[request.file_name] = {
            "file": request.file_name,
            "name": request.name,
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt
            if request.negative_prompt is not None
            else self.settings.negative_prompt,
            "seed": request.seed,
            "width": rendered.width,
            "height": rendered.height,
            "steps": self.settings.steps,
            "guidance": self.settings.guidance,
            "dtype": rendered.dtype,
            "screened": self.settings.screening.screened,
            "refused": rendered.refused,
            "clip_score": rendered.clip_score,
            "seconds": round(rendered.seconds, 3),
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        if time.monotonic() - self._last_save >= _SAVE_EVERY_S:
            self.save()

    def save(self, order: Iterable[ImageRequest] = ()) -> Path:
        """Write ``index.json``; entries of ``order`` come first, in its order, then any others."""
        ordered = [self.entries[r.file_name] for r in order if r.file_name in self.entries]
        listed = {entry["file"] for entry in ordered}
        ordered += [entry for name, entry in self.entries.items() if name not in listed]
        scores = [e["clip_score"] for e in ordered if e.get("clip_score") is not None]
        settings = self.settings.to_dict()
        content = {
            "format": INDEX_FORMAT,
            "settings": {**settings, "fingerprint": self.settings.fingerprint()},
            "screened": self.settings.screening.screened,
            "screening": settings["screening"],
            "clip_score_mean": sum(scores) / len(scores) if scores else None,
            "images": ordered,
        }
        write_atomic(self.path, (json.dumps(content, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        self._last_save = time.monotonic()
        return self.path


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path`` and rename it: never a half-written file."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
