"""``raytuner generate``: one image in-process, many on Ray Data, adapters merged with the seeds' recipe."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import Cosmos2TextToImagePipeline, OmniGenPipeline
from lycoris import create_lycoris_from_weights
from PIL import Image
from safetensors.torch import load_file, save_file

from raytuner.adapters import build_adapter, save_adapter
from raytuner.cli import main
from raytuner.evaluate.clip_score import ClipScorer
from raytuner.generate.command import GenerateOptions, run_generate
from raytuner.generate.settings import GenerateError
from raytuner.models.registry import get_family
from raytuner.models.safety import TINY_CHECKPOINT_MARKER, PassThroughSafetyChecker
from raytuner.models.tiny import build_tiny_clip
from tests.adapter_helpers import seed_lycoris_config

pytestmark = pytest.mark.slow  # renders the tiny pipelines: seconds a test

FAMILIES = ("cosmos2image", "omnigen")
PIPELINES = {"cosmos2image": Cosmos2TextToImagePipeline, "omnigen": OmniGenPipeline}
FAST = ["--resolution", "64x64", "--steps", "2"]


@pytest.fixture(scope="module")
def adapters(tiny_checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A LoKr adapter per family with random (non-zero) weights, saved as training saves it."""
    root = tmp_path_factory.mktemp("adapters")
    files = {}
    for name in FAMILIES:
        family = get_family(name)(tiny_checkpoints[name])
        network, _ = build_adapter(
            family.load_transformer(), seed_lycoris_config(name), module_aliases=family.module_aliases, seed=0
        )
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for parameter in network.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        files[name] = save_adapter(network, root / name, metadata={"raytuner_family": name})
    return files


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def generate(*args: str) -> int:
    return main(["generate", *args])


def index_of(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text(encoding="utf-8"))


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def seeds_recipe(model: Path, family: str, adapter: Path | None, prompt: str, seed: int) -> np.ndarray:
    """The seeds' inference example, written out: from_pretrained, create_lycoris_from_weights, merge_to."""
    extra = {"safety_checker": PassThroughSafetyChecker()} if family == "cosmos2image" else {}
    pipe = PIPELINES[family].from_pretrained(model, torch_dtype=torch.float32, **extra)
    if adapter is not None:
        wrapper, _ = create_lycoris_from_weights(1.0, str(adapter), pipe.transformer)
        wrapper.merge_to()
    guidance = 7.0 if family == "cosmos2image" else 2.5
    image = pipe(
        prompt=prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        guidance_scale=guidance,
        generator=torch.Generator().manual_seed(seed),
    ).images[0]
    return np.asarray(image.convert("RGB"), dtype=np.int16)


# ---- one image ---------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_one_image_with_the_adapter_is_the_seeds_recipe_image(
    family: str, tiny_checkpoints: dict[str, Path], adapters: dict[str, Path], tmp_path: Path
) -> None:
    model = tiny_checkpoints[family]
    prompt = "a red cube on a wooden table"
    base_out, adapted_out = tmp_path / "base", tmp_path / "adapted"
    assert (
        generate("--model", str(model), "--prompt", prompt, "--seed", "3", "--out", str(base_out), *FAST) == 0
    )
    assert (
        generate(
            "--model",
            str(model),
            "--adapter",
            str(adapters[family]),
            "--prompt",
            prompt,
            "--seed",
            "3",
            "--out",
            str(adapted_out),
            *FAST,
        )
        == 0
    )
    base_entry = index_of(base_out)["images"][0]
    adapted = index_of(adapted_out)
    entry = adapted["images"][0]
    assert (entry["prompt"], entry["seed"], entry["width"], entry["height"]) == (prompt, 3, 64, 64)
    assert entry["dtype"] == "float32"  # --dtype auto on the CPU
    assert adapted["settings"]["adapter_sha256"] and adapted["settings"]["family"] == family
    assert adapted["screened"] is False

    base_image = pixels(base_out / base_entry["file"])
    adapted_image = pixels(adapted_out / entry["file"])
    assert np.array_equal(base_image, seeds_recipe(model, family, None, prompt, 3))
    assert np.array_equal(adapted_image, seeds_recipe(model, family, adapters[family], prompt, 3))
    assert not np.array_equal(base_image, adapted_image), "the merged adapter changed nothing"


