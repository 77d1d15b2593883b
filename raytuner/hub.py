"""Publishing a run to the Hugging Face Hub: which repo, which files, which commits, checked first.

SimpleTuner's ``push_to_hub`` keys, with SimpleTuner's meaning:

- the repo is ``hub_model_id``, or ``tracker_project_name`` when that is unset. It is created
  before Ray starts, as SimpleTuner creates it at start-up (``create_repo(exist_ok=True,
  private=model_card_private)``), and every upload uses the id the Hub hands back: the Hub fills
  in the user's namespace when ``hub_model_id`` has none;
- at the end, one commit holds the adapter, its EMA twin, the model card ``README.md``, the loss
  curve and the validation images, at the paths they have in ``output_dir`` (the card's widget
  points at them). The configs in ``output_dir/config/`` stay local: they name the machine's paths;
- with ``push_checkpoints_to_hub`` every checkpoint's adapter (and EMA twin), its card and the
  validation images of its step are committed to the repo root as the checkpoint is saved, one
  commit per checkpoint, so the repo's history keeps every checkpoint. A failed checkpoint upload
  is a warning (the checkpoint is safe in the run's storage); a failed final upload is an error
  raised after every local output is written;
- with ``push_to_hub_background`` the checkpoint commits are made by one background thread on the
  rank-0 worker, in the order the checkpoints were saved, from copies of their files (the worker's
  checkpoint folder is deleted once Ray Train has stored it); the worker waits for them before it
  returns, so the final commit always comes after the last checkpoint's.

Commits are built from an explicit file list with ``create_commit``, not ``upload_folder``: with
``hf_xet`` installed ``upload_folder`` may split a folder into several commits, and a commit here
must hold exactly the files named.

The token is the Hub client's own: ``HF_TOKEN`` or the login ``hf auth login`` saved. raytuner
asks only whether one exists; it never passes it on, logs, prints or writes it, never puts it in
the job sent to the workers (they find their own, see README's Hub section), and removes it from
any error text the Hub sends back.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytuner.config import RunConfig
from raytuner.config.fields import problem
from raytuner.config.paths import display
from raytuner.errors import RaytunerError
from raytuner.filenames import ADAPTER_FILENAME
from raytuner.outputs import (
    MODEL_CARD_FILENAME,
    STEP_FOLDER_PREFIX,
    VALIDATION_FOLDER,
    base_model_ids,
    card_images,
    model_card,
)

logger = logging.getLogger(__name__)

LOGIN_HINT = "run `hf auth login` on this machine or set HF_TOKEN in the environment"
EMA_FOLDER = "ema"
LOSS_CURVE_FILENAME = "loss.png"
_REDACTED = "***"


class HubError(RaytunerError, RuntimeError):
    """A one-line reason a Hub call failed; its text never holds the token."""


@dataclass(frozen=True, kw_only=True)
class HubTarget:
    """Where a run publishes, settled on the driver before Ray starts; sent to the workers as is."""

    repo_id: str  # namespace/name, as the Hub returned it
    endpoint: str  # the driver's Hub, so the workers commit to the repo the driver created
    push_checkpoints: bool
    background: bool

    @property
    def url(self) -> str:
        return f"{self.endpoint}/{self.repo_id}"


@dataclass(frozen=True, kw_only=True)
class HubFile:
    """One file of a commit: its path in the repo and its content (a local file or bytes)."""

    path_in_repo: str
    source: Path | bytes


# ---- before any work -----------------------------------------------------------------------------


def requested_repo(run: RunConfig) -> str | None:
    """The repo the config asks for: ``hub_model_id``, else ``tracker_project_name`` (as SimpleTuner)."""
    training = run.training
    for value in (training.tracking.hub_model_id, training.tracking.tracker_project_name):
        if value and value.strip():
            return value.strip()
    return None


def hub_endpoint() -> str:
    """The Hub to publish to: ``HF_ENDPOINT`` as it is now, else the client's default."""
    from huggingface_hub import constants

    # Read when publishing, not when huggingface_hub was imported (the client's own constant).
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def has_token() -> bool:
    """Whether the Hub client finds a token (``HF_TOKEN`` or its saved login); the token stays there."""
    import huggingface_hub

    try:
        return huggingface_hub.get_token() is not None
    except Exception:  # a configured OIDC exchange that fails: no usable token
        return False


