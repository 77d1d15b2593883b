"""The one place raytuner relies on what its libraries do not promise: private names and behaviour.

Each function here reaches into a library's internals (a private attribute, an undocumented
variable, class-level state) for something its public API does not offer, says what that API
lacks and which release it was verified against, and may break with any later release:
``tests/test_upstream.py`` has a test for each that fails when the upstream behaviour it relies on
changes (and ``tests/cluster/test_fake_autoscaling.py`` checks the autoscaler reading end to end on
a running autoscaler). Nothing else in raytuner imports ``ray._private`` or a ``_internal``
package, reads a private attribute of Ray, diffusers, LyCORIS or torch, or changes a third-party
logger. (Ray Tune's ASHA scheduler is the one exception: ``ResumableASHA`` in
``raytuner/tune/early_stopping.py`` subclasses it and saves its private rung tables, which only a
subclass can do.)

Verified against Ray 2.60.0, diffusers 0.42.1, LyCORIS (``lycoris_lora``) 4.1.3 and torch 2.14.

Nothing here runs on import: importing this module changes no logger and no environment variable.

**The node types an autoscaler can add.** raytuner trains on GPUs by default when the cluster has
them or its autoscaler can add them, and an autoscaling cluster starts with no GPU node. In Ray 2.60
the node types are in one of two places:

- the GCS's cluster config (``autoscaler_pb2.ClusterConfig`` in the ``__autoscaler`` namespace of
  the internal key-value store, read with ``ray._private.state.state.get_cluster_config()``), which
  is what Ray Train's own resource check and Ray Data's autoscaler read. It is filled only by a
  component that calls the GCS's ``ReportClusterConfig``; Ray 2.60's own autoscalers (v1 and v2)
  never do, so on a cluster started by ``ray up`` or ``ray start --autoscaling-config`` it is empty;
- the autoscaling config file itself: ``ray start --head --autoscaling-config=FILE``
  (``~/ray_bootstrap_config.yaml`` under ``ray up``) starts the autoscaler's monitor process with
  ``--autoscaling-config=FILE`` and ``--gcs-address=HOST:PORT`` on its command line. A task on the
  head node finds the monitor of this cluster by its GCS port and reads the file's node types.

KubeRay's autoscaler builds its config from the RayCluster resource, in a sidecar container, so
neither place shows its worker groups: there raytuner sees no node type it could add.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

# Ray gives every node a resource named after its id; the head node's is this one.
HEAD_NODE_RESOURCE = "node:__internal_head__"
# The monitor's entry points, relative to Ray's package (ray/_private/services.py: start_monitor).
MONITOR_SCRIPTS = (
    os.path.join("ray", "autoscaler", "_private", "monitor.py"),
    os.path.join("ray", "autoscaler", "v2", "monitor.py"),
)
AUTOSCALING_CONFIG_FLAG = "--autoscaling-config"
GCS_ADDRESS_FLAG = "--gcs-address"
# Reading a small file on the head node; a head too busy to start a worker within this is
# answered as "no node type known" rather than holding the run.
HEAD_READ_TIMEOUT_S = 60


@dataclass(frozen=True, kw_only=True)
class NodeType:
    """A worker node type the autoscaler can launch: its resources and how many it may run.

    ``max_workers`` -1 means no limit of its own.
    """

    name: str
    resources: Mapping[str, float]
    max_workers: int

    @property
    def gpus(self) -> float:
        return float(self.resources.get("GPU", 0))


def autoscaler_node_types() -> tuple[NodeType, ...]:
    """Worker node types the connected cluster's autoscaler can add; empty when none are known.

    Read once per cluster and process: an autoscaler's node types come from the file it was started
    with, which does not change under a running cluster.
    """
    import ray

    return _node_types_of_cluster(ray.get_runtime_context().gcs_address)


@functools.cache
def _node_types_of_cluster(gcs_address: str) -> tuple[NodeType, ...]:
    return reported_node_types() or configured_node_types(gcs_address)


def reported_node_types() -> tuple[NodeType, ...]:
    """The node types in the GCS's cluster config, when something reported one."""
    import ray._private.state

    config = ray._private.state.state.get_cluster_config()
    return node_types_from_cluster_config(config) if config is not None else ()


