"""Webhooks (``webhook_config``): reading SimpleTuner's settings, and sending to a loopback receiver.

The receiver (tests/webhook_server.py) records every request, so the tests read what a Discord
or raw webhook would get: Discord messages with the validation images attached as files, raw
JSON events with SimpleTuner's fields. A failing (500) or hanging receiver must never hold up
the caller, and no URL or token may appear anywhere but in its own request.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from raytuner.config import ConfigError, load_config
from raytuner.config.check import format_run
from raytuner.config.webhooks import WebhookTarget
from raytuner.outputs import write_config_copies
from raytuner.train.callbacks import Callbacks, WebhookCallback
from raytuner.train.checkpointer import Checkpointer, Progress, Reporter, checkpoint_name
from raytuner.train.strategy import DataParallel
from raytuner.train.validate import ValidationRound
from raytuner.webhooks import (
    Webhooks,
    WebhookSettings,
    mark_reported,
    report_failures,
    was_reported,
    webhook_settings,
)
from tests.config.helpers import BASE_CONFIG, BASE_DATASETS, BASE_LYCORIS
from tests.webhook_server import WebhookServer

# Discord webhook URLs carry their token in the path; these stand for both kinds of credential.
DISCORD_TOKEN = "discord-webhook-token-Xy7"
AUTH_TOKEN = "raw-callback-api-key-Qw3"


@pytest.fixture
def server() -> Iterator[WebhookServer]:
    receiver = WebhookServer().start()
    yield receiver
    receiver.stop()


def discord_url(server: WebhookServer) -> str:
    return server.url(f"/api/webhooks/1234/{DISCORD_TOKEN}")


def settings_for(*targets: WebhookTarget, interval: float | None = None) -> WebhookSettings:
    return WebhookSettings(
        targets=targets,
        project="simpletuner demo",
        run_name="raytuner-demo",
        job_id="job-7",
        reporting_interval=interval,
        checkpoint_root="storage/raytuner-demo",
        output_dir="output",
    )


def images(count: int) -> list[tuple[str, Image.Image]]:
    return [
        (f"prompt-{index}-32x32", Image.new("RGB", (32, 32), (index * 20, 0, 0))) for index in range(count)
    ]


def write_run(root: Path, **updates: Any) -> Path:
    for name, content in (
        ("config.json", {**BASE_CONFIG, **updates}),
        ("multidatabackend.json", BASE_DATASETS),
        ("lycoris_config.json", BASE_LYCORIS),
    ):
        (root / name).write_text(json.dumps(content), encoding="utf-8")
    (root / "images").mkdir(exist_ok=True)
    return root / "config.json"


def assert_no_secret(data: str | bytes, *secrets: str) -> None:
    raw = data if isinstance(data, bytes) else data.encode()
    for secret in secrets:
        assert secret.encode() not in raw


# ---- reading webhook_config ------------------------------------------------------------------


def test_webhook_config_is_read_from_a_file_inline_text_an_object_or_a_list(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMPLETUNER_JOB_ID", "my-run")
    discord = {
        "webhook_type": "discord",
        "webhook_url": "https://discord.com/api/webhooks/1/t",
        "log_level": "Info",
    }
    raw = {
        "webhook_type": "raw",
        "callback_url": "https://example.com/cb",
        "auth_token": "k",
        "ssl_no_verify": "true",
    }
    (tmp_path / "webhooks.json").write_text(json.dumps([discord, raw]))
    for value in ("webhooks.json", json.dumps([discord, raw]), [discord, raw]):
        run = load_config(write_run(tmp_path, webhook_config=value, webhook_reporting_interval="30"))
        settings = webhook_settings(run, run_name="r", checkpoint_root="s/r")
        assert settings is not None
        assert [t.webhook_type for t in settings.targets] == ["discord", "raw"]
        assert settings.targets[0].log_level == "info" and settings.targets[1].ssl_no_verify
        assert settings.targets[1].auth_token == "k" and settings.reporting_interval == 30
        assert settings.job_id == "my-run" and settings.project == "simpletuner simpletuner-testing"
    assert run.sources.get("webhook_config") is None  # inline: no file
    run = load_config(write_run(tmp_path, webhook_config=raw))
    assert run.sources.get("webhook_config") is None
    run = load_config(write_run(tmp_path, webhook_config="webhooks.json"))
    assert run.sources["webhook_config"] == tmp_path / "webhooks.json"
    assert load_config(write_run(tmp_path)).training.tracking.webhook_config is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (
            {"webhook_type": "slack", "webhook_url": "https://x/y"},
            "'webhook_type' = 'slack': expected one of: discord, raw",
        ),
        ({"webhook_url": "https://x/y"}, "'webhook_type' not set: expected one of: discord, raw"),
        ({"webhook_type": "discord"}, "'webhook_url' is required for webhook_type 'discord'"),
        (
            {"webhook_type": "raw", "webhook_url": "https://x/y"},
            "'callback_url' is required for webhook_type 'raw': expected an http(s) URL; rename 'webhook_url' to 'callback_url'",
        ),
        (
            {"webhook_type": "discord", "webhook_url": "https://x/y", "log_level": "verbose"},
            "'log_level' = 'verbose'",
        ),
        (
            {"webhook_type": "discord", "webhook_url": "https://x/y", "mesage_prefix": "a"},
            "(did you mean 'message_prefix'?)",
        ),
        ({"webhook_type": "discord", "webhook_url": "discord.com/api/webhooks/1/t"}, "is not an http(s) URL"),
        ("[]", "expected a webhook object or a non-empty list"),
        ('{"webhook_type": "discord", ', "'webhook_config' is not valid JSON"),
        ("missing-webhooks.json", "'webhook_config' = 'missing-webhooks.json': expected a webhook JSON file"),
    ],
)
def test_bad_webhook_settings_are_one_line_errors_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: Any, expected: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as raised:
        load_config(write_run(tmp_path, webhook_config=value))
    line = str(raised.value)
    assert expected in line and "\n" not in line
    assert line.startswith("config.json: 'webhook_config'")
    assert "x/y" not in line and "api/webhooks/1/t" not in line  # URLs are never shown


def test_a_bad_webhook_file_names_the_file_and_the_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    good = {"webhook_type": "discord", "webhook_url": "https://discord.com/api/webhooks/1/t"}
    (tmp_path / "hooks.json").write_text(json.dumps([good, {"webhook_type": "raw"}]))
    with pytest.raises(ConfigError) as raised:
        load_config(write_run(tmp_path, webhook_config="hooks.json"))
    assert raised.value.problems == (
        "hooks.json: webhook 2: 'callback_url' is required for webhook_type 'raw': expected an http(s) URL",
    )
    with pytest.raises(ConfigError) as raised:
        load_config(write_run(tmp_path, webhook_reporting_interval=0))
    assert "'webhook_reporting_interval' = 0: expected a number > 0" in str(raised.value)


def test_webhook_urls_and_tokens_never_reach_the_config_copies_or_check_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    hooks = [
        {"webhook_type": "discord", "webhook_url": f"https://discord.com/api/webhooks/1/{DISCORD_TOKEN}"},
        {"webhook_type": "raw", "callback_url": "https://example.com/cb", "auth_token": AUTH_TOKEN},
    ]
    (tmp_path / "hooks.json").write_text(json.dumps(hooks))
    for value in (hooks, json.dumps(hooks), "hooks.json"):
        run = load_config(write_run(tmp_path, webhook_config=value))
        output = tmp_path / "output"
        for path in write_config_copies(run, output):
            assert_no_secret(path.read_bytes(), DISCORD_TOKEN, AUTH_TOKEN, "example.com/cb")
        assert_no_secret(format_run(run), DISCORD_TOKEN, AUTH_TOKEN, "example.com/cb")
        copied = json.loads((output / "config" / "config.json").read_text())["webhook_config"]
        if value == "hooks.json":
            assert copied == "hooks.json"  # a path is not a secret; the webhook file is not copied
            assert not (output / "config" / "hooks.json").exists()
        else:
            shown = json.loads(copied) if isinstance(copied, str) else copied
            assert shown[0] == {"webhook_type": "discord", "webhook_url": "***"}


# ---- sending ---------------------------------------------------------------------------------


def test_discord_gets_messages_with_the_validation_images_attached(server: WebhookServer) -> None:
    target = WebhookTarget(webhook_type="discord", url=discord_url(server), message_prefix="demo")
    webhooks = Webhooks(settings_for(target))
    webhooks.started(step=0, total_steps=6, workers=2, global_batch=4)
    webhooks.progress(step=1, total_steps=6, metrics={"loss": 0.5})  # raw webhooks only
    webhooks.validation(step=3, images=images(12))
    webhooks.checkpoint(step=4, name=checkpoint_name(4))
    webhooks.finished(step=6, adapter="output/pytorch_lora_weights.safetensors")
    webhooks.close()
    received = server.wait_for(5)
    assert len(received) == 5 and all(r.path == f"/api/webhooks/1234/{DISCORD_TOKEN}" for r in received)
    start, first, second, checkpoint, finished = received
    assert start.json["content"].startswith(
        "`(demo)` Training raytuner-demo started: steps 1..6, 2 worker(s)"
    )
    # Twelve images: ten on the first message (Discord's limit), two on the second.
    assert [len(first.files), len(second.files)] == [10, 2]
    assert first.field("content") == second.field("content")
    assert first.field("content").startswith("`(demo)` Validation images at step 3: prompt-0-32x32")
    assert first.files[0].filename == "prompt-0-32x32.png" and first.files[0].content_type == "image/png"
    picture = Image.open(io.BytesIO(second.files[1].data))
    assert picture.size == (32, 32) and picture.getpixel((0, 0)) == (220, 0, 0)
    assert (
        checkpoint.json["content"]
        == "`(demo)` Checkpoint at step 4 saved to storage/raytuner-demo/checkpoint-0000004"
    )
    assert "adapter written to output/pytorch_lora_weights.safetensors" in finished.json["content"]
    assert webhooks.stats.failed == 0


def test_raw_webhooks_get_simpletuners_json_events(server: WebhookServer) -> None:
    target = WebhookTarget(webhook_type="raw", url=server.url("/callback"), auth_token=AUTH_TOKEN)
    webhooks = Webhooks(settings_for(target))
    webhooks.started(step=0, total_steps=6, workers=2, global_batch=4)
    webhooks.progress(step=1, total_steps=6, metrics={"loss": 0.5, "lr": 1e-4, "step": 1})
    webhooks.validation(step=3, images=images(2))
    webhooks.checkpoint(step=4, name=checkpoint_name(4))
    webhooks.finished(step=6, adapter="output/pytorch_lora_weights.safetensors")
    webhooks.failed(RuntimeError("boom\nCUDA out of memory"), step=5)
    webhooks.close()
    events = [r.json for r in server.wait_for(8)]
    assert all(r.headers["x-api-key"] == AUTH_TOKEN for r in server.requests)
    assert [e["type"] for e in events] == [
        "training.status",
        "training.status",
        "training.validation",
        "training.checkpoint",
        "lifecycle.stage",
        "lifecycle.stage",
        "notification",
        "training.status",
    ]
    for event in events:
        assert event["job_id"] == "job-7" and event["timestamp"] and event["severity"] in ("info", "error")
    start, progress, validation, checkpoint, saved, complete, error, failed = events
    assert start["data"]["status"] == "running" and start["data"]["total_num_steps"] == 6
    assert progress["progress"]["current"] == 1 and progress["progress"]["total"] == 6
    assert progress["progress"]["metrics"]["loss"] == 0.5
    assert validation["data"]["image_names"] == ["prompt-0-32x32", "prompt-1-32x32"]
    decoded = Image.open(io.BytesIO(base64.b64decode(validation["images"][1])))
    assert decoded.getpixel((0, 0)) == (20, 0, 0)
    assert checkpoint["checkpoint"] == {
        "path": "storage/raytuner-demo/checkpoint-0000004",
        "label": "Checkpoint saved to storage/raytuner-demo/checkpoint-0000004",
        "is_final": False,
    }
    assert saved["stage"]["key"] == "model_save" and saved["message"] == "Model saved to output"
    assert complete["stage"] == {
        "key": "training_complete",
        "label": "Training Complete",
        "status": "completed",
        "progress": {"label": "Training Complete", "current": 6, "total": 6, "percent": 100.0},
    }
    assert complete["data"]["adapter"] == "output/pytorch_lora_weights.safetensors"
    assert error["title"] == "Fatal Error" and error["severity"] == "error"
    assert error["message"] == "Failed to run training at step 5: RuntimeError: CUDA out of memory"
    assert failed["data"]["status"] == "failed"


def test_log_level_and_the_reporting_interval_choose_what_is_sent(server: WebhookServer) -> None:
    quiet = WebhookTarget(webhook_type="raw", url=server.url("/errors-only"), log_level="error")
    chatty = WebhookTarget(webhook_type="raw", url=server.url("/all"))
    webhooks = Webhooks(settings_for(quiet, chatty, interval=3600))
    for step in range(1, 4):
        webhooks.progress(step=step, total_steps=3, metrics={"loss": 1.0})
    webhooks.checkpoint(step=3, name=checkpoint_name(3))
    webhooks.failed("stopped")
    webhooks.close()
    received = server.wait_for(6)
    by_path = [(r.path, r.json["type"]) for r in received]
    # One progress event in the hour; the error-level webhook hears of the failure only.
    assert by_path.count(("/all", "training.status")) == 2
    assert [t for p, t in by_path if p == "/errors-only"] == ["notification", "training.status"]
    every_step = Webhooks(settings_for(chatty))
    for step in range(1, 4):
        every_step.progress(step=step, total_steps=3, metrics={})
    every_step.close()
    assert len(server.wait_for(9)) == 9


def test_a_failing_webhook_warns_once_and_never_stops_the_caller(
    server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.status = 500
    target = WebhookTarget(webhook_type="discord", url=discord_url(server), auth_token=AUTH_TOKEN)
    webhooks = Webhooks(settings_for(target))
    with caplog.at_level(logging.WARNING, logger="raytuner.webhooks"):
        for step in range(1, 6):
            webhooks.checkpoint(step=step, name=checkpoint_name(step))
        webhooks.failed(RuntimeError(f"could not post to {discord_url(server)}"))
        webhooks.close()
    assert len(server.wait_for(6)) == 6
    assert webhooks.stats.failed == 6 and webhooks.stats.sent == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "raytuner.webhooks"]
    assert len(warnings) == 1
    assert "webhook 1 (discord, 127.0.0.1) could not be sent an event: HTTP 500" in warnings[0]
    assert_no_secret(caplog.text, DISCORD_TOKEN, AUTH_TOKEN)
    # The failure quoted the URL: the message sent carries *** instead.
    assert "could not post to ***" in server.requests[-1].json["content"]
    for request in server.requests:
        assert_no_secret(request.body, DISCORD_TOKEN, AUTH_TOKEN)


def test_a_hanging_webhook_times_out_and_the_end_of_the_run_waits_a_bounded_time(
    server: WebhookServer, caplog: pytest.LogCaptureFixture
) -> None:
    server.hang()
    target = WebhookTarget(webhook_type="raw", url=server.url("/slow"))
    webhooks = Webhooks(settings_for(target), timeout_s=0.2, queue_size=4)
    with caplog.at_level(logging.WARNING, logger="raytuner.webhooks"):
        webhooks.checkpoint(step=1, name=checkpoint_name(1))
        server.wait_for(1)  # the receiver now holds that request open
        for step in range(2, 12):  # the caller is never held: a full queue drops events
            webhooks.checkpoint(step=step, name=checkpoint_name(step))
        webhooks.close(timeout_s=1.0)
    # close() came back while the receiver was still holding requests open.
    assert server._hanging.is_set()
    assert webhooks.stats.dropped > 0 and webhooks.stats.sent == 0
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "timed out" in messages and "new events are dropped" in messages


def test_the_driver_sends_a_failure_only_when_no_worker_did(server: WebhookServer) -> None:
    settings = settings_for(WebhookTarget(webhook_type="raw", url=server.url("/driver")))
    reported = RuntimeError("worker failure")
    mark_reported(reported)

    class Wrapper(Exception):  # as Ray Train hands a worker's exception to the driver
        def __init__(self, base: BaseException) -> None:
            super().__init__("training failed")
            self._base_exc = base

    assert was_reported(Wrapper(reported)) and not was_reported(Wrapper(RuntimeError("died")))
    # The note survives the trip to the driver: Ray Train wraps and pickles the worker's exception.
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    assert was_reported(pickle.loads(pickle.dumps(UserExceptionWithTraceback(reported, "traceback"))))
    with pytest.raises(Wrapper), report_failures(settings):
        raise Wrapper(reported)
    with pytest.raises(RuntimeError), report_failures(settings):
        raise RuntimeError("the worker process died")
    with pytest.raises(ConfigError), report_failures(settings):
        raise ConfigError("config.json: 'x' = 1: expected 2")  # raytuner's own lines stand alone
    received = server.wait_for(4)
    assert [r.json["type"] for r in received] == ["notification", "training.status"] * 2
    assert received[0].json["message"] == "Failed to run training: RuntimeError: the worker process died"
    assert received[2].json["message"] == "Failed to run training: config.json: 'x' = 1: expected 2"


# ---- the worker's calls ------------------------------------------------------------------------


def test_rank_zero_sends_its_validation_images_and_checkpoints(server: WebhookServer, tmp_path: Path) -> None:
    """The loop's webhook callback sends the validation and checkpoint events (the loop's own Ray
    test runs it all); the checkpointer calls it once Ray Train holds the checkpoint."""
    webhooks = WebhookCallback(
        Webhooks(settings_for(WebhookTarget(webhook_type="raw", url=server.url("/worker"))))
    )
    reported: list[str | None] = []
    checkpointer = Checkpointer(
        None,  # type: ignore[arg-type]  # a worker other than rank 0 writes only its own part
        rank=1,
        world_size=2,
        steps_per_epoch=4,
        model=None,  # type: ignore[arg-type]
        strategy=DataParallel(rank=1, world_size=2, device=torch.device("cpu")),
        lr_scheduler=None,  # type: ignore[arg-type]
        ema=None,
        reporter=Reporter(
            report=lambda metrics, folder, name: reported.append(name), restored_checkpoint=lambda: None
        ),
        callbacks=Callbacks([webhooks]),
    )
    webhooks.on_validation(4, ValidationRound(images=images(2)))
    checkpointer.report(Progress(step=4), {"step": 4}, checkpoint=True)
    webhooks.close(failed=False)
    events = [r.json for r in server.wait_for(2)]
    assert reported == [checkpoint_name(4)]
    assert [e["type"] for e in events] == ["training.validation", "training.checkpoint"]
    assert len(events[0]["images"]) == 2 and events[0]["data"]["step"] == 4
    assert events[1]["checkpoint"]["path"] == f"storage/raytuner-demo/{checkpoint_name(4)}"
