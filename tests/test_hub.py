"""Publishing to the Hub (raytuner/hub.py) against a loopback Hub that the real client talks to.

The server (tests/hub_server.py) records every request and every commit's files, so the tests
check exactly what was committed, in which commits, with which card, and that the token travels
only in the Authorization header of the Hub's API requests: never to storage, never in a file,
an error message, a log line, or the output folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from raytuner.cli import main
from raytuner.config import RunConfig
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.hub import (
    CheckpointUploads,
    HubError,
    checkpoint_commit_summary,
    final_commit_summary,
    hub_problems,
    open_repo,
    publish_run,
)
from raytuner.outputs import write_config_copies, write_model_card
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files
from tests.hub_server import Commit, HubServer
from tests.ray_head import clean_environment, short_temp_dir
from tests.training_data import Data

TOKEN = "hf_raytuner_hub_test_token_5f2c9a"
USER = "tester"
PROMPT = "a red circle on a blue background"  # tests/cache/helpers.py's validation_prompt
COSMOS_HUB_ID = "nvidia/Cosmos-Predict2-2B-Text2Image"
STEP_IMAGES = (
    "unconditional-32x32-ema.png",
    "unconditional-32x32.png",
    "validation-32x32-ema.png",
    "validation-32x32.png",
)
EMA_ADAPTER = f"ema/{ADAPTER_FILENAME}"


@pytest.fixture
def hub() -> Iterator[HubServer]:
    server = HubServer(tokens={TOKEN: USER}).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hub_client(hub: HubServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> HubServer:
    """This process's Hub client pointed at the server and logged in with ``HF_TOKEN``.

    huggingface_hub reads HF_HUB_OFFLINE, HF_HUB_DISABLE_XET and the place of its saved login once,
    when it is first imported (tests/conftest.py has turned offline mode on by then), so those are
    set where the client keeps them; a saved login of this machine is never read.
    """
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    return hub


def load_run(root: Path, **config: Any) -> RunConfig:
    """A Cosmos2 run with two small images, named by hub id (nothing is loaded from it here)."""
    draw_images(root / "images", [(64, 64)] * 2)
    datasets = [image_dataset(root / "images", root / "cache/vae"), text_dataset(root / "cache/text")]
    settings = {"validation_resolution": "32x32", "use_ema": True, **config}
    return write_run_files(root, COSMOS_HUB_ID, datasets, **settings).load()  # type: ignore[arg-type]


def write_png(path: Path, colour: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)
    return path


def write_adapter(folder: Path, marker: bytes) -> None:
    """Stand-ins for the adapter files: binary content (so they go up as LFS objects), told apart by ``marker``."""
    for path in (folder / ADAPTER_FILENAME, folder / EMA_ADAPTER):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0safetensors\0" + marker + path.name.encode() + bytes(range(256)) * 8)


def prepare_outputs(run: RunConfig, *, steps: tuple[int, ...] = (3, 6)) -> Path:
    """An output_dir as a finished 6-step run leaves it: adapters, card, curve, images, configs, logs."""
    output_dir = run.training.output_dir
    write_adapter(output_dir, b"final")
    write_png(output_dir / "loss.png", "white")
    for step in steps:
        for index, name in enumerate(STEP_IMAGES):
            write_png(
                output_dir / "validation" / f"step_{step}" / name, ("red", "green", "blue", "gray")[index]
            )
    write_png(output_dir / "validation" / "grid.png", "black")
    write_config_copies(run, output_dir)
    (output_dir / "logs").mkdir(parents=True, exist_ok=True)
    (output_dir / "logs" / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n')
    write_model_card(run, output_dir, steps=6, eval_loss=0.25)
    return output_dir


def front_matter(card: bytes) -> dict[str, Any]:
    text = card.decode("utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.removeprefix("---\n").split("\n---\n", 1)[0])


def card_body(card: bytes) -> str:
    return card.decode("utf-8").split("\n---\n", 1)[1]


def assert_token_only_in_headers(hub: HubServer) -> None:
    requests = hub.upload_api_requests()
    assert requests
    assert all(request.headers.get("authorization") == f"Bearer {TOKEN}" for request in requests)
    # LFS objects go to storage URLs, which never get the token (as the Hub's presigned URLs).
    assert hub.storage_requests()
    assert all("authorization" not in request.headers for request in hub.storage_requests())
    assert not [request.path for request in hub.requests if TOKEN.encode() in request.body]
    assert not [content for content in hub.uploaded_bytes() if TOKEN.encode() in content]


# ---- publishing a finished run -------------------------------------------------------------------


def test_publishing_commits_exactly_the_outputs_with_the_card_and_the_token_only_in_headers(
    hub_client: HubServer, tmp_path: Path
) -> None:
    run = load_run(tmp_path, push_to_hub=True, hub_model_id="cosmos-lokr")
    assert hub_problems(run) == []
    output_dir = prepare_outputs(run)
    target = open_repo(run)
    assert target.repo_id == f"{USER}/cosmos-lokr"

    url = publish_run(run, target, steps=6)

    (commit,) = hub_client.repos[target.repo_id].commits
    images = {f"validation/step_{step}/{name}" for step in (3, 6) for name in STEP_IMAGES}
    assert set(commit.files) == {
        ADAPTER_FILENAME,
        EMA_ADAPTER,
        "README.md",
        "loss.png",
        "validation/grid.png",
        *images,
    }  # not config/ (it names this machine's paths), not logs/
    for path, content in commit.files.items():
        assert content == (output_dir / path).read_bytes(), path
    # The adapters went up as LFS objects through the batch API and storage, the card as a regular file.
    assert (output_dir / ADAPTER_FILENAME).read_bytes() in hub_client.storage.values()
    assert (output_dir / "README.md").read_bytes() not in hub_client.storage.values()
    assert commit.summary == final_commit_summary(6) == "LoKr adapter trained for 6 steps (raytuner)"
    assert "6 of 6 steps" in commit.description and COSMOS_HUB_ID in commit.description
    assert str(tmp_path) not in commit.description
    assert url == f"{hub_client.url}/{target.repo_id}/commit/{commit.oid}"

    card = commit.files["README.md"]
    meta = front_matter(card)
    assert meta["base_model"] == COSMOS_HUB_ID
    assert meta["license"] == "other" and meta["license_name"] == "nvidia-open-model-license"
    assert meta["license_link"].startswith("https://www.nvidia.com/")
    assert meta["pipeline_tag"] == "text-to-image" and meta["library_name"] == "diffusers"
    # model_card_safe_for_work is false unless set, as in SimpleTuner: the card is tagged.
    assert {"lycoris", "lokr", "cosmos2image", "not-for-all-audiences"} <= set(meta["tags"])
    # The newest validation step's images of the trained weights, at the paths committed beside the card.
    assert meta["widget"] == [{"text": PROMPT, "output": {"url": "validation/step_6/validation-32x32.png"}}]
    assert all(entry["output"]["url"] in commit.files for entry in meta["widget"])
    assert "create_lycoris_from_weights" in card_body(card) and "Cosmos2TextToImagePipeline" in card_body(
        card
    )
    assert_token_only_in_headers(hub_client)


@pytest.mark.parametrize(
    ("config", "repo_id", "visibility"),
    [
        ({"hub_model_id": "my-lokr"}, f"{USER}/my-lokr", "public"),
        ({"hub_model_id": "team/my-lokr", "model_card_private": True}, "team/my-lokr", "private"),
        ({"tracker_project_name": "shapes-run"}, f"{USER}/shapes-run", "public"),
    ],
    ids=["namespace-filled-in", "organisation-private", "tracker-project-name"],
)
def test_the_repo_is_hub_model_id_or_tracker_project_name_in_the_namespace_the_hub_fills_in(
    hub_client: HubServer, tmp_path: Path, config: dict[str, Any], repo_id: str, visibility: str
) -> None:
    run = load_run(tmp_path, push_to_hub=True, **config)
    target = open_repo(run)
    assert target.repo_id == repo_id and target.url == f"{hub_client.url}/{repo_id}"
    assert hub_client.repos[repo_id].visibility == visibility
    (create,) = [request for request in hub_client.requests if request.path == "/api/repos/create"]
    assert json.loads(create.body)["visibility"] == visibility
    # Running again finds the repo it created (exist_ok), as a resumed run does.
    assert open_repo(run).repo_id == repo_id
    assert len(hub_client.repos) == 1


@pytest.mark.parametrize("family", ["cosmos2image", "omnigen"])
def test_the_card_front_matter_names_each_familys_license_and_the_note(
    hub_client: HubServer, tmp_path: Path, family: str
) -> None:
    hub_id = {"cosmos2image": COSMOS_HUB_ID, "omnigen": "Shitao/OmniGen-v1-diffusers"}[family]
    note = "Trained on synthetic shapes: a test of the machinery, not of image quality."
    run = load_run(
        tmp_path,
        model_family=family,
        pretrained_model_name_or_path=hub_id,
        push_to_hub=True,
        hub_model_id=f"{family}-lokr",
        model_card_safe_for_work=True,
        model_card_note=note,
    )
    output_dir = prepare_outputs(run)
    publish_run(run, open_repo(run), steps=6)

    card = hub_client.repos[f"{USER}/{family}-lokr"].commits[-1].files["README.md"]
    assert card == (output_dir / "README.md").read_bytes()
    meta = front_matter(card)
    assert meta["base_model"] == hub_id
    if family == "omnigen":
        assert meta["license"] == "mit" and "license_name" not in meta
    else:
        assert meta["license"] == "other" and meta["license_name"] == "nvidia-open-model-license"
    assert "not-for-all-audiences" not in meta["tags"] and family in meta["tags"]
    title, first_paragraph = card_body(card).strip().split("\n\n")[:2]
    assert title == f"# LyCORIS LoKr adapter for {hub_id}"
    assert first_paragraph == note  # model_card_note: at the top of the card, under its title


# ---- checkpoints ---------------------------------------------------------------------------------


def test_each_checkpoint_is_one_commit_of_its_adapter_card_and_images_and_a_refusal_is_a_warning(
    hub_client: HubServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    run = load_run(tmp_path, push_to_hub=True, push_checkpoints_to_hub=True, hub_model_id="cosmos-lokr")
    prepare_outputs(run)
    target = open_repo(run)
    assert target.push_checkpoints and not target.background
    uploads = CheckpointUploads(target, run, prompts={"validation": PROMPT}, total_steps=6)
    folder = tmp_path / "checkpoint-0000003"
    write_adapter(folder, b"step 3")

    uploads.publish(folder, step=3, eval_loss=0.4)

    (commit,) = hub_client.repos[target.repo_id].commits
    assert commit.summary == checkpoint_commit_summary(3, 6) == "Checkpoint at step 3 of 6 (raytuner)"
    assert set(commit.files) == {ADAPTER_FILENAME, EMA_ADAPTER, "README.md"} | {
        f"validation/step_3/{name}" for name in STEP_IMAGES
    }
    assert commit.files[ADAPTER_FILENAME] == (folder / ADAPTER_FILENAME).read_bytes()
    assert commit.files[EMA_ADAPTER] == (folder / EMA_ADAPTER).read_bytes()
    meta = front_matter(commit.files["README.md"])
    assert meta["widget"] == [{"text": PROMPT, "output": {"url": "validation/step_3/validation-32x32.png"}}]
    assert "| steps | 3 |" in card_body(commit.files["README.md"])

    # The Hub refuses the next one (and echoes the token in its error): a warning, and training goes on.
    hub_client.refuse_commits = True
    with caplog.at_level(logging.WARNING, logger="raytuner.hub"):
        uploads.publish(folder, step=6, eval_loss=0.3)
    assert uploads.published == [3] and uploads.failed == [6]
    (warning,) = [record.getMessage() for record in caplog.records if record.name == "raytuner.hub"]
    assert "checkpoint at step 6 was not published" in warning and "training goes on" in warning
    assert target.repo_id in warning and "HTTP 403: write access refused" in warning
    assert TOKEN not in caplog.text
    assert len(hub_client.repos[target.repo_id].commits) == 1


def test_background_uploads_commit_each_checkpoint_in_order_after_its_folder_is_gone(
    hub_client: HubServer, tmp_path: Path
) -> None:
    run = load_run(
        tmp_path,
        push_to_hub=True,
        push_checkpoints_to_hub=True,
        push_to_hub_background=True,
        hub_model_id="cosmos-lokr",
    )
    prepare_outputs(run, steps=(2, 4, 6))
    target = open_repo(run)
    assert target.background
    uploads = CheckpointUploads(target, run, prompts={"validation": PROMPT}, total_steps=6)
    hub_client.commit_gate = threading.Event()  # the Hub takes its time: commits wait for the test
    written: dict[int, bytes] = {}
    for step in (2, 4, 6):
        folder = tmp_path / f"checkpoint-{step:07d}"
        write_adapter(folder, f"step {step}".encode())
        written[step] = (folder / ADAPTER_FILENAME).read_bytes()
        uploads.publish(folder, step=step, eval_loss=None)
        shutil.rmtree(folder)  # as the worker deletes it once Ray Train has stored it
    # publish() returned for all three while the first commit is still held: training was not blocked.
    assert hub_client.repos[target.repo_id].commits == []

    hub_client.commit_gate.set()
    uploads.close()  # what the worker does before it returns

    commits: list[Commit] = hub_client.repos[target.repo_id].commits
    assert [c.summary for c in commits] == [checkpoint_commit_summary(step, 6) for step in (2, 4, 6)]
    assert [c.files[ADAPTER_FILENAME] for c in commits] == [written[step] for step in (2, 4, 6)]
    assert uploads.published == [2, 4, 6] and uploads.failed == []


def test_a_failed_final_upload_is_one_line_naming_the_repo_and_where_the_outputs_are(
    hub_client: HubServer, tmp_path: Path
) -> None:
    run = load_run(tmp_path, push_to_hub=True, hub_model_id="cosmos-lokr")
    output_dir = prepare_outputs(run)
    target = open_repo(run)
    hub_client.refuse_commits = True

    with pytest.raises(HubError) as caught:
        publish_run(run, target, steps=6)

    message = str(caught.value)
    assert "\n" not in message and TOKEN not in message
    assert f"publishing to the Hub repo {target.repo_id} failed" in message
    assert f"nothing local is lost: every output of the run is in {output_dir}" in message
    assert (output_dir / ADAPTER_FILENAME).is_file() and (output_dir / "README.md").is_file()


# ---- before any work -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "token", "expected"),
    [
        (
            # A token in config.json is never used (hf_token is not applicable): still no token.
            {"push_to_hub": True, "hub_model_id": "cosmos-lokr", "hf_token": "hf_written_in_config_json"},
            False,
            ["'push_to_hub' = true: expected a Hugging Face token", "`hf auth login`", "HF_TOKEN"],
        ),
        (
            {"push_to_hub": True, "tracker_project_name": ""},
            True,
            ["'hub_model_id' = null: expected a Hub repo id", '"hub_model_id": "your-name/cosmos2-lokr"'],
        ),
        (
            {"push_checkpoints_to_hub": True},
            True,
            ["'push_checkpoints_to_hub' = true: expected push_to_hub true as well", '"push_to_hub": true'],
        ),
    ],
    ids=["no-token", "no-repo-id", "checkpoints-without-push"],
)
def test_publishing_problems_are_one_error_line_before_any_work(
    hub_client: HubServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    config: dict[str, Any],
    token: bool,
    expected: list[str],
) -> None:
    if not token:
        monkeypatch.delenv("HF_TOKEN")
    run = load_run(tmp_path, **config)

    assert main(["train", "--config", str(run.sources["config"])]) == 2

    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    assert all(fragment in errors[0] for fragment in expected), errors[0]
    assert "hf_written_in_config_json" not in errors[0]
    # Nothing started: no output folder, no request to the Hub.
    assert not run.training.output_dir.exists()
    assert hub_client.requests == []


# ---- end to end ----------------------------------------------------------------------------------

E2E_STEPS = 4
E2E_CONFIG: dict[str, Any] = {
    "train_batch_size": 2,
    "learning_rate": 3e-2,
    "optimizer": "torch-adamw",
    "lr_scheduler": "constant",
    "mixed_precision": "no",
    "gradient_checkpointing": False,
    "max_train_steps": E2E_STEPS,
    "checkpoint_step_interval": 2,
    "validation_step_interval": 2,
    "validation_resolution": "32x32",
    "validation_num_inference_steps": 2,
    "validation_guidance": 2.0,
    "eval_timesteps": 4,
    "use_ema": True,
    "ema_decay": 0.9,
    "ray_num_workers": 1,
    "push_to_hub": True,
    "push_checkpoints_to_hub": True,
    "hub_model_id": "tiny-cosmos-lokr",
}


@pytest.mark.ray  # raytuner train starts a local Ray of its own
@pytest.mark.slow
def test_raytuner_train_publishes_every_checkpoint_and_the_final_adapter_without_leaking_the_token(
    hub: HubServer, tiny_cosmos_dir: Path, cosmos_data: Data, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("hub-e2e")
    # The session's images: their cache is built by whichever run trains on them first.
    config = write_run_files(root, cosmos_data.model, cosmos_data.datasets, **E2E_CONFIG).config
    temp_dir, remove_temp = short_temp_dir(tmp_path_factory, "rh")
    environment = {
        name: value
        for name, value in clean_environment().items()
        if name not in ("HF_HUB_OFFLINE", "HF_TOKEN")
    }
    environment |= {
        "RAY_TMPDIR": str(temp_dir),
        "HF_ENDPOINT": hub.url,
        "HF_TOKEN": TOKEN,  # the driver's environment: the local Ray's workers inherit it
        "HF_HOME": str(root / "hf-home"),
        "HF_HUB_DISABLE_XET": "1",  # the basic LFS upload the server speaks (see tests/hub_server.py)
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    try:
        finished = subprocess.run(
            [sys.executable, "-m", "raytuner.cli", "train", "--config", str(config)],
            env=environment,
            cwd=root,
            capture_output=True,
            timeout=600,
        )
    finally:
        if remove_temp:
            shutil.rmtree(temp_dir, ignore_errors=True)
    logs = finished.stdout + finished.stderr
    assert finished.returncode == 0, logs.decode(errors="replace")[-6000:]

    repo_id = f"{USER}/tiny-cosmos-lokr"
    output_dir = root / "output"
    assert f"hub:         {hub.url}/{repo_id}".encode() in finished.stdout
    commits = hub.repos[repo_id].commits
    assert [commit.summary for commit in commits] == [
        checkpoint_commit_summary(2, E2E_STEPS),
        checkpoint_commit_summary(4, E2E_STEPS),
        final_commit_summary(E2E_STEPS),
    ]
    stored = {path.name: path for path in (output_dir / "ray").glob("*/checkpoint-*")}
    for commit, step in zip(commits[:2], (2, 4), strict=True):
        assert set(commit.files) == {ADAPTER_FILENAME, EMA_ADAPTER, "README.md"} | {
            f"validation/step_{step}/{name}" for name in STEP_IMAGES
        }
        checkpoint = stored[f"checkpoint-{step:07d}"]
        assert commit.files[ADAPTER_FILENAME] == (checkpoint / ADAPTER_FILENAME).read_bytes()
        assert (
            commit.files[f"validation/step_{step}/validation-32x32.png"]
            == (output_dir / "validation" / f"step_{step}" / "validation-32x32.png").read_bytes()
        )
    final = commits[-1]
    assert set(final.files) == {
        ADAPTER_FILENAME,
        EMA_ADAPTER,
        "README.md",
        "loss.png",
        "validation/grid.png",
        *(f"validation/step_{step}/{name}" for step in (2, 4) for name in STEP_IMAGES),
    }
    for path, content in final.files.items():
        assert content == (output_dir / path).read_bytes(), path
    meta = front_matter(final.files["README.md"])
    # Trained from a local folder: the card names the flavour's hub id, never this machine's path.
    assert meta["base_model"] == COSMOS_HUB_ID
    assert meta["widget"] == [{"text": PROMPT, "output": {"url": "validation/step_4/validation-32x32.png"}}]
    for commit in commits:
        assert str(tiny_cosmos_dir).encode() not in commit.files["README.md"]
        assert str(root) not in commit.description

    assert_token_only_in_headers(hub)
    assert TOKEN.encode() not in logs
    leaks = [path for path in output_dir.rglob("*") if path.is_file() and TOKEN.encode() in path.read_bytes()]
    assert leaks == []
    assert os.environ.get("HF_TOKEN") != TOKEN  # the token lived only in the subprocess's environment
