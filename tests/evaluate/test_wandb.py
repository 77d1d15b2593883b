"""Weights & Biases from rank 0's metrics sinks, in offline mode, read back from the run's own files."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb
from PIL import Image

from raytuner.evaluate.metrics import MetricsLog, report_to_problem
from raytuner.evaluate.wandb_tracker import RUN_ID_FILE, WandbTarget, wandb_problem, wandb_target
from raytuner.train.launcher import tracker_target
from tests.cache.helpers import image_dataset, text_dataset, write_run_files
from tests.wandb_records import OfflineRun, offline_runs

KEY = "wandb-key-that-must-never-be-written-0123456789"


@pytest.fixture
def wandb_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """W&B's own files (settings, cache, netrc) kept in the test's folder; no login anywhere."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("NETRC", str(home / ".netrc"))
    for variable in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(variable, str(home / variable.lower()))
    for variable in (
        "WANDB_API_KEY",
        "WANDB_MODE",
        "WANDB_BASE_URL",
        "WANDB_ENTITY",
        "WANDB_IDENTITY_TOKEN_FILE",
    ):
        monkeypatch.delenv(variable, raising=False)
    return home


def target(**fields: object) -> WandbTarget:
    defaults: dict[str, object] = {
        "project": "cosmos2image-training",
        "name": "cosmos2image-lora",
        "config": {"training": {"learning_rate": 6e-5, "hf_token": "***"}},
        "client": {"mode": "offline"},
        "tags": ("raytuner", "cosmos2image"),
    }
    return WandbTarget(**{**defaults, **fields})  # type: ignore[arg-type]


def log_a_run(output_dir: Path, run_target: WandbTarget, *, start: int = 0, steps: int = 3) -> None:
    """What a worker logs: a baseline eval, train steps, one validation round at the last step."""
    log = MetricsLog(output_dir, report_to="all", run_name="test", ray_metrics=False, wandb=run_target)
    log.start(start)
    if start == 0:
        log.log({"step": 0, "kind": "eval", "eval_loss": 1.5})
    for step in range(start + 1, start + steps + 1):
        log.log({"step": step, "loss": 1.0 / step, "lr": 1e-3, "eval_loss": 1.5, "kind": "train"})
    images = [
        ("validation-32x32", Image.new("RGB", (32, 32), "red")),
        ("unconditional-32x32", Image.new("RGB", (32, 32), "blue")),
    ]
    log.images(
        "validation", images, start + steps, {"validation-32x32": "a red square", "unconditional-32x32": ""}
    )
    log.close()
    # run.finish() only asks W&B's service to close the run: the service writes the run file's
    # last buffered records (history, exit) when it closes the run's stream, after finish has
    # returned. Stopping the service waits for that, so the file read next is complete.
    wandb.teardown()


def test_rank_zeros_metrics_and_images_reach_the_offline_run_under_tensorboards_names(
    tmp_path: Path, wandb_home: Path
) -> None:
    log_a_run(tmp_path, target(group="sweep-a", job_type="trial"))
    (run,) = offline_runs(tmp_path / "logs")
    assert (run.project, run.name, run.group, run.job_type) == (
        "cosmos2image-training",
        "cosmos2image-lora",
        "sweep-a",
        "trial",
    )
    assert run.tags == ["raytuner", "cosmos2image"]
    assert run.config["training"] == {"learning_rate": 6e-5, "hf_token": "***"}
    assert run.values("train/loss") == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert run.values("train/eval_loss")[0] == (0, 1.5)
    # The same images TensorBoard gets, one key each, the prompt as the caption.
    assert run.values("validation/validation-32x32/caption") == [(3, "a red square")]
    assert run.values("validation/unconditional-32x32/caption") == [(3, "unconditional-32x32")]
    assert len(run.media()) == 2
    assert run.exit_code == 0
    assert list((tmp_path / "logs" / "tensorboard").glob("events.out.tfevents.*"))


def test_the_table_layout_logs_one_table_per_validation_round(tmp_path: Path, wandb_home: Path) -> None:
    log_a_run(tmp_path, target(image_layout="table"))
    (run,) = offline_runs(tmp_path / "logs")
    ((step, kind),) = run.values("validation/_type")
    assert (step, kind) == (3, "table-file")


