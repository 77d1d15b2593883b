"""The tiny checkpoints are complete diffusers folders of the real architectures, built offline."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLWan,
    Cosmos2TextToImagePipeline,
    CosmosTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    OmniGenPipeline,
    OmniGenTransformer2DModel,
)
from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor
from safetensors.torch import load_file
from transformers import LlamaTokenizerFast, T5EncoderModel, T5TokenizerFast

from raytuner.cli import main
from raytuner.models import safety
from raytuner.models.safety import (
    TINY_CHECKPOINT_MARKER,
    PassThroughSafetyChecker,
    is_tiny_checkpoint,
    load_safety_checker,
)
from raytuner.models.tiny import (
    KNOWN_FAMILIES,
    OMNIGEN_CHAT_TOKENS,
    OMNIGEN_PAD_TOKEN,
    build_tiny_checkpoint,
    tiny_model_main,
)

PROMPT = "A photo of a red cat sitting on a wooden table."


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in the checkpoint, keyed by file and tensor name."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.rglob("*.safetensors")):
        for name, tensor in load_file(path).items():
            tensors[f"{path.relative_to(folder)}:{name}"] = tensor
    return tensors


# --- the marker -----------------------------------------------------------------------------------


@pytest.mark.parametrize("family", KNOWN_FAMILIES)
def test_marker_says_test_model(tiny_checkpoints: dict[str, Path], family: str) -> None:
    folder = tiny_checkpoints[family]
    marker = json.loads((folder / TINY_CHECKPOINT_MARKER).read_text())
    assert marker["family"] == family
    assert marker["test_model"] is True
    assert marker["seed"] == 0
    assert "random weights" in marker["note"]
    assert all(count > 0 for count in marker["parameter_counts"].values())
    assert is_tiny_checkpoint(folder)
    assert is_tiny_checkpoint(str(folder))


def test_is_tiny_checkpoint_is_false_for_anything_else(tmp_path: Path) -> None:
    assert not is_tiny_checkpoint(tmp_path)
    assert not is_tiny_checkpoint(tmp_path / "missing")
    assert not is_tiny_checkpoint("nvidia/Cosmos-Predict2-2B-Text2Image")
    (tmp_path / TINY_CHECKPOINT_MARKER).write_text("{not json")
    assert not is_tiny_checkpoint(tmp_path)


# --- cosmos2image ---------------------------------------------------------------------------------


def test_cosmos_components_load_with_their_own_classes(tiny_cosmos_dir: Path) -> None:
    transformer = CosmosTransformer3DModel.from_pretrained(tiny_cosmos_dir, subfolder="transformer")
    vae = AutoencoderKLWan.from_pretrained(tiny_cosmos_dir, subfolder="vae")
    text_encoder = T5EncoderModel.from_pretrained(tiny_cosmos_dir, subfolder="text_encoder")
    tokenizer = T5TokenizerFast.from_pretrained(tiny_cosmos_dir, subfolder="tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_cosmos_dir, subfolder="scheduler")

    assert transformer.config.in_channels == transformer.config.out_channels == vae.config.z_dim == 16
    assert transformer.config.patch_size == (1, 2, 2) or list(transformer.config.patch_size) == [1, 2, 2]
    assert transformer.config.concat_padding_mask is True
    assert transformer.config.text_embed_dim == text_encoder.config.d_model
    assert text_encoder.config.vocab_size == len(tokenizer)
    assert 2 ** len(vae.config.temperal_downsample) == 8

    latents_mean = np.asarray(vae.config.latents_mean)
    latents_std = np.asarray(vae.config.latents_std)
    assert latents_mean.shape == latents_std.shape == (16,)
    assert np.ptp(latents_mean) > 0.5 and np.ptp(latents_std) > 0.5 and (latents_std > 0).all()

    assert scheduler.config.use_karras_sigmas is True
    assert scheduler.config.sigma_max == 80.0
    assert scheduler.config.sigma_min == 0.002
    assert scheduler.config.sigma_data == 1.0
    assert scheduler.config.final_sigmas_type == "sigma_min"

    model_index = json.loads((tiny_cosmos_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "Cosmos2TextToImagePipeline"
    assert model_index["safety_checker"] == [None, None]


def test_cosmos_tokenizer_follows_t5_conventions(tiny_cosmos_dir: Path) -> None:
    tokenizer = T5TokenizerFast.from_pretrained(tiny_cosmos_dir, subfolder="tokenizer")
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<pad>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
    assert (tokenizer.unk_token, tokenizer.unk_token_id) == ("<unk>", 2)
    assert tokenizer.model_max_length == 512

    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    padded = tokenizer(PROMPT, padding="max_length", max_length=32, return_tensors="pt")
    assert padded.input_ids.shape == (1, 32)
    assert int(padded.attention_mask.sum()) == len(ids)


def test_cosmos_pipeline_generates_an_image(tiny_cosmos_dir: Path) -> None:
    pipeline = Cosmos2TextToImagePipeline.from_pretrained(
        tiny_cosmos_dir, safety_checker=PassThroughSafetyChecker()
    )
    images = pipeline(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images
    assert images.shape == (1, 3, 64, 64)
    assert torch.isfinite(images).all()
    assert images.std() > 0


@pytest.mark.skipif(safety.is_guardrail_installed(), reason="cosmos_guardrail is installed here")
def test_cosmos_pipeline_refuses_to_load_without_a_checker(tiny_cosmos_dir: Path) -> None:
    # model_index.json lists safety_checker as [null, null]: loading without one makes the pipeline
    # build cosmos_guardrail's checker, which is the point of raytuner.models.safety.
    with pytest.raises(ImportError, match="cosmos_guardrail"):
        Cosmos2TextToImagePipeline.from_pretrained(tiny_cosmos_dir)


# --- omnigen --------------------------------------------------------------------------------------


def test_omnigen_components_load_with_their_own_classes(tiny_omnigen_dir: Path) -> None:
    transformer = OmniGenTransformer2DModel.from_pretrained(tiny_omnigen_dir, subfolder="transformer")
    vae = AutoencoderKL.from_pretrained(tiny_omnigen_dir, subfolder="vae")
    tokenizer = LlamaTokenizerFast.from_pretrained(tiny_omnigen_dir, subfolder="tokenizer")
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_omnigen_dir, subfolder="scheduler")

    assert transformer.config.in_channels == vae.config.latent_channels == 4
    assert transformer.config.vocab_size == len(tokenizer)
    assert transformer.config.pad_token_id == tokenizer.pad_token_id
    head_dim = transformer.config.hidden_size // transformer.config.num_attention_heads
    assert len(transformer.config.rope_scaling["short_factor"]) == head_dim // 2
    assert len(transformer.config.rope_scaling["long_factor"]) == head_dim // 2
    # OmniGen's processor counts 16 pixels per token: VAE x8 then 2x2 patches.
    assert 2 ** (len(vae.config.block_out_channels) - 1) * transformer.config.patch_size == 16
    assert vae.config.scaling_factor == 0.13025
    assert vae.config.shift_factor is None

    assert scheduler.config.invert_sigmas is True
    assert scheduler.config.num_train_timesteps == 1
    assert scheduler.config.shift == 1.0

    model_index = json.loads((tiny_omnigen_dir / "model_index.json").read_text())
    assert model_index["_class_name"] == "OmniGenPipeline"


def test_omnigen_tokenizer_has_the_chat_tokens(tiny_omnigen_dir: Path) -> None:
    tokenizer = LlamaTokenizerFast.from_pretrained(tiny_omnigen_dir, subfolder="tokenizer")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.convert_tokens_to_ids("<0x0A>") == 13  # byte fallback at Llama's ids
    assert tokenizer.pad_token == OMNIGEN_PAD_TOKEN
    for token in (OMNIGEN_PAD_TOKEN, *OMNIGEN_CHAT_TOKENS):
        assert token in tokenizer.all_special_tokens
        assert tokenizer(token, add_special_tokens=False).input_ids == [
            tokenizer.convert_tokens_to_ids(token)
        ]

    # Exactly what the pipeline's processor tokenizes for a text-to-image prompt.
    templated = OmniGenMultiModalProcessor(tokenizer).add_prefix_instruction(PROMPT + " Ünïcødé 猫")
    ids = tokenizer(templated).input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids
    assert max(ids) < len(tokenizer)
    assert tokenizer.decode(ids[1:]) == templated


def test_omnigen_pipeline_generates_an_image(tiny_omnigen_dir: Path) -> None:
    pipeline = OmniGenPipeline.from_pretrained(tiny_omnigen_dir)
    images = pipeline(
        [PROMPT, "a dog"],
        height=64,
        width=48,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="pil",
    ).images
    assert [image.size for image in images] == [(48, 64), (48, 64)]


# --- building -------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", KNOWN_FAMILIES)
def test_builds_are_deterministic_per_seed(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, family: str
) -> None:
    reference = _weights(tiny_checkpoints[family])  # built with seed 0
    same_seed = _weights(build_tiny_checkpoint(family, tmp_path / "seed0", seed=0))
    other_seed = _weights(build_tiny_checkpoint(family, tmp_path / "seed1", seed=1))

    assert reference.keys() == same_seed.keys() == other_seed.keys()
    assert all(torch.equal(reference[name], same_seed[name]) for name in reference)
    differing = [name for name in reference if not torch.equal(reference[name], other_seed[name])]
    assert len(differing) > len(reference) // 2
    tokenizer_file = Path("tokenizer/tokenizer.json")
    assert (tmp_path / "seed1" / tokenizer_file).read_bytes() == (
        tiny_checkpoints[family] / tokenizer_file
    ).read_bytes()


def test_build_does_not_disturb_the_callers_random_state(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    build_tiny_checkpoint("omnigen", tmp_path / "omnigen")
    assert torch.equal(torch.rand(4), expected)


def test_build_replaces_a_tiny_checkpoint_but_nothing_else(tmp_path: Path) -> None:
    folder = build_tiny_checkpoint("omnigen", tmp_path / "model", seed=1)
    (folder / "stale.txt").write_text("left over")
    assert build_tiny_checkpoint("omnigen", folder, seed=2) == folder
    assert not (folder / "stale.txt").exists()
    assert json.loads((folder / TINY_CHECKPOINT_MARKER).read_text())["seed"] == 2

    someone_elses = tmp_path / "mine"
    someone_elses.mkdir()
    (someone_elses / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        build_tiny_checkpoint("omnigen", someone_elses)
    assert (someone_elses / "notes.txt").read_text() == "keep me"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine", "model"]  # no staging left


def test_unknown_family_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match=r"unknown model family 'cosmos3' \(known: cosmos2image, omnigen\)"):
        build_tiny_checkpoint("cosmos3", tmp_path / "x")
    assert main(["tiny-model", "--family", "cosmos3", "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err.strip()
    assert error == "error: unknown model family 'cosmos3' (known: cosmos2image, omnigen)"
    assert not (tmp_path / "x").exists()


def test_tiny_model_main_prints_folder_and_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert tiny_model_main("omnigen", str(tmp_path / "omnigen"), seed=3) == 0
    folder_line, summary = capsys.readouterr().out.strip().splitlines()[-2:]
    assert Path(folder_line) == (tmp_path / "omnigen").resolve()
    assert summary.startswith("omnigen tiny checkpoint, seed 3")
    assert "transformer" in summary and "vae" in summary
    assert is_tiny_checkpoint(folder_line)


# --- safety checker policy ------------------------------------------------------------------------


def test_pass_through_checker_screens_nothing() -> None:
    checker = PassThroughSafetyChecker()
    frames = np.zeros((1, 8, 8, 3), dtype=np.uint8)
    assert checker.to("cpu") is checker
    assert checker.check_text_safety("anything") is True
    assert checker.check_video_safety(frames) is frames


@pytest.mark.skipif(safety.is_guardrail_installed(), reason="cosmos_guardrail is installed here")
def test_without_guardrail_unscreened_needs_an_explicit_opt_out(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(RuntimeError, match="pip install cosmos_guardrail"):
        load_safety_checker(allow_unscreened=False)

    safety._warn_unscreened_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger=safety.__name__):
        first = load_safety_checker(allow_unscreened=True)
        second = load_safety_checker(allow_unscreened=True)
    assert isinstance(first, PassThroughSafetyChecker) and isinstance(second, PassThroughSafetyChecker)
    warnings = [record for record in caplog.records if "NOT screened" in record.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
