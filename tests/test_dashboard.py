"""The Grafana dashboard (deploy/grafana) against the metrics a real instance exposes on /metrics.

A renamed metric or label leaves a panel empty without an error anywhere; these tests fail instead.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Cluster, running
from .harness import ROOT, WAIT, Probe, api, token_for, unique, wait_until

DASHBOARD = ROOT / "deploy" / "grafana" / "webapp-dashboard.json"
DATASOURCE = "${datasource}"
METRIC = re.compile(r"\b(?:webapp|process)_[a-z0-9_]+")
BY = re.compile(r"\b(by|without)\s*\(([^)]*)\)\s*")
SELECTOR = re.compile(r"\b((?:webapp|process)_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
RANGE = re.compile(r"\[([^\]]*)\]")
# Labels Prometheus attaches to every series of a scrape target; the app never exposes them.
TARGET_LABELS = frozenset({"instance", "job"})
# What each kind of family is exposed as (prometheus-client's text format).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "summary": ("", "_sum", "_count")}
CUMULATIVE = ("_total", "_bucket", "_sum", "_count")

Series = dict[str, set[str] | None]  # exposed series name -> its label names (None: no sample yet)


def load() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those folded into a collapsed row."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    found = [
        (f"panel {panel['id']} {panel['title']!r}", str(target["expr"]))
        for panel in panels(dashboard)
        if panel["type"] != "row"
        for target in panel["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            found.append((f"variable ${variable['name']}", query if isinstance(query, str) else query["query"]))
    return found


def _closing(expr: str, start: int) -> int:
    """The index of the parenthesis closing the one at `start`."""
    depth = 0
    for index in range(start, len(expr)):
        depth += {"(": 1, ")": -1}.get(expr[index], 0)
        if depth == 0:
            return index
    raise AssertionError(f"unbalanced parentheses in {expr!r}")


def aggregations(expr: str) -> Iterator[tuple[set[str], set[str]]]:
    """Each `by (labels)` clause with the metric names it aggregates over.

    Only the prefix form `sum by (labels) (...)` is read: the postfix form is refused, so the
    scope of every clause is plain."""
    for match in BY.finditer(expr):
        after = match.end()
        assert expr[after:after + 1] == "(", f"write `{match.group(0).strip()}` before its argument: {expr}"
        labels = {label.strip() for label in match.group(2).split(",") if label.strip()}
        yield labels, set(METRIC.findall(expr[after:_closing(expr, after) + 1]))


def exposed(text: str) -> Series:
    """The series names /metrics exposes, each with the label names its samples carry."""
    series: Series = {}
    for family in text_string_to_metric_families(text):
        for suffix in SUFFIXES.get(family.type, ("",)):
            series.setdefault(family.name + suffix, None)
        for sample in family.samples:
            labels = series.get(sample.name) or set()
            series[sample.name] = labels | set(sample.labels)
    return series


async def metrics_text(url: str) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session, session.get(
        url + "/metrics"
    ) as response:
        assert response.status == 200, response.status
        return await response.text()


async def scrape(url: str) -> Series:
    return exposed(await metrics_text(url))


# --- the dashboard's own shape ----------------------------------------------------------


def test_dashboard_is_an_importable_shape() -> None:
    dashboard = load()
    assert dashboard["title"] and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    assert dashboard.get("id") is None  # an import creates it; a fixed id would overwrite another dashboard
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    instance = variables["instance"]
    assert instance["type"] == "query" and instance["multi"] and instance["includeAll"]
    assert instance["query"] == "label_values(webapp_ready, instance)"
    assert instance["datasource"]["uid"] == DATASOURCE

    everything = list(panels(dashboard))
    ids = [panel["id"] for panel in everything]
    assert len(ids) == len(set(ids)), f"panel ids repeat: {sorted(ids)}"
    assert dashboard["panels"][0]["type"] == "row", "every panel sits in a row"
    for panel in everything:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"]), panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], f"{panel['title']!r} has no query"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]


def test_counters_are_rates_over_the_rate_interval() -> None:
    for where, expr in expressions(load()):
        assert set(RANGE.findall(expr)) <= {"$__rate_interval"}, f"{where}: {expr}"
        for name in METRIC.findall(expr):
            if name.endswith(CUMULATIVE):
                assert re.search(rf"\brate\(\s*{name}\b", expr), f"{where}: {name} outside rate(): {expr}"
            if where.startswith("panel"):
                assert re.search(rf'\b{name}\{{instance=~"\$instance"\}}', expr), f"{where}: {name} not by $instance"
        for labels, _ in aggregations(expr):
            assert labels, f"{where}: empty by () in {expr}"


# --- against a real instance -------------------------------------------------------------


@pytest.fixture(scope="module")
def instance(redis_client: redis.Redis) -> Iterator[Cluster]:
    with running(redis_client, Cluster(unique("dashboard"), ("M",))) as started:
        yield started


@pytest.mark.cluster
async def test_every_query_names_exposed_metrics_and_labels(instance: Cluster, probes: list[Probe]) -> None:
    url = instance.instances[0].url
    queries = expressions(load())

    # Names first, before any waiting: a rename fails here at once.
    series = await scrape(url)
    missing = sorted(
        f"{where}: {name}" for where, expr in queries for name in set(METRIC.findall(expr)) if name not in series
    )
    assert not missing, "the dashboard queries series /metrics does not expose:\n" + "\n".join(missing)

    # Labelled counters and histograms show their labels once something happened.
    user = unique("dash-user")
    probe = Probe(user)
    probes.append(probe)
    await probe.connect(url, await token_for(url, user))
    for path in ("/api/emit/all", f"/api/emit/users/{user}"):
        status, answer = await api(url, path, {"event": "news", "data": path})
        assert status == 202, answer
    await probe.wait_for("news", count=2)
    await probe.client.disconnect()

    labelled = {name for _, expr in queries for labels, names in aggregations(expr) if labels - TARGET_LABELS
                for name in names}

    async def sampled() -> Series | None:
        now = await scrape(url)
        return now if all(now.get(name) is not None for name in labelled) else None

    try:
        series = await wait_until(sampled, "a sample of every series aggregated by a label")
    except AssertionError:
        series = await scrape(url)
        raise AssertionError(f"no samples yet of {sorted(n for n in labelled if series.get(n) is None)}") from None

    wrong = []
    for where, expr in queries:
        for labels, names in aggregations(expr):
            for name in names:
                unknown = labels - TARGET_LABELS - (series[name] or set())
                if unknown:
                    wrong.append(f"{where}: by {sorted(unknown)} not on {name} (it has {sorted(series[name] or ())})")
        for name, matchers in SELECTOR.findall(expr):
            unknown = set(MATCHER.findall(matchers)) - TARGET_LABELS - (series[name] or set())
            if unknown:
                wrong.append(f"{where}: selector {sorted(unknown)} not on {name}")
    assert not wrong, "the dashboard groups or filters by labels the metrics lack:\n" + "\n".join(wrong)


@pytest.mark.cluster
async def test_every_exposed_metric_has_a_panel(instance: Cluster) -> None:
    """A metric added to webapp/metrics.py without a panel is a blind spot: add one to the dashboard."""
    queried = {name for _, expr in expressions(load()) for name in METRIC.findall(expr)}
    text = await metrics_text(instance.instances[0].url)
    unqueried = sorted(
        family.name
        for family in text_string_to_metric_families(text)
        if family.name.startswith("webapp_")
        and not family.name.endswith("_created")  # prometheus-client's timestamps of its histograms
        and not queried & {family.name + suffix for suffix in SUFFIXES.get(family.type, ("",))}
    )
    assert not unqueried, f"metrics no panel shows: {unqueried}"
