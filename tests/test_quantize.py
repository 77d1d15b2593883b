"""A quantised frozen base (base_model_precision, quantize_via) without Ray, on the tiny checkpoints.

Every supported precision runs on the CPU, so each gets the full set of CPU tests; the
``gpu``-marked ones repeat the core checks on CUDA for both ``quantize_via`` values and group
offload in memory.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris_from_weights
from safetensors import safe_open

from raytuner import flow
from raytuner.adapters import build_adapter, save_adapter
from raytuner.cli import main
from raytuner.config import ConfigError, load_config
from raytuner.config.training import QUANTIZED_PRECISIONS, TrainingConfig, replace_options
from raytuner.data.synthetic import synthetic_images, to_pixels
from raytuner.models.base import ConditioningBatch, ModelFamily
from raytuner.models.registry import get_family
from raytuner.quantize import (
    QUANTO_WEIGHTS,
    QuantizationError,
    adapter_spec,
    quantization_problem,
    quantization_warnings,
    quantize_base,
    quantize_load_device,
    quantized_module_names,
)
from raytuner.train.offload import OffloadedWeights, apply_group_offload, plan_group_offload
from raytuner.train.step import MicroBatch, optimizer_step
from tests.adapter_helpers import generate, pipeline_extras, seed_lycoris_config
from tests.config.helpers import BASE_CONFIG, BASE_DATASETS, BASE_LYCORIS

pytestmark = pytest.mark.slow  # quantises, trains and renders the tiny models: seconds a test

CPU = torch.device("cpu")
FAMILIES = ("cosmos2image", "omnigen")
SCHEDULE = flow.FlowSchedule(shift=3.0)
# How far the quantised base's prediction may be from the full-precision one (relative L2 norm).
# Measured on the tiny random-weight models; fewer bits, more rounding.
FORWARD_TOLERANCE = {
    "int8-quanto": 0.02,
    "int8-torchao": 0.02,
    "fp8-quanto": 0.1,
    "fp8-torchao": 0.1,
    "fp8wo-torchao": 0.1,
    "fp8uz-quanto": 0.1,
    "int4-quanto": 0.3,
    "int2-quanto": 1.0,
}
# fp8-torchao multiplies in float8, which torchao runs only on CUDA GPUs of compute capability 8.9+.
CPU_PRECISIONS = tuple(p for p in QUANTIZED_PRECISIONS if p != "fp8-torchao")
CASES = list(itertools.product(FAMILIES, CPU_PRECISIONS))
GPU_CASES = list(itertools.product(FAMILIES, QUANTIZED_PRECISIONS))


def write_config(folder: Path, **updates: object) -> Path:
    """A small valid run (the config tests' files) with ``updates`` in config.json."""
    paths = {
        key: str(folder / BASE_CONFIG[key]) for key in ("lycoris_config", "data_backend_config", "output_dir")
    }
    datasets = [
        {
            **entry,
            **{key: str(folder / entry[key]) for key in ("instance_data_dir", "cache_dir") if key in entry},
        }
        for entry in BASE_DATASETS
    ]
    files = {
        "config.json": {**BASE_CONFIG, **paths, **updates},
        "multidatabackend.json": datasets,
        "lycoris_config.json": BASE_LYCORIS,
    }
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content, default=str), encoding="utf-8")
    (folder / "images").mkdir(exist_ok=True)
    return folder / "config.json"


def training(family: str = "omnigen", precision: str = "int8-quanto", **keys: object) -> TrainingConfig:
    values: dict[str, object] = {
        "model_family": family,
        "data_backend_config": Path("unused.json"),
        "base_model_precision": precision,
    }
    return TrainingConfig.from_options({**values, **keys})


@dataclass
class Encoded:
    family: ModelFamily
    latents: torch.Tensor
    conditioning: ConditioningBatch


@pytest.fixture(scope="module")
def encoded(tiny_checkpoints: dict[str, Path]) -> dict[str, Encoded]:
    """Two synthetic images per family, encoded once."""
    result = {}
    for name in FAMILIES:
        family = get_family(name)(tiny_checkpoints[name])
        items = synthetic_images(2, width=64, height=64, seed=1)
        latents = family.encode_images(to_pixels([item.image for item in items]))
        conditioning = family.collate_conditioning(family.encode_prompts([item.caption for item in items]))
        result[name] = Encoded(family, latents, conditioning)
    return result