def hub_problems(run: RunConfig) -> list[str]:
    """What stops publishing, one line each, found before Ray starts and without the network."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    training = run.training
    where = display(run.sources["config"])
    if not training.tracking.push_to_hub:
        return [
            problem(
                where,
                key,
                True,
                "push_to_hub true as well",
                f'set "push_to_hub": true to publish (and log in: {LOGIN_HINT}), or remove {key}',
            )
            for key in ("push_checkpoints_to_hub", "push_to_hub_background")
            if getattr(training.tracking, key)
        ]
    problems = []
    repo = requested_repo(run)
    if repo is None:
        problems.append(
            problem(
                where,
                "hub_model_id",
                training.tracking.hub_model_id,
                "a Hub repo id to publish to (push_to_hub is true and tracker_project_name is empty too)",
                'set e.g. "hub_model_id": "your-name/cosmos2-lokr"',
            )
        )
    else:
        try:
            validate_repo_id(repo)
        except HFValidationError:
            key = (
                "hub_model_id"
                if training.tracking.hub_model_id and training.tracking.hub_model_id.strip()
                else "tracker_project_name"
            )
            problems.append(
                problem(
                    where,
                    key,
                    repo,
                    "a Hub repo id: 'name' or 'namespace/name' of letters, digits, '-', '_' and '.', "
                    "at most 96 characters, without '--' or '..'",
                    'set e.g. "hub_model_id": "your-name/cosmos2-lokr"',
                )
            )
    if constants.is_offline_mode():
        problems.append(
            f"{where}: 'push_to_hub' = true: expected the Hub to be reachable, but HF_HUB_OFFLINE is set; "
            "unset HF_HUB_OFFLINE to publish, or set push_to_hub false"
        )
    elif not has_token():
        problems.append(
            problem(
                where,
                "push_to_hub",
                True,
                "a Hugging Face token with write access",
                f"{LOGIN_HINT} (raytuner never reads a token from config files)",
            )
        )
    return problems


def open_repo(run: RunConfig) -> HubTarget:
    """Create the run's repo (or find it) and settle where every upload goes; ``HubError`` if refused."""
    from huggingface_hub import HfApi

    training = run.training
    repo = requested_repo(run)
    assert repo is not None, "hub_problems() refuses a run without a repo id"
    endpoint = hub_endpoint()
    try:
        url = HfApi(endpoint=endpoint).create_repo(
            repo, exist_ok=True, private=training.tracking.model_card_private
        )
    except Exception as error:
        raise HubError(
            f"cannot create or open the Hub repo {repo} at {endpoint}: {_reason(error)}; check the repo id "
            f"and that the token may write to it ({LOGIN_HINT}); nothing was trained"
        ) from None
    target = HubTarget(
        repo_id=url.repo_id,
        endpoint=endpoint,
        push_checkpoints=training.tracking.push_checkpoints_to_hub,
        background=training.tracking.push_to_hub_background,
    )
    logger.info(
        "publishing to the Hub repo %s%s%s",
        target.url,
        " (created private)" if training.tracking.model_card_private else "",
        ", every checkpoint as it is saved" if target.push_checkpoints else ", at the end of training",
    )
    return target


# ---- commits -------------------------------------------------------------------------------------


def _reason(error: BaseException) -> str:
    """An error in one line: the HTTP status and the Hub's own message, without the token if echoed."""
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError) and error.response is not None:
        server = (error.server_message or "").strip()
        lines = [f"HTTP {error.response.status_code}" + (f": {server.splitlines()[0]}" if server else "")]
    else:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return _without_token(lines[0] if lines else type(error).__name__)


def _without_token(text: str) -> str:
    import huggingface_hub

    try:
        token = huggingface_hub.get_token()
    except Exception:
        return text
    return text.replace(token, _REDACTED) if token else text