def test_a_restart_from_a_checkpoint_resumes_the_same_wandb_run_and_a_fresh_start_does_not(
    tmp_path: Path, wandb_home: Path
) -> None:
    log_a_run(tmp_path, target())
    first_id = (tmp_path / "logs" / RUN_ID_FILE).read_text().strip()
    log_a_run(tmp_path, target(), start=3, steps=2)  # a worker restarted at step 3
    assert (tmp_path / "logs" / RUN_ID_FILE).read_text().strip() == first_id
    log_a_run(tmp_path, target())  # the same output_dir trained again from step 0
    runs: list[OfflineRun] = offline_runs(tmp_path / "logs")
    by_id: dict[str, list[int]] = {}
    for run in runs:  # each run's first logged step, under its W&B id
        by_id.setdefault(run.run_id, []).append(run.values("train/loss")[0][0])
    assert sorted(by_id.pop(first_id)) == [1, 4]
    assert list(by_id.values()) == [[1]]


def test_the_key_is_never_written_into_the_run_or_the_outputs(
    tmp_path: Path, wandb_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    log_a_run(tmp_path / "out", target())
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert written
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path


def test_no_login_is_one_line_naming_both_ways_to_log_in(
    wandb_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    problem = wandb_problem("wandb")
    assert problem is not None and "\n" not in problem
    assert "`wandb login`" in problem and "WANDB_API_KEY" in problem and "WANDB_MODE=offline" in problem
    assert wandb_problem("all") is not None  # all includes W&B when it is installed
    assert wandb_problem("tensorboard") is None and wandb_problem("none") is None

    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_problem("wandb") is None
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    assert wandb_problem("wandb") is None
    monkeypatch.delenv("WANDB_API_KEY")
    # `wandb login` writes the key to ~/.netrc for W&B's API host.
    (wandb_home / ".netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {KEY}\n")
    (wandb_home / ".netrc").chmod(0o600)
    assert wandb_problem("wandb") is None
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert "wandb.example.com" in (wandb_problem("wandb") or "")


def test_report_to_wandb_is_supported_and_a_bad_image_layout_is_one_line(wandb_home: Path) -> None:
    assert report_to_problem("wandb") is None and report_to_problem("all") is None
    assert "'comet_ml'" in (report_to_problem("comet_ml") or "")
    problem = wandb_problem("wandb", "grid")
    assert problem == (
        "'tracker_image_layout' = 'grid': expected one of gallery, table (how validation images appear in W&B)"
    )


def test_the_driver_hands_rank_zero_the_redacted_config_and_the_sweep_as_group(
    tmp_path: Path, tiny_cosmos_dir: Path, wandb_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_ENTITY", "my-team")
    run = write_run_files(
        tmp_path,
        tiny_cosmos_dir,
        [image_dataset(tmp_path / "images", tmp_path / "cache/vae"), text_dataset(tmp_path / "cache/text")],
        report_to="wandb",
        tracker_project_name="cosmos2image-training",
        tracker_run_name="cosmos2image-lora",
        hf_token="hf_secret_value",
        webhook_config='{"webhook_type": "raw", "callback_url": "https://hooks.example.com/secret-path"}',
    ).load()
    single = tracker_target(run, name="raytuner-run")
    assert single is not None
    assert (single.project, single.name, single.group, single.job_type) == (
        "cosmos2image-training",
        "cosmos2image-lora",
        None,
        "train",
    )
    assert single.client == {"mode": "offline", "entity": "my-team"}
    text = repr(single.config)
    assert "hf_secret_value" not in text and "secret-path" not in text
    assert single.config["training"]["learning_rate"] == run.training.optimization.learning_rate

    trial = tracker_target(run, name="sweep-1-abc123", sweep="sweep-1")
    assert trial is not None
    assert (trial.name, trial.group, trial.job_type) == ("sweep-1-abc123", "sweep-1", "trial")
    assert (
        wandb_target({}, report_to="tensorboard", project="p", name="n", image_layout=None, family="omnigen")
        is None
    )
