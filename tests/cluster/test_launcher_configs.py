"""The cluster launcher YAMLs (``ray up``), checked offline against Ray's own schema and for what they promise.

Nothing here reaches a cloud: Ray's ``prepare_config`` and ``validate_config`` run on the files as
``ray up`` would before it starts a node.
"""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from tests.cluster.schemas import CLUSTER_DIR, REPO_ROOT, load_yaml_documents, validate_launcher_config

CLOUDS = ("aws", "gcp")
LAUNCHER_CONFIGS = (*CLOUDS, "local-fake")
TOKEN_FILE = "~/.ray/auth_token"


def _config(name: str) -> dict[str, Any]:
    (config,) = load_yaml_documents(CLUSTER_DIR / f"{name}.yaml")
    return config


def _worker_types(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    head = config["head_node_type"]
    return {name: spec for name, spec in config["available_node_types"].items() if name != head}


def _is_spot(cloud: str, node_config: dict[str, Any]) -> bool:
    if cloud == "aws":
        return node_config.get("InstanceMarketOptions", {}).get("MarketType") == "spot"
    return node_config.get("scheduling", {}).get("provisioningModel") == "SPOT"


def _machine(cloud: str, node_config: dict[str, Any]) -> str:
    return node_config["InstanceType" if cloud == "aws" else "machineType"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema(name: str) -> None:
    filled = validate_launcher_config(_config(name))
    assert filled["head_node_type"] in filled["available_node_types"]


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
@pytest.mark.parametrize(
    ("where", "misspelling"),
    [
        ("top level", ("idle_timeout_minutes", "idle_timeout_minute")),
        ("a node type", ("max_workers", "max_worker")),
    ],
)
def test_launcher_schema_refuses_a_misspelled_key(
    name: str, where: str, misspelling: tuple[str, str]
) -> None:
    right, wrong = misspelling
    config = copy.deepcopy(_config(name))
    target = config if where == "top level" else next(iter(_worker_types(config).values()))
    target[wrong] = target.pop(right)
    with pytest.raises(jsonschema.ValidationError, match=f"'{wrong}' was unexpected"):
        validate_launcher_config(config)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_gpu_workers_scale_from_zero_spot_first_with_an_on_demand_fallback(cloud: str) -> None:
    config = _config(cloud)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["resources"]["CPU"] > 0, "the head is a CPU node"
    workers = _worker_types(config)
    assert workers and all(spec["resources"].get("GPU", 0) >= 1 for spec in workers.values())
    assert all(spec["min_workers"] == 0 < spec["max_workers"] for spec in workers.values())
    assert config["max_workers"] >= max(spec["max_workers"] for spec in workers.values())

    spot = [spec for spec in workers.values() if _is_spot(cloud, spec["node_config"])]
    on_demand = [spec for spec in workers.values() if not _is_spot(cloud, spec["node_config"])]
    assert len(spot) == 1 and len(on_demand) == 1, sorted(workers)
    (spot_type,), (fallback,) = spot, on_demand
    # The fallback must fit whatever the spot type was chosen for, and rank below it.
    assert fallback["resources"] == spot_type["resources"]
    assert _machine(cloud, fallback["node_config"]) == _machine(cloud, spot_type["node_config"])
    assert spot_type["priority"] > fallback["priority"]


def _ray_start_commands(config: dict[str, Any]) -> list[str]:
    return [
        command
        for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray start" in command
    ]


@pytest.mark.parametrize("cloud", CLOUDS)
def test_every_node_starts_ray_with_token_auth_and_the_dashboard_on_loopback(cloud: str) -> None:
    config = validate_launcher_config(_config(cloud))
    starts = _ray_start_commands(config)
    assert len(starts) == 2
    for command in starts:
        assert "RAY_AUTH_MODE=token ray start" in command, command
    (head_start,) = [command for command in starts if "--head" in command]
    assert "--dashboard-host=127.0.0.1" in head_start

    # Head and workers alike (prepare_config prepends setup_commands to both) fetch the token into
    # the file Ray reads, and the set-up fails when it came back empty.
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        (fetch,) = [command for command in commands if f"> {TOKEN_FILE}" in command]
        assert "umask 077" in fetch and fetch.rstrip().endswith(f"test -s {TOKEN_FILE}")
        assert any("export RAY_AUTH_MODE=token" in command for command in commands)


SECRET_LOOKING = re.compile(
    r"token|secret|credential|password|\.pem$|id_rsa|\.ssh|\.aws|\.ray|\.config/gcloud", re.I
)


@pytest.mark.parametrize("cloud", CLOUDS)
def test_nodes_install_this_checkout_with_the_tested_versions_and_nothing_secret_is_mounted(
    cloud: str,
) -> None:
    config = _config(cloud)
    for remote, local in config["file_mounts"].items():
        source = (REPO_ROOT / local).resolve()
        assert source.exists() and source.is_relative_to(REPO_ROOT), local
        assert not SECRET_LOOKING.search(f"{remote} {local}"), (remote, local)
        assert remote.startswith("~/raytuner/"), remote
    assert {Path(local).name for local in config["file_mounts"].values()} >= {"pyproject.toml", "raytuner"}
    assert config["cluster_synced_files"] == []

    (install,) = [
        command for command in config["setup_commands"] if "raytuner[deepspeed,wandb,quantization]" in command
    ]
    words = shlex.split(install)
    assert words[words.index("-c") + 1] == "~/raytuner/constraints.txt"
    # The nodes' Ray is the one this project is tested with.
    assert "ray==2.60.0" in (REPO_ROOT / "constraints.txt").read_text().split()


def test_local_fake_workers_offer_a_resource_the_head_lacks() -> None:
    config = _config("local-fake")
    assert config["provider"]["type"] == "fake_multinode"
    head = config["available_node_types"][config["head_node_type"]]
    workers = _worker_types(config).values()
    assert all(worker["min_workers"] == 0 < worker["max_workers"] for worker in workers)
    # One type to scale out with a resource the head lacks; one declaring a GPU, that nothing launches.
    assert any(set(worker["resources"]) - set(head["resources"]) - {"GPU"} for worker in workers), (
        "no resource only a worker type has"
    )
    assert any(worker["resources"].get("GPU") for worker in workers), "no worker type with a GPU"
    # Scale-down is quick enough for a test to see it.
    assert config["idle_timeout_minutes"] < 1