def node_types_from_cluster_config(config: Any) -> tuple[NodeType, ...]:
    """``autoscaler_pb2.ClusterConfig``'s node groups that may have a node (``max_count`` not 0)."""
    return tuple(
        NodeType(
            name=group.name,
            resources={name: float(amount) for name, amount in group.resources.items()},
            max_workers=int(group.max_count),
        )
        for group in config.node_group_configs
        if group.max_count != 0
    )


def configured_node_types(gcs_address: str) -> tuple[NodeType, ...]:
    """The worker node types of the config file this cluster's autoscaler runs from (read on the head)."""
    import ray

    port = int(gcs_address.rsplit(":", 1)[1])
    read_on_head = ray.remote(autoscaling_config_of_monitor).options(
        num_cpus=0, resources={HEAD_NODE_RESOURCE: 0.001}, max_retries=0
    )
    try:
        config = ray.get(read_on_head.remote(port), timeout=HEAD_READ_TIMEOUT_S)
    except ray.exceptions.RayError as error:  # a timeout, or the file unreadable there
        lines = str(error).strip().splitlines()
        logger.warning(
            "the autoscaler's node types could not be read on the head node: %s",
            lines[-1] if lines else type(error).__name__,
        )
        return ()
    return node_types_from_autoscaling_config(config) if config else ()


@dataclass(frozen=True, kw_only=True)
class MonitorProcess:
    """The autoscaler's monitor process of one cluster: its ``--flag=value`` arguments and working folder."""

    flags: Mapping[str, str]
    cwd: str


def find_monitor(gcs_port: int) -> MonitorProcess | None:
    """On the head node: the monitor process serving the GCS on ``gcs_port``, or None."""
    import psutil

    for process in psutil.process_iter(["cmdline", "cwd"]):
        arguments = process.info["cmdline"] or []
        if not any(argument.endswith(MONITOR_SCRIPTS) for argument in arguments):
            continue
        flags = dict(
            argument.split("=", 1) for argument in arguments if argument.startswith("--") and "=" in argument
        )
        if flags.get(GCS_ADDRESS_FLAG, "").endswith(f":{gcs_port}"):
            return MonitorProcess(flags=flags, cwd=process.info["cwd"] or "/")
    return None


def autoscaling_config_of_monitor(gcs_port: int) -> dict[str, Any] | None:
    """On the head node: the node-type part of the autoscaling config of the monitor serving ``gcs_port``.

    None when no monitor of that cluster runs here, or it runs without a config file (a cluster of
    fixed size, or one whose autoscaler gets its config elsewhere, as KubeRay's does).
    """
    import yaml

    monitor = find_monitor(gcs_port)
    if monitor is None or AUTOSCALING_CONFIG_FLAG not in monitor.flags:
        return None
    path = Path(os.path.expanduser(monitor.flags[AUTOSCALING_CONFIG_FLAG]))
    if not path.is_absolute():  # relative to where `ray start` ran, which the monitor inherits
        path = Path(monitor.cwd) / path
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {key: raw.get(key) for key in ("max_workers", "head_node_type", "available_node_types")}


def node_types_from_autoscaling_config(config: Mapping[str, Any]) -> tuple[NodeType, ...]:
    """The worker node types of an autoscaling config (a cluster YAML) that may have a node.

    A type without ``max_workers`` may have as many as the cluster's ``max_workers``; a type without
    ``resources`` is one whose resources the cloud provider fills in, unknown here (no GPU counted).
    """
    cluster_limit = -1 if config.get("max_workers") is None else int(config["max_workers"])
    if cluster_limit == 0:
        return ()
    head = config.get("head_node_type")
    node_types = []
    for name, spec in (config.get("available_node_types") or {}).items():
        limit = int(spec.get("max_workers", cluster_limit))
        if name == head or limit == 0:
            continue
        resources = {key: float(amount) for key, amount in (spec.get("resources") or {}).items()}
        node_types.append(NodeType(name=name, resources=resources, max_workers=limit))
    return tuple(node_types)


# ---- Ray Train --------------------------------------------------------------------------------

# Ray Train's controller takes each worker's report off a one-slot queue when it polls, every 2 s
# by default: a worker reporting every step would wait up to 2 s per step. Polling every 0.1 s keeps
# a step's report off its critical path.
REPORT_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
REPORT_POLL_S = "0.1"