@dataclass
class Adapted:
    transformer: torch.nn.Module
    network: LycorisNetwork
    parameters: list[torch.nn.Parameter]


def adapted(encoded: Encoded, precision: str, *, device: torch.device = CPU, **keys: object) -> Adapted:
    """The base as the training worker builds it: loaded, quantised, then the seed's LoKr on top."""
    settings = training(encoded.family.name, precision, **keys)
    family = encoded.family
    transformer = quantize_base(
        family.load_transformer(device=quantize_load_device(settings.model, device)),
        settings.model,
        device=device,
    ).requires_grad_(False)
    network, _ = build_adapter(
        transformer,
        adapter_spec(seed_lycoris_config(family.name), settings.model),
        module_aliases=family.module_aliases,
        seed=3,
    )
    network.to(device=device, dtype=torch.float32)
    return Adapted(transformer, network, [p for p in network.parameters() if p.requires_grad])


def micro(encoded: Encoded, device: torch.device = CPU) -> MicroBatch:
    conditioning = {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in encoded.conditioning.items()
    }
    return MicroBatch(
        latents=encoded.latents.to(device),
        conditioning=conditioning,
        generators=[torch.Generator().manual_seed(100 + i) for i in range(len(encoded.latents))],
        is_regularisation=False,
    )


def train(encoded: Encoded, model: Adapted, steps: int = 3, *, device: torch.device = CPU) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters, lr=3e-2)
    return [
        optimizer_step(
            encoded.family,
            model.transformer,
            model.network,
            model.parameters,
            optimizer,
            [micro(encoded, device)],
            SCHEDULE,
        ).loss
        for _ in range(steps)
    ]


