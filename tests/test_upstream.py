"""What raytuner relies on in its libraries' internals (raytuner/upstream.py) still holds in these releases.

Each test here fails when the upstream behaviour a workaround relies on changes: the GCS cluster
config's message, the autoscaling config's node types, the monitor process's command line, Ray
Train's report polling, its wrapped worker errors and the module it logs reports from, diffusers'
group offload hooks and groups, a pipeline's execution device, OmniGen's processor call, the
checkpointing function each transformer block is handed to, LyCORIS's
class-level presets and its logger, torch's seeded gamma. Real libraries throughout. The
end-to-end check on a running autoscaler is in tests/cluster/test_fake_autoscaling.py.
"""

from __future__ import annotations

import inspect
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from raytuner import upstream
from raytuner.placement import cluster_facts
from tests.cluster.schemas import CLUSTER_DIR
from tests.ray_cluster import RayCluster


def test_the_gcs_cluster_config_lists_node_groups_that_may_have_a_node() -> None:
    from ray.core.generated import autoscaler_pb2

    config = autoscaler_pb2.ClusterConfig()
    for name, resources, max_count in (
        ("gpu", {"CPU": 8, "GPU": 1}, 4),
        ("cpu", {"CPU": 16}, -1),
        ("disabled", {"CPU": 2, "GPU": 8}, 0),
    ):
        group = config.node_group_configs.add(name=name, max_count=max_count)
        group.resources.update(resources)
    node_types = upstream.node_types_from_cluster_config(config)
    assert [(node.name, node.gpus, node.max_workers) for node in node_types] == [
        ("gpu", 1.0, 4),
        ("cpu", 0.0, -1),
    ]


@pytest.mark.parametrize(
    ("config_file", "gpu_types"),
    [
        ("aws.yaml", {"ray.worker.gpu_spot": 1.0, "ray.worker.gpu_on_demand": 1.0}),
        ("gcp.yaml", {"ray_worker_gpu_spot": 1.0, "ray_worker_gpu_on_demand": 1.0}),
        ("local-fake.yaml", {"fake.logical_gpu": 1.0}),
    ],
)
def test_the_cluster_yamls_worker_types_are_read_with_their_gpus(
    config_file: str, gpu_types: dict[str, float]
) -> None:
    config = yaml.safe_load((CLUSTER_DIR / config_file).read_text())
    node_types = upstream.node_types_from_autoscaling_config(config)
    assert config["head_node_type"] not in {node.name for node in node_types}
    assert {node.name: node.gpus for node in node_types if node.gpus} == gpu_types


def test_a_cluster_capped_at_no_workers_or_types_capped_at_none_add_nothing() -> None:
    types = {"head": {"resources": {"CPU": 4}}, "gpu": {"resources": {"GPU": 1}, "max_workers": 2}}
    capped = {"max_workers": 0, "head_node_type": "head", "available_node_types": types}
    assert upstream.node_types_from_autoscaling_config(capped) == ()
    types["gpu"]["max_workers"] = 0
    assert upstream.node_types_from_autoscaling_config({**capped, "max_workers": 4}) == ()
    # A type without max_workers of its own may have as many as the cluster.
    del types["gpu"]["max_workers"]
    (gpu,) = upstream.node_types_from_autoscaling_config({**capped, "max_workers": 4})
    assert (gpu.name, gpu.max_workers) == ("gpu", 4)


def test_both_autoscalers_monitors_are_started_from_the_scripts_raytuner_looks_for() -> None:
    from ray._private import services

    started = {
        os.path.join(services.RAY_PATH, folder, "monitor.py")
        for folder in (services.AUTOSCALER_PRIVATE_DIR, services.AUTOSCALER_V2_DIR)
    }
    assert all(Path(script).is_file() for script in started)
    assert all(script.endswith(upstream.MONITOR_SCRIPTS) for script in started)


