"""The KubeRay manifests: valid RayCluster and RayJob objects with unknown fields refused, as
``kubectl apply --validate=strict`` refuses them, and autoscaling and token auth switched on.

The schema checks need KubeRay's CRD files, which are read from outside the repository (see
tests/cluster/schemas.py) and skipped, with the reason, where they are absent. The checks of what
the manifests turn on need nothing but the manifests.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.cluster.schemas import (
    CLUSTER_DIR,
    CrdSchema,
    load_kuberay_schemas,
    load_yaml_documents,
    manifest_errors,
    missing_crds,
)

MANIFESTS = ("raycluster.yaml", "rayjob.yaml")
TOKEN_KEY = "auth_token"  # the key KubeRay reads from an authOptions.secretName Secret


@pytest.fixture(scope="module")
def kuberay_schemas() -> dict[str, CrdSchema]:
    reason = missing_crds()
    if reason:
        pytest.skip(reason)
    return load_kuberay_schemas()


def _manifest(name: str) -> dict[str, Any]:
    (document,) = load_yaml_documents(CLUSTER_DIR / "kuberay" / name)
    return document


def _cluster_spec(document: dict[str, Any]) -> dict[str, Any]:
    return document["spec"] if document["kind"] == "RayCluster" else document["spec"]["rayClusterSpec"]


def _pod_templates(spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", spec["headGroupSpec"]["template"]
    for group in spec["workerGroupSpecs"]:
        yield f"worker group {group['groupName']}", group["template"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_manifest_matches_its_crd_schema_with_unknown_fields_refused(
    name: str, kuberay_schemas: dict[str, CrdSchema]
) -> None:
    document = _manifest(name)
    assert manifest_errors(document, kuberay_schemas) == []
    assert document["apiVersion"] == kuberay_schemas[document["kind"]].api_version


def _rename(mapping: dict[str, Any], old: str, new: str) -> None:
    mapping[new] = mapping.pop(old)


def _worker_container(document: dict[str, Any]) -> dict[str, Any]:
    return _cluster_spec(document)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]


# Each breaks one field the way a typo would; the error must name where.
MISSPELLINGS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "rayStartParms": (
        lambda doc: _rename(_cluster_spec(doc)["headGroupSpec"], "rayStartParams", "rayStartParms"),
        "headGroupSpec: Additional properties are not allowed ('rayStartParms' was unexpected)",
    ),
    "enableInTreeAutoscaler": (
        lambda doc: _rename(_cluster_spec(doc), "enableInTreeAutoscaling", "enableInTreeAutoscaler"),
        "'enableInTreeAutoscaler' was unexpected",
    ),
    "pod template volumeMount": (
        lambda doc: _rename(_worker_container(doc), "volumeMounts", "volumeMount"),
        "workerGroupSpecs[0].template.spec.containers[0]: Additional properties are not allowed "
        "('volumeMount' was unexpected)",
    ),
    "secretKeyRef kye": (
        lambda doc: _rename(_worker_container(doc)["env"][1]["valueFrom"]["secretKeyRef"], "key", "kye"),
        "containers[0].env[1].valueFrom.secretKeyRef: Additional properties are not allowed ('kye' was unexpected)",
    ),
    "metadata lables": (
        lambda doc: _rename(doc["metadata"], "labels", "lables"),
        "metadata: Additional properties are not allowed ('lables' was unexpected)",
    ),
    "apiVersion": (
        lambda doc: doc.update(apiVersion="ray.io/v1alpha2"),
        "apiVersion: 'ray.io/v1alpha2' is not one of ['ray.io/v1']",
    ),
    "replicas as text": (
        lambda doc: _cluster_spec(doc)["workerGroupSpecs"][0].update(maxReplicas="8"),
        "workerGroupSpecs[0].maxReplicas: '8' is not of type 'integer'",
    ),
}


@pytest.mark.parametrize("name", MANIFESTS)
@pytest.mark.parametrize("mistake", sorted(MISSPELLINGS))
def test_a_misspelled_field_fails_validation(
    name: str, mistake: str, kuberay_schemas: dict[str, CrdSchema]
) -> None:
    document = copy.deepcopy(_manifest(name))
    breaks, expected = MISSPELLINGS[mistake]
    breaks(document)
    errors = manifest_errors(document, kuberay_schemas)
    assert any(expected in error for error in errors), errors


def test_the_crd_as_published_would_let_a_misspelling_through(kuberay_schemas: dict[str, CrdSchema]) -> None:
    """Why the schemas are closed: KubeRay's own leaves most objects open, as the API server prunes."""
    import jsonschema

    from tests.cluster.schemas import kuberay_crd_dir

    (crd,) = load_yaml_documents(kuberay_crd_dir() / "ray.io_rayclusters.yaml")
    (version,) = [version for version in crd["spec"]["versions"] if version.get("storage")]
    document = copy.deepcopy(_manifest("raycluster.yaml"))
    _rename(document["spec"]["headGroupSpec"], "rayStartParams", "rayStartParms")
    assert not list(jsonschema.Draft4Validator(version["schema"]["openAPIV3Schema"]).iter_errors(document))
    assert manifest_errors(document, kuberay_schemas)


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in container.get("env", [])}