@contextlib.contextmanager
def report_poll_interval() -> Iterator[str]:
    """The block runs with Ray Train polling its workers' reports every ``REPORT_POLL_S`` seconds.

    Ray Train 2.60 has no setting for its controller's poll interval but this undocumented variable,
    which ``TorchTrainer.fit()`` copies from the calling process's environment into its controller
    actor's (``get_env_vars_to_propagate``), where ``TrainController.__init__`` reads it. So it is
    set in this process for the block that calls ``fit()`` (the driver of ``raytuner train``, or a
    sweep trial's process) and restored afterwards; a value set in the environment wins. Yields the
    value in force, and says it in the log.
    """
    own = os.environ.get(REPORT_POLL_ENV)
    if own is not None:
        logger.info(
            "Ray Train polls worker reports every %s s (%s from the environment)", own, REPORT_POLL_ENV
        )
        yield own
        return
    logger.info(
        "Ray Train polls worker reports every %s s (%s; a value set in the environment wins)",
        REPORT_POLL_S,
        REPORT_POLL_ENV,
    )
    os.environ[REPORT_POLL_ENV] = REPORT_POLL_S
    try:
        yield REPORT_POLL_S
    finally:
        os.environ.pop(REPORT_POLL_ENV, None)


def quiet_train_report_logs() -> None:
    """Ray Train logs every report at INFO; raytuner's progress line says the same every few seconds.

    Ray 2.60 offers no switch for it. Its logger is the module's own, named after the file of
    ``ray.train.v2._internal.execution.context`` (not the module), so only the module's ``logger``
    object reaches it. Called where a Ray Train worker starts.
    """
    from ray.train.v2._internal.execution import context as train_context

    train_context.logger.setLevel(logging.WARNING)


def ray_train_user_error(error: BaseException) -> BaseException | None:
    """The worker's own exception inside Ray Train's ``UserExceptionWithTraceback``; None for others.

    Ray Train 2.60 wraps an exception raised in ``train_loop_per_worker`` in that class (in
    ``ray.train.v2._internal.exceptions``) with no public accessor for it; the original is its
    ``_base_exc``. (``TrainingFailedError.worker_failures`` already holds unwrapped errors.)
    """
    wrapped = getattr(error, "_base_exc", None)
    return wrapped if isinstance(wrapped, BaseException) else None


# ---- Third-party logs ---------------------------------------------------------------------------

# With torchao installed (the quantization extra), importing diffusers imports torchao, which logs
# three start-up warnings in every process, drivers and Ray workers alike: torch's "No CUDA runtime
# is found" on CPU machines, torch's deprecation of torchao's pytree registrations, and diffusers'
# note that torchao 0.18 lacks tensor classes of older releases (raytuner never loads
# torchao-serialised checkpoints). None asks anything of the user; errors still show. Their levels
# must be set before diffusers is first imported in the process.
STARTUP_WARNING_LOGGERS = (
    "torch.utils.cpp_extension",
    "torch.utils._pytree",
    "diffusers.quantizers.torchao.torchao_quantizer",
)
# The Hub client's HTTP library logs every request at INFO (raytuner says what it uploads); shown
# under --verbose.
CHATTY_LOGGERS = ("httpx2",)
LYCORIS_LOGGER = "LyCORIS"


def quiet_third_party_logs(*, verbose: bool = False) -> None:
    """Lower the libraries' loggers that say nothing a raytuner user needs (see the names above).

    Called once where a process starts (the command's ``main``, a Ray worker's set-up hook), never
    on import.
    """
    for name in STARTUP_WARNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    quiet_lycoris_logs(verbose=verbose)


