"""Send a run's events to the webhooks of SimpleTuner's ``webhook_config``.

Events: the start of training, progress (raw webhooks, at most once every
``webhook_reporting_interval`` seconds; every step when unset, as SimpleTuner does), each
validation with its images, each checkpoint, the end of the run with the adapter's location, and
a failure. Discord targets get messages (images attached as files, at most ten a message, as
Discord allows); raw targets get SimpleTuner's JSON events (``training.status``,
``training.validation`` with base64 PNG images, ``training.checkpoint``, ``lifecycle.stage``,
``notification``), each with ``type``, ``severity``, ``job_id`` (``SIMPLETUNER_JOB_ID``, as in
SimpleTuner) and ``timestamp``.

A webhook never holds up training: events go onto a bounded queue that one background thread
posts from, with a short timeout; a full queue drops the event, and a failing webhook is logged
once, then summarised every few minutes. The URLs and tokens are credentials: nothing here logs,
prints or sends them anywhere but their own request.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import os
import queue
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from raytuner.config import RunConfig
from raytuner.config.webhooks import WebhookTarget
from raytuner.errors import find_error
from raytuner.upstream import ray_train_user_error

logger = logging.getLogger(__name__)

JOB_ID_ENV = "SIMPLETUNER_JOB_ID"
SSL_NO_VERIFY_ENV = "SIMPLETUNER_SSL_NO_VERIFY"
TIMEOUT_S = 5.0  # per request, as SimpleTuner's
QUEUE_SIZE = 64
CLOSE_WAIT_S = 10.0  # what the end of a run waits for unsent events, at most
WARN_EVERY_S = 300.0
DISCORD_MAX_FILES = 10
DISCORD_MAX_CONTENT = 2000
# Set on an exception whose failure a worker has already sent, so the driver does not send it again.
REPORTED_ATTRIBUTE = "raytuner_webhooks_reported"
_FILE_CHARACTERS = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass(frozen=True, kw_only=True)
class WebhookSettings:
    """The run's webhooks and what their messages name; plain data, sent to the workers in the job."""

    targets: tuple[WebhookTarget, ...]
    project: str  # the default message prefix: tracker project and run names, as in SimpleTuner
    run_name: str
    job_id: str | None = None
    reporting_interval: float | None = None
    checkpoint_root: str = ""  # where the run's checkpoint folders are stored
    output_dir: str = ""


def webhook_settings(run: RunConfig, *, run_name: str, checkpoint_root: str) -> WebhookSettings | None:
    """The run's webhook settings (None without ``webhook_config``); the loader has checked them."""
    training = run.training
    targets = list(training.tracking.webhooks)  # read and checked once, by the loader
    if not targets:
        return None
    if os.environ.get(SSL_NO_VERIFY_ENV, "false").lower() == "true":
        targets = [dataclasses.replace(target, ssl_no_verify=True) for target in targets]
    return WebhookSettings(
        targets=tuple(targets),
        project=f"{training.tracking.tracker_project_name} {training.tracking.tracker_run_name}",
        run_name=run_name,
        job_id=os.environ.get(JOB_ID_ENV) or None,
        reporting_interval=training.tracking.webhook_reporting_interval,
        checkpoint_root=checkpoint_root.rstrip("/"),
        output_dir=str(training.output_dir),
    )


def mark_reported(error: BaseException) -> None:
    """Note on ``error`` that its failure was sent (the note travels with it to the driver)."""
    with contextlib.suppress(AttributeError, TypeError):  # an exception type without a __dict__
        setattr(error, REPORTED_ATTRIBUTE, True)


def was_reported(error: BaseException) -> bool:
    """Whether a worker already sent this failure: looks through Ray's wrappers for the note."""
    pending: list[Any] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop()
        if not isinstance(current, BaseException) or id(current) in seen:
            continue
        seen.add(id(current))
        if getattr(current, REPORTED_ATTRIBUTE, False):
            return True
        failures = getattr(current, "worker_failures", None)
        if isinstance(failures, dict):
            pending.extend(failures.values())
        # Ray Train wraps a worker's exception (see ray_train_user_error), Ray tasks keep it as ``cause``.
        pending.extend(
            [
                ray_train_user_error(current),
                getattr(current, "cause", None),
                current.__cause__,
                current.__context__,
            ]
        )
    return False