def test_on_a_ray_without_an_autoscaling_config_the_monitor_is_found_and_no_node_type_is_read(
    ray_cluster: RayCluster,
) -> None:
    import ray

    gcs_address = ray.get_runtime_context().gcs_address
    port = int(gcs_address.rsplit(":", 1)[1])
    # The test suite's Ray runs on this machine: its monitor is found by the GCS port it serves.
    monitor = upstream.find_monitor(port)
    assert monitor is not None and monitor.flags[upstream.GCS_ADDRESS_FLAG].endswith(f":{port}")
    assert upstream.AUTOSCALING_CONFIG_FLAG not in monitor.flags
    assert upstream.reported_node_types() == ()
    assert upstream.configured_node_types(gcs_address) == ()  # read through a task on the head node
    facts = cluster_facts()
    assert not facts.local and facts.gpu_node_types == ()
    assert facts.cluster_gpus == int(ray.cluster_resources().get("GPU", 0))


def test_ray_train_report_logs_are_quieted_on_the_logger_ray_train_uses() -> None:
    from ray.train.v2._internal.execution import context

    upstream.quiet_train_report_logs()
    # The logger Ray Train 2.60 reports through is named after the module's file, not the module.
    assert logging.getLogger(context.__file__).level == logging.WARNING


def test_ray_train_hands_the_report_poll_interval_of_fits_process_to_its_controller(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from ray.train.v2._internal import constants
    from ray.train.v2._internal.execution.controller.controller import TrainController
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    monkeypatch.delenv(upstream.REPORT_POLL_ENV, raising=False)
    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR == upstream.REPORT_POLL_ENV
    # fit() copies the variable from its own process into the controller's runtime env, where the
    # controller reads it when it starts.
    assert "get_env_vars_to_propagate" in inspect.getsource(
        DataParallelTrainer._initialize_and_run_controller
    )
    assert "HEALTH_CHECK_INTERVAL_S_ENV_VAR" in inspect.getsource(TrainController.__init__)
    with upstream.report_poll_interval() as value:
        assert (
            constants.get_env_vars_to_propagate()[upstream.REPORT_POLL_ENV] == value == upstream.REPORT_POLL_S
        )
    assert upstream.REPORT_POLL_ENV not in os.environ  # set for the block only
    monkeypatch.setenv(upstream.REPORT_POLL_ENV, "0.5")
    with upstream.report_poll_interval() as value:
        assert value == "0.5"  # the environment's value wins
    assert os.environ[upstream.REPORT_POLL_ENV] == "0.5"


def test_a_worker_exception_is_found_inside_ray_trains_wrapper_also_after_pickling() -> None:
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    original = ValueError("a worker's own error")
    wrapped = UserExceptionWithTraceback(original, "Traceback (most recent call last): ...")
    assert upstream.ray_train_user_error(wrapped) is original
    received = upstream.ray_train_user_error(pickle.loads(pickle.dumps(wrapped)))
    assert isinstance(received, ValueError) and str(received) == "a worker's own error"
    assert upstream.ray_train_user_error(original) is None


class _Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
        self.norm = torch.nn.LayerNorm(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


@pytest.mark.parametrize("to_disk", [False, True], ids=["memory", "disk"])
def test_diffusers_group_offload_hooks_and_their_groups_weights_are_found(
    tmp_path: Path, to_disk: bool
) -> None:
    from diffusers.hooks import apply_group_offloading

    model = _Blocks()
    assert list(upstream.group_offload_hooks(model)) == []
    apply_group_offloading(
        model,
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type="leaf_level",
        offload_to_disk_path=str(tmp_path) if to_disk else None,
    )
    hooks = list(upstream.group_offload_hooks(model))
    assert len(hooks) == 3 and all(hasattr(hook, "group") for hook in hooks)  # one per leaf layer
    model(torch.ones(1, 4))  # the groups are written to disk when they are first offloaded
    sources = list(upstream.group_offload_weight_sources(model))
    assert {id(parameter) for parameter, _, _ in sources} == {id(p) for p in model.parameters()}
    for _, path, key in sources:
        if to_disk:
            assert key is not None and path is not None and path.is_file() and path.parent == tmp_path
        else:
            assert (path, key) == (None, None)


@pytest.fixture(scope="module")
def omnigen_pipeline(tiny_omnigen_dir: Path) -> Any:
    from diffusers import OmniGenPipeline

    return OmniGenPipeline.from_pretrained(str(tiny_omnigen_dir))


def test_a_pipelines_execution_device_is_its_offload_hooks_onload_device(omnigen_pipeline: Any) -> None:
    from diffusers.hooks import apply_group_offloading

    assert upstream.execution_device(omnigen_pipeline) == torch.device("cpu")
    transformer = type(omnigen_pipeline.transformer).from_config(omnigen_pipeline.transformer.config)
    pipeline = type(omnigen_pipeline)(
        transformer=transformer,
        vae=omnigen_pipeline.vae,
        scheduler=omnigen_pipeline.scheduler,
        tokenizer=omnigen_pipeline.tokenizer,
    )
    # Offloaded, the weights stay on the CPU; the pipeline computes on the hooks' onload device (CPU 0
    # here: a device this machine has that the weights' own device never names).
    onload = torch.device("cpu", 0)
    apply_group_offloading(
        transformer, onload_device=onload, offload_device=torch.device("cpu"), offload_type="leaf_level"
    )
    assert next(transformer.parameters()).device == torch.device("cpu") != onload
    assert upstream.execution_device(pipeline) == onload


class _Stop(Exception):
    pass


class _RecordingProcessor:
    max_image_size = 1024  # OmniGenPipeline.__call__'s default max_input_image_size: no reset asked

    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls.append((args, kwargs))
        raise _Stop


def test_omnigen_asks_its_multimodal_processor_for_the_prompts_ids_as_the_lent_processors_expect(
    omnigen_pipeline: Any,
) -> None:
    from diffusers.pipelines.omnigen.processor_omnigen import OmniGenMultiModalProcessor

    own = omnigen_pipeline.multimodal_processor
    lent = _RecordingProcessor()
    with pytest.raises(_Stop), upstream.lent_multimodal_processor(omnigen_pipeline, lent) as yielded:
        assert yielded is own and omnigen_pipeline.multimodal_processor is lent
        omnigen_pipeline(prompt="a red cube", height=32, width=32, num_inference_steps=1)
    assert omnigen_pipeline.multimodal_processor is own  # put back, also after an error
    ((args, kwargs),) = lent.calls
    assert list(args[0]) == ["a red cube"] and not any(args[1] or ())
    assert {"height": 32, "width": 32, "num_images_per_prompt": 1}.items() <= kwargs.items()
    # The processor lent for a negative prompt passes it on to the pipeline's own.
    assert "negative_prompt" in inspect.signature(OmniGenMultiModalProcessor.__call__).parameters


def test_gradient_checkpointing_support_is_read_from_the_models_class() -> None:
    from diffusers.models.modeling_utils import ModelMixin
    from diffusers.models.transformers.transformer_omnigen import OmniGenTransformer2DModel

    class Plain(ModelMixin):
        pass

    assert upstream.supports_gradient_checkpointing(OmniGenTransformer2DModel)
    assert not upstream.supports_gradient_checkpointing(Plain())
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        Plain().enable_gradient_checkpointing()


@pytest.mark.parametrize("family_name", ["cosmos2image", "omnigen"])
def test_diffusers_hands_each_block_of_the_block_list_in_order_to_the_checkpointing_function(
    family_name: str, tiny_cosmos_dir: Path, tiny_omnigen_dir: Path
) -> None:
    from diffusers.models.modeling_utils import ModelMixin

    from raytuner.data.synthetic import synthetic_images, to_pixels
    from raytuner.models.registry import get_family

    family = get_family(family_name)(tiny_cosmos_dir if family_name == "cosmos2image" else tiny_omnigen_dir)
    latents = family.encode_images(to_pixels([synthetic_images(1, width=64, height=64, seed=1)[0].image]))
    conditioning = family.collate_conditioning(family.encode_prompts(["a red square"]))
    transformer = family.load_transformer().requires_grad_(False)
    seen: list[torch.nn.Module] = []

    def record(block: torch.nn.Module, *inputs: Any) -> Any:
        seen.append(block)
        return block(*inputs)

    transformer.enable_gradient_checkpointing(gradient_checkpointing_func=record)
    latents.requires_grad_(True)  # grad enabled, as in training
    family.predict(transformer, latents, torch.tensor([0.5]), conditioning)
    assert seen == list(getattr(transformer, family.checkpoint_blocks))
    assert len(seen) == 2
    # The default function BlockCheckpointing stands in for: non-reentrant torch checkpointing.
    assert '"use_reentrant": False' in inspect.getsource(ModelMixin.enable_gradient_checkpointing)
    # The interval function counts only the calls it is given: each block, once per forward.
    counter = upstream.enable_block_interval_checkpointing(transformer, seen, 2)
    family.predict(transformer, latents, torch.tensor([0.5]), conditioning)
    assert (counter.checkpointed, counter.kept) == (1, 1)


def test_lycoris_presets_are_class_state_which_is_restored_after_the_block() -> None:
    from lycoris import LycorisNetwork

    prefix, targets = LycorisNetwork.LORA_PREFIX, list(LycorisNetwork.TARGET_REPLACE_MODULE)
    with upstream.preserved_lycoris_class_state():
        LycorisNetwork.apply_preset({"target_module": ["Linear"], "lora_prefix": "changed"})
        # apply_preset writes the class, so every network built after it would use this preset.
        assert vars(LycorisNetwork)["LORA_PREFIX"] == "changed"
        assert LycorisNetwork.TARGET_REPLACE_MODULE == ["Linear"]
    assert (prefix, targets) == (LycorisNetwork.LORA_PREFIX, LycorisNetwork.TARGET_REPLACE_MODULE)


LYCORIS_LOGS = """
import logging, sys
from raytuner import upstream
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(message)s")
upstream.quiet_lycoris_logs(verbose=VERBOSE)
import lycoris.logging
print(logging.getLevelName(logging.getLogger("LyCORIS").level), file=sys.stderr)
lycoris.logging.logger.info("an info line")
lycoris.logging.logger.warning("a warning line")
"""


@pytest.mark.parametrize("verbose", [False, True], ids=["quiet", "verbose"])
def test_lycoris_sets_its_log_level_on_import_and_its_info_lines_show_only_when_verbose(
    verbose: bool,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", LYCORIS_LOGS.replace("VERBOSE", str(verbose))],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    lines = done.stderr.splitlines()
    assert "INFO" in lines  # the import set the level a set-up before it chose, hence the handler
    assert "LyCORIS a warning line" in lines  # in raytuner's format, on stderr
    assert ("LyCORIS an info line" in lines) == verbose
    assert done.stdout == ""


def test_torchs_seeded_gamma_draws_follow_the_generator() -> None:
    concentration = torch.full((8,), 2.0)

    def draw(seed: int) -> torch.Tensor:
        return upstream.standard_gamma(concentration, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(0), draw(0)) and not torch.equal(draw(0), draw(1))
    assert bool((draw(0) > 0).all())
    # The reason for the private function: a Beta draw takes no generator.
    assert "generator" not in inspect.signature(torch.distributions.Beta.sample).parameters


def test_deepspeed_builds_no_shared_memory_all_reduce_once_told_it_is_not_compatible() -> None:
    """In a fresh interpreter on the CPU accelerator: DeepSpeed's backend asks the ops dict, and
    gets no op to build (it would otherwise compile one for ~30 s, which this test would show as a
    module printed instead of None)."""
    script = (
        "from raytuner.upstream import keep_deepspeed_collectives_on_gloo\n"
        "from deepspeed.accelerator import get_accelerator\n"
        "assert get_accelerator().device_name() == 'cpu'\n"
        "import deepspeed.ops\n"
        "assert deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'], 'the op no longer builds on CPU'\n"
        "keep_deepspeed_collectives_on_gloo()\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "print(build_shm_op())\n"
    )
    environment = {**os.environ, "DS_ACCELERATOR": "cpu"}
    finished = subprocess.run(
        [sys.executable, "-c", script], env=environment, capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.strip().splitlines()[-1] == "None", finished.stdout[-2000:]