class _ToRootLogger(logging.Handler):
    """Hands a record to the root logger's handlers (LyCORIS turns its logger's propagation off)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


def quiet_lycoris_logs(*, verbose: bool = False) -> None:
    """LyCORIS's INFO lines (one per module it creates; raytuner prints its own summary) only under ``verbose``.

    LyCORIS 4.1 offers no setting for its logs: importing ``lycoris`` sets its logger to INFO, turns
    its propagation off and gives it a handler on stdout unless it has one already, so a level set
    before the import is lost. raytuner's handler gets the level instead: before the import, a handler
    that passes records on to the root logger's (raytuner's format, on stderr) is the one LyCORIS
    finds, so it adds none of its own.
    """
    level = logging.DEBUG if verbose else logging.WARNING
    lycoris_logger = logging.getLogger(LYCORIS_LOGGER)
    lycoris_logger.setLevel(level)  # kept when lycoris is imported already
    if not lycoris_logger.handlers:
        lycoris_logger.addHandler(_ToRootLogger())
        lycoris_logger.propagate = False  # the handler passes records on once, as LyCORIS will have it
    # Only raytuner's own handler: the logger may share handlers with others (a test's log capture)
    # whose levels are not LyCORIS's to set.
    for handler in lycoris_logger.handlers:
        if isinstance(handler, _ToRootLogger):
            handler.setLevel(level)


# ---- diffusers ----------------------------------------------------------------------------------


def group_offload_hooks(module: torch.nn.Module) -> Iterator[Any]:
    """diffusers' group offload hooks installed in ``module`` and its submodules (each has a ``group``).

    diffusers 0.42 tells only whether a model is offloaded (``_is_group_offload_enabled``, private
    too), never which hooks and groups it has. Each offloaded submodule keeps a ``HookRegistry`` in
    its ``_diffusers_hook`` attribute, and the offload hook is registered there under the private
    name ``_GROUP_OFFLOADING``.
    """
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    for submodule in module.modules():
        registry = getattr(submodule, "_diffusers_hook", None)
        hook = registry.get_hook(_GROUP_OFFLOADING) if isinstance(registry, HookRegistry) else None
        if hook is not None:
            yield hook


def group_offload_weight_sources(
    module: torch.nn.Module,
) -> Iterator[tuple[torch.nn.Parameter, Path | None, str | None]]:
    """Every parameter a group offload hook in ``module`` moves: (parameter, its group's file, its key there).

    The file and key are None unless the group is offloaded to disk. diffusers 0.42 keeps these in
    the hook's ``ModuleGroup`` (``modules``, ``parameters``, ``offload_to_disk_path``,
    ``safetensors_file_path``, ``tensor_to_key``), undocumented attributes with no public reader.
    """
    for hook in group_offload_hooks(module):
        group = hook.group
        tensor_to_key = getattr(group, "tensor_to_key", None) if group.offload_to_disk_path else None
        members = [p for member in group.modules for p in member.parameters()] + list(group.parameters)
        for parameter in members:
            key = tensor_to_key.get(parameter) if tensor_to_key else None
            yield parameter, (Path(group.safetensors_file_path) if key is not None else None), key


def execution_device(pipeline: Any) -> torch.device:
    """The device a diffusers pipeline's own ``__call__`` computes on, where tensors handed to it belong.

    diffusers 0.42 answers it only through the private ``_execution_device`` property that
    ``__call__`` uses: the onload device of group offload hooks, the execution device of
    accelerate's CPU offload hooks, else ``device``. The public ``device`` does not look at
    accelerate's hooks, so cached prompt embeddings put there could land on another device than the
    pipeline's latents.
    """
    device: torch.device = pipeline._execution_device
    return device


@contextlib.contextmanager
def lent_multimodal_processor(pipeline: Any, processor: Any) -> Iterator[Any]:
    """The block runs with ``processor`` as the OmniGen pipeline's ``multimodal_processor``; yields its own.

    ``OmniGenPipeline.__call__`` (diffusers 0.42) takes only text and turns it into token ids with
    ``self.multimodal_processor(prompt, input_images, height=, width=, use_img_cfg=,
    use_input_image_size_as_output=, num_images_per_prompt=)``, with no way to pass a negative
    prompt or ids already tokenised; a processor lent for one call is the only way in. The
    pipeline's own is put back when the block ends, also on an error.
    """
    own = pipeline.multimodal_processor
    pipeline.multimodal_processor = processor
    try:
        yield own
    finally:
        pipeline.multimodal_processor = own


def supports_gradient_checkpointing(model: torch.nn.Module) -> bool:
    """Whether a diffusers model can checkpoint its blocks' activations.

    diffusers 0.42 says so only in the private class attribute ``_supports_gradient_checkpointing``
    (``enable_gradient_checkpointing`` raises a bare ValueError when it is false).
    """
    return bool(getattr(model, "_supports_gradient_checkpointing", False))


# ---- diffusers: gradient_checkpointing_interval ------------------------------------------------


class BlockCheckpointing:
    """diffusers' per-block checkpointing function that checkpoints only every ``interval``-th block.

    diffusers 0.42's ``enable_gradient_checkpointing(gradient_checkpointing_func)`` is public, but
    what the function is called with is not: ``CosmosTransformer3DModel.forward`` and
    ``OmniGenTransformer2DModel.forward`` call ``self._gradient_checkpointing_func(block, *inputs)``
    once per entry of their block list (``transformer_blocks`` / ``layers``), in order, while
    grad is enabled; the default function runs ``torch.utils.checkpoint.checkpoint(block.__call__,
    *inputs, use_reentrant=False)``. This one does that for blocks ``0, N, 2N, ...`` (SimpleTuner's
    ``block_index % interval == 0``) and calls the other blocks directly, keeping their
    activations. ``checkpointed`` / ``kept`` count the block calls of each kind.
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], interval: int) -> None:
        self.interval = interval
        self._index = {id(block): index for index, block in enumerate(blocks)}
        self.checkpointed = 0
        self.kept = 0

    def checkpoints(self, block: torch.nn.Module) -> bool:
        index = self._index.get(id(block))
        # A module outside the block list (none in diffusers 0.42) is checkpointed, as by default.
        return index is None or index % self.interval == 0

    def __call__(self, block: torch.nn.Module, *inputs: Any) -> Any:
        if self.checkpoints(block):
            import torch.utils.checkpoint

            self.checkpointed += 1
            return torch.utils.checkpoint.checkpoint(block.__call__, *inputs, use_reentrant=False)
        self.kept += 1
        return block(*inputs)


