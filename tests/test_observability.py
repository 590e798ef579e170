"""The operator's Grafana dashboard and Prometheus alert rules use metrics that exist.

A real ``wsbroker serve`` is scraped; every ``wsbroker_*`` name in the PromQL
of ``deploy/grafana/*.json`` and ``deploy/prometheus/*.yml`` must be one it
exports (a histogram's ``_bucket``/``_sum``/``_count`` series count as its
name), so a renamed metric cannot leave a dashboard blank or an alert silent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import SECRET, ServerProcess, http_get
from tests.test_deploy import load_yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
METRIC = re.compile(r"\bwsbroker_[A-Za-z0-9_]+")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def exported(node: ServerProcess) -> dict[str, str]:
    """Metric name → type, from the ``# TYPE`` lines of a node's /metrics."""
    status, _, body = http_get(node.http + "/metrics")
    assert status == 200
    return {parts[2]: parts[3] for line in body.splitlines()
            if (parts := line.split()) and parts[:2] == ["#", "TYPE"]}


def resolves(name: str, types: dict[str, str]) -> bool:
    if name in types:
        return True
    for suffix in HISTOGRAM_SERIES:
        base = name.removesuffix(suffix)
        if base != name and types.get(base) == "histogram":
            return True
    return False


def grafana_queries() -> Iterator[tuple[str, str]]:
    """(file, PromQL) of every panel target and template variable query."""
    def walk(node: Any, path: str) -> Iterator[tuple[str, str]]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("expr", "definition", "query") and isinstance(value, str):
                    yield path, value
                else:
                    yield from walk(value, path)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item, path)

    for file in sorted((DEPLOY / "grafana").glob("*.json")):
        yield from walk(json.loads(file.read_text()), file.name)


def alert_rules() -> list[dict[str, Any]]:
    rules = []
    for file in sorted((DEPLOY / "prometheus").glob("*.yml")):
        for document in load_yaml(file):
            for group in document["groups"]:
                rules.extend(group["rules"])
    return rules


@pytest.fixture(scope="module")
def metric_types(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    node = ServerProcess("--jwt-secret", SECRET, tmp=tmp_path_factory.mktemp("node"))
    try:
        yield exported(node.start())
    finally:
        node.stop()


def test_the_node_exports_the_spec_metrics(metric_types: dict[str, str]) -> None:
    assert {"wsbroker_connections", "wsbroker_backplane_up", "wsbroker_fanout_seconds",
            "wsbroker_messages_dropped_total"} <= metric_types.keys()
    assert metric_types["wsbroker_fanout_seconds"] == "histogram"


@pytest.mark.parametrize("source", ["grafana", "prometheus"])
def test_every_metric_the_operator_files_use_is_exported(
    source: str, metric_types: dict[str, str],
) -> None:
    queries: list[tuple[str, str]] = (
        list(grafana_queries()) if source == "grafana"
        else [(rule["alert"], rule["expr"]) for rule in alert_rules()])
    used = {(where, name) for where, expr in queries for name in METRIC.findall(expr)}
    minimum = {"grafana": 10, "prometheus": 5}[source]  # a sanity check of the parsing
    assert len({name for _, name in used}) >= minimum, f"{source} uses few metrics: {used}"
    missing = sorted((where, name) for where, name in used if not resolves(name, metric_types))
    assert not missing, f"not exported by a node: {missing}"


def test_alert_rules_say_what_and_how_bad(metric_types: dict[str, str]) -> None:
    rules = alert_rules()
    names = [rule["alert"] for rule in rules]
    assert len(names) == len(set(names)) >= 5
    for rule in rules:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_resolving_counts_histogram_series_as_the_base_name() -> None:
    types = {"wsbroker_fanout_seconds": "histogram", "wsbroker_connections": "gauge"}
    check: Callable[[str], bool] = lambda name: resolves(name, types)  # noqa: E731
    assert check("wsbroker_fanout_seconds_bucket") and check("wsbroker_connections")
    assert not check("wsbroker_connections_count") and not check("wsbroker_nonexistent")