def _plain(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """A quantised weight as the plain tensors it is made of (quanto and torchao both flatten)."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return {name: tensor.detach().clone()}
    inner, _ = tensor.__tensor_flatten__()
    parts: dict[str, torch.Tensor] = {}
    for attr in inner:
        parts.update(_plain(f"{name}.{attr}", getattr(tensor, attr)))
    return parts


def base_tensors(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight and persistent buffer; non-persistent ones (OmniGen's rope frequencies,
    rescaled by the model itself for the sequence length) are not the base's weights."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in transformer.named_parameters():
        state.update(_plain(name, tensor))
    for module_name, module in transformer.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and name not in module._non_persistent_buffers_set:
                state.update(_plain(f"{module_name}.{name}", buffer))
    return state


def predict(encoded: Encoded, transformer: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    device = encoded.latents.device
    noise = torch.randn(encoded.latents.shape, generator=generator).to(device)
    sigmas = torch.full((len(encoded.latents),), 0.6, device=device)
    noisy = flow.add_noise(encoded.latents, noise, sigmas)
    with torch.no_grad():
        return encoded.family.predict(transformer, noisy, sigmas, micro(encoded, device).conditioning).float()


def assert_quantised(transformer: torch.nn.Module, precision: str) -> None:
    names = set(quantized_module_names(transformer, precision))
    assert names, "nothing was chosen for quantisation"
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        weight = module.weight
        if precision in QUANTO_WEIGHTS:
            from optimum.quanto import QLinear, qtypes

            if name in names:
                assert isinstance(module, QLinear), name
                assert module.weight_qtype == qtypes[QUANTO_WEIGHTS[precision]], name
                assert type(weight).__name__ in ("WeightQBytesTensor", "WeightQBitsTensor"), name
            else:
                assert type(module) is torch.nn.Linear and type(weight) is torch.nn.Parameter, name
        else:
            from torchao.quantization import Float8Tensor, Int8Tensor

            expected = Int8Tensor if precision == "int8-torchao" else Float8Tensor
            if name in names:
                assert type(module) is torch.nn.Linear and isinstance(weight, expected), name
                assert weight.qdata.dtype == (
                    torch.int8 if precision == "int8-torchao" else torch.float8_e4m3fn
                ), name
            else:
                assert type(weight) is torch.nn.Parameter, name


# ---- what is quantised, and how close it stays ------------------------------------------------


@pytest.mark.parametrize(("family", "precision"), CASES)
def test_the_block_linears_are_quantised_and_the_rest_kept(
    encoded: dict[str, Encoded], family: str, precision: str
) -> None:
    model = adapted(encoded[family], precision)
    assert_quantised(model.transformer, precision)
    names = quantized_module_names(model.transformer, precision)
    # The AdaLN modulation, embeddings and proj_out stay in full precision.
    assert not any(".norm" in name or name.startswith(("proj_out", "patch", "time")) for name in names)
    assert all(name.startswith(("transformer_blocks.", "layers.")) for name in names)


@pytest.mark.parametrize(("family", "precision"), CASES)
def test_the_prediction_stays_close_to_the_unquantised_one(
    encoded: dict[str, Encoded], family: str, precision: str
) -> None:
    data = encoded[family]
    reference = predict(data, data.family.load_transformer())
    quantised = predict(data, adapted(data, precision).transformer)
    error = float((quantised - reference).norm() / reference.norm())
    assert 0 < error < FORWARD_TOLERANCE[precision]


@pytest.mark.parametrize(("family", "precision"), CASES)
def test_the_adapter_wraps_the_same_modules_as_on_the_unquantised_base(
    encoded: dict[str, Encoded], family: str, precision: str
) -> None:
    plain = adapted(encoded[family], "no_change")
    quantised = adapted(encoded[family], precision)
    assert [lora.lora_name for lora in quantised.network.loras] == [
        lora.lora_name for lora in plain.network.loras
    ]
    assert list(quantised.network.state_dict()) == list(plain.network.state_dict())
    # Bypass: the LoKr output is added to the quantised layer's output; its weight is never rebuilt.
    assert all(lora.bypass_mode for lora in quantised.network.loras)


# ---- training on top ----------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "precision"), CASES)
def test_steps_change_only_the_adapter(encoded: dict[str, Encoded], family: str, precision: str) -> None:
    model = adapted(encoded[family], precision)
    before_base = base_tensors(model.transformer)
    before_adapter = [p.detach().clone() for p in model.parameters]
    losses = train(encoded[family], model)
    assert all(np.isfinite(losses))
    after_base = base_tensors(model.transformer)
    assert after_base.keys() == before_base.keys()
    for key, value in before_base.items():
        assert torch.equal(after_base[key], value), key
    assert any(not torch.equal(a, p) for a, p in zip(before_adapter, model.parameters, strict=True))
    assert all(p.dtype == torch.float32 for p in model.parameters)


def test_a_bfloat16_base_quantises_and_trains_a_float32_adapter_with_gradient_checkpointing(
    tiny_omnigen_dir: Path,
) -> None:
    family = get_family("omnigen")(tiny_omnigen_dir, dtype=torch.bfloat16)
    items = synthetic_images(2, width=64, height=64, seed=1)
    data = Encoded(
        family,
        family.encode_images(to_pixels([item.image for item in items])),
        family.collate_conditioning(family.encode_prompts([item.caption for item in items])),
    )
    for precision in ("int8-quanto", "int8-torchao"):
        model = adapted(data, precision)
        model.transformer.enable_gradient_checkpointing()
        model.transformer.train()
        optimizer = torch.optim.AdamW(model.parameters, lr=3e-2)
        result = optimizer_step(
            family,
            model.transformer,
            model.network,
            model.parameters,
            optimizer,
            [micro(data)],
            SCHEDULE,
            mixed_precision="bf16",
        )
        assert np.isfinite(result.loss)
        assert all(p.dtype == torch.float32 and p.grad is not None for p in model.parameters)


@pytest.mark.parametrize("precision", ["int8-quanto", "int8-torchao"])
def test_group_offload_in_memory_trains_like_the_resident_quantised_base(
    encoded: dict[str, Encoded], precision: str
) -> None:
    data = encoded["cosmos2image"]
    resident, offloaded = adapted(data, precision), adapted(data, precision)
    plan = plan_group_offload(
        training("cosmos2image", precision, enable_group_offload=True).memory,
        device=CPU,
        run_name="q",
        rank=0,
    )
    assert plan is not None
    apply_group_offload(offloaded.transformer, plan, onload_device=CPU)
    weights = OffloadedWeights(offloaded.transformer, onload_device=CPU)
    expected = train(data, resident)
    with weights.saving():
        got = train(data, offloaded)
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)


# ---- the saved adapter, and validation on the quantised base -----------------------------------


@pytest.mark.parametrize(("family", "precision"), CASES)
def test_the_saved_adapter_loads_into_the_unquantised_pipeline_with_the_seed_recipe(
    encoded: dict[str, Encoded], tmp_path: Path, family: str, precision: str
) -> None:
    data = encoded[family]
    quantised = adapted(data, precision)
    train(data, quantised)
    adapter = save_adapter(quantised.network, tmp_path / "quantised")
    plain_adapter = save_adapter(adapted(data, "no_change").network, tmp_path / "plain")
    with safe_open(str(adapter), "pt") as saved, safe_open(str(plain_adapter), "pt") as plain:
        keys = sorted(saved.keys())
        assert keys == sorted(plain.keys())
        assert all(saved.get_tensor(key).dtype == torch.float32 for key in keys)

    pipeline = data.family.build_pipeline(**pipeline_extras(family))
    base_image = generate(pipeline)
    wrapper, _ = create_lycoris_from_weights(1.0, str(adapter), pipeline.transformer)
    wrapper.merge_to()
    assert len(wrapper.loras) == len(quantised.network.loras)
    assert np.abs(generate(pipeline) - base_image).max() > 1e-3, "the adapter did not change the image"


@pytest.mark.parametrize(
    ("family", "precision"), [(f, p) for f in FAMILIES for p in ("int8-quanto", "fp8wo-torchao")]
)
def test_validation_renders_with_the_quantised_base(
    encoded: dict[str, Encoded], family: str, precision: str
) -> None:
    data = encoded[family]
    model = adapted(data, precision)
    train(data, model, steps=1)
    model.transformer.eval()
    pipeline = data.family.build_validation_pipeline(model.transformer)
    prompt, negative = data.family.encode_prompts(["a red circle", ""])
    image = data.family.generate_image(
        pipeline,
        "a red circle",
        prompt,
        negative,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=2.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert image.size == (64, 64)
    assert_quantised(model.transformer, precision)  # rendering left the base quantised


# ---- quantize_via, and what is refused ---------------------------------------------------------


def test_quantize_via_cpu_loads_on_the_cpu_and_accelerator_on_the_device() -> None:
    cuda = torch.device("cuda", 0)
    assert quantize_load_device(training(quantize_via="cpu").model, cuda) == CPU
    assert quantize_load_device(training(quantize_via="accelerator").model, cuda) == cuda
    assert quantize_load_device(training(precision="no_change", quantize_via="cpu").model, cuda) == cuda


def test_no_change_leaves_the_base_untouched(encoded: dict[str, Encoded]) -> None:
    data = encoded["omnigen"]
    transformer = data.family.load_transformer()
    assert quantize_base(transformer, training(precision="no_change").model, device=CPU) is transformer
    assert all(
        type(m.weight) is torch.nn.Parameter for m in transformer.modules() if isinstance(m, torch.nn.Linear)
    )
    spec = seed_lycoris_config("omnigen")
    assert adapter_spec(spec, training(precision="no_change").model) is spec
    assert adapter_spec(spec, training().model).bypass_mode


REFUSED_PRECISIONS = [
    "int8dq-torchao",
    "int8dq-int4-torchao",
    "int4-torchao",
    "fp8-int4-torchao",
    "int8-sdnq",
    "uint4-sdnq",
    "nf4-bnb",
    "fp8-native",
    "fp8-transformerengine",
]


@pytest.mark.parametrize("value", REFUSED_PRECISIONS)
def test_other_simpletuner_precisions_are_refused_when_the_config_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    path = write_config(tmp_path, **{"base_model_precision": value})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    line = str(caught.value)
    assert "\n" not in line
    assert "config.json" in line and f"'base_model_precision' = '{value}'" in line
    assert f"'{value}' is not supported yet; use one of: no_change, int8-quanto" in line
    # raytuner check-config reports the same line.
    assert main(["check-config", "--config", str(path)]) == 2
    assert f"'base_model_precision' = '{value}'" in capsys.readouterr().err


def test_pipeline_quantize_via_is_refused_with_what_to_use(tmp_path: Path) -> None:
    path = write_config(tmp_path, **{"base_model_precision": "int8-quanto", "quantize_via": "pipeline"})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "'quantize_via' = 'pipeline'" in str(caught.value)
    assert "use one of: cpu, accelerator" in str(caught.value)


@pytest.mark.parametrize("precision", QUANTIZED_PRECISIONS)
def test_every_supported_precision_loads_and_passes_the_preflight(tmp_path: Path, precision: str) -> None:
    run = load_config(write_config(tmp_path, **{"base_model_precision": precision, "quantize_via": "cpu"}))
    assert run.training.model.base_model_precision == precision
    devices = [CPU] if precision in CPU_PRECISIONS else []  # [] : devices the driver cannot see
    assert quantization_problem(run.training.model, run.training.memory, devices=devices) is None


def test_float8_activations_are_refused_off_a_recent_cuda_gpu() -> None:
    problem = quantization_problem(
        training(precision="fp8-torchao").model, training(precision="fp8-torchao").memory, devices=[CPU]
    )
    assert problem == (
        "'base_model_precision' = 'fp8-torchao': float8 activations need a CUDA GPU of compute capability "
        "8.9 or newer (Ada, Hopper), not cpu: use fp8wo-torchao (float8 weights only) or int8-quanto"
    )
    # The worker refuses it too, before touching the model, where the driver could not see its GPU.
    with pytest.raises(QuantizationError, match="float8 activations need a CUDA GPU"):
        quantize_base(torch.nn.Linear(16, 16), training(precision="fp8-torchao").model, device=CPU)


@pytest.mark.parametrize(
    ("keys", "fragments"),
    [
        (
            {"deepspeed_config": "zero2"},
            ["'base_model_precision' = 'int8-quanto' with deepspeed_config", "remove deepspeed_config"],
        ),
        (
            {"deepspeed_config": "zero3"},
            ["with deepspeed_config: DeepSpeed cannot hold quantised base weights"],
        ),
        (
            {"enable_group_offload": True, "group_offload_to_disk_path": Path("offload")},
            ["with group_offload_to_disk_path", "remove group_offload_to_disk_path"],
        ),
    ],
)
def test_combinations_that_cannot_work_are_refused_in_one_line(
    keys: dict[str, object], fragments: list[str]
) -> None:
    problem = quantization_problem(training(**keys).model, training(**keys).memory, devices=[CPU])
    assert problem is not None and "\n" not in problem
    for fragment in fragments:
        assert fragment in problem
    assert (
        quantization_problem(
            training(precision="no_change", **keys).model,
            training(precision="no_change", **keys).memory,
            devices=[CPU],
        )
        is None
    )


def test_float8_on_mps_is_refused() -> None:
    mps = [torch.device("mps")]
    for precision in ("fp8-quanto", "fp8uz-quanto", "fp8wo-torchao", "fp8-torchao"):
        problem = quantization_problem(
            training(precision=precision).model, training(precision=precision).memory, devices=mps
        )
        assert problem is not None and "cannot run on Apple MPS" in problem and "use int8-quanto" in problem
    assert (
        quantization_problem(
            training(precision="int8-quanto").model, training(precision="int8-quanto").memory, devices=mps
        )
        is None
    )


@pytest.mark.parametrize(
    ("precision", "module", "package"),
    [("int8-quanto", "optimum.quanto", "optimum-quanto"), ("int8-torchao", "torchao", "torchao")],
)
def test_a_missing_package_is_named_before_any_work(
    monkeypatch: pytest.MonkeyPatch, encoded: dict[str, Encoded], precision: str, module: str, package: str
) -> None:
    # A None entry in sys.modules is how Python itself marks a module as not importable.
    monkeypatch.setitem(sys.modules, module, None)
    problem = quantization_problem(
        training(precision=precision).model, training(precision=precision).memory, devices=[CPU]
    )
    assert problem is not None and "\n" not in problem
    assert f"'base_model_precision' = '{precision}' needs the {package} package" in problem
    assert "pip install 'raytuner[quantization]'" in problem
    transformer = encoded["omnigen"].family.load_transformer()
    with pytest.raises(QuantizationError, match=f"needs the {package} package"):
        quantize_base(transformer, training(precision=precision).model, device=CPU)


def test_quantising_cosmos2_is_warned_and_omnigen_is_not() -> None:
    (warning,) = quantization_warnings(training("cosmos2image", "int8-quanto").model)
    assert "Cosmos2 quickstart says not to quantise Cosmos2" in warning and "\n" not in warning
    assert quantization_warnings(training("cosmos2image", "no_change").model) == []
    assert quantization_warnings(training("omnigen", "int8-quanto").model) == []


def test_the_launcher_preflight_reports_the_problem(tmp_path: Path) -> None:
    from raytuner.train.preflight import training_problems
    from raytuner.train.settings import resolve_settings

    run = load_config(
        write_config(tmp_path, **{"base_model_precision": "int8-quanto", "deepspeed_config": "zero2"})
    )
    problems = training_problems(run, resolve_settings(run, None))
    assert any(
        "config.json: 'base_model_precision' = 'int8-quanto' with deepspeed_config" in p for p in problems
    )


# ---- on a CUDA GPU ---------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("quantize_via", ["cpu", "accelerator"])
@pytest.mark.parametrize(("family", "precision"), GPU_CASES)
def test_on_cuda_the_quantised_base_trains_only_the_adapter(
    tiny_checkpoints: dict[str, Path], tmp_path: Path, family: str, precision: str, quantize_via: str
) -> None:
    cuda = torch.device("cuda", 0)
    model_family = get_family(family)(tiny_checkpoints[family], device=cuda)
    items = synthetic_images(2, width=64, height=64, seed=1)
    data = Encoded(
        model_family,
        model_family.encode_images(to_pixels([item.image for item in items]).to(cuda)),
        model_family.collate_conditioning(model_family.encode_prompts([item.caption for item in items])),
    )
    model = adapted(data, precision, device=cuda, quantize_via=quantize_via)
    assert_quantised(model.transformer, precision)
    assert all(t.device.type == "cuda" for t in base_tensors(model.transformer).values())
    reference = predict(data, model_family.load_transformer())
    model.network.restore()  # the bare quantised base, for the comparison
    error = float((predict(data, model.transformer) - reference).norm() / reference.norm())
    assert error < FORWARD_TOLERANCE[precision]
    model.network.apply_to()
    before = base_tensors(model.transformer)
    losses = train(data, model, device=cuda)
    assert all(np.isfinite(losses))
    for key, value in base_tensors(model.transformer).items():
        assert torch.equal(value, before[key]), key

    # The same LoKr modules and saved keys as on the unquantised base; the file merges into it.
    plain = adapted(data, "no_change", device=cuda)
    assert [lora.lora_name for lora in model.network.loras] == [
        lora.lora_name for lora in plain.network.loras
    ]
    adapter = save_adapter(model.network, tmp_path / "quantised")
    with (
        safe_open(str(adapter), "pt") as saved,
        safe_open(str(save_adapter(plain.network, tmp_path / "plain")), "pt") as ref,
    ):
        assert sorted(saved.keys()) == sorted(ref.keys())
    pipeline = get_family(family)(tiny_checkpoints[family]).build_pipeline(**pipeline_extras(family))
    base_image = generate(pipeline)
    wrapper, _ = create_lycoris_from_weights(1.0, str(adapter), pipeline.transformer)
    wrapper.merge_to()
    assert np.abs(generate(pipeline) - base_image).max() > 1e-3, "the adapter did not change the image"


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["int8-quanto", "int8-torchao"])
def test_on_cuda_group_offload_in_memory_runs_on_a_quantised_base(
    tiny_cosmos_dir: Path, precision: str
) -> None:
    cuda = torch.device("cuda", 0)
    model_family = get_family("cosmos2image")(tiny_cosmos_dir, device=cuda)
    items = synthetic_images(2, width=64, height=64, seed=1)
    data = Encoded(
        model_family,
        model_family.encode_images(to_pixels([item.image for item in items]).to(cuda)),
        model_family.collate_conditioning(model_family.encode_prompts([item.caption for item in items])),
    )
    settings = replace_options(training("cosmos2image", precision), {"enable_group_offload": True})
    model = adapted(data, precision, device=CPU)  # group offload keeps the base on the CPU
    model.network.to(device=cuda)
    plan = plan_group_offload(settings.memory, device=cuda, run_name="q", rank=0)
    assert plan is not None
    apply_group_offload(model.transformer, plan, onload_device=cuda)
    with OffloadedWeights(model.transformer, onload_device=cuda).saving():
        losses = train(data, model, device=cuda)
    assert all(np.isfinite(losses))


def test_quantisation_logs_what_it_did(encoded: dict[str, Encoded], caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="raytuner.quantize"):
        adapted(encoded["omnigen"], "int8-quanto", quantize_via="cpu")
    assert "base quantised to int8-quanto: 12 linear layers (via cpu)" in caplog.text
