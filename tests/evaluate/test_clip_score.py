"""CLIP score (``evaluation_type: "clip"``) on the tiny random-weight CLIP, against an independent computation.

The independent side is transformers' own ``CLIPModel.forward``: its ``image_embeds`` and
``text_embeds`` (unit length) give the cosine, and the score is ``100 * max(cos, 0)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPProcessor

from raytuner.config import ConfigError, RunConfig
from raytuner.config.training import DEFAULT_EVALUATION_MODEL
from raytuner.data.synthetic import draw_shape
from raytuner.evaluate.clip_score import SCORE_BATCH_SIZE, ClipScoreError, ClipScorer, clip_model_problem
from raytuner.evaluate.validation import UNCONDITIONAL_NICKNAME, ValidationImage
from raytuner.models.safety import TINY_CHECKPOINT_MARKER
from raytuner.models.tiny import build_tiny_clip, tiny_model_main
from raytuner.train.preflight import training_problems
from raytuner.train.settings import RayOverrides, resolve_settings
from raytuner.train.validate import EMA_LABEL, clip_score_metrics
from tests.cache.helpers import draw_images, image_dataset, text_dataset, write_run_files

pytestmark = pytest.mark.slow  # scores with a tiny CLIP model: seconds a test

PROMPTS = (
    "a red circle on a blue background",
    "a solid green picture",
    "a yellow triangle",
    "a white square on a black background",
    "a blue sky",
    "a photo of a red cat sitting on a wooden table",
)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


@pytest.fixture(scope="module")
def scorer(tiny_clip: Path) -> ClipScorer:
    return ClipScorer(str(tiny_clip))


def known_images() -> list[Image.Image]:
    """Solid colours and drawn shapes, of several sizes and modes (the scorer converts to RGB)."""
    striped = Image.new("RGB", (48, 40), (0, 0, 0))
    draw = ImageDraw.Draw(striped)
    for x in range(0, 48, 8):
        draw.rectangle((x, 0, x + 3, 39), fill=(255, 255, 255))
    return [
        draw_shape("circle", "red", "blue", width=64, height=64),
        Image.new("RGB", (32, 32), (0, 200, 0)),
        draw_shape("triangle", "yellow", "black", width=80, height=48),
        draw_shape("square", "white", "black", width=40, height=72),
        Image.new("L", (50, 50), 128),
        striped.convert("RGBA"),
    ]


def independent_scores(folder: Path, images: list[Image.Image], prompts: list[str]) -> list[float]:
    """One pair at a time through CLIPModel.forward: 100 * max(cos(image_embeds, text_embeds), 0)."""
    model = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    scores = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            inputs = processor(text=[prompt], images=[image.convert("RGB")], return_tensors="pt")
            output = model(**inputs)
            cosine = float((output.image_embeds * output.text_embeds).sum())
            scores.append(100 * max(cosine, 0.0))
    return scores


# --- the tiny CLIP --------------------------------------------------------------------------------


def test_the_tiny_clip_is_a_small_clip_folder_with_the_test_model_marker(tiny_clip: Path) -> None:
    assert sum(path.stat().st_size for path in tiny_clip.iterdir()) < 400_000
    marker = json.loads((tiny_clip / TINY_CHECKPOINT_MARKER).read_text())
    assert marker["family"] == "clip" and marker["test_model"] is True
    model = CLIPModel.from_pretrained(tiny_clip)
    processor = CLIPProcessor.from_pretrained(tiny_clip)
    # OpenAI CLIP's text context and layout: prompts truncate where the real ones do.
    assert model.config.text_config.max_position_embeddings == 77
    assert processor.tokenizer.eos_token_id == len(processor.tokenizer) - 1
    ids = processor.tokenizer("a photo of a red cat")["input_ids"]
    assert ids[0] == processor.tokenizer.bos_token_id and ids[-1] == processor.tokenizer.eos_token_id
    assert len(ids) < len("a photo of a red cat")  # merged pieces, not one token per character
    assert clip_model_problem(str(tiny_clip)) is None


def test_tiny_clip_builds_are_deterministic_per_seed(tiny_clip: Path, tmp_path: Path) -> None:
    same = build_tiny_clip(tmp_path / "seed0", seed=0)
    other = build_tiny_clip(tmp_path / "seed1", seed=1)
    reference = load_file(tiny_clip / "model.safetensors")
    same_weights, other_weights = (
        load_file(same / "model.safetensors"),
        load_file(other / "model.safetensors"),
    )
    assert all(torch.equal(reference[name], same_weights[name]) for name in reference)
    assert any(not torch.equal(reference[name], other_weights[name]) for name in reference)
    # Only weights depend on the seed: a prompt has the same token ids in every build.
    assert (other / "tokenizer.json").read_bytes() == (tiny_clip / "tokenizer.json").read_bytes()


def test_tiny_model_command_writes_the_clip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert tiny_model_main("clip", str(tmp_path / "clip"), seed=2) == 0
    folder_line, summary = capsys.readouterr().out.strip().splitlines()[-2:]
    assert Path(folder_line) == (tmp_path / "clip").resolve()
    assert summary.startswith("clip tiny checkpoint, seed 2") and "text" in summary and "vision" in summary
    assert ClipScorer(folder_line).score([Image.new("RGB", (8, 8))], ["a black square"])[0] >= 0


# --- scores ---------------------------------------------------------------------------------------


def test_scores_of_known_images_equal_an_independent_computation(tiny_clip: Path, scorer: ClipScorer) -> None:
    images = known_images()
    # Every image against every prompt: some cosines are positive, some clamp to 0.
    pairs = [(image, prompt) for image in images for prompt in PROMPTS]
    pair_images, pair_prompts = [image for image, _ in pairs], [prompt for _, prompt in pairs]
    scores = scorer.score(pair_images, pair_prompts)
    expected = independent_scores(tiny_clip, pair_images, pair_prompts)
    assert scores == pytest.approx(expected, abs=1e-3)
    assert all(0.0 <= score <= 100.0 for score in scores)
    assert sum(score > 0 for score in scores) >= 3 and 0.0 in scores
    assert len(set(scores)) > len(scores) // 2  # the pairs score differently


def test_a_batch_scores_each_pair_as_it_scores_alone(scorer: ClipScorer) -> None:
    images = known_images() * 4  # more pairs than one batch, so the scorer splits them
    prompts = [PROMPTS[(index * 5) % len(PROMPTS)] for index in range(len(images))]
    assert len(images) > SCORE_BATCH_SIZE
    together = scorer.score(images, prompts)
    alone = [scorer.score([image], [prompt])[0] for image, prompt in zip(images, prompts, strict=True)]
    assert together == pytest.approx(alone, abs=1e-4)
    assert scorer.score([], []) == []


def test_prompts_beyond_77_tokens_are_truncated(scorer: ClipScorer) -> None:
    image = known_images()[0]
    long_prompt = " ".join(["a red circle on a blue background"] * 20)  # far more than 77 tokens
    assert len(scorer.processor.tokenizer(long_prompt)["input_ids"]) > 77
    scores = scorer.score([image] * 3, [long_prompt, long_prompt + " and a green cat", PROMPTS[0]])
    assert scores[0] == pytest.approx(scores[1], abs=1e-4)  # what follows token 77 is not seen
    assert scores[0] != pytest.approx(scores[2], abs=1e-3)


def test_one_prompt_per_image_is_required(scorer: ClipScorer) -> None:
    with pytest.raises(ValueError, match=r"2 image\(s\) but 1 prompt\(s\)"):
        scorer.score(known_images()[:2], PROMPTS[:1])


# --- models that cannot be used -------------------------------------------------------------------


def copy_without(folder: Path, destination: Path, *names: str) -> Path:
    shutil.copytree(folder, destination, ignore=shutil.ignore_patterns(*names))
    return destination


def _missing(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    return str(root / "no-such-folder")


def _a_file(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    (root / "clip.safetensors").write_bytes(b"not a folder")
    return str(root / "clip.safetensors")


def _t5_folder(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    return str(tiny_cosmos_dir / "text_encoder")  # a T5 encoder's config.json and weights


def _no_config(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    return str(copy_without(tiny_clip, root / "clip", "config.json"))


def _no_weights(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    return str(copy_without(tiny_clip, root / "clip", "model.safetensors"))


def _no_tokenizer(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    return str(copy_without(tiny_clip, root / "clip", "tokenizer*"))


def _no_image_processor(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    return str(copy_without(tiny_clip, root / "clip", "processor_config.json"))


def _not_a_hub_id(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    return "models/clip/vit-large"  # three parts: neither an existing folder nor owner/name


def _uncached_hub_id(root: Path, tiny_clip: Path, tiny_cosmos_dir: Path) -> str:
    assert huggingface_hub.is_offline_mode(), (
        "tests/conftest.py sets HF_HUB_OFFLINE before the hub client loads"
    )
    return "raytuner-tests/no-such-clip"


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (_missing, "no such folder, and not a hub id"),
        (_a_file, "is a file, not a model folder"),
        (_t5_folder, "config.json describes a 't5' model, not CLIP"),
        (_no_config, "the folder has no config.json"),
        (_no_weights, "the folder has no weights"),
        (_no_tokenizer, "the folder has no tokenizer"),
        (_no_image_processor, "the folder has no image processor"),
        (_not_a_hub_id, "no such folder, and not a hub id"),
        (_uncached_hub_id, "not in the local hub cache, and the hub is offline"),
    ],
    ids=lambda value: getattr(value, "__name__", "").strip("_") or None,
)
def test_an_unusable_model_is_one_line_that_names_it(
    tmp_path: Path, tiny_clip: Path, tiny_cosmos_dir: Path, make: Any, reason: str
) -> None:
    model = make(tmp_path, tiny_clip, tiny_cosmos_dir)
    problem = clip_model_problem(model)
    assert problem is not None and "\n" not in problem
    assert problem.startswith(f"CLIP model {model!r}: {reason}")
    with pytest.raises(ClipScoreError) as raised:
        ClipScorer(model)
    assert str(raised.value) == problem


def test_weights_that_do_not_load_are_one_line_errors(tmp_path: Path, tiny_clip: Path) -> None:
    truncated = copy_without(tiny_clip, tmp_path / "truncated", "model.safetensors")
    (truncated / "model.safetensors").write_bytes((tiny_clip / "model.safetensors").read_bytes()[:1000])
    text_only = copy_without(tiny_clip, tmp_path / "text-only", "model.safetensors")
    weights = load_file(tiny_clip / "model.safetensors")
    save_file(
        {k: v for k, v in weights.items() if k.startswith("text_")}, str(text_only / "model.safetensors")
    )
    for folder, reason in ((truncated, "cannot be loaded ("), (text_only, "its weights lack ")):
        assert clip_model_problem(str(folder)) is None  # the cheap check sees every file in place
        with pytest.raises(ClipScoreError) as raised:
            ClipScorer(str(folder))
        message = str(raised.value)
        assert message.startswith(f"CLIP model {str(folder)!r}: {reason}") and "\n" not in message


# --- the validation round's metrics ---------------------------------------------------------------


def validation_image(nickname: str, prompt: str, image: Image.Image, label: str = "") -> ValidationImage:
    width, height = image.size
    return ValidationImage(
        nickname=nickname,
        prompt=prompt,
        width=width,
        height=height,
        label=label,
        path=Path(f"{nickname}-{width}x{height}{'-' + label if label else ''}.png"),
        image=image,
    )


def test_a_round_logs_the_mean_and_each_prompt_but_not_the_empty_prompt(scorer: ClipScorer) -> None:
    red, green, yellow, white, *_ = known_images()
    round_images = [
        validation_image(UNCONDITIONAL_NICKNAME, "", white),
        validation_image("library", PROMPTS[1], green),
        validation_image("validation", PROMPTS[0], red),
        validation_image("validation", PROMPTS[0], yellow),  # a second resolution of the same prompt
        validation_image(UNCONDITIONAL_NICKNAME, "", white, EMA_LABEL),
        validation_image("validation", PROMPTS[0], white, EMA_LABEL),
    ]
    metrics = clip_score_metrics(scorer, round_images)

    def alone(image: Image.Image, prompt: str) -> float:
        return scorer.score([image], [prompt])[0]

    library, red_score, yellow_score = (
        alone(green, PROMPTS[1]),
        alone(red, PROMPTS[0]),
        alone(yellow, PROMPTS[0]),
    )
    assert sorted(metrics) == [
        "clip_score",
        "clip_score/library",
        "clip_score/validation",
        "clip_score_ema",
        "clip_score_ema/validation",
    ]
    assert metrics["clip_score/library"] == pytest.approx(library, abs=1e-4)
    assert metrics["clip_score/validation"] == pytest.approx((red_score + yellow_score) / 2, abs=1e-4)
    assert metrics["clip_score"] == pytest.approx((library + red_score + yellow_score) / 3, abs=1e-4)
    assert metrics["clip_score_ema"] == metrics["clip_score_ema/validation"]
    assert metrics["clip_score_ema"] == pytest.approx(alone(white, PROMPTS[0]), abs=1e-4)
    assert clip_score_metrics(scorer, round_images[:1]) == {}  # only the empty prompt: nothing to score


# --- the config keys ------------------------------------------------------------------------------


def load_run(root: Path, **config: Any) -> RunConfig:
    draw_images(root / "images", [(64, 64)])
    datasets = [image_dataset(root / "images", root / "cache/vae"), text_dataset(root / "cache/text")]
    return write_run_files(root, root / "model", datasets, **config).load()


def test_evaluation_type_is_none_or_clip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # errors name config.json relative to the working directory
    with pytest.raises(ConfigError) as raised:
        load_run(tmp_path, evaluation_type="fid")
    assert raised.value.problems == ("config.json: 'evaluation_type' = 'fid': expected one of: none, clip",)
    for value in ("clip", "none", None):
        run = load_run(tmp_path, evaluation_type=value)
        assert run.training.validation.evaluation_type == value
        assert not [warning for warning in run.warnings if "evaluation" in warning]
    assert run.training.validation.pretrained_evaluation_model_name_or_path == DEFAULT_EVALUATION_MODEL


def test_the_evaluation_model_is_checked_before_ray_starts(
    tmp_path: Path, tiny_clip: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def problems(**config: Any) -> list[str]:
        run = load_run(tmp_path, **config)
        return training_problems(run, resolve_settings(run, RayOverrides(num_workers=1)))

    monkeypatch.chdir(tmp_path)  # errors name config.json relative to the working directory
    missing = str(tmp_path / "no-clip-here")
    assert problems(evaluation_type="clip", pretrained_evaluation_model_name_or_path=str(tiny_clip)) == []
    assert problems(evaluation_type="none", pretrained_evaluation_model_name_or_path=missing) == []
    (line,) = problems(evaluation_type="clip", pretrained_evaluation_model_name_or_path=missing)
    assert line.startswith(
        f"config.json: 'pretrained_evaluation_model_name_or_path': CLIP model {missing!r}: no such folder"
    )
    # The default hub id is not in this machine's (offline) hub cache.
    (line,) = problems(evaluation_type="clip")
    assert DEFAULT_EVALUATION_MODEL in line and "HF_HUB_OFFLINE" in line
    # Each Ray Train worker runs in a working directory of its own: a relative folder is refused.
    monkeypatch.chdir(tiny_clip.parent)
    (line,) = problems(evaluation_type="clip", pretrained_evaluation_model_name_or_path=tiny_clip.name)
    assert line.startswith(f"{tmp_path / 'config.json'}: 'pretrained_evaluation_model_name_or_path' = ")
    assert "a relative folder" in line and f"give its absolute path ({tiny_clip})" in line
