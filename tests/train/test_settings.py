"""The Ray layout of a run without Ray: ray_* keys and flags, cluster paths, the shared-root check,
checkpoint manifests, and the errors a bad training config gets before any work starts."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from raytuner.cli import main
from raytuner.config import ConfigError, RunConfig
from raytuner.config.paths import display
from raytuner.placement import ClusterFacts
from raytuner.storage import Location
from raytuner.train import state
from raytuner.train.checkpointer import checkpoint_name, checkpoint_step
from raytuner.train.launcher import total_steps
from raytuner.train.layout import (
    LayoutError,
    check_marker,
    pin_local_paths,
    place_under_shared_root,
    write_marker,
)
from raytuner.train.preflight import lr_schedule_problem, training_problems
from raytuner.train.settings import RayOverrides, SettingsError, read_settings, resolve_settings, run_name
from tests.cache.helpers import image_dataset, text_dataset, write_run_files


def load(tmp_path: Path, model: Path, **config: object) -> RunConfig:
    datasets = [image_dataset(tmp_path / "images", "cache/vae"), text_dataset("cache/text")]
    (tmp_path / "images").mkdir(exist_ok=True)
    return write_run_files(tmp_path, model, datasets, **config).load()


def test_ray_num_workers_defaults_to_num_processes_and_flags_win(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    eight_gpus = ClusterFacts(cluster_gpus=8)
    # Nothing given: SimpleTuner's every GPU, one worker each.
    assert resolve_settings(load(tmp_path, tiny_cosmos_dir), cluster=eight_gpus).num_workers == 8
    run = load(tmp_path, tiny_cosmos_dir, num_processes=4)
    settings = resolve_settings(run, cluster=eight_gpus)
    assert (settings.num_workers, settings.gpus_per_worker, settings.cpus_per_worker) == (4, 1.0, 1.0)
    assert resolve_settings(run, cluster=ClusterFacts()).num_workers == 4
    run = load(tmp_path, tiny_cosmos_dir, num_processes=4, ray_num_workers=2, ray_gpus_per_worker=1)
    # Sized from the config alone: no GPU needs to be up when the job is submitted.
    assert not read_settings(run).needs_cluster
    settings = resolve_settings(run)
    assert (settings.num_workers, settings.use_gpu) == (2, True)
    config_file = display(run.sources["config"])
    assert settings.placement == f"1 GPU per worker: ray_gpus_per_worker = 1 in {config_file}"
    overridden = resolve_settings(run, RayOverrides(num_workers=3, gpus_per_worker=0, max_failures=-1))
    assert (overridden.num_workers, overridden.use_gpu, overridden.max_failures) == (3, False, -1)
    assert overridden.placement == "CPU: --ray-gpus-per-worker 0"
    # What the start-of-run line says of the workers: what was chosen, and why.
    assert overridden.describe() == "3 worker(s) x {CPU: 1, GPU: 0} (CPU: --ray-gpus-per-worker 0)"


def test_left_unset_gpus_are_chosen_from_the_cluster_and_an_explicit_zero_trains_on_cpus(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    run = load(tmp_path, tiny_cosmos_dir)
    request = read_settings(run)  # checked before Ray: nothing chosen yet
    assert (request.gpus_per_worker, request.num_workers, request.needs_cluster) == (None, None, True)
    autoscaling = ClusterFacts(gpu_node_types=("gpu-spot",))
    settings = request.settle(autoscaling)
    assert (settings.gpus_per_worker, settings.num_workers) == (1.0, 1)
    assert settings.placement.endswith("its autoscaler can add GPU nodes (gpu-spot)")
    cpu_only = request.settle(ClusterFacts())
    assert (cpu_only.gpus_per_worker, cpu_only.placement) == (
        0.0,
        "CPU: no GPU on this Ray cluster and its autoscaler has no GPU node type",
    )
    local = request.settle(ClusterFacts(local=True, cuda_devices=2))
    assert (local.gpus_per_worker, local.num_workers) == (1.0, 2)
    run = load(tmp_path, tiny_cosmos_dir, ray_gpus_per_worker=0)
    on_cpus = resolve_settings(run, cluster=autoscaling)
    assert (on_cpus.use_gpu, on_cpus.placement) == (
        False,
        f"CPU: ray_gpus_per_worker = 0 in {display(run.sources['config'])}",
    )
    with pytest.raises(SettingsError, match="expected GPUs >= 0"):
        read_settings(run, RayOverrides(gpus_per_worker=-1))


def test_checkpoints_live_under_output_dir_unless_ray_storage_path_says_otherwise(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    run = load(tmp_path, tiny_cosmos_dir)
    assert resolve_settings(run).storage_path == str(run.training.output_dir / "ray")
    run = load(tmp_path, tiny_cosmos_dir, ray_storage_path="s3://bucket/runs/")
    assert resolve_settings(run).storage_path == "s3://bucket/runs"
    # The run's name is stable for one output_dir (Ray Train's restore finds it) and differs for another.
    assert run_name(run) == run_name(load(tmp_path, tiny_cosmos_dir, ray_storage_path="s3://bucket/runs/"))
    assert run_name(run) != run_name(load(tmp_path, tiny_cosmos_dir, output_dir=str(tmp_path / "other")))


def test_num_train_epochs_sets_the_step_count_when_max_train_steps_is_unset(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    run = load(tmp_path, tiny_cosmos_dir, max_train_steps=0, num_train_epochs=3)
    assert total_steps(run.training.optimization, steps_per_epoch=5) == 15
    assert (
        total_steps(
            load(tmp_path, tiny_cosmos_dir, max_train_steps=7, num_train_epochs=3).training.optimization,
            steps_per_epoch=5,
        )
        == 7
    )


def test_on_a_cluster_relative_outputs_and_caches_move_under_the_shared_root(
    tmp_path: Path, tiny_cosmos_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_copy = tmp_path / "job"
    job_copy.mkdir()
    monkeypatch.chdir(job_copy)
    run = load(job_copy, tiny_cosmos_dir, output_dir="output/run")
    shared = tmp_path / "shared"
    run, moved = place_under_shared_root(run, str(shared))
    assert run.training.output_dir == shared / "output/run"
    assert {d.id: d.cache_dir_vae or d.cache_dir for d in run.datasets} == {
        "shapes": str(shared / "cache/vae"),
        "text-embeds": str(shared / "cache/text"),
    }
    assert len(moved) == 3
    with pytest.raises(LayoutError, match="object storage"):
        place_under_shared_root(load(job_copy, tiny_cosmos_dir, output_dir="output/run"), "s3://bucket/root")


def test_relative_model_and_cache_paths_are_pinned_for_the_workers(
    tmp_path: Path, tiny_cosmos_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").symlink_to(tiny_cosmos_dir.parent)
    run = load(tmp_path, Path("models") / tiny_cosmos_dir.name)
    run, only_here = pin_local_paths(run)
    assert only_here
    assert run.training.model.pretrained_model_name_or_path == str(tmp_path / "models" / tiny_cosmos_dir.name)
    assert all(Path(d.cache_dir_vae or d.cache_dir or "").is_absolute() for d in run.datasets)


def test_a_worker_that_cannot_see_the_shared_root_fails_clearly(tmp_path: Path) -> None:
    seen, unseen = Location(uri=str(tmp_path / "seen")), Location(uri=str(tmp_path / "unseen"))
    marker = write_marker([seen])
    check_marker(marker, node="node-1")
    # A location the driver wrote to but this worker's node does not share: nothing is there.
    with pytest.raises(LayoutError, match=r"worker on node node-1: .*unseen is not readable here"):
        check_marker(dataclasses.replace(marker, locations=(seen, unseen)), node="node-1")
    other = write_marker([unseen])
    (tmp_path / "unseen" / "raytuner_shared_root.json").write_text(json.dumps({"token": "x"}))
    with pytest.raises(LayoutError, match="another run's marker"):
        check_marker(other, node="node-2")


def test_a_checkpoint_is_refused_unless_written_whole(tmp_path: Path) -> None:
    folder = tmp_path / checkpoint_name(4)
    state.write_state(folder, {"step": 4})
    state.write_rng(folder, 0)
    with pytest.raises(state.CheckpointError, match=r"no raytuner_checkpoint\.json"):
        state.read_manifest(folder)
    state.write_manifest(folder, step=4, world_size=2, steps_per_epoch=3)
    info = state.read_manifest(folder)
    assert (info.step, info.world_size, info.steps_per_epoch) == (4, 2, 3)
    assert checkpoint_step(str(folder)) == 4 and checkpoint_step(str(tmp_path / "other")) is None
    data = (folder / state.STATE_NAME).read_bytes()
    (folder / state.STATE_NAME).write_bytes(data[: len(data) // 2])
    with pytest.raises(state.CheckpointError, match="missing or truncated"):
        state.read_manifest(folder)


def test_a_bad_training_config_is_refused_before_ray_starts(
    tmp_path: Path, tiny_cosmos_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = load(tmp_path, tiny_cosmos_dir, report_to="comet_ml", validation_resolution="64x")
    problems = "\n".join(training_problems(run, resolve_settings(run)))
    assert "'report_to' = 'comet_ml': not implemented yet" in problems
    assert "validation_resolution '64x'" in problems
    with pytest.raises(ConfigError, match="'fp16' is not supported yet; use one of: no, bf16"):
        load(tmp_path, tiny_cosmos_dir, mixed_precision="fp16")
    half_written = tmp_path / "half"
    state.write_state(half_written, {"step": 1})
    config = write_run_files(
        tmp_path,
        tiny_cosmos_dir,
        [image_dataset(tmp_path / "images", "cache/vae"), text_dataset("cache/text")],
        resume_from_checkpoint=str(half_written),
    ).config
    assert main(["train", "--config", str(config)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "resume_from_checkpoint" in error[0] and "not a complete" in error[0]


def test_a_missing_dataset_folder_is_refused_before_ray_starts(
    tmp_path: Path,
    tiny_cosmos_dir: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = write_run_files(
        tmp_path,
        tiny_cosmos_dir,
        [image_dataset(tmp_path / "no-such-folder", "cache/vae"), text_dataset("cache/text")],
    ).config
    with caplog.at_level("INFO"):
        assert main(["train", "--config", str(config)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "'instance_data_dir'" in line and "folder does not exist" in line
    assert not any("starting a local Ray" in record.getMessage() for record in caplog.records)


def test_a_warm_up_longer_than_the_known_steps_is_refused_and_an_epoch_run_waits_for_its_plan(
    tmp_path: Path, tiny_cosmos_dir: Path
) -> None:
    schedule = {"lr_scheduler": "polynomial", "lr_warmup_steps": 50, "learning_rate": 1e-4, "lr_end": 1e-6}
    run = load(tmp_path, tiny_cosmos_dir, max_train_steps=20, **schedule)
    (problem,) = training_problems(run, resolve_settings(run))
    assert "'lr_warmup_steps' = 50 leaves no steps to decay over" in problem
    # With num_train_epochs the step count is known once the epoch is planned, and checked then.
    run = load(tmp_path, tiny_cosmos_dir, max_train_steps=0, num_train_epochs=100, **schedule)
    assert training_problems(run, resolve_settings(run)) == []
    assert lr_schedule_problem(run.training.optimization, 20, world_size=1) is not None