def commit_files(target: HubTarget, files: Sequence[HubFile], *, summary: str, description: str) -> str:
    """One commit of exactly ``files`` to the repo's main branch; its URL. ``HubError`` on failure."""
    from huggingface_hub import CommitOperationAdd, HfApi

    operations = [
        CommitOperationAdd(
            path_in_repo=file.path_in_repo,
            path_or_fileobj=str(file.source) if isinstance(file.source, Path) else file.source,
        )
        for file in files
    ]
    try:
        info: Any = HfApi(endpoint=target.endpoint).create_commit(
            target.repo_id, operations, commit_message=summary, commit_description=description
        )
    except Exception as error:
        raise HubError(f"the Hub refused the commit to {target.repo_id}: {_reason(error)}") from None
    return str(info.commit_url)


def commit_description(run: RunConfig, *, step: int, total_steps: int) -> str:
    """What a commit's description says about the training behind it (no paths, no secrets)."""
    training = run.training
    base, _ = base_model_ids(run)
    return (
        f"Trained with raytuner for {step} of {total_steps} steps.\n"
        f"Base model: {base} ({training.model.model_family}).\n"
        f"Learning rate {training.optimization.learning_rate} ({training.optimization.lr_scheduler}), {training.optimization.optimizer}, "
        f"batch size {training.optimization.train_batch_size} per worker, "
        f"{training.optimization.gradient_accumulation_steps} gradient accumulation step(s), seed {run.seed}."
    )


def adapter_files(folder: Path) -> list[HubFile]:
    """The adapter and, when there is one, its EMA twin, at the paths the card names."""
    files = [HubFile(path_in_repo=ADAPTER_FILENAME, source=folder / ADAPTER_FILENAME)]
    ema = folder / EMA_FOLDER / ADAPTER_FILENAME
    if ema.is_file():
        files.append(HubFile(path_in_repo=f"{EMA_FOLDER}/{ADAPTER_FILENAME}", source=ema))
    return files


def validation_files(output_dir: Path, *, step: int | None = None) -> list[HubFile]:
    """Validation images under ``validation/`` (one step's, or every step's and the grid)."""
    root = output_dir / VALIDATION_FOLDER
    folder = root / f"{STEP_FOLDER_PREFIX}{step}" if step is not None else root
    pattern = "*.png" if step is not None else "**/*.png"
    return [
        HubFile(path_in_repo=path.relative_to(output_dir).as_posix(), source=path)
        for path in sorted(folder.glob(pattern))
        if path.is_file()
    ]


def final_files(output_dir: Path) -> list[HubFile]:
    """What the end of training publishes from ``output_dir``."""
    files = adapter_files(output_dir)
    files.append(HubFile(path_in_repo=MODEL_CARD_FILENAME, source=output_dir / MODEL_CARD_FILENAME))
    if (output_dir / LOSS_CURVE_FILENAME).is_file():
        files.append(HubFile(path_in_repo=LOSS_CURVE_FILENAME, source=output_dir / LOSS_CURVE_FILENAME))
    return files + validation_files(output_dir)


def final_commit_summary(steps: int) -> str:
    return f"LoKr adapter trained for {steps} steps (raytuner)"


def checkpoint_commit_summary(step: int, total_steps: int) -> str:
    return f"Checkpoint at step {step} of {total_steps} (raytuner)"


def publish_run(run: RunConfig, target: HubTarget, *, steps: int) -> str:
    """The end-of-training commit, once every local output is written; its URL.

    A failure is one ``HubError`` line naming the repo and where the outputs are: nothing local is
    lost, only the upload.
    """
    output_dir = run.training.output_dir
    files = final_files(output_dir)
    try:
        url = commit_files(
            target,
            files,
            summary=final_commit_summary(steps),
            description=commit_description(run, step=steps, total_steps=steps),
        )
    except HubError as error:
        raise HubError(
            f"publishing to the Hub repo {target.repo_id} failed ({error}); nothing local is lost: "
            f"every output of the run is in {output_dir}"
        ) from None
    logger.info("published %d file(s) to %s: %s", len(files), target.url, url)
    return url


