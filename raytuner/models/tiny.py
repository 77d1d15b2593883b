"""Tiny random-weight checkpoints of the real architectures, built offline in diffusers format.

Tests and the demo cannot download Cosmos2 or OmniGen, so `build_tiny_checkpoint` writes a
complete diffusers model folder for a family: the real diffusers/transformers classes with tiny
sizes and seeded random weights, small tokenizers built in memory from a fixed corpus (T5's
Unigram, Phi-3's byte-fallback BPE), and the scheduler configuration the published checkpoint
ships. The folder loads component by component (`<Class>.from_pretrained(folder, subfolder=...)`)
and as a whole (`<Pipeline>.from_pretrained(folder)`), exactly like the real one. `build_tiny_clip`
writes the same kind of stand-in for the CLIP model behind `evaluation_type: "clip"`, in
transformers' format. A marker file (`raytuner_tiny.json`) says it is a test model. Nothing here
touches the network.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import string
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from raytuner.errors import RaytunerError
from raytuner.models.registry import UnknownModelFamilyError
from raytuner.models.safety import TINY_CHECKPOINT_MARKER, PassThroughSafetyChecker

KNOWN_FAMILIES = ("cosmos2image", "omnigen")
# `raytuner tiny-model --family clip` writes the tiny CLIP: an evaluation model, not a model family.
CLIP_KIND = "clip"
TINY_MODEL_KINDS = (*KNOWN_FAMILIES, CLIP_KIND)


class TinyModelError(RaytunerError, FileExistsError):
    """A folder a tiny checkpoint cannot be written to without overwriting something else."""


# Caption-like sentences the tiny tokenizers are trained on. The prompt templates the pipelines
# add (OmniGen's instruction line, Cosmos2's default negative prompt) are in here too, so they
# tokenize into a few pieces rather than one piece per character.
_TOKENIZER_CORPUS = (
    "A photo of a red cat sitting on a wooden table.",
    "A watercolor painting of a lighthouse at dusk, soft warm light.",
    "A close-up shot of a yellow scrubber cleaning a plate in the kitchen sink.",
    "An old man reading a newspaper on a park bench in autumn.",
    "A bowl of ramen with an egg, green onions and steam rising.",
    "A futuristic city at night with flying cars and neon signs.",
    "A golden retriever running through shallow water on a beach.",
    "A snowy mountain range under a clear blue sky, wide angle.",
    "A portrait of a woman with curly hair wearing a green scarf.",
    "A macro photograph of a dew drop on a blade of grass.",
    "A cozy living room with a fireplace, bookshelves and a sleeping dog.",
    "A pixel art castle on a floating island surrounded by clouds.",
    "A bicycle leaning against a brick wall covered in ivy.",
    "A cup of coffee and a croissant on a marble counter, morning light.",
    "A robot painting a canvas in a bright studio.",
    "A field of sunflowers at sunset, 35mm film, high detail.",
    "A black and white sketch of a sailing ship in a storm.",
    "Three apples, two pears and one orange in a wicker basket.",
    "A child flying a kite over green hills on a windy day.",
    "An astronaut riding a horse on the moon, digital art.",
    "The quick brown fox jumps over the lazy dog.",
    "A man in a black shirt is reading a book.",
    "Generate an image according to the following instructions",
    "Remove the hat from the person in the picture.",
    "Low quality, jpeg artifacts, ugly, duplicate, blurry, bad anatomy, extra fingers.",
    "The video captures a series of frames showing ugly scenes, static with no motion, motion blur, "
    "over-saturation, shaky footage, low resolution, grainy texture, pixelated images, poorly lit areas, "
    "underexposed and overexposed scenes, poor color balance, washed out colors, choppy sequences, "
    "jerky movements, low frame rate, artifacting, color banding, unnatural transitions, outdated special "
    "effects, fake elements, unconvincing visuals, poorly edited content, jump cuts, visual noise, and "
    "flickering. Overall, the video is of poor quality.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and symbols: ! ? , . ; : ' \" ( ) [ ] { } - _ + = / \\ @ # % & * < > | ~",
    "sks person, ohwx dog, a tiny test model with random weights.",
)
# Every printable character gets its own piece, so the T5 (Unigram, no byte fallback) tokenizer
# only maps truly foreign characters to <unk>.
_PRINTABLE_ALPHABET = [c for c in string.printable if not c.isspace()]

# --- cosmos2image ---------------------------------------------------------------------------------

_T5_SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")  # T5's ids: <pad>=0, </s>=1, <unk>=2
_T5_UNIGRAM_VOCAB_SIZE = 256
_MAX_PIECE_LENGTH = 8
_METASPACE = "▁"  # SentencePiece's word-boundary mark, as T5 and Llama tokenizers use it
_T5_MAX_LENGTH = 512  # t5-11b's model_max_length; the Cosmos2 pipeline pads prompts to 512 tokens

_COSMOS_TEXT_EMBED_DIM = 32  # T5 d_model == transformer text_embed_dim
_COSMOS_TRANSFORMER = {
    "in_channels": 16,  # the Wan VAE's z_dim
    "out_channels": 16,
    "num_attention_heads": 2,
    "attention_head_dim": 16,
    "num_layers": 2,
    "mlp_ratio": 4.0,
    "text_embed_dim": _COSMOS_TEXT_EMBED_DIM,
    "adaln_lora_dim": 4,
    # Rotary tables are sized by max_size // patch_size: (4, 64, 64) allows latents up to 64x64,
    # i.e. images up to 512x512. Rotary embeddings have no weights, so this costs nothing.
    "max_size": (4, 64, 64),
    "patch_size": (1, 2, 2),
    "rope_scale": (1.0, 4.0, 4.0),  # Cosmos-Predict2 Text2Image (2B and 14B)
    "concat_padding_mask": True,
    "extra_pos_embed_type": None,
}
# Wan 2.1's per-channel latent statistics (AutoencoderKLWan's defaults, shipped by
# Cosmos-Predict2). Real, non-trivial values so that normalisation is exercised end to end.
_WAN_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
_WAN_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip
_COSMOS_VAE = {
    "base_dim": 8,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_scales": [],
    # Three spatial downsamples (x8, as the pipeline assumes: 2 ** len(temperal_downsample)), two
    # of them also temporal (x4), as in Wan 2.1. A single image is one latent frame.
    "temperal_downsample": [False, True, True],
    "latents_mean": _WAN_LATENTS_MEAN,
    "latents_std": _WAN_LATENTS_STD,
}
# What nvidia/Cosmos-Predict2-*-Text2Image ships: diffusers' conversion script builds
# FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True) and the pipeline registers the EDM
# sigma range (it overwrites these four on every load, so they must agree with it).
_COSMOS_SCHEDULER_INIT = {"use_karras_sigmas": True}
_COSMOS_SCHEDULER_EDM = {
    "sigma_max": 80.0,
    "sigma_min": 0.002,
    "sigma_data": 1.0,
    "final_sigmas_type": "sigma_min",
}

# --- omnigen --------------------------------------------------------------------------------------

# OmniGen's text side is Phi-3's Llama-style tokenizer: <unk>=0, <s>=1, </s>=2, 256 byte-fallback
# pieces <0x00>..<0xFF> at ids 3..258, then BPE merges, then added tokens. OmniGen's processor relies
# on the layout: it strips a leading 1 (<s>) from prompt chunks after an image, and its collator
# left-pads with id 2 whatever the tokenizer says.
_LLAMA_BASE_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
_LLAMA_BYTE_TOKENS = tuple(f"<0x{byte:02X}>" for byte in range(256))
_LLAMA_BPE_VOCAB_SIZE = 512
# Phi-3 pads with <|endoftext|>; the transformer's pad_token_id (the embedding's padding_idx)
# must be that id. The chat tokens are the strings OmniGen's processor wraps every prompt in:
# "<|user|>\nGenerate an image according to the following instructions\n{prompt}<|end|>\n"
# "<|assistant|>\n<|diffusion|>"; "<img>"/"</img>" surround "<|image_N|>" input-image placeholders,
# which the processor cuts out before tokenizing (they never reach the tokenizer).
OMNIGEN_PAD_TOKEN = "<|endoftext|>"
OMNIGEN_CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|end|>", "<|diffusion|>", "<img>", "</img>")
_OMNIGEN_MAX_LENGTH = 131072  # Phi-3's model_max_length

_OMNIGEN_HEADS = 2
_OMNIGEN_HIDDEN = 32
_OMNIGEN_HEAD_DIM = _OMNIGEN_HIDDEN // _OMNIGEN_HEADS
# Phi-3 "su" rotary scaling: one factor per rotary frequency (head_dim / 2 of them). Short
# factors apply up to original_max_position_embeddings positions, long ones beyond.
_OMNIGEN_ROPE_SCALING = {
    "type": "su",
    "short_factor": [1.0 + 0.25 * i for i in range(_OMNIGEN_HEAD_DIM // 2)],
    "long_factor": [1.0 + 8.0 * i for i in range(_OMNIGEN_HEAD_DIM // 2)],
}
_OMNIGEN_TRANSFORMER = {
    "in_channels": 4,  # the SDXL VAE's latent_channels
    "patch_size": 2,
    "hidden_size": _OMNIGEN_HIDDEN,
    "rms_norm_eps": 1e-5,
    "num_attention_heads": _OMNIGEN_HEADS,
    "num_key_value_heads": _OMNIGEN_HEADS,
    "intermediate_size": 64,
    "num_layers": 2,
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rope_base": 10000,
    "rope_scaling": _OMNIGEN_ROPE_SCALING,
    # The sin-cos table is a saved buffer of pos_embed_max_size**2 * hidden_size values; 64 patches
    # a side allows latents up to 128x128, i.e. images up to 1024x1024.
    "pos_embed_max_size": 64,
    "time_step_dim": 64,
    "flip_sin_to_cos": True,
    "downscale_freq_shift": 0,
    "timestep_activation_fn": "silu",
}
# OmniGen ships SDXL's VAE. Its processor hard-codes 16 pixels per token (VAE x8, then 2x2
# patches), so the tiny VAE must still downsample x8: four blocks, three downsamples. Channels are
# SDXL's (128, 256, 512, 512) divided by 16, keeping SDXL's 4 channels per normalisation group.
_OMNIGEN_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (8, 16, 32, 32),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 2,
    "sample_size": 64,
    "scaling_factor": 0.13025,  # SDXL's; OmniGen scales latents by it and applies no shift
    "shift_factor": None,
    "force_upcast": True,
}
# What Shitao/OmniGen-v1-diffusers ships (diffusers' conversion script): timesteps run from 0
# (pure noise) to 1 (clean image), which is OmniGen's own convention.
_OMNIGEN_SCHEDULER_INIT = {"num_train_timesteps": 1, "invert_sigmas": True, "shift": 1.0}


# --- clip -----------------------------------------------------------------------------------------

# OpenAI CLIP's layout at a tiny size: a 77-token text context (so prompts truncate where the real
# ones do), end-of-text as the padding token, and the image processor's resize, centre crop and
# normalisation with OpenAI's statistics, only to 32x32 pixels in 8x8 patches.
_CLIP_MAX_LENGTH = 77
_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_END_OF_WORD = "</w>"
_CLIP_BPE_MERGES = 256
_CLIP_IMAGE_SIZE = 32
_CLIP_PROJECTION_DIM = 16
_CLIP_TEXT = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "max_position_embeddings": _CLIP_MAX_LENGTH,
}
_CLIP_VISION = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": _CLIP_IMAGE_SIZE,
    "patch_size": 8,
}


# --- building -------------------------------------------------------------------------------------


def build_tiny_checkpoint(family: str, out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a complete diffusers-format checkpoint of `family` with seeded random weights.

    The same `seed` gives byte-identical weights. `out_dir` must not exist, be empty, or hold an
    earlier tiny checkpoint (which is replaced); anything else is refused rather than overwritten.
    The folder is assembled next to `out_dir` and moved into place when complete. Returns the
    folder.
    """
    if family not in _BUILDERS:
        raise UnknownModelFamilyError(f"unknown model family {family!r} (known: {', '.join(KNOWN_FAMILIES)})")
    return _write_tiny_folder(family, _BUILDERS[family], out_dir, seed=seed)