def test_a_folder_adapter_several_images_per_prompt_and_their_clip_scores(
    tiny_omnigen_dir: Path, adapters: dict[str, Path], tiny_clip: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code = generate(
        "--model",
        str(tiny_omnigen_dir),
        "--adapter",
        str(adapters["omnigen"].parent),
        "--prompt",
        "a blue ball",
        "--num-images",
        "2",
        "--seed",
        "10",
        "--negative-prompt",
        "dark",
        "--out",
        str(out),
        "--clip-model",
        str(tiny_clip),
        *FAST,
    )
    assert code == 0
    index = index_of(out)
    entries = index["images"]
    scorer = ClipScorer(str(tiny_clip))
    scores = [scorer.score([Image.open(out / e["file"])], [e["prompt"]])[0] for e in entries]
    assert [e["clip_score"] for e in entries] == pytest.approx(scores, abs=1e-4)
    assert index["clip_score_mean"] == pytest.approx(sum(scores) / 2, abs=1e-4)
    assert [e["seed"] for e in entries] == [10, 11]
    assert {e["negative_prompt"] for e in entries} == {"dark"}
    assert not np.array_equal(pixels(out / entries[0]["file"]), pixels(out / entries[1]["file"]))
    assert (out / "grid.png").is_file()


# ---- what is refused -----------------------------------------------------------------------------


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_adapter_files_are_one_line_errors(
    tiny_checkpoints: dict[str, Path],
    adapters: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cosmos = str(tiny_checkpoints["cosmos2image"])
    data = adapters["cosmos2image"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    not_safetensors = tmp_path / "weights.safetensors"
    torch.save({"w": torch.zeros(3)}, not_safetensors)
    # An OmniGen adapter without raytuner's metadata: only its module names tell it apart.
    anonymous = tmp_path / "anonymous.safetensors"
    save_file(load_file(adapters["omnigen"]), anonymous)
    cases = {
        truncated: "is truncated",
        not_safetensors: "is not a safetensors file",
        adapters["omnigen"]: "was trained for omnigen",
        anonymous: "matches no module of CosmosTransformer3DModel",
        tmp_path / "missing.safetensors": "does not exist",
    }
    for adapter, expected in cases.items():
        code = generate(
            "--model", cosmos, "--adapter", str(adapter), "--prompt", "x", "--out", str(tmp_path / "o"), *FAST
        )
        assert code == 2
        assert expected in error_line(capsys)
    assert not list((tmp_path / "o").glob("*.png"))


def test_cosmos2_without_a_safety_checker_needs_an_explicit_opt_out(
    tiny_cosmos_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The tiny checkpoint without its test-model marker stands for a real Cosmos2 model.
    real_looking = tmp_path / "cosmos"
    shutil.copytree(tiny_cosmos_dir, real_looking)
    (real_looking / TINY_CHECKPOINT_MARKER).unlink()
    out = tmp_path / "out"
    assert generate("--model", str(real_looking), "--prompt", "a cat", "--out", str(out), *FAST) == 2
    assert "--no-safety-checker" in error_line(capsys)
    assert not out.exists()

    assert (
        generate(
            "--model", str(real_looking), "--prompt", "a cat", "--no-safety-checker", "--out", str(out), *FAST
        )
        == 0
    )
    index = index_of(out)
    assert index["screened"] is False
    assert "--no-safety-checker" in index["screening"]["note"]
    assert index["images"][0]["screened"] is False


def test_flags_and_folders_that_cannot_work_are_one_line_errors(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cosmos = str(tiny_checkpoints["cosmos2image"])
    out = tmp_path / "out"
    assert generate("--model", cosmos, "--prompt", "x", "--out", str(out), *FAST) == 0
    cases = [
        (["--model", cosmos, "--prompt", "x", "--resolution", "60x64"], "multiples of 16"),
        (["--model", cosmos, "--prompt", "x", "--resolution", "big"], "expected WxH or N"),
        (["--model", str(tmp_path / "nothing"), "--prompt", "x"], "no such folder"),
        (["--model", str(tmp_path), "--prompt", "x"], "no model_index.json"),
        (["--model", cosmos, "--family", "omnigen", "--prompt", "x"], "is a cosmos2image checkpoint"),
        (["--model", cosmos, "--prompt", "x", "--steps", "0"], "--steps 0"),
        # The folder holds 2-step images: 3 steps would mix two settings in one index.
        (["--model", cosmos, "--prompt", "x", "--steps", "3", "--out", str(out)], "steps 2 -> 3"),
    ]
    for args, expected in cases:
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / "other")]
        if "--resolution" not in args and "--steps" not in args:
            args = [*args, "--steps", "2", "--resolution", "64x64"]
        assert generate(*args) == 2, args
        assert expected in error_line(capsys), args
    assert len(index_of(out)["images"]) == 1, "the refused run changed the folder"


# ---- many images on Ray Data ------------------------------------------------------------------------


def test_a_prompts_file_renders_on_ray_data_and_resumes(
    ray_cluster, tiny_cosmos_dir: Path, adapters: dict[str, Path], tiny_clip: Path, tmp_path: Path
) -> None:
    prompts = tmp_path / "prompts.json"
    library = {"cube": "a red cube", "ball": "a blue ball", "cone": "a green cone"}
    prompts.write_text(json.dumps(library), encoding="utf-8")
    out = tmp_path / "batch"
    options = GenerateOptions(
        model=str(tiny_cosmos_dir),
        adapter=str(adapters["cosmos2image"]),
        prompts=str(prompts),
        num_images=2,
        seed=5,
        steps=2,
        resolution="64x64",
        out=str(out),
        actors=2,
        clip_model=str(tiny_clip),
    )
    first = run_generate(options)
    assert (first.rendered, first.skipped) == (6, 0)
    entries = index_of(out)["images"]
    assert [(e["name"], e["seed"]) for e in entries] == [(name, seed) for name in library for seed in (5, 6)]
    # Whichever actor rendered it, an image is the one the seeds' recipe gives in this process.
    cube = next(e for e in entries if e["name"] == "cube" and e["seed"] == 5)
    expected = seeds_recipe(tiny_cosmos_dir, "cosmos2image", adapters["cosmos2image"], "a red cube", 5)
    assert np.array_equal(pixels(out / cube["file"]), expected)
    # Each actor scored its images with its own copy of the CLIP model.
    scorer = ClipScorer(str(tiny_clip))
    expected_scores = [scorer.score([Image.open(out / e["file"])], [e["prompt"]])[0] for e in entries]
    assert [e["clip_score"] for e in entries] == pytest.approx(expected_scores, abs=1e-4)
    assert first.clip_score_mean == pytest.approx(sum(expected_scores) / 6, abs=1e-4)

    again = run_generate(options)
    assert (again.rendered, again.skipped) == (0, 6)

    # A lost image and a new prompt are rendered; the rest is left as it was.
    (out / cube["file"]).unlink()
    kept = {e["file"]: (out / e["file"]).stat().st_mtime_ns for e in entries if e["file"] != cube["file"]}
    prompts.write_text(json.dumps({**library, "star": "a yellow star"}), encoding="utf-8")
    resumed = run_generate(options)
    assert (resumed.rendered, resumed.skipped) == (3, 5)
    assert np.array_equal(pixels(out / cube["file"]), expected)
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    final = index_of(out)
    assert len(final["images"]) == 8 and all((out / e["file"]).is_file() for e in final["images"])
    assert (out / "grid.png").is_file()

    # An adapter the actors cannot merge (OmniGen modules, no family metadata) is one clear error.
    anonymous = tmp_path / "anonymous.safetensors"
    save_file(load_file(adapters["omnigen"]), anonymous)
    foreign = dataclasses.replace(options, adapter=str(anonymous), out=str(tmp_path / "foreign"))
    with pytest.raises(GenerateError, match="matches no module of CosmosTransformer3DModel"):
        run_generate(foreign)