@contextlib.contextmanager
def report_failures(settings: WebhookSettings | None) -> Iterator[None]:
    """Send a failure raised inside the block unless a worker sent it already; then re-raise it."""
    try:
        yield
    except Exception as error:
        if settings is not None and not was_reported(error):
            webhooks = Webhooks(settings)
            webhooks.failed(error)
            webhooks.close()
        raise


@dataclass(frozen=True, kw_only=True)
class _Event:
    level: str
    raw: dict[str, Any]
    discord: str | None = None  # None: raw webhooks only (progress)
    images: Sequence[tuple[str, Any]] = ()  # (name, PIL image)
    droppable: bool = False


@dataclass
class _TargetState:
    failures: int = 0  # since the last warning
    last_warned: float | None = None
    last_error: str = ""


@dataclass
class _Stats:
    sent: int = 0
    failed: int = 0
    dropped: int = 0
    per_target: dict[int, _TargetState] = field(default_factory=dict)


class Webhooks:
    """Posts a run's events to its webhooks from a background thread; every method returns at once."""

    def __init__(
        self,
        settings: WebhookSettings,
        *,
        timeout_s: float = TIMEOUT_S,
        queue_size: int = QUEUE_SIZE,
        warn_every_s: float = WARN_EVERY_S,
    ) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self.warn_every_s = warn_every_s
        self.stats = _Stats()
        self._queue: queue.Queue[_Event | None] = queue.Queue(maxsize=queue_size)
        self._closing = threading.Event()
        self._last_progress: float | None = None
        self._dropped_warned = False
        self._closed = False
        self._thread = threading.Thread(target=self._send_loop, name="raytuner-webhooks", daemon=True)
        self._thread.start()

    # ---- events ---------------------------------------------------------------------------------

    def started(self, *, step: int, total_steps: int, workers: int, global_batch: int) -> None:
        text = (
            f"Training {self.settings.run_name} started: steps {step + 1}..{total_steps}, "
            f"{workers} worker(s), global batch {global_batch}"
        )
        self._put(
            _Event(
                level="info",
                discord=text,
                raw={
                    "type": "training.status",
                    "title": "Running",
                    "message": text,
                    "data": {
                        "status": "running",
                        "run_name": self.settings.run_name,
                        "global_step": step,
                        "total_num_steps": total_steps,
                        "remaining_num_steps": total_steps - step,
                        "world_size": workers,
                        "total_batch_size": global_batch,
                    },
                    "progress": _progress("Training initialisation", step, total_steps),
                },
            )
        )

    def progress(self, *, step: int, total_steps: int, metrics: dict[str, Any]) -> None:
        """A raw ``training.status`` update; at most one per ``webhook_reporting_interval`` seconds."""
        now = time.monotonic()
        interval = self.settings.reporting_interval
        if interval and self._last_progress is not None and now - self._last_progress < interval:
            return
        self._last_progress = now
        shown = {key: value for key, value in metrics.items() if isinstance(value, int | float | str)}
        self._put(
            _Event(
                level="info",
                droppable=True,
                raw={
                    "type": "training.status",
                    "title": "Running",
                    "data": {"status": "running", "global_step": step, "total_num_steps": total_steps},
                    "progress": {**_progress("Training", step, total_steps), "metrics": shown},
                },
            )
        )

    def validation(self, *, step: int, images: Sequence[tuple[str, Any]]) -> None:
        names = [name for name, _ in images]
        self._put(
            _Event(
                level="info",
                discord=f"Validation images at step {step}: {', '.join(names) or 'none'}",
                images=list(images),
                raw={
                    "type": "training.validation",
                    "title": f"Validation at step {step}",
                    "message": f"Validation: step {step}",
                    "data": {"step": step, "image_names": names},
                },
            )
        )

    def checkpoint(self, *, step: int, name: str) -> None:
        path = f"{self.settings.checkpoint_root}/{name}" if self.settings.checkpoint_root else name
        label = f"Checkpoint saved to {path}"
        self._put(
            _Event(
                level="info",
                discord=f"Checkpoint at step {step} saved to {path}",
                raw={
                    "type": "training.checkpoint",
                    "title": label,
                    "data": {"step": step},
                    "checkpoint": {"path": path, "label": label, "is_final": False},
                },
            )
        )

    def finished(self, *, step: int, adapter: Path | str) -> None:
        text = f"Training {self.settings.run_name} complete after {step} steps: adapter written to {adapter}"
        self._put(
            _Event(
                level="info",
                raw={
                    "type": "lifecycle.stage",
                    "title": f"Model saved to {self.settings.output_dir}",
                    "message": f"Model saved to {self.settings.output_dir}",
                    "stage": {"key": "model_save", "label": "Saving Final Model", "status": "completed"},
                    "data": {"adapter": str(adapter), "output_dir": self.settings.output_dir},
                },
            )
        )
        self._put(
            _Event(
                level="info",
                discord=text,
                raw={
                    "type": "lifecycle.stage",
                    "title": "Training run complete.",
                    "message": text,
                    "stage": {
                        "key": "training_complete",
                        "label": "Training Complete",
                        "status": "completed",
                        "progress": _progress("Training Complete", step, step),
                    },
                    "data": {
                        "adapter": str(adapter),
                        "output_dir": self.settings.output_dir,
                        "global_step": step,
                    },
                },
            )
        )

    def failed(self, error: BaseException | str, *, step: int | None = None) -> None:
        """The run (or a worker) failed; sent at level critical, so every webhook hears of it."""
        reason = self.scrub(error if isinstance(error, str) else _one_line(error))
        at = f" at step {step}" if step is not None else ""
        message = f"Failed to run training{at}: {reason}"
        data: dict[str, Any] = {"status": "error", "run_name": self.settings.run_name}
        if step is not None:
            data["global_step"] = step
        self._put(
            _Event(
                level="critical",
                discord=message,
                raw={"type": "notification", "title": "Fatal Error", "message": message, "data": data},
            )
        )
        self._put(
            _Event(
                level="critical",
                raw={
                    "type": "training.status",
                    "title": "Failed",
                    "message": f"Training failed{at}: {reason}",
                    "data": {**data, "status": "failed"},
                },
            )
        )

    def close(self, timeout_s: float = CLOSE_WAIT_S) -> None:
        """Wait up to ``timeout_s`` for the queued events to go out; what is left is dropped."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=max(0.0, deadline - time.monotonic()))
        self._thread.join(max(0.0, deadline - time.monotonic()))
        self._closing.set()  # the thread drops whatever is still queued
        if self._thread.is_alive() or not self._queue.empty():
            logger.warning(
                "webhooks: gave up waiting after %.0f s; events not yet sent are dropped", timeout_s
            )

    def scrub(self, text: str) -> str:
        """``text`` with every webhook URL and token replaced by ``***`` (an error may quote one)."""
        for target in self.settings.targets:
            for secret in (target.url, target.auth_token):
                if secret:
                    text = text.replace(secret, "***")
        return text

    # ---- sending --------------------------------------------------------------------------------

    def _put(self, event: _Event) -> None:
        if self._closed:
            return
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.stats.dropped += 1
            if not self._dropped_warned:
                self._dropped_warned = True
                logger.warning(
                    "webhooks: %d events are waiting to be sent; new events are dropped until they go out",
                    self._queue.maxsize,
                )

    def _send_loop(self) -> None:
        while True:
            event = self._queue.get()
            if event is None or self._closing.is_set():
                return
            for index, target in enumerate(self.settings.targets):
                if self._closing.is_set():
                    return
                if not target.accepts(event.level):
                    continue
                if target.webhook_type == "discord" and event.discord is None:
                    continue  # progress goes to raw webhooks only, as in SimpleTuner
                try:
                    for body, content_type in self._requests(target, event):
                        self._post(target, body, content_type)
                    self.stats.sent += 1
                except Exception as error:  # a webhook must never stop the run
                    self.stats.failed += 1
                    self._warn(index, target, error)

    def _requests(self, target: WebhookTarget, event: _Event) -> list[tuple[bytes, str]]:
        if target.webhook_type == "raw":
            payload = {**event.raw, "severity": event.raw.get("severity", _severity(event.level))}
            payload.setdefault("job_id", self.settings.job_id)
            payload.setdefault("timestamp", datetime.now(tz=UTC).isoformat())
            if event.images:
                payload["images"] = [
                    base64.b64encode(_png(image)).decode("ascii") for _, image in event.images
                ]
            return [(json.dumps(payload, default=str).encode(), "application/json")]
        prefix = (
            f"`({target.message_prefix if target.message_prefix is not None else self.settings.project})` "
        )
        content = (prefix + (event.discord or ""))[:DISCORD_MAX_CONTENT]
        if not event.images:
            return [(json.dumps({"content": content}).encode(), "application/json")]
        requests = []
        images = list(event.images)
        for start in range(0, len(images), DISCORD_MAX_FILES):
            files = [
                (f"file{index}", f"{_file_name(name)}.png", _png(image))
                for index, (name, image) in enumerate(images[start : start + DISCORD_MAX_FILES])
            ]
            requests.append(_multipart({"content": content}, files))
        return requests

    def _post(self, target: WebhookTarget, body: bytes, content_type: str) -> None:
        headers = {"Content-Type": content_type, "User-Agent": "raytuner"}
        if target.auth_token:
            headers["X-API-Key"] = target.auth_token  # as SimpleTuner sends it
        request = urllib.request.Request(target.url, data=body, headers=headers, method="POST")
        context = _unverified_context() if target.ssl_no_verify else None
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=context) as response:
            response.read()

    def _warn(self, index: int, target: WebhookTarget, error: BaseException) -> None:
        state = self.stats.per_target.setdefault(index, _TargetState())
        state.failures += 1
        state.last_error = self.scrub(_request_error(error))
        now = time.monotonic()
        if state.last_warned is not None and now - state.last_warned < self.warn_every_s:
            return
        name = f"webhook {index + 1} ({target.webhook_type}, {urllib.parse.urlsplit(target.url).hostname})"
        if state.last_warned is None:
            logger.warning(
                "%s could not be sent an event: %s; training continues (further failures are summarised "
                "every %.0f s)",
                name,
                state.last_error,
                self.warn_every_s,
            )
        else:
            logger.warning("%s: %d more events not sent (last: %s)", name, state.failures, state.last_error)
        state.failures = 0
        state.last_warned = now


def _progress(label: str, current: int, total: int) -> dict[str, Any]:
    percent = 100.0 * min(current, total) / total if total else None
    return {"label": label, "current": current, "total": total, "percent": percent}


def _severity(level: str) -> str:
    return "error" if level == "critical" else level


def _unverified_context() -> ssl.SSLContext:
    """A TLS context that accepts any certificate and host name (``ssl_no_verify``, SimpleTuner's switch)."""
    context = ssl.create_default_context()
    context.check_hostname = False  # before verify_mode: ssl refuses CERT_NONE while it checks names
    context.verify_mode = ssl.CERT_NONE
    return context


def _one_line(error: BaseException) -> str:
    expected = find_error(error)
    if expected is not None:
        return str(expected)[:500]  # raytuner's own errors are one line that stands alone
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text[:500]


def _request_error(error: BaseException) -> str:
    """What went wrong, without the request's URL (urllib's texts do not carry it; be sure)."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return f"{type(error.reason).__name__}: {error.reason}"
    if isinstance(error, TimeoutError):
        return "timed out"
    return f"{type(error).__name__}: {error}"


def _file_name(name: str) -> str:
    return _FILE_CHARACTERS.sub("_", name).strip("_")[:80] or "image"


def _png(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _multipart(fields: dict[str, str], files: list[tuple[str, str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body, as Discord takes messages with attachments."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, filename, data in files:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            "Content-Type: image/png\r\n\r\n".encode()
            + data
            + b"\r\n"
        )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"
