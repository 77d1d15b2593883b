"""Offline validation of the cluster configs: Ray's own launcher schema, and KubeRay's CRD schemas.

Launcher YAMLs go through what ``ray up`` does before it touches a cloud: Ray's ``prepare_config``
(fills in the provider's defaults) and ``validate_config`` (``ray/autoscaler/ray-schema.json``).

KubeRay manifests are checked against the OpenAPI v3 schemas of the RayCluster and RayJob
CustomResourceDefinitions that KubeRay publishes, read from a folder outside this repository (the
``RAYTUNER_KUBERAY_CRDS`` variable, else ``../shared/kuberay`` beside the checkout). The API server
prunes unknown fields silently; ``kubectl apply --validate=strict`` refuses them. To check the same
way offline, every object schema that neither lists ``additionalProperties`` nor preserves unknown
fields is closed (``additionalProperties: false``), and the object's own ``apiVersion``, ``kind``
and ``metadata`` (which the CRD leaves to the API server) get a schema of their own.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
CLUSTER_DIR = REPO_ROOT / "cluster"
KUBERAY_CRDS_ENV = "RAYTUNER_KUBERAY_CRDS"
CRD_FILES = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml")

# RFC 1123 names and Kubernetes label values, as the API server checks them.
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"

# The part of ObjectMeta a manifest may set; the rest is written by the API server.
OBJECT_META_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name"],
    "additionalProperties": False,
    "properties": {
        # A RayCluster's name becomes a label value and part of its services' names.
        "name": {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL},
        "namespace": {"type": "string", "maxLength": 63, "pattern": _DNS_LABEL},
        "labels": {
            "type": "object",
            "additionalProperties": {"type": "string", "maxLength": 63, "pattern": _LABEL_VALUE},
        },
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}


def kuberay_crd_dir() -> Path:
    """Where KubeRay's CRD files are looked for (they are reference data, not part of raytuner)."""
    configured = os.environ.get(KUBERAY_CRDS_ENV)
    return Path(configured) if configured else (REPO_ROOT / ".." / "shared" / "kuberay").resolve()


def missing_crds() -> str | None:
    """Why the KubeRay schemas cannot be read here, or None when they can."""
    folder = kuberay_crd_dir()
    absent = [name for name in CRD_FILES if not (folder / name).is_file()]
    if absent:
        return f"KubeRay CRD schemas not found ({', '.join(absent)} in {folder}; set {KUBERAY_CRDS_ENV})"
    return None


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    # libyaml's loader where PyYAML has it: the CRD files are megabytes of YAML.
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with path.open() as file:
        return [document for document in yaml.load_all(file, Loader=loader) if document is not None]


# ---------------------------------------------------------------------------------------------
# Ray's cluster launcher


def validate_launcher_config(config: dict[str, Any]) -> dict[str, Any]:
    """Check a cluster launcher config as ``ray up`` does before it starts anything; returns it filled in.

    Raises ``jsonschema.ValidationError`` for a key Ray's schema does not know. The fake
    multi-node provider's defaults file is not in Ray 2.60's wheel, so that config is complete
    already and is validated as it is, the way the autoscaler reads it.
    """
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = copy.deepcopy(config)
    if config.get("provider", {}).get("type") != "fake_multinode":
        config = prepare_config(config)
    validate_config(config)
    return config


# ---------------------------------------------------------------------------------------------
# KubeRay


@dataclass(frozen=True)
class CrdSchema:
    """The closed schema of one served version of a custom resource."""

    api_version: str
    kind: str
    validator: jsonschema.protocols.Validator


def close_objects(schema: Any) -> Any:
    """A copy of ``schema`` in which no object accepts a property its schema does not name."""
    schema = copy.deepcopy(schema)
    for node in _schema_nodes(schema):
        open_ended = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
        if node.get("type") == "object" and not open_ended:
            node["additionalProperties"] = False
    return schema


def _schema_nodes(schema: Any) -> Iterator[dict[str, Any]]:
    """Every subschema of an OpenAPI v3 schema (properties, items, maps, combinators)."""
    if not isinstance(schema, dict):
        return
    yield schema
    for child in schema.get("properties", {}).values():
        yield from _schema_nodes(child)
    for key in ("items", "additionalProperties", "not"):
        yield from _schema_nodes(schema.get(key))
    for key in ("anyOf", "allOf", "oneOf"):
        for child in schema.get(key, []):
            yield from _schema_nodes(child)


def load_crd_schema(path: Path) -> CrdSchema:
    """The storage version of a CRD file, closed to unknown fields, with ObjectMeta checked too."""
    (crd,) = load_yaml_documents(path)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    (version,) = [version for version in crd["spec"]["versions"] if version.get("storage")]
    schema = close_objects(version["schema"]["openAPIV3Schema"])
    api_version = f"{group}/{version['name']}"
    schema["properties"]["apiVersion"] = {"type": "string", "enum": [api_version]}
    schema["properties"]["kind"] = {"type": "string", "enum": [kind]}
    schema["properties"]["metadata"] = OBJECT_META_SCHEMA
    # What the API server fills in; a manifest never sets it.
    schema["properties"].pop("status", None)
    schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
    # OpenAPI v3.0 schemas are JSON Schema draft 4 with extensions (x-kubernetes-*, nullable), which
    # a draft-4 validator ignores.
    validator_class = jsonschema.Draft4Validator
    validator_class.check_schema(schema)
    return CrdSchema(api_version=api_version, kind=kind, validator=validator_class(schema))


def load_kuberay_schemas() -> dict[str, CrdSchema]:
    """The RayCluster and RayJob schemas by kind."""
    schemas = [load_crd_schema(kuberay_crd_dir() / name) for name in CRD_FILES]
    return {schema.kind: schema for schema in schemas}


def manifest_errors(document: dict[str, Any], schemas: dict[str, CrdSchema]) -> list[str]:
    """Every way ``document`` breaks its kind's schema, one line each, naming the field's path."""
    kind = document.get("kind")
    if kind not in schemas:
        return [f"kind: {kind!r} is not one of {sorted(schemas)}"]
    errors = sorted(
        schemas[kind].validator.iter_errors(document), key=lambda error: list(error.absolute_path)
    )
    return [f"{_field_path(error.absolute_path) or '<root>'}: {error.message}" for error in errors]


def _field_path(path: Iterable[Any]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text