def _assert_token_auth(env: dict[str, dict[str, Any]], secret: str, where: str) -> None:
    assert env.get("RAY_AUTH_MODE", {}).get("value") == "token", where
    reference = env.get("RAY_AUTH_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
    assert reference == {"name": secret, "key": TOKEN_KEY}, where
    assert "value" not in env["RAY_AUTH_TOKEN"], f"{where}: a token written into the manifest"


@pytest.mark.parametrize("name", MANIFESTS)
def test_token_auth_is_on_for_every_ray_container_from_one_secret(name: str) -> None:
    spec = _cluster_spec(_manifest(name))
    assert spec["authOptions"]["mode"] == "token"
    secret = spec["authOptions"]["secretName"]
    for where, template in _pod_templates(spec):
        for container in template["spec"]["containers"]:
            _assert_token_auth(_env(container), secret, f"{where} container {container['name']}")
    _assert_token_auth(_env(spec["autoscalerOptions"]), secret, "autoscaler sidecar")


@pytest.mark.parametrize("name", MANIFESTS)
def test_gpu_workers_autoscale_from_zero_behind_a_cluster_internal_head(name: str) -> None:
    spec = _cluster_spec(_manifest(name))
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["serviceType"] == "ClusterIP" and head["enableIngress"] is False
    (head_container,) = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"], "the head is a CPU pod"
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] == group["replicas"] == 0 < group["maxReplicas"]
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_pod_runs_the_raytuner_image_of_the_declared_ray_version(name: str) -> None:
    spec = _cluster_spec(_manifest(name))
    dockerfile = (CLUSTER_DIR / "kuberay" / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM\s+(\S+)", dockerfile, re.MULTILINE)
    assert re.fullmatch(rf"rayproject/ray:{re.escape(spec['rayVersion'])}-py3\d+-gpu", base), base
    images = {
        container["image"]
        for _, template in _pod_templates(spec)
        for container in template["spec"]["containers"]
    }
    (image,) = images
    assert f"-ray{spec['rayVersion']}-" in image, image


def test_rayjob_runs_raytuner_train_from_the_shared_volume() -> None:
    job = _manifest("rayjob.yaml")
    entrypoint = job["spec"]["entrypoint"].split()
    assert entrypoint[:3] == ["raytuner", "train", "--config"]
    mounts = {
        mount["mountPath"]
        for _, template in _pod_templates(job["spec"]["rayClusterSpec"])
        for container in template["spec"]["containers"]
        for mount in container["volumeMounts"]
    }
    assert any(entrypoint[3].startswith(f"{path}/") for path in mounts), (entrypoint, mounts)
    assert job["spec"]["shutdownAfterJobFinishes"] is True
