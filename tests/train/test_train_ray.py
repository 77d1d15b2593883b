"""``raytuner train`` end to end on the session's 2-node Ray: real Ray Train, tiny checkpoints, CPU.

One Cosmos2 configuration is trained several ways that must all give the same adapter, since the
plan, each sample's noise, sigma and caption dropout depend only on (seed, sample, step):

* 2 workers x batch 2 (the full run: EMA, validation, eval loss, checkpoints, every output);
* 1 worker x batch 2 x 2 accumulation steps (the same global batch of 4), checkpointing every
  2nd block (gradient_checkpointing_interval) and reading the dataset through its end_step schedule;
* that run stopped at step 3 and resumed from ``latest``, and started again from a checkpoint path;
* that run with a worker killed at step 5 and restarted by Ray Train from its last checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from raytuner.adapters import load_adapter
from raytuner.batches.plan import BatchShape
from raytuner.batches.reader import caption_dropped, eval_caches, open_training_data
from raytuner.evaluate.clip_score import ClipScorer
from raytuner.evaluate.eval_loss import eval_samples, evaluation_loss
from raytuner.evaluate.metrics import read_metrics
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.models.registry import get_family
from raytuner.models.tiny import build_tiny_clip
from raytuner.train.launcher import TrainError, TrainOutcome
from tests.train.faults import KillWorker
from tests.training_data import (
    SECRET,
    STEPS,
    Data,
    adapter_tensors,
    assert_same_adapter,
    checkpoints,
    cosmos_training_data,
    load_run,
    train,
    train_lines,
)
from tests.wandb_records import offline_runs
from tests.webhook_server import WebhookServer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def masked_cosmos_data(tmp_path_factory: pytest.TempPathFactory, tiny_cosmos_dir: Path) -> Data:
    """8 training images with loss masks and 2 eval images, one shared cache for every run here."""
    return cosmos_training_data(tmp_path_factory.mktemp("train-data"), tiny_cosmos_dir, masks=True)


@pytest.fixture(scope="module")
def webhook_server() -> Iterator[WebhookServer]:
    server = WebhookServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def two_workers(
    ray_cluster, masked_cosmos_data: Data, tmp_path_factory, webhook_server: WebhookServer
) -> TrainOutcome:
    # The webhooks' URL and token are SECRET, so the check that no output holds it covers them too.
    return train(
        tmp_path_factory.mktemp("two-workers"),
        masked_cosmos_data,
        workers=2,
        webhook_config=[
            {
                "webhook_type": "discord",
                "webhook_url": webhook_server.url(f"/api/webhooks/1/{SECRET}"),
                "message_prefix": "two",
            },
            {"webhook_type": "raw", "callback_url": webhook_server.url("/raw"), "auth_token": SECRET},
        ],
    )


@pytest.fixture(scope="module")
def one_worker_accumulating(ray_cluster, masked_cosmos_data: Data, tmp_path_factory) -> TrainOutcome:
    # Two settings that must not change the adapter ride along: gradient checkpointing of every
    # 2nd block only (gradient_checkpointing_interval), and an end_step on the training dataset
    # at the last step, so the workers walk the scheduled plan (start_step/end_step) to the same
    # batches as the plain plan.
    images, *others = masked_cosmos_data.datasets
    scheduled = Data(datasets=[{**images, "end_step": STEPS}, *others], model=masked_cosmos_data.model)
    return train(
        tmp_path_factory.mktemp("one-worker"),
        scheduled,
        workers=1,
        gradient_accumulation_steps=2,
        gradient_checkpointing=True,
        gradient_checkpointing_interval=2,
    )


def test_two_workers_train_validate_evaluate_and_write_every_output(two_workers: TrainOutcome) -> None:
    output = two_workers.output_dir
    lines = train_lines(output)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    # Every report carries the latest eval loss, from the step-0 baseline on.
    assert all("eval_loss" in line for line in lines)
    evals = [e for e in read_metrics(output / "logs" / "metrics.jsonl") if e.get("kind") == "eval"]
    assert [e["step"] for e in evals] == [0, 4, STEPS]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    for key in ("loss", "lr", "grad_norm", "samples_per_second", "step_time_s", "data_wait_fraction"):
        assert all(isinstance(line[key], float) for line in lines), key

    for step in (3, STEPS):
        names = sorted(p.name for p in (output / "validation" / f"step_{step}").glob("*.png"))
        assert names == [
            "unconditional-32x32-ema.png",
            "unconditional-32x32.png",
            "validation-32x32-ema.png",
            "validation-32x32.png",
        ]
    for picture in ("loss.png", "validation/grid.png"):
        assert (output / picture).stat().st_size > 0, picture
    assert list((output / "logs" / "tensorboard").glob("events.out.tfevents.*"))

    # checkpoints_total_limit 2 of the checkpoints at steps 2, 4 and 6.
    assert checkpoints(output) == ["checkpoint-0000004", "checkpoint-0000006"]
    card = (output / "README.md").read_text()
    assert "create_lycoris_from_weights" in card and "Cosmos2TextToImagePipeline" in card
    for name in ("config.json", "multidatabackend.json", "lycoris_config.json"):
        assert (output / "config" / name).is_file()
    for path in output.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_two_workers_send_the_runs_events_to_their_webhooks(
    two_workers: TrainOutcome, webhook_server: WebhookServer
) -> None:
    received = list(webhook_server.requests)  # rank 0 drains its queue before fit() returns
    raw = [request.json for request in received if request.path == "/raw"]
    discord = [request for request in received if request.path.startswith("/api/webhooks/")]
    assert raw[0]["type"] == "training.status" and raw[0]["data"]["world_size"] == 2
    progress = [
        event
        for event in raw
        if event["type"] == "training.status" and event.get("progress", {}).get("label") == "Training"
    ]
    assert [event["progress"]["current"] for event in progress] == list(range(1, STEPS + 1))
    validations = [event for event in raw if event["type"] == "training.validation"]
    assert [event["data"]["step"] for event in validations] == [3, STEPS]  # once each: rank 0 only
    assert all(len(event["images"]) == 4 for event in validations)
    saved = [
        event["checkpoint"]["path"].rsplit("/", 1)[-1]
        for event in raw
        if event["type"] == "training.checkpoint"
    ]
    assert saved == ["checkpoint-0000002", "checkpoint-0000004", "checkpoint-0000006"]
    assert raw[-1]["stage"]["key"] == "training_complete"
    assert raw[-1]["data"]["adapter"] == str(two_workers.adapter)
    assert not [event for event in raw if event["type"] == "notification"]
    assert all(request.headers["x-api-key"] == SECRET for request in received if request.path == "/raw")
    assert [len(request.files) for request in discord if request.files] == [4, 4]
    assert all(part.content_type == "image/png" for request in discord for part in request.files)
    assert discord[0].json["content"].startswith("`(two)` Training ")


def test_the_adapter_and_its_ema_twin_load_with_the_seeds_recipe(
    two_workers: TrainOutcome, masked_cosmos_data: Data
) -> None:
    family = get_family("cosmos2image")
    for path in (two_workers.adapter, two_workers.output_dir / "ema" / ADAPTER_FILENAME):
        transformer = family.transformer_class.from_pretrained(
            masked_cosmos_data.model, subfolder="transformer"
        )
        assert load_adapter(path, transformer, merge=True).loras
    trained, averaged = (
        adapter_tensors(two_workers.adapter),
        adapter_tensors(two_workers.output_dir / "ema" / ADAPTER_FILENAME),
    )
    assert any(not torch.equal(trained[key], averaged[key]) for key in trained)


def test_one_worker_with_accumulation_matches_two_workers(
    two_workers: TrainOutcome, one_worker_accumulating: TrainOutcome
) -> None:
    assert_same_adapter(two_workers.adapter, one_worker_accumulating.adapter)
    first, second = train_lines(two_workers.output_dir), train_lines(one_worker_accumulating.output_dir)
    assert [a["loss"] for a in first] == pytest.approx([b["loss"] for b in second], rel=1e-4)


def test_resume_from_latest_on_object_storage_continues_the_step_count_and_the_curve(
    ray_cluster, s3_server, masked_cosmos_data: Data, tmp_path: Path, one_worker_accumulating: TrainOutcome
) -> None:
    """Checkpoints written to S3 (ray_storage_path), and the next run resumes from the latest."""
    bucket = s3_server.create_bucket("raytuner-runs")
    options = {
        "workers": 1,
        "gradient_accumulation_steps": 2,
        "ray_storage_path": f"s3://{bucket}/checkpoints",
    }
    first = train(tmp_path, masked_cosmos_data, max_train_steps=3, **options)
    assert [line["step"] for line in train_lines(tmp_path / "output")] == [1, 2, 3]
    listed = s3_server.filesystem().get_file_info(pafs.FileSelector(f"{bucket}/checkpoints", recursive=True))
    names = {info.path.rsplit("/", 1)[-1] for info in listed}
    assert {"raytuner_checkpoint.json", "training_state.pt", ADAPTER_FILENAME} <= names
    assert first.checkpoint is not None and "checkpoint-0000003" in first.checkpoint
    resumed = train(tmp_path, masked_cosmos_data, **options)
    lines = train_lines(resumed.output_dir)
    assert [line["step"] for line in lines] == list(range(1, STEPS + 1))
    # The continued run started from step 3's state: its first step is 4, none trained twice.
    raw = [json.loads(line) for line in (resumed.output_dir / "logs/metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in raw if e.get("kind", "train") == "train"] == list(range(1, STEPS + 1))
    assert_same_adapter(resumed.adapter, one_worker_accumulating.adapter)


def test_a_checkpoint_path_is_the_starting_state_of_a_new_run(
    ray_cluster, masked_cosmos_data: Data, tmp_path: Path, one_worker_accumulating: TrainOutcome
) -> None:
    checkpoint = next((one_worker_accumulating.output_dir / "ray").glob("*/checkpoint-0000004"))
    started = train(
        tmp_path,
        masked_cosmos_data,
        workers=1,
        gradient_accumulation_steps=2,
        resume_from_checkpoint=str(checkpoint),
    )
    assert [line["step"] for line in train_lines(started.output_dir)] == [5, 6]
    assert_same_adapter(started.adapter, one_worker_accumulating.adapter)


def test_a_killed_worker_is_replaced_and_the_run_reaches_its_last_step(
    ray_cluster, masked_cosmos_data: Data, tmp_path: Path, one_worker_accumulating: TrainOutcome
) -> None:
    marker = tmp_path / "failed-once"
    outcome = train(
        tmp_path,
        masked_cosmos_data,
        workers=1,
        max_failures=1,
        gradient_accumulation_steps=2,
        callbacks=(KillWorker(step=5, marker=marker),),
    )
    assert marker.is_file()
    raw = [json.loads(line) for line in (outcome.output_dir / "logs/metrics.jsonl").read_text().splitlines()]
    steps = [e["step"] for e in raw if e.get("kind", "train") == "train"]
    # Step 5 was trained, then the worker died before its report; the restarted group resumed
    # from the checkpoint at step 4 and trained 5 and 6 again, from that state.
    assert steps == [1, 2, 3, 4, 5, 5, 6]
    assert outcome.steps == STEPS
    assert_same_adapter(outcome.adapter, one_worker_accumulating.adapter)


def test_a_run_without_retries_fails_with_one_line_and_the_driver_sends_it_to_the_webhook(
    ray_cluster, masked_cosmos_data: Data, tmp_path: Path, webhook_server: WebhookServer
) -> None:
    with pytest.raises(TrainError) as raised:
        train(
            tmp_path,
            masked_cosmos_data,
            workers=1,
            callbacks=(KillWorker(step=1, marker=tmp_path / "failed"),),
            max_train_steps=2,
            validation_prompt=None,
            webhook_config={"webhook_type": "raw", "callback_url": webhook_server.url("/fail")},
        )
    assert "\n" not in str(raised.value)
    # Worker 0 exits abruptly, so the failure is the driver's to send.
    failed = [
        request.json
        for request in webhook_server.requests
        if request.path == "/fail"
        and request.json["type"] in ("notification", "training.status")
        and request.json.get("data", {}).get("status") in ("error", "failed")
    ]
    assert [event["type"] for event in failed] == ["notification", "training.status"]
    assert failed[0]["title"] == "Fatal Error"
    assert failed[0]["message"].startswith("Failed to run training: training failed:")


def test_the_masks_are_cached_beside_the_latents_and_weight_every_training_batch(
    two_workers: TrainOutcome, masked_cosmos_data: Data, tmp_path: Path
) -> None:
    run = load_run(tmp_path, masked_cosmos_data)
    data = open_training_data(run)
    for batch in data.plan(BatchShape(per_worker=2, workers=2), seed=run.seed, epoch=0).batches:
        masks = data.loss_masks(batch, batch.keys)
        assert masks is not None and masks.shape[0] == len(batch.keys)
        width = masks.shape[-1]
        # The left half of each image is learned, the right half ignored, on the latent grid.
        assert torch.equal(masks[..., : width // 2], torch.ones_like(masks[..., : width // 2]))
        assert torch.equal(masks[..., width // 2 :], torch.zeros_like(masks[..., width // 2 :]))


def test_caption_dropout_trains_on_the_cached_empty_prompt(
    two_workers: TrainOutcome, masked_cosmos_data: Data, tmp_path: Path
) -> None:
    run = load_run(tmp_path, masked_cosmos_data)
    data = open_training_data(run)
    batch = data.plan(BatchShape(per_worker=2, workers=2), seed=run.seed, epoch=0).batches[0]
    empty = data.text.conditioning([data.text.role_key("empty")])[0]["prompt_embeds"]
    _, kept = replace(data, caption_dropout=0.0).batch(batch, batch.keys, seed=run.seed, step=1)
    _, dropped = replace(data, caption_dropout=1.0).batch(batch, batch.keys, seed=run.seed, step=1)
    assert all(torch.equal(item["prompt_embeds"], empty) for item in dropped)
    assert not any(torch.equal(item["prompt_embeds"], empty) for item in kept)
    # caption_dropout_probability 0.3: about 3 draws in 10, the same on every rank and every run.
    draws = [caption_dropped(run.seed, key, step, 0.3) for key in batch.keys for step in range(250)]
    assert 0.25 < sum(draws) / len(draws) < 0.35
    assert draws == [caption_dropped(run.seed, key, step, 0.3) for key in batch.keys for step in range(250)]


def test_eval_loss_is_stable_and_uses_the_configured_images_and_noise_levels(
    two_workers: TrainOutcome, masked_cosmos_data: Data, tmp_path: Path
) -> None:
    run = load_run(tmp_path, masked_cosmos_data, num_eval_images=4)
    family = get_family("cosmos2image")(masked_cosmos_data.model)
    transformer = family.load_transformer()
    caches, text = eval_caches(run), open_training_data(run).text
    assert len(eval_samples(caches, run.training.validation.num_eval_images)) == 2  # all the held-out images
    assert len(eval_samples(caches, 1)) == 1

    def loss(timesteps: int, limit: int = 4) -> float:
        samples = eval_samples(caches, limit)
        return evaluation_loss(family, transformer, samples, caches, text, timesteps=timesteps, batch_size=2)

    assert loss(4) == loss(4)  # fixed noise and noise levels: the same weights, the same number
    assert loss(4) != loss(8)
    assert loss(4, limit=1) != loss(4)


def test_clip_scores_and_weights_and_biases_offline_on_an_int8_base(
    ray_cluster, masked_cosmos_data: Data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    clip = build_tiny_clip(tmp_path / "clip")
    # The driver hands WANDB_MODE to rank 0, whose process does not inherit this test's environment.
    monkeypatch.setenv("WANDB_MODE", "offline")
    outcome = train(
        tmp_path,
        masked_cosmos_data,
        workers=1,
        max_train_steps=2,
        validation_step_interval=1,
        evaluation_type="clip",
        pretrained_evaluation_model_name_or_path=str(clip),
        report_to="all",
        tracker_project_name="cosmos2image-training",
        tracker_run_name="cosmos2image-lora",
        base_model_precision="int8-quanto",  # the frozen base in int8 (optimum-quanto)
        quantize_via="cpu",
    )
    logged = read_metrics(outcome.output_dir / "logs" / "metrics.jsonl")
    rounds = [entry for entry in logged if entry.get("kind") == "validation"]
    assert [entry["step"] for entry in rounds] == [1, 2]
    # The scores are the configured CLIP's, of the PNGs written at that step; the unconditional
    # image (empty prompt) is not scored, and the EMA weights' image has its own keys.
    scorer = ClipScorer(str(clip))
    prompt = json.loads((tmp_path / "config.json").read_text())["validation_prompt"]
    for entry in rounds:
        assert sorted(key for key in entry if key.startswith("clip_score")) == [
            "clip_score",
            "clip_score/validation",
            "clip_score_ema",
            "clip_score_ema/validation",
        ]
        folder = outcome.output_dir / "validation" / f"step_{entry['step']}"
        for key, name in (
            ("clip_score", "validation-32x32.png"),
            ("clip_score_ema", "validation-32x32-ema.png"),
        ):
            with Image.open(folder / name) as image:
                expected = scorer.score([image.convert("RGB")], [prompt])[0]
            assert entry[key] == entry[f"{key}/validation"] == pytest.approx(expected, abs=1e-3)

    events = EventAccumulator(str(outcome.output_dir / "logs" / "tensorboard"))
    events.Reload()
    assert [event.step for event in events.Scalars("train/clip_score")] == [1, 2]
    assert [event.step for event in events.Scalars("train/clip_score/validation")] == [1, 2]

    # report_to "all": W&B (offline) got the same numbers and images, under the same names.
    (wandb_run,) = offline_runs(outcome.output_dir / "logs")
    assert (wandb_run.project, wandb_run.name, wandb_run.job_type) == (
        "cosmos2image-training",
        "cosmos2image-lora",
        "train",
    )
    logged_loss = [(entry["step"], entry["loss"]) for entry in train_lines(outcome.output_dir)]
    assert wandb_run.values("train/loss") == [(step, pytest.approx(loss)) for step, loss in logged_loss]
    assert [step for step, _ in wandb_run.values("train/clip_score")] == [1, 2]
    assert [step for step, _ in wandb_run.values("train/eval_loss")][:1] == [0]
    assert wandb_run.values("validation/validation-32x32/caption") == [(1, prompt), (2, prompt)]
    assert len(wandb_run.media()) == 2 * 4  # 4 images a round: prompt and unconditional, and EMA
    assert wandb_run.config["training"]["hf_token"] == "***"
    assert wandb_run.exit_code == 0
    for path in (outcome.output_dir / "logs" / "wandb").rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    # Trained on the int8 base, the adapter loads into the unquantised base with the seeds' recipe
    # (create_lycoris_from_weights + merge_to) and changes what it predicts.
    family = get_family("cosmos2image")
    base = family.transformer_class.from_pretrained(masked_cosmos_data.model, subfolder="transformer")
    adapted = family.transformer_class.from_pretrained(masked_cosmos_data.model, subfolder="transformer")
    assert load_adapter(outcome.adapter, adapted, merge=True).loras
    assert any(
        not torch.equal(weight, base.state_dict()[name]) for name, weight in adapted.state_dict().items()
    )
