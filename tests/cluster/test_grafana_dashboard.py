"""``cluster/grafana/raytuner-dashboard.json`` is a Grafana dashboard over the metrics raytuner exports.

The metric names are read from the gauges raytuner registers (``RayGauges``), not from a list kept
here: a gauge renamed, added or removed in code without the dashboard following fails this test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from raytuner.evaluate.metrics import RayGauges

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "raytuner-dashboard.json"
# Ray's own dashboards name their Prometheus data source through this template variable.
DATASOURCE = "${datasource}"
METRIC = re.compile(r"\bray_[a-z0-9_]+")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def exported() -> set[str]:
    # Ray exports a ray.util.metrics gauge named N as ray_N.
    return {f"ray_{name}" for name in RayGauges("dashboard-check").names}


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {variable["name"]: variable for variable in dashboard["templating"]["list"]}


def test_dashboard_is_a_grafana_dashboard_on_the_prometheus_datasource_variable(
    dashboard: dict[str, Any],
) -> None:
    assert dashboard["title"] and dashboard["uid"] and isinstance(dashboard["schemaVersion"], int)
    variables = _variables(dashboard)
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    assert dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["type"] and panel["title"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
        assert panel["datasource"] == DATASOURCE and panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE and target["expr"] and target["refId"]


def test_every_panel_shows_each_run_from_the_run_variable(dashboard: dict[str, Any]) -> None:
    variables = _variables(dashboard)
    run = variables["run"]
    assert run["type"] == "query" and run["datasource"] == DATASOURCE
    assert "run)" in run["query"]["query"]  # label_values(<a raytuner metric>, run): the gauges' tag
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            assert 'run=~"$run"' in target["expr"] and "{{run}}" in target["legendFormat"], panel["title"]


def test_every_metric_queried_is_one_raytuner_exports_and_each_is_shown(
    dashboard: dict[str, Any], exported: set[str]
) -> None:
    queried = {
        metric
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for metric in METRIC.findall(target["expr"])
    }
    in_variables = {
        metric
        for variable in dashboard["templating"]["list"]
        for metric in METRIC.findall(json.dumps(variable.get("query", "")))
    }
    assert queried | in_variables <= exported, sorted((queried | in_variables) - exported)
    assert queried == exported, f"exported but on no panel: {sorted(exported - queried)}"
    # The figures a person watches a run by.
    for name in (
        "train_loss",
        "eval_loss",
        "samples_per_second",
        "step_time_seconds",
        "data_wait_fraction",
        "peak_memory_mib",
    ):
        assert f"ray_raytuner_{name}" in queried