def enable_block_interval_checkpointing(
    model: Any, blocks: Sequence[torch.nn.Module], interval: int
) -> BlockCheckpointing:
    """Turn on ``model``'s gradient checkpointing for every ``interval``-th of ``blocks`` only."""
    function = BlockCheckpointing(blocks, interval)
    model.enable_gradient_checkpointing(gradient_checkpointing_func=function)
    return function


# ---- LyCORIS ------------------------------------------------------------------------------------


@contextlib.contextmanager
def preserved_lycoris_class_state() -> Iterator[None]:
    """Restore ``LycorisNetwork``'s class-level preset state when the block ends.

    LyCORIS 4.1 ``LycorisNetwork.apply_preset`` writes its preset into *class* attributes (target
    modules, algo maps, the ``LORA_PREFIX`` of saved keys) rather than into a network: building one
    adapter would change every adapter built after it in the same process, and a changed prefix
    would make saved files unloadable. Its upper-case class attributes are saved and put back.
    """
    from lycoris import LycorisNetwork

    saved = {name: copy.deepcopy(value) for name, value in vars(LycorisNetwork).items() if name.isupper()}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(LycorisNetwork, name, value)


# ---- torch --------------------------------------------------------------------------------------


def standard_gamma(concentration: torch.Tensor, *, generator: torch.Generator | None) -> torch.Tensor:
    """Gamma(``concentration``, 1) samples drawn from ``generator``.

    ``torch.distributions.Beta`` draws take no generator (torch 2.14), so a seeded Beta draw is
    built from two Gammas of torch's private ``torch._standard_gamma``, which takes one in every
    torch raytuner supports (``Gamma.sample`` takes one in torch 2.14; raytuner allows torch 2.11).
    """
    import torch

    samples: torch.Tensor = torch._standard_gamma(concentration, generator=generator)
    return samples


def keep_deepspeed_collectives_on_gloo() -> None:
    """On a CPU worker, keep DeepSpeed from building its shared-memory all-reduce.

    DeepSpeed's communication backend (``deepspeed.comm.torch.TorchBackend``) JIT-compiles a C++
    extension (``deepspeed_shm_comm``, with ninja) when its accelerator is the CPU: about 30 s of
    both cores on a 2-core machine, at the first run in each Python environment, and a failure on a
    CPU image without a C++ toolchain. raytuner's CPU runs reduce their gradients over gloo, as
    without DeepSpeed. DeepSpeed has no setting for this; it reads which ops may be built from
    ``deepspeed.ops.__compatible_ops__``, a dict it builds on first access and keeps for edits.
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