def build_tiny_clip(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny random-weight CLIP in transformers' format: `CLIPModel`, CLIP's byte-level BPE
    tokenizer and `CLIPImageProcessor`, loadable with `from_pretrained(folder)` like a hub CLIP.

    It stands in for `pretrained_evaluation_model_name_or_path` (`evaluation_type: "clip"`) where no
    real CLIP can be downloaded; its scores are those of random weights, meaningful only as numbers
    to compare. Seeds, replacement and the marker file work as in `build_tiny_checkpoint`.
    """
    return _write_tiny_folder(CLIP_KIND, _build_clip, out_dir, seed=seed)


def _write_tiny_folder(
    kind: str, build: Callable[[Path], dict[str, int]], out_dir: str | Path, *, seed: int
) -> Path:
    """Build into a staging folder beside `out_dir`, add the marker, then move it into place."""
    out_dir = Path(out_dir).resolve()
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    staging.chmod(0o755)  # mkdtemp makes it private; the checkpoint is shared with other workers
    try:
        with _seeded_torch(seed):
            parameter_counts = build(staging)
        marker = {
            "family": kind,
            "test_model": True,
            "seed": seed,
            "note": "random weights; a test model built offline by raytuner",
            "parameter_counts": parameter_counts,
        }
        (staging / TINY_CHECKPOINT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def tiny_model_main(family: str, out: str, seed: int = 0) -> int:
    """`raytuner tiny-model`: build a tiny checkpoint (or, for `clip`, the tiny CLIP evaluation
    model), print where it is and what it holds."""
    if family not in TINY_MODEL_KINDS:
        raise UnknownModelFamilyError(f"unknown model family {family!r} (known: {', '.join(KNOWN_FAMILIES)})")
    if family == CLIP_KIND:
        folder = build_tiny_clip(out, seed=seed)
    else:
        folder = build_tiny_checkpoint(family, out, seed=seed)
    marker = json.loads((folder / TINY_CHECKPOINT_MARKER).read_text(encoding="utf-8"))
    counts = ", ".join(f"{name} {count:,}" for name, count in marker["parameter_counts"].items())
    print(folder)
    print(f"{family} tiny checkpoint, seed {seed}, random weights; parameters: {counts}")
    return 0


@contextmanager
def _seeded_torch(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the build without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_replaceable(out_dir: Path) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise TinyModelError(f"{out_dir} exists and is not a folder")
    if any(out_dir.iterdir()) and not (out_dir / TINY_CHECKPOINT_MARKER).is_file():
        raise TinyModelError(
            f"{out_dir} is not empty and is not a tiny checkpoint ({TINY_CHECKPOINT_MARKER} missing); "
            "refusing to overwrite it"
        )


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _build_cosmos2image(folder: Path) -> dict[str, int]:
    from diffusers.models.autoencoders.autoencoder_kl_wan import AutoencoderKLWan
    from diffusers.models.transformers.transformer_cosmos import CosmosTransformer3DModel
    from diffusers.pipelines.cosmos.pipeline_cosmos2_text2image import Cosmos2TextToImagePipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler
    from transformers import T5Config, T5EncoderModel

    tokenizer = _train_t5_tokenizer()
    text_config = T5Config(
        vocab_size=len(tokenizer),
        d_model=_COSMOS_TEXT_EMBED_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="relu",  # t5-11b, the encoder Cosmos2 uses, is original T5
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    # Not one of T5Config's declared fields: the config keeps it as an attribute, in config.json too.
    text_config.decoder_start_token_id = tokenizer.pad_token_id
    text_encoder = T5EncoderModel(text_config).eval()
    transformer = CosmosTransformer3DModel(**_COSMOS_TRANSFORMER).eval()
    vae = AutoencoderKLWan(**_COSMOS_VAE).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**_COSMOS_SCHEDULER_INIT)
    scheduler.register_to_config(**_COSMOS_SCHEDULER_EDM)

    pipeline = Cosmos2TextToImagePipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        safety_checker=PassThroughSafetyChecker(),  # the constructor insists on one
    )
    # Saved as [null, null] so that loading decides which checker to use (raytuner.models.safety).
    pipeline.register_modules(safety_checker=None)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return {
        "transformer": _parameter_count(transformer),
        "vae": _parameter_count(vae),
        "text_encoder": _parameter_count(text_encoder),
    }


def _build_omnigen(folder: Path) -> dict[str, int]:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_omnigen import OmniGenTransformer2DModel
    from diffusers.pipelines.omnigen.pipeline_omnigen import OmniGenPipeline
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    tokenizer = _train_llama_tokenizer()
    transformer = OmniGenTransformer2DModel(
        **_OMNIGEN_TRANSFORMER,
        pad_token_id=tokenizer.pad_token_id,
        vocab_size=len(tokenizer),
    ).eval()
    vae = AutoencoderKL(**_OMNIGEN_VAE).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**_OMNIGEN_SCHEDULER_INIT)

    pipeline = OmniGenPipeline(transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer)
    pipeline.save_pretrained(folder, safe_serialization=True)
    return {"transformer": _parameter_count(transformer), "vae": _parameter_count(vae)}


_BUILDERS: dict[str, Callable[[Path], dict[str, int]]] = {
    "cosmos2image": _build_cosmos2image,
    "omnigen": _build_omnigen,
}


def _build_clip(folder: Path) -> dict[str, int]:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = _train_clip_tokenizer()
    special_ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    model = CLIPModel(
        CLIPConfig(
            text_config={**_CLIP_TEXT, "vocab_size": len(tokenizer), **special_ids},
            vision_config=_CLIP_VISION,
            projection_dim=_CLIP_PROJECTION_DIM,
        )
    ).eval()
    # CLIPImageProcessor's defaults are OpenAI CLIP's (bicubic resize of the short edge, centre
    # crop, OpenAI's mean and std); only the size is tiny.
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": _CLIP_IMAGE_SIZE},
        crop_size={"height": _CLIP_IMAGE_SIZE, "width": _CLIP_IMAGE_SIZE},
    )
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(folder)
    return {
        "text": _parameter_count(model.text_model) + _parameter_count(model.text_projection),
        "vision": _parameter_count(model.vision_model) + _parameter_count(model.visual_projection),
    }


# --- tokenizers -----------------------------------------------------------------------------------
# Built from the fixed corpus above, reproducibly: the tokenizers do not depend on the seed (only
# weights do), so a prompt has the same token ids in every build.


def _train_t5_tokenizer():  # -> transformers.T5Tokenizer
    """A Unigram tokenizer with T5's conventions, wrapped as `T5Tokenizer` (transformers 5's
    `T5TokenizerFast` is another name for the same class).

    The pieces and their log-probabilities are counted from the corpus rather than learnt with
    `tokenizers.trainers.UnigramTrainer`: that trainer is not reproducible (the same corpus gives
    pieces in a different order, with scores differing in the third decimal, from run to run),
    and a test model must give the same token ids for the same prompt in every build.
    """
    from transformers import T5Tokenizer

    pieces = [(token, 0.0) for token in _T5_SPECIAL_TOKENS] + _count_unigram_pieces(
        _TOKENIZER_CORPUS, _T5_UNIGRAM_VOCAB_SIZE - len(_T5_SPECIAL_TOKENS)
    )
    # No <extra_id_N> sentinels: they serve T5's span-corruption pretraining, not an encoder-only use.
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=_T5_MAX_LENGTH)


def _count_unigram_pieces(corpus: tuple[str, ...], size: int) -> list[tuple[str, float]]:
    """`size` Unigram pieces with log-probability scores, best first: every single character plus
    the substrings of "▁word" (T5's pre-tokenization) that cover the most text."""
    word_counts = Counter(_METASPACE + word for line in corpus for word in line.split())
    char_counts: Counter[str] = Counter()
    substring_counts: Counter[str] = Counter()
    for word, count in word_counts.items():
        for start, char in enumerate(word):
            char_counts[char] += count
            for end in range(start + 2, min(len(word), start + _MAX_PIECE_LENGTH) + 1):
                substring_counts[word[start:end]] += count
    for char in (*_PRINTABLE_ALPHABET, _METASPACE):
        char_counts[char] += 1  # seen or not, every printable character gets a piece
    repeated = [piece for piece, count in substring_counts.items() if count > 1]
    repeated.sort(key=lambda piece: (-substring_counts[piece] * len(piece), piece))
    counts = dict(char_counts) | {
        piece: substring_counts[piece] for piece in repeated[: size - len(char_counts)]
    }
    total = sum(counts.values())
    scored = [(piece, math.log(count / total)) for piece, count in counts.items()]
    return sorted(scored, key=lambda item: (-item[1], item[0]))


def _train_llama_tokenizer():  # -> transformers.LlamaTokenizerFast
    """A byte-fallback BPE with Phi-3's layout and OmniGen's chat tokens, as `LlamaTokenizerFast`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=_METASPACE, prepend_scheme="first", split=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=_LLAMA_BPE_VOCAB_SIZE,
        special_tokens=[*_LLAMA_BASE_SPECIAL_TOKENS, *_LLAMA_BYTE_TOKENS],
        initial_alphabet=[*_PRINTABLE_ALPHABET, _METASPACE],
        show_progress=False,
    )
    tokenizer.train_from_iterator(_TOKENIZER_CORPUS, trainer)
    model = json.loads(tokenizer.to_str())["model"]
    return LlamaTokenizerFast(
        vocab=model["vocab"],
        merges=[tuple(merge) for merge in model["merges"]],
        pad_token=OMNIGEN_PAD_TOKEN,
        additional_special_tokens=list(OMNIGEN_CHAT_TOKENS),
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=_OMNIGEN_MAX_LENGTH,
    )


def _train_clip_tokenizer():  # -> transformers.CLIPTokenizer
    """CLIP's byte-level BPE with word-final `</w>` pieces, learnt from the corpus, as `CLIPTokenizer`.

    The vocabulary has OpenAI CLIP's layout: the 256 byte symbols, the same with `</w>`, the
    merges' results in merge order, then start- and end-of-text last (the highest ids, so
    either way CLIP finds the end token to pool from). Every byte is a piece, so no text maps to
    an unknown token. Words are cut by CLIP's own normaliser and pre-tokenizer (lent by a default
    `CLIPTokenizer`); the merges are counted here rather than learnt with
    `tokenizers.trainers.BpeTrainer`, which breaks ties between equally frequent pairs
    differently from one process to the next.
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    clip_rules = CLIPTokenizer().backend_tokenizer
    words: Counter[tuple[str, ...]] = Counter()
    for line in _TOKENIZER_CORPUS:
        for word, _ in clip_rules.pre_tokenizer.pre_tokenize_str(clip_rules.normalizer.normalize_str(line)):
            words[(*word[:-1], word[-1] + _CLIP_END_OF_WORD)] += 1
    merges = _count_bpe_merges(words, _CLIP_BPE_MERGES)
    alphabet = sorted(ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for piece in (
        *alphabet,
        *(symbol + _CLIP_END_OF_WORD for symbol in alphabet),
        *(left + right for left, right in merges),
        _CLIP_BOS,
        _CLIP_EOS,
    ):
        vocab.setdefault(piece, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        # tokenizers' BPE takes (left, right) pairs, which transformers annotates as strings.
        merges=merges,  # type: ignore[arg-type]
        bos_token=_CLIP_BOS,
        eos_token=_CLIP_EOS,
        pad_token=_CLIP_EOS,  # OpenAI CLIP pads with end-of-text
        unk_token=_CLIP_EOS,
        model_max_length=_CLIP_MAX_LENGTH,
    )


def _count_bpe_merges(words: Counter[tuple[str, ...]], count: int) -> list[tuple[str, str]]:
    """Up to `count` BPE merges: each time the most frequent adjacent pair, ties to the smallest pair."""
    merges: list[tuple[str, str]] = []
    while len(merges) < count:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, frequency in words.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += frequency
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for symbols, frequency in words.items():
            joined: list[str] = []
            index = 0
            while index < len(symbols):
                if symbols[index : index + 2] == best:
                    joined.append(symbols[index] + symbols[index + 1])
                    index += 2
                else:
                    joined.append(symbols[index])
                    index += 1
            merged[tuple(joined)] += frequency
        words = merged
    return merges