class CheckpointUploads:
    """Rank 0's checkpoint commits: each checkpoint's adapter, card and step images, one commit each.

    ``publish`` is called while the checkpoint folder still exists (the worker deletes it once Ray
    Train has stored it). A failed upload is logged as a warning and training goes on.
    """

    def __init__(
        self, target: HubTarget, run: RunConfig, *, prompts: Mapping[str, str], total_steps: int
    ) -> None:
        self.target = target
        self.run = run
        self.prompts = dict(prompts)
        self.total_steps = total_steps
        self.published: list[int] = []  # steps whose commit the Hub accepted
        self.failed: list[int] = []
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="raytuner-hub")
            if target.background
            else None
        )
        self._pending: list[Future[None]] = []
        # A worker finds its own token; on a cluster it may have none although the driver had one.
        self.has_token = has_token()
        if not self.has_token:
            logger.warning(
                "no Hugging Face token on this worker: checkpoints are not published to %s (the final upload "
                "still runs on the driver); %s, or on a cluster set HF_TOKEN in the nodes' or the job's environment",
                target.repo_id,
                LOGIN_HINT,
            )

    def files(self, folder: Path, *, step: int, eval_loss: float | None) -> list[HubFile]:
        """The checkpoint's adapter(s) from ``folder``, its card, and its step's validation images."""
        output_dir = self.run.training.output_dir
        adapters = adapter_files(folder)
        card = model_card(
            self.run,
            steps=step,
            eval_loss=eval_loss,
            ema=len(adapters) > 1,
            images=card_images(self.run, output_dir, prompts=self.prompts, step=step),
        )
        return [
            *adapters,
            HubFile(path_in_repo=MODEL_CARD_FILENAME, source=card.encode("utf-8")),
            *validation_files(output_dir, step=step),
        ]

    def publish(self, folder: Path, *, step: int, eval_loss: float | None) -> None:
        if not self.has_token:
            self.failed.append(step)  # said once, when the uploads were set up
            return
        files = self.files(folder, step=step, eval_loss=eval_loss)
        if self._executor is None:
            self._commit(files, step=step)
            return
        staging = Path(tempfile.mkdtemp(prefix="raytuner-hub-"))
        try:
            staged = [self._stage(file, staging / str(index)) for index, file in enumerate(files)]
        except OSError as error:  # a full disk must not stop training either
            shutil.rmtree(staging, ignore_errors=True)
            self._warn(step, f"its files could not be copied aside for the upload ({error})")
            return
        self._pending.append(self._executor.submit(self._commit_staged, staged, step=step, staging=staging))

    @staticmethod
    def _stage(file: HubFile, folder: Path) -> HubFile:
        """A copy of ``file`` in ``folder``, which outlives the checkpoint folder it came from."""
        if not isinstance(file.source, Path):
            return file
        folder.mkdir()
        copy = folder / file.source.name
        shutil.copyfile(file.source, copy)
        return HubFile(path_in_repo=file.path_in_repo, source=copy)

    def _commit_staged(self, files: list[HubFile], *, step: int, staging: Path) -> None:
        try:
            self._commit(files, step=step)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _commit(self, files: list[HubFile], *, step: int) -> None:
        try:
            url = commit_files(
                self.target,
                files,
                summary=checkpoint_commit_summary(step, self.total_steps),
                description=commit_description(self.run, step=step, total_steps=self.total_steps),
            )
        except HubError as error:
            self._warn(step, str(error))
            return
        self.published.append(step)
        logger.info("checkpoint at step %d published to %s: %s", step, self.target.url, url)

    def _warn(self, step: int, reason: str) -> None:
        self.failed.append(step)
        logger.warning(
            "checkpoint at step %d was not published to the Hub: %s; training goes on (the checkpoint is "
            "kept in the run's storage)",
            step,
            reason,
        )

    def close(self) -> None:
        """Wait for the background commits still running (none without ``push_to_hub_background``)."""
        if self._executor is None:
            return
        running = sum(not future.done() for future in self._pending)
        if running:
            logger.info("waiting for %d checkpoint upload(s) to the Hub", running)
        self._executor.shutdown(wait=True)
        for future in self._pending:
            error = future.exception()
            if error is not None:  # not a refusal by the Hub (those are warned about as they happen)
                logger.warning("a checkpoint upload to the Hub failed: %s", _reason(error))
        self._pending.clear()
